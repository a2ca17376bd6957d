"""A small HTTP client of the coordinator's REST API (httpx), used by the console.

Only httpx and the standard library: it works on a device install too.

    with CloudClient("http://127.0.0.1:8480") as client:
        client.list_devices()

httpx errors are translated here: :class:`CoordinatorUnavailable` when nothing answers,
:class:`CoordinatorError` (with ``status`` and the server's ``detail``) for an error reply,
:class:`~cloud._exceptions.ConfigError` for a URL httpx cannot parse (``EDGEML_CLOUD_URL``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from ._exceptions import CloudError, ConfigError

__all__ = ["CloudClient", "CoordinatorError", "CoordinatorUnavailable", "cloud_url"]

DEFAULT_CLOUD_URL = "http://127.0.0.1:8480"


def cloud_url(env: dict[str, str] | None = None) -> str:
    """``EDGEML_CLOUD_URL``, else the coordinator's default address."""
    env = dict(os.environ) if env is None else env
    return (env.get("EDGEML_CLOUD_URL") or DEFAULT_CLOUD_URL).rstrip("/")


class CoordinatorUnavailable(CloudError):
    """Nothing answers at the coordinator's URL (not running, wrong address, timeout)."""

    transient = True


class CoordinatorError(CloudError):
    """The coordinator answered with an error status."""

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"{detail} (HTTP {status})")


def _q(segment: str) -> str:
    return quote(segment, safe="@")


class CloudClient:
    """``token``: an API token sent as ``Authorization: Bearer`` (default ``EDGEML_API_TOKEN``)."""

    def __init__(self, base_url: str | None = None, *, timeout: float = 30.0, token: str | None = None) -> None:
        self.base_url = (base_url or cloud_url()).rstrip("/")
        token = token or os.environ.get("EDGEML_API_TOKEN") or None
        headers = {"Authorization": f"Bearer {token.strip()}"} if token else None
        try:
            self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)
        except httpx.InvalidURL as exc:
            raise self._invalid_url(exc) from exc

    def _invalid_url(self, exc: Exception) -> ConfigError:
        return ConfigError(f"invalid coordinator URL {self.base_url!r} (EDGEML_CLOUD_URL): {exc}")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:  # not http(s)://: no use retrying
            raise self._invalid_url(exc) from exc
        except httpx.TransportError as exc:
            raise CoordinatorUnavailable(
                f"cannot reach the coordinator at {self.base_url}: {exc or type(exc).__name__} "
                "(is `edgeml cloud serve` running? set EDGEML_CLOUD_URL)"
            ) from exc
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text or response.reason_phrase
            raise CoordinatorError(response.status_code, str(detail))
        return response.json()

    # ------------------------------------------------------------------ devices
    def list_devices(self, fleet: str | None = None) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/devices", params={"fleet": fleet} if fleet else None)

    def device(self, fleet: str, device: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/devices/{_q(fleet)}/{_q(device)}")

    def preregister(self, fleet: str, device: str, *, tags: dict[str, Any] | None = None,
                    hardware_profile: str | None = None) -> dict[str, Any]:
        body = {"tags": tags, "hardware_profile": hardware_profile}
        return self.request("PUT", f"/v1/devices/{_q(fleet)}/{_q(device)}", json=body)

    # ------------------------------------------------------------------ models
    def register_model(self, path: str | os.PathLike[str], *, name: str, version: str, **fields: str | None) -> dict[str, Any]:
        """Upload a model; ``fields``: metrics, params (JSON text), parent, dataset_hash."""
        data = {"name": name, "version": version, **{k: v for k, v in fields.items() if v is not None}}
        path = Path(path)
        try:
            fh = path.open("rb")
        except OSError as exc:
            raise CloudError(f"cannot read {path}: {exc.strerror}") from exc
        with fh:
            return self.request("POST", "/v1/models", data=data, files={"file": (path.name, fh)})

    def list_models(self, name: str | None = None) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/models", params={"name": name} if name else None)

    def model(self, ref: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/models/{_q(ref)}")

    def set_alias(self, name: str, alias: str, version: str) -> dict[str, Any]:
        return self.request("PUT", f"/v1/models/{_q(name)}/aliases/{_q(alias)}", json={"version": version})

    # ------------------------------------------------------------------ desired states
    def desired(self, fleet: str, device: str) -> dict[str, Any]:
        """The device's current signed desired-state document."""
        return self.request("GET", f"/v1/devices/{_q(fleet)}/{_q(device)}/desired")

    def deploy(self, fleet: str, device: str, model: str | None, *, shadow: str | None = None,
               expires_in: int | None = None, if_revision: int | None = None) -> dict[str, Any]:
        """Set the device's desired state (``name@version`` or ``name@alias``); the signed document.
        ``if_revision``: only over that revision, else CoordinatorError 409."""
        body = {"model": model, "shadow": shadow, "expires_in": expires_in, "if_revision": if_revision}
        return self.request("PUT", f"/v1/devices/{_q(fleet)}/{_q(device)}/desired", json=body)

    # ------------------------------------------------------------------ rollouts
    def start_rollout(self, model: str, *, strategy: str, target: str, actor: str, steps: list[float] | None = None,
                      policy: dict[str, Any] | None = None, fleet: str = "default", reason: str = "",
                      salt: str | None = None) -> dict[str, Any]:
        body = {"model": model, "strategy": strategy, "target": target, "steps": steps, "policy": policy,
                "fleet": fleet, "actor": actor, "reason": reason, "salt": salt}
        return self.request("POST", "/v1/rollouts", json=body)

    def rollouts(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/rollouts")

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/rollouts/{_q(rollout_id)}")

    def rollout_action(self, rollout_id: str, action: str, *, actor: str, reason: str = "") -> dict[str, Any]:
        """pause, resume, abort, promote, approve or rollback."""
        return self.request("POST", f"/v1/rollouts/{_q(rollout_id)}/{action}", json={"actor": actor, "reason": reason})
