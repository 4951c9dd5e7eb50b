"""WEMoE (twinmerge.wemoe, twinmerge.methods.wemoe) on tiny random BERT experts: the batched routed-delta mixing
equals per-sample materialised MLPs, padding does not move a sample's gate weights, only the gates learn and the
entropy drops, builds are byte-identical for the same seed, and zero-std gates are Task Arithmetic 0.3."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from twinmerge.errors import MergeError
from twinmerge.io import ExpertSet
from twinmerge.learning import entropy
from twinmerge.methods.base import Context
from twinmerge.methods.wemoe import WEMoE
from twinmerge.modelpool import assemble_classifier
from twinmerge.taskpool import TaskPool
from twinmerge.wemoe import GatedEntry, build_wemoe, mlp_layout

LAMBDA = 0.3


@pytest.fixture(scope="module")
def pool(tiny_bert):
    return ExpertSet(*tiny_bert)


def _batch(seed=1, lengths=(7, 3, 9, 5, 9, 2)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def _reference(pool, gates, head, ids, scaling=LAMBDA):
    """Expert `head`'s classifier on ONE unpadded sample: TA(scaling) outside the MLPs; layer i's MLP weights
    materialised as W_0 + sum_t r_t tau_t with r = mean over the sample's tokens of fc2(relu(fc1(h))), h = the
    input of layer i's `intermediate` (set in a forward pre-hook, before either MLP linear runs)."""
    names, keys = pool.names, pool.mergeable_keys()
    base = {k: pool.base_tensor(k).double() for k in keys}
    tau = {k: [pool.expert_tensor(n, k).double() - base[k] for n in names] for k in keys}
    layout = mlp_layout(keys)
    mlp = {k for item in layout.values() for k in item["keys"]}
    state = {k: base[k] if k in mlp else base[k] + scaling * sum(tau[k]) for k in keys}
    state.update({k: pool.expert_tensor(names[head], k) for k in pool.head_keys()})
    model = assemble_classifier(pool.experts[names[head]].config, state).double()

    def hook(entry):
        def pre(module, args):
            g = {n: gates[f"{entry}.{n}"].double() for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}
            r = F.linear(torch.relu(F.linear(args[0], g["fc1.weight"], g["fc1.bias"])), g["fc2.weight"],
                         g["fc2.bias"]).mean(1)[0]
            for path in layout[entry]["linears"]:
                linear = model.get_submodule(path)
                for p in ("weight", "bias"):
                    k = f"{path}.{p}"
                    getattr(linear, p).data = base[k] + sum(float(r[t]) * tau[k][t] for t in range(len(names)))
        return pre

    for entry in layout:
        model.get_submodule(entry).register_forward_pre_hook(hook(entry))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]


def test_batched_mixing_equals_per_sample_materialised_mlps(pool):
    model = build_wemoe(pool, LAMBDA, std=0.5, seed=3, dtype=torch.float64)  # large std: weights differ per sample
    gates = model.gate_state()
    ids, mask = _batch()
    heads = torch.tensor([0, 2, 1, 1, 0, 2])
    with torch.no_grad():
        out = model(ids, mask, head_ids=heads, weights=torch.zeros(6, 3), top_k=1)
    assert out.head_ids.tolist() == heads.tolist() and out.num_labels.tolist() == [2, 4, 3, 3, 2, 4]
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        ref = _reference(pool, gates, int(heads[b]), ids[b:b + 1, :n])
        got = out.per_sample()[b]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        assert torch.isinf(out.logits[b, len(ref):]).all()


def _layer_weights(model, ids, mask, heads):
    """{entry: r [B, T]} of every layer (captured after each GatedEntry ran)."""
    seen, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, GatedEntry):
            handles.append(module.register_forward_hook(
                lambda m, a, o, name=name: seen.__setitem__(name, m.routing.dense.clone())))
    with torch.no_grad():
        out = model(ids, mask, head_ids=heads)
    for h in handles:
        h.remove()
    return seen, out


def test_padding_does_not_change_weights_and_head_fallback(pool):
    model = build_wemoe(pool, LAMBDA, std=0.5, seed=4, dtype=torch.float64)
    ids, mask = _batch(seed=2, lengths=(6, 3, 8))
    heads = torch.tensor([1, 0, 2])
    r_batch, out = _layer_weights(model, ids, mask, heads)
    padded_ids, padded_mask = F.pad(ids, (0, 5)), F.pad(mask, (0, 5))  # 5 more padding columns
    r_pad, out_pad = _layer_weights(model, padded_ids, padded_mask, heads)
    for b, n in enumerate(mask.sum(1).tolist()):
        r_one, out_one = _layer_weights(model, ids[b:b + 1, :n], mask[b:b + 1, :n], heads[b:b + 1])
        for entry, r in r_batch.items():
            torch.testing.assert_close(r[b], r_one[entry][0], atol=1e-12, rtol=0)
            torch.testing.assert_close(r_pad[entry][b], r_one[entry][0], atol=1e-12, rtol=0)
        torch.testing.assert_close(out.logits[b], out_pad.logits[b], atol=1e-10, rtol=0)
    assert len(r_batch) == 2 and all(r.shape == (3, 3) for r in r_batch.values())
    # weights only pick the head (argmax) when head_ids is not given
    with torch.no_grad():
        fallback = model(ids, mask, weights=F.one_hot(heads, 3).double())
    torch.testing.assert_close(fallback.logits, out.logits, atol=0, rtol=0)


def test_zero_std_gates_are_task_arithmetic(pool):
    model = build_wemoe(pool, LAMBDA, std=0.0, dtype=torch.float64)
    ids, mask = _batch(seed=5, lengths=(4, 8, 6))
    heads = torch.tensor([0, 1, 2])
    with torch.no_grad():
        out = model(ids, mask, head_ids=heads)
    keys = pool.mergeable_keys()
    ta = {k: pool.base_tensor(k).double() + LAMBDA * sum(pool.expert_tensor(n, k).double()
                                                         - pool.base_tensor(k).double() for n in pool.names)
          for k in keys}
    for b, h in enumerate(heads.tolist()):
        name = pool.names[h]
        ref = assemble_classifier(pool.experts[name].config,
                                  {**ta, **{k: pool.expert_tensor(name, k) for k in pool.head_keys()}}).double()
        with torch.no_grad():
            expected = ref(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits[0]
        torch.testing.assert_close(out.per_sample()[b], expected, atol=1e-6, rtol=0)  # float32 task vectors


def test_gradients_reach_gates_only(pool):
    model = build_wemoe(pool, LAMBDA, seed=0)
    ids, mask = _batch(seed=6, lengths=(5, 7, 4))
    heads = torch.tensor([0, 1, 2])
    out = model(ids, mask, head_ids=heads)
    loss = sum(entropy(out.logits[b:b + 1, :int(out.num_labels[b])]) for b in range(3))
    loss.backward()
    gate_params = {id(p) for p in model.gates.parameters()}
    assert len(gate_params) == 2 * 4  # 2 layers x (fc1, fc2) x (weight, bias)
    for name, p in model.named_parameters():
        if id(p) in gate_params:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert all(not b.requires_grad for b in model.buffers())


def _context(pool, tmp_path, seed=0):
    """Context whose `learn` pool holds 8 random word texts per task (word tokenizer over TINY's vocabulary)."""
    from tiny_models import add_word_tokenizer
    from transformers import AutoTokenizer

    folder = Path(tmp_path) / "tok"
    folder.mkdir(exist_ok=True)
    words = add_word_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    g = torch.Generator().manual_seed(7)
    split = {}
    for t, name in enumerate(pool.names):
        texts = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (int(n),), generator=g))
                 for n in torch.randint(3, 12, (8,), generator=g)]
        split[name] = (texts, [0] * len(texts))
    learn = TaskPool(pool, split, {n: "accuracy" for n in pool.names}, tokenizer, batch_size=8, max_length=16)
    return Context(pool, learn, {n: 1.0 for n in pool.names}, learn=learn, seed=seed, artifacts=Path(tmp_path),
                   progress=False)


def _objective(model, ctx):
    """sum_t entropy(task t's head on all of task t's learn inputs)."""
    total = 0.0
    for t, name in enumerate(ctx.pool.names):
        enc = ctx.learn.tokenizer(ctx.learn.split[name][0], padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model(**enc, head_ids=torch.full((enc["input_ids"].shape[0],), t))
        total += float(entropy(out.logits[:, :int(model.num_labels[t])]))
    return total


def test_build_learns_deterministically_and_reloads(pool, tmp_path):
    ctx = _context(pool, tmp_path)
    method = WEMoE()
    opts = dict(steps=6, batch_size=8, lr=0.05, max_length=16)  # batch = a task's whole split: same loss each step
    info = method.build(ctx, tmp_path / "a", {}, **opts)
    method.build(ctx, tmp_path / "b", {}, **opts)
    for f in ("gates.safetensors", "wemoe.json", "curve.csv"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    curve = info["choice"]["learning"]["curve"]
    assert len(curve) == 6 and curve[-1] < curve[0]
    assert (tmp_path / "a" / "curve.csv").read_text().splitlines()[:2] == ["step,loss", f"0,{curve[0]:.6g}"]
    assert info["choice"]["options"] == {"init_lambda": 0.3, "hidden_layers": 2, **opts}
    other = method.build(_context(pool, tmp_path, seed=1), tmp_path / "c", {}, **opts)
    assert other["choice"]["learning"]["curve"] != curve  # the seed changes gate init and batches
    # the reloaded model has the saved gates, not the initial ones, and a lower entropy objective on the split
    from safetensors.torch import load_file
    model, init = method.model(ctx, tmp_path / "a"), build_wemoe(pool, 0.3, seed=0)
    saved = load_file(tmp_path / "a" / "gates.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in model.gate_state().items())
    assert not all(torch.equal(v, saved[k]) for k, v in init.gate_state().items())
    assert _objective(model, ctx) < _objective(init, ctx)
    # stored bytes: backbone + 3 experts' MLP task vectors + gates + heads
    d, i = 32, 64
    mlp = 2 * (d * i + i + i * d + d) * 4
    gates = 2 * (d * d + d + 3 * d + 3) * 4
    from twinmerge.methods.base import backbone_bytes, head_bytes
    assert method.stored_bytes(ctx, tmp_path / "a") == backbone_bytes(pool) + 3 * mlp + gates + head_bytes(pool)


def test_options_and_errors(pool, tmp_path):
    method = WEMoE()
    assert method.defaults["init_lambda"] == 0.3 and method.data_used == "validation_inputs"
    assert {m.weights for m in method.modes.values()} == {"router_argmax", "gold"}
    with pytest.raises(MergeError, match="model type 'gpt2'"):
        mlp_layout(["transformer.h.0.mlp.c_fc.weight"], "gpt2")
    layout = mlp_layout(pool.mergeable_keys())
    assert list(layout) == ["bert.encoder.layer.0.intermediate", "bert.encoder.layer.1.intermediate"]
    assert not any("attention" in k for item in layout.values() for k in item["keys"])
    ctx = _context(pool, tmp_path)
    with pytest.raises(MergeError, match="steps"):
        method.build(ctx, tmp_path / "x", {}, steps=-1)
    with pytest.raises(MergeError, match="grid"):
        method.build(ctx, tmp_path / "x", {"lr": [0.1]})
