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
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from ._exceptions import InputError, ModelError, NoModelError
from ._json import dumps, loads

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger(__name__)
MAX_BODY = 16 * 1024 * 1024
#: Seconds a connection may sit idle (keep-alive) or take to send its request.
IDLE_TIMEOUT_S = 60
_ROUTES = {"/v1/health": ("GET",), "/v1/status": ("GET",), "/v1/predict": ("POST",), "/v1/feedback": ("POST",)}


def _content_length(value: str | None) -> int | None:
    """The Content-Length header as a number, or None when missing or not a plain decimal."""
    if value is None or not value.isascii() or not value.strip().isdecimal():
        return None
    return int(value)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # listen() backlog: socketserver's 5 resets connections when a few local clients
    # connect at once (a burst from several applications, a test rig polling)
    request_queue_size = 128
    agent: Agent


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S  # a client that stalls (or keeps a connection idle) frees its thread
    # buffer the response: headers and body leave in one segment (no Nagle/delayed-ACK stall)
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, body: Any, allow: tuple[str, ...] = ()) -> None:
        data = dumps(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if allow:
            self.send_header("Allow", ", ".join(allow))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str, allow: tuple[str, ...] = ()) -> None:
        self._send(status, {"error": {"code": code, "message": message}}, allow)

    def _route(self) -> str | None:
        """The route of this request (query string ignored), or None after answering
        404/405 (the request's body read and dropped, so the connection stays usable)."""
        path = self.path.split("?", 1)[0]
        methods = _ROUTES.get(path)
        if methods is not None and self.command in methods:
            return path
        self._drain()
        if methods is None:
            self._error(404, "not_found", f"no route {self.command} {path}")
        else:
            self._error(405, "method_not_allowed", f"use {' or '.join(methods)} for {path}", allow=methods)
        return None

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        path = self._route()
        if path is None:
            return
        self._drain()  # a GET with a body: not read as the next request
        agent = self.server.agent
        if path == "/v1/health":
            health = agent.health()
            self._send(200 if health["status"] == "ok" else 503, health)
        else:
            self._send(200, agent.status())

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        path = self._route()
        if path is None:
            return
        length = _content_length(self.headers.get("Content-Length"))
        if length is None:
            self.close_connection = True
            self._error(411, "length_required", "Content-Length is required (a plain number; chunked bodies are not accepted)")
            return
        if length > MAX_BODY:
            self.close_connection = True
            self._error(413, "too_large", f"body over {MAX_BODY} bytes")
            return
        raw = self.rfile.read(length)
        if len(raw) < length:  # the client went away (or timed out) mid-body
            self.close_connection = True
            return
        try:
            body = loads(raw)
        except ValueError as exc:
            self._error(400, "bad_json", f"body is not valid JSON: {exc}")
            return
        if path == "/v1/feedback":
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
        """Read and drop the request's body; close the connection when it has an unusable one."""
        header = self.headers.get("Content-Length")
        length = _content_length(header)
        if length is not None and length <= MAX_BODY:
            if length:
                self.rfile.read(length)
        elif header is not None or self.headers.get("Transfer-Encoding"):
            self.close_connection = True

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _route


class LocalAPI:
    """The HTTP server, on its own thread (one thread per connection)."""

    def __init__(self, agent: Agent, host: str, port: int) -> None:
        server_class = _Server6 if ":" in host else _Server  # an IPv6 address ([::1]:8479 in api_addr)
        self._server = server_class((host, port), _Handler)
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
