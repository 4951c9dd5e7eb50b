"""Step `compress` (per expert): exclusive knowledge v_t = theta_t - theta_s as SVD factors.

Writes `artifacts/exclusive/<expert>.safetensors` (format in docs/DESIGN.md) and
`artifacts/exclusive/<expert>.stats.json` (per-tensor rank, energy kept, bytes; totals vs dense). With
`compress.factor_bits` 8 or 4 the factors are quantised (bytes count codes + scales; twinmerge/quant.py).
Streamed: the shared model is read one tensor at a time (`SharedModel`) and each factor is written as it is
computed (`write_factors`), so memory is about 3x the largest tensor, never a model.
"""
from pathlib import Path

from tasks.params import Params, load_params, stage_item
from twinmerge.errors import FactorError
from twinmerge.exclusive import FactorStream, RankSpec, factor_metadata, write_factors
from twinmerge.io import ExpertSet, write_json_atomic
from twinmerge.shared import SharedModel


def compress(params: Params, expert: str, shared_dir: str | Path = "artifacts/shared",
             out_dir: str | Path = "artifacts/exclusive", progress: bool = True,
             base_dir: str | Path = "artifacts/base", checkpoints_dir: str | Path = "artifacts/checkpoints") -> dict:
    if expert not in params.experts:
        raise FactorError(f"params.yaml: experts: no expert named {expert!r} (have {sorted(params.experts)})")
    pool = ExpertSet(base_dir, {expert: Path(checkpoints_dir) / expert})  # the shared model carries the others
    rank_spec = RankSpec(params.compress.rank.mode, params.compress.rank.value)
    c = params.compress
    stream = FactorStream(pool, SharedModel(shared_dir), expert, rank_spec, c.dtype, progress, c.factor_bits,
                          c.group_size)
    out_dir = Path(out_dir)
    metadata = factor_metadata(expert, pool.experts[expert].config, rank_spec, c.dtype, c.factor_bits, c.group_size)
    write_factors(out_dir / f"{expert}.safetensors", stream, metadata)
    write_json_atomic(stream.stats, out_dir / f"{expert}.stats.json")
    return stream.stats["totals"]


def add_arguments(parser) -> None:
    parser.add_argument("--expert", help="expert name (default: <name> of $DVC_STAGE compress@<name>)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-progress", action="store_true")


def main(args) -> None:
    params = load_params(args.params)
    expert = stage_item(args.expert, "compress", "--expert")
    totals = compress(params, expert, progress=not args.no_progress)
    print({k: totals[k] for k in sorted(totals)})
