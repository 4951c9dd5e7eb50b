"""PEFT LoRA adapters as experts (twinmerge/lora.py): reading (scaling, rslora, rank/alpha patterns,
fan_in_fan_out, embeddings, trained biases), ExpertSet equality with the same experts merged densely by PEFT,
validation errors, low-rank exclusive SVD, and exclusive knowledge exported as PEFT adapters (round trip through
peft.PeftModel against RoutedDeltaModel.materialize)."""
import json
import logging
import math
import re
import shutil
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification, GPT2Model)

from tiny_models import make_base, make_set
from twinmerge.errors import CheckpointError, FactorError
from twinmerge.exclusive import RankSpec, compress_expert, factor_metadata, load_factors, save_factors, thin_svd
from twinmerge.io import Checkpoint, ExpertSet
from twinmerge.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraExpert, export_peft_adapter, export_peft_adapters,
                            lowrank_exclusive, lowrank_svd, read_adapter)
from twinmerge.merge import build_shared_expert
from twinmerge.routed import RoutedDeltaModel
from twinmerge.shared import SharedModel, write_shared_expert

Q0 = "bert.encoder.layer.0.attention.self.query"
# Expert recipes: (labels, LoraConfig kwargs). e1 exercises rslora + rank/alpha patterns, e2 trained biases
# (bias: lora_only saves the full biases; lora_bias adds lora_B's bias on top).
RECIPES = {
    "e0": (2, dict(r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"])),
    "e1": (3, dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["query", "key", "intermediate.dense"],
                   rank_pattern={"layer.1.attention.self.query": 2}, alpha_pattern={"key": 3})),
    "e2": (4, dict(r=3, lora_alpha=3, target_modules=["value", "output.dense"], bias="lora_only", lora_bias=True)),
}


def _make_peft_expert(base, labels, kwargs, seed, adapter_dir, full_dir):
    """A real PEFT LoRA expert of `base`: nonzero random LoRA weights (and trained biases / head), saved as an
    adapter folder and, merged by PEFT (merge_and_unload), as a full folder."""
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(base, num_labels=labels)
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", lora_dropout=0.0, **kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:  # LoRA factors, modules_to_save copies, trained biases
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    with warnings.catch_warnings():  # PEFT takes lora_bias's 1-D lora_B.bias for an unsharded ZeRO-3 tensor
        warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
        peft_model.save_pretrained(adapter_dir)
    peft_model.merge_and_unload().save_pretrained(full_dir)
    return adapter_dir, full_dir


@pytest.fixture(scope="module")
def lora_pool(tmp_path_factory):
    """(base, {name: adapter folder}, {name: full folder}) for the RECIPES, on a bare BertModel base."""
    tmp = tmp_path_factory.mktemp("lora")
    base = make_base(tmp, "bert", bare_backbone=True)
    adapters, fulls = {}, {}
    for i, (name, (labels, kwargs)) in enumerate(RECIPES.items()):
        adapters[name], fulls[name] = _make_peft_expert(base, labels, kwargs, 10 + i, tmp / f"{name}-lora",
                                                         tmp / f"{name}-full")
    return base, adapters, fulls


# --- reading ------------------------------------------------------------------------------------------------

def test_adapter_scaling_rslora_and_patterns(lora_pool):
    base, adapters, _ = lora_pool
    a0 = read_adapter(adapters["e0"])
    assert a0.modules[Q0].scaling == 8 / 4 and a0.modules[Q0].rank == 4 and not a0.modules[Q0].transpose
    emb = a0.modules["bert.embeddings.word_embeddings"]
    assert emb.embedding and emb.transpose and emb.shape == (100, 32)
    assert set(a0.saved) == {"classifier.weight", "classifier.bias"}
    a1 = read_adapter(adapters["e1"])
    q1 = a1.modules["bert.encoder.layer.1.attention.self.query"]
    assert q1.rank == 2 and q1.scaling == pytest.approx(6 / math.sqrt(2))  # rank_pattern + rslora
    assert a1.modules[Q0].rank == 4 and a1.modules[Q0].scaling == pytest.approx(6 / 2)
    k0 = a1.modules["bert.encoder.layer.0.attention.self.key"]
    assert k0.scaling == pytest.approx(3 / 2)  # alpha_pattern + rslora
    a2 = read_adapter(adapters["e2"])
    v0 = "bert.encoder.layer.0.attention.self.value"
    assert f"{v0}.bias" in a2.saved  # bias: lora_only, ".base_layer" stripped
    assert a2.modules[v0].bias is not None  # lora_bias: lora_B.bias * scaling
    # factors: Delta W = B_scaled @ A in the weight's orientation, also for embeddings
    ex = LoraExpert(adapters["e0"], Checkpoint(base))
    for key in (f"{Q0}.weight", "bert.embeddings.word_embeddings.weight"):
        B, A = ex.factors(key)
        torch.testing.assert_close(B @ A, ex.get(key) - Checkpoint(base).get(key[len("bert."):]), atol=1e-6, rtol=0)
    assert ex.config["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"}  # no config.json: from the head rows
    rows = slice(3, 9)
    for key in (f"{Q0}.weight", "bert.embeddings.word_embeddings.weight", "classifier.weight"):
        torch.testing.assert_close(ex.get(key, rows), ex.get(key)[rows], atol=1e-6, rtol=0)


def test_expertset_lora_equals_dense_merge(lora_pool):
    """ExpertSet over adapter folders == ExpertSet over PEFT's merge_and_unload of the same experts."""
    base, adapters, fulls = lora_pool
    lora, full = ExpertSet(base, adapters), ExpertSet(base, fulls)
    assert all(isinstance(lora.experts[n], LoraExpert) for n in lora.names)
    assert lora.mergeable_keys() == full.mergeable_keys() and lora.head_keys() == full.head_keys()
    assert lora.backbone_prefix == full.backbone_prefix == "bert."
    changed = 0
    for name in lora.names:
        labels = [len(es.experts[name].config.get("id2label", "01")) for es in (lora, full)]  # default: 2
        assert labels[0] == labels[1] == RECIPES[name][0]
        for key in lora.mergeable_keys() + lora.head_keys():
            a, b = lora.expert_tensor(name, key), full.expert_tensor(name, key)
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
            changed += not torch.equal(a, lora.base_tensor(key)) if key in lora.mergeable_keys() else 0
    assert changed >= 20  # LoRA targets, embeddings and trained biases really differ from the base
    ta = build_shared_expert(lora, "task_arithmetic", progress=False)[0]
    tb = build_shared_expert(full, "task_arithmetic", progress=False)[0]
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], atol=1e-6, rtol=0)
    mixed = ExpertSet(base, {"e0": adapters["e0"], "e1": fulls["e1"]})  # LoRA and full experts together
    assert mixed.mergeable_keys() == full.mergeable_keys()


def test_lora_experts_through_streaming_merge_and_compress(lora_pool, tmp_path):
    """The pipeline's streaming shared writer (row blocks: LoraExpert.get(key, rows)) and the factor stream take
    LoRA experts as they take full ones."""
    base, adapters, fulls = lora_pool
    lora, full = ExpertSet(base, adapters), ExpertSet(base, fulls)
    lora.check_finite()
    shared_dir = write_shared_expert(lora, "task_arithmetic", out_dir=tmp_path / "shared", block_bytes=4096,
                                     progress=False)
    shared = SharedModel(shared_dir)
    dense = build_shared_expert(full, "task_arithmetic", progress=False)[0]
    for key in dense:
        torch.testing.assert_close(shared[key], dense[key], atol=1e-6, rtol=0)
    spec = RankSpec("rank", 4)
    a, stats_a = compress_expert(lora, shared, "e1", spec, "float32", progress=False)
    b, stats_b = compress_expert(full, shared, "e1", spec, "float32", progress=False)
    assert a.keys() == b.keys()
    meta = factor_metadata("e1", lora.experts["e1"].config, spec, "float32")
    fa = load_factors(save_factors(tmp_path / "a.safetensors", a, meta))
    fb = load_factors(save_factors(tmp_path / "b.safetensors", b, meta))
    for key in fa.names():
        torch.testing.assert_close(fa.delta(key), fb.delta(key), atol=1e-5, rtol=0)
    for key, row in stats_a["tensors"].items():
        assert row["rel_error"] == pytest.approx(stats_b["tensors"][key]["rel_error"], abs=1e-4)


def test_fan_in_fan_out_gpt2_conv1d(tmp_path):
    """GPT-2 Conv1D weights are [in, out]: Delta W = (B @ A)^T, as PEFT's fan_in_fan_out merge."""
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32, pad_token_id=0)
    GPT2Model(cfg).save_pretrained(tmp_path / "base")
    model = GPT2ForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2)
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, fan_in_fan_out=True,
                                                  target_modules=["c_attn", "c_fc"], lora_dropout=0.0))
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "lora")
    merged = peft_model.merge_and_unload().state_dict()
    assert json.loads((tmp_path / "lora" / ADAPTER_CONFIG).read_text())["fan_in_fan_out"] is True
    ex = LoraExpert(tmp_path / "lora", Checkpoint(tmp_path / "base"))
    key = "transformer.h.0.attn.c_attn.weight"
    assert ex.modules[key].transpose and ex.shape(key) == (16, 48)
    for key in (key, "transformer.h.0.mlp.c_fc.weight", "score.weight"):
        torch.testing.assert_close(ex.get(key), merged[key], atol=1e-6, rtol=0)
    B, A = ex.factors("transformer.h.0.attn.c_attn")
    assert B.shape == (16, 2) and A.shape == (2, 48)


# --- validation -----------------------------------------------------------------------------------------------

def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder, **changes):
    path = folder / ADAPTER_CONFIG
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _edit_weights(folder, fn):
    path = folder / ADAPTER_WEIGHTS
    tensors = load_file(path)
    save_file(fn(tensors), path)


def _rename(tensors, old, new):
    return {k.replace(old, new): v for k, v in tensors.items()}


def _set(tensors, key, value):
    return {**tensors, key: value}


QA, QB = f"base_model.model.{Q0}.lora_A.weight", f"base_model.model.{Q0}.lora_B.weight"
CASES = {
    "pickle": (lambda f: ((f / ADAPTER_WEIGHTS).unlink(), torch.save({}, f / "adapter_model.bin")),
               r"adapter_model\.bin: pickled adapter weights are refused"),
    "missing weights": (lambda f: (f / ADAPTER_WEIGHTS).unlink(), r"adapter_model\.safetensors: adapter weights not"),
    "peft type": (lambda f: _edit_config(f, peft_type="IA3"), r"adapter_config\.json: peft_type 'IA3' is not supp"),
    "dora": (lambda f: _edit_config(f, use_dora=True), r"adapter_config\.json: use_dora is not supported"),
    "tokens": (lambda f: _edit_config(f, trainable_token_indices=[3]),
               r"adapter_config\.json: trainable_token_indices is not supported"),
    "bias": (lambda f: _edit_config(f, bias="weird"), r"adapter_config\.json: bias 'weird' is not supported"),
    "bad json": (lambda f: (f / ADAPTER_CONFIG).write_text("{"), r"adapter_config\.json: cannot read JSON"),
    "rank": (lambda f: _edit_config(f, r=5), r"adapter_model\.safetensors: module \S+ has rank 4, .*says r=5"),
    "target": (lambda f: _edit_weights(f, lambda t: _rename(t, "layer.0.attention.self.query", "layer.0.nope")),
               r"adapter_model\.safetensors: target module bert\.encoder\.layer\.0\.nope not in the base"),
    "shape": (lambda f: _edit_weights(f, lambda t: _set(t, QB, torch.ones(7, 4))),
              rf"adapter_model\.safetensors: module {Q0}: Delta W has shape \[7, 32\], base weight "),
    "nan": (lambda f: _edit_weights(f, lambda t: _set(t, QA, t[QA].index_fill(1, torch.tensor([3]), math.nan))),
            rf"adapter_model\.safetensors: tensor {re.escape(QA)} has NaN/Inf values"),
    "inf head": (lambda f: _edit_weights(f, lambda t: _set(t, "base_model.model.classifier.bias",
                                                           torch.tensor([1.0, math.inf]))),
                 r"adapter_model\.safetensors: tensor base_model\.model\.classifier\.bias has NaN/Inf"),
    "half pair": (lambda f: _edit_weights(f, lambda t: {k: v for k, v in t.items() if k != QB}),
                  rf"module {Q0} has lora_A\.weight; needs lora_A\.weight and lora_B\.weight"),
    "dora tensor": (lambda f: _edit_weights(f, lambda t: _set(t, f"base_model.model.{Q0}.lora_magnitude_vector",
                                                                torch.ones(32))), r"is a DoRA magnitude"),
    "foreign name": (lambda f: _edit_weights(f, lambda t: _set(t, "encoder.x.weight", torch.ones(2))),
                     r"unexpected tensor encoder\.x\.weight"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_validation_errors(lora_pool, tmp_path, case):
    base, adapters, _ = lora_pool
    folder = _copy(adapters["e0"], tmp_path / "bad")
    edit, message = CASES[case]
    edit(folder)
    with pytest.raises(CheckpointError, match=message) as info:
        ExpertSet(base, {"bad": folder})
    text = str(info.value)
    assert "\n" not in text and str(folder) in text


def test_base_name_matching(lora_pool, tmp_path, caplog):
    base, adapters, _ = lora_pool
    folder = _copy(adapters["e0"], tmp_path / "named")
    for declared in (None, "", str(base), f"someone/{base.name}", f"someone--{base.name}"):
        _edit_config(folder, base_model_name_or_path=declared)
        assert ExpertSet(base, {"x": folder}).names == ["x"]
    _edit_config(folder, base_model_name_or_path="google-bert/bert-base-uncased")
    with caplog.at_level(logging.WARNING, logger="twinmerge.lora"):
        assert ExpertSet(base, {"x": folder}).names == ["x"]  # names are not identities: structure decides
    assert [r.getMessage() for r in caplog.records] == [
        f"{folder / ADAPTER_CONFIG}: base_model_name_or_path 'google-bert/bert-base-uncased' does not match the "
        f"base ({base}); using it since its modules and shapes fit"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="twinmerge.lora"):
        assert ExpertSet(base, {"x": folder}, base_name="bert-base-uncased").names == ["x"]
    assert caplog.records == []


# --- low-rank exclusive SVD -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,n,K,true_rank", [(40, 30, 6, 6), (30, 50, 9, 4), (12, 20, 25, 12), (25, 18, 8, 0),
                                             (64, 48, 12, 3)])
def test_lowrank_svd_equals_dense(dtype, m, n, K, true_rank):
    gen = torch.Generator().manual_seed(m * n + K)
    L = torch.randn(m, K, generator=gen, dtype=dtype)
    R = torch.randn(K, n, generator=gen, dtype=dtype)
    if true_rank < min(m, n, K):  # rank-deficient: columns of L repeat (true_rank 0: all-zero)
        L = L[:, :max(true_rank, 1)].repeat(1, K)[:, :K] * (true_rank > 0)
    dense = L @ R
    Ud, Sd, Vd = thin_svd(dense.double())
    for rank in (1, 3, None):
        U, S, V = lowrank_svd(L, R, rank)
        k = min(m, n, K) if rank is None else min(rank, m, n, K)
        assert U.shape == (m, k) and S.shape == (k,) and V.shape == (n, k) and U.dtype == dtype
        scale = max(float(Sd[0]), 1e-30)
        torch.testing.assert_close(S.double(), Sd[:k].double(), atol=1e-5 * scale, rtol=0)
        approx, ref = (U * S) @ V.T, (Ud[:, :k] * Sd[:k]) @ Vd[:, :k].T
        unique = k >= len(Sd) or float(Sd[k - 1] - Sd[k]) > 1e-3 * scale  # truncation well defined
        if unique:
            torch.testing.assert_close(approx.double(), ref.double(), atol=1e-5 * scale, rtol=0)
        if k <= max(true_rank, 0) and true_rank:  # kept directions are orthonormal
            torch.testing.assert_close((U.T @ U).double(), torch.eye(k, dtype=torch.float64), atol=1e-4, rtol=0)
    U, S, V = lowrank_svd(L, R)
    torch.testing.assert_close(((U * S) @ V.T).double(), dense.double(), atol=1e-5 * max(float(Sd[0]), 1e-30),
                               rtol=0)


def test_lowrank_svd_bad_shapes():
    with pytest.raises(FactorError, match=r"lowrank_svd: L \[3, 2\] and R \[3, 4\]"):
        lowrank_svd(torch.ones(3, 2), torch.ones(3, 4))


def test_lowrank_exclusive_matches_dense(lora_pool):
    """v_t = Delta W_t - lambda sum_s Delta W_s of Task Arithmetic over LoRA experts, as L @ R and its SVD."""
    base, adapters, _ = lora_pool
    pool = ExpertSet(base, {n: adapters[n] for n in ("e0", "e1")})
    shared = build_shared_expert(pool, "task_arithmetic", {"scaling": 0.3}, progress=False)[0]
    lambdas = {"e0": 0.3, "e1": 0.3}
    for key in (f"{Q0}.weight", "bert.encoder.layer.0.attention.self.key.weight",
                "bert.encoder.layer.1.intermediate.dense.weight", "bert.embeddings.word_embeddings.weight"):
        v = pool.expert_tensor("e0", key).double() - shared[key].double()
        L, R = lowrank_exclusive(pool, "e0", key, lambdas)
        assert L.shape[1] == R.shape[0] <= 16
        torch.testing.assert_close((L @ R).double(), v, atol=2e-6, rtol=0)
        U, S, V = lowrank_svd(L, R, 3)
        Ud, Sd, Vd = thin_svd(v)
        torch.testing.assert_close(S, Sd[:3], atol=1e-5 * float(Sd[0]), rtol=0)
    assert lowrank_exclusive(pool, "e0", "bert.encoder.layer.0.output.LayerNorm.weight", lambdas) is None
    with pytest.raises(FactorError, match="no lambda for expert"):
        lowrank_exclusive(pool, "e0", f"{Q0}.weight", {"e0": 0.3})


# --- export as PEFT adapters ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Full tiny BERT experts (masked-LM base: pooler is a head) -> shared (Task Arithmetic) -> rank-3 factors
    -> PEFT adapters."""
    tmp = tmp_path_factory.mktemp("export")
    base, experts = make_set(tmp, "bert", bare_backbone=False, num_labels=(2, 3, 4))
    pool = ExpertSet(base, experts)
    shared_dir = write_shared_expert(pool, "task_arithmetic", out_dir=tmp / "shared", progress=False)
    shared = SharedModel(shared_dir)
    factors = []
    for name in pool.names:
        tensors, _ = compress_expert(pool, shared, name, RankSpec("rank", 3), "float16", progress=False)
        meta = factor_metadata(name, pool.experts[name].config, RankSpec("rank", 3), "float16")
        factors.append(load_factors(save_factors(tmp / f"{name}.safetensors", tensors, meta)))
    out = export_peft_adapters(factors, tmp / "adapters", str(shared_dir), shared)
    return shared_dir, factors, out


def _shared_model(shared_dir, num_labels):
    return BertForSequenceClassification.from_pretrained(shared_dir, num_labels=num_labels).eval()


def test_export_roundtrip_peft_equals_materialize(exported):
    shared_dir, factors, out = exported
    assert set(out) == {f.expert for f in factors}
    routed = RoutedDeltaModel(_shared_model(shared_dir, 2), factors)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (4, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    for t, f in enumerate(factors):
        cfg = json.loads((out[f.expert] / ADAPTER_CONFIG).read_text())
        assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "SEQ_CLS" and cfg["bias"] == "lora_only"
        # rank 2: token_type_embeddings [2, 32], stored dense, exported as the exact pair (I, D)
        assert cfg["r"] == 3 == cfg["lora_alpha"] and set(cfg["rank_pattern"].values()) == {2, 3}
        assert cfg["rank_pattern"] == cfg["alpha_pattern"]
        assert "bert.pooler" in cfg["modules_to_save"] and "classifier" in cfg["modules_to_save"]
        assert "bert.embeddings.LayerNorm" in cfg["modules_to_save"]
        weights = load_file(out[f.expert] / ADAPTER_WEIGHTS)
        assert "base_model.model.bert.embeddings.word_embeddings.lora_embedding_A" in weights
        assert weights[QA].shape == (3, 32) and weights[QB].shape == (32, 3)
        weights_t = torch.zeros(len(factors))
        weights_t[t] = 1
        ref = routed.materialize(weights_t)
        n_labels = ref.config.num_labels
        peft_model = PeftModel.from_pretrained(_shared_model(shared_dir, n_labels), out[f.expert]).eval()
        with torch.no_grad():
            got = peft_model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
            want = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        assert got.shape == (4, n_labels)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        plain = _shared_model(shared_dir, n_labels)
        with torch.no_grad():
            assert not torch.allclose(plain(input_ids=ids, attention_mask=mask).logits[:, :1],
                                      want[:, :1], atol=1e-3)


def test_exported_adapters_read_back_as_experts(exported):
    """The exported folders are LoRA experts of the shared model: theta_s + v_t with the expert's labels."""
    shared_dir, factors, out = exported
    pool = ExpertSet(shared_dir, out)
    shared = SharedModel(shared_dir)
    routed = RoutedDeltaModel(_shared_model(shared_dir, 2), factors)
    for t, f in enumerate(factors):
        assert pool.experts[f.expert].config.get("id2label", {"0": "LABEL_0", "1": "LABEL_1"}) == f.config.get(
            "id2label", {"0": "LABEL_0", "1": "LABEL_1"})  # transformers leaves 2 labels implicit
        w = torch.zeros(len(factors))
        w[t] = 1
        state = routed.materialize(w).state_dict()
        for key in pool.mergeable_keys() + pool.head_keys():
            torch.testing.assert_close(pool.expert_tensor(f.expert, key), state[key], atol=1e-5, rtol=0)
        for key in f.lowrank:
            torch.testing.assert_close(pool.expert_tensor(f.expert, key) - shared[key], f.delta(key), atol=1e-5,
                                       rtol=0)


def test_export_single_and_errors(exported, tmp_path):
    shared_dir, factors, _ = exported
    path = export_peft_adapter(factors[0], tmp_path / "one", "base-name", SharedModel(shared_dir))
    assert json.loads((path / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == "base-name"
    path3 = export_peft_adapter(factors[2], tmp_path / "three", "base-name", SharedModel(shared_dir))
    assert json.loads((path3 / "twinmerge_adapter.json").read_text())["labels"]["id2label"] == factors[2].config[
        "id2label"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # atomic: no temporaries left
    with pytest.raises(FactorError, match="needs its shared value"):
        export_peft_adapter(factors[0], tmp_path / "two", "b", shared=None)
    assert not (tmp_path / "two").exists()
    with pytest.raises(FactorError, match="duplicate expert names"):
        export_peft_adapters([factors[0], factors[0]], tmp_path / "dup", "b", SharedModel(shared_dir))


# --- the pipeline's download step ---------------------------------------------------------------------------------

def test_download_step_copies_an_adapter_folder_and_checks_its_head(lora_pool, tmp_path):
    """`twinmerge download expert` on a registered adapter folder: validated against the base, its label count
    checked against the task (the head's rows: the adapter folder has no config.json), copied with a manifest;
    the copy reads back as the same expert. A task with another label count is one line naming the adapter."""
    import random

    from test_pipeline_steps import _task_tables
    from tasks.download import download_expert
    from tasks.params import Params

    base, adapters, _ = lora_pool
    data = {n: _task_tables(tmp_path / n, i, n_labels, random.Random(i)) for i, (n, n_labels) in
            enumerate((("three", 3), ("four", 4)))}

    def params(data_dir):
        return Params.model_validate({"seed": 0, "base": {"path": str(base)},
                                      "data": {"raw_dir": "r", "tasks_dir": "t", "tasks": []},
                                      "experts": {"e1": {"path": str(adapters["e1"]), "task": "x",
                                                         "data": str(data_dir)}}})

    manifest = download_expert("e1", params(data["three"]), base, tmp_path / "copy")
    assert set(manifest["files"]) == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    original, copy = ExpertSet(base, {"e1": adapters["e1"]}), ExpertSet(base, {"e1": tmp_path / "copy"})
    for key in original.mergeable_keys() + original.head_keys():
        assert torch.equal(original.expert_tensor("e1", key), copy.expert_tensor("e1", key))
    with pytest.raises(CheckpointError) as info:
        download_expert("e1", params(data["four"]), base, tmp_path / "copy4")
    assert str(info.value) == (f"expert e1: {adapters['e1'] / ADAPTER_CONFIG} has a 3-label head but its task data "
                               f"{data['four'] / 'labels.json'} has 4 labels")
    assert not (tmp_path / "copy4").exists()
