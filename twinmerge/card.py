"""The bundle's model card: `README.md` in Hugging Face's layout (a YAML metadata block, then Markdown), so a
bundle pushed to a Hub repository reads like any model repository there.

Sections: what the bundle is, the test scores of the routed model (strict router heads: no task id) beside each
task's expert, routing accuracy per task, the bytes stored per part, and how to load it. Every number is read
from the evaluation's metrics.json or measured on the bundle's own files; nothing is typed in.
"""
from pathlib import Path
from typing import Mapping

import yaml

ROUTED_ROW = "twin_router"  # metrics.json's row for the bundle's own serving mode (router weights + heads)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file())


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _metadata(base_model: str | None, generative: bool = False) -> str:
    task = "text-generation" if generative else "text-classification"
    meta = {"library_name": "twinmerge", "pipeline_tag": task, "tags": ["twin-merging", "model-merging", task]}
    if base_model:
        meta["base_model"] = base_model
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _results(meta: Mapping, metrics: Mapping) -> list[str]:
    """Per expert's task: metric, the expert's score, the routed model's score and normalised score, routing
    accuracy; then the means. Experts whose task metrics.json lacks are left out (named below the table)."""
    methods = metrics.get("methods", {})
    routed, experts = methods.get(ROUTED_ROW), methods.get("experts")
    if routed is None or experts is None:
        return ["No evaluation of this bundle's experts was given (metrics.json lacks the "
                f"`experts` or `{ROUTED_ROW}` row)."]
    per_task = metrics.get("routing", {}).get("per_task", {})
    lines = [f"Test split, {routed['label']}.", "",
             "| expert | task | metric | expert's score | routed score | normalised | routing accuracy |",
             "|---|---|---|---:|---:|---:|---:|"]
    missing = []
    for name in meta["experts"]:
        task = meta["tasks"][name]
        if task not in routed["scores"]:
            missing.append(name)
            continue
        acc = per_task.get(name)
        lines.append(f"| {name} | {task} | {metrics['metric'].get(task, '')} | {experts['scores'][task]:.2f} "
                     f"| {routed['scores'][task]:.2f} | {routed['normalized'][task]:.2f} "
                     f"| {'' if acc is None else f'{100 * acc:.2f}%'} |")
    accuracy = metrics.get("routing", {}).get("accuracy")
    lines.append(f"| **mean** | | | {experts['mean_score']:.2f} | {routed['mean_score']:.2f} "
                 f"| {routed['mean_normalized']:.2f} | {'' if accuracy is None else f'{100 * accuracy:.2f}%'} |")
    if missing:
        lines += ["", f"Not evaluated: {', '.join(missing)}."]
    return lines


def model_card(folder: str | Path, meta: Mapping, metrics: Mapping | None, base_model: str | None,
               name: str | None = None) -> str:
    """README.md text for the bundle in `folder` (its files already in place), to be loaded as `name`
    (default: the folder's name).

    meta: twin.json's fields (experts, tasks, labels, ...); metrics: the evaluation's metrics.json or None;
    base_model: the base's Hub repo id when it has one (metadata `base_model`), else None.
    """
    folder = Path(folder)
    name = name or folder.name
    parts = {"shared expert (`shared/`)": _folder_bytes(folder / "shared"),
             **{f"exclusive factors of {n} (`exclusive/{n}.safetensors`)":
                (folder / "exclusive" / f"{n}.safetensors").stat().st_size for n in meta["experts"]},
             "router (`router/`)": _folder_bytes(folder / "router")}
    storage = (metrics or {}).get("storage", {})
    generative = meta.get("generative", False)
    lines = [_metadata(base_model, generative),
             "# Twin-Merging bundle", "",
             f"One shared expert and the exclusive knowledge of {len(meta['experts'])} experts "
             f"({', '.join(meta['experts'])}), stored as truncated-SVD factors and merged per input by a router "
             "([Twin-Merging](https://arxiv.org/abs/2406.15479), Lu et al., NeurIPS 2024). The router reads the "
             "input only: no task id is given at inference.", "",
             "## Results", "", *(_results(meta, metrics) if metrics else ["No evaluation was given."]), "",
             "## Stored bytes", "", "| part | bytes | size |", "|---|---:|---:|",
             *(f"| {part} | {n} | {_mib(n)} |" for part, n in parts.items()),
             f"| **total** | {sum(parts.values())} | {_mib(sum(parts.values()))} |"]
    if "exclusive_ratio" in storage:
        lines += ["", f"The exclusive factors hold {100 * storage['exclusive_ratio']:.2f}% of the bytes of the "
                      "experts' dense float32 task vectors."]
    example, what = (("a prompt", "per prompt: routed expert, task, weights, generation") if generative else
                     ("a text to classify", "per text: routed expert, task, weights, label"))
    lines += ["", "## How to load", "",
              "With this project installed (`pip install -e .` in its repository), from the folder that holds "
              f"`{name}/`:", "", "```bash",
              f"twinmerge predict --bundle {name} \"{example}\"", "```", "", "```python",
              "from twinmerge.bundle import TwinBundle", "",
              f"bundle = TwinBundle.load(\"{name}\")",
              f"bundle.predict([\"{example}\"])  # {what}", "```",
              "", "`twin.json` lists the experts in routing order, their tasks" +
              (" and the generation options." if generative else " and label names.")]
    return "\n".join(lines) + "\n"
