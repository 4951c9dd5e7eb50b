"""tasks/report.py on a synthetic 20-row, 6-task metrics dict: PNGs, row order, Pareto front, label placement,
the CSVs for `dvc plots` and the markdown table (no pipeline run)."""
import csv
import itertools
import random

import pytest

from tasks import report

TASKS = ["movie", "tweet", "bbc", "fortune_topic", "langid", "wordnet"]
ROWS = ["experts", "base_heads", "weight_average", "task_arithmetic", "ties", "dare", "tsv_m", "iso_c", "iso_cts",
        "shared", "twin_router", "twin_oracle", "twin_true_routing", "emr_oracle", "emr_router",
        "layerwise_router", "layerwise_oracle", "knots", "localize_stitch", "pcb_merging"]
MIB = 2 ** 20


def synthetic_metrics(seed: int = 0) -> dict:
    """20 rows x 6 tasks; a few rows lack the optional fields, one has a None score, several share bytes."""
    rng = random.Random(seed)
    methods = {}
    for i, name in enumerate(ROWS):
        uses = name not in {"twin_router", "emr_router", "layerwise_router", "twin_true_routing"}
        normalized = {t: (100.0 if name == "experts" else rng.uniform(20, 104)) for t in TASKS}
        if name == "pcb_merging":
            normalized["wordnet"] = None
        values = [v for v in normalized.values() if v is not None]
        row = {"label": f"{name.replace('_', ' ').title()} (synthetic)", "method": name, "uses_task_id": uses,
               "reference": None, "data": "validation_inputs",
               "stored_bytes": int(rng.choice([87, 87, 120, 125, 160, 300, 520]) * MIB + (i % 3) * MIB),
               "scores": {t: (v or 0) * 0.7 for t, v in normalized.items()}, "normalized": normalized,
               "mean_score": 50.0, "mean_normalized": sum(values) / len(values)}
        methods[name] = row
    methods["experts"]["stored_bytes"] = 520 * MIB
    for name in ("knots", "localize_stitch"):  # optional fields missing
        for key in ("reference", "data", "stored_bytes"):
            del methods[name][key]
    confusion = [[50 if r == c else 2 for c in range(len(TASKS))] for r in range(len(TASKS))]
    return {"tasks": TASKS, "metric": {t: "accuracy" for t in TASKS}, "methods": methods,
            "choices": {"ties": {"options": {"density": 0.2}, "validation_mean_normalized": 68.4}},
            "routing": {"experts": TASKS, "accuracy": 0.97, "holdout_accuracy": 0.96,
                        "per_task": {t: 0.97 for t in TASKS}, "confusion": confusion},
            "storage": {}}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import json

    folder = tmp_path_factory.mktemp("report")
    metrics = synthetic_metrics()
    (folder / "metrics.json").write_text(json.dumps(metrics))
    report.build_report(folder / "metrics.json", folder / "out")
    return metrics, folder / "out"


def test_pngs_written_and_sized(built):
    from PIL import Image

    _, out = built
    for name, min_h in ((report.HEATMAP_PNG, 500), (report.PARETO_PNG, 400), (report.CONFUSION_PNG, 300)):
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            assert im.format == "PNG"
            w, h = im.size
        assert 400 <= w <= 3000 and min_h <= h <= 3000, (name, im.size)
    with Image.open(out / report.HEATMAP_PNG) as im:
        assert im.size[1] > im.size[0] * 0.6  # 20 rows: the figure grew in height


def test_markdown_has_new_columns_and_pngs(built):
    metrics, out = built
    text = (out / "report.md").read_text()
    assert "| method | " + " | ".join(TASKS) + " | mean | task id at inference | stored (MiB) |" in text
    assert "| **Twin Router (synthetic)** |" in text
    twin = next(line for line in text.splitlines() if line.startswith("| **Twin Router"))
    assert twin.endswith(f" | no | {metrics['methods']['twin_router']['stored_bytes'] / MIB:.1f} |")
    knots = next(line for line in text.splitlines() if line.startswith("| Knots"))
    assert knots.endswith(" | yes | - |")
    for png in (report.HEATMAP_PNG, report.PARETO_PNG, report.CONFUSION_PNG):
        assert f"({png})" in text


def test_row_order_by_mean_best_first():
    methods = {"a": {"mean_normalized": 50.0}, "b": {"mean_normalized": None}, "c": {"mean_normalized": 90.0},
               "d": {"mean_normalized": 50.0}, "e": {"mean_normalized": 101.0}}
    assert report.row_order(methods) == ["e", "c", "a", "d", "b"]


def test_heatmap_csv_rows_follow_order(built):
    metrics, out = built
    with open(out / "heatmap.csv") as f:
        rows = list(csv.DictReader(f))
    order = report.row_order(metrics["methods"])
    assert len(rows) == len(ROWS) * (len(TASKS) + 1)
    assert [r["method"] for r in rows[::len(TASKS) + 1]] == order
    means = [float(r["normalized"]) for r in rows if r["task"] == "mean"]
    assert means == sorted(means, reverse=True)
    assert next(r for r in rows if r["method"] == "pcb_merging" and r["task"] == "wordnet")["normalized"] == ""
    assert {r["task"] for r in rows} == set(TASKS) | {"mean"}


def test_pareto_csv(built):
    metrics, out = built
    with open(out / "pareto.csv") as f:
        rows = list(csv.DictReader(f))
    with_bytes = [k for k, m in metrics["methods"].items() if "stored_bytes" in m]
    assert [r["method"] for r in rows] == with_bytes
    points = {k: (m.get("stored_bytes"), m["mean_normalized"]) for k, m in metrics["methods"].items()}
    assert {r["method"] for r in rows if r["pareto"] == "True"} == set(report.pareto_front(points))
    experts = next(r for r in rows if r["method"] == "experts")
    assert float(experts["stored_mib"]) == 520.0 and experts["uses_task_id"] == "True"


def test_pareto_front_hand_made():
    points = {"small_bad": (10, 40.0), "small_good": (10, 60.0),   # equal bytes: only the better one
              "mid_same": (20, 60.0),                              # same score, more bytes: dominated
              "mid_better": (30, 80.0), "twin_a": (50, 90.0), "twin_b": (50, 90.0),  # identical: both stay
              "big_worse": (100, 85.0), "biggest": (200, 100.0), "no_bytes": (None, 99.0), "no_score": (5, None)}
    assert report.pareto_front(points) == ["small_good", "mid_better", "twin_a", "twin_b", "biggest"]
    assert report.pareto_front({}) == []
    assert report.pareto_front({"only": (1, 1.0)}) == ["only"]


def test_place_labels_no_overlap_on_crowded_set():
    rng = random.Random(1)
    anchors = [(100 + rng.uniform(0, 60), 100 + rng.uniform(0, 40)) for _ in range(25)]
    anchors += [(130.0, 120.0)] * 5  # identical points
    sizes = [(rng.uniform(30, 90), 10.0) for _ in anchors]
    markers = [(x - 5, y - 5, x + 5, y + 5) for x, y in anchors]
    centers = report.place_labels(anchors, sizes, obstacles=markers, bounds=(0, 0, 400, 300))
    boxes = [report._box(c, s) for c, s in zip(centers, sizes)]
    for a, b in itertools.combinations(boxes, 2):
        assert not report.boxes_overlap(a, b), (a, b)
    for box in boxes:
        assert not any(report.boxes_overlap(box, m) for m in markers)
        assert box[0] >= 0 and box[1] >= 0 and box[2] <= 400 and box[3] <= 300
    assert centers == report.place_labels(anchors, sizes, obstacles=markers, bounds=(0, 0, 400, 300))


def test_place_labels_leaves_bounds_when_full():
    anchors = [(50.0, 50.0)] * 6
    sizes = [(40.0, 10.0)] * 6
    centers = report.place_labels(anchors, sizes, bounds=(0, 0, 100, 100))
    boxes = [report._box(c, s) for c, s in zip(centers, sizes)]
    assert not any(report.boxes_overlap(a, b) for a, b in itertools.combinations(boxes, 2))


def test_rows_without_optional_fields_render(tmp_path):
    metrics = synthetic_metrics(seed=3)
    for m in metrics["methods"].values():
        for key in ("reference", "data", "stored_bytes", "uses_task_id"):
            m.pop(key, None)
    report.plot_all(metrics, tmp_path)
    assert (tmp_path / report.PARETO_PNG).stat().st_size > 1000
    assert (tmp_path / "pareto.csv").read_text().strip() == \
        "method,label,stored_mib,mean_normalized,uses_task_id,pareto"
    assert " | - | - |\n" in report.markdown_report(metrics)  # task id unknown, no storage


def test_learning_section_flags_tasks_below_the_base_and_left_out_tasks():
    """A learning entry's rows (static `<key>`, routed `<key>_<mode>`, not another entry `<key>_tta`) are compared
    with the unmerged base row per task; the tasks below it and the ones its objective left out are said."""
    m = synthetic_metrics()
    base = m["methods"]["base_heads"]["normalized"]
    for name, row in (("ada", {t: base[t] + 1 for t in TASKS}), ("ada_tta", {t: 0.0 for t in TASKS}),
                      ("moe_router", {**{t: base[t] + 1 for t in TASKS}, "bbc": base["bbc"] - 1})):
        m["methods"][name] = {**m["methods"]["ties"], "normalized": row}
    curve = {"learning": {"steps": 2, "curve": [3.0, 2.5]}}
    m["choices"] = {"ada": {**curve, "objective": "entropy"}, "ada_tta": dict(curve),
                    "moe": {**curve, "objective": "entropy", "not_learned_from": ["langid"], "why_not": "regression"}}
    lines = report._learning(m["choices"], m["methods"], TASKS)
    ada, tta, moe = (next(x for x in lines if x.startswith(f"- `{k}`")) for k in ("ada", "ada_tta", "moe"))
    assert ada == "- `ada`: entropy, 2 steps, loss 3.0 -> 2.5"
    assert "below the unmerged base model on " + ", ".join(sorted(TASKS)) in tta
    assert "**below the unmerged base model on bbc**" in moe and "not learned from langid (regression)" in moe
