"""Batched generation speed of `twinmerge.decoder.RoutedCausalLM` against the static shared model (not a test).

A random Llama-style causal LM (default hidden 512, 8 layers, intermediate 1408, vocab 8192, float32) is the
shared model theta_s; n experts (default 6) each get exclusive knowledge as SVD factors of rank rho * min(m, n)
(default 10%) on every Linear and the embedding (random factors: speed does not depend on their values). A
batch of prompts (default 16 x 32 tokens) generates `--new` tokens greedily with HF `generate` (KV cache):
  - static: the shared model itself (what a static merge costs);
  - all experts: per-sample soft weights over every expert (the batched path);
  - top-2, top-1: each prompt's 2 / 1 largest weights (grouped path, segments per expert);
  - top-1 cached: top-1 with every expert's Linear weights materialised (`cache_experts`).
The routes are random but fixed by the seed; each mode runs `--repeats` times after one warm-up, best time kept.
Prints generated tokens/s per mode and the lines `<mode> / static = X`.

    python benchmarks/generation.py [--hidden 512 --layers 8 --experts 6 --rank 0.1 --batch 16 --prompt 32
                                     --new 32 --threads 2 --repeats 3]
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from twinmerge.decoder import RoutedCausalLM  # noqa: E402
from twinmerge.exclusive import ExclusiveFactors  # noqa: E402


def random_factors(model, n, rho, seed=0):
    """n delta sets: rank-ceil(rho min(m, n)) random factors on every 2-D weight (Linear, embedding)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(n):
        lowrank = {}
        for name, p in model.named_parameters():
            if p.dim() == 2:
                m, k = p.shape
                r = max(1, round(rho * min(m, k)))
                lowrank[name] = (torch.randn(m, r, generator=g) / m ** 0.5, 0.01 * torch.rand(r, generator=g),
                                 torch.randn(k, r, generator=g) / k ** 0.5)
        out.append(ExclusiveFactors(f"e{t}", model.config.to_dict(), lowrank, {}, {}, {}))
    return out


def best_seconds(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--experts", type=int, default=6)
    ap.add_argument("--rank", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                         vocab_size=args.vocab, max_position_embeddings=args.prompt + args.new + 8,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    shared = LlamaForCausalLM(config).eval()
    factors = random_factors(shared, args.experts, args.rank)
    routed = RoutedCausalLM(copy.deepcopy(shared), factors, cache_experts=args.experts)
    uncached = RoutedCausalLM(copy.deepcopy(shared), factors)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, args.vocab, (args.batch, args.prompt), generator=g)
    mask = torch.ones_like(ids)
    weights = torch.softmax(3 * torch.randn(args.batch, args.experts, generator=g), 1)
    kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
    routed.expert_cache.admit(range(args.experts))
    modes = {
        "static": lambda: shared.generate(input_ids=ids, attention_mask=mask, **kw),
        "dynamic (all experts)": lambda: routed.generate(ids, mask, weights, **kw),
        "dynamic (top-2)": lambda: routed.generate(ids, mask, weights, top_k=2, **kw),
        "dynamic (top-1)": lambda: uncached.generate(ids, mask, weights, top_k=1, **kw),
        "cached (top-1)": lambda: routed.generate(ids, mask, weights, top_k=1, **kw),
    }
    tokens = args.batch * args.new
    print(f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {args.experts} experts at rank "
          f"{args.rank:.0%}; batch {args.batch} x {args.prompt} prompt tokens, {args.new} new; {args.threads} threads")
    with torch.inference_mode():
        seconds = {mode: best_seconds(fn, args.repeats) for mode, fn in modes.items()}
    for mode, s in seconds.items():
        print(f"{mode:22s} {tokens / s:8.1f} generated tokens/s")
    for mode, s in seconds.items():
        if mode != "static":
            print(f"{mode} / static = {seconds['static'] / s:.2f}")


if __name__ == "__main__":
    main()
