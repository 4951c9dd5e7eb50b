"""Evaluation history: one JSON line per evaluation in `history/evaluations.jsonl` (git-tracked, not a DVC out).

A record: {time (UTC ISO), metrics_sha256, params_sha256, experts {name: {task, hash}}, tasks,
methods {method: {scores, normalized, mean_normalized}}}. Expert hashes are the content fingerprints of
`tasks.registry` (read from the download manifests, i.e. exactly what was evaluated).

Who appends: the `report` stage (`twinmerge report`) appends the record of `artifacts/eval/metrics.json`
before it renders, so every evaluation is recorded however the pipeline runs (flow, `dvc repro`). The append
is idempotent: nothing is written when the last record already has the same metrics and params hashes. The
file is a dependency of the report stage that the stage itself appends to: DVC hashes dependencies after the
command, so `dvc status` stays clean, and since the file only grows, the run-cache never restores an old
report. `history_section` renders the change against the previous evaluation for the report.
"""
import hashlib
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

HISTORY_PATH = "history/evaluations.jsonl"
# params.yaml sections that change what is evaluated (`watch` only schedules runs).
PARAMS_SECTIONS = ("seed", "base", "data", "zoo", "hub_sources", "experts", "merge", "compress", "router", "evaluate")


def metrics_digest(metrics: dict) -> str:
    return hashlib.sha256(json.dumps(metrics, sort_keys=True).encode()).hexdigest()


def params_digest(params_path: str | Path = "params.yaml") -> str:
    """sha256 of the params sections that matter (validated, defaults filled, canonical JSON)."""
    from tasks.params import load_params

    data = load_params(params_path).model_dump(mode="json")
    return hashlib.sha256(json.dumps({k: data.get(k) for k in PARAMS_SECTIONS}, sort_keys=True).encode()).hexdigest()


def expert_hashes(params_path: str | Path = "params.yaml", checkpoints_dir: str | Path = "artifacts/checkpoints") -> dict:
    from tasks.params import load_params
    from tasks.registry import folder_fingerprint, manifest_fingerprint

    params = load_params(params_path)
    out = {}
    for name, spec in params.experts.items():
        h = manifest_fingerprint(Path(checkpoints_dir) / name / "manifest.json") or folder_fingerprint(spec.path)
        out[name] = {"task": spec.task, "hash": h}
    return out


def make_record(metrics: dict, params_path: str | Path = "params.yaml",
                checkpoints_dir: str | Path = "artifacts/checkpoints", now: str | None = None) -> dict:
    return {"time": now or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "metrics_sha256": metrics_digest(metrics),
            "params_sha256": params_digest(params_path),
            "experts": expert_hashes(params_path, checkpoints_dir),
            "tasks": list(metrics["tasks"]),
            "methods": {m: {"scores": r["scores"], "normalized": r["normalized"],
                            "mean_normalized": r["mean_normalized"]} for m, r in metrics["methods"].items()}}


def read_history(path: str | Path = HISTORY_PATH) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d: not a JSON record, skipped", p, i)
    return out


def append_record(record: dict, path: str | Path = HISTORY_PATH) -> bool:
    """Append `record` unless the last record has the same metrics and params hashes. True when written."""
    records = read_history(path)
    if records and all(records[-1].get(k) == record[k] for k in ("metrics_sha256", "params_sha256")):
        return False
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    prefix = "" if not p.is_file() or p.read_bytes()[-1:] in (b"", b"\n") else "\n"
    with open(p, "a") as f:  # one write of one line
        f.write(prefix + json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return True


def previous_record(records: list[dict], metrics: dict) -> dict | None:
    """The evaluation before the current one: the last record, or the one before it when the last record is
    the current evaluation itself (same metrics hash)."""
    if records and records[-1].get("metrics_sha256") == metrics_digest(metrics):
        records = records[:-1]
    return records[-1] if records else None


def _f(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def _d(x) -> str:
    return "-" if x is None else f"{x:+.1f}"


def regressions(prev: dict, metrics: dict, threshold: float) -> list[tuple[str, str, float, float]]:
    """(method, task, previous, now) for every method/task whose normalised score fell by > threshold points."""
    out = []
    for method, row in metrics["methods"].items():
        if method == "experts":  # 100 by definition
            continue
        before = prev.get("methods", {}).get(method, {}).get("normalized", {})
        for task, now in row["normalized"].items():
            old = before.get(task)
            if old is not None and now is not None and now < old - threshold:
                out.append((method, task, old, now))
    return out


def history_section(history_path: str | Path, metrics: dict, threshold: float) -> str:
    """Markdown: mean normalised score per method (previous -> now, delta) and the regression flags."""
    records = read_history(history_path)
    prev = previous_record(records, metrics)
    lines = ["## Change against the previous evaluation", ""]
    if prev is None:
        return "\n".join(lines + ["First recorded evaluation: nothing to compare with yet."])
    before, now = set(prev.get("experts", {})), set(metrics["tasks"])
    changed = sorted(n for n in before & now if n in prev["experts"]
                     and _now_hash(n) not in (None, prev["experts"][n].get("hash")))
    lines += [f"Previous evaluation: {prev.get('time', '?')} ({len(records)} recorded). Experts added: "
              f"{', '.join(sorted(now - before)) or 'none'}; removed: {', '.join(sorted(before - now)) or 'none'}"
              + (f"; changed: {', '.join(changed)}" if changed else "") + ".", "",
              "| method | previous mean normalised | now | delta |", "|---|---|---|---|"]
    for method, row in metrics["methods"].items():
        old = prev.get("methods", {}).get(method, {}).get("mean_normalized")
        new = row["mean_normalized"]
        delta = None if old is None or new is None else new - old
        lines.append(f"| {method} | {_f(old)} | {_f(new)} | {_d(delta)} |")
    flagged = regressions(prev, metrics, threshold)
    lines.append("")
    if flagged:
        lines += [f"**Regressions** (normalised score fell by more than {threshold:g} points):", ""]
        lines += [f"- REGRESSION {m} / {t}: {_f(a)} -> {_f(b)} ({_d(b - a)})" for m, t, a, b in flagged]
    else:
        lines.append(f"No task's normalised score fell by more than {threshold:g} points.")
    return "\n".join(lines)


def _now_hash(name: str) -> str | None:
    from tasks.registry import manifest_fingerprint

    return manifest_fingerprint(Path("artifacts/checkpoints") / name / "manifest.json")


def record_and_render_section(metrics_path: str | Path, params_path: str | Path = "params.yaml",
                              history_path: str | Path = HISTORY_PATH, append: bool = True) -> str:
    """What `twinmerge report` does with the history: append this evaluation (idempotent), return the section."""
    from tasks.params import load_params

    metrics = json.loads(Path(metrics_path).read_text())
    threshold = load_params(params_path).evaluate.regression_threshold if Path(params_path).is_file() else 2.0
    if append:
        written = append_record(make_record(metrics, params_path), history_path)
        log.info("%s: %s", history_path, "evaluation appended" if written else "evaluation already recorded")
    return history_section(history_path, metrics, threshold) if Path(history_path).is_file() else ""


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=["append", "show"])
    parser.add_argument("--metrics", default="artifacts/eval/metrics.json")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--history", default=HISTORY_PATH)


def main(args) -> None:
    if args.action == "append":
        metrics = json.loads(Path(args.metrics).read_text())
        written = append_record(make_record(metrics, args.params), args.history)
        print(f"{args.history}: {'appended' if written else 'already recorded (nothing appended)'}")
    else:
        for r in read_history(args.history):
            means = ", ".join(f"{m} {_f(v['mean_normalized'])}" for m, v in r["methods"].items() if m != "experts")
            print(f"{r['time']}  experts={len(r['experts'])}  params={r['params_sha256'][:10]}  {means}")
