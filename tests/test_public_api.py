import edgeml
import edgeml.protocol


def test_public_api_is_small_and_pinned() -> None:
    assert sorted(edgeml.__all__) == sorted([
        "Agent", "AgentClient", "AgentConfig", "AgentUnavailable", "BrokerNotFound", "ConfigError",
        "EdgemlError", "InputError", "ModelError", "ModelLoadError", "NoModelError", "Prediction",
        "StorageError", "SyncError", "__version__", "load_config",
    ])
    for name in edgeml.__all__:
        assert hasattr(edgeml, name)


def test_every_error_derives_from_the_root() -> None:
    for name in ["BrokerNotFound", "ConfigError", "InputError", "ModelError", "ModelLoadError",
                 "NoModelError", "StorageError", "SyncError", "AgentUnavailable"]:
        assert issubclass(getattr(edgeml, name), edgeml.EdgemlError)


def test_base_install_imports_no_torch_or_web_framework() -> None:
    import subprocess
    import sys

    code = (
        "import sys, edgeml, edgeml.cli, edgeml.sync, edgeml.api, edgeml.buffer;"
        "bad=[m for m in ('torch','fastapi','starlette','uvicorn','flask') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
