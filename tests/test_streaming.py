"""Streaming writes (issue 16): safetensors files written tensor by tensor, sharded HF folders, the streamed
shared expert and factor files, against in-memory results and directly computed references."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from twinmerge.errors import CheckpointError
from twinmerge.exclusive import (FACTOR_DTYPES, FactorStream, RankSpec, allocate_budget, compress_expert,
                                 factor_metadata, load_factors, save_factors, write_factors)
from twinmerge.io import (SAFETENSORS, SAFETENSORS_DTYPES, SAFETENSORS_INDEX, ExpertSet, HFWeightsWriter,
                          SafetensorsWriter, plan_shards, save_safetensors_atomic, sha256_file,
                          stream_hf_model, weights_sha256)
from twinmerge.merge import MERGE_METHODS, build_shared_expert
from twinmerge.shared import SharedModel, load_shared, save_shared, write_shared_expert

CASES = [(m, {}) for m in MERGE_METHODS] + [("ties", {"trim": "per_tensor"}), ("dare", {"base_method": "ties"})]


def _specs(tensors):
    return [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()]


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def _every_dtype():
    g = torch.Generator().manual_seed(0)
    out = {}
    for code, dtype in SAFETENSORS_DTYPES.items():
        values = torch.randn(5, 3, generator=g) if dtype.is_floating_point else torch.randint(0, 2, (5, 3), generator=g)
        out[f"t.{code}"] = values.to(dtype)
    return {**out, "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "caf\u00e9 \"q\"": torch.ones(3)}


# --- safetensors writers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("metadata", [None, {"format": "pt", "z": "x\"y\n\u00e9\x01", "a": json.dumps({"k": "v"})}])
def test_stream_has_save_file_bytes(tmp_path, metadata):
    """Any write order, whole tensors or row blocks: the bytes of save_safetensors_atomic (sorted metadata)."""
    tensors = _every_dtype()
    save_safetensors_atomic(tensors, tmp_path / "ref.safetensors", metadata)
    with SafetensorsWriter(tmp_path / "new.safetensors", reversed(_specs(tensors)), metadata) as out:
        for name, t in reversed(tensors.items()):
            for block in (t.split(2) if t.ndim and len(t) else [t]):
                out.write(name, block)
    assert (tmp_path / "new.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    if metadata is None:
        save_file(tensors, tmp_path / "plain.safetensors")
        assert (tmp_path / "new.safetensors").read_bytes() == (tmp_path / "plain.safetensors").read_bytes()


def test_failing_producer_leaves_nothing(tmp_path):
    tensors = {f"w{i}": torch.full((4, 2), float(i)) for i in range(6)}

    def producer():
        for i, (name, t) in enumerate(tensors.items()):
            if i == 3:
                raise RuntimeError("producer died")
            yield name, t
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("old")
    for target in ("new", "old"):
        for shard_bytes in (10**9, 40):
            with pytest.raises(RuntimeError, match="producer died"):
                stream_hf_model(_specs(tensors), producer(), {"model_type": "bert"}, tmp_path / target,
                                max_shard_bytes=shard_bytes)
    with pytest.raises(RuntimeError, match="producer died"):
        with SafetensorsWriter(tmp_path / "f.safetensors", _specs(tensors)) as out:
            for name, t in producer():
                out.write(name, t)
    assert _files(tmp_path) == ["old"] and _files(tmp_path / "old") == ["keep.txt"]


def test_incomplete_or_wrong_tensors_are_refused(tmp_path):
    specs = [("a", (4, 2), torch.float32), ("b", (3,), torch.float16)]
    path = tmp_path / "x.safetensors"
    with pytest.raises(CheckpointError, match=r"x.safetensors: 1 planned tensor\(s\) not written, first b"):
        with SafetensorsWriter(path, specs) as out:
            out.write("a", torch.zeros(4, 2))
    out = SafetensorsWriter(path, specs)
    out.write("a", torch.zeros(2, 2))
    with pytest.raises(CheckpointError, match=r"x.safetensors: tensor a: got torch.float32 \[3, 2\] after 2 rows"):
        out.write("a", torch.zeros(3, 2))
    with pytest.raises(CheckpointError, match="x.safetensors: tensor b: got torch.float32"):
        out.write("b", torch.zeros(3))
    with pytest.raises(CheckpointError, match="x.safetensors: tensor c is not in the file's planned header"):
        out.write("c", torch.zeros(1))
    out.abort()
    with pytest.raises(CheckpointError, match="x.safetensors: duplicate tensor names"):
        SafetensorsWriter(path, specs + specs[:1])
    with pytest.raises(CheckpointError, match="x.safetensors: tensor u has unsupported dtype torch.uint32"):
        SafetensorsWriter(path, [("u", (1,), torch.uint32)])
    with pytest.raises(CheckpointError, match="max_shard_bytes 0 must be an integer >= 1"):
        HFWeightsWriter(tmp_path, specs, 0)
    assert _files(tmp_path) == []


def test_shards_follow_transformers():
    specs = [(n, (s,), torch.float32) for n, s in [("a", 2), ("b", 2), ("big", 9), ("c", 3), ("d", 1)]]
    # 4-byte floats, limit 20 bytes: a+b = 16, big alone (36 > 20) before the open shard is closed, c+d = 16
    assert [[s[0] for s in shard] for shard in plan_shards(specs, 20)] == [["big"], ["a", "b"], ["c", "d"]]
    assert plan_shards([], 20) == [[]]


# --- the shared expert --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool(tiny_bert):
    return ExpertSet(*tiny_bert)


def test_sharded_shared_expert_loads_everywhere(tmp_path, pool):
    state, _ = build_shared_expert(pool, "task_arithmetic", progress=False)
    out = write_shared_expert(pool, "task_arithmetic", out_dir=tmp_path / "shared", max_shard_bytes=20000,
                              block_bytes=1000, progress=False)
    index = json.loads((out / SAFETENSORS_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / SAFETENSORS).exists() and index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in state.values())
    model = AutoModel.from_pretrained(out)
    loaded = model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key.removeprefix("bert.")], value)
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                assert index["weight_map"][name] == shard and torch.equal(f.get_tensor(name), state["bert." + name])
    for loaded_state in (load_shared(out), SharedModel(out)):
        assert set(loaded_state) == set(state) and all(torch.equal(loaded_state[k], v) for k, v in state.items())


def test_sharded_shared_expert_has_one_weights_digest(tmp_path, pool):
    """The router records `weights_sha256` of the shared folder: a sharded folder gets one digest over its
    shards (also under the path of its absent model.safetensors, as the routed methods ask), which changes
    with any shard; a one-file folder's digest is the file's sha256."""
    one = write_shared_expert(pool, "task_arithmetic", out_dir=tmp_path / "one", progress=False)
    assert weights_sha256(one) == weights_sha256(one / SAFETENSORS) == sha256_file(one / SAFETENSORS)
    out = write_shared_expert(pool, "task_arithmetic", out_dir=tmp_path / "shared", max_shard_bytes=20000,
                              progress=False)
    digest = weights_sha256(out)
    assert weights_sha256(out / SAFETENSORS) == digest != weights_sha256(one)
    shard = out / "model-00002-of-" f"{len(list(out.glob('model-*'))):05d}.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert weights_sha256(out) != digest


def test_load_shared_names_a_missing_shard(tmp_path, pool):
    out = write_shared_expert(pool, "task_arithmetic", out_dir=tmp_path / "shared", max_shard_bytes=20000,
                              progress=False)
    (out / "model-00002-of-" f"{len(list(out.glob('model-*'))):05d}.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shared/model-00002-of-\d{5}.safetensors: shard listed in "
                                              r"model.safetensors.index.json not found"):
        load_shared(out)


@pytest.mark.parametrize("method, options", CASES, ids=[f"{m}{o}" for m, o in CASES])
def test_streamed_shared_expert_equals_in_memory(tmp_path, tiny_bert, tiny_roberta, method, options):
    """Every merge method, blocks of rows small enough to split every matrix: the bytes of
    save_shared(build_shared_expert(...)) (tensors, config, twinmerge.json)."""
    for name, fixture in [("bert", tiny_bert), ("roberta", tiny_roberta)]:
        es = ExpertSet(*fixture)
        state, report = build_shared_expert(es, method, options, exclude=["*LayerNorm*"], progress=False)
        ref = save_shared(state, es, tmp_path / f"{name}_ref", report)
        new = write_shared_expert(es, method, options, exclude=["*LayerNorm*"], out_dir=tmp_path / name,
                                  block_bytes=700, progress=False)
        assert _files(new) == _files(ref)
        for file in _files(ref):
            assert (new / file).read_bytes() == (ref / file).read_bytes(), (name, file)


# --- factor files -------------------------------------------------------------------------------------------

def _reference_factors(es, shared, name, spec, dtype):
    """Factor-file tensors computed directly: v_t = theta_t - theta_s, ranks from the spec (budgets through
    allocate_budget over float32 singular values), thin SVD factors of torch.linalg.svd, storage rule."""
    fdt = FACTOR_DTYPES[dtype]
    deltas = {k: es.expert_tensor(name, k).float() - shared[k].float() for k in es.mergeable_keys()}
    deltas = {k: v for k, v in deltas.items() if v.any()}
    spectra = {k: (torch.linalg.svdvals(v), *v.shape) for k, v in deltas.items() if v.ndim == 2}
    if spec.is_budget:
        budget = int(spec.value * sum(m * n * fdt.itemsize for _, m, n in spectra.values()))
        ranks = allocate_budget(spectra, budget, fdt.itemsize)
    else:
        ranks = {k: spec.rank_for(s) for k, (s, _, _) in spectra.items()}
    out = {}
    for key, v in deltas.items():
        if v.ndim != 2:
            out[f"dense.{key}"] = v
        elif ranks[key] * (sum(v.shape) + 1) >= v.numel():
            out[f"dense.{key}"] = v.to(fdt)
        elif ranks[key]:
            r = ranks[key]
            U, S, Vh = torch.linalg.svd(v, full_matrices=False)
            out.update({f"lowrank.{key}.U": U[:, :r].to(fdt), f"lowrank.{key}.S": S[:r],
                        f"lowrank.{key}.V": Vh.mT[:, :r].to(fdt)})
    return {**out, **{f"head.{k}": es.expert_tensor(name, k).float() for k in es.head_keys()}}


@pytest.mark.parametrize("spec, dtype", [(RankSpec("rank", 3), "float16"), (RankSpec("fraction", 0.1), "float32"),
                                         (RankSpec("energy", 0.6), "bfloat16"), (RankSpec("budget_fraction", 0.3),
                                                                                 "float16")])
def test_streamed_factor_file_equals_reference(tmp_path, pool, spec, dtype):
    """write_factors over the lazily read shared model: the reference factors exactly, the same bytes and stats
    as the in-memory compress_expert + save_factors."""
    shared_dir = write_shared_expert(pool, "task_arithmetic", out_dir=tmp_path / "shared", progress=False)
    meta = factor_metadata("task1", pool.experts["task1"].config, spec, dtype)
    stream = FactorStream(pool, SharedModel(shared_dir), "task1", spec, dtype, progress=False)
    path = write_factors(tmp_path / "task1.safetensors", stream, meta)
    shared = load_shared(shared_dir)
    expected = _reference_factors(pool, shared, "task1", spec, dtype)
    written = load_file(path)
    assert set(written) == set(expected) and any(k.startswith("lowrank.") for k in written)
    for key, t in expected.items():
        assert written[key].dtype == t.dtype and torch.equal(written[key], t), key
    tensors, stats = compress_expert(pool, shared, "task1", spec, dtype, progress=False)
    save_factors(tmp_path / "ref.safetensors", tensors, meta)
    assert path.read_bytes() == (tmp_path / "ref.safetensors").read_bytes() and stream.stats == stats
    header = load_factors(path, data=False)
    assert header.config == pool.experts["task1"].config and all(
        t.is_meta for t in [*header.dense.values(), *header.head.values()])
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
