"""How a learning method's validation score moves with more steps (not a test; needs the default's artifacts).

Runs AdaMerging (task- or layer-wise) on the validation inputs for `--steps` steps with the method's default
batch size, max_length and lr, and at each checkpoint scores the current merge on the validation selection
subset (mean normalised score, task id picks the head) and prints the summed entropy and wall time so far.
The selection subset's labels are only read to report, never to learn.

    python benchmarks/learning_steps.py [--granularity task|layer] [--steps 150] [--every 25]
"""
import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from tasks.method import task_pool
from tasks.modularize import open_pool
from tasks.params import load_params
from twinmerge.learning import fit
from twinmerge.methods import METHODS, Context
from twinmerge.methods.learned import _cast, _Setup
from twinmerge.taskpool import summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--granularity", default="layer", choices=["task", "layer"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=25)
    args = parser.parse_args()
    params = load_params("params.yaml")
    pool = open_pool(params, "artifacts/base", "artifacts/checkpoints")
    tokenizer = AutoTokenizer.from_pretrained("artifacts/base")
    reference = json.loads(Path("artifacts/eval/experts.json").read_text())["validation"]
    ctx = Context(pool, task_pool(params, pool, "validation", tokenizer), reference,
                  task_pool(params, pool, "validation", tokenizer, capped=False), params.seed, progress=False)
    opts = METHODS["adamerging"].defaults
    setup = _Setup(ctx)
    tasks, _ = setup.unsupervised_tasks(ctx)
    lam = setup.coefficients(args.granularity, opts["init"])
    coef, probe = setup.coef_fn(lam), setup.probe(ctx, opts["batch_size"], opts["max_length"])
    state = {"step": 0, "loss": None, "start": time.perf_counter(), "paused": 0.0}

    def score() -> None:
        paused = time.perf_counter()
        backbone = _cast(ctx, setup.tv.combine(coef))
        mean = summarize(ctx.validation.score_backbone(backbone, "val"), reference)["mean_normalized"]
        learning = paused - state["start"] - state["paused"]
        loss = "-" if state["loss"] is None else f"{state['loss']:.3f}"
        print(f"step {state['step']:4d}  validation mean normalised {mean:6.2f}  entropy sum {loss}  "
              f"learning {learning:6.1f} s", flush=True)
        state["paused"] += time.perf_counter() - paused

    def loss_at(step: int) -> torch.Tensor:
        loss = setup.entropy_loss(setup.tv.combine(coef), probe, tasks, step)
        state["loss"] = float(loss.detach())
        return loss

    def after_step() -> None:  # one Adam run for all steps; scoring time is not counted as learning
        lam.clamp_(0.0, 1.0)
        state["step"] += 1
        if state["step"] % args.every == 0:
            score()

    print(f"AdaMerging {args.granularity}-wise: batch {opts['batch_size']} per task, max_length "
          f"{opts['max_length']}, lr {opts['lr']}, one thread")
    with torch.no_grad():
        score()
    fit([lam], loss_at, args.steps, opts["lr"], after_step=after_step, progress=False)


if __name__ == "__main__":
    main()
