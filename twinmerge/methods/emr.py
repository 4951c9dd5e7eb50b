"""EMR-Merging (Huang et al., NeurIPS 2024) as a routed method: theta_0 + lambda_t * M_t * tau_uni for the
input's task t (`twinmerge.emr`: election, packed masks, rescalers, the folder format).

Rows: `<key>_oracle` (the paper's protocol: the task id picks mask, rescaler and head) and `<key>_router` (no task
id: the router's argmax picks them, per input, batched). The routed-delta engine runs the masked deltas as dense
deltas over theta_0, one-hot weighted (top-1), so one batch may mix tasks.
"""
from pathlib import Path

from twinmerge.emr import VARIANTS, build_emr, load_emr, save_emr
from twinmerge.errors import MergeError
from twinmerge.methods.base import Context, Mode, RoutedMethod, backbone_bytes, expert_heads, head_bytes
from twinmerge.modelpool import assemble_classifier
from twinmerge.routed import RoutedDeltaModel, dense_delta_set


class EMRMerging(RoutedMethod):
    key = "emr"
    label = "EMR-Merging"
    reference = "Huang et al., EMR-Merging, NeurIPS 2024 (arXiv 2405.17461)"
    modes = {
        "oracle": Mode("EMR-Merging, gold task's mask, rescaler and head (task id; the paper's protocol)",
                       "gold", "gold"),
        "router": Mode("EMR-Merging, router-chosen mask, rescaler and head (no task id)", "router_argmax", "router"),
    }

    def build(self, ctx: Context, out_dir: Path, grid: dict, *, variant: str = "official") -> dict:
        """Elect tau_uni, masks and rescalers over every mergeable tensor (variant: see twinmerge.emr)."""
        if variant not in VARIANTS:
            raise MergeError(f"method 'emr': option variant={variant!r} must be one of {', '.join(VARIANTS)}")
        emr = build_emr(ctx.pool, progress=ctx.progress, variant=variant)
        save_emr(emr, out_dir)
        return {"choice": {"options": {"variant": variant}, "validation_mean_normalized": None,
                           "rescalers": emr.rescalers}}

    def model(self, ctx: Context, out_dir: Path) -> RoutedDeltaModel:
        pool, emr = ctx.pool, load_emr(out_dir)
        base = {k: pool.base_tensor(k) for k in pool.mergeable_keys()}
        first = pool.names[0]
        deltas = [dense_delta_set(t, pool.experts[t].config, {k: emr.delta(t, k) for k in emr.keys},
                                  expert_heads(pool, t)) for t in pool.names]
        return RoutedDeltaModel(assemble_classifier(pool.experts[first].config, {**base, **expert_heads(pool, first)}),
                                deltas)

    def stored_bytes(self, ctx: Context, out_dir: Path) -> int:
        """theta_0 + tau_uni (float32) + packed masks + rescalers + heads."""
        return backbone_bytes(ctx.pool) + load_emr(out_dir).stored_bytes() + head_bytes(ctx.pool)
