"""`twinmerge train-expert --task <task>`: fine-tune one expert of the embedded zoo.

A full fine-tune of the base (all weights), or with `zoo.lora` a PEFT LoRA adapter (plus the head), with a fresh
classification head
(`AutoModelForSequenceClassification`, `num_labels`, `id2label`/`label2id` from the task's labels.json), on the
task's train split (seeded shuffles, length-grouped batches: windows of 8 batches sorted by length); AdamW (no decay on biases and LayerNorm weights) and a linear schedule with warm-up, a plain
torch loop (no Trainer), seeded, `zoo.threads` torch threads (at most OMP_NUM_THREADS), dynamic padding up to `zoo.max_length`.

Writes `<experts_dir>/<task>/` atomically (temp folder, then rename) in Hugging Face layout
(model.safetensors, config.json, tokenizer files; LoRA: adapter_config.json, adapter_model.safetensors and the
labels in twinmerge_adapter.json) plus `scores.json`: validation and test accuracy and
macro-F1, the majority-class baseline on test (class chosen on train), the final loss and the params used: the
folder is a pure function of the inputs, the seed and the thread count (byte-identical on a re-run with as many
threads: min(zoo.threads, OMP_NUM_THREADS), which the flow's CPU split sets; float reductions differ with it),
so DVC and the registry's fingerprints see a re-trained expert as unchanged. Wall-clock timings go to
`logs/timings/train_expert-<task>.json` (git-ignored, no stage's dependency or output).
"""
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np

from tasks.fetch import locate_base_model
from tasks.params import TASK_NAMES, ParamsError, inside_project, load_params, stage_item
from tasks.prepare import load_label_names, load_split
from twinmerge.io import atomic_dir, write_json_atomic
from twinmerge.metrics import accuracy, macro_f1

log = logging.getLogger(__name__)

TIMINGS_DIR = Path("logs/timings")  # outside every DVC dependency and output


def _seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def predict(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    import torch

    model.eval()
    preds = []
    # length-sorted batches: less padding, same results
    order = np.argsort([len(t) for t in texts], kind="stable")
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            idx = order[i:i + batch_size]
            enc = tokenizer([texts[j] for j in idx], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            preds.append(model(**enc).logits.argmax(-1).numpy())
    out = np.empty(len(texts), dtype=np.int64)
    if preds:
        out[order] = np.concatenate(preds)
    return out


def length_grouped_batches(lengths: list[int], batch_size: int, gen, group: int = 8) -> list[list[int]]:
    """One epoch of batches: a seeded shuffle, then within each window of `group` batches the examples are
    sorted by length (less padding, so faster on CPU), and the batch order is shuffled again."""
    import torch

    perm = torch.randperm(len(lengths), generator=gen).tolist()
    window = batch_size * group
    batches = []
    for i in range(0, len(perm), window):
        chunk = sorted(perm[i:i + window], key=lambda j: lengths[j])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[o] for o in order]


def _with_lora(model, lora, base):
    """`model` wrapped by PEFT with a LoRA adapter (seeded init: the caller seeded torch); the adapter's
    `base_model_name_or_path` is the base's own name (its config.json's `_name_or_path`, else the folder)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="SEQ_CLS", r=lora.r, lora_alpha=lora.alpha, target_modules=lora.target_modules,
                        lora_dropout=lora.dropout)
    model = get_peft_model(model, config)
    base_config = Path(base) / "config.json"
    name = json.loads(base_config.read_text()).get("_name_or_path") if base_config.is_file() else None
    model.peft_config["default"].base_model_name_or_path = name or str(base)
    return model


def train_expert(task: str, params, out_dir: str | Path | None = None, progress: bool = True,
                 timings_dir: str | Path = TIMINGS_DIR) -> dict:
    """Fine-tune the expert of `task`; write it to `<experts_dir>/<task>` (or out_dir) and its wall-clock
    timings to `<timings_dir>/train_expert-<task>.json`; return scores plus {"timings": {...}}."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers
    from twinmerge.progress import progress_bar
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    zoo, data = params.zoo, params.data
    out_dir = Path(out_dir) if out_dir else Path(zoo.experts_dir) / task
    torch.set_num_threads(min(zoo.threads, torch.get_num_threads()))  # OMP_NUM_THREADS (flow) caps it
    _seed_all(params.seed)

    names = load_label_names(data.tasks_dir, task)
    splits = {s: load_split(data.tasks_dir, task, s) for s in ("train", "validation", "test")}
    base = locate_base_model(params.base, data.raw_dir)
    local = Path(base).is_dir()
    extra = {} if local else {"revision": params.base.revision, "subfolder": params.base.subfolder or ""}
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=local, **extra)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        local_files_only=local, **extra)
    model.config.problem_type = "single_label_classification"
    if zoo.lora:
        model = _with_lora(model, zoo.lora, base)

    texts = splits["train"]["text"].tolist()
    labels = torch.tensor(splits["train"]["label"].to_numpy(), dtype=torch.long)
    n = len(texts)
    steps_per_epoch = math.ceil(n / zoo.batch_size)
    total_steps = max(1, math.ceil(zoo.epochs * steps_per_epoch))
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    trained = [(k, p) for k, p in model.named_parameters() if p.requires_grad]  # LoRA: the adapter and the head
    groups = [
        {"params": [p for k, p in trained if not any(x in k for x in no_decay)], "weight_decay": zoo.weight_decay},
        {"params": [p for k, p in trained if any(x in k for x in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=zoo.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(round(zoo.warmup_ratio * total_steps)), total_steps)
    gen = torch.Generator().manual_seed(params.seed)

    log.info("%s: fine-tuning %s on %d examples, %d labels, %d steps", task, base, n, len(names), total_steps)
    t0 = time.perf_counter()
    model.train()
    step, losses = 0, []
    bar = progress_bar(total=total_steps, desc=f"train {task}", disable=not progress, unit="step")
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=zoo.max_length)["input_ids"]]
    while step < total_steps:
        for idx in length_grouped_batches(lengths, zoo.batch_size, gen):
            if step >= total_steps:
                break
            enc = tokenizer([texts[j] for j in idx], padding=True, truncation=True, max_length=zoo.max_length,
                            return_tensors="pt")
            loss = model(**enc, labels=labels[idx]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    train_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    scores = {"task": task, "num_labels": len(names), "labels": names}
    for split in ("validation", "test"):
        y = splits[split]["label"].to_numpy()
        p = predict(model, tokenizer, splits[split]["text"].tolist(), zoo.max_length)
        scores[split] = {"accuracy": accuracy(p, y), "macro_f1": macro_f1(p, y), "n": int(len(y))}
    majority = int(splits["train"]["label"].value_counts().idxmax())
    y_test = splits["test"]["label"].to_numpy()
    scores["majority_baseline"] = {"label": names[majority], "test_accuracy": accuracy(np.full_like(y_test, majority), y_test),
                                   "test_macro_f1": macro_f1(np.full_like(y_test, majority), y_test)}
    scores["train"] = {"n": n, "steps": total_steps, "final_loss": float(np.mean(losses[-20:]))}
    scores["params"] = {"seed": params.seed, "base": str(base),
                        **zoo.model_dump(exclude={"experts_dir"} | ({"lora"} if zoo.lora is None else set()))}
    scores["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}

    for config in getattr(model, "peft_config", {}).values():  # PEFT keeps target_modules as a set and writes it
        for key, value in vars(config).items():                  # in hash order, which differs per process
            if isinstance(value, set):
                setattr(config, key, sorted(value))
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)  # LoRA: adapter_config.json + adapter_model.safetensors
        if zoo.lora:  # the labels, where twinmerge.lora reads them (a config.json would look like a full model)
            labels = {k: getattr(model.config, k) for k in ("num_labels", "id2label", "label2id", "problem_type")}
            (tmp / "twinmerge_adapter.json").write_text(json.dumps({"expert": task, "labels": labels}, indent=2))
        tokenizer.save_pretrained(tmp)
        (tmp / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    timings = {"task": task, "train_seconds": round(train_s, 2), "eval_seconds": round(time.perf_counter() - t1, 2)}
    write_json_atomic(timings, Path(timings_dir) / f"train_expert-{task}.json")
    log.info("%s: test accuracy %.3f, macro-F1 %.3f (majority %.3f), %.0f s", task, scores["test"]["accuracy"],
             scores["test"]["macro_f1"], scores["majority_baseline"]["test_accuracy"], train_s)
    return {**scores, "timings": timings}


def add_arguments(parser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--task", choices=TASK_NAMES,
                        help="which task's expert to train (default: <task> of $DVC_STAGE train_expert@<task>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    params = load_params(args.params)
    task = stage_item(args.task, "train_expert", "--task")
    if task not in TASK_NAMES:  # from $DVC_STAGE (argparse checks --task)
        raise ParamsError(f"train-expert: unknown task '{task}'; known: {list(TASK_NAMES)}")
    out_dir = inside_project(params.zoo.experts_dir, "zoo.experts_dir", args.params) / task
    s = train_expert(task, params, out_dir, progress=not args.no_progress)
    print(f"{task}: test accuracy {s['test']['accuracy']:.3f}  macro-F1 {s['test']['macro_f1']:.3f}  "
          f"majority {s['majority_baseline']['test_accuracy']:.3f}  train {s['timings']['train_seconds']:.0f} s")
    return 0
