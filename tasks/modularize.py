"""Step `modularize`: the shared expert theta_s = theta_0 + merge(tau_1..tau_n) -> `artifacts/shared/`
(an ordinary Hugging Face backbone folder, see `twinmerge.shared`), merged and written as a stream
(`write_shared_expert`: memory does not grow with the number of experts or the model's size)."""
from pathlib import Path

from tasks.params import Params, load_params
from twinmerge.io import ExpertSet
from twinmerge.shared import write_shared_expert

__all__ = ["open_pool", "modularize"]


def open_pool(params: Params, base_dir: str | Path = "artifacts/base",
              checkpoints_dir: str | Path = "artifacts/checkpoints", names: list[str] | None = None) -> ExpertSet:
    """The base and the experts `names` (default: every expert of params.yaml), as downloaded into artifacts/,
    validated together."""
    return ExpertSet(base_dir, {name: Path(checkpoints_dir) / name for name in names or params.experts})


def modularize(params: Params, out_dir: str | Path = "artifacts/shared", **pool_dirs) -> Path:
    """Merge `params.shared_experts` (merge.experts, default all): an expert left out (incremental mode) does
    not change a byte of the shared expert."""
    pool = open_pool(params, names=params.shared_experts, **pool_dirs)
    return write_shared_expert(pool, params.merge.method, params.merge.options, params.merge.include,
                               params.merge.exclude, out_dir, params.merge.max_shard_bytes)


def add_arguments(parser) -> None:
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="artifacts/shared")


def main(args) -> None:
    print(modularize(load_params(args.params, registry=False), args.out))
