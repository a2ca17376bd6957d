"""Training benchmark: every shipped recipe (configs/recipes/*.yaml) on this machine.

    /work/venv/bin/python bench/bench_training.py [--repeats 200] [--recipe FILE ...]

For each recipe: a full run (snapshot, deterministic torch training on one thread, ONNX
export, static QDQ and dynamic int8, the gate) without a store or registry. Printed as
JSON per recipe:

* ``training_s``: the torch training loop alone; ``run_s``: the whole run;
* ``float`` and each ``int8`` candidate: held-out accuracy, onnxruntime latency (one
  thread, median of ``--repeats``) on the held-out batch and on one row, file size;
* per candidate ``speedup_batch`` / ``speedup_row`` (float / int8 latency), ``size_ratio``
  (int8 / float), ``accuracy_drop_points`` and the gate's verdict (margin 1 point,
  faster than float) with its reasons; ``tflite``: skipped and why (no litert-torch).

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

from cloud.training import load_recipe, train  # noqa: E402


def bench(path: Path, repeats: int) -> dict[str, object]:
    recipe = load_recipe(path)
    recipe = recipe.model_copy(update={"quantization": recipe.quantization.model_copy(update={"latency_repeats": repeats})})
    with tempfile.TemporaryDirectory(prefix="edgeml-bench-training-") as tmp:
        start = time.perf_counter()
        r = train(recipe, workdir=tmp)
        run_s = time.perf_counter() - start
    flt = r["float"]
    out = {
        "recipe": path.name, "hidden": list(recipe.model.hidden), "epochs": recipe.training.epochs,
        "rows": r["dataset"]["rows"], "test_rows": r["split"]["test"],
        "training_s": round(r["training_seconds"], 2), "run_s": round(run_s, 2),
        "float": {"accuracy": round(flt["accuracy"], 4), "latency_us_batch": round(flt["latency_us_batch"], 1),
                  "latency_us_row": round(flt["latency_us_row"], 1), "size_bytes": flt["size_bytes"]},
        "int8": [],
        "chosen_int8": r["int8"]["method"] if r["int8"] else None,
        "tflite": r["tflite"],
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=200, help="timed runs per model (median)")
    ap.add_argument("--recipe", action="append", type=Path, help="a recipe (default: every configs/recipes/*.yaml)")
    args = ap.parse_args()
    paths = args.recipe or sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
    print(json.dumps({"recipes": [bench(p, args.repeats) for p in paths]}, indent=2))


if __name__ == "__main__":
    main()
