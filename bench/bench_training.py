"""Training benchmark: every shipped recipe (configs/recipes/*.yaml) on this machine.

    .venv/bin/python bench/bench_training.py [--repeats 200] [--recipe FILE ...]

For each recipe: a full run (snapshot, deterministic torch training on one thread, ONNX
export, static QDQ and dynamic int8, the gate) without a store or registry. Printed as
JSON per recipe:

* ``training_s``: the torch training loop alone; ``run_s``: the whole run;
* ``float`` and each ``int8`` candidate: held-out accuracy, onnxruntime latency (one
  thread, median of ``--repeats``) on the held-out batch and on one row, file size;
* per candidate ``speedup_batch`` / ``speedup_row`` (float / int8 latency), ``size_ratio``
  (int8 / float), ``accuracy_drop_points`` and the gate's verdict (margin 1 point,
  faster than float) with its reasons; ``tflite``: skipped and why (no litert-torch), or
  the TFLite float and int8 candidates (litert-torch) with their gate verdicts;
* ``agent``: every artifact (float ONNX, each int8 ONNX, float TFLite, each int8 TFLite)
  loaded through the agent's runtime (edgeml.runtime) and timed in alternation on the
  held-out batch and on one row, with ratios against the float model of the same format
  (``--markdown`` prints this table as Markdown after the JSON).

Targets from issue 6 for the larger recipe: >= 2x faster, <= 30 % of the size, within
1 accuracy point. Latency here is this CPU (x86 server, shared), not a device.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloud.training import build_snapshot, load_recipe, split, train  # noqa: E402
from cloud.training._tflite import _interleaved  # noqa: E402


def bench(path: Path, repeats: int) -> dict[str, object]:
    recipe = load_recipe(path)
    recipe = recipe.model_copy(update={"quantization": recipe.quantization.model_copy(update={"latency_repeats": repeats})})
    with tempfile.TemporaryDirectory(prefix="edgeml-bench-training-") as tmp:
        start = time.perf_counter()
        r = train(recipe, workdir=tmp)
        run_s = time.perf_counter() - start
        agent = agent_table(recipe, r, repeats)
    flt = r["float"]
    out = {
        "recipe": path.name, "hidden": list(recipe.model.hidden), "epochs": recipe.training.epochs,
        "rows": r["dataset"]["rows"], "test_rows": r["split"]["test"],
        "training_s": round(r["training_seconds"], 2), "run_s": round(run_s, 2),
        "float": {"accuracy": round(flt["accuracy"], 4), "latency_us_batch": round(flt["latency_us_batch"], 1),
                  "latency_us_row": round(flt["latency_us_row"], 1), "size_bytes": flt["size_bytes"]},
        "int8": [],
        "chosen_int8": r["int8"]["method"] if r["int8"] else None,
        "tflite": {k: v for k, v in r["tflite"].items() if k not in ("artifacts", "float", "int8_candidates")},
        "agent": agent,
    }
    for c in r["int8_candidates"]:
        out["int8"].append({
            "method": c["method"], "accuracy": round(c["accuracy"], 4),
            "latency_us_batch": round(c["latency_us_batch"], 1), "latency_us_row": round(c["latency_us_row"], 1),
            "size_bytes": c["size_bytes"],
            "speedup_batch": round(flt["latency_us_batch"] / c["latency_us_batch"], 2),
            "speedup_row": round(flt["latency_us_row"] / c["latency_us_row"], 2),
            "size_ratio": round(c["size_bytes"] / flt["size_bytes"], 3),
            "accuracy_drop_points": round(100 * c["gate"]["accuracy_drop"], 2),
            "accepted": c["gate"]["accepted"], "reasons": c["gate"]["reasons"],
        })
    return out


def agent_table(recipe: object, r: dict[str, object], repeats: int) -> list[dict[str, object]]:
    """Every artifact of the run on the agent's runtime, timed in alternation (see the module doc)."""
    snap = build_snapshot(recipe.data.sources)  # type: ignore[attr-defined]
    _, te = split(snap, recipe.data.test_fraction, recipe.training.seed)  # type: ignore[attr-defined]
    x = snap.x[te]
    chosen = {r["int8"] and r["int8"]["path"], r["tflite"].get("int8") and r["tflite"]["int8"]["path"]}
    rows: list[dict[str, object]] = [{"format": "onnx", "method": "float", "path": r["artifacts"]["onnx_float"],
                                      "accuracy": r["float"]["accuracy"], "gate": "-"}]
    rows += [{"format": "onnx", "method": c["method"], "path": c["path"], "accuracy": c["accuracy"],
              "gate": _verdict(c, chosen)} for c in r["int8_candidates"]]
    if r["tflite"].get("status") == "exported":
        t = r["tflite"]
        rows.append({"format": "tflite", "method": "float", "path": t["float"]["path"], "accuracy": t["float"]["accuracy"],
                     "gate": "-"})
        rows += [{"format": "tflite", "method": c["method"], "path": c["path"], "accuracy": c["accuracy"],
                  "gate": _verdict(c, chosen)} for c in t["int8_candidates"] if "path" in c]
    timed = _interleaved([Path(str(row["path"])) for row in rows], x, repeats)
    base = {}
    for row, (batch_us, row_us) in zip(rows, timed, strict=True):
        row.update(latency_us_batch=round(batch_us, 1), latency_us_row=round(row_us, 1),
                   size_bytes=Path(str(row["path"])).stat().st_size, accuracy=round(float(row["accuracy"]), 4))
        if row["method"] == "float":
            base[row["format"]] = row
        flt = base[str(row["format"])]
        row.update(speedup_batch=round(flt["latency_us_batch"] / batch_us, 2),
                   speedup_row=round(flt["latency_us_row"] / row_us, 2),
                   size_ratio=round(row["size_bytes"] / flt["size_bytes"], 3),
                   accuracy_drop_points=round(100 * (flt["accuracy"] - row["accuracy"]), 2))
        del row["path"]
    return rows


def _verdict(cand: dict[str, object], chosen: set[object]) -> str:
    gate = cand["gate"]
    if not gate["accepted"]:  # type: ignore[index]
        return "refused"
    return "accepted, chosen" if cand["path"] in chosen else "accepted"


def markdown(results: list[dict[str, object]]) -> str:
    lines = ["| recipe | artifact | accuracy | size (bytes) | size vs float | us / batch | us / row "
             "| speed-up batch | speed-up row | gate |", "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for row in res["agent"]:  # type: ignore[union-attr]
            name = f"{row['format']} {row['method']}"
            lines.append(f"| {Path(str(res['recipe'])).stem} | {name} | {row['accuracy']:.4f} | {row['size_bytes']} | "
                         f"{row['size_ratio']:.0%} | {row['latency_us_batch']:.0f} | {row['latency_us_row']:.1f} | "
                         f"x{row['speedup_batch']:.2f} | x{row['speedup_row']:.2f} | {row['gate']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=200, help="timed runs per model (median)")
    ap.add_argument("--recipe", action="append", type=Path, help="a recipe (default: every configs/recipes/*.yaml)")
    ap.add_argument("--markdown", action="store_true", help="also print the agent table as Markdown")
    args = ap.parse_args()
    paths = args.recipe or sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
    results = [bench(p, args.repeats) for p in paths]
    print(json.dumps({"recipes": results}, indent=2))
    if args.markdown:
        print(markdown(results))


if __name__ == "__main__":
    main()
