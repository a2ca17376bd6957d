"""Running a scenario: steps, faults, invariants, verdicts.

Each step becomes a test case of the run (JUnit ``testcase``): a ``replay`` checks the
latency and accuracy budgets, a ``fault`` injects the fault while the recorded set keeps
being replayed and then checks the invariants, a ``deploy`` checks the update's outcome.
The invariants run once more at the end.

Invariants:

* **healthy**: ``GET /v1/health`` answers 200 within ``budgets.recover_s``;
* **verified model**: the model the agent serves has the sha256 of a registered, signed
  artifact, the one the scenario expects by now, and the coordinator's copy of the
  reported state names the same sha256;
* **no telemetry lost**: once the agent's buffer is drained, the coordinator holds every
  seq of the agent's stream from 1 to the last one (highest contiguous seq, no gaps) and
  the agent dropped nothing.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._exceptions import HilError
from ._replay import Background, Phase, Replayer
from ._rig import Rig, crash_env, wait_for
from ._scenario import Budgets, Deploy, Fault, ModelSpec, Replay, Scenario
from ._targets import Target, make_target

NETWORK = {"partition": "blackhole", "drop_connections": "drop", "delay": "delay", "throttle": "throttle",
           "packet_loss": "loss"}


@dataclass
class Case:
    name: str
    classname: str
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    skipped: str | None = None
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures and self.error is None


@dataclass
class RunResult:
    scenario: str
    description: str
    model: str
    hardware_profile: str
    target: str
    budgets: dict[str, Any]
    cases: list[Case] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed or c.skipped for c in self.cases)

    def counts(self) -> dict[str, int]:
        return {
            "tests": len(self.cases),
            "failures": sum(1 for c in self.cases if c.failures and c.error is None),
            "errors": sum(1 for c in self.cases if c.error is not None),
            "skipped": sum(1 for c in self.cases if c.skipped),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario, "model": self.model, "hardware_profile": self.hardware_profile,
            "target": self.target, "passed": self.passed, "counts": self.counts(), "seconds": round(self.seconds, 3),
            "budgets": self.budgets, "notes": self.notes,
            "cases": [{"name": c.name, "passed": c.passed, "skipped": c.skipped, "failures": c.failures,
                       "error": c.error, "details": c.details} for c in self.cases],
            "phases": [p.summary() for p in self.phases],
        }


def effective_budgets(scenario: Scenario) -> dict[str, Any]:
    """The scenario's budgets, with the hardware profile's p95 where the scenario sets none."""
    from edgeml._hardware import load_profile

    budgets: Budgets = scenario.budgets
    p95 = budgets.latency_p95_ms
    source = "scenario"
    if p95 is None:
        profile = load_profile(scenario.hardware_profile)
        p95, source = profile.budgets.probation_p95_ms or profile.budgets.latency_ms, f"profile {profile.name}"
    return {"latency_p95_ms": p95, "latency_source": source, "accuracy": budgets.accuracy,
            "recover_s": budgets.recover_s, "max_error_rate": budgets.max_error_rate}


def run_scenario(scenario: Scenario, target: str | Target = "local", workdir: Path | None = None) -> RunResult:
    """Run ``scenario`` against a target; never raises for a failed check (it becomes a case)."""
    dut = make_target(target) if isinstance(target, str) else target
    budgets = effective_budgets(scenario)
    result = RunResult(scenario.name, scenario.description, scenario.model.ref, scenario.hardware_profile, dut.name,
                       budgets)
    own = workdir is None
    root = Path(tempfile.mkdtemp(prefix=f"edgeml-hil-{scenario.name}-")) if own else workdir
    assert root is not None
    t_start = time.monotonic()
    rig = Rig(scenario, root, dut)
    try:
        setup = Case("setup", f"hil.{scenario.name}")
        t = time.monotonic()
        try:
            rig.start()
        except HilError as exc:
            setup.error = str(exc)
        except Exception as exc:  # the rig's parts fail in many ways; the run reports it as an error
            setup.error = f"{exc.__class__.__name__}: {exc}"
        setup.seconds = time.monotonic() - t
        setup.details = {"agent_log": _log_tail(dut)} if setup.error else {"model": scenario.model.ref}
        result.cases.append(setup)
        if rig.mount_note:
            result.notes.append(rig.mount_note)
        if setup.error is None:
            _Steps(rig, result, budgets, t_start).run()
    finally:
        rig.close()
        result.seconds = time.monotonic() - t_start
        if own:
            shutil.rmtree(root, ignore_errors=True)
    return result


def parse_offset(text: str) -> float:
    """``+6h``, ``-90m``, ``+30s``, ``-1d`` or plain seconds -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip()
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise HilError(f"bad clock offset {text!r}: use e.g. +6h, -90m, +30s") from None


def _log_tail(dut: Target) -> str:
    tail = getattr(dut, "log_tail", None)
    return tail() if tail else ""


class _Steps:
    def __init__(self, rig: Rig, result: RunResult, budgets: dict[str, Any], t0: float) -> None:
        self.rig = rig
        self.result = result
        self.budgets = budgets
        self.replayer = Replayer(rig.api, rig.recorded, t0)
        self.t0 = t0
        self.name = rig.scenario.name
        self.also_fine: set[str] = set()  # refs besides rig.expected the device may end on
        self.killed = False  # a kill -9 happened: the last flush window may be lost by design

    def run(self) -> None:
        for i, step in enumerate(self.rig.scenario.steps, 1):
            label = step.replay.label if step.replay and step.replay.label else step.kind
            if step.fault:
                label = f"fault {step.fault.kind}"
            elif step.deploy:
                label = f"deploy {step.deploy.model.ref}"
            case = Case(f"{i:02d} {label}", f"hil.{self.name}")
            t = time.monotonic()
            try:
                if step.replay:
                    self._replay(step.replay, case)
                elif step.fault:
                    self._fault(step.fault, case)
                elif step.deploy:
                    self._deploy(step.deploy, case)
            except Exception as exc:  # a broken step is an error case; the next steps still run
                case.error = f"{exc.__class__.__name__}: {exc}"
                case.details["agent_log"] = _log_tail(self.rig.target)
            case.seconds = time.monotonic() - t
            self.result.cases.append(case)
        final = Case("99 invariants at the end", f"hil.{self.name}")
        t = time.monotonic()
        try:
            self._invariants(final)
        except Exception as exc:  # reported as the case's error, like a step's
            final.error = f"{exc.__class__.__name__}: {exc}"
            final.details["agent_log"] = _log_tail(self.rig.target)
        final.seconds = time.monotonic() - t
        self.result.cases.append(final)

    # ------------------------------------------------------------------ steps
    def _replay(self, step: Replay, case: Case) -> None:
        phase = Phase(step.label or f"replay {len(self.result.phases) + 1}", "replay", time.monotonic() - self.t0)
        self.replayer.run(phase, step.seconds, step.rate)
        self.result.phases.append(phase)
        case.details.update(phase.summary())
        self._budgets(phase, case)

    def _budgets(self, phase: Phase, case: Case) -> None:
        p95, budget = phase.p(95), self.budgets["latency_p95_ms"]
        if p95 is None:
            case.failures.append("no prediction answered")
            return
        if budget is not None and p95 > budget:
            case.failures.append(f"inference latency p95 {p95:.3f} ms over the budget of {budget} ms ({self.budgets['latency_source']})")
        acc, want = phase.accuracy, self.budgets["accuracy"]
        if want is not None and acc is not None and acc < want:
            case.failures.append(f"accuracy {acc:.3f} under the budget of {want}")
        if phase.error_rate > self.budgets["max_error_rate"]:
            case.failures.append(f"error rate {phase.error_rate:.3f} over {self.budgets['max_error_rate']}")

    def _deploy(self, step: Deploy, case: Case) -> None:
        before = self.rig.expected
        revision = self.rig.deploy(step.model)
        status = self.rig.wait_update_done(revision, step.within_s)
        if status is None:
            case.failures.append(f"the update to {step.model.ref} did not finish within {step.within_s}s: "
                                 f"{self.rig.agent_status_brief()}")
            return
        update = status["update"]
        case.details.update(result=update["result"], reason=update.get("reason"), version=status["model"]["version"])
        outcome = {"success": "applied"}.get(update["result"], update["result"])
        if step.expect == "applied":
            ok = outcome == "applied"
        elif step.expect == "rolled_back":
            ok = outcome == "rolled_back"
        else:
            ok = outcome not in ("applied", "rolled_back")
        if not ok:
            case.failures.append(f"expected the update to be {step.expect}, it ended {update['result']} "
                                 f"({update.get('reason')})")
        self.rig.expected = step.model if outcome == "applied" else before
        self._invariants(case)

    def _fault(self, fault: Fault, case: Case) -> None:
        rig = self.rig
        phase = Phase(f"during {fault.kind}", "fault", time.monotonic() - self.t0)
        inject: Callable[[Fault, Case], None] = getattr(self, f"_f_{fault.kind}")
        with Background(self.replayer, phase, fault.rate):
            inject(fault, case)
        self.result.phases.append(phase)
        case.details["during"] = phase.summary()
        if case.skipped:
            return
        case.details["proxy"] = rig.proxy.stats() if rig.proxy else None
        self._invariants(case)

    # ------------------------------------------------------------------ faults
    def _network(self, fault: Fault, case: Case) -> None:
        assert self.rig.proxy is not None
        mode = NETWORK[fault.kind]
        self.rig.proxy.set_fault(mode, delay_ms=fault.delay_ms, bytes_per_s=fault.bytes_per_s, loss=fault.loss)
        try:
            time.sleep(fault.seconds)
        finally:
            self.rig.proxy.clear()

    _f_partition = _f_drop_connections = _f_delay = _f_throttle = _f_packet_loss = _network

    def _f_broker_restart(self, fault: Fault, case: Case) -> None:
        broker = self.rig.broker
        assert broker is not None
        broker.stop()
        try:
            time.sleep(fault.seconds)
        finally:
            broker.start()

    def _f_kill_agent(self, fault: Fault, case: Case) -> None:
        self.killed = True
        self.rig.target.kill()
        time.sleep(fault.seconds)
        self.rig.start_agent()

    def _f_power_cut_update(self, fault: Fault, case: Case) -> None:
        rig = self.rig
        assert fault.candidate is not None
        rig.register(fault.candidate)
        if rig.armed != fault.at:  # restart with the crash point armed
            rig.target.kill()
            rig.start_agent(**crash_env(fault.at))
            if not rig.wait_healthy(self.budgets["recover_s"]):
                raise HilError("the agent did not start for the power cut")
        rig.armed = None
        self.killed = True
        revision = rig.deploy(fault.candidate)
        died = wait_for(lambda: not rig.target.alive(), 30, 0.05)
        case.details["cut_at"] = fault.at
        if not died:
            case.failures.append(f"the agent never reached {fault.at}: {rig.agent_status_brief()}")
            rig.target.kill()
        forget = getattr(rig.target, "forget", None)
        if forget:
            forget()
        rig.start_agent()
        status = rig.wait_update_done(revision, self.budgets["recover_s"] + 20)
        if status is None:
            case.failures.append(f"the update did not resume or roll back: {rig.agent_status_brief()}")
            return
        update = status["update"]
        case.details.update(result=update["result"], reason=update.get("reason"), version=status["model"]["version"])
        want = fault.expect_model or ("primary" if fault.at == "rolling_back" else "candidate")
        if update["result"] == "success":
            rig.expected = fault.candidate
        if (want == "candidate") != (update["result"] == "success"):
            case.failures.append(f"after a power cut in {fault.at} the device should end on the {want} model; the "
                                 f"update ended {update['result']} ({update.get('reason')})")
            case.details["agent_log"] = _log_tail(rig.target)

    def _f_corrupt_artifact(self, fault: Fault, case: Case) -> None:
        rig = self.rig
        assert fault.candidate is not None
        model = rig.register(fault.candidate)
        rig.tamper_artifact(model["sha256"])
        revision = rig.deploy(fault.candidate)
        status = rig.wait_update_done(revision, self.budgets["recover_s"] + 20)
        if status is None:
            case.failures.append(f"the tampered update did not end: {rig.agent_status_brief()}")
            return
        update = status["update"]
        case.details.update(result=update["result"], reason=update.get("reason"),
                            last_rejection=status.get("last_rejection"))
        if update["result"] == "success" or status["model"]["sha256"] == model["sha256"]:
            case.failures.append("the agent accepted a tampered artifact")

    def _f_full_disk(self, fault: Fault, case: Case) -> None:
        rig = self.rig
        if not getattr(rig.target, "supports_local_faults", True):
            case.skipped = f"full_disk needs a filesystem the rig mounts; not supported on {rig.target.name}"
            return
        if not rig.mounted:
            case.skipped = rig.mount_note or "the data directory is not on a filesystem the rig can fill"
            return
        filler = rig.fill_disk()
        case.details["free_bytes_when_full"] = rig.free_bytes()
        try:
            if fault.candidate is not None:  # an update that needs space it does not have
                revision = rig.deploy(fault.candidate)
                status = rig.wait_update_done(revision, 5)
                update = (status or {}).get("update") or {}
                case.details.update(update_result=update.get("result") or "did not start or end while the disk was full",
                                    update_reason=update.get("reason"))
                if update.get("result") == "success":
                    case.failures.append("the agent applied an update on a full disk")
                # once space returns the device may take it later: either model is a verified end
                self.also_fine.add(fault.candidate.ref)
            time.sleep(fault.seconds)
            case.details["agent_alive_when_full"] = rig.target.alive()
            case.details["buffer_when_full"] = rig.status().get("buffer")
        finally:
            with contextlib.suppress(OSError):
                filler.unlink()

    def _f_clock_skew(self, fault: Fault, case: Case) -> None:
        rig = self.rig
        if not getattr(rig.target, "supports_local_faults", True):
            case.skipped = f"clock_skew injects into the agent's process; not supported on {rig.target.name}"
            return
        offset = parse_offset(fault.offset)
        self.killed = True
        rig.target.kill()
        rig.skew_clock(offset)
        rig.start_agent()
        if not rig.wait_healthy(self.budgets["recover_s"]):
            raise HilError("the agent did not start with a skewed clock")
        case.details["agent_clock_offset_s"] = offset
        if fault.candidate is not None:
            revision = rig.deploy(fault.candidate)
            status = rig.wait_update_done(revision, self.budgets["recover_s"] + 20)
            if status is None:
                case.failures.append(f"the update under clock skew did not end: {rig.agent_status_brief()}")
            else:
                case.details.update(update_result=status["update"]["result"], reason=status["update"].get("reason"))
                if status["update"]["result"] == "success":
                    rig.expected = fault.candidate
        time.sleep(fault.seconds)

    # ------------------------------------------------------------------ invariants
    def _invariants(self, case: Case) -> None:
        bound = self.budgets["recover_s"]
        recovered = self.rig.wait_healthy(bound)
        case.details["recovered_s"] = recovered
        if recovered is None:
            case.failures.append(f"healthy: /v1/health not 200 within {bound}s ({self.rig.agent_status_brief()})")
            return
        self._verified(case, bound)
        self._telemetry(case, bound + 10)

    def _verified(self, case: Case, bound: float) -> None:
        rig = self.rig
        want = rig.registered[rig.expected.ref]["sha256"]
        s = wait_for(lambda: (st := rig.status())["update"]["state"] == "idle" and st, bound, 0.1)
        if not s:
            case.failures.append(f"verified model: an update is still in progress ({rig.agent_status_brief()})")
            return
        sha = (s.get("model") or {}).get("sha256")
        signed = rig.signed_models()
        case.details["model"] = signed.get(sha, sha)
        fine = {want} | {rig.registered[ref]["sha256"] for ref in self.also_fine}
        if sha not in signed:
            case.failures.append(f"verified model: the agent serves {sha}, not a registered signed artifact")
        elif sha not in fine:
            case.failures.append(f"verified model: the agent serves {signed[sha]}, expected {rig.expected.ref}")
        reported = wait_for(lambda: ((rig.device().get("reported_state") or {}).get("active") or {}).get("sha256") == sha,
                            bound, 0.1)
        if not reported:
            case.failures.append("verified model: the coordinator's reported state does not name the model served")

    def _telemetry(self, case: Case, bound: float) -> None:
        rig = self.rig
        seen: dict[str, Any] = {}

        def complete() -> bool:
            buf = rig.status()["buffer"]
            seen["buffer"] = buf
            if buf["records"] or buf["pending"]:
                return False
            streams = {c["stream"]: c for c in rig.device().get("streams", [])}
            seen["streams"] = streams
            mine = streams.get(buf["stream"])
            return bool(mine and mine["max_contiguous_seq"] >= buf["next_seq"] - 1
                        and all(c["gaps"] == 0 for c in streams.values()))

        ok = wait_for(complete, bound, 0.1)
        buf = seen.get("buffer") or {}
        mine = (seen.get("streams") or {}).get(buf.get("stream")) or {}
        dropped = sum((buf.get("dropped") or {}).values())
        case.details["telemetry"] = {"last_seq": buf.get("next_seq", 1) - 1, "max_contiguous_seq": mine.get("max_contiguous_seq"),
                                     "gaps": mine.get("gaps"), "duplicates": mine.get("duplicates"), "dropped": dropped}
        if not ok:
            case.failures.append(f"no telemetry lost: the coordinator has seq 1..{mine.get('max_contiguous_seq')} "
                                 f"(gaps {mine.get('gaps')}) of {buf.get('next_seq', 1) - 1}; "
                                 f"{buf.get('records')} records still buffered")
        if dropped:
            case.failures.append(f"no telemetry lost: the agent dropped {dropped} records ({buf.get('dropped')})")
        self._predictions(case)

    def _predictions(self, case: Case) -> None:
        """Every answered call has its prediction record at the coordinator. After a kill -9
        the agent may lose the records of its last flush window (telemetry.flush_interval_ms,
        by design): then the count is reported, not judged."""
        answered = sum(len(p.answered) for p in self.result.phases)
        stored = len(self.rig.telemetry("prediction"))
        case.details["telemetry"].update(answered_calls=answered, prediction_records=stored)
        if stored > answered:
            case.failures.append(f"no telemetry lost: {stored} prediction records for {answered} answered calls")
        elif stored < answered and not self.killed:
            case.failures.append(f"no telemetry lost: {answered - stored} of {answered} answered calls have no "
                                 "prediction record at the coordinator")


__all__ = ["Case", "ModelSpec", "RunResult", "effective_budgets", "run_scenario"]
