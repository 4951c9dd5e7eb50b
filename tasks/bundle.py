"""Step `bundle`: shared model + factors + router + heads + config (+ the evaluation's metrics, for the model
card) -> `artifacts/twin/` (load it with `twinmerge.bundle.TwinBundle.load`; `twinmerge predict` uses it)."""
import json
import logging
from pathlib import Path

from tasks.params import Params, load_params
from twinmerge.bundle import write_bundle

log = logging.getLogger(__name__)


def bundle(params: Params, out_dir="artifacts/twin", shared_dir="artifacts/shared",
           factors_dir="artifacts/exclusive", router_dir="artifacts/router",
           metrics_path: str | Path | None = "artifacts/eval/metrics.json") -> Path:
    files = {n: Path(factors_dir) / f"{n}.safetensors" for n in params.experts}
    tasks = {n: spec.task for n, spec in params.experts.items()}
    metrics = None
    if metrics_path and Path(metrics_path).is_file():
        metrics = json.loads(Path(metrics_path).read_text())
    elif metrics_path:  # `twinmerge bundle` before `evaluate` (dvc.yaml orders them): a card without scores
        log.warning("%s not found: the bundle's model card will have no scores", metrics_path)
    e = params.evaluate
    return write_bundle(out_dir, shared_dir, files, router_dir, tasks, e.max_length, e.temperature, e.top_k,
                        metrics, params.base.repo_id, e.max_new_tokens if params.generative else None)


def add_arguments(parser) -> None:
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="artifacts/twin")


def main(args) -> None:
    print(bundle(load_params(args.params), args.out))
