"""Layer-wise merging as a routed method: the lower layers merged into one shared backbone, the layers from
`split` up kept per expert (dense deltas tau_t = theta_t - theta_0) and chosen per input.

A tensor's layer is the number in its canonical name's `layer.<i>.` / `layers.<i>.` / `h.<i>.` part; tensors
without one are below every layer when their name mentions an embedding and above every layer otherwise (BERT's
pooler, a final norm). Lower tensors: theta_0 + merge(tau) with the registered merge method `merge` and its
options; upper tensors: theta_0 + tau_t of the input's expert (one-hot weights, so exactly expert t's upper layers).
Rows: `<key>_router` (the router's argmax picks upper layers and head; no task id) and `<key>_oracle` (task id).
`split` is chosen on validation data (oracle protocol, validation labels) from the grid: the largest split
(fewest stored bytes) whose mean normalised score is within `tolerance` points of the grid's best.
"""
import json
import re
from pathlib import Path

from twinmerge.errors import MergeError
from twinmerge.merge import build_shared_expert, resolve_options
from twinmerge.methods.base import (Context, Mode, RoutedMethod, backbone_bytes, expert_heads, gold_one_hot,
                                    head_bytes, nbytes)
from twinmerge.modelpool import assemble_classifier
from twinmerge.routed import RoutedDeltaModel, dense_delta_set
from twinmerge.shared import SHARED_META, load_shared, save_shared
from twinmerge.taskpool import summarize

_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def layer_of(key: str) -> float:
    """The layer index of a canonical tensor name; -inf (embeddings) or +inf (above every layer) without one."""
    m = _LAYER.search(key)
    if m:
        return int(m.group(1))
    return float("-inf") if "embed" in key else float("inf")


def upper_keys(keys: list[str], split: int) -> list[str]:
    """The tensors kept per expert: layer >= split (and the tensors above every layer)."""
    return [k for k in keys if layer_of(k) >= split]


class LayerwiseMerging(RoutedMethod):
    key = "layerwise"
    label = "Layer-wise merging"
    reference = ("lower layers merged, upper layers task-specific: the layer-wise baseline of Twin-Merging "
                 "(Lu et al., NeurIPS 2024, arXiv 2406.15479)")
    modes = {
        "router": Mode("Layer-wise merging, router-chosen upper layers and head (no task id)", "router_argmax",
                       "router"),
        "oracle": Mode("Layer-wise merging, gold task's upper layers and head (task id)", "gold", "gold"),
    }

    def build(self, ctx: Context, out_dir: Path, grid: dict, *, split: int = 5, merge: str = "task_arithmetic",
              merge_options: dict | None = None, tolerance: float = 1.0) -> dict:
        """Merge the lower layers for each grid split and score it (one model at a time); write the chosen
        split's backbone, merged again (its twinmerge.json records the split)."""
        options = resolve_options(merge, merge_options)
        keys = ctx.pool.mergeable_keys()
        splits = sorted(set(grid.get("split", [split])))
        for s in splits:
            if not isinstance(s, int) or isinstance(s, bool) or not upper_keys(keys, s):
                raise MergeError(f"method 'layerwise': split {s!r} must be an integer that keeps some layers")
        tried = []
        for s in splits if len(splits) > 1 else []:  # one model at a time; the chosen backbone is merged again
            model = self._model(ctx, self._backbone(ctx, s, merge, options), s)
            val = ctx.validation
            scores = val.score_routed(model, gold_one_hot(val.task_ids, len(val.names)), val.task_ids, 1,
                                      desc=f"layerwise split {s} val")
            del model
            mean = summarize(scores, ctx.validation_reference)["mean_normalized"]
            tried.append({"options": {"split": s}, "validation_mean_normalized": mean,
                          "stored_bytes": self._bytes(ctx, s)})
        if tried:
            best = max(t["validation_mean_normalized"] for t in tried)
            chosen = max(t["options"]["split"] for t in tried if t["validation_mean_normalized"] >= best - tolerance)
            mean = next(t["validation_mean_normalized"] for t in tried if t["options"]["split"] == chosen)
        else:
            chosen, mean = splits[0], None
        save_shared(self._backbone(ctx, chosen, merge, options), ctx.pool, out_dir,
                    {"method": self.key, "split": chosen, "merge": merge, "merge_options": options})
        return {"choice": {"options": {"split": chosen, "merge": merge, "merge_options": options,
                                       "tolerance": tolerance},
                           "validation_mean_normalized": mean, "grid": tried}}

    def _backbone(self, ctx: Context, split: int, merge: str, options: dict) -> dict:
        """theta_0 + merge(tau) on the tensors below `split`, theta_0 above."""
        keys = ctx.pool.mergeable_keys()
        lower = [k for k in keys if k not in set(upper_keys(keys, split))]
        if not lower:
            return {k: ctx.pool.base_tensor(k) for k in keys}
        return build_shared_expert(ctx.pool, merge, options, include=lower, progress=False)[0]

    def _model(self, ctx: Context, backbone: dict, split: int) -> RoutedDeltaModel:
        pool = ctx.pool
        upper = upper_keys(pool.mergeable_keys(), split)
        deltas = [dense_delta_set(t, pool.experts[t].config,
                                  {k: pool.expert_tensor(t, k).float() - pool.base_tensor(k).float() for k in upper},
                                  expert_heads(pool, t)) for t in pool.names]
        first = pool.names[0]
        return RoutedDeltaModel(assemble_classifier(pool.experts[first].config,
                                                    {**backbone, **expert_heads(pool, first)}), deltas)

    def _bytes(self, ctx: Context, split: int) -> int:
        """One backbone + each expert's upper tensors (base dtype) + heads."""
        upper = upper_keys(ctx.pool.mergeable_keys(), split)
        return backbone_bytes(ctx.pool) + len(ctx.pool.names) * nbytes(ctx.pool.base_tensor(k) for k in upper) \
            + head_bytes(ctx.pool)

    def _split(self, out_dir: Path) -> int:
        """The chosen split, recorded in the backbone folder's twinmerge.json (`save_shared`'s report)."""
        return json.loads((Path(out_dir) / SHARED_META).read_text())["merge"]["split"]

    def model(self, ctx: Context, out_dir: Path) -> RoutedDeltaModel:
        return self._model(ctx, load_shared(out_dir), self._split(out_dir))

    def stored_bytes(self, ctx: Context, out_dir: Path) -> int:
        return self._bytes(ctx, self._split(out_dir))
