"""TFLite float and int8 artifacts through litert-torch, measured on the agent's LiteRT runtime.

    reason = unavailable()        # None, or why TFLite cannot be exported here
    doc = export_and_gate(model, run_dir, calibration, x_te, y_te, onnx_float=path, margin=0.01,
                          min_speedup=1.0, repeats=30, quantize=True, say=print)

Float: ``litert_torch.convert`` of the same wrapper the ONNX export uses (standardization as
the first ops, softmax as the last), traced with one row; the agent's runtime resizes the
batch dimension to the batch it is given. int8 candidates, calibrated on the same training
rows as the ONNX int8 ones:

* ``pt2e_static``: PT2E static quantization (litert-torch's ``PT2EQuantizer``: int8 weights
  per channel, int8 activations, histogram observers), converted with its ``QuantConfig``;
* ``static_wi8_ai8``: ai-edge-quantizer on the float .tflite, int8 weights and activations;
* ``dynamic_wi8_afp32``: ai-edge-quantizer dynamic range (int8 weights, float activations).

PT2E *dynamic* quantization is not offered: with litert-torch 0.10 its .tflite answers one
class for every row (accuracy 0.10 on digits).

Every file is evaluated through :func:`edgeml.runtime.load_runtime` (the agent's own loader)
on the held-out split: accuracy, size, latency per batch and per row, measured in
alternation with the ONNX float model on the agent's ONNX runtime. The float .tflite must
agree with the ONNX float within :data:`FLOAT_TOLERANCE`; each int8 candidate passes
:func:`._quantize.gate` against the TFLite float or is refused with the figures, and the
fastest accepted one is kept.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ._quantize import Evaluation, gate

__all__ = ["FLOAT_TOLERANCE", "INT8_METHODS", "export_and_gate", "probabilities", "register", "unavailable"]

#: TFLite float probabilities must match the ONNX float's within this (op-order noise).
FLOAT_TOLERANCE = 1e-4
INT8_METHODS = ("pt2e_static", "static_wi8_ai8", "dynamic_wi8_afp32")
Progress = Callable[[str], None]


def unavailable() -> str | None:
    """Why TFLite export cannot run in this environment, or None when it can."""
    if importlib.util.find_spec("litert_torch") is None:
        return ("litert-torch is not installed (the converter from PyTorch to TFLite: "
                "pip install 'edgeml[tflite-export]'); ai-edge-litert alone can run .tflite models but not convert them")
    if importlib.util.find_spec("ai_edge_quantizer") is None:
        return "ai-edge-quantizer is not installed (litert-torch's int8 quantizer)"
    from edgeml.runtime import _litert

    if not _litert.available():
        return "no LiteRT runtime (ai-edge-litert) to evaluate the .tflite files"
    return None


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("litert-torch", "ai-edge-quantizer", "ai-edge-litert"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


# ------------------------------------------------------------------ conversion


@contextlib.contextmanager
def _converter_quiet() -> Iterator[None]:
    """The converters' own deprecation chatter (torch.export, pytree, torchao) is not ours to act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _convert_float(wrapped: Any, example: Any, path: Path) -> Path:
    with _converter_quiet():
        import litert_torch

        litert_torch.convert(wrapped, (example,)).export(str(path))
    return path


def _convert_pt2e_static(wrapped: Any, calibration: np.ndarray, path: Path) -> Path:
    import litert_torch
    import torch
    from litert_torch.quantize import pt2e_quantizer as pq
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import move_exported_model_to_eval, quantize_pt2e

    quantizer = pq.PT2EQuantizer().set_global(pq.get_symmetric_quantization_config(is_per_channel=True))
    # a dynamic batch: one observer pass over every calibration row, then traced with one row
    # like the float model (a graph specialised to the calibration batch would ship that shape)
    batch = torch.as_tensor(np.ascontiguousarray(calibration, np.float32))
    exported = torch.export.export(wrapped, (batch,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    graph = quantize_pt2e.prepare_pt2e(exported.module(), quantizer)
    with torch.no_grad():
        graph(batch)
    graph = quantize_pt2e.convert_pt2e(graph, fold_quantize=False)
    move_exported_model_to_eval(graph)
    litert_torch.convert(graph, (batch[:1],), quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(str(path))
    return path


def _quantize_tflite(float_path: Path, method: str, calibration: np.ndarray, path: Path) -> Path:
    from ai_edge_quantizer import quantizer as aq
    from ai_edge_quantizer import recipe as ar

    q = aq.Quantizer(str(float_path))
    q.load_quantization_recipe(getattr(ar, method)())
    if method.startswith("static"):
        from ai_edge_litert.interpreter import Interpreter

        signatures = Interpreter(model_path=str(float_path)).get_signature_list()
        key, sig = next(iter(signatures.items()))
        name = sig["inputs"][0]
        rows = [{name: calibration[i : i + 1].astype(np.float32)} for i in range(len(calibration))]
        result = q.quantize(q.calibrate({key: rows}))
    else:
        result = q.quantize()
    result.export_model(str(path), overwrite=True)
    return path


def _convert_int8(method: str, wrapped: Any, float_path: Path, calibration: np.ndarray, run_dir: Path) -> Path:
    path = run_dir / f"model.int8-{method}.tflite"
    # ai-edge-quantizer prints sizes and a progress bar: the run's progress lines say it instead
    with _converter_quiet(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return _convert_int8_quiet(method, wrapped, float_path, calibration, path)


def _convert_int8_quiet(method: str, wrapped: Any, float_path: Path, calibration: np.ndarray, path: Path) -> Path:
    if method == "pt2e_static":
        return _convert_pt2e_static(wrapped, calibration, path)
    if method in ("static_wi8_ai8", "dynamic_wi8_afp32"):
        return _quantize_tflite(float_path, method, calibration, path)
    raise ValueError(f"unknown TFLite quantization method {method!r}")


# ------------------------------------------------------------------ evaluation on the agent's runtime


def _first_input(runtime: Any) -> str:
    return str(runtime.inputs[0].name)


def probabilities(path: Path, x: np.ndarray) -> np.ndarray:
    """The model's first output on ``x`` through the agent's runtime (.onnx or .tflite)."""
    from edgeml.runtime import load_runtime

    runtime = load_runtime(path)
    try:
        out = runtime.run({_first_input(runtime): np.ascontiguousarray(x, np.float32)})
        return np.asarray(next(iter(out.values())), np.float32)
    finally:
        runtime.close()


def _interleaved(paths: list[Path], x: np.ndarray, repeats: int) -> list[tuple[float, float]]:
    """(median us per batch, median us per row) of each model, timed in alternation."""
    from edgeml.runtime import load_runtime

    runtimes = [load_runtime(p) for p in paths]
    try:
        result: list[list[float]] = [[] for _ in paths]
        for rows, count in ((np.ascontiguousarray(x, np.float32), repeats), (np.ascontiguousarray(x[:1], np.float32),
                                                                            repeats * 3)):
            feeds = [{_first_input(rt): rows} for rt in runtimes]
            for rt, feed in zip(runtimes, feeds, strict=True):
                for _ in range(3):
                    rt.run(feed)
            times: list[list[float]] = [[] for _ in paths]
            for _ in range(count):
                for rt, feed, out in zip(runtimes, feeds, times, strict=True):
                    start = time.perf_counter_ns()
                    rt.run(feed)
                    out.append((time.perf_counter_ns() - start) / 1000.0)
            for acc, t in zip(result, times, strict=True):
                acc.append(statistics.median(t))
        return [(r[0], r[1]) for r in result]
    finally:
        for rt in runtimes:
            rt.close()


def _as_json(e: Evaluation) -> dict[str, Any]:
    return {**e.as_json(), "runtime": "litert", "path": str(e.path)}


# ------------------------------------------------------------------ the step


def export_and_gate(
    model: Any, run_dir: Path, calibration: np.ndarray, x_te: np.ndarray, y_te: np.ndarray, *, onnx_float: Path,
    margin: float, min_speedup: float, repeats: int, quantize: bool = True, say: Progress | None = None,
) -> dict[str, Any]:
    """Export, evaluate and gate; the result document (``status``: exported, skipped or failed)."""
    say = say or (lambda _msg: None)
    reason = unavailable()
    if reason is not None:
        return {"status": "skipped", "reason": reason}
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    import torch

    from . import _torch

    run_dir.mkdir(parents=True, exist_ok=True)
    wrapped = _torch._Exported(model).eval()
    example = torch.zeros(1, int(model.prep.mean.shape[0]), dtype=torch.float32)
    doc: dict[str, Any] = {"status": "exported", "versions": _versions(), "int8": None, "int8_candidates": [],
                           "artifacts": {}}
    try:  # the converter raises anything from torch.export, MLIR or flatbuffers: one failure reason
        float_path = _convert_float(wrapped, example, run_dir / "model.tflite")
        probabilities(float_path, x_te[:1])  # the agent's runtime loads it, or the reason is recorded
    except Exception as exc:  # noqa: BLE001 - boundary of a third-party converter
        return {"status": "failed", "reason": f"litert-torch float conversion failed: {type(exc).__name__}: {exc}"}
    diff = float(np.abs(probabilities(float_path, x_te) - probabilities(onnx_float, x_te)).max())
    doc["float_max_abs_diff_vs_onnx"] = diff
    if diff > FLOAT_TOLERANCE:
        return {**doc, "status": "failed",
                "reason": f"the TFLite float disagrees with the ONNX float: max |dp| {diff:.2e} > {FLOAT_TOLERANCE}"}
    candidates: list[tuple[str, Path]] = []
    if quantize:
        for method in INT8_METHODS:
            try:
                path = _convert_int8(method, wrapped, float_path, calibration, run_dir)
                probabilities(path, x_te[:1])
                candidates.append((method, path))
            except Exception as exc:  # noqa: BLE001 - one candidate failing leaves the others
                doc["int8_candidates"].append({"method": method, "error": f"{type(exc).__name__}: {exc}"})
    timed = _interleaved([onnx_float, float_path, *(p for _, p in candidates)], x_te, repeats)
    doc["onnx_float"] = {"latency_us_batch": timed[0][0], "latency_us_row": timed[0][1], "runtime": "onnxruntime"}
    evals = []
    for (method, path), (batch_us, row_us) in zip([("float", float_path), *candidates], timed[1:], strict=True):
        probs = probabilities(path, x_te)
        evals.append(Evaluation(path, float((probs.argmax(axis=1) == y_te).mean()), batch_us, row_us,
                                path.stat().st_size, method))
    flt = evals[0]
    doc["float"] = _as_json(flt)
    doc["artifacts"]["tflite_float"] = str(float_path)
    say(f"tflite float: accuracy {flt.accuracy:.4f}, {flt.latency_us:.0f} us/batch of {len(x_te)} "
        f"(onnx float {timed[0][0]:.0f}), {flt.size} bytes")
    best = None
    for cand in evals[1:]:
        decision = gate(flt, cand, margin=margin, min_speedup=min_speedup)
        doc["int8_candidates"].append({**_as_json(cand), "gate": decision.as_json()})
        verdict = "accepted" if decision.accepted else "refused: " + "; ".join(decision.reasons)
        say(f"tflite int8 {cand.method}: accuracy {cand.accuracy:.4f} (drop {decision.accuracy_drop * 100:+.2f} pt), "
            f"x{decision.speedup:.2f} faster, {decision.size_ratio:.0%} of the size -> {verdict}")
        if decision.accepted and (best is None or decision.speedup > best[1].speedup):
            best = (cand, decision)
    if best is not None:
        doc["int8"] = {**_as_json(best[0]), "gate": best[1].as_json()}
        doc["artifacts"]["tflite_int8"] = str(best[0].path)
    return doc


def register(
    registry: Any, name: str, version: str, doc: dict[str, Any], *, lineage: dict[str, Any],
    base_metrics: dict[str, Any], parent: str | None, dataset_hash: str | None,
) -> list[str]:
    """Register the TFLite float (``VERSION+tflite``, parent: the ONNX float) and the accepted
    int8 (``VERSION+tflite-int8``, parent: the TFLite float); their refs."""
    if doc.get("status") != "exported":
        return []
    flt = doc["float"]
    params = {**lineage, "format": "tflite", "converter": doc["versions"]}
    metrics = {**base_metrics, "accuracy": flt["accuracy"], "latency_us": {"litert": flt["latency_us_batch"]},
               "latency_us_row": {"litert": flt["latency_us_row"]}, "size_bytes": {"litert": flt["size_bytes"]},
               "onnx_float_latency_us": doc["onnx_float"]["latency_us_batch"]}
    model = registry.register(doc["artifacts"]["tflite_float"], name=name, version=f"{version}+tflite",
                              metrics=metrics, params={**params, "quantization": "none"}, parent=parent,
                              dataset_hash=dataset_hash)
    refs = [model.ref]
    q = doc.get("int8")
    if q is not None:
        int8_metrics = {**metrics, "accuracy": q["accuracy"], "latency_us": {"litert": q["latency_us_batch"]},
                        "latency_us_row": {"litert": q["latency_us_row"]}, "size_bytes": {"litert": q["size_bytes"]},
                        "gate": q["gate"], "float_accuracy": flt["accuracy"]}
        int8 = registry.register(doc["artifacts"]["tflite_int8"], name=name, version=f"{version}+tflite-int8",
                                 metrics=int8_metrics, params={**params, "quantization": q["method"]},
                                 parent=model.ref, dataset_hash=dataset_hash)
        refs.append(int8.ref)
    return refs
