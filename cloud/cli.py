"""The cloud side of the ``edgeml`` command: ``cloud serve`` and a console over the REST API.

    edgeml cloud serve --config cloud.yaml
    edgeml fleet list | fleet show DEVICE [--fleet F] | fleet register DEVICE [--tag k=v]
    edgeml fleet deploy DEVICE N@V [--shadow [N@V]] [--fleet F] | fleet desired DEVICE [--fleet F]
    edgeml models register FILE --name N --version V [--metrics JSON] [--parent N@V]
    edgeml models list | models show N@V | models alias N ALIAS VERSION
    edgeml models train --recipe FILE [--config cloud.yaml] | models runs | models compare RUN_A RUN_B
    edgeml models drift [--model N] [--fleet F] [--measure] [--config cloud.yaml]
    edgeml rollout start N@V --strategy S --target SELECTOR [--steps 5,25,100] [--policy FILE]
    edgeml rollout status ID | list | pause|resume|abort|promote|approve|rollback ID [--reason WHY]
    edgeml tokens create --name N --role viewer|operator|admin | tokens list | tokens revoke N

Every console command takes ``--json`` and reaches the coordinator at
``EDGEML_CLOUD_URL`` (default ``http://127.0.0.1:8480``), sending ``EDGEML_API_TOKEN``
when set. ``edgeml.cli`` calls
:func:`register_subcommands` when it builds its parser and :func:`dispatch` for these
commands. This module imports only the standard library and httpx at load time (the
console works on a device install); ``cloud serve`` imports the server lazily. Errors
become messages and exit codes here: 0 success, 1 failure (coordinator unreachable or
an error reply), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["COMMANDS", "dispatch", "register_subcommands"]

#: Top-level commands this module adds.
COMMANDS = ("cloud", "fleet", "models", "rollout", "ca", "devices", "tokens")


def register_subcommands(subparsers: Any) -> None:
    """Add ``cloud``, ``fleet`` and ``models`` to the ``edgeml`` parser's subcommands."""
    cloud = subparsers.add_parser("cloud", help="the cloud coordinator (needs the cloud extra)")
    cloud_sub = cloud.add_subparsers(dest="action", metavar="ACTION", required=True)
    serve = cloud_sub.add_parser("serve", help="run the coordinator: ingestion, registries, REST API")
    serve.add_argument("--config", "-c", metavar="FILE", help="YAML settings (the environment wins)")

    fleet = subparsers.add_parser("fleet", help="devices known to the coordinator")
    fleet_sub = fleet.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = fleet_sub.add_parser("list", help="list devices")
    p.add_argument("--fleet", help="only this fleet")
    _json_flag(p)
    p = fleet_sub.add_parser("show", help="a device, with its ingestion counters")
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("--fleet", default="default", help="fleet of the device (default: default)")
    _json_flag(p)
    p = fleet_sub.add_parser("register", help="pre-register a device (tags, hardware profile)")
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("--fleet", default="default", help="fleet of the device (default: default)")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="a tag (repeatable)")
    p.add_argument("--hardware-profile", metavar="NAME")
    _json_flag(p)
    p = fleet_sub.add_parser("deploy", help="set the model a device should run (its signed desired state)")
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("model", metavar="N@V", help="name@version or name@alias")
    p.add_argument("--shadow", metavar="N@V", nargs="?", const=True,
                   help="alone: run N@V as a shadow beside the model the device is assigned now; "
                        "with a value: assign N@V and run this one as its shadow")
    p.add_argument("--expires-in", type=int, metavar="SECONDS", help="the document expires after this long")
    p.add_argument("--fleet", default="default", help="fleet of the device (default: default)")
    _json_flag(p)
    p = fleet_sub.add_parser("desired", help="a device's current desired state")
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("--fleet", default="default", help="fleet of the device (default: default)")
    _json_flag(p)

    models = subparsers.add_parser("models", help="the model registry")
    models_sub = models.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = models_sub.add_parser("register", help="upload a .onnx or .tflite model")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--name", metavar="N", required=True)
    p.add_argument("--version", dest="model_version", metavar="V", required=True)  # not "version": edgeml --version
    p.add_argument("--metrics", metavar="JSON", help='e.g. \'{"accuracy": 0.93}\'')
    p.add_argument("--params", metavar="JSON", help="training parameters, a JSON object")
    p.add_argument("--parent", metavar="N@V", help="the model this one derives from")
    p.add_argument("--dataset-hash", metavar="HASH")
    _json_flag(p)
    p = models_sub.add_parser("list", help="registered model versions")
    p.add_argument("--name", help="only this model")
    _json_flag(p)
    p = models_sub.add_parser("show", help="one version: N@VERSION or N@ALIAS")
    p.add_argument("ref", metavar="N@V")
    _json_flag(p)
    p = models_sub.add_parser("alias", help="point an alias (champion, challenger…) at a version")
    p.add_argument("name", metavar="N")
    p.add_argument("alias", metavar="ALIAS")
    p.add_argument("alias_version", metavar="VERSION")
    _json_flag(p)
    _register_training(models_sub)  # TRAINING

    rollout = _register_rollout(subparsers)  # ROLLOUTS
    pki_parsers = _register_pki(subparsers)  # PKI

    tokens = _register_tokens(subparsers)  # TOKENS

    for parser in (cloud, fleet, models, rollout, *pki_parsers, tokens):
        parser.set_defaults(cloud_dispatch=True)


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def dispatch(args: argparse.Namespace) -> int:
    """Run a ``cloud``/``fleet``/``models`` command; return the exit code."""
    from ._exceptions import CloudError, ConfigError, InvalidInput
    from .client import CoordinatorError, CoordinatorUnavailable

    try:
        if args.command == "cloud":
            return _serve(args)
        handler = _HANDLERS[(args.command, args.action)]
        return handler(args)
    except (ConfigError, InvalidInput, _UsageError) as exc:
        return _fail(str(exc), 2)
    except CoordinatorUnavailable as exc:
        return _fail(str(exc), 1)
    except CoordinatorError as exc:
        return _fail(f"the coordinator refused: {exc}", 1)
    except CloudError as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return 130


class _UsageError(Exception):
    """A command-line value that cannot be used (bad JSON in --metrics, a tag without '=')."""


def _fail(message: str, code: int) -> int:
    print(f"edgeml: error: {message}", file=sys.stderr)
    return code


# --------------------------------------------------------------------------- serve


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    try:
        from ._config import load_cloud_config
        from .coordinator import Coordinator
    except ImportError as exc:
        return _fail(f"the cloud extra is needed: pip install 'edgeml[cloud]' ({exc})", 1)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        return _fail(f"the cloud extra is needed: pip install 'edgeml[cloud]' ({exc})", 1)

    config = load_cloud_config(args.config)
    _setup_logging(config.log_level)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with Coordinator(config) as coordinator:
        print(
            f"edgeml coordinator listening on {coordinator.url} (API, /openapi.json, /metrics); "
            f"broker {config.broker_url}, store {_redact(config.store_url)}, artifacts {config.artifact_dir}",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(1.0):
            pass
    return 0


def _redact(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


def _setup_logging(level: str) -> None:
    import logging

    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# --------------------------------------------------------------------------- console


def _client() -> Any:
    from .client import CloudClient

    return CloudClient()


def _emit(args: argparse.Namespace, doc: Any, text: Callable[[Any], str]) -> int:
    print(json.dumps(doc, indent=2, default=str) if args.json else text(doc))
    return 0


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Columns aligned on the widest cell; numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], int | float) and not isinstance(row[i], bool) for row in rows) and bool(rows)
               for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)).rstrip()

    return "\n".join([line(list(headers)), *(line(r) for r in cells)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "never"


def _json_arg(text: str | None, flag: str) -> str | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise _UsageError(f"{flag} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _UsageError(f"{flag} must be a JSON object, got {type(value).__name__}")
    return text


def _fleet_list(args: argparse.Namespace) -> int:
    with _client() as client:
        devices = client.list_devices(args.fleet)

    def text(devices: list[dict[str, Any]]) -> str:
        if not devices:
            return "no devices"
        rows = [
            (d["fleet"], d["device_id"], "online" if d["online"] else "offline", _when(d["last_seen"]),
             d["records"], d["gaps"], d["duplicates"], d.get("hardware_profile"),
             ",".join(f"{k}={v}" for k, v in sorted(d["tags"].items())) or None)
            for d in devices
        ]
        return table(rows, ["FLEET", "DEVICE", "STATE", "LAST SEEN", "RECORDS", "GAPS", "DUPS", "HARDWARE", "TAGS"])

    return _emit(args, devices, text)


def _device_text(d: dict[str, Any]) -> str:
    status = d.get("status") or {}
    lines = [
        f"device      {d['fleet']}/{d['device_id']} ({'online' if d['online'] else 'offline'})",
        f"registered  {_when(d['registered_at'])}{' (pre-registered)' if d['pre_registered'] else ''}",
        f"last seen   {_when(d['last_seen'])}",
        f"hardware    {d.get('hardware_profile') or '-'}",
        f"tags        {', '.join(f'{k}={v}' for k, v in sorted(d['tags'].items())) or '-'}",
        f"status      {status.get('state', '-')}{' (' + status['reason'] + ')' if status.get('reason') else ''}",
        f"telemetry   {d['records']} records, contiguous to {d['max_contiguous_seq']}, "
        f"{d['gaps']} gaps, {d['duplicates']} duplicates",
    ]
    streams = d.get("streams") or []
    if streams:
        rows = [(s["stream"], s["records"], s["max_seq"], s["max_contiguous_seq"], s["gaps"], s["duplicates"],
                 _when(s["last_seen"])) for s in streams]
        lines += ["", table(rows, ["STREAM", "RECORDS", "MAX SEQ", "CONTIGUOUS", "GAPS", "DUPS", "LAST SEEN"])]
    return "\n".join(lines)


def _fleet_show(args: argparse.Namespace) -> int:
    with _client() as client:
        return _emit(args, client.device(args.fleet, args.device), _device_text)


def _fleet_register(args: argparse.Namespace) -> int:
    tags: dict[str, str] = {}
    for tag in args.tag:
        key, sep, value = tag.partition("=")
        if not sep or not key:
            raise _UsageError(f"--tag must be KEY=VALUE, got {tag!r}")
        tags[key] = value
    with _client() as client:
        doc = client.preregister(args.fleet, args.device, tags=tags or None, hardware_profile=args.hardware_profile)
    return _emit(args, doc, _device_text)


def _ref_text(ref: dict[str, Any] | None) -> str:
    if not ref:
        return "-"
    sha = f", sha256 {ref['sha256'][:12]}" if ref.get("sha256") else ""
    size = f", {ref['size']} bytes" if ref.get("size") is not None else ""
    return f"{ref['name']}@{ref['version']}{sha}{size}"


def _desired_text(doc: dict[str, Any]) -> str:
    expires = _when(doc["expires_at"]) if doc.get("expires_at") else "never"
    model = doc.get("model") or {}
    return "\n".join([
        f"device      {doc['fleet']}/{doc['device']}",
        f"revision    {doc['revision']} (issued {_when(doc['issued_at'])}, expires {expires})",
        f"model       {_ref_text(doc.get('model'))}",
        f"shadow      {_ref_text(doc.get('shadow'))}",
        f"download    {model.get('url') or '-'}",
        f"signed by   {doc.get('key_id') or '-'}",
    ])


def _fleet_deploy(args: argparse.Namespace) -> int:
    if args.expires_in is not None and args.expires_in <= 0:
        raise _UsageError(f"--expires-in must be > 0 seconds, got {args.expires_in}")
    with _client() as client:
        model, shadow, revision = args.model, args.shadow, None
        if shadow is True:  # `--shadow` alone: N@V shadows what the device is assigned now, if still so
            (model, revision), shadow = _assigned_model(client, args.fleet, args.device), args.model
        doc = client.deploy(args.fleet, args.device, model, shadow=shadow, expires_in=args.expires_in,
                            if_revision=revision)

    def text(d: dict[str, Any]) -> str:
        shadow = f", shadow {_ref_text(d['shadow'])}" if d.get("shadow") else ""
        return f"{d['fleet']}/{d['device']} revision {d['revision']}: model {_ref_text(d.get('model'))}{shadow}"

    return _emit(args, doc, text)


def _assigned_model(client: Any, fleet: str, device: str) -> tuple[str, int]:
    """``name@version`` of the model the device's desired state assigns, and that document's
    revision (the deploy is made over it only), for ``--shadow``."""
    from .client import CoordinatorError

    try:
        doc = client.desired(fleet, device)
    except CoordinatorError as exc:
        if exc.status != 404:
            raise
        doc = {}
    current = doc.get("model")
    if not current:
        raise _UsageError(f"{fleet}/{device} has no model assigned to shadow: "
                          f"deploy one first (edgeml fleet deploy {device} NAME@VERSION)")
    return f"{current['name']}@{current['version']}", int(doc["revision"])


def _fleet_desired(args: argparse.Namespace) -> int:
    with _client() as client:
        return _emit(args, client.desired(args.fleet, args.device), _desired_text)


def _model_text(m: dict[str, Any]) -> str:
    def io(tensors: list[dict[str, Any]]) -> str:
        return ", ".join(
            f"{t['name']} {t['dtype']}[{','.join('?' if d is None else str(d) for d in t['shape'] or ())}]"
            for t in tensors
        )

    return "\n".join([
        f"model         {m['ref']}{'  (' + ', '.join(m['aliases']) + ')' if m['aliases'] else ''}",
        f"format        {m['format']} ({m['runtime']}), {m['quantization']}, {m['size']} bytes",
        f"sha256        {m['sha256']}",
        f"signed        {'yes, key ' + m['signature_key_id'] if m['signed'] else 'no'}",
        f"inputs        {io(m['inputs'])}",
        f"outputs       {io(m['outputs'])}",
        f"metrics       {json.dumps(m['metrics']) if m['metrics'] else '-'}",
        f"params        {json.dumps(m['params']) if m['params'] else '-'}",
        f"parent        {m['parent'] or '-'}",
        f"dataset hash  {m['dataset_hash'] or '-'}",
        f"registered    {_when(m['created_at'])}",
        f"download      {m['artifact_url']}",
    ])


def _models_register(args: argparse.Namespace) -> int:
    fields = {
        "metrics": _json_arg(args.metrics, "--metrics"), "params": _json_arg(args.params, "--params"),
        "parent": args.parent, "dataset_hash": args.dataset_hash,
    }
    with _client() as client:
        doc = client.register_model(args.file, name=args.name, version=args.model_version, **fields)
    return _emit(args, doc, lambda m: "registered\n" + _model_text(m))


def _models_list(args: argparse.Namespace) -> int:
    with _client() as client:
        models = client.list_models(args.name)

    def text(models: list[dict[str, Any]]) -> str:
        if not models:
            return "no models"
        rows = [(m["name"], m["version"], ",".join(m["aliases"]) or None, m["format"], m["quantization"], m["size"],
                 m["sha256"][:12], _when(m["created_at"])) for m in models]
        return table(rows, ["NAME", "VERSION", "ALIASES", "FORMAT", "QUANTIZATION", "SIZE", "SHA256", "REGISTERED"])

    return _emit(args, models, text)


def _models_show(args: argparse.Namespace) -> int:
    with _client() as client:
        return _emit(args, client.model(args.ref), _model_text)


def _models_alias(args: argparse.Namespace) -> int:
    with _client() as client:
        doc = client.set_alias(args.name, args.alias, args.alias_version)

    def text(d: dict[str, Any]) -> str:
        moved = f" (was {d['previous']})" if d["previous"] and d["previous"] != d["version"] else ""
        return f"{d['name']}@{d['alias']} -> {d['version']}{moved}"

    return _emit(args, doc, text)


# --------------------------------------------------------------------------- rollouts (ROLLOUTS)

ROLLOUT_ACTIONS = ("pause", "resume", "abort", "promote", "approve", "rollback")


def _register_rollout(subparsers: Any) -> Any:
    rollout = subparsers.add_parser("rollout", help="metric-gated rollouts: canary, phased, bluegreen, ab, shadow")
    sub = rollout.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("start", help="start a rollout of a model version")
    p.add_argument("model", metavar="N@V", help="name@version or name@alias")
    p.add_argument("--strategy", default="canary", choices=["canary", "phased", "bluegreen", "ab", "shadow"])
    p.add_argument("--target", default="all", metavar="SELECTOR", help="k=v,hw=PROFILE,devices=a;b or all")
    p.add_argument("--steps", metavar="5,25,100", help="percent of the targets per step")
    p.add_argument("--policy", metavar="FILE", help="a YAML policy (configs/rollouts/*.yaml)")
    p.add_argument("--fleet", default="default", help="fleet of the devices (default: default)")
    p.add_argument("--salt", help="fixes the cohorts, e.g. to repeat one (default: random per rollout)")
    _actor_flags(p)
    p = sub.add_parser("status", help="one rollout: cohorts, verdicts with evidence, audit log")
    p.add_argument("rollout_id", metavar="ID")
    _json_flag(p)
    p = sub.add_parser("list", help="every rollout")
    _json_flag(p)
    for action in ROLLOUT_ACTIONS:
        p = sub.add_parser(action, help=f"{action} a rollout")
        p.add_argument("rollout_id", metavar="ID")
        _actor_flags(p)
    return rollout


def _actor_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--actor", help="who does it (default: $USER)")
    p.add_argument("--reason", default="", help="why (kept in the audit log)")
    _json_flag(p)


def _actor(args: argparse.Namespace) -> str:
    import getpass
    import os

    actor = args.actor or os.environ.get("USER") or getpass.getuser()
    if not actor:
        raise _UsageError("no actor: pass --actor NAME or set $USER")
    return actor


def _rollout_text(r: dict[str, Any]) -> str:
    lines = [f"rollout {r['id']}: {r['strategy']} of {r['model']} (from {r['baseline'] or '-'}) to {r['selector']}",
             f"  state {r['state']}, step {r['step'] + 1}/{len(r['steps'])} "
             f"({', '.join(f'{s:g}' for s in r['steps'])} %), started by {r['created_by']}"]
    if r.get("reason"):
        lines.append(f"  {r['reason']}")
    for name, c in (r.get("cohorts") or {}).items():
        lines.append(f"  {name}: {c['devices']} device(s), {c['applied']} applied, {c['reverted']} reverted")
    for v in (r.get("verdicts") or [])[-10:]:
        ev = v["evidence"]
        detail = ", ".join(f"{k}={ev[k]:.4g}" for k in ("p_value", "psi", "p95_growth", "agreement", "difference")
                           if isinstance(ev.get(k), int | float))
        lines.append(f"  step {v['step'] + 1} {v['gate']}: {v['verdict']} {detail}")
    for a in (r.get("audit") or [])[-10:]:
        lines.append(f"  {_when(a['ts'])} {a['actor']} {a['action']}: {a['reason']}")
    return "\n".join(lines)


def _rollout_start(args: argparse.Namespace) -> int:
    steps = None
    if args.steps:
        try:
            steps = [float(s) for s in args.steps.split(",") if s.strip()]
        except ValueError:
            raise _UsageError(f"--steps must be comma-separated percentages, got {args.steps!r}") from None
    policy = None
    if args.policy:
        import yaml

        try:
            with open(args.policy, encoding="utf-8") as fh:
                policy = yaml.safe_load(fh) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise _UsageError(f"cannot read policy {args.policy}: {exc}") from None
    with _client() as client:
        doc = client.start_rollout(args.model, strategy=args.strategy, target=args.target, steps=steps,
                                   policy=policy, fleet=args.fleet, actor=_actor(args), reason=args.reason,
                                   salt=args.salt)
    return _emit(args, doc, _rollout_text)


def _rollout_status(args: argparse.Namespace) -> int:
    with _client() as client:
        return _emit(args, client.rollout(args.rollout_id), _rollout_text)


def _rollout_list(args: argparse.Namespace) -> int:
    with _client() as client:
        rollouts = client.rollouts()

    def text(rs: list[dict[str, Any]]) -> str:
        return table([(r["id"], r["strategy"], r["model"], r["selector"], r["state"], r["percent"], r["created_by"])
                      for r in rs], ["ID", "STRATEGY", "MODEL", "TARGET", "STATE", "PERCENT", "BY"])

    return _emit(args, rollouts, text)


def _rollout_action(args: argparse.Namespace) -> int:
    with _client() as client:
        doc = client.rollout_action(args.rollout_id, args.action, actor=_actor(args), reason=args.reason)
    return _emit(args, doc, _rollout_text)


_HANDLERS: dict[tuple[str, str], Callable[[argparse.Namespace], int]] = {
    ("fleet", "list"): _fleet_list,
    ("fleet", "show"): _fleet_show,
    ("fleet", "register"): _fleet_register,
    ("fleet", "deploy"): _fleet_deploy,
    ("fleet", "desired"): _fleet_desired,
    ("models", "register"): _models_register,
    ("models", "list"): _models_list,
    ("models", "show"): _models_show,
    ("models", "alias"): _models_alias,
    ("rollout", "start"): _rollout_start,
    ("rollout", "status"): _rollout_status,
    ("rollout", "list"): _rollout_list,
    **{("rollout", action): _rollout_action for action in ROLLOUT_ACTIONS},
}


# --- training ---------------------------------------------------------------------------
# `models train|runs|compare|drift` run in this process against the coordinator's own store,
# artifact directory and signing key (from --config / the EDGEML_* environment, as
# `cloud serve` reads them), not through the REST API: training needs torch (the train
# extra) where the command runs, and a run's epochs are printed as they finish.


def _register_training(models_sub: Any) -> None:
    p = models_sub.add_parser("train", help="train a recipe: ONNX float + gated int8, registered with lineage")
    p.add_argument("--recipe", "-r", metavar="FILE", required=True, help="a recipe (configs/recipes/*.yaml)")
    p.add_argument("--version", dest="train_version", metavar="V", help="registry version (default: next integer)")
    p.add_argument("--parent", metavar="N@V", help="the model this one derives from (overrides the recipe)")
    p.add_argument("--no-register", action="store_true", help="train and record the run, register nothing")
    _training_flags(p)
    p = models_sub.add_parser("runs", help="training runs: status, data, accuracy float/int8")
    p.add_argument("--name", help="only runs of this recipe name")
    _training_flags(p)
    p = models_sub.add_parser("compare", help="two training runs side by side: recipe differences, metric deltas")
    p.add_argument("run_a", metavar="RUN_A")
    p.add_argument("run_b", metavar="RUN_B")
    _training_flags(p)
    p = models_sub.add_parser("drift", help="drift per model/version/cohort: PSI of inputs and predictions")
    p.add_argument("--model", help="only this model")
    p.add_argument("--fleet", help="only this fleet")
    p.add_argument("--measure", action="store_true", help="measure now (training.* settings) before showing")
    _training_flags(p)


def _training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="the coordinator's YAML settings (the environment wins)")
    _json_flag(p)


class _TrainingContext:
    """The coordinator's store, registry and training directory, opened from its settings."""

    def __init__(self, config_path: str | None) -> None:
        from ._config import load_cloud_config
        from .artifacts import ArtifactStore
        from .registry.models import ModelRegistry
        from .store import open_store

        config = load_cloud_config(config_path)
        self.store = open_store(config.store_url)
        self.registry = ModelRegistry(self.store, ArtifactStore(config.artifact_dir), config.signing_key)
        self.workdir = config.artifact_dir / "training"

    def __enter__(self) -> _TrainingContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.store.close()


def _training_module() -> Any:
    try:
        import torch  # noqa: F401

        from . import training
    except ImportError as exc:
        raise _UsageError(f"training needs the train extra: pip install 'edgeml[train]' ({exc})") from exc
    return training


def _models_train(args: argparse.Namespace) -> int:
    training = _training_module()
    recipe = training.load_recipe(args.recipe)
    with _TrainingContext(args.config) as ctx:
        result = training.train(
            recipe, store=ctx.store, registry=None if args.no_register else ctx.registry, workdir=ctx.workdir,
            version=args.train_version, parent=args.parent, progress=lambda line: print(line, file=sys.stderr, flush=True),
        )

    def text(r: dict[str, Any]) -> str:
        int8 = r["int8"]
        lines = [
            f"run {r['run_id']}: {r['name']} trained in {r['training_seconds']:.1f} s on {r['dataset']['rows']} rows "
            f"({r['dataset']['hash']})",
            f"float  accuracy {r['float']['accuracy']:.4f}  {r['float']['latency_us_batch']:.0f} us/batch  "
            f"{r['float']['size_bytes']} bytes",
            (f"int8   accuracy {int8['accuracy']:.4f}  {int8['latency_us_batch']:.0f} us/batch  {int8['size_bytes']} bytes "
             f"({int8['method']}, x{int8['gate']['speedup']:.2f})") if int8 else
            "int8   refused: " + " | ".join(f"{c['method']}: {'; '.join(c['gate']['reasons'])}" for c in r["int8_candidates"]),
            f"tflite {r['tflite']['status']}: {r['tflite'].get('reason', '')}",
            "registered " + (", ".join(r["registered"]) or "nothing"),
        ]
        return "\n".join(lines)

    return _emit(args, result, text)


def _run_row(r: Any) -> tuple[Any, ...]:
    flt = (r.metrics.get("float") or {}).get("accuracy")
    int8 = (r.metrics.get("int8") or {}).get("accuracy")
    return (r.run_id, r.name, r.status, (r.dataset_hash or "")[7:19] or None, r.recipe["training"]["epochs"],
            None if flt is None else f"{flt:.4f}", "refused" if r.status == "succeeded" and int8 is None else
            (None if int8 is None else f"{int8:.4f}"), ", ".join((r.result or {}).get("registered", [])) or None,
            _when(r.started_at))


def _models_runs(args: argparse.Namespace) -> int:
    from .training import RunStore

    with _TrainingContext(args.config) as ctx:
        runs = RunStore(ctx.store).list(args.name)

    def text(rs: list[Any]) -> str:
        if not rs:
            return "no training runs"
        headers = ["RUN", "NAME", "STATUS", "DATASET", "EPOCHS", "FLOAT ACC", "INT8 ACC", "REGISTERED", "STARTED"]
        return table([_run_row(r) for r in rs], headers)

    if args.json:
        return _emit(args, [r.as_json() for r in runs], str)
    print(text(runs))
    return 0


def _models_compare(args: argparse.Namespace) -> int:
    from .training import RunStore, compare_runs

    with _TrainingContext(args.config) as ctx:
        runs = RunStore(ctx.store)
        doc = compare_runs(runs.get(args.run_a), runs.get(args.run_b))

    def text(d: dict[str, Any]) -> str:
        lines = [f"A {d['a']} ({d['status']['a']})  vs  B {d['b']} ({d['status']['b']})",
                 "same dataset" if d["same_dataset"] else f"datasets differ: {d['dataset_hash']['a']} vs {d['dataset_hash']['b']}"]
        params = [(k, _cell(v["a"]), _cell(v["b"])) for k, v in d["params"].items()]
        lines.append(table(params, ["RECIPE KEY", "A", "B"]) if params else "same recipe")
        metrics = [(k, _cell(v["a"]), _cell(v["b"]), _cell(v.get("delta"))) for k, v in d["metrics"].items()]
        lines.append(table(metrics, ["METRIC", "A", "B", "B - A"]))
        return "\n".join(lines)

    return _emit(args, doc, text)


def _models_drift(args: argparse.Namespace) -> int:
    from ._config import load_cloud_config
    from .drift import DriftMonitor

    tc = load_cloud_config(args.config).training
    with _TrainingContext(args.config) as ctx:
        monitor = DriftMonitor(ctx.store, ctx.registry, threshold=tc.drift_threshold, window_s=tc.window_s,
                               min_samples=tc.min_samples, min_predictions=tc.min_predictions, cohort_tag=tc.cohort_tag)
        if args.measure:
            monitor.measure(fleet=args.fleet, models=None if args.model is None else [args.model])
        found = monitor.latest(fleet=args.fleet, model=args.model)

    def text(ms: list[dict[str, Any]]) -> str:
        if not ms:
            return "no drift measurements (run with --measure, or enable training in the coordinator)"
        rows = [(m["fleet"], f"{m['model']}@{m['version']}", m["cohort"], m["status"], *(
            None if m[k] is None else f"{m[k]:.3f}" for k in ("psi", "input_psi", "prediction_psi")),
            m["samples"], m["predictions"], _when(m["ts"])) for m in ms]
        return table(rows, ["FLEET", "MODEL", "COHORT", "STATUS", "PSI", "INPUT PSI", "PRED PSI", "SAMPLES",
                            "PREDICTIONS", "MEASURED"])

    return _emit(args, found, text)


_HANDLERS.update({
    ("models", "drift"): _models_drift,
    ("models", "train"): _models_train,
    ("models", "runs"): _models_runs,
    ("models", "compare"): _models_compare,
})


# --------------------------------------------------------------------------- fleet CA (PKI)


def _register_pki(subparsers: Any) -> tuple[Any, Any]:
    ca = subparsers.add_parser("ca", help="the fleet CA: certificates for mutual TLS with the broker")
    sub = ca.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("init", help="create the CA: DIR/ca.key, ca.crt, crl.pem")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--force", action="store_true", help="replace an existing CA (every certificate becomes invalid)")
    p = sub.add_parser("broker", help="the broker's server certificate")
    p.add_argument("--ca", required=True, metavar="DIR")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--host", action="append", required=True, metavar="NAME|IP", help="a name devices use (repeatable)")
    p.add_argument("--force", action="store_true")
    p = sub.add_parser("coordinator", help="the coordinator's client certificate")
    p.add_argument("--ca", required=True, metavar="DIR")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--force", action="store_true")
    p = sub.add_parser("crl", help="write DIR/crl.pem again (before it expires)")
    p.add_argument("--ca", required=True, metavar="DIR")
    devices = subparsers.add_parser("devices", help="device identities (certificates) from the fleet CA")
    sub = devices.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("enroll", help="a key and certificate for DEVICE (its MQTT identity)")
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("--ca", required=True, metavar="DIR")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--force", action="store_true")
    p = sub.add_parser("revoke", help="revoke DEVICE's certificates and write the CRL")
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("--ca", required=True, metavar="DIR")
    return ca, devices


def _pki(args: argparse.Namespace) -> int:
    from . import pki

    try:
        if args.command == "ca" and args.action == "init":
            ca = pki.init_ca(args.out, force=args.force)
            print(f"CA written: {ca.cert_path} (key {ca.root / pki.CA_KEY}, keep it offline), CRL {ca.crl_path}")
            return 0
        if args.command == "ca" and args.action == "crl":
            print(f"CRL written: {pki.load_ca(args.ca).write_crl()}")
            return 0
        ca = pki.load_ca(args.ca)
        if args.command == "devices" and args.action == "revoke":
            serials = ca.revoke(args.device)
            print(f"revoked {len(serials)} certificate(s) of {args.device}; CRL written: {ca.crl_path} "
                  "(install it on the broker and send it SIGHUP)")
            return 0
        if args.action == "enroll":
            issued = ca.enroll_device(args.device, args.out, force=args.force)
        elif args.action == "broker":
            issued = ca.issue_broker(args.out, args.host, force=args.force)
        else:
            issued = ca.issue_coordinator(args.out, force=args.force)
    except pki.PkiError as exc:
        return _fail(str(exc), 2)
    print(f"{issued.common_name}: certificate {issued.cert}, key {issued.key}, CA {issued.ca_cert}")
    return 0


_HANDLERS.update({
    ("ca", "init"): _pki,
    ("ca", "broker"): _pki,
    ("ca", "coordinator"): _pki,
    ("ca", "crl"): _pki,
    ("devices", "enroll"): _pki,
    ("devices", "revoke"): _pki,
})


# --------------------------------------------------------------------------- API tokens
# `tokens create|list|revoke` work on the coordinator's store directly (from --config / the
# EDGEML_* environment, as `cloud serve` reads them): the first admin token is created
# before any token can call the API. Only the token's sha256 is stored.


def _register_tokens(subparsers: Any) -> Any:
    tokens = subparsers.add_parser("tokens", help="REST API tokens and their roles (viewer, operator, admin)")
    sub = tokens.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("create", help="a new token, printed once (the store keeps only its hash)")
    p.add_argument("--name", required=True, metavar="N")
    p.add_argument("--role", required=True, choices=["viewer", "operator", "admin"])
    _training_flags(p)
    p = sub.add_parser("list", help="every token: name, role, created, revoked")
    _training_flags(p)
    p = sub.add_parser("revoke", help="revoke a token at once")
    p.add_argument("name", metavar="N")
    _training_flags(p)
    return tokens


def _tokens(args: argparse.Namespace) -> int:
    import getpass
    import os

    from ._config import load_cloud_config
    from .store import open_store
    from .tokens import Identity, Role, Tokens

    config = load_cloud_config(args.config)
    store = open_store(config.store_url)
    actor = Identity(f"cli:{os.environ.get('USER') or getpass.getuser() or 'unknown'}", Role.ADMIN)
    try:
        tokens = Tokens(store)
        if args.action == "create":
            secret, record = tokens.create(args.name, args.role, actor=actor)
            if args.json:
                return _emit(args, {**record.as_json(), "token": secret}, str)
            print(secret)
            print(f"token {record.name!r} ({record.role}) created; it is shown only now. "
                  "Clients send it as Authorization: Bearer, the CLI reads EDGEML_API_TOKEN.", file=sys.stderr)
            return 0
        if args.action == "revoke":
            return _emit(args, tokens.revoke(args.name, actor=actor).as_json(),
                         lambda t: f"token {t['name']!r} revoked")
        rows = [t.as_json() for t in tokens.list()]
    finally:
        store.close()
    return _emit(args, rows, lambda ts: table(
        [(t["name"], t["role"], _when(t["created_at"]), t["created_by"], _when(t["revoked_at"]) if t["revoked_at"] else None)
         for t in ts], ["NAME", "ROLE", "CREATED", "BY", "REVOKED"]) if ts else "no tokens")


_HANDLERS.update({("tokens", action): _tokens for action in ("create", "list", "revoke")})
