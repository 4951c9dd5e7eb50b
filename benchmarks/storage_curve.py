"""Storage vs score of Twin-Merging's exclusive knowledge, on VALIDATION data (not a test; issue 15 part 2).

For each storage setting (factor bits x rank mode/value) every expert of params.yaml is compressed again against
the pipeline's shared expert (artifacts/shared, the stages' own `FactorStream`, into a temporary folder), and the
routed model over those factors is scored on the validation inputs the methods select options on (the seeded
`evaluate.selection_max_per_task` subset per task, `tasks.method.task_pool`):
  - true_routing: one-hot routing on the gold task and its head (a task id: the storage loss alone);
  - twin_router: the router's weights and head (what a user gets; the router is the pipeline's, trained on
    validation inputs, so its routing here is optimistic, and the same for every setting).
Both are mean normalised scores against the experts' validation scores (artifacts/eval/experts.json). The
storage is the factors' bytes over the dense float32 task vectors' (`exclusive_ratio`, heads excluded).

The choice: the smallest exclusive_ratio whose true_routing score is within --tolerance (0.3) points of the
reference setting (float16 factors at rank fraction 0.1, the current default). Test data is never read.

Writes <out>/storage_curve.csv (one row per setting; `dvc plots show benchmarks/results/storage_curve.csv`, see
dvc.yaml `plots`), storage_curve.json (per-task scores, the choice) and storage_curve.png.

    python benchmarks/storage_curve.py [--points 16:fraction:0.1,4:fraction:0.05,8x0.25+4x0.75:fraction:0.1 ...]
                                       [--out benchmarks/results] [--add]

A setting is bits:mode:value: bits 16 (float16 factors), 8, 4, or a mixed-precision schedule BITSxSHARE+...
(8x0.25+4x0.75: each matrix's top quarter of rank in int8, the rest int4); mode and value as `compress.rank`.
--add keeps the rows of an earlier run (same artifacts) and measures only the new settings.

Runs on the committed artifacts (`dvc pull` or `twinmerge run` first): ~2-3 min per setting on 2 CPU threads.
"""
import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks.method import task_pool  # noqa: E402
from tasks.modularize import open_pool  # noqa: E402
from tasks.params import load_params  # noqa: E402
from twinmerge.exclusive import FactorStream, RankSpec, factor_metadata, load_factors, write_factors  # noqa: E402
from twinmerge.methods.base import Context, expert_heads, gold_one_hot  # noqa: E402
from twinmerge.methods.twin import TwinMerging  # noqa: E402
from twinmerge.modelpool import assemble_classifier  # noqa: E402
from twinmerge.routed import RoutedDeltaModel  # noqa: E402
from twinmerge.shared import SharedModel, load_shared  # noqa: E402

REFERENCE = "16:fraction:0.1"
DEFAULT_POINTS = ("16:fraction:0.01,16:fraction:0.05,16:fraction:0.1,16:fraction:0.2,"
                  "8:fraction:0.02,8:fraction:0.05,8:fraction:0.1,8:fraction:0.2,"
                  "4:fraction:0.03,4:fraction:0.05,4:fraction:0.1,4:fraction:0.2,4:fraction:0.4,"
                  "4:budget_fraction:0.0125,4:budget_fraction:0.025,"
                  "4x0.5+2x0.5:fraction:0.1,4x0.25+2x0.75:fraction:0.1,8x0.25+4x0.75:fraction:0.05")
FIELDS = ("setting", "factor_bits", "mode", "value", "exclusive_bytes", "dense_bytes", "exclusive_ratio",
          "true_routing", "twin_router", "seconds")


def parse_point(text: str) -> tuple[int | list, str, float]:
    """'bits:mode:value' -> (bits, mode, value); bits 16 = unquantised float16 factors, or a mixed-precision
    schedule 'BITSxSHARE+...' (e.g. 8x0.25+4x0.75: the top quarter of each matrix's rank in int8, the rest int4)."""
    bits, mode, value = text.split(":")
    if "x" in bits:
        return [[float(share), int(b)] for b, share in (seg.split("x") for seg in bits.split("+"))], mode, float(value)
    return int(bits), mode, float(value)


def mean_normalized(scores: dict, reference: dict) -> float:
    return sum(100 * scores[t] / reference[t] for t in scores) / len(scores)


def compress_all(params, pool, bits: int, mode: str, value: float, folder: Path) -> list:
    """Every expert's factors for one setting, written to `folder` as `compress` writes them, then loaded."""
    spec, c = RankSpec(mode, value), params.compress
    shared = SharedModel("artifacts/shared")
    factors = []
    for name in pool.names:
        stream = FactorStream(pool, shared, name, spec, c.dtype, False, bits, c.group_size)
        path = folder / f"{name}.safetensors"
        write_factors(path, stream, factor_metadata(name, pool.experts[name].config, spec, c.dtype, bits,
                                                    c.group_size))
        factors.append((load_factors(path), stream.stats["totals"]))
    return factors


def score_setting(val, model, weights, heads, reference):
    """(true_routing, twin_router, per-task scores) of one routed model on the validation pool."""
    n, gold = len(val.names), val.task_ids
    true = val.score_logits(val.routed_logits(model, gold_one_hot(gold, n), gold, 1, desc=None), gold)
    router = val.score_logits(val.routed_logits(model, weights, heads, None, desc=None), heads)
    return mean_normalized(true, reference), mean_normalized(router, reference), {"true_routing": true,
                                                                                  "twin_router": router}


def plot(rows: list[dict], chosen: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for bits, colour in ((16, "tab:blue"), (8, "tab:orange"), (4, "tab:green"), ("mixed", "tab:red")):
        for mode, marker in (("fraction", "o"), ("budget_fraction", "s")):
            pts = sorted((r["exclusive_ratio"], r["true_routing"], r["twin_router"]) for r in rows
                         if (r["factor_bits"] == bits or bits == "mixed" and isinstance(r["factor_bits"], list))
                         and r["mode"] == mode)
            if not pts:
                continue
            x, true, router = zip(*pts)
            name = f"{'float16' if bits == 16 else bits if bits == 'mixed' else f'int{bits}'} {mode.replace('_', ' ')}"
            ax.plot(x, true, marker=marker, color=colour, label=f"{name}: true routing")
            ax.plot(x, router, marker=marker, color=colour, linestyle="--", label=f"{name}: router")
    best = next(r for r in rows if r["setting"] == chosen)
    ax.axvline(best["exclusive_ratio"], color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("exclusive knowledge, % of dense float32 task vectors (log)")
    ax.set_ylabel("mean normalised score (validation)")
    ax.set_title(f"Twin-Merging storage vs score; chosen {chosen}")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", default=DEFAULT_POINTS, help="comma-separated bits:mode:value settings")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tolerance", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--add", action="store_true",
                    help="keep the rows of an earlier run in <out>/storage_curve.json (same artifacts), measure "
                         "only the settings it lacks")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    points = list(dict.fromkeys([REFERENCE, *args.points.split(",")]))
    earlier = Path(args.out) / "storage_curve.json"
    kept = json.loads(earlier.read_text()) if args.add and earlier.is_file() else {"rows": [], "per_task": {}}
    params = load_params("params.yaml")
    pool = open_pool(params)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained("artifacts/base")
    val = task_pool(params, pool, "validation", tokenizer)
    reference = json.loads(Path("artifacts/eval/experts.json").read_text())["validation"]
    ctx = Context(pool, val, reference, val, params.seed, None, Path("artifacts"), params.evaluate.temperature,
                  params.evaluate.top_k, False)
    weights = TwinMerging().router_weights(ctx, val.texts)
    heads = weights.argmax(1)
    first = pool.names[0]
    rows, per_task = list(kept["rows"]), dict(kept["per_task"])
    for point in [p for p in points if p not in per_task]:
        start = time.perf_counter()
        bits, mode, value = parse_point(point)
        with tempfile.TemporaryDirectory() as tmp:
            loaded = compress_all(params, pool, bits, mode, value, Path(tmp))
        backbone = assemble_classifier(pool.experts[first].config, {**load_shared("artifacts/shared"),
                                                                    **expert_heads(pool, first)})
        model = RoutedDeltaModel(backbone, [f for f, _ in loaded])
        true, router, per_task[point] = score_setting(val, model, weights, heads, reference)
        stored = sum(t["exclusive_bytes"] for _, t in loaded)
        dense = sum(t["dense_bytes_float32"] for _, t in loaded)
        rows.append({"setting": point, "factor_bits": bits, "mode": mode, "value": value, "exclusive_bytes": stored,
                     "dense_bytes": dense, "exclusive_ratio": round(100 * stored / dense, 4),
                     "true_routing": round(true, 4), "twin_router": round(router, 4),
                     "seconds": round(time.perf_counter() - start, 1)})
        print(" ".join(f"{k}={rows[-1][k]}" for k in FIELDS), flush=True)
    ref = next(r for r in rows if r["setting"] == REFERENCE)
    ok = [r for r in rows if r["true_routing"] >= ref["true_routing"] - args.tolerance]
    chosen = min(ok, key=lambda r: (r["exclusive_ratio"], -r["true_routing"]))["setting"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "storage_curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["exclusive_ratio"]))
    (out / "storage_curve.json").write_text(json.dumps(
        {"split": "validation (selection subset)", "reference": REFERENCE, "tolerance": args.tolerance,
         "chosen": chosen, "rows": rows, "per_task": per_task}, indent=2))
    plot(rows, chosen, out / "storage_curve.png")
    print(f"chosen (smallest bytes within {args.tolerance} of {REFERENCE}, true routing, validation): {chosen}")


if __name__ == "__main__":
    main()
