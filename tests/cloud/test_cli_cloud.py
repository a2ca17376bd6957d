"""The console (`edgeml fleet …`, `edgeml models …`) against a real coordinator, on both backends."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cloud._config import CloudConfig
from cloud.coordinator import Coordinator
from cloud.keys import generate_keys
from edgeml.cli import main
from edgeml.protocol.signing import verify_digest

from ..conftest import free_port


@pytest.fixture
def coordinator(store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Coordinator]:
    key, _ = generate_keys(tmp_path / "keys")
    config = CloudConfig(
        db=store_url, http_addr="127.0.0.1:0", artifact_dir=tmp_path / "artifacts", signing_key=key,
        broker_url=f"mqtt://127.0.0.1:{free_port()}", broker_wait_s=0,  # no broker: the API serves anyway
    )
    with Coordinator(config) as c:
        monkeypatch.setenv("EDGEML_CLOUD_URL", c.url)
        yield c


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_register_list_show_alias_then_download_with_range(
    coordinator: Coordinator, models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "models", "register", str(models["onnx_float"]), "--name", "mlp", "--version", "1.0.0",
                         "--metrics", '{"accuracy": 0.93}', "--dataset-hash", "sha256:d1", "--json")
    assert code == 0, err
    first = json.loads(out)
    assert (first["ref"], first["metrics"], first["signed"]) == ("mlp@1.0.0", {"accuracy": 0.93}, True)
    code, out, _ = run(capsys, "models", "register", str(models["onnx_int8"]), "--name", "mlp", "--version",
                       "1.1.0-int8", "--parent", "mlp@1.0.0")
    assert code == 0 and "mlp@1.1.0-int8" in out and "parent        mlp@1.0.0" in out

    code, out, _ = run(capsys, "models", "alias", "mlp", "champion", "1.0.0")
    assert (code, out.strip()) == (0, "mlp@champion -> 1.0.0")
    code, out, _ = run(capsys, "models", "alias", "mlp", "champion", "1.1.0-int8")
    assert (code, out.strip()) == (0, "mlp@champion -> 1.1.0-int8 (was 1.0.0)")

    code, out, _ = run(capsys, "models", "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["NAME", "VERSION", "ALIASES"] and len(lines) == 3
    col = lines[0].index("ALIASES")
    assert lines[2][col:].startswith("champion") and lines[1][col:].startswith("-")  # aligned columns
    code, out, _ = run(capsys, "models", "list", "--json")
    assert [m["version"] for m in json.loads(out)] == ["1.0.0", "1.1.0-int8"]
    code, out, _ = run(capsys, "models", "show", "mlp@champion", "--json")
    shown = json.loads(out)
    assert (shown["version"], shown["quantization"], shown["parent"]) == ("1.1.0-int8", "int8-qdq", "mlp@1.0.0")

    data = models["onnx_float"].read_bytes()
    url = coordinator.url + first["artifact_url"]
    head = httpx.get(url, headers={"Range": "bytes=0-99"})
    rest = httpx.get(url, headers={"Range": "bytes=100-"})
    assert (head.status_code, rest.status_code) == (206, 206)
    assert rest.headers["content-range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
    body = head.content + rest.content
    assert body == data and hashlib.sha256(body).hexdigest() == first["sha256"]
    signature = httpx.get(coordinator.url + first["signature_url"]).content
    verify_digest(first["sha256"], signature, tmp_path / "keys" / "fleet.pub")


def test_fleet_register_list_show(coordinator: Coordinator, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "fleet", "register", "dev-9", "--fleet", "plant", "--tag", "site=lyon",
                         "--hardware-profile", "rpi4", "--json")
    assert code == 0, err
    assert json.loads(out)["tags"] == {"site": "lyon"}
    code, out, _ = run(capsys, "fleet", "list")
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:3] == ["FLEET", "DEVICE", "STATE"] and row.split()[:3] == ["plant", "dev-9", "offline"]
    assert row.index("rpi4") == header.index("HARDWARE") and "site=lyon" in row
    code, out, _ = run(capsys, "fleet", "show", "dev-9", "--fleet", "plant", "--json")
    doc = json.loads(out)
    assert (doc["records"], doc["gaps"], doc["duplicates"], doc["pre_registered"]) == (0, 0, 0, True)
    code, out, _ = run(capsys, "fleet", "show", "dev-9", "--fleet", "plant")
    assert "plant/dev-9 (offline)" in out and "0 records" in out
    code, _, err = run(capsys, "fleet", "show", "dev-9")  # fleet "default" by default
    assert code == 1 and "no device default/dev-9" in err and "404" in err


def test_console_errors(coordinator: Coordinator, models: dict[str, Path], tmp_path: Path,
                        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    model = str(models["onnx_float"])
    code, _, err = run(capsys, "models", "register", model, "--name", "m", "--version", "1", "--metrics", "{oops")
    assert code == 2 and "--metrics is not valid JSON" in err
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    code, _, err = run(capsys, "models", "register", str(junk), "--name", "m", "--version", "1")
    assert code == 1 and "HTTP 422" in err
    code, _, err = run(capsys, "models", "register", str(tmp_path / "missing.onnx"), "--name", "m", "--version", "1")
    assert code == 1 and "cannot read" in err
    code, _, err = run(capsys, "models", "show", "m@9")
    assert code == 1 and "HTTP 404" in err
    code, _, err = run(capsys, "fleet", "register", "d", "--tag", "novalue")
    assert code == 2 and "KEY=VALUE" in err
    monkeypatch.setenv("EDGEML_CLOUD_URL", f"http://127.0.0.1:{free_port()}")
    code, _, err = run(capsys, "fleet", "list")
    assert code == 1 and "cannot reach the coordinator" in err and "EDGEML_CLOUD_URL" in err


@pytest.mark.parametrize("url", ["http://[::1", "http://host\x01:8480", "127.0.0.1:8480"],
                         ids=["unclosed-bracket", "control-character", "no-scheme"])
def test_a_malformed_cloud_url_is_a_one_line_error_naming_the_variable(
    url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EDGEML_CLOUD_URL", url)
    code, out, err = run(capsys, "fleet", "list")
    assert code == 2 and out == ""
    assert err.startswith("edgeml: error: invalid coordinator URL") and "EDGEML_CLOUD_URL" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
