"""Local inference API for applications on the device (HTTP/1.1, stdlib server).

    POST /v1/predict   {"inputs": {"<name>": <nested list>}}
                       -> {"id": ..., "outputs": {...}, "model": ..., "version": ..., "latency_us": ...}
    POST /v1/feedback  {"label": ..., "id": ... (optional), "predicted": ... (optional), "inputs": {...} (optional)}
                       -> 202: a feedback record (accuracy; with inputs, a labeled sample; with the
                       prediction's id, joined in the cloud to that prediction's sample record)
    GET  /v1/health    200 {"status": "ok", ...} or 503 {"status": "no_model", ...}
    GET  /v1/status    the agent's status document

Errors answer ``{"error": {"code": ..., "message": ...}}``: 400 for malformed JSON or
inputs that do not fit the model, 404/405 for unknown routes, 413 for bodies over
16 MiB, 503 when no model is loaded.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from ._exceptions import InputError, ModelError, NoModelError
from ._json import dumps, loads

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger(__name__)
MAX_BODY = 16 * 1024 * 1024


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # listen() backlog: socketserver's 5 resets connections when a few local clients
    # connect at once (a burst from several applications, a test rig polling)
    request_queue_size = 128
    agent: Agent


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # buffer the response: headers and body leave in one segment (no Nagle/delayed-ACK stall)
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, body: Any) -> None:
        data = dumps(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        self._send(status, {"error": {"code": code, "message": message}})

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        agent = self.server.agent
        if self.path == "/v1/health":
            health = agent.health()
            self._send(200 if health["status"] == "ok" else 503, health)
        elif self.path == "/v1/status":
            self._send(200, agent.status())
        elif self.path == "/v1/predict":
            self._error(405, "method_not_allowed", "use POST for /v1/predict")
        else:
            self._error(404, "not_found", f"no route {self.path}")

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        if self.path not in ("/v1/predict", "/v1/feedback"):
            self._drain()
            self._error(404 if self.path not in ("/v1/health", "/v1/status") else 405, "not_found", f"no route POST {self.path}")
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            self._error(411, "length_required", "Content-Length is required")
            return
        if int(length) > MAX_BODY:
            self.close_connection = True
            self._error(413, "too_large", f"body over {MAX_BODY} bytes")
            return
        raw = self.rfile.read(int(length))
        try:
            body = loads(raw)
        except ValueError as exc:
            self._error(400, "bad_json", f"body is not valid JSON: {exc}")
            return
        if self.path == "/v1/feedback":
            self._feedback(body)
            return
        if not isinstance(body, dict) or "inputs" not in body:
            self._error(400, "bad_request", 'body must be an object with "inputs": {"<input name>": <array>}')
            return
        try:
            prediction = self.server.agent.predict(body["inputs"])
        except NoModelError as exc:
            self._error(503, "no_model", str(exc))
        except InputError as exc:
            self._error(400, "bad_input", str(exc))
        except ModelError as exc:
            self._error(500, "inference_failed", str(exc))
        else:
            self._send(200, prediction.to_json())

    def _feedback(self, body: Any) -> None:
        if not isinstance(body, dict) or "label" not in body:
            self._error(400, "bad_request", 'body must be an object with "label" (and optionally "id", "predicted", "inputs")')
            return
        try:
            recorded = self.server.agent.feedback(body["label"], body.get("predicted"), body.get("inputs"),
                                                  body.get("id"))
        except NoModelError as exc:
            self._error(503, "no_model", str(exc))
        except InputError as exc:
            self._error(400, "bad_input", str(exc))
        else:
            self._send(202, recorded)

    def _drain(self) -> None:
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) <= MAX_BODY:
            self.rfile.read(int(length))
        else:
            self.close_connection = True

    do_PUT = do_DELETE = do_PATCH = lambda self: (self._drain(), self._error(405, "method_not_allowed", f"{self.command} not allowed"))  # noqa: E731


class LocalAPI:
    """The HTTP server, on its own thread (one thread per connection)."""

    def __init__(self, agent: Agent, host: str, port: int) -> None:
        self._server = _Server((host, port), _Handler)
        self._server.agent = agent
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="edgeml-api", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("local API on http://%s:%d", self.host, self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
