"""Step `bundle`: shared model + factors + router + heads + config -> `artifacts/twin/`
(load it with `twinmerge.bundle.TwinBundle.load`; `twinmerge predict` uses it)."""
from pathlib import Path

from tasks.params import Params, load_params
from twinmerge.bundle import write_bundle


def bundle(params: Params, out_dir="artifacts/twin", shared_dir="artifacts/shared",
           factors_dir="artifacts/exclusive", router_dir="artifacts/router") -> Path:
    files = {n: Path(factors_dir) / f"{n}.safetensors" for n in params.experts}
    tasks = {n: spec.task for n, spec in params.experts.items()}
    e = params.evaluate
    return write_bundle(out_dir, shared_dir, files, router_dir, tasks, e.max_length, e.temperature, e.top_k)


def add_arguments(parser) -> None:
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="artifacts/twin")


def main(args) -> None:
    print(bundle(load_params(args.params), args.out))
