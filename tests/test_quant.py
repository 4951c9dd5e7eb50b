"""twinmerge.quant (symmetric absmax group-wise quantisation) and quantised factor files (compress.factor_bits).

Round trip within s / 2 per element, packed int4 layout and byte counts, zero columns, determinism; factor files
with bits 16 (byte-identical to the files before quantisation existed: pinned digests), 8 and 4 (smaller by the
expected bytes, dequantised on load, routed = per-sample materialised model); malformed files; params checks.
"""
import hashlib
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import twinmerge.exclusive as ex
from tasks.params import ParamsError, load_params
from test_routed import _assert_mixed_routing_equals_materialize, _batch
from tiny_models import at_thread_counts, make_base, make_experts, make_set
from twinmerge import quant
from twinmerge.errors import FactorError
from twinmerge.exclusive import (FactorStream, RankSpec, compress_expert, factor_metadata, load_factors,
                                 parse_factors, save_factors, write_factors)
from twinmerge.io import ExpertSet
from twinmerge.merge import build_shared_expert
from twinmerge.modelpool import assemble_classifier
from twinmerge.routed import RoutedDeltaModel, top_k_weights


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _matrix(m, k, seed=0):
    """[m, k] with columns of very different magnitudes (1e-3 .. 1e2) and one all-zero column."""
    x = torch.randn(m, k, generator=_gen(seed)) * torch.logspace(-3, 2, k)
    x[:, k // 2] = 0
    return x


def _scales_per_element(scales, m, g):
    return scales.float().repeat_interleave(g, 0)[:m]


# --- twinmerge.quant --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4, 2, 3, 5])
@pytest.mark.parametrize("m, k, g", [(50, 7, 64), (50, 7, 16), (50, 7, 1), (64, 6, 64), (65, 5, 64), (130, 3, 7)])
def test_round_trip_error_bound(bits, m, k, g):
    x = _matrix(m, k, seed=m + k + g)
    packed, scales = quant.quantize(x, bits, g)
    assert scales.dtype == torch.float16 and scales.shape == (math.ceil(m / g), k)
    dq = quant.dequantize(packed, scales, (m, k), bits, g)
    assert dq.dtype == torch.float32 and dq.shape == (m, k)
    s = _scales_per_element(scales, m, g)
    # the scale is absmax / qmax rounded UP to float16: no clipping, and at most one float16 step above
    absmax = torch.nn.functional.pad(x.abs(), (0, 0, 0, scales.shape[0] * g - m)).view(-1, g, k).amax(1)
    exact = absmax / quant.qmax(bits)
    assert torch.all(scales.float() >= exact) and torch.all(scales.float() <= exact * (1 + 2 ** -10) + 1e-7)
    assert torch.all((x - dq).abs() <= s / 2 * (1 + 1e-6))
    assert torch.all(dq[:, k // 2] == 0)


def test_zero_matrix_and_zero_groups():
    x = torch.zeros(10, 3)
    x[7:, 1] = torch.tensor([0.5, -2.0, 1.0])  # column 1: first group zero, second not (g = 5)
    for bits in (8, 4):
        packed, scales = quant.quantize(x, bits, 5)
        assert scales[0].tolist() == [0, 0, 0] and scales[1, 1] > 0
        dq = quant.dequantize(packed, scales, (10, 3), bits, 5)
        assert torch.isfinite(dq).all() and torch.all(dq[:, [0, 2]] == 0) and torch.all(dq[:7] == 0)
        assert int(torch.round(dq[8, 1] / scales[1, 1].float())) == -quant.qmax(bits)  # the absmax: q = -qmax
        packed, scales = quant.quantize(torch.zeros(4, 4), bits, 64)
        assert torch.all(quant.dequantize(packed, scales, (4, 4), bits, 64) == 0)


def test_int4_layout_low_nibble_first_and_byte_counts():
    # each column its own group (g = 64 > m): q = [[7, -7, 7], [0, 7, -7]], codes q + 8 = [[15, 1, 15], [8, 15, 1]]
    packed, scales = quant.quantize(torch.tensor([[1.0, -1.0, 0.5], [0.0, 1.0, -0.5]]), 4, 64)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 2)
    # byte (r, t) = code(r, 2t) | code(r, 2t + 1) << 4 (low nibble first); the unused high nibble of t = 1 is 0
    assert packed.tolist() == [[15 | 1 << 4, 15], [8 | 15 << 4, 1]]
    for m, k, g in [(100, 7, 64), (100, 8, 32), (3, 1, 64), (768, 76, 64)]:
        p4, s4 = quant.quantize(_matrix(m, k), 4, g)
        p8, s8 = quant.quantize(_matrix(m, k), 8, g)
        assert p4.numel() * p4.element_size() == m * math.ceil(k / 2)  # two codes a byte along each row
        assert p8.dtype == torch.int8 and p8.numel() == m * k
        scale_bytes = math.ceil(m / g) * k * 2
        assert s4.numel() * s4.element_size() == s8.numel() * s8.element_size() == scale_bytes
        assert quant.stored_bytes((m, k), 4, g) == m * math.ceil(k / 2) + scale_bytes
        assert quant.stored_bytes((m, k), 8, g) == m * k + scale_bytes
    # 2 bits: four codes a byte
    p2, _ = quant.quantize(_matrix(9, 10), 2, 4)
    assert p2.shape == (9, 3)


def test_deterministic_bytes():
    x = torch.randn(300, 40, generator=_gen(3))
    one, two = at_thread_counts(lambda: [quant.quantize(x, bits, 64) for bits in (8, 4)])
    for a, b in zip(one, two):
        assert all(torch.equal(t, u) for t, u in zip(a, b))
        assert a[0].numpy().tobytes() == b[0].numpy().tobytes()


def test_quant_argument_errors():
    x = torch.ones(4, 2)
    for bits in (1, 9, 16, True, 4.0):
        with pytest.raises(FactorError, match="bits"):
            quant.quantize(x, bits, 64)
    for g in (0, -1, 2.5):
        with pytest.raises(FactorError, match="group size"):
            quant.quantize(x, 8, g)
    with pytest.raises(FactorError, match="2-D"):
        quant.quantize(torch.ones(4), 8, 64)
    with pytest.raises(FactorError, match="overflow float16"):
        quant.quantize(torch.full((2, 2), 1e9), 8, 64)
    packed, scales = quant.quantize(torch.ones(5, 3), 4, 2)
    with pytest.raises(FactorError, match=r"codes are torch.uint8 \[5, 2\], expected torch.uint8 \[5, 3\]"):
        quant.dequantize(packed, scales, (5, 5), 4, 2)
    with pytest.raises(FactorError, match=r"scales are torch.float32 \[3, 3\], expected torch.float16 \[3, 3\]"):
        quant.dequantize(packed, scales.float(), (5, 3), 4, 2)
    with pytest.raises(FactorError, match=r"expected torch.float16 \[1, 3\] \(group size 64\)"):
        quant.dequantize(packed, scales, (5, 3), 4, 64)


# --- factor files -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def merged(tiny_bert):
    es = ExpertSet(*tiny_bert)
    return es, build_shared_expert(es, "task_arithmetic", {"scaling": 0.3}, progress=False)[0]


def _fake_svd(matrix):
    """A deterministic stand-in for thin_svd (elementwise ops only, no LAPACK): the pinned digests below then
    depend on the tiny models and the file writer, not on the machine's LAPACK."""
    a = matrix.detach().to(torch.float32)
    k = min(a.shape)
    return ((a[:, :k] / (1 + a[:, :k].abs().sum(0))).contiguous(), torch.arange(k, 0, -1, dtype=torch.float32),
            (a.T[:, :k] * 0.5).contiguous())


# sha256 of the factor file and of its stats (JSON, sorted keys) for expert task1 of the tiny_bert set, computed
# with the code BEFORE factor_bits existed (twinmerge/exclusive.py as in dvc.lock, md5 edfb65cc...).
PINNED = {
    "float16/rank/file": "2382fd081f78e7191a6d312f43aa24b21accc06f7452663f81990e53f4f48289",
    "float16/rank/stats": "84ddd0421a6031cf3ef1d1c4e5fb4c0b0a3ff6590ee195a3d2fed12e3c8cd58b",
    "float16/fraction/file": "5ab7729487272c66fb2853c9562732de6459a924a291bbb542164788e520f9d8",
    "float16/fraction/stats": "318e3683956a7f03cac8d4078ff342840ff0182cb34db20387741d1a7ce92451",
    "float32/rank/file": "19866f25f825123eeb1ed598770db918f2225c2c28ed007849ec96f18f2f51cf",
    "float32/rank/stats": "cbefa44f2e3d8087c385777c3a95da7f5a685d7396692b5031327b9f86cf0564",
    "bfloat16/rank/file": "2ef3e2412a7ce9b3770dd1dd0b727da52af849efcebe5e0609cb1a3be08c8275",
    "bfloat16/rank/stats": "bd754ffce2326019e94a75c67c81b8c65f4e1fd93243ff1336f764ecbdef38d2",
}


@pytest.mark.parametrize("explicit", [False, True])
def test_16_bits_is_byte_identical_to_before(merged, tmp_path, monkeypatch, explicit):
    """factor_bits 16 (the default, or given) writes exactly the files and stats of the code before this option:
    the committed pipeline's DVC outputs must not change."""
    es, shared = merged
    monkeypatch.setattr(ex, "thin_svd", _fake_svd)
    kw = {"factor_bits": 16, "group_size": 64} if explicit else {}
    for label, digest in PINNED.items():
        if not label.endswith("/file"):
            continue
        dtype, mode, _ = label.split("/")
        spec = RankSpec(mode, 3 if mode == "rank" else 1.0)
        stream = FactorStream(es, shared, "task1", spec, dtype, False, **kw)
        meta = factor_metadata("task1", es.experts["task1"].config, spec, dtype, **kw)
        assert set(meta) == {"format", "expert", "factor_dtype", "rank_spec", "config"}
        path = write_factors(tmp_path / "f.safetensors", stream, meta)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, label
        stats = json.dumps(stream.stats, sort_keys=True).encode()
        assert hashlib.sha256(stats).hexdigest() == PINNED[f"{dtype}/{mode}/stats"], label
        # the in-memory path gives the same file
        tensors, _ = compress_expert(es, shared, "task1", spec, dtype, False, **kw)
        again = save_factors(tmp_path / "g.safetensors", tensors, meta)
        assert again.read_bytes() == path.read_bytes()


def _tensor_bytes(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_slice(k) for k in f.keys()}, {
            k: math.prod(f.get_slice(k).get_shape()) * f.get_tensor(k).element_size() for k in f.keys()}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("g", [64, 5])
def test_quantised_factor_files(merged, tmp_path, bits, g):
    es, shared = merged
    spec = RankSpec("rank", 5)
    t16, s16 = compress_expert(es, shared, "task2", spec, "float16", progress=False)
    t32, s32 = compress_expert(es, shared, "task2", spec, "float32", progress=False)
    tq, sq = compress_expert(es, shared, "task2", spec, "float16", progress=False, factor_bits=bits, group_size=g)
    meta = factor_metadata("task2", es.experts["task2"].config, spec, "float16", bits, g)
    assert meta["factor_bits"] == str(bits) and meta["group_size"] == str(g)
    assert sq["factor_bits"] == bits and sq["group_size"] == g and "factor_bits" not in s16
    p16 = save_factors(tmp_path / "f16.safetensors", t16,
                       factor_metadata("task2", es.experts["task2"].config, spec, "float16"))
    pq = save_factors(tmp_path / "fq.safetensors", tq, meta)
    stream = FactorStream(es, shared, "task2", spec, "float16", False, bits, g)
    assert write_factors(tmp_path / "fw.safetensors", stream, meta).read_bytes() == pq.read_bytes()
    assert stream.stats == sq

    # same ranks and kinds; low-rank U/V stored as codes + scales, everything else unchanged
    lowrank = [k for k, row in s16["tensors"].items() if row["kind"] == "lowrank"]
    assert lowrank and {k: (r["kind"], r["rank"]) for k, r in sq["tensors"].items()} == {
        k: (r["kind"], r["rank"]) for k, r in s16["tensors"].items()}
    _, b16 = _tensor_bytes(p16)
    _, bq = _tensor_bytes(pq)
    saved = 0
    for key in lowrank:
        m, n = s16["tensors"][key]["shape"]
        r = s16["tensors"][key]["rank"]
        codes = {8: lambda rows: rows * r, 4: lambda rows: rows * math.ceil(r / 2)}[bits]
        want = {"U": codes(m), "U_scales": math.ceil(m / g) * r * 2, "S": 4 * r, "V": codes(n),
                "V_scales": math.ceil(n / g) * r * 2}
        assert {p: bq[f"lowrank.{key}.{p}"] for p in want} == want
        assert sq["tensors"][key]["bytes"] == sum(want.values())
        saved += b16[f"lowrank.{key}.U"] + b16[f"lowrank.{key}.V"] - sum(v for p, v in want.items() if p != "S")
    others = {k: v for k, v in b16.items() if not k.startswith("lowrank.")}
    assert {k: v for k, v in bq.items() if not k.startswith("lowrank.")} == others
    assert sum(b16.values()) - sum(bq.values()) == saved > 0
    assert sq["totals"]["exclusive_bytes"] == s16["totals"]["exclusive_bytes"] - saved
    assert sq["totals"]["exclusive_bytes"] == sum(v for k, v in bq.items() if not k.startswith("head."))
    if g == 64:  # the file too (its header, with two more entries a low-rank tensor, is not negligible here)
        assert pq.stat().st_size < p16.stat().st_size  # U, V codes: 1 (8 bits) or 1/2 (4 bits) byte an element instead of 2, plus scales
        factor16 = sum(b16[f"lowrank.{k}.{p}"] for k in lowrank for p in "UV")
        factorq = sum(bq[f"lowrank.{k}.{p}"] for k in lowrank for p in ("U", "V", "U_scales", "V_scales"))
        assert factor16 / factorq == pytest.approx({8: 2.0, 4: 4.0}[bits], rel=0.25)

    # load: the same ExclusiveFactors structure, float32 U/V; rel_error measured on what is loaded
    f = load_factors(pq)
    assert f.metadata["factor_bits"] == str(bits) and set(f.names()) == set(load_factors(p16).names())
    for key in lowrank:
        U, S, V = f.lowrank[key]
        m, n = s16["tensors"][key]["shape"]
        r = s16["tensors"][key]["rank"]
        assert U.dtype == V.dtype == S.dtype == torch.float32 and U.shape == (m, r) and V.shape == (n, r)
        v = es.expert_tensor("task2", key).float() - shared[key].float()
        rel = float(torch.linalg.norm(v - f.delta(key)) / torch.linalg.norm(v))
        assert rel == pytest.approx(sq["tensors"][key]["rel_error"], abs=1e-6)
        # quantisation error on top of the truncation error is small
        assert rel <= s32["tensors"][key]["rel_error"] + {8: 0.01, 4: 0.15}[bits]
    meta_only = load_factors(pq, data=False)
    key = lowrank[0]
    assert meta_only.lowrank[key][0].device.type == "meta" and meta_only.lowrank[key][0].shape == f.lowrank[key][0].shape


def test_write_factors_refuses_metadata_of_other_bits(merged, tmp_path):
    es, shared = merged
    spec = RankSpec("rank", 2)
    stream = FactorStream(es, shared, "task0", spec, "float16", False, 4, 64)
    for meta in (factor_metadata("task0", {}, spec, "float16"), factor_metadata("task0", {}, spec, "float16", 4, 32)):
        with pytest.raises(FactorError, match="w.safetensors: metadata factor_bits/group_size .* differ from"):
            write_factors(tmp_path / "w.safetensors", stream, meta)
    assert not (tmp_path / "w.safetensors").exists()
    for bits, g, msg in [(3.5, 64, "factor bits 3.5"), (1, 64, "factor bits 1"), (4, 0, "group size 0")]:
        with pytest.raises(FactorError, match=msg):
            FactorStream(es, shared, "task0", spec, "float16", False, bits, g)
        with pytest.raises(FactorError, match=msg):
            factor_metadata("task0", {}, spec, "float16", bits, g)


def _qfile(bits=4, g=2):
    """A valid quantised file's tensors and metadata: w [5, 3] as U [5, 2], S [2], V [3, 2]."""
    U, V = torch.randn(5, 2, generator=_gen(1)), torch.randn(3, 2, generator=_gen(2))
    (uq, us), (vq, vs) = quant.quantize(U, bits, g), quant.quantize(V, bits, g)
    tensors = {"lowrank.w.U": uq, "lowrank.w.U_scales": us, "lowrank.w.S": torch.tensor([2.0, 1.0]),
               "lowrank.w.V": vq, "lowrank.w.V_scales": vs, "dense.b": torch.ones(3)}
    return tensors, factor_metadata("e", {"model_type": "bert"}, RankSpec("rank", 2), "float16", bits, g)


def test_quantised_file_reads_back(tmp_path):
    tensors, meta = _qfile()
    path = save_factors(tmp_path / "q.safetensors", tensors, meta)
    assert set(load_file(path)) == set(tensors)
    f = load_factors(path)
    U = quant.dequantize(tensors["lowrank.w.U"], tensors["lowrank.w.U_scales"], (5, 2), 4, 2)
    V = quant.dequantize(tensors["lowrank.w.V"], tensors["lowrank.w.V_scales"], (3, 2), 4, 2)
    torch.testing.assert_close(f.delta("w"), (U * torch.tensor([2.0, 1.0])) @ V.T, atol=0, rtol=0)
    assert f.names() == ["w", "b"] and parse_factors(tensors, meta, "x").lowrank["w"][0].shape == (5, 2)


def _drop(d, key):
    return {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize("change, message", [
    (lambda t, m: (t, {**m, "factor_bits": "16"}), "metadata factor_bits '16' is not an integer in 2..8"),
    (lambda t, m: (t, {**m, "factor_bits": "four"}), "metadata factor_bits 'four' is not an integer in 2..8"),
    (lambda t, m: (t, {**m, "group_size": "0"}), "metadata group_size '0' is not an integer >= 1"),
    (lambda t, m: (t, _drop(m, "group_size")), "metadata has factor_bits but no group_size"),
    (lambda t, m: (t, _drop(m, "factor_bits")), "metadata has group_size but no factor_bits"),
    (lambda t, m: (_drop(t, "lowrank.w.V_scales"), m),
     "tensor w has S/U/U_scales/V but 4-bit factors need U, U_scales, S, V and V_scales"),
    (lambda t, m: ({**t, "lowrank.w.U": t["lowrank.w.U"][:, :0]}, m),
     r"tensor w.U: codes are torch.uint8 \[5, 0\], expected torch.uint8 \[5, 1\] for 4-bit factor"),
    (lambda t, m: ({**t, "lowrank.w.U": t["lowrank.w.U"].to(torch.int8)}, m), r"tensor w.U: codes are torch.int8"),
    (lambda t, m: ({**t, "lowrank.w.V_scales": t["lowrank.w.V_scales"][:1]}, m),
     r"tensor w.V: scales are torch.float16 \[1, 2\], expected torch.float16 \[2, 2\] \(group size 2\)"),
    (lambda t, m: ({**t, "lowrank.w.U": t["lowrank.w.U"][0]}, m), r"tensor w.U has shape \[1\], expected 2-D"),
    (lambda t, m: (t, {k: v for k, v in m.items() if k not in ("factor_bits", "group_size")}),
     r"tensor w has S/U/U_scales/V/V_scales but needs U, S and V \(scales, but the metadata has no factor_bits\)"),
])
def test_malformed_quantised_files(tmp_path, change, message):
    tensors, meta = change(*_qfile())
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=meta)
    with pytest.raises(FactorError, match=f"bad.safetensors: {message}"):
        load_factors(path)
    with pytest.raises(FactorError, match=f"bad.safetensors: {message}"):
        load_factors(path, data=False)
    with pytest.raises(FactorError, match=message):
        save_factors(tmp_path / "out.safetensors", tensors, meta)
    assert not (tmp_path / "out.safetensors").exists()


# --- serving quantised factors: routed = per-sample materialised ----------------------------------------------

def _pipeline(base, experts, tmp_path, rank_spec, bits, g=64):
    """test_routed._pipeline with quantised factor files: ExpertSet -> theta_s -> files -> RoutedDeltaModel."""
    es = ExpertSet(base, experts)
    shared_state, _ = build_shared_expert(es, "task_arithmetic", {"scaling": 0.3}, progress=False)
    factors = []
    for name in es.names:
        tensors, _ = compress_expert(es, shared_state, name, RankSpec(*rank_spec), "float16", False, bits, g)
        meta = factor_metadata(name, es.experts[name].config, RankSpec(*rank_spec), "float16", bits, g)
        factors.append(load_factors(save_factors(tmp_path / f"{name}.safetensors", tensors, meta)))
    heads = {k: es.expert_tensor(es.names[0], k) for k in es.head_keys()}
    shared = assemble_classifier(es.experts[es.names[0]].config, {**shared_state, **heads})
    return RoutedDeltaModel(shared, factors, dtype=torch.float64), es


@pytest.mark.parametrize("bits", [8, 4])
def test_routed_quantised_equals_materialised(tiny_bert, tmp_path, bits):
    dyn, _ = _pipeline(*tiny_bert, tmp_path, ("fraction", 0.25), bits)
    assert all(f.lowrank for f in dyn.factors)
    ids, mask = _batch(seed=7, lengths=(5, 9, 3))
    _assert_mixed_routing_equals_materialize(dyn, ids.clamp(max=99), mask)


@pytest.fixture(scope="module")
def quantised4(tmp_path_factory):
    """test_topk's four-expert tiny BERT set, 4-bit factors (group size 16)."""
    tmp = tmp_path_factory.mktemp("quant_topk")
    base, experts = make_set(tmp, "bert", bare_backbone=True, num_labels=(2, 3, 4, 2))
    return _pipeline(base, experts, tmp, ("fraction", 0.25), 4, 16)[0]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_grouped_top_k_over_quantised_factors(quantised4, k):
    """test_topk's check (grouped top-k serving = theta_s + sum_t w_t v_t materialised per sample, 1e-5) with
    factors loaded from 4-bit files."""
    from test_topk import FIRST, _check, _inputs, _run, _weights

    ids, mask = _inputs()
    out, hidden, _ = _run(quantised4, ids, mask, weights=_weights(), top_k=k)
    assert out.head_ids.tolist() == FIRST
    _check(quantised4, ids, mask, out, hidden, top_k_weights(_weights(), k)[0])


# --- the compress step and params ---------------------------------------------------------------------------

def test_compress_step_with_factor_bits(tmp_path):
    """tasks/compress.compress end to end (shared expert on disk, streamed): bits 16/8/4 and a mixed schedule
    [[0.25, 8], [0.75, 4]]: files, metadata and stats (the schedule's tensor bytes between int8's and int4's)."""
    from tasks.compress import compress
    from twinmerge.shared import write_shared_expert

    base = make_base(tmp_path, "bert", bare_backbone=True)
    experts = make_experts(tmp_path / "checkpoints", base, (2, 3), names=["movie", "tweet"])
    write_shared_expert(ExpertSet(base, experts), "task_arithmetic", {"scaling": 0.3}, out_dir=tmp_path / "shared",
                        progress=False)
    params = load_params("params.yaml")
    sizes, totals = {}, {}
    mixed = [[0.25, 8], [0.75, 4]]
    for bits in (16, 8, 4, mixed):
        key = json.dumps(bits)
        params.compress.factor_bits, params.compress.rank.mode, params.compress.rank.value = bits, "rank", 4
        out = tmp_path / f"exclusive{key}"
        totals[key] = compress(params, "movie", tmp_path / "shared", out, False, base, tmp_path / "checkpoints")
        f = load_factors(out / "movie.safetensors")
        stats = json.loads((out / "movie.stats.json").read_text())
        assert f.metadata.get("factor_bits") == (None if bits == 16 else key)
        assert stats.get("factor_bits") == (None if bits == 16 else bits)
        sizes[key] = (out / "movie.safetensors").stat().st_size
    assert sizes["16"] > sizes["8"] > sizes["4"]
    assert totals["16"]["exclusive_bytes"] > totals["8"]["exclusive_bytes"] > totals["4"]["exclusive_bytes"]
    assert totals["8"]["lowrank_bytes"] > totals[json.dumps(mixed)]["lowrank_bytes"] > totals["4"]["lowrank_bytes"]
    assert totals["8"]["rel_error_2d"] == pytest.approx(totals["16"]["rel_error_2d"], abs=0.01)


@pytest.mark.parametrize("field, value, message", [
    ("factor_bits", 3, r"compress.factor_bits: Input should be 16, 8 or 4"),
    ("factor_bits", 32, r"compress.factor_bits: Input should be 16, 8 or 4"),
    ("group_size", 0, r"compress.group_size: Input should be greater than or equal to 1"),
])
def test_params_validation(tmp_path, field, value, message):
    import yaml

    from tasks.params import read_yaml
    doc = read_yaml("params.yaml")
    assert doc["compress"]["group_size"] == 64
    doc["compress"][field] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ParamsError, match=message) as info:
        load_params(path)
    assert "\n" not in str(info.value)
    smoke, default = (load_params(p).compress for p in ("profiles/smoke.yaml", "params.yaml"))
    assert smoke == default and default.factor_bits == [(0.5, 4), (0.5, 2)]  # the storage curve's choice


# --- byte budgets count the bits ---------------------------------------------------------------------------------

@pytest.mark.parametrize("m, n, g", [(50, 30, 64), (64, 48, 16), (7, 129, 5)])
def test_factor_bytes_are_the_stored_bytes(m, n, g):
    for bits in (8, 4):
        for r in range(0, 6):
            want = (quant.stored_bytes((m, r), bits, g) + quant.stored_bytes((n, r), bits, g) + 4 * r) if r else 0
            assert ex.factor_bytes(m, n, r, 2, bits, g) == want
    assert ex.factor_bytes(m, n, 3, 2) == 3 * ex.bytes_per_rank(m, n, 2) == 3 * ((m + n) * 2 + 4)


@pytest.mark.parametrize("bits", [8, 4])
def test_budget_buys_more_rank_at_fewer_bits_and_holds_exactly(merged, bits):
    """budget_fraction with quantised factors: ranks chosen against the bits' bytes, so the same budget keeps
    more triplets than float16 factors, and the stored low-rank bytes stay within it (exactly: packed int4
    codes of an odd rank are charged their byte column)."""
    es, shared = merged
    spec = RankSpec("budget_fraction", 0.2)
    _, s16 = compress_expert(es, shared, "task1", spec, "float16", progress=False)
    tq, sq = compress_expert(es, shared, "task1", spec, "float16", progress=False, factor_bits=bits, group_size=16)
    budget = int(0.2 * s16["totals"]["dense_2d_bytes_factor_dtype"])
    assert sq["totals"]["lowrank_bytes"] <= budget and s16["totals"]["lowrank_bytes"] <= budget
    rank = lambda stats: sum(r["rank"] or 0 for r in stats["tensors"].values() if r["kind"] == "lowrank")  # noqa: E731
    assert rank(sq) > 1.5 * rank(s16)
    largest_step = max(ex.bytes_per_rank(*r["shape"], 2, bits, 16) for r in sq["tensors"].values()
                       if r["kind"] == "lowrank")
    assert sq["totals"]["lowrank_bytes"] > budget - 2 * largest_step - 64  # the budget is used, not wasted
    for key, row in sq["tensors"].items():
        if row["kind"] == "lowrank":
            m, n = row["shape"]
            assert row["bytes"] == ex.factor_bytes(m, n, row["rank"], 2, bits, 16) == sum(
                tq[f"lowrank.{key}.{p}"].numel() * tq[f"lowrank.{key}.{p}"].element_size()
                for p in ("U", "U_scales", "S", "V", "V_scales"))


# --- mixed-precision schedules (twinmerge.quant.check_schedule, segments) --------------------------------------

def test_schedule_split_rule():
    """Segment i holds columns b_{i-1} .. b_i - 1, b_i = min(k, ceil(P_i k - 1e-6)), b_K = k: every column in one
    segment, the first ceil(share_1 k) columns in the first, rounding towards earlier segments, empty ones left out."""
    s = quant.check_schedule([(0.25, 8), (0.75, 4)])
    assert s == ((0.25, 8), (0.75, 4))
    assert quant.segments(1, s) == [(0, 0, 1, 8)]  # a rank-1 factor is all first segment
    assert quant.segments(4, s) == [(0, 0, 1, 8), (1, 1, 4, 4)]
    assert quant.segments(5, s) == [(0, 0, 2, 8), (1, 2, 5, 4)]
    assert quant.segments(76, s) == [(0, 0, 19, 8), (1, 19, 76, 4)]
    # 0.1 + 0.2 = 0.30000000000000004: 3 of 10 columns, not 4
    assert quant.segments(10, quant.check_schedule([[0.1, 8], [0.2, 6], [0.7, 3]])) == [
        (0, 0, 1, 8), (1, 1, 3, 6), (2, 3, 10, 3)]
    assert quant.segments(2, quant.check_schedule([[0.5, 8], [0.25, 4], [0.25, 2]])) == [(0, 0, 1, 8), (1, 1, 2, 4)]
    gen = _gen(5)
    for _ in range(50):
        shares = torch.rand(int(torch.randint(1, 5, (1,), generator=gen)), generator=gen, dtype=torch.float64) + 0.01
        sched = quant.check_schedule([(float(x), 2 + j % 7) for j, x in enumerate(shares / shares.sum())])
        for k in range(1, 60):
            segs = quant.segments(k, sched)
            cols = [c for _, a, b, _ in segs for c in range(a, b)]
            assert cols == list(range(k)) and all(b > a for _, a, b, _ in segs)
            assert segs[0][0] == 0 and segs[0][2] == math.ceil(sched[0][0] * k - 1e-6)


def test_mixed_stored_bytes_and_schedule_errors():
    s = quant.check_schedule([(0.25, 8), (0.75, 4)])
    for m, k, g in [(50, 7, 64), (64, 8, 16), (3, 1, 64), (768, 76, 64)]:
        w8 = math.ceil(k / 4)
        assert quant.mixed_stored_bytes((m, k), s, g) == (m * w8 + m * math.ceil((k - w8) / 2)
                                                          + math.ceil(m / g) * k * 2)
    assert quant.mixed_stored_bytes((9, 5), ((1.0, 4),), 4) == quant.stored_bytes((9, 5), 4, 4)
    for bad in ([], [(0.5, 8), (0.4, 4)], [(0, 8), (1, 4)], [(0.5, 9), (0.5, 4)], [(0.5, 16), (0.5, 4)],
                [(0.5, 4.0), (0.5, 4)], [(True, 4)], [(1.0,)], "1,4", [(float("nan"), 4)], [(-0.5, 8), (1.5, 4)]):
        with pytest.raises(FactorError, match=r"bits schedule .* is not a non-empty list of \[share, bits\] pairs"):
            quant.check_schedule(bad)
    assert quant.check_schedule([[0.3, 8], [0.7 + 5e-10, 4]])  # shares sum to 1 within 1e-9
