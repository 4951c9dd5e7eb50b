"""Static merges as methods: one backbone for every task (theta_0 + merge(tau_1..tau_n)), each task scored with
its own head. Every merge function registered in `twinmerge.merge.MERGE_METHODS` is a static method of the
same key; its options come from the merge function's signature, its grid is chosen on validation data.
"""
import itertools
from pathlib import Path

from twinmerge.merge import MergeMethod, build_shared_expert, resolve_options
from twinmerge.methods.base import Context, backbone_bytes, head_bytes
from twinmerge.progress import progress_bar
from twinmerge.shared import load_shared, save_shared
from twinmerge.errors import MergeError
from twinmerge.taskpool import summarize


def grid_points(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values (keys sorted), [{}] for an empty grid."""
    keys = sorted(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))] or [{}]


class StaticMethod:
    kind = "static"
    modes: dict = {}

    def __init__(self, key: str, merge: MergeMethod):
        self.key, self.merge = key, merge
        self.label, self.reference = merge.label, merge.reference

    @property
    def defaults(self) -> dict:
        return self.merge.defaults

    def variant(self, options: dict) -> str:
        return ""

    def resolve(self, options: dict) -> dict:
        """`options` checked and completed with the merge function's defaults (MergeError otherwise)."""
        return resolve_options(self.key, options)

    def data(self, grid: dict, options: dict | None = None) -> str:
        return "validation_labels" if grid else "none"

    def grid_backbones(self, pool, options: dict, grid: dict):
        """Yield (options, backbone) for every grid point. A method linear in `scaling` with a grid over
        `scaling` alone merges once with scaling 1 and rescales: theta_0 + s (theta_1 - theta_0)."""
        unknown = sorted(set(grid) - set(resolve_options(self.key, options)))
        if unknown:
            raise MergeError(f"method {self.key!r}: grid over unknown option(s) {', '.join(unknown)}")
        points = grid_points(grid)
        if set(grid) == {"scaling"} and self.merge.linear_in_scaling:
            unit, _ = build_shared_expert(pool, self.key, {**options, "scaling": 1.0}, progress=False)
            base = {k: pool.base_tensor(k) for k in unit}
            for point in points:
                yield {**options, **point}, {k: base[k] + point["scaling"] * (unit[k] - base[k]) for k in unit}
        else:
            for point in points:
                yield {**options, **point}, build_shared_expert(pool, self.key, {**options, **point},
                                                                progress=False)[0]

    def build(self, ctx: Context, out_dir: Path, grid: dict, **options) -> dict:
        """Choose the grid point with the best validation mean normalised score; save its backbone."""
        tried, best = [], None
        for opts, backbone in progress_bar(self.grid_backbones(ctx.pool, options, grid), total=len(grid_points(grid)),
                                           desc=f"{self.key} grid", disable=not ctx.progress):
            mean = None
            if grid:
                scores = ctx.validation.score_backbone(backbone, f"{self.key} val")
                mean = summarize(scores, ctx.validation_reference)["mean_normalized"]
                tried.append({"options": opts, "validation_mean_normalized": mean})
            if best is None or mean > best[1]:
                best = (opts, mean, backbone)
        opts, mean, backbone = best
        choice = {"options": resolve_options(self.key, opts), "validation_mean_normalized": mean, "grid": tried}
        save_shared(backbone, ctx.pool, out_dir, {"method": self.key, "choice": choice})
        return {"choice": choice}

    def backbone(self, out_dir: Path) -> dict:
        return load_shared(out_dir)

    def stored_bytes(self, ctx: Context, out_dir: Path) -> int:
        """One merged backbone + every task's head."""
        return backbone_bytes(ctx.pool) + head_bytes(ctx.pool)
