"""Step `report`: `artifacts/eval/metrics.json` -> `artifacts/report/report.md` + three PNG plots.

Plots: normalised score per task per method (grouped bars), the router's confusion matrix on the test
splits, and storage (bytes kept beside the shared model) against mean normalised score.
"""
import json
from pathlib import Path

from twinmerge.io import atomic_write, write_text_atomic

def _label(name: str, method: dict) -> str:
    """The row's label from metrics.json; the headline row (no task id at inference) in bold."""
    label = method.get("label", name)
    return f"**{label}**" if name == "twin_router" else label


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def markdown_report(metrics: dict, history_section: str = "") -> str:
    """The comparison table (normalised scores per task, mean), raw scores, routing and storage as markdown."""
    tasks = metrics["tasks"]
    methods = metrics["methods"]
    lines = ["# Twin-Merging report", "",
             "Normalised score = 100 x score(method, task) / score(expert, task); the mean is over tasks.", "",
             "| method | " + " | ".join(tasks) + " | mean |", "|---" * (len(tasks) + 2) + "|"]
    for name, m in methods.items():
        cells = [_fmt(m["normalized"].get(t)) for t in tasks]
        lines.append(f"| {_label(name, m)} | " + " | ".join(cells) + f" | {_fmt(m['mean_normalized'])} |")
    lines += ["", "Raw test scores (x100; metric per task: "
              + ", ".join(f"{t}: {metrics['metric'][t]}" for t in tasks) + ")", "",
              "| method | " + " | ".join(tasks) + " | mean |", "|---" * (len(tasks) + 2) + "|"]
    for name, m in methods.items():
        cells = [_fmt(m["scores"].get(t)) for t in tasks]
        lines.append(f"| {_label(name, m)} | " + " | ".join(cells) + f" | {_fmt(m['mean_score'])} |")
    if metrics.get("choices"):
        lines += ["", "Baseline options chosen on validation data:", ""]
        for name, choice in metrics["choices"].items():
            if choice.get("validation_mean_normalized") is None:
                continue
            opts = ", ".join(f"{k}={v}" for k, v in choice["options"].items())
            lines.append(f"- {_label(name, methods.get(name, {}))}: {opts} (validation mean normalised "
                         f"{choice['validation_mean_normalized']:.1f})")
    routing = metrics.get("routing")
    if routing:
        lines += ["", f"Routing accuracy on test: {100 * routing['accuracy']:.1f}% "
                  f"(router holdout on validation: {100 * routing['holdout_accuracy']:.1f}%)", "",
                  "| task | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|",
                  "| routing accuracy | " + " | ".join(f"{100 * routing['per_task'][t]:.1f}" for t in tasks) + " |"]
    storage = metrics.get("storage")
    if storage:
        lines += ["", f"Exclusive knowledge: {storage['exclusive_bytes'] / 2**20:.2f} MiB of factors vs "
                  f"{storage['dense_exclusive_bytes'] / 2**20:.2f} MiB dense float32 "
                  f"({100 * storage['exclusive_ratio']:.1f}%); all experts dense: "
                  f"{methods['experts']['stored_bytes'] / 2**20:.1f} MiB."]
    if history_section:
        lines += ["", history_section]
    lines += ["", "![normalised scores](normalized_scores.png)", "", "![routing](routing_confusion.png)", "",
              "![storage vs score](storage_vs_score.png)", ""]
    return "\n".join(lines)


def _save_fig(fig, path: Path) -> None:
    """Save a figure as PNG through the atomic writer (temporary beside the target, then rename)."""
    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    atomic_write(path, write)


def plot_all(metrics: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks, methods = metrics["tasks"], metrics["methods"]
    names = [m for m in methods if m != "experts"]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(tasks)), 4.5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        vals = [methods[name]["normalized"].get(t) or 0.0 for t in tasks]
        ax.bar(np.arange(len(tasks)) + i * width, vals, width, label=_label(name, methods[name]).strip("*"))
    ax.axhline(100, color="k", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks)
    ax.set_ylabel("normalised score")
    ax.legend(fontsize=7, ncol=2)
    _save_fig(fig, out_dir / "normalized_scores.png")
    plt.close(fig)

    routing = metrics.get("routing") or {}
    confusion = np.array(routing.get("confusion", [[0]]), dtype=float)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    rows = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    experts = routing.get("experts", tasks)
    ax.set_xticks(range(len(experts)), experts, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("routed to (argmax)")
    ax.set_ylabel("true task")
    for (r, c), v in np.ndenumerate(rows):
        if v >= 0.005:
            ax.text(c, r, f"{100 * v:.0f}", ha="center", va="center", fontsize=7, color="w" if v > 0.5 else "k")
    fig.colorbar(im)
    _save_fig(fig, out_dir / "routing_confusion.png")
    plt.close(fig)

    storage = metrics.get("storage") or {}
    fig, ax = plt.subplots(figsize=(5.5, 4))
    points = {name: (storage.get("bytes_by_method", {}).get(name), methods[name]["mean_normalized"])
              for name in methods}
    for name, (size, score) in points.items():
        if size is not None and score is not None:
            ax.scatter(size / 2**20, score)
            ax.annotate(name, (size / 2**20, score), fontsize=7)
    ax.set_xlabel("parameters stored (MiB)")
    ax.set_ylabel("mean normalised score")
    _save_fig(fig, out_dir / "storage_vs_score.png")
    plt.close(fig)


def build_report(metrics_path: str | Path, out_dir: str | Path, history_section: str = "") -> Path:
    metrics = json.loads(Path(metrics_path).read_text())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_all(metrics, out_dir)
    report = out_dir / "report.md"
    write_text_atomic(markdown_report(metrics, history_section), report)
    return report


def add_arguments(parser) -> None:
    parser.add_argument("--metrics", default="artifacts/eval/metrics.json")
    parser.add_argument("--out", default="artifacts/report")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--history", default="history/evaluations.jsonl",
                        help="evaluation history (tasks/history.py): this evaluation is appended, then compared")
    parser.add_argument("--no-history", action="store_true", help="neither append to nor show the history")


def main(args) -> None:
    section = ""
    if not args.no_history and Path(args.history).parent.is_dir():
        from tasks.history import record_and_render_section

        section = record_and_render_section(args.metrics, args.params, args.history)
    print(build_report(args.metrics, args.out, history_section=section))
