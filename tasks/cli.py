"""`twinmerge` command line. Each sub-command lives in its own module of `tasks/`, which defines
`add_arguments(parser)` and `main(args) -> int | None`; `dvc.yaml` calls these sub-commands.

Errors that users can fix (bad params, bad checkpoints, missing sources) print one line and exit 2.
"""
import argparse
import importlib
import logging
import os
import sys

COMMANDS = {
    # name: (module, one-line help)
    "fetch": ("tasks.fetch", "download the embedded default's sources into data/raw with a manifest"),
    "prepare": ("tasks.prepare", "build the six task tables with seeded stratified splits"),
    "train-expert": ("tasks.train_expert", "fine-tune one expert of the embedded zoo"),
    "download": ("tasks.download", "resolve the base or one expert into artifacts/ (validated, sha256 manifest)"),
    "modularize": ("tasks.modularize", "merge the experts into the shared expert"),
    "compress": ("tasks.compress", "one expert's exclusive knowledge as SVD factors"),
    "router": ("tasks.route", "fit the router on the inputs of router.splits (validation by default)"),
    "score-experts": ("tasks.score_experts", "score the experts (validation, test) and the base (with expert heads, or zero-shot for causal LMs)"),
    "method": ("tasks.method", "build one method of params.methods and score it on the test splits"),
    "evaluate": ("tasks.evaluate", "gather the experts' and every method's rows into artifacts/eval/metrics.json"),
    "report": ("tasks.report", "comparison table and plots"),
    "bundle": ("tasks.bundle", "pack shared model, factors, router and heads into artifacts/twin"),
    "predict": ("tasks.predict", "route raw texts with a bundle: classify, or generate (causal LMs)"),
    "export-peft": ("tasks.export_peft", "write each expert of a bundle as a PEFT LoRA adapter over its shared model"),
    "expert": ("tasks.registry", "expert registry: add (validated, emits expert.added) or list with status"),
    "history": ("tasks.history", "evaluation history: append the current metrics or show the records"),
    "serve": ("flows.serve", "serve the watch deployment (cron + expert.added trigger) on a Prefect server"),
    "run": ("flows.pipeline", "run every dvc.yaml stage as a Prefect flow (DVC decides what is stale)"),
}


def _user_errors() -> tuple[type[BaseException], ...]:
    from tasks.params import ParamsError
    from twinmerge.errors import TwinMergeError

    return (ParamsError, TwinMergeError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="twinmerge", description="Twin-Merging pipeline steps and tools.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if a in COMMANDS), None)
    module = None
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the chosen step (torch/transformers imports take seconds)
            module = importlib.import_module(module_name)
            module.add_arguments(p)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # huggingface_hub's HTTP client logs every request at INFO
        for noisy in ("httpx", "httpx2", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(module.main(args) or 0)
    except _user_errors() as e:
        if args.verbose:
            raise
        print(f"twinmerge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
