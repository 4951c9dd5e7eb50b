"""Inference cost of Twin-Merging's dynamic merging (not a test): speed, memory and, on the real bundle, score.

Part 1, a MiniLM-sized random BERT with 6 experts' random rank-10% factors (timing only), batch 32 x seq 64:
the static shared model; RoutedDeltaModel over all experts (batched path), top-2 and top-1 (grouped path: one
GEMM pair per expert segment of the sorted batch), top-1 with every expert's Linear weights materialised
(`cache_experts=6`); and the official approach (a dense parameter set theta_s + sum_t w_t v_t materialised per
sample, run at batch 1 with torch.func.functional_call, v_t pre-stored dense as the official code does).

Part 2, the real default bundle (`artifacts/twin`, when present: shared MiniLM + 6 experts' float16 rank-10%
factors + router, loaded with TwinBundle.load): the same modes on 32 real test texts routed by the real router;
each mode's strict router-head accuracy on a sample of every task's test split (the router's argmax picks the
expert and its head; a misrouted input is wrong); `predict` latency p50/p95 at batch 1 (router included).

Ratios are samples/s of a mode over the static model's on the same inputs with the same thread count: every
configuration runs once per round, interleaved, and a ratio is the median over rounds of that round's ratio
(robust to the load of a shared machine). The `<mode> / static = X` lines use wall clock; the same ratios from
the process's CPU time are printed beside them (with 1 thread: the time the work itself took, less sensitive
to other processes; with more threads a work ratio). Model forward only: routing features come beforehand.
Memory: peak RSS above the level before one warm call, sampled every millisecond with psutil (tracemalloc does
not see torch's allocations; torch keeps no allocator statistics on CPU), plus the model tensors a mode holds.

    python benchmarks/inference.py [--quick] [--threads 1] [--bundle artifacts/twin] [--per-task 100]
"""
import argparse
import copy
import ctypes
import dataclasses
import gc
import statistics
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import torch
from torch.func import functional_call
from transformers import BertConfig, BertForSequenceClassification

from twinmerge.bundle import TwinBundle
from twinmerge.exclusive import ExclusiveFactors
from twinmerge.metrics import answered_predictions
from twinmerge.modelpool import map_batches
from twinmerge.routed import RoutedDeltaModel

LIBC = ctypes.CDLL("libc.so.6")
N_EXPERTS, BATCH, SEQ, RANK_FRACTION = 6, 32, 64, 0.1
CONFIG = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, max_position_embeddings=512)


def build(seed=0):
    """(shared model, factors per expert, dense v_t per expert): 6 experts with random rank-10% factors of every
    2-D tensor and random 1-D deltas (timing only: the cost depends on shapes, not values)."""
    torch.manual_seed(seed)
    shared = BertForSequenceClassification(BertConfig(**CONFIG, num_labels=2)).eval()
    state = {n: v for n, v in shared.state_dict().items() if v.is_floating_point() and "classifier" not in n}
    factors, dense = [], []
    for t in range(N_EXPERTS):
        lowrank, rest = {}, {}
        for n, v in state.items():
            if v.dim() == 2:
                r = max(1, int(RANK_FRACTION * min(v.shape)))
                lowrank[n] = (torch.randn(v.shape[0], r) / v.shape[0] ** 0.5, 0.01 * torch.rand(r),
                              torch.randn(v.shape[1], r) / v.shape[1] ** 0.5)
            else:
                rest[n] = 0.01 * torch.randn_like(v)
        cfg = BertConfig(**CONFIG, num_labels=2 + t).to_dict()
        head = {"classifier.weight": torch.randn(2 + t, 384) * 0.02, "classifier.bias": torch.zeros(2 + t)}
        factors.append(ExclusiveFactors(f"expert{t}", cfg, lowrank, rest, head, {}))
        dense.append({n: factors[-1].delta(n) for n in state})
    return shared, factors, dense


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


class PeakRSS:
    """Peak resident set size above the level at entry, sampled every millisecond by a thread."""

    def __enter__(self):
        self.proc, self.stop, self.peak = psutil.Process(), False, 0
        self.start = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss - self.start)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


def measure(configs, repeats):
    """Per configuration (label, fn, samples per call, tensor bytes): a warm-up call (fills caches), the peak
    RSS of one more call above the level before it, then `repeats` rounds timing one call of every
    configuration in turn (all see the same load on a shared machine), by wall clock and by the process's CPU
    time. Returns rows (label, median samples/s, median over rounds of the round's samples/s ratio to the first
    configuration by wall clock, the same by CPU time, peak RSS bytes, tensor bytes)."""
    with torch.inference_mode():
        for _, fn, _, _ in configs:
            fn()
        peaks = []
        for _, fn, _, _ in configs:
            gc.collect()
            LIBC.malloc_trim(0)  # hand freed heap back to the OS so the peak reflects this configuration
            with PeakRSS() as mem:
                fn()
            peaks.append(mem.peak)
        wall, cpu = [[] for _ in configs], [[] for _ in configs]
        for _ in range(repeats):
            for i, (_, fn, _, _) in enumerate(configs):
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                wall[i].append(time.perf_counter() - start)
                cpu[i].append(time.process_time() - start_cpu)

    def ratio(times, i):
        per = configs[i][2] / configs[0][2]
        return statistics.median(per * t0 / t for t, t0 in zip(times[i], times[0]))

    return [(label, samples / statistics.median(wall[i]), ratio(wall, i), ratio(cpu, i), peaks[i], nbytes)
            for i, (label, _, samples, nbytes) in enumerate(configs)]


def print_table(rows):
    print(f"| {'configuration':<42} | {'samples/s (median)':>18} | {'/ static':>8} | {'CPU time':>8} | "
          f"{'peak RSS +MiB':>13} | {'model tensors MiB':>17} |")
    print(f"|{'-' * 44}|{'-' * 20}|{'-' * 10}|{'-' * 10}|{'-' * 15}|{'-' * 19}|")
    for label, speed, ratio, cpu_ratio, peak, nbytes in rows:
        print(f"| {label:<42} | {speed:>18.1f} | {ratio:>8.2f} | {cpu_ratio:>8.2f} | {peak / 2**20:>13.1f} | "
              f"{nbytes / 2**20:>17.1f} |")
    print("(/ static: samples/s over the static model's by wall clock, median of per-round ratios; CPU time: the "
          "same ratio from the process's CPU time, less sensitive to other load on the machine)")


TARGETS = {"dynamic (all)": 0.45, "dynamic (top-2)": 0.65, "dynamic (top-1)": 0.75, "cached (top-1)": 0.9}


def print_ratios(rows):
    """The `<mode> / static = X` lines (wall clock) of the four dynamic modes (rows 1-4), their CPU-time
    ratios, and the targets."""
    wall = {label.split(",")[0]: r for label, _, r, _, _, _ in rows[1:5]}
    cpu = {label.split(",")[0]: r for label, _, _, r, _, _ in rows[1:5]}
    for mode in TARGETS:
        print(f"{mode} / static = {wall[mode]:.2f}")
    print("by CPU time: " + ", ".join(f"{m} {cpu[m]:.2f}" for m in TARGETS))
    for name, ratios in (("wall clock", wall), ("CPU time", cpu)):
        print(f"targets ({name}): " + ", ".join(f"{m} >= {t} {'met' if ratios[m] >= t else 'MISSED'}"
                                                 for m, t in TARGETS.items()))


def modes(dyn, cached, inputs, weights):
    """The four dynamic configurations on one batch (inputs: input_ids, attention_mask[, token_type_ids]):
    all experts, top-2, top-1 (model `dyn`), top-1 with every expert materialised (model `cached`)."""
    batch, n = weights.shape
    return [
        ("dynamic (all), batched", lambda: dyn(**inputs, weights=weights), batch, model_bytes(dyn)),
        ("dynamic (top-2), grouped", lambda: dyn(**inputs, weights=weights, top_k=2), batch, model_bytes(dyn)),
        ("dynamic (top-1), grouped", lambda: dyn(**inputs, weights=weights, top_k=1), batch, model_bytes(dyn)),
        (f"cached (top-1), {n} experts materialised", lambda: cached(**inputs, weights=weights, top_k=1), batch,
         model_bytes(cached)),
    ]


def model_bytes(dyn):
    """Bytes a RoutedDeltaModel holds: backbone, heads, factor buffers and its expert cache."""
    return tensor_bytes(dyn.model.state_dict().values()) + tensor_bytes(dyn.buffers()) + dyn.expert_cache.nbytes


def random_model(repeats, per_sample_n):
    """Part 1: the MiniLM-sized random BERT."""
    t0 = time.perf_counter()
    shared, factors, dense = build()
    print(f"built model + {N_EXPERTS} experts' factors in {time.perf_counter() - t0:.0f} s")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[BATCH // 2:, SEQ // 2:] = 0  # half the batch padded to half length
    weights = torch.softmax(torch.randn(BATCH, N_EXPERTS, generator=g), 1)

    static_bytes = tensor_bytes(shared.state_dict().values())
    dyn = RoutedDeltaModel(copy.deepcopy(shared), factors)
    cached = RoutedDeltaModel(copy.deepcopy(shared), factors, cache_experts=N_EXPERTS)
    cached.expert_cache.admit(range(N_EXPERTS))
    shared_params = shared.state_dict()
    heads = [(f.head["classifier.weight"], f.head["classifier.bias"]) for f in factors]
    dense_bytes = tensor_bytes(v for d in dense for v in d.values())

    def per_sample():  # official: one dense parameter set per sample, batch size 1
        for b in range(per_sample_n):
            params = {}
            for n in dense[0]:
                params[n] = shared_params[n].clone()
                for t in range(N_EXPERTS):
                    params[n].add_(dense[t][n], alpha=float(weights[b, t]))
            t = int(weights[b].argmax())
            params["classifier.weight"], params["classifier.bias"] = heads[t]
            functional_call(shared, params, (ids[b:b + 1],), {"attention_mask": mask[b:b + 1]})

    rows = measure([
        ("static shared model", lambda: shared(input_ids=ids, attention_mask=mask), BATCH, static_bytes),
        *modes(dyn, cached, {"input_ids": ids, "attention_mask": mask}, weights),
        ("official: dense theta per sample, batch 1", per_sample, per_sample_n, static_bytes + dense_bytes),
    ], repeats)

    print(f"\nrandom MiniLM-sized BERT: batch {BATCH} x seq {SEQ}, {N_EXPERTS} experts, rank {RANK_FRACTION:.0%} "
          f"of min(m, n), torch {torch.__version__}, {torch.get_num_threads()} threads, {repeats} rounds\n")
    print_table(rows)
    print()
    print_ratios(rows)
    print(f"dynamic (all) / per-sample = {rows[1][2] / rows[5][2]:.1f}")
    factor_elems = sum(u.numel() + s.numel() + v.numel() for f in factors for u, s, v in f.lowrank.values())
    dense_1d = sum(v.numel() for f in factors for v in f.dense.values())
    dense_elems = dense_bytes // 4
    print(f"exclusive bytes / dense bytes = {(factor_elems + dense_1d) / dense_elems:.1%} with float32 factors, "
          f"{(factor_elems / 2 + dense_1d) / dense_elems:.1%} with float16 U/V/S (1-D dense float32)"
          "   (target <= 15%)")
    print(f"expert cache: {cached.expert_cache.nbytes / 2**20:.1f} MiB for {N_EXPERTS} experts "
          f"(static model {static_bytes / 2**20:.1f} MiB)")


def score_sample(bundle, bundle_dir, per_task, seed=0):
    """(texts, task index [N], labels [N]): up to `per_task` seeded random rows of every expert's test split."""
    texts, tasks, labels = [], [], []
    for t, name in enumerate(bundle.experts):
        path = Path(bundle_dir).parent / "taskdata" / name / "test.parquet"
        frame = pd.read_parquet(path)
        frame = frame.sample(n=min(per_task, len(frame)), random_state=seed)
        texts += frame["text"].tolist()
        tasks += [t] * len(frame)
        labels += frame["label"].tolist()
    return texts, torch.tensor(tasks), torch.tensor(labels)


def strict_accuracy(bundle, model, texts, weights, tasks, labels, top_k):
    """Mean over tasks of the strict router-head accuracy x100, and per task: the router's argmax picks the
    expert and head; an input answered by another task's head is wrong."""
    logits = map_batches(lambda idx, enc: model(**enc, weights=weights[torch.tensor(idx)], top_k=top_k).logits,
                         bundle.tokenizer, texts, 32, bundle.max_length)
    heads = weights.argmax(1)
    per_task = {}
    for t, name in enumerate(bundle.experts):
        rows = tasks == t
        preds = answered_predictions(logits[rows], heads[rows], t)
        per_task[name] = 100.0 * float((preds == labels[rows]).float().mean())
    return sum(per_task.values()) / len(per_task), per_task


def latency(bundle, cached_bundle, texts, static_fn):
    """predict() latency p50/p95 (ms) at batch 1 per mode (router included), modes interleaved per text; and
    the static model's forward alone, for reference."""
    calls = {"static model forward (no router)": static_fn,
             "predict, all experts": lambda x: bundle.predict([x]),
             "predict, top-2": lambda x: bundle.predict([x], top_k=2),
             "predict, top-1": lambda x: bundle.predict([x], top_k=1),
             "predict, cached top-1": lambda x: cached_bundle.predict([x], top_k=1)}
    times = {k: [] for k in calls}
    for fn in calls.values():
        fn(texts[0])
    for text in texts:
        for k, fn in calls.items():
            start = time.perf_counter()
            fn(text)
            times[k].append(1e3 * (time.perf_counter() - start))
    for k, ts in times.items():
        q = statistics.quantiles(ts, n=20)
        print(f"{k:<34} p50 {statistics.median(ts):7.1f} ms   p95 {q[18]:7.1f} ms   ({len(ts)} texts)")


def real_bundle(args, repeats):
    """Part 2: the real default bundle."""
    t0 = time.perf_counter()
    bundle = TwinBundle.load(args.bundle)
    n = len(bundle.experts)
    cached = copy.deepcopy(bundle.dynamic)
    cached.expert_cache.resize(n)
    cached.expert_cache.admit(range(n))
    print(f"\nloaded {args.bundle} ({n} experts) in {time.perf_counter() - t0:.0f} s")
    texts, tasks, labels = score_sample(bundle, args.bundle, args.per_task)
    with torch.inference_mode():
        weights = bundle.router.weights(bundle.feature_model, texts, bundle.temperature, progress=False)
    pick = torch.randperm(len(texts), generator=torch.Generator().manual_seed(2))[:BATCH]
    enc = bundle.tokenizer([texts[i] for i in pick], truncation=True, max_length=bundle.max_length, padding=True,
                           return_tensors="pt")
    static = bundle.feature_model
    rows = measure([
        ("static shared model", lambda: static(**enc), BATCH, tensor_bytes(static.state_dict().values())),
        *modes(bundle.dynamic, cached, dict(enc), weights[pick]),
    ], repeats)
    groups = weights[pick].argmax(1).bincount(minlength=n).tolist()
    print(f"\nreal bundle: batch {BATCH} real test texts x seq {enc['input_ids'].shape[1]} (padded to the longest), "
          f"inputs per top-1 expert {groups}, {torch.get_num_threads()} threads, {repeats} rounds\n")
    print_table(rows)
    print()
    print_ratios(rows)
    print(f"expert cache: {cached.expert_cache.nbytes / 2**20:.1f} MiB for {n} experts")

    print(f"\nstrict router-head accuracy (x100, mean over {n} tasks) on {len(texts)} test texts "
          f"(<= {args.per_task} per task, seeded sample):")
    scores = {}
    for label, model, k in [("all experts", bundle.dynamic, None), ("top-2", bundle.dynamic, 2),
                            ("top-1", bundle.dynamic, 1), ("cached top-1", cached, 1)]:
        with torch.inference_mode():
            scores[label], per_task = strict_accuracy(bundle, model, texts, weights, tasks, labels, k)
        print(f"  {label:<13} {scores[label]:6.2f}   " + "  ".join(f"{t} {v:.1f}" for t, v in per_task.items()))
    print(f"top-1 - all experts = {scores['top-1'] - scores['all experts']:+.2f} points   (target >= -0.3)")
    print(f"cached top-1 - top-1 = {scores['cached top-1'] - scores['top-1']:+.2f} points")

    print("\npredict() latency at batch 1:")
    cached_bundle = dataclasses.replace(bundle, dynamic=cached)
    sample = [texts[i] for i in pick.tolist()[: args.latency_texts]]

    def static_fn(text):
        with torch.inference_mode():
            static(**bundle.tokenizer([text], truncation=True, max_length=bundle.max_length, return_tensors="pt"))

    latency(bundle, cached_bundle, sample, static_fn)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--bundle", default="artifacts/twin", help="real bundle folder (part 2 when present)")
    parser.add_argument("--per-task", type=int, default=100, help="test texts per task for the accuracy")
    parser.add_argument("--latency-texts", type=int, default=32, help="texts for the batch-1 latency")
    parser.add_argument("--skip-random", action="store_true", help="only the real bundle")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats, per_sample_n = (3, 2) if args.quick else (7, 4)
    if not args.skip_random:
        random_model(repeats, per_sample_n)
    if (Path(args.bundle) / "twin.json").is_file():
        real_bundle(args, repeats)
    else:
        print(f"\n{args.bundle}: no bundle, real-bundle part skipped")


if __name__ == "__main__":
    main()
