"""Step `compress` (per expert): exclusive knowledge v_t = theta_t - theta_s as SVD factors.

Writes `artifacts/exclusive/<expert>.safetensors` (format in docs/DESIGN.md) and
`artifacts/exclusive/<expert>.stats.json` (per-tensor rank, energy kept, bytes; totals vs dense). With
`compress.factor_bits` 8 or 4 the factors are quantised (bytes count codes + scales; twinmerge/quant.py).
Streamed: the shared model is read one tensor at a time (`SharedModel`) and each factor is written as it is
computed (`write_factors`), so memory is about 3x the largest tensor, never a model; 1x for the large, elongated
matrices (embeddings, LM heads) whose SVD takes the Gram path (`compress.gram_svd_mib`, twinmerge/gram_svd.py).

LoRA experts (`lowrank_plan`): when the compressed expert and every expert merged into the shared model are PEFT
LoRA adapters and the shared model's merge report (its twinmerge.json) says a linear merge of every mergeable
tensor (task_arithmetic: lambda = scaling; weight_average: 1 / n), v_t = L @ R is known in low-rank form and the
LoRA-covered matrices are factored from it (`twinmerge.exclusive.linear_merge_source`) without forming m x n.
Otherwise (full fine-tunes: the default pipeline) the dense path runs, the files byte-identical to before.
One INFO line says which path was taken and for how many tensors.
"""
import ctypes
import json
import logging
from pathlib import Path

from tasks.params import Params, load_params, stage_item
from twinmerge.errors import FactorError
from twinmerge.exclusive import FactorStream, LowRankSource, RankSpec, factor_metadata, linear_merge_source, \
    write_factors
from twinmerge.io import ExpertSet, write_json_atomic
from twinmerge.lora import is_adapter_folder
from twinmerge.shared import SHARED_META, SharedModel

log = logging.getLogger(__name__)
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)


def merge_lambdas(report: dict) -> dict[str, float] | None:
    """{expert: lambda} of a shared model's merge report when theta_s = theta_0 + sum_s lambda_s Delta W_s on
    every mergeable tensor (task_arithmetic: scaling * sum; weight_average: the mean, 1 / n), else None."""
    method, experts = report.get("method"), report.get("experts") or []
    if report.get("kept") != [] or not experts:
        return None
    if method == "task_arithmetic":
        return {name: float(report["options"]["scaling"]) for name in experts}
    if method == "weight_average":
        return {name: 1.0 / len(experts) for name in experts}
    return None


def lowrank_plan(shared_dir: str | Path, expert: str, base_dir: str | Path, checkpoints_dir: str | Path
                 ) -> tuple[LowRankSource | None, str]:
    """(low-rank source, why) for compressing `expert` against the shared model in `shared_dir`: a source when
    it is exact (every involved expert a LoRA adapter folder, a linear merge of every tensor: `merge_lambdas`),
    else None and the reason. Only the shared model's twinmerge.json and the folders' adapter configs are read
    before the decision: full-weight experts cost nothing more than before."""
    report = json.loads((Path(shared_dir) / SHARED_META).read_text()).get("merge", {})
    lambdas = merge_lambdas(report)
    if lambdas is None:
        return None, f"the shared merge ({report.get('method')}, {len(report.get('kept', []))} tensors kept) " \
                     "is not linear over every tensor"
    names = [expert] + [n for n in lambdas if n != expert]
    full = [n for n in names if not is_adapter_folder(Path(checkpoints_dir) / n)]
    if full:
        return None, f"expert(s) {', '.join(full)} not LoRA adapters"
    pool = ExpertSet(base_dir, {n: Path(checkpoints_dir) / n for n in names})
    return linear_merge_source(pool, expert, lambdas), f"LoRA experts, {report['method']} merge"


def return_freed_memory() -> None:
    """Make glibc's malloc give every block of 1 MiB or more its own mmap, unmapped when freed. By default the
    threshold rises to the size of the largest block freed (up to 32 MiB), after which blocks of tensors this
    step frees stay in the heap: measured +66 MiB of peak RSS over a 30522 x 1024 matrix's Gram SVD. A no-op
    where the C library has no mallopt (not glibc)."""
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 2**20)
    except (OSError, AttributeError):
        pass


def compress(params: Params, expert: str, shared_dir: str | Path = "artifacts/shared",
             out_dir: str | Path = "artifacts/exclusive", progress: bool = True,
             base_dir: str | Path = "artifacts/base", checkpoints_dir: str | Path = "artifacts/checkpoints") -> dict:
    if expert not in params.experts:
        raise FactorError(f"params.yaml: experts: no expert named {expert!r} (have {sorted(params.experts)})")
    return_freed_memory()
    pool = ExpertSet(base_dir, {expert: Path(checkpoints_dir) / expert})  # the shared model carries the others
    rank_spec = RankSpec(params.compress.rank.mode, params.compress.rank.value)
    c = params.compress
    shared = SharedModel(shared_dir)  # CheckpointError naming the folder before its report is read
    source, why = lowrank_plan(shared_dir, expert, base_dir, checkpoints_dir)
    stream = FactorStream(pool, shared, expert, rank_spec, c.dtype, progress, c.factor_bits, c.group_size, source,
                          c.gram_svd_mib)
    n = len(stream.plan)
    if source is None:
        log.info("compress %s: dense path for all %d tensors (%s)", expert, n, why)
    else:
        log.info("compress %s: low-rank path for %d of %d tensors (%s)", expert, len(stream.lowrank_keys), n, why)
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
    params = load_params(args.params, registry=False)
    expert = stage_item(args.expert, "compress", "--expert")
    totals = compress(params, expert, progress=not args.no_progress)
    print({k: totals[k] for k in sorted(totals)})
