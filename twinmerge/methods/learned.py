"""Static methods that learn how to merge from validation data: AdaMerging, Concrete subspace learning and
Self Positioning. Each learns coefficients (and for Concrete a mask) over the task vectors tau_t with Adam,
working on the merged tensors functionally (`twinmerge.learning`), then saves the merged backbone (scored like
any static merge: task t with its own head), the learned tensors (`learned.safetensors`), the learning curve
(`curve.csv`: step, loss) and `learned.json` (options, objective, tasks left out of it).

Honesty rule: they learn from the validation splits only (`Context.learn`), never from test data. The papers
adapt on unlabelled test inputs (test-time adaptation); here the unsupervised ones minimise the entropy of each
task's own-head predictions on that task's unlabelled VALIDATION inputs (they use the task id to pick the head,
as in the papers), Self Positioning minimises cross-entropy on labelled validation inputs (its probe set).

Steps are few (a 2-core CPU budget: <= 3 min of learning on the default profile), so learning rates are the
papers' scaled by their steps over ours ("travel-matched": Adam moves a parameter by about lr per step, so
lr x steps, the largest distance a coefficient or mask logit can travel, equals the paper's): AdaMerging
1e-3 x 500 -> 0.01 x 50; Concrete 1e-3 x 2000 -> 0.05 x 40 (TA), 1e-3 x 1000 -> 0.0625 x 16 (AdaMerging inner,
both phases); docs/DESIGN.md "Learning methods" has the measurements.
Tasks with a single output (regression heads) have no prediction entropy: the unsupervised objectives leave them
out and say so in `learned.json` and the result's choice.
"""
import csv
import io
import logging
import time
from pathlib import Path

import torch

from twinmerge.errors import MergeError
from twinmerge.io import save_safetensors_atomic, write_json_atomic, write_text_atomic
from twinmerge.learning import FunctionalClassifier, Probe, TaskVectors, entropy, fit
from twinmerge.methods.base import Context, backbone_bytes, check_options, head_bytes, more_data, option_defaults
from twinmerge.methods.static import grid_points
from twinmerge.shared import load_shared, save_shared
from twinmerge.taskpool import summarize

log = logging.getLogger(__name__)


def curve_csv(curve: list[float]) -> str:
    """The learning curve as CSV text: step,loss (one row per step)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", "loss"])
    writer.writerows((i, f"{v:.6g}") for i, v in enumerate(curve))
    return out.getvalue()


class LearnedMethod:
    """Base of the learning static methods. Subclasses set key, label, reference, data_used and implement
    `learn(ctx, setup, **options) -> (backbone, learned tensors, curve, notes)`."""

    kind = "static"
    generative = False  # learns through classification heads
    key = label = reference = ""
    modes: dict = {}
    data_used = "validation_inputs"

    @property
    def defaults(self) -> dict:
        return option_defaults(self.learn)

    def resolve(self, options: dict) -> dict:
        return check_options(self.key, self.defaults, options)

    def variant(self, options: dict) -> str:
        """What distinguishes this entry's rows from other entries of the same method (in its label)."""
        return ""

    def data(self, grid: dict, options: dict | None = None) -> str:
        tta = (options or {}).get("learn_on") == "test_inputs"
        return more_data(self.data_used, "validation_labels" if grid else "none", "test_inputs" if tta else "none")

    def build(self, ctx: Context, out_dir: Path, grid: dict, **options) -> dict:
        """Learn for each grid point (the best validation mean normalised score wins); save the chosen one."""
        if ctx.learn is None:
            raise MergeError(f"method {self.key!r} learns from the validation splits; none given")
        setup = _Setup(ctx)
        tried, best = [], None
        for point in grid_points(grid):
            opts = self.resolve({**options, **point})
            started = time.perf_counter()
            backbone, learned, curve, notes = self.learn(ctx, setup, **opts)
            log.info("%s: learned %s in %.1f s (%d steps)", self.key, point or "defaults",
                     time.perf_counter() - started, len(curve))
            mean = None
            if grid:
                scores = ctx.validation.score_backbone(backbone, f"{self.key} val")
                mean = summarize(scores, ctx.validation_reference)["mean_normalized"]
                tried.append({"options": point, "validation_mean_normalized": mean})
            if best is None or mean > best[0]:
                best = (mean, opts, backbone, learned, curve, notes)
        mean, opts, backbone, learned, curve, notes = best
        save_shared(backbone, ctx.pool, out_dir, {"method": self.key, "options": opts})
        save_safetensors_atomic({k: v.detach().contiguous() for k, v in learned.items()},
                                out_dir / "learned.safetensors")
        write_text_atomic(curve_csv(curve), out_dir / "curve.csv")
        record = {"method": self.key, "options": opts, "steps": len(curve), "loss_first": curve[0] if curve else None,
                  "loss_last": curve[-1] if curve else None, **notes}
        write_json_atomic(record, out_dir / "learned.json")
        return {"choice": {"options": opts, "validation_mean_normalized": mean, "grid": tried, **notes,
                           "learning": {"steps": len(curve), "curve": [round(v, 5) for v in curve]}}}

    def backbone(self, out_dir: Path) -> dict:
        return load_shared(out_dir)

    def stored_bytes(self, ctx: Context, out_dir: Path) -> int:
        """One merged backbone + every task's head (the learned coefficients are folded into the backbone)."""
        return backbone_bytes(ctx.pool) + head_bytes(ctx.pool)


class _Setup:
    """What every learning run needs, built once per stage: task vectors, the functional classifier, the
    per-task head widths and the tensors' index."""

    def __init__(self, ctx: Context):
        self.tv = TaskVectors(ctx.pool)
        self.fc = FunctionalClassifier(ctx.pool)
        self.index = {k: i for i, k in enumerate(self.tv.keys)}
        self.widths = [int(next(t for k, t in h.items() if k.endswith("weight")).shape[0]) for h in self.fc.heads]

    def probe(self, ctx: Context, batch_size: int, max_length: int, learn_on: str = "validation") -> Probe:
        """Seeded batches of the validation splits, or with learn_on "test_inputs" of the test inputs without
        labels (the papers' test-time adaptation; rows say so)."""
        if learn_on == "validation":
            return Probe(ctx.learn.split, ctx.learn.tokenizer, batch_size, max_length, ctx.seed)
        if learn_on != "test_inputs":
            raise MergeError(f"learn_on must be 'validation' or 'test_inputs', not {learn_on!r}")
        if ctx.test_inputs is None:
            raise MergeError("learn_on: test_inputs, but no test inputs were given")
        split = {n: (list(texts), [-1] * len(texts)) for n, texts in ctx.test_inputs.items()}
        return Probe(split, ctx.learn.tokenizer, batch_size, max_length, ctx.seed)

    def unsupervised_tasks(self, ctx: Context) -> tuple[list[int], dict]:
        """Tasks whose head has >= 2 outputs (entropy defined) and a note naming the others."""
        names = ctx.pool.names
        kept = [t for t, w in enumerate(self.widths) if w >= 2]
        left = [names[t] for t in range(len(names)) if t not in kept]
        if not kept:
            raise MergeError("every task has a single-output head: prediction entropy is undefined")
        return kept, ({"not_learned_from": left, "why_not": "single-output (regression) head: no prediction "
                       "entropy"} if left else {})

    def entropy_loss(self, backbone: dict, probe: Probe, tasks: list[int], step: int) -> torch.Tensor:
        """sum over tasks t of the mean entropy of head t's predictions on task t's batch at `step`."""
        return sum(entropy(self.fc.logits(backbone, t, probe.batch(t, step)[0])) for t in tasks)

    def coefficients(self, granularity: str, init: float) -> torch.Tensor:
        """Learnable coefficients: [T] (task-wise) or [K, T] (layer-wise: one per tensor and task), all `init`."""
        if granularity not in ("task", "layer"):
            raise MergeError(f"granularity must be 'task' or 'layer', not {granularity!r}")
        shape = (self.tv.n,) if granularity == "task" else (len(self.tv.keys), self.tv.n)
        return torch.full(shape, float(init), requires_grad=True)

    def coef_fn(self, lam: torch.Tensor):
        return (lambda k: lam) if lam.dim() == 1 else (lambda k: lam[self.index[k]])


def _check_steps(key: str, steps: int, batch_size: int) -> None:
    if steps < 1 or batch_size < 1:
        raise MergeError(f"method {key!r}: steps and batch_size must be >= 1")


class AdaMerging(LearnedMethod):
    """theta = theta_0 + sum_t lambda_t tau_t (task-wise) or theta^k = theta_0^k + sum_t lambda_{k,t} tau_t^k
    with one coefficient per tensor k (layer-wise, as the official code), lambdas initialised to `init`,
    clamped to [0, 1] after each step (official code), learned by minimising sum_t H(task t's predictions)."""

    key = "adamerging"
    label = "AdaMerging"

    def variant(self, options: dict) -> str:
        return f", {self.resolve(options)['granularity']}-wise"
    reference = "Yang et al., AdaMerging: Adaptive Model Merging for Multi-Task Learning, ICLR 2024 (arXiv 2310.02575)"

    def learn(self, ctx: Context, setup: _Setup, *, granularity: str = "layer", init: float = 0.3,
              steps: int = 50, batch_size: int = 8, lr: float = 0.01, max_length: int = 32, clamp: bool = True,
              learn_on: str = "validation"):
        return adamerging(ctx, setup, granularity, init, steps, batch_size, lr, max_length, clamp, learn_on=learn_on)


def adamerging(ctx: Context, setup: _Setup, granularity: str, init: float, steps: int, batch_size: int, lr: float,
               max_length: int, clamp: bool = True, mask: dict | None = None, learn_on: str = "validation"):
    """AdaMerging's loop over task vectors (masked by `mask` {k: [*shape]} when given: Concrete's phase 2)."""
    _check_steps("adamerging", steps, batch_size)
    tasks, notes = setup.unsupervised_tasks(ctx)
    lam = setup.coefficients(granularity, init)
    coef, probe = setup.coef_fn(lam), setup.probe(ctx, batch_size, max_length, learn_on)
    mask_fn = None if mask is None else mask.__getitem__
    curve = fit([lam], lambda s: setup.entropy_loss(setup.tv.combine(coef, mask_fn), probe, tasks, s), steps, lr,
                after_step=(lambda: lam.clamp_(0.0, 1.0)) if clamp else None, desc="adamerging",
                progress=ctx.progress)
    with torch.no_grad():
        backbone = _cast(ctx, setup.tv.combine(coef, mask_fn))
    return backbone, {"lambdas": lam.detach()}, curve, {**notes, "objective": "entropy"}


class ConcreteSubspace(LearnedMethod):
    """A mask m over task-vector entries shared by all tasks, learned through a Concrete (relaxed Bernoulli)
    distribution: m = sigmoid((logits + log u - log(1 - u)) / temperature), u ~ U(0, 1), each tensor's mask
    divided by its mean; merged theta = theta_0 + m * sum_t lambda_t tau_t.
    inner "task_arithmetic": lambda_t = scaling fixed; the mask logits minimise sum_t H on sampled masks.
    inner "adamerging" (first-order bilevel, as FusionBench): each step resets lambda to `scaling`, takes one
    Adam step on lambda (`inner_lr`, mask detached, batches 2s), then one step on the mask logits with that
    lambda (batches 2s+1); after `steps`, AdaMerging (`granularity`, `adamerging_steps`) with the fixed mask.
    The evaluated mask is one seeded Concrete sample, mean-rescaled (FusionBench's `continuous` default)."""

    key = "concrete"
    label = "Concrete subspace learning"

    def variant(self, options: dict) -> str:
        inner = self.resolve(options)["inner"]
        return ", inner " + ("Task Arithmetic" if inner == "task_arithmetic" else "AdaMerging")
    reference = ("Tang et al., Concrete Subspace Learning based Interference Elimination for Multi-task Model "
                 "Fusion, 2023 (arXiv 2312.06173)")

    def learn(self, ctx: Context, setup: _Setup, *, inner: str = "task_arithmetic", scaling: float = 0.3,
              temperature: float = 0.5, init_logit: float = 0.0, steps: int = 40, batch_size: int = 8,
              lr: float = 0.05, max_length: int = 32, inner_lr: float = 1.0, granularity: str = "task",
              adamerging_steps: int = 16, adamerging_lr: float = 0.0625, learn_on: str = "validation"):
        _check_steps(self.key, steps, batch_size)
        if inner not in ("task_arithmetic", "adamerging"):
            raise MergeError(f"method {self.key!r}: inner must be 'task_arithmetic' or 'adamerging'")
        tasks, notes = setup.unsupervised_tasks(ctx)
        tv = setup.tv
        logits = {k: torch.full(tv.base[k].shape, float(init_logit), requires_grad=True) for k in tv.keys}
        noise = torch.Generator().manual_seed(ctx.seed)
        probe = setup.probe(ctx, batch_size, max_length, learn_on)

        def sample() -> dict:
            return {k: _concrete(v, temperature, noise) for k, v in logits.items()}

        lam = setup.coefficients(granularity, scaling) if inner == "adamerging" else None
        lam_opt = torch.optim.Adam([lam], lr=inner_lr) if lam is not None else None

        def loss_at(step: int) -> torch.Tensor:
            m = sample()
            if lam is None:
                return setup.entropy_loss(tv.combine(lambda k: torch.full((tv.n,), scaling), m.__getitem__), probe,
                                          tasks, step)
            with torch.no_grad():
                lam.fill_(scaling)
            lam_opt.zero_grad(set_to_none=True)
            setup.entropy_loss(tv.combine(setup.coef_fn(lam), lambda k: m[k].detach()), probe, tasks,
                               2 * step).backward()
            lam_opt.step()
            fixed = lam.detach()
            return setup.entropy_loss(tv.combine(setup.coef_fn(fixed), m.__getitem__), probe, tasks, 2 * step + 1)

        curve = fit(list(logits.values()), loss_at, steps, lr, desc=f"{self.key} mask", progress=ctx.progress)
        with torch.no_grad():
            mask = sample()
        learned = {f"mask_logits.{k}": v.detach() for k, v in logits.items()}
        if lam is None:
            with torch.no_grad():
                backbone = _cast(ctx, tv.combine(lambda k: torch.full((tv.n,), scaling), mask.__getitem__))
            return backbone, learned, curve, {**notes, "objective": "entropy"}
        backbone, extra, ada_curve, _ = adamerging(ctx, setup, granularity, scaling, adamerging_steps, batch_size,
                                                   adamerging_lr, max_length, mask=mask, learn_on=learn_on)
        return backbone, {**learned, **extra}, curve + ada_curve, {**notes, "objective": "entropy",
                                                                 "mask_steps": steps,
                                                                 "adamerging_steps": adamerging_steps}


class SelfPositioning(LearnedMethod):
    """theta = beta theta_0 + sum_t alpha_t tau_t, (alpha, beta) found by gradient descent on a labelled probe
    set (our validation splits): loss = sum_t CE(task t's head on its batch) + reg * (sum_t alpha_t^2 +
    (beta - 1)^2), an L2 pull toward the base model (beta = 1, alpha = 0). alpha starts at `init`, beta at 1."""

    key = "self_positioning"
    label = "Self Positioning"
    reference = ("Li et al., Improving General Text Embedding Model: Tackling Task Conflict and Data Imbalance "
                 "through Model Merging, 2024 (arXiv 2410.15035)")
    data_used = "validation_labels"

    def learn(self, ctx: Context, setup: _Setup, *, init: float = 0.3, reg: float = 0.01, steps: int = 50,
              batch_size: int = 8, lr: float = 0.01, max_length: int = 32):
        _check_steps(self.key, steps, batch_size)
        alpha = setup.coefficients("task", init)
        beta = torch.ones((), requires_grad=True)
        probe = setup.probe(ctx, batch_size, max_length)
        fc, tv = setup.fc, setup.tv

        def loss_at(step: int) -> torch.Tensor:
            backbone = tv.combine(lambda k: alpha, base_coef=lambda k: beta)
            loss = 0.0
            for t in range(tv.n):
                enc, labels = probe.batch(t, step)
                out = fc.logits(backbone, t, enc)
                loss = loss + (torch.nn.functional.mse_loss(out[:, 0], labels.float()) if setup.widths[t] == 1
                               else torch.nn.functional.cross_entropy(out, labels))
            return loss + reg * ((alpha ** 2).sum() + (beta - 1) ** 2)

        curve = fit([alpha, beta], loss_at, steps, lr, desc=self.key, progress=ctx.progress)
        with torch.no_grad():
            backbone = _cast(ctx, tv.combine(lambda k: alpha, base_coef=lambda k: beta))
        return backbone, {"alphas": alpha.detach(), "beta": beta.detach().reshape(1)}, curve, \
            {"objective": "cross_entropy + reg * L2 toward the base"}


def _concrete(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """One relaxed-Bernoulli sample sigmoid((logits + log u - log(1-u)) / T), u ~ U(0,1) (seeded), divided by its
    mean (FusionBench rescales each tensor's mask to mean 1)."""
    u = torch.rand(logits.shape, generator=generator).clamp_(1e-6, 1 - 1e-6)
    m = torch.sigmoid((logits + u.log() - (-u).log1p()) / temperature)
    return m / m.mean()


def _cast(ctx: Context, state: dict) -> dict:
    """The merged float32 tensors in the base dtype (a backbone as static merges save it)."""
    return {k: v.detach().to(ctx.pool.base_tensor(k).dtype) for k, v in state.items()}
