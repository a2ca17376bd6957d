"""A client for the agent's local HTTP API (for applications in another process)."""

from __future__ import annotations

from typing import Any

import httpx

from ._config import DEFAULT_API_ADDR
from ._exceptions import EdgemlError, InputError, ModelError, NoModelError


class AgentUnavailable(EdgemlError):
    """The agent's local API cannot be reached."""

    transient = True


class AgentClient:
    """``AgentClient("http://127.0.0.1:8470").predict({"input": [[...]]})``."""

    def __init__(self, base_url: str = f"http://{DEFAULT_API_ADDR}", timeout: float = 5.0) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout)

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise AgentUnavailable(f"cannot reach the agent at {self._http.base_url}: {exc}") from exc
        try:
            body = response.json()
        except ValueError:
            raise AgentUnavailable(f"{self._http.base_url} answered HTTP {response.status_code} without JSON: "
                                   "is the agent's api_addr right?") from None
        if response.status_code == 200:
            return body
        if path == "/v1/health":
            return body
        message = body.get("error", {}).get("message", response.text)
        if response.status_code == 503:
            raise NoModelError(message)
        if response.status_code == 400:
            raise InputError(message)
        raise ModelError(f"HTTP {response.status_code}: {message}")

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/v1/predict", json={"inputs": inputs})

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/v1/health")

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/v1/status")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
