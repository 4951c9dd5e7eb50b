"""WEMoE (Tang et al., ICML 2024, arXiv 2402.00433) as a routed method: Task Arithmetic outside the MLPs, and
each layer's MLP W_0 + sum_t r_t(x) tau_t with per-sample weights r from a learned per-layer gate on the MLP's
input hidden states (`twinmerge.wemoe`; mixed by the routed-delta engine, never materialised per sample).

Learning (`build`): only the gates are trained, by minimising sum_t H(task t's own-head predictions on a batch
of task t's validation inputs) (entropy; no labels, never test data) with Adam for `steps` steps on one thread.
FusionBench used lr 1e-4, 1000 steps, 16 inputs per task on a GPU; our CPU budget (<= 3 min on one thread)
allows ~16 steps of 4 inputs per task (each MLP costs ~(T+1)x: every expert's delta is applied to every token),
so the lr is travel-matched as for the other learning methods (`twinmerge.methods.learned`): 1e-4 x 1000 =
6.25e-3 x 16. Measured on the default 6 MiniLM experts (validation mean normalised score, gold heads; 64.3 at
init = TA 0.3): after 20 steps 62.2 at lr 2e-4, 57.7 at 1e-3, 46.0 at 5e-3, and 64.4 after 16 steps at 1e-4:
the lower the entropy, the lower the score (the unsupervised objective sharpens wrong predictions of a weak
merge; docs/DESIGN.md "Learning methods").
Seeded gate init and seeded batches (`ctx.seed`): same inputs and seed -> byte-identical gates.

Artifact folder: gates.safetensors (gate tensors, float32), wemoe.json (format, options, experts, loss curve),
curve.csv (step,loss). Rows: `<key>_router` (the router's argmax picks the head; no task id; the gates need no
task id) and `<key>_oracle` (the gold task's head).
"""
import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from twinmerge.errors import MergeError
from twinmerge.io import save_safetensors_atomic, write_json_atomic, write_text_atomic
from twinmerge.learning import Probe, entropy, fit
from twinmerge.methods.base import Context, Mode, RoutedMethod, backbone_bytes, head_bytes, nbytes
from twinmerge.methods.learned import curve_csv
from twinmerge.wemoe import WEMoEModel, build_wemoe, mlp_layout

FORMAT = "twinmerge-wemoe/1"
log = logging.getLogger(__name__)


class WEMoE(RoutedMethod):
    key = "wemoe"
    label = "WEMoE"
    reference = ("Tang et al., Merging Multi-Task Models via Weight-Ensembling Mixture of Experts, ICML 2024 "
                 "(arXiv 2402.00433)")
    data_used = "validation_inputs"
    materializable = False  # the mixing weights come from each input's hidden states, not from the router
    modes = {
        "router": Mode("WEMoE, router-chosen head (no task id)", "router_argmax", "router"),
        "oracle": Mode("WEMoE, gold task's head (task id)", "gold", "gold"),
    }

    def build(self, ctx: Context, out_dir: Path, grid: dict, *, init_lambda: float = 0.3, hidden_layers: int = 2,
              steps: int = 16, batch_size: int = 4, lr: float = 6.25e-3, max_length: int = 48) -> dict:
        """Train the gates on the validation inputs (entropy), write gates.safetensors, wemoe.json, curve.csv.

        Each step: T tasks x batch_size inputs of at most max_length tokens. Defaults on 6 MiniLM experts, one
        thread: 16 steps in ~67 s (4.2 s a step; ~2.5 min when the other core is busy too); lr travel-matched
        to FusionBench's (see the module docstring)."""
        if grid:
            raise MergeError(f"method 'wemoe': no grid options (got {', '.join(grid)})")
        if ctx.learn is None:
            raise MergeError("method 'wemoe' learns from the validation inputs: Context.learn is missing")
        for name, value in (("steps", steps), ("batch_size", batch_size), ("max_length", max_length)):
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "steps" else 1):
                raise MergeError(f"method 'wemoe': option {name}={value!r} must be a "
                                 f"{'non-negative' if name == 'steps' else 'positive'} integer")
        if not lr > 0:
            raise MergeError(f"method 'wemoe': option lr={lr!r} must be positive")
        options = {"init_lambda": init_lambda, "hidden_layers": hidden_layers, "steps": steps,
                   "batch_size": batch_size, "lr": lr, "max_length": max_length}
        model = build_wemoe(ctx.pool, init_lambda, hidden_layers, seed=ctx.seed)
        curve = self.learn(model, ctx, steps, batch_size, lr, max_length)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic(model.gate_state(), out_dir / "gates.safetensors", {"format": FORMAT})
        learning = {"steps": steps, "batch_size": batch_size, "curve": curve}
        write_json_atomic({"format": FORMAT, "options": options, "experts": ctx.pool.names, "seed": ctx.seed,
                           "learning": learning}, out_dir / "wemoe.json")
        write_text_atomic(curve_csv(curve), out_dir / "curve.csv")
        return {"choice": {"options": options, "validation_mean_normalized": None, "grid": [], "objective": "entropy",
                           "learning": learning}}

    @staticmethod
    def learn(model: WEMoEModel, ctx: Context, steps: int, batch_size: int, lr: float, max_length: int) -> list:
        """Adam on the gates: loss(step) = sum_t entropy(task t's head on its probe batch); returns the curve."""
        learn, names = ctx.learn, ctx.pool.names
        probe = Probe(learn.split, learn.tokenizer, batch_size, max_length, ctx.seed)
        heads = [names.index(n) for n in probe.names]
        width = model.num_labels.tolist()

        def loss_at(step):
            total = 0.0
            for i, head in enumerate(heads):
                enc, _ = probe.batch(i, step)
                out = model(**enc, head_ids=torch.full((enc["input_ids"].shape[0],), head))
                total = total + entropy(out.logits[:, :width[head]])
            return total

        start = time.perf_counter()
        curve = fit(list(model.gates.parameters()), loss_at, steps, lr, desc="wemoe gates", progress=ctx.progress)
        log.info("WEMoE: %d steps x %d tasks x %d inputs in %.1f s (one thread); entropy sum %s -> %s", steps,
                 len(heads), batch_size, time.perf_counter() - start, curve[0] if curve else None,
                 curve[-1] if curve else None)
        return curve

    def _options(self, out_dir: Path) -> dict:
        return json.loads((Path(out_dir) / "wemoe.json").read_text())["options"]

    def model(self, ctx: Context, out_dir: Path) -> WEMoEModel:
        o = self._options(out_dir)
        return build_wemoe(ctx.pool, o["init_lambda"], o["hidden_layers"], seed=ctx.seed,
                           gates=load_file(Path(out_dir) / "gates.safetensors"))

    def stored_bytes(self, ctx: Context, out_dir: Path) -> int:
        """One backbone (TA, base dtype) + every expert's MLP task vectors (base dtype) + gates + heads."""
        pool = ctx.pool
        config = pool.experts[pool.names[0]].config
        mlp = [k for item in mlp_layout(pool.mergeable_keys(), config.get("model_type", "?")).values()
               for k in item["keys"]]
        gates = load_file(Path(out_dir) / "gates.safetensors")
        return backbone_bytes(pool) + len(pool.names) * nbytes(pool.base_tensor(k) for k in mlp) \
            + nbytes(gates.values()) + head_bytes(pool)
