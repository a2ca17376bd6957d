"""``edgeml demo``: the whole loop on one machine, with nothing to install but edgeml.

    edgeml demo [--devices 20] [--duration S] [--headless] [--port 8480]

What runs, all real: a private Mosquitto on a free port (or, without Mosquitto on the
PATH, an in-process amqtt broker), the coordinator on SQLite
(signed desired states, ingestion, rollout engine, continuous training, the web
console), and ``--devices`` device agents (:class:`edgeml.Agent`, each with its own
SQLite buffer, MQTT session and update state machine) fed by an application thread:
readings of the synthetic sensor stream (:mod:`edgeml._testing.sensor`) through
``predict`` and their true labels through ``feedback``. The stages:

1. **train** the first model (``configs/recipes/sensor-mlp.yaml``: PyTorch, ONNX float
   and int8 with the accuracy gate, registered with lineage and a drift reference);
2. **deploy** it to every device (signed desired states; each agent verifies,
   health-checks and swaps);
3. **bad canary**: a deliberately broken release (the same network with its classes
   shuffled) in a canary rollout: the accuracy gate fails on the labels the application
   fed back and the engine rolls the cohort back by itself;
4. **drift**: the sensors drift; the drift job (every 2 s) measures PSI against the
   reference kept with the model and starts a retraining on the fleet's labeled samples;
5. **retrained canary**: the new version (lineage back to the drifted data) goes out as
   a canary and is promoted step by step to 100 %.

``--headless`` (CI) prints plain lines and exits 0 only if every stage happened;
otherwise the console stays up (``--duration`` seconds, or until Ctrl-C) after the
stages, at the URL printed at the start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FLEET = "demo"
MODEL = "sensor-mlp"
ROOT = Path(__file__).resolve().parents[1]
#: The canaries' policy: small steps, short dwell, gates on the labels the application sends back.
POLICY: dict[str, Any] = {
    "steps": [20, 50, 100], "min_dwell_s": 3, "min_samples": 120, "confidence": 0.95,
    "gates": [{"metric": "accuracy", "threshold": 0.02}, {"metric": "error_rate", "threshold": 0.02},
              {"metric": "latency_p95", "threshold": 1.0}, {"metric": "health", "threshold": 0}],
    "on_fail": "rollback", "on_inconclusive": "wait", "inconclusive_timeout_s": None,
}
DRIFT = 1.0


class StageFailed(Exception):
    pass


class _UI:
    """rich progress and tables on a terminal; plain lines when headless."""

    def __init__(self, headless: bool) -> None:
        self.console: Any = None
        self.rows: list[tuple[str, str, str, str]] = []
        if not headless:
            try:
                from rich.console import Console

                self.console = Console()
            except ImportError:
                pass

    def say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False)
        else:
            print(text, flush=True)

    def stage(self, name: str, work: Callable[[Callable[[str], None]], str]) -> str:
        """Run one stage with a live status line; record its outcome for the final table."""
        t0 = time.monotonic()
        try:
            if self.console is not None:
                with self.console.status(f"[bold]{name}[/bold] ...") as status:
                    result = work(lambda msg: status.update(f"[bold]{name}[/bold]: {msg}"))
            else:
                print(f"--- {name}", flush=True)
                result = work(lambda msg: print(f"    {msg}", flush=True))
        except Exception as exc:
            self.rows.append((name, "FAILED", f"{time.monotonic() - t0:.1f}", str(exc)))
            self.say(f"[red]✗ {name}: {exc}[/red]" if self.console else f"FAILED {name}: {exc}")
            raise
        self.rows.append((name, "ok", f"{time.monotonic() - t0:.1f}", result))
        self.say(f"[green]✓[/green] {name}: {result}" if self.console else f"ok  {name}: {result}")
        return result

    def table(self) -> None:
        if self.console is not None:
            from rich.table import Table

            table = Table(title="edgeml demo")
            for col in ("stage", "result", "seconds", "evidence"):
                table.add_column(col)
            for row in self.rows:
                table.add_row(*row)
            self.console.print(table)
        else:
            for name, result, secs, evidence in self.rows:
                print(f"{result:6} {secs:>6}s  {name}: {evidence}", flush=True)


def _wait(check: Callable[[], Any], timeout: float, what: str, tick: Callable[[str], None] | None = None,
          describe: Callable[[], str] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    last = 0.0
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if tick is not None and describe is not None and time.monotonic() - last > 1.0:
            tick(describe())
            last = time.monotonic()
        time.sleep(0.2)
    raise StageFailed(f"timed out after {timeout:.0f} s waiting for {what}")


class _Application:
    """The devices' application: sensor readings in, predictions out, true labels fed back."""

    def __init__(self, agents: list[Any], rate: float, seed: int = 0) -> None:
        from edgeml._testing.sensor import SensorStream

        self.agents = agents
        self.rate = rate  # predictions per second per device
        self.stream = SensorStream(seed=0)
        self.drift = 0.0
        self.rng = np.random.default_rng(seed)
        self.predictions = 0
        self.correct: dict[str, list[int]] = {}  # version -> [correct, total]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgeml-demo-app", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        from edgeml import NoModelError

        period = 1.0 / self.rate
        next_at = time.monotonic()
        while not self._stop.is_set():
            x, y = self.stream.sample(len(self.agents), drift=self.drift, rng=self.rng)
            for agent, row, label in zip(self.agents, x, y, strict=True):
                try:
                    out = agent.predict({"input": row[None, :]})
                except NoModelError:
                    continue
                except Exception as exc:  # a device's failure is its telemetry's business
                    log.debug("predict failed: %s", exc)
                    continue
                predicted = int(np.asarray(out.outputs["probs"]).argmax())
                agent.feedback(int(label), predicted=predicted, prediction_id=out.id)
                self.predictions += 1
                tally = self.correct.setdefault(out.version, [0, 0])
                tally[0] += predicted == int(label)
                tally[1] += 1
            next_at += period
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def accuracy(self, version: str) -> float | None:
        ok, total = self.correct.get(version, (0, 0))
        return ok / total if total else None


def _broken_copy(src: Path, dst: Path) -> Path:
    """The same network with its output classes rotated: it loads, passes the device's
    health check (shapes, finite values, its own shipped samples, as any exporter's file
    would) and answers wrongly."""
    import onnx
    from onnx import helper, numpy_helper

    from .training._pipeline import embed_samples

    model = onnx.load(str(src))
    graph = model.graph
    out = graph.output[0]
    classes = out.type.tensor_type.shape.dim[-1].dim_value or 3
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == out.name:
                node.output[i] = f"{out.name}_unshuffled"
    perm = np.roll(np.arange(classes), 1).astype(np.int64)
    graph.initializer.append(numpy_helper.from_array(perm, "edgeml_demo_perm"))
    graph.node.append(helper.make_node("Gather", [f"{out.name}_unshuffled", "edgeml_demo_perm"], [out.name], axis=1))
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    # the samples it inherited expect the right classes: ship its own answers for the same rows
    from edgeml.updates import SAMPLES_KEY

    shipped = {prop.key: prop.value for prop in model.metadata_props}.get(SAMPLES_KEY)
    if shipped is not None:  # (the pipeline's exports always carry them)
        rows = np.array([np.asarray(x[graph.input[0].name])[0] for x in json.loads(shipped)["inputs"]], np.float32)
        embed_samples(dst, rows)
    return dst


def run_demo(devices: int = 20, duration: float | None = None, headless: bool = False, port: int = 8480,
             rate: float = 10.0, workdir: str | None = None) -> int:
    """The ``edgeml demo`` command; 0 when every stage happened."""
    try:
        import fastapi  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        print(f"edgeml demo needs the cloud and train extras ({exc.name} is missing): "
              "pip install 'edgeml[cloud,train]'")
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # the agents start without a model on purpose (the coordinator deploys it): the stages say
    # what happens; the agents' and the coordinator's own warnings would only repeat it twenty-fold
    for name in ("edgeml", "cloud", "apscheduler"):
        logging.getLogger(name).setLevel(logging.ERROR)
    ui = _UI(headless)
    own_dir = workdir is None
    root = Path(workdir or tempfile.mkdtemp(prefix="edgeml-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    stack: list[Callable[[], None]] = []
    ok = False
    try:
        ok = _run(ui, root, stack, devices, duration, headless, port, rate)
    except StageFailed:
        ok = False
    except KeyboardInterrupt:
        ui.say("interrupted: stopping")
    finally:
        for undo in reversed(stack):
            try:
                undo()
            except Exception as exc:  # keep stopping the rest
                log.warning("while stopping: %s", exc)
        ui.table()
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
    ui.say("demo passed: every stage happened" if ok else "demo FAILED")
    return 0 if ok else 1


def _run(ui: _UI, root: Path, stack: list[Callable[[], None]], n_devices: int, duration: float | None,
         headless: bool, port: int, rate: float) -> bool:
    from cloud._config import CloudConfig, TrainingSettings
    from cloud.coordinator import Coordinator
    from cloud.keys import generate_keys
    from edgeml import Agent, AgentConfig
    from edgeml._testing.broker import MosquittoBroker, free_port, start_broker

    broker = start_broker(root / "broker")  # Mosquitto when it is on the PATH, else in-process (amqtt)
    stack.append(broker.stop)
    kind = "Mosquitto" if isinstance(broker, MosquittoBroker) else "embedded broker (amqtt; Mosquitto is not on the PATH)"
    ui.say(f"broker       {kind} on {broker.url}")
    keys = root / "keys"
    generate_keys(keys)
    os.environ.setdefault("EDGEML_ROLLOUTS_TICK_S", "0.5")
    training = TrainingSettings(
        enabled=True, check_interval_s=2.0, drift_threshold=0.2, window_s=10.0, min_samples=150,
        min_predictions=300, recipes_dir=ROOT / "configs" / "recipes",
        models={MODEL: {"recipe": "sensor-mlp.yaml", "fleet": FLEET, "include_recipe_data": False}},
        auto_canary={"enabled": True, "policy": POLICY, "target": "all", "artifact": "float", "min_accuracy": 0.5},
    )
    http_port = port if port and _free(port) else free_port()
    config = CloudConfig(broker_url=broker.url, db=f"sqlite://{root}/cloud.db", http_addr=f"127.0.0.1:{http_port}",
                         artifact_dir=root / "artifacts", signing_key=keys / "fleet.key", log_level="warning",
                         training=training)
    coordinator = Coordinator(config).start()
    stack.append(coordinator.stop)
    ui.say(f"coordinator  {coordinator.url} (SQLite in {root})")
    ui.say(f"console      {coordinator.url}/console/")
    store, rollouts, ct = coordinator.store, coordinator.rollouts, coordinator.training

    # 1. the first model
    def train_first(tick: Callable[[str], None]) -> str:
        svc = ct.service
        run_id = svc.submit(svc.load("sensor-mlp.yaml"))
        _wait(lambda: svc.wait(0.5), 600, "the first training run", tick, lambda: f"training run {run_id}")
        run = svc.get(run_id)
        if run.status != "succeeded" or not run.result.get("registered"):
            raise StageFailed(f"run {run_id} {run.status}: {run.error}")
        flt = run.result["float"]
        int8 = run.result.get("int8")
        q = (f"int8 {int8['accuracy']:.3f} accepted" if int8 else "int8 refused by the gate "
             f"({'; '.join(c['gate']['reasons'][0] for c in run.result['int8_candidates'] if c['gate']['reasons'])})")
        return (f"{run.result['registered'][0]}: held-out accuracy {flt['accuracy']:.3f}, {q}; "
                f"{run.result['training_seconds']:.1f} s")

    ui.stage("train the first model", train_first)
    first = f"{MODEL}@1"

    # the fleet: real agents, no model yet
    agents: list[Any] = []
    api_port = free_port()
    for i in range(n_devices):
        cfg = AgentConfig(
            device_id=f"dev-{i:02d}", fleet=FLEET, data_dir=root / "devices" / f"dev-{i:02d}", broker_url=broker.url,
            api_addr=f"127.0.0.1:{api_port}" if i == 0 else "off", fleet_pubkey=keys / "fleet.pub",
            discovery={"browse": False, "announce": False}, hardware_profile="x86-gateway",
            telemetry={"metrics_interval_s": 2.0, "sample_rate": 0.3},
            # twenty agents share this machine's cores with the coordinator and the training:
            # budgets for a busy laptop, not the profile's (a slow health check rejects the update)
            updates={"probation_s": 2.0, "probation_min_predictions": 5, "health_latency_budget_ms": 2000.0,
                     "probation_latency_budget_ms": 2000.0},
            mqtt={"reconnect_max_s": 2.0},
        )
        agents.append(Agent(cfg).start())
    for agent in agents:
        stack.append(agent.stop)
    app = _Application(agents, rate)
    app.start()
    stack.append(app.stop)
    ui.say(f"devices      {n_devices} agents in fleet '{FLEET}'; dev-00's local API: http://127.0.0.1:{api_port}/v1/predict")

    def versions() -> dict[str, int]:
        out: dict[str, int] = {}
        for a in agents:
            v = a.model.version if a.model is not None else "none"
            out[v] = out.get(v, 0) + 1
        return out

    # 2. deploy
    def deploy(tick: Callable[[str], None]) -> str:
        _wait(lambda: len([d for d in store.list_devices(FLEET) if d.online]) == n_devices, 30,
              "every device registered", tick, lambda: f"{len(store.list_devices(FLEET))} devices registered")
        issued = coordinator.desired.deploy_many(FLEET, [(a.config.device_id, first, None) for a in agents])
        refused = {device: str(out) for device, out in issued.items() if isinstance(out, Exception)}
        if refused:
            raise RuntimeError(f"desired states not issued: {refused}")
        _wait(lambda: versions() == {"1": n_devices}, 60, f"every device on {first}", tick,
              lambda: f"versions {versions()}")
        return f"{n_devices} devices verified, health-checked and serve {first}"

    ui.stage("deploy it to the fleet", deploy)

    def wait_rollout(rid: str, states: tuple[str, ...], tick: Callable[[str], None], timeout: float = 180) -> dict[str, Any]:
        def describe() -> str:
            s = rollouts.status(rid)
            ev = (s.get("result") or {}).get("last_evaluation") or {}
            return f"rollout {rid[:8]} {s['state']} step {s['step'] + 1}/{len(s['steps'])} gates {ev.get('gates', {})}"
        return _wait(lambda: (s := rollouts.status(rid))["state"] in states and s, timeout,
                     f"rollout {rid} to reach {states}", tick, describe)

    # 3. a bad release, rolled back by the engine
    def bad_canary(tick: Callable[[str], None]) -> str:
        time.sleep(3)  # some labeled traffic on the first model
        model = coordinator.registry.resolve(first)
        bad = _broken_copy(coordinator.artifacts.path(model.sha256), root / "sensor-mlp-broken.onnx")
        coordinator.registry.register(bad, name=MODEL, version="1.1-broken", parent=first,
                                      params={"note": "deliberately broken by the demo: classes rotated"})
        rid = rollouts.start(f"{MODEL}@1.1-broken", "canary", "all", policy=POLICY, actor="demo", fleet=FLEET,
                             reason="the demo's deliberately bad release")["id"]
        done = wait_rollout(rid, ("rolled_back", "completed", "paused", "aborted"), tick)
        if done["state"] != "rolled_back":
            raise StageFailed(f"the broken release ended {done['state']}: {done.get('reason')}")
        _wait(lambda: versions() == {"1": n_devices}, 60, "the canary back on the first model", tick,
              lambda: f"versions {versions()}")
        failed = [v for v in done["verdicts"] if v["verdict"] == "fail"]
        ev = failed[0]["evidence"] if failed else {}
        acc = ev.get("accuracy") or {}
        detail = (f"accuracy canary {acc.get('canary', 0):.2f} vs baseline {acc.get('baseline', 0):.2f}, "
                  f"p={ev.get('p_value', 1):.1e}" if acc else "")
        return (f"rolled back at step {done['step'] + 1} ({done['steps'][done['step']]:g} %) by gate "
                f"{', '.join(v['gate'] for v in failed)} {detail}; every device back on {first}")

    ui.stage("canary a broken release", bad_canary)

    # 4. drift, detected by the drift job, retrained
    def drift(tick: Callable[[str], None]) -> str:
        before = app.accuracy("1")
        app.drift = DRIFT
        app.correct.clear()

        def triggered() -> dict[str, Any] | None:
            return next((t for t in ct.triggers(MODEL) if t["kind"] == "drift"), None)

        trig = _wait(triggered, 120, "a drift trigger", tick, lambda: f"sensors drifted ({DRIFT:g}); "
                     f"accuracy of {first} now {app.accuracy('1') or 0:.2f}")
        ev = trig["evidence"]
        return (f"the drift job: {trig['reason']}, over {ev['samples']} samples and {ev['predictions']} predictions; "
                f"live accuracy of {first} {before or 0:.2f} -> {app.accuracy('1') or 0:.2f}")

    ui.stage("drift the sensors", drift)

    def retrain(tick: Callable[[str], None]) -> str:
        def finished() -> dict[str, Any] | None:
            t = next((t for t in ct.triggers(MODEL) if t["kind"] == "drift" and t["parent"] == first), None)
            return t if t and t["status"] not in ("training",) else None

        trig = _wait(finished, 600, "the retraining run", tick, lambda: f"training on the fleet's labeled samples "
                     f"({ct.service.current or 'starting'})")
        outcome = trig.get("outcome") or {}
        if not outcome.get("registered"):
            raise StageFailed(f"retraining {trig['status']}: {outcome}")
        ref = outcome["registered"][0]
        lineage = coordinator.registry.resolve(ref).params
        ds = lineage.get("dataset", {})
        return (f"{ref} registered, parent {coordinator.registry.resolve(ref).parent}, trained on dataset "
                f"{str(ds.get('hash', ''))[:19]}… ({ds.get('rows')} labeled rows from {len(ds.get('devices') or [])} "
                f"devices); trigger {lineage.get('trigger', {}).get('kind')}")

    ui.stage("retrain on the drifted data", retrain)

    def canary(tick: Callable[[str], None]) -> str:
        trig = next(t for t in ct.triggers(MODEL) if t["kind"] == "drift" and t["parent"] == first)
        rollout = (trig.get("outcome") or {}).get("canary") or {}
        if not rollout.get("started"):
            raise StageFailed(f"no canary started: {rollout.get('reason')}")
        rid, ref = rollout["rollout"], rollout["model"]
        version = ref.partition("@")[2]
        done = wait_rollout(rid, ("completed", "rolled_back", "paused", "aborted"), tick, timeout=300)
        if done["state"] != "completed":
            raise StageFailed(f"the retrained release ended {done['state']}: {done.get('reason')}")
        # the loop keeps running: if the drift job finds the live readings drifted from the new
        # version's own reference too (it learned from a window that began before the drift),
        # it retrains again and canaries the next version; the fleet ends on one of them
        def settled() -> str | None:
            v = versions()
            only = next(iter(v)) if len(v) == 1 else None
            return only if only is not None and only.isdigit() and int(only) >= int(version) else None

        final = _wait(settled, 240, f"every device on {ref} or a newer retrained version", tick,
                      lambda: f"versions {versions()}")
        promotions = sum(a["action"] == "promote" for a in done["audit"])
        time.sleep(2)
        later = "" if final == version else f"; the drift job retrained again and the fleet moved on to {MODEL}@{final}"
        return (f"{ref} promoted {promotions} times to 100 % ({n_devices} devices){later}; live accuracy on drifted "
                f"readings: {first} {app.accuracy('1') or 0:.2f}, {MODEL}@{final} {app.accuracy(final) or 0:.2f}")

    ui.stage("canary the retrained model", canary)

    ui.say(f"{app.predictions} predictions served; the console: {coordinator.url}/console/")
    if not headless:
        if duration is None:
            ui.say("the fleet keeps running: Ctrl-C stops everything")
            while True:
                time.sleep(1)
        else:
            time.sleep(duration)
    return True


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
