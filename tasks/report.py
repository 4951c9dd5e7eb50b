"""Step `report`: `artifacts/eval/metrics.json` -> `artifacts/report/report.md`, three PNG plots and two CSVs.

Plots: a methods x tasks heatmap of normalised scores (rows best first, mean in the last column), the router's
confusion matrix on the test splits, and stored bytes against mean normalised score with the Pareto front.
`heatmap.csv` and `pareto.csv` carry the same data for `dvc plots` (template `plot_templates/heatmap.json` and
DVC's built-in `scatter`).
"""
import csv
import io
import json
import math
from pathlib import Path

from twinmerge.io import atomic_write, write_text_atomic

HEATMAP_PNG = "normalized_heatmap.png"
PARETO_PNG = "storage_pareto.png"
CONFUSION_PNG = "routing_confusion.png"
DAGGER = " \u2020"  # marks rows that need the task id at inference
MIB = 2 ** 20


def _label(name: str, method: dict) -> str:
    """The row's label from metrics.json; the headline row (no task id at inference) in bold."""
    label = method.get("label", name)
    return f"**{label}**" if name == "twin_router" else label


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def _mib(method: dict) -> float | None:
    size = method.get("stored_bytes")
    return None if size is None else size / MIB


def _short(name: str, method: dict) -> str:
    """Row key for plots, with a dagger when the row uses the task id at inference."""
    return name + (DAGGER if method.get("uses_task_id") else "")


def row_order(methods: dict) -> list[str]:
    """Row keys by mean normalised score, best first; rows without one last; ties keep metrics.json order."""
    keys = list(methods)
    return sorted(keys, key=lambda k: (methods[k].get("mean_normalized") is None,
                                       -(methods[k].get("mean_normalized") or 0.0), keys.index(k)))


def pareto_front(points: dict[str, tuple]) -> list[str]:
    """Keys of the points (bytes, score) that no other point dominates, by bytes ascending.

    q dominates p when q stores no more and scores no less, and is strictly better in one of the two; so of
    equal-bytes points only the best score stays, and identical points all stay. Points with a None are skipped.
    """
    valid = {k: p for k, p in points.items() if p[0] is not None and p[1] is not None}
    front = [k for k, (b, s) in valid.items()
             if not any(qb <= b and qs >= s and (qb, qs) != (b, s) for qb, qs in valid.values())]
    return sorted(front, key=lambda k: (valid[k][0], -valid[k][1]))


def _box(center, size):
    (x, y), (w, h) = center, size
    return (x - w / 2, y - h / 2, x + w / 2, y + h / 2)


def boxes_overlap(a, b) -> bool:
    """Whether two (x0, y0, x1, y1) boxes share more than an edge."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _free_spot(x, y, w, h, taken, bounds, rings, gap, step):
    """The first free label centre around (x, y), ring by ring, or None."""
    for ring in range(rings):
        r = gap + ring * step
        for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, 1), (1, -1), (-1, -1)):
            c = (x + dx * (r + w / 2), y + dy * (r + h / 2))
            box = _box(c, (w, h))
            inside = bounds is None or (box[0] >= bounds[0] and box[1] >= bounds[1]
                                        and box[2] <= bounds[2] and box[3] <= bounds[3])
            if inside and not any(boxes_overlap(box, other) for other in taken):
                return c
    return None


def place_labels(anchors, sizes, obstacles=(), bounds=None, gap=4.0, step=8.0):
    """Deterministic label placement: the centre (display units) of one box per anchor, no two overlapping.

    Each label in turn tries eight directions around its anchor (right, left, up, down, then the diagonals)
    at growing distances, and takes the first box that overlaps neither a label already placed nor an
    obstacle box (x0, y0, x1, y1; the markers); first only boxes inside `bounds`, then anywhere.
    """
    taken, centers = list(obstacles), []
    for (x, y), (w, h) in zip(anchors, sizes):
        spot = bounds is not None and _free_spot(x, y, w, h, taken, bounds, 40, gap, step)
        spot = spot or _free_spot(x, y, w, h, taken, None, 10 ** 5, gap, step)
        taken.append(_box(spot, (w, h)))
        centers.append(spot)
    return centers


def _choices(choices: dict, methods: dict) -> list[str]:
    """Options chosen on validation data per method entry, with every grid point tried (and its stored bytes
    where the choice trades bytes, as layer-wise merging's split does)."""
    lines = ["", "Options chosen on validation data (mean normalised score on the validation splits):", ""]
    for name, choice in choices.items():
        if choice.get("validation_mean_normalized") is None:  # nothing chosen (no grid)
            continue
        label = methods[name]["label"] if name in methods else name
        opts = ", ".join(f"{k}={v}" for k, v in choice.get("options", {}).items())
        tried = "; ".join(
            ", ".join(f"{k}={v}" for k, v in point["options"].items() if k in ("scaling", "split"))
            + f": {_fmt(point['validation_mean_normalized'])}"
            + (f" ({point['stored_bytes'] / MIB:.1f} MiB)" if "stored_bytes" in point else "")
            for point in choice.get("grid", []))
        lines.append(f"- `{name}` ({label}): {opts} (validation {_fmt(choice['validation_mean_normalized'])}"
                     + (f"; tried {tried}" if tried else "") + ")")
    return lines


def _learning(choices: dict, methods: dict, tasks: list[str]) -> list[str]:
    """What each learning method learned from, its steps and first/last loss, and the tasks where it falls
    below the unmerged base model (`base` row) or that its objective could not use: said, not hidden."""
    learned = {k: c for k, c in choices.items() if c.get("learning")}
    if not learned:
        return []
    lines = ["", "Learning methods (learned on the validation splits only; curves: `learning_curves.csv`):", ""]
    base = methods.get("base_heads", {}).get("normalized", {})
    for key, choice in learned.items():
        curve = choice["learning"]["curve"]
        rows = [r for r in methods if r == key or r.startswith(f"{key}_") and r not in choices]  # entry's rows
        below = sorted({t for r in rows for t in tasks
                        if base.get(t) is not None and methods[r]["normalized"].get(t) is not None
                        and methods[r]["normalized"][t] < base[t]})
        text = (f"- `{key}`: {choice.get('objective', 'loss')}, {len(curve)} steps, loss {_fmt(curve[0])} -> "
                f"{_fmt(curve[-1])}")
        if choice.get("not_learned_from"):
            text += f"; not learned from {', '.join(choice['not_learned_from'])} ({choice.get('why_not')})"
        if below:
            text += f"; **below the unmerged base model on {', '.join(below)}**"
        lines.append(text)
    return lines


def markdown_report(metrics: dict, history_section: str = "") -> str:
    """The comparison table (normalised scores per task, mean, task id, storage), raw scores, routing and
    storage as markdown."""
    tasks = metrics["tasks"]
    methods = metrics["methods"]
    lines = ["# Twin-Merging report", "",
             "Normalised score = 100 x score(method, task) / score(expert, task); the mean is over tasks. "
             "Stored = bytes kept to serve every task (backbones, deltas, masks, heads, router).", "",
             "| method | " + " | ".join(tasks) + " | mean | task id at inference | stored (MiB) |",
             "|---" * (len(tasks) + 4) + "|"]
    for name, m in methods.items():
        cells = [_fmt(m["normalized"].get(t)) for t in tasks]
        uses = {True: "yes", False: "no"}.get(m.get("uses_task_id"), "-")
        lines.append(f"| {_label(name, m)} | " + " | ".join(cells)
                     + f" | {_fmt(m.get('mean_normalized'))} | {uses} | {_fmt(_mib(m))} |")
    lines += ["", "Raw test scores (x100; metric per task: "
              + ", ".join(f"{t}: {metrics['metric'][t]}" for t in tasks) + ")", "",
              "| method | " + " | ".join(tasks) + " | mean |", "|---" * (len(tasks) + 2) + "|"]
    for name, m in methods.items():
        cells = [_fmt(m["scores"].get(t)) for t in tasks]
        lines.append(f"| {_label(name, m)} | " + " | ".join(cells) + f" | {_fmt(m.get('mean_score'))} |")
    if metrics.get("choices"):
        lines += _choices(metrics["choices"], methods)
        lines += _learning(metrics["choices"], methods, tasks)
    routing = metrics.get("routing")
    if routing:
        lines += ["", f"Routing accuracy on test: {100 * routing['accuracy']:.1f}% "
                  f"(the router learnt from the {' + '.join(routing.get('splits', ['validation']))} inputs; "
                  f"its holdout there: {100 * routing['holdout_accuracy']:.1f}%)", "",
                  "| task | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|",
                  "| routing accuracy | " + " | ".join(f"{100 * routing['per_task'][t]:.1f}" for t in tasks) + " |"]
    storage = metrics.get("storage") or {}
    if {"exclusive_bytes", "dense_exclusive_bytes", "exclusive_ratio"} <= storage.keys() and "experts" in methods:
        lines += ["", f"Exclusive knowledge: {storage['exclusive_bytes'] / MIB:.2f} MiB of factors vs "
                  f"{storage['dense_exclusive_bytes'] / MIB:.2f} MiB dense float32 "
                  f"({100 * storage['exclusive_ratio']:.1f}%); all experts dense: "
                  f"{methods['experts']['stored_bytes'] / MIB:.1f} MiB."]
    if history_section:
        lines += ["", history_section]
    lines += ["", f"![normalised scores]({HEATMAP_PNG})", "", f"![routing]({CONFUSION_PNG})", "",
              f"![storage vs score]({PARETO_PNG})", ""]
    return "\n".join(lines)


def _csv(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _round(x):
    return "" if x is None else round(x, 2)


def write_plot_csvs(metrics: dict, out_dir: Path) -> None:
    """`heatmap.csv` (method, task, normalized; task `mean` is the row mean), rows best first, `pareto.csv`
    (one line per row with stored_bytes) and `learning_curves.csv` (method entry, step, loss of each learning
    method; header only when none ran)."""
    methods = metrics["methods"]
    order = row_order(methods)
    heat = [[k, t, _round(methods[k]["normalized"].get(t))] for k in order for t in metrics["tasks"]]
    heat += [[k, "mean", _round(methods[k].get("mean_normalized"))] for k in order]
    heat.sort(key=lambda r: order.index(r[0]))
    write_text_atomic(_csv(["method", "task", "normalized"], heat), out_dir / "heatmap.csv")
    points = {k: (m.get("stored_bytes"), m.get("mean_normalized")) for k, m in methods.items()}
    front = set(pareto_front(points))
    rows = [[k, m.get("label", k), round(m["stored_bytes"] / MIB, 3), _round(m.get("mean_normalized")),
             bool(m.get("uses_task_id")), k in front]
            for k, m in methods.items() if m.get("stored_bytes") is not None]
    write_text_atomic(_csv(["method", "label", "stored_mib", "mean_normalized", "uses_task_id", "pareto"], rows),
                      out_dir / "pareto.csv")
    curves = [[key, step, loss] for key, choice in (metrics.get("choices") or {}).items()
              for step, loss in enumerate((choice.get("learning") or {}).get("curve", []))]
    write_text_atomic(_csv(["method", "step", "loss"], curves), out_dir / "learning_curves.csv")


def _save_fig(fig, path: Path) -> None:
    """Save a figure as PNG through the atomic writer (temporary beside the target, then rename)."""
    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=fig.dpi, bbox_inches="tight")
    atomic_write(path, write)


def plot_heatmap(metrics: dict, path: Path) -> None:
    """Methods x tasks heatmap of normalised scores, best row on top, the mean in a last column."""
    import matplotlib.pyplot as plt
    import numpy as np

    tasks, methods = metrics["tasks"], metrics["methods"]
    order = row_order(methods)
    cols = tasks + ["mean"]
    values = np.array([[methods[k]["normalized"].get(t) for t in tasks] + [methods[k].get("mean_normalized")]
                       for k in order], dtype=float)  # None -> nan
    fig, ax = plt.subplots(figsize=(2.6 + 0.95 * len(cols), 1.3 + 0.34 * len(order)), dpi=110)
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.85")
    norm = plt.Normalize(0, 105)
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto")
    for (r, c), v in np.ndenumerate(values):
        red, green, blue, _ = cmap(norm(v)) if not np.isnan(v) else (0.85, 0.85, 0.85, 1)
        dark = 0.2126 * red + 0.7152 * green + 0.0722 * blue < 0.5
        ax.text(c, r, "-" if np.isnan(v) else f"{v:.1f}", ha="center", va="center", fontsize=8,
                color="white" if dark else "black", fontweight="bold" if c == len(tasks) else "normal")
    ax.axvline(len(tasks) - 0.5, color="white", lw=3)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="left", rotation_mode="anchor")
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(order)), [_short(k, methods[k]) for k in order], fontsize=8)
    ax.tick_params(length=0)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="normalised score (100 = expert)")
    if any(methods[k].get("uses_task_id") for k in order):
        ax.annotate("\u2020 uses the task id at inference", (0, 0), xycoords="axes fraction", xytext=(0, -6),
                    textcoords="offset points", fontsize=8, ha="left", va="top")
    _save_fig(fig, path)
    plt.close(fig)


def plot_pareto(metrics: dict, path: Path) -> None:
    """Stored MiB (log x) against mean normalised score; the Pareto front as a step line, labels placed
    by `place_labels` so that none overlaps another label or a marker."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator

    methods = metrics["methods"]
    points = {k: (m.get("stored_bytes"), m.get("mean_normalized")) for k, m in methods.items()}
    keys = [k for k, (b, s) in points.items() if b is not None and s is not None]
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    if not keys:
        ax.text(0.5, 0.5, "no row has stored_bytes", ha="center", transform=ax.transAxes)
        _save_fig(fig, path)
        plt.close(fig)
        return
    xs = {k: points[k][0] / MIB for k in keys}
    ys = {k: points[k][1] for k in keys}
    lo, hi = min(xs.values()), max(xs.values())
    span = max(math.log10(hi / lo), 0.5)
    ax.set_xscale("log")
    ax.set_xlim(lo / 10 ** (0.12 * span), hi * 10 ** (0.12 * span))
    ylo, yhi = min(ys.values()), max(ys.values())
    ax.set_ylim(ylo - 0.1 * max(yhi - ylo, 5), yhi + 0.1 * max(yhi - ylo, 5))
    fx, fy = [xs[k] for k in front], [ys[k] for k in front]
    ax.step(fx + [ax.get_xlim()[1]], fy + fy[-1:], where="post", color="C3", lw=1.5, zorder=1)
    for k in keys:
        on = k in front
        ax.scatter(xs[k], ys[k], marker="s" if methods[k].get("uses_task_id") else "o", s=55 if on else 35,
                   color="C3" if on else "C0", edgecolor="black" if on else "none", zorder=3)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10))))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel("stored to serve every task (MiB, log scale)")
    ax.set_ylabel("mean normalised score")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(handles=[Line2D([], [], color="C3", lw=1.5, marker="o", mec="black", label="Pareto front"),
                       Line2D([], [], ls="", marker="o", color="0.3", label="no task id at inference"),
                       Line2D([], [], ls="", marker="s", color="0.3", label="uses the task id")],
              loc="lower right", fontsize=8)
    missing = len(methods) - len(keys)
    if missing:
        ax.set_title(f"{missing} row(s) without stored_bytes not shown", fontsize=8)

    # Label placement in display pixels: measure each text, then pick free spots; front labels first.
    renderer = fig.canvas.get_renderer()
    order = front + sorted((k for k in keys if k not in front), key=lambda k: (xs[k], -ys[k]))
    texts = [ax.text(0, 0, k, fontsize=7) for k in order]
    sizes = [(b.width + 2, b.height + 2) for b in (t.get_window_extent(renderer) for t in texts)]
    for t in texts:
        t.remove()
    to_px = ax.transData.transform
    anchors = [tuple(to_px((xs[k], ys[k]))) for k in order]
    legend = ax.get_legend().get_window_extent(renderer)
    steps = [tuple(to_px(p)) for p in zip(fx + [ax.get_xlim()[1]], fy + fy[-1:])]
    line = [(min(x0, x1) - 2, y0 - 2, max(x0, x1) + 2, y0 + 2) for (x0, y0), (x1, _) in zip(steps, steps[1:])]
    line += [(x1 - 2, min(y0, y1) - 2, x1 + 2, max(y0, y1) + 2) for (_, y0), (x1, y1) in zip(steps, steps[1:-1])]
    markers = [(x - 5, y - 5, x + 5, y + 5) for x, y in anchors] + line + [tuple(legend.extents)]
    bounds = tuple(ax.get_window_extent(renderer).extents)
    centers = place_labels(anchors, sizes, obstacles=markers, bounds=bounds)
    pt = 72 / fig.dpi
    for k, (px, py), (cx, cy), (w, h) in zip(order, anchors, centers, sizes):
        far = max(abs(cx - px) - w / 2, abs(cy - py) - h / 2) > 7  # leader line when the box is not beside
        ax.annotate(k, (xs[k], ys[k]), xytext=((cx - px) * pt, (cy - py) * pt), textcoords="offset points",
                    ha="center", va="center", fontsize=7, color="C3" if k in front else "black",
                    arrowprops=dict(arrowstyle="-", color="0.6", lw=0.6, shrinkA=0, shrinkB=4) if far else None)
    _save_fig(fig, path)
    plt.close(fig)


def plot_confusion(metrics: dict, path: Path) -> None:
    """The router's confusion matrix on the test splits, rows normalised."""
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = metrics["tasks"]
    routing = metrics.get("routing") or {}
    confusion = np.array(routing.get("confusion", [[0]]), dtype=float)
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
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
    _save_fig(fig, path)
    plt.close(fig)


def plot_all(metrics: dict, out_dir: Path) -> None:
    """The three PNGs and the two CSVs for `dvc plots` into `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    plot_heatmap(metrics, out_dir / HEATMAP_PNG)
    plot_confusion(metrics, out_dir / CONFUSION_PNG)
    plot_pareto(metrics, out_dir / PARETO_PNG)
    write_plot_csvs(metrics, out_dir)


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
