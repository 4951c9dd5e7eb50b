"""Static merges as methods: one backbone for every task (theta_0 + merge(tau_1..tau_n)), each task scored with
its own head (a causal LM has none: one model answers every task). Every merge function registered in `twinmerge.merge.MERGE_METHODS` is a static method of the
same key; its options come from the merge function's signature, its grid is chosen on validation data.
Merges stream to disk and the chosen backbone streams to `out_dir`: memory holds one backbone while a grid
point is scored, whatever the number of experts (`StaticMethod.build`).
"""
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from twinmerge.errors import MergeError
from twinmerge.io import TEMP_MARK, sweep_stale_temps_under
from twinmerge.merge import MergeMethod, resolve_options
from twinmerge.methods.base import Context, backbone_bytes, head_bytes
from twinmerge.progress import progress_bar
from twinmerge.shared import SharedModel, load_shared, stream_shared, write_shared_expert
from twinmerge.taskpool import summarize


def grid_points(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values (keys sorted), [{}] for an empty grid."""
    keys = sorted(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))] or [{}]


class StaticMethod:
    kind = "static"
    generative = True  # a merged backbone of a causal LM is scored by generation (twinmerge.genpool)
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

    def grid_backbones(self, pool, options: dict, grid: dict, scratch: Path
                       ) -> Iterator[tuple[dict, Mapping[str, torch.Tensor], Path | None]]:
        """Yield (options, backbone, folder) for every grid point; each backbone is lazy: a tensor is read or
        computed when looked up, so no grid point's model is held unless its consumer materialises it.

        A method linear in `scaling` with a grid over `scaling` alone merges once with scaling 1 (streamed to
        `scratch/unit` by `write_shared_expert`) and rescales per tensor: theta_0 + s (theta_1 - theta_0)
        (`Rescaled`; folder None). Otherwise each point is merged to its own folder under `scratch`
        (`SharedModel` of it; the consumer may delete the folder once it has no use for it)."""
        unknown = sorted(set(grid) - set(resolve_options(self.key, options)))
        if unknown:
            raise MergeError(f"method {self.key!r}: grid over unknown option(s) {', '.join(unknown)}")
        points = grid_points(grid)
        if set(grid) == {"scaling"} and self.merge.linear_in_scaling:
            unit = SharedModel(write_shared_expert(pool, self.key, {**options, "scaling": 1.0},
                                                   out_dir=scratch / "unit", progress=False))
            for point in points:
                yield {**options, **point}, Rescaled(pool, unit, point["scaling"]), None
        else:
            for i, point in enumerate(points):
                folder = write_shared_expert(pool, self.key, {**options, **point}, out_dir=scratch / f"point{i}",
                                             progress=False)
                yield {**options, **point}, SharedModel(folder), folder

    def build(self, ctx: Context, out_dir: Path, grid: dict, **options) -> dict:
        """Choose the grid point with the best validation mean normalised score; write its backbone.

        Memory: one materialised backbone while a point is scored (the classifiers built for its tasks share
        its tensors), one tensor otherwise; disk: the unit merge or the best point's and the current point's
        merges, in a scratch folder beside `out_dir` that is deleted at the end (or, after a kill, by the next
        build or `twinmerge run`: `sweep_stale_temps_under`)."""
        out_dir = Path(out_dir)
        # A killed build's scratch folder, named as atomic writes name their temporaries: `out_dir` may itself be
        # such a temporary (the method step's), so every dead writer's temporaries beside it go, not only its own.
        sweep_stale_temps_under(out_dir.parent)
        scratch = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}{TEMP_MARK}{os.getpid()}-grid-"))
        try:
            tried, best = [], None
            for opts, backbone, folder in progress_bar(self.grid_backbones(ctx.pool, options, grid, scratch),
                                                       total=len(grid_points(grid)), desc=f"{self.key} grid",
                                                       disable=not ctx.progress):
                mean = None
                if grid:
                    scores = ctx.validation.score_backbone(dict(backbone), f"{self.key} val")
                    mean = summarize(scores, ctx.validation_reference)["mean_normalized"]
                    tried.append({"options": opts, "validation_mean_normalized": mean})
                if best is None or mean > best[1]:
                    if best is not None and best[3] is not None:
                        shutil.rmtree(best[3])
                    best = (opts, mean, backbone, folder)
                elif folder is not None:
                    shutil.rmtree(folder)
            opts, mean, backbone, _ = best
            choice = {"options": resolve_options(self.key, opts), "validation_mean_normalized": mean, "grid": tried}
            stream_shared(backbone, ctx.pool, out_dir, {"method": self.key, "choice": choice})
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return {"choice": choice}

    def backbone(self, out_dir: Path) -> dict:
        return load_shared(out_dir)

    def stored_bytes(self, ctx: Context, out_dir: Path) -> int:
        """One merged backbone + every task's head."""
        return backbone_bytes(ctx.pool) + head_bytes(ctx.pool)


class Rescaled(Mapping[str, torch.Tensor]):
    """The backbone theta_0 + s (theta_1 - theta_0) of a merge linear in its scaling, from theta_1 = the merge
    at scaling 1 (`unit`, read lazily): each tensor computed when looked up, in the base dtype."""

    def __init__(self, pool, unit: Mapping[str, torch.Tensor], scaling: float):
        self.pool, self.unit, self.scaling = pool, unit, scaling

    def __getitem__(self, key: str) -> torch.Tensor:
        """In place on the unit tensor read from disk (two tensors in memory, not five): (unit - base) * s + base
        has the bits of base + s * (unit - base), since IEEE addition and multiplication commute."""
        if key not in self.unit:
            raise KeyError(key)
        base = self.pool.base_tensor(key)
        return self.unit[key].sub_(base).mul_(self.scaling).add_(base)

    def __contains__(self, key: object) -> bool:
        return key in self.unit

    def __iter__(self) -> Iterator[str]:
        return iter(self.unit)

    def __len__(self) -> int:
        return len(self.unit)
