"""The committed results (artifacts/eval/metrics.json, README) obey what the scoring guarantees."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METRICS = json.loads((ROOT / "artifacts/eval/metrics.json").read_text())


ROUTED = sorted({m[:-len("_router")] for m in METRICS["methods"] if m.endswith("_router")
                 and m[:-len("_router")] + "_oracle" in METRICS["methods"]})


@pytest.mark.parametrize("key", ROUTED)
@pytest.mark.parametrize("task", [t for t in METRICS["tasks"] if METRICS["metric"][t] == "accuracy"])
def test_router_rows_never_beat_oracle_rows(key, task):
    """An input routed to its own task gets the same weights and head in both rows; a misrouted one is wrong
    under the router: so, on accuracy, <key>_router <= <key>_oracle."""
    methods = METRICS["methods"]
    assert methods[f"{key}_router"]["scores"][task] <= methods[f"{key}_oracle"]["scores"][task] + 1e-9


def test_every_row_says_what_it_uses_and_stores():
    from twinmerge.methods.base import DATA

    for name, row in METRICS["methods"].items():
        assert row["uses_task_id"] == (not name.endswith("_router")), name
        assert row["data"] in DATA and row["stored_bytes"] > 0, name
        assert (row["data"] == "test_inputs") == name.endswith("_tta") and ("TEST inputs" in row["label"]) == (
            row["data"] == "test_inputs"), name  # the papers' test-time protocol is always named as such
    assert {"emr_oracle", "emr_router", "layerwise_router", "tsv_m", "iso_c", "iso_cts", "adamerging_task",
            "adamerging_layer", "concrete_ta", "concrete_adamerging", "wemoe_router", "wemoe_oracle",
            "self_positioning"} <= set(METRICS["methods"])


def test_learning_rows_learned_from_validation_and_show_their_curves():
    """Every learning entry's choice carries its loss curve; only `_tta` rows saw test inputs."""
    learned = {k: c for k, c in METRICS["choices"].items() if c.get("learning")}
    assert {"adamerging_task", "adamerging_layer", "concrete_ta", "concrete_adamerging", "self_positioning",
            "wemoe"} <= set(learned)
    for key, choice in learned.items():
        assert len(choice["learning"]["curve"]) == choice["learning"]["steps"] > 0, key
    rows = METRICS["methods"]
    assert rows["self_positioning"]["data"] == "validation_labels"
    assert {rows[k]["data"] for k in ("adamerging_task", "adamerging_layer", "concrete_ta", "concrete_adamerging",
                                       "wemoe_oracle")} == {"validation_inputs"}


def test_readme_rows_are_the_committed_rows():
    """Every row of the README's results table is the committed metrics row of the same label."""
    by_label = {row["label"]: row for row in METRICS["methods"].values()}
    lines = [line for line in (ROOT / "README.md").read_text().splitlines()
             if line.startswith("| ") and line.strip("| *").split(" |")[0].strip("*") in by_label]
    assert len(lines) == len(by_label)
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        row = by_label[cells[0].strip("*")]
        assert cells[1:len(METRICS["tasks"]) + 2] == [f"{row['normalized'][t]:.1f}" for t in METRICS["tasks"]] + [
            f"{row['mean_normalized']:.1f}"], cells[0]


def test_readme_headline_is_the_strict_router_score():
    """The README's bold Twin-Merging row is the committed twin_router row (no task id at inference)."""
    row = next(line for line in (ROOT / "README.md").read_text().splitlines()
               if line.startswith("| **Twin-Merging"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    router = METRICS["methods"]["twin_router"]
    expected = [f"{router['normalized'][t]:.1f}" for t in METRICS["tasks"]] + [f"{router['mean_normalized']:.1f}"]
    assert cells[1:len(expected) + 1] == expected and cells[len(expected) + 1] == "no"
    assert re.search(r"no task id", cells[0])
