"""``edgeml`` command line: a thin layer over the same core the APIs use.

Domain errors become messages and exit codes here, in one place: 0 success,
1 runtime failure, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from typing import Any

from ._exceptions import ConfigError, EdgemlError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeml", description="edgeml: edge-ML fleet system")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    agent = sub.add_parser("agent", help="the device agent")
    agent_sub = agent.add_subparsers(dest="action", metavar="ACTION", required=True)
    run = agent_sub.add_parser("run", help="run the agent in the foreground")
    run.add_argument("--config", "-c", metavar="FILE", help="YAML settings (the environment wins)")
    status = agent_sub.add_parser("status", help="show an agent's status")
    status.add_argument("--config", "-c", metavar="FILE", help="the agent's YAML settings")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    downgrade = agent_sub.add_parser(
        "downgrade-buffer",
        help="with the agent stopped: rewrite its telemetry buffer for an older agent (packed records as JSON)")
    downgrade.add_argument("--config", "-c", metavar="FILE", help="the agent's YAML settings")

    keys = sub.add_parser("keys", help="fleet signing keys (needs the cloud extra)")
    keys_sub = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    gen = keys_sub.add_parser("generate", help="write an ed25519 key pair: DIR/fleet.key and DIR/fleet.pub")
    gen.add_argument("--out", required=True, metavar="DIR", help="directory for fleet.key and fleet.pub")
    gen.add_argument("--force", action="store_true", help="overwrite an existing pair")

    try:  # cloud, fleet, models: the coordinator and its console (cloud/cli.py)
        from cloud.cli import register_subcommands
    except ImportError as exc:
        for name in ("cloud", "fleet", "models"):
            missing = sub.add_parser(name, help="needs the cloud extra", add_help=False)
            missing.add_argument("rest", nargs=argparse.REMAINDER)
            missing.set_defaults(cloud_missing=str(exc))
    else:
        register_subcommands(sub)

    sim = sub.add_parser("sim", help="simulate a fleet: many lightweight agents in one process")
    sim.add_argument("--devices", type=int, default=100, help="simulated devices (default 100)")
    sim.add_argument("--broker", metavar="URL", help="broker to use (default: start Mosquitto on a free port)")
    sim.add_argument("--model", metavar="FILE", help="model every device starts with (default: a small MLP)")
    sim.add_argument("--rate", type=float, default=1.0, help="predictions per second per device (default 1)")
    sim.add_argument("--duration", type=float, default=60.0, help="seconds to run (default 60)")
    sim.add_argument("--fleet", default="sim", help="fleet id (default sim)")

    demo = sub.add_parser("demo", help="the whole loop on this machine: broker, coordinator, console, devices, "
                                       "training, a bad canary rolled back, drift, retraining, a canary promoted")
    demo.add_argument("--devices", type=int, default=20, help="device agents (default 20)")
    demo.add_argument("--duration", type=float, help="after the stages, keep the fleet and console up this "
                                                     "many seconds (default: until Ctrl-C)")
    demo.add_argument("--headless", action="store_true", help="plain output, exit after the stages: 0 only if "
                                                              "every stage happened (CI)")
    demo.add_argument("--port", type=int, default=8480, help="console/API port (default 8480; busy: a free one)")
    demo.add_argument("--rate", type=float, default=10.0, help="predictions per second per device (default 10)")
    demo.add_argument("--workdir", metavar="DIR", help="keep the demo's data here (default: a temporary dir)")
    demo.add_argument("--outage", action="store_true", help="the small demo instead: one agent, a broker outage, "
                                                            "every telemetry record checked at a subscriber")
    demo.add_argument("--predictions", type=int, default=2000, help="--outage: predictions to make (default 2000)")
    demo.add_argument("--broker", metavar="URL", help="--outage: use this broker instead of starting one")

    try:  # hil: hardware-in-the-loop scenarios (hil/cli.py; light until a scenario runs)
        from hil.cli import register as register_hil
    except ImportError:
        pass
    else:
        register_hil(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.version:
        from . import __version__

        print(f"edgeml {__version__}")
        return 0
    if args.command is None:
        _parser().print_help()
        return 2
    if getattr(args, "cloud_missing", None):
        print(f"edgeml: error: the cloud extra is needed: pip install 'edgeml[cloud]' ({args.cloud_missing})", file=sys.stderr)
        return 1
    if getattr(args, "cloud_dispatch", False):
        from cloud.cli import dispatch

        return dispatch(args)
    try:
        if args.command == "agent" and args.action == "run":
            return _agent_run(args)
        if args.command == "agent" and args.action == "status":
            return _agent_status(args)
        if args.command == "agent" and args.action == "downgrade-buffer":
            return _agent_downgrade_buffer(args)
        if args.command == "keys" and args.action == "generate":
            return _keys_generate(args)
        if args.command == "sim":
            from .sim import run_sim

            return run_sim(args.devices, args.broker, args.model, args.rate, args.duration, args.fleet)
        if args.command == "hil":
            from hil.cli import dispatch as hil_dispatch

            return hil_dispatch(args)
        if args.command == "demo":
            if args.outage:
                from ._demo import run_demo

                return run_demo(predictions=args.predictions, broker=args.broker, headless=args.headless)
            try:
                from cloud.demo import run_demo as run_fleet_demo
            except ImportError as exc:
                print(f"edgeml demo needs the cloud and train extras ({exc.name} is missing): "
                      "pip install 'edgeml[cloud,train]'", file=sys.stderr)
                return 2
            return run_fleet_demo(devices=args.devices, duration=args.duration, headless=args.headless,
                                  port=args.port, rate=args.rate, workdir=args.workdir)
    except ConfigError as exc:
        print(f"edgeml: error: {exc}", file=sys.stderr)
        return 2
    except EdgemlError as exc:
        print(f"edgeml: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


def _keys_generate(args: argparse.Namespace) -> int:
    try:
        from cloud import CloudError
        from cloud.keys import generate_keys
    except ImportError as exc:
        print(f"edgeml: error: the cloud extra is needed: pip install 'edgeml[cloud]' ({exc})", file=sys.stderr)
        return 1
    try:
        key, pub = generate_keys(args.out, force=args.force)
    except CloudError as exc:
        print(f"edgeml: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {key} (private, mode 0600) and {pub} (give this one to the devices)")
    return 0


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def _agent_run(args: argparse.Namespace) -> int:
    from ._config import load_config
    from .agent import Agent

    config = load_config(args.config)
    _setup_logging(config.log_level)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    agent = Agent(config)
    agent.start()
    status = agent.status()
    model = status["model"]
    print(
        f"edgeml agent {config.fleet}/{config.device_id} running: API {status['api'] or 'off'}, "
        f"broker {status['sync'].get('broker') or 'none (offline)'}, "
        f"model {model['name'] + ' ' + model['version'] if model else 'none'}, data {config.data_dir}",
        file=sys.stderr,
        flush=True,
    )
    try:
        while not stop.wait(1.0):
            pass
    finally:
        agent.stop()
    return 0


def _agent_downgrade_buffer(args: argparse.Namespace) -> int:
    """Before an older agent takes over the data dir (the self-upgrade's rollback)."""
    from ._config import load_config
    from .buffer import TelemetryBuffer

    config = load_config(args.config)
    path = config.data_dir / "telemetry.db"
    if not path.exists():
        print(f"no telemetry buffer at {path}: nothing to convert")
        return 0
    buf = TelemetryBuffer(path, max_bytes=config.telemetry.buffer_max_bytes)  # no flusher: nothing is appended
    try:
        converted = buf.downgrade()
    finally:
        buf.close()
    print(f"{path}: {converted} packed records rewritten as JSON; an older agent can read it")
    return 0


def _agent_status(args: argparse.Namespace) -> int:
    from ._config import load_config
    from .buffer import inspect
    from .client import AgentClient, AgentUnavailable

    config = load_config(args.config)
    doc: dict[str, Any]
    try:
        if not config.api_addr:
            raise AgentUnavailable("local API is off")
        with AgentClient(f"http://{config.api_addr}", timeout=2.0) as client:
            doc = client.status()
    except AgentUnavailable:
        stats = inspect(config.data_dir / "telemetry.db")
        if stats is None:  # never ran here (or another data_dir): do not show an empty agent
            print(f"edgeml: error: no agent is answering on {config.api_addr or 'the local API (off)'} and there is "
                  f"no agent data at {config.data_dir} (data_dir); is this the agent's config?", file=sys.stderr)
            return 1
        from ._models import ModelStore

        info = ModelStore(config.data_dir / "models").active_info() if config.data_dir.exists() else None
        doc = {
            "running": False,
            "device_id": config.device_id,
            "fleet": config.fleet,
            "model": info.to_json() if info else None,
            "buffer": stats.to_json() if stats else None,
            "sync": {"connected": False, "broker": str(config.broker_url) if config.broker_url else None},
        }
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        print(_status_text(doc))
    return 0


def _status_text(doc: dict[str, Any]) -> str:
    model = doc.get("model")
    buf = doc.get("buffer") or {}
    sync = doc.get("sync") or {}
    last = buf.get("last_ack_ts")
    lines = [
        f"device      {doc.get('fleet')}/{doc.get('device_id')} ({'running' if doc.get('running') else 'not running'})",
        f"model       {model['name'] + ' ' + model['version'] + ' (' + model['engine'] + ')' if model else 'none'}",
        f"buffer      {buf.get('records', 0)} records, {buf.get('bytes', 0)} bytes",
        f"dropped     {buf.get('dropped_total', 0)} {buf.get('dropped') or ''}".rstrip(),
        f"broker      {sync.get('broker') or 'none'} ({'connected' if sync.get('connected') else 'not connected'})",
        f"last sync   {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last)) if last else 'never'}",
    ]
    update = doc.get("update")
    if update:
        result = update.get("result") or "in progress"
        reason = f" ({update['reason']})" if update.get("reason") else ""
        lines.append(f"update      revision {update.get('revision')}: {update.get('state')}, {result}{reason}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
