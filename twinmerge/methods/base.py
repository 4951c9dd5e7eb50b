"""What every method declares and what it may read (the method interface; registry in `twinmerge.methods`).

A method has a key, a human label, a paper reference, the data it learns or selects from, and:
- static (`StaticMethod`): `build` writes a backbone (an HF folder, `twinmerge.shared` format) into its
  artifact folder; every task is then scored with its own head (the task id picks the head);
- routed (`RoutedMethod`): `build` writes what it stores into its artifact folder, `model` turns that folder
  into a `RoutedDeltaModel` (shared backbone + one delta set per expert), and its `modes` say which weights and
  which head each input gets: from the router (no task id at inference) or from the gold task (task id).
  A method with `generative = True` also serves causal LM experts: `model_lm` gives a `RoutedCausalLM` and
  `generative_modes` its rows (weights only: a causal LM has no heads).
Options and their defaults are read from the signature of `build` (keyword-only arguments after `*`), or for
static merges from the merge function's signature; `grid` entries are chosen on validation data.
The task pool (`twinmerge.taskpool`) scores whatever a method produces, without knowing which method made it.
"""
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from twinmerge.errors import MergeError
from twinmerge.io import ExpertSet
from twinmerge.taskpool import TaskPool

# What a row learned or selected from, in increasing order: nothing; validation inputs with their task ids
# (the router, unsupervised learning); validation labels (options chosen by validation score, supervised
# learning); unlabelled TEST inputs (the test-time adaptation protocol of AdaMerging/Concrete's papers: `_tta`
# rows, never a headline).
# what a row learned or selected from, least to most: nothing; validation inputs with their task ids (the router,
# learned gates); validation labels (a grid choice); the experts' training inputs too (a router of
# `router.splits: [train, validation]`); unlabelled test inputs (test-time adaptation, the paper's protocol)
DATA = ("none", "validation_inputs", "validation_labels", "train_inputs", "test_inputs")


def more_data(*kinds: str) -> str:
    """The most informative of the given DATA kinds."""
    return max(kinds, key=DATA.index)


@dataclass(frozen=True)
class Mode:
    """One evaluation row of a routed method. weights: "router" (softmax routing weights, evaluate's temperature
    and top_k), "router_argmax" (one-hot on the router's choice) or "gold" (one-hot on the input's task);
    heads: "router" (argmax of the router) or "gold" (the input's task)."""

    label: str
    weights: Literal["router", "router_argmax", "gold"]
    heads: Literal["router", "gold"]

    @property
    def uses_task_id(self) -> bool:
        return "gold" in (self.weights, self.heads)

    @property
    def data(self) -> str:
        return "validation_inputs" if "router" in self.weights or self.heads == "router" else "none"


@dataclass
class Context:
    """What a method may read: the expert pool, the validation task pool that grid choices are scored on (a
    seeded subset of each validation split) with the experts' validation scores (normalisation of the selection
    score), the whole validation splits that learning methods learn from (`learn`; never test data), the
    pipeline's artifacts folder (Twin-Merging's shared expert, exclusive factors and router live there),
    evaluation options, the seed and progress display. `test_inputs` (texts only) is given to methods whose
    options ask for the papers' test-time adaptation protocol (`learn_on: test_inputs`)."""

    pool: ExpertSet
    validation: TaskPool
    validation_reference: dict[str, float]
    learn: TaskPool | None = None
    seed: int = 0
    test_inputs: dict[str, list[str]] | None = None  # {task: test texts}, no labels: only for `_tta` rows
    artifacts: Path = Path("artifacts")
    temperature: float = 1.0
    top_k: int | None = None
    progress: bool = True
    generative: bool = False  # causal LM experts: the pools are `twinmerge.genpool.GenerativeTaskPool`s


def option_defaults(fn) -> dict[str, Any]:
    """Keyword-only arguments of `fn` with their defaults (a method's options)."""
    return {p.name: p.default for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}


def check_options(key: str, defaults: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """`options` completed with `defaults`; MergeError naming unknown options."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise MergeError(f"method {key!r}: unknown option(s) {', '.join(unknown)}; known: "
                         f"{', '.join(defaults) or 'none'}")
    return {**defaults, **options}


def nbytes(tensors) -> int:
    """Bytes of the tensors' data (numel x element size)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def backbone_bytes(pool: ExpertSet) -> int:
    """Bytes of one backbone (every mergeable tensor, base dtype)."""
    return nbytes(pool.base_tensor(k) for k in pool.mergeable_keys())


def head_bytes(pool: ExpertSet) -> int:
    """Bytes of every expert's head, each once."""
    return nbytes(pool.expert_tensor(n, k) for n in pool.names for k in pool.head_keys())


def expert_heads(pool: ExpertSet, name: str) -> dict[str, torch.Tensor]:
    """Expert `name`'s head tensors (canonical names)."""
    return {k: pool.expert_tensor(name, k) for k in pool.head_keys()}


def router_bytes(artifacts: Path) -> int:
    """Bytes of the router's weights, with its n-gram member's when it has one (routed rows store them beside
    their deltas)."""
    from twinmerge.char_ngrams import VOCAB_FILE, WEIGHTS_FILE

    folder = Path(artifacts) / "router"
    return sum((folder / name).stat().st_size for name in ("model.safetensors", WEIGHTS_FILE, VOCAB_FILE)
               if (folder / name).is_file())


def result_row(label: str, method: str, reference: str | None, uses_task_id: bool, data: str, stored_bytes: int,
               scores: dict[str, float]) -> dict:
    """One row of a result file (`artifacts/eval/methods/<key>.json`, `experts.json`): what `evaluate` gathers."""
    return {"label": label, "method": method, "reference": reference, "uses_task_id": uses_task_id, "data": data,
            "stored_bytes": stored_bytes, "scores": scores}


def gold_one_hot(task_ids: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(task_ids, n).float()


class RoutedMethod:
    """Base of routed methods: subclasses set key, label, reference, modes and implement `build(ctx, out_dir, *,
    options...) -> info`, `model(ctx, out_dir) -> RoutedDeltaModel` and `stored_bytes(ctx, out_dir)`.

    Routing weights come from the pipeline's router (artifacts/router), on features of the shared expert it was
    trained on (artifacts/shared): the same router for every routed method."""

    kind = "routed"
    key = label = reference = ""
    modes: dict[str, Mode] = {}
    generative_modes: dict[str, Mode] = {}
    data_used = "none"  # what `build` selects or learns from (beyond the router)
    materializable = True  # model(...).materialize(weights, head) gives one input's ordinary model
    generative = False  # whether it also builds causal LMs (generative tasks, `model_lm`)

    @property
    def defaults(self) -> dict[str, Any]:
        return option_defaults(self.build)

    def resolve(self, options: dict) -> dict[str, Any]:
        return check_options(self.key, self.defaults, options)

    def data(self, grid: dict, options: dict | None = None) -> str:
        return more_data(self.data_used, "validation_labels" if grid else "none")

    def static_rows(self, ctx: Context, out_dir: Path) -> dict[str, tuple[str, dict]]:
        """Extra static rows {row: (label, backbone)} (Twin-Merging's shared expert alone); none by default."""
        return {}

    def router_weights(self, ctx: Context, texts: list[str]) -> torch.Tensor:
        """Routing weights [N, n] = softmax(router logits / T), top-k renormalised (evaluate's options)."""
        from transformers import AutoModel

        from twinmerge.router import load_router

        shared = ctx.artifacts / "shared"
        saved = load_router(ctx.artifacts / "router")
        saved.check_feature_model(shared / "model.safetensors")
        return saved.weights(AutoModel.from_pretrained(shared).eval(), texts, ctx.temperature, ctx.top_k,
                             progress=ctx.progress)
