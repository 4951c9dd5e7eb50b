"""Mixed-precision factors (Delta-CoMe style, issue 15 part 2): `factor_bits` as a schedule [(share, bits), ...].

Each segment of U's and V's columns (largest singular values first, split by `quant.segments`) is quantised alone
at its bits and stored as `lowrank.<name>.U.q<i>` / `.U_scales.q<i>`; load concatenates the dequantised segments.
Checked: per-segment round trip, exact byte counts, [(1, b)] = plain b bits, budgets, rel_error ordering, the
low-rank source path, malformed files, params, and single-bits files byte-identical to before (pinned digests).
"""
import hashlib
import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

import twinmerge.exclusive as ex
from tasks.params import ParamsError, load_params, read_yaml
from test_lowrank_compress import LAMBDAS, _two_d, lora_dirs, merged  # noqa: F401 - fixtures
from test_quant import _fake_svd, _pipeline
from test_routed import _assert_mixed_routing_equals_materialize, _batch
from twinmerge import quant
from twinmerge.errors import FactorError
from twinmerge.exclusive import (FactorStream, RankSpec, compress_expert, factor_metadata, linear_merge_source,
                                 load_factors, parse_factors, save_factors, write_factors)
from twinmerge.io import ExpertSet
from twinmerge.merge import build_shared_expert

MIX = [(0.25, 8), (0.75, 4)]


@pytest.fixture(scope="module")
def bert(tiny_bert):
    """(ExpertSet, Task Arithmetic theta_s with lambda 0.3) of the tiny BERT set."""
    es = ExpertSet(*tiny_bert)
    return es, build_shared_expert(es, "task_arithmetic", {"scaling": 0.3}, progress=False)[0]


def _file(es, shared, tmp_path, spec, bits, g=16, name="task1", dtype="float16"):
    """(path, stats) of `name`'s factor file at `bits`, written by the stream (checked equal to the in-memory path)."""
    stream = FactorStream(es, shared, name, spec, dtype, False, bits, g)
    meta = factor_metadata(name, es.experts[name].config, spec, dtype, bits, g)
    path = write_factors(tmp_path / f"{name}-{json.dumps(bits)}-{spec.mode}.safetensors", stream, meta)
    tensors, stats = compress_expert(es, shared, name, spec, dtype, False, bits, g)
    assert save_factors(tmp_path / "again.safetensors", tensors, meta).read_bytes() == path.read_bytes()
    assert stats == stream.stats
    return path, stream.stats


def _tensor_bytes(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()}


def _lowrank(stats):
    return {k: r for k, r in stats["tensors"].items() if r["kind"] == "lowrank"}


def test_file_layout_bytes_and_metadata(bert, tmp_path):
    """Names U.q<i> / U_scales.q<i> per non-empty segment, byte counts equal to the formula (int8: m w bytes, int4:
    m ceil(w / 2), float16 scales ceil(m / g) w 2, S 4 r), stats and `factor_bytes` the same, metadata the schedule."""
    es, shared = bert
    g = 16
    path, stats = _file(es, shared, tmp_path, RankSpec("rank", 5), MIX, g)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["factor_bits"] == "[[0.25, 8], [0.75, 4]]" and meta["group_size"] == "16"
    assert stats["factor_bits"] == [[0.25, 8], [0.75, 4]] and stats["group_size"] == 16
    got = _tensor_bytes(path)
    rows = _lowrank(stats)
    assert rows and all(r["rank"] == 5 for r in rows.values())
    for key, row in rows.items():
        m, n = row["shape"]
        w8, w4 = 2, 3  # ceil(0.25 * 5) = 2 int8 columns, 3 int4 columns
        want = {}
        for part, rows_ in (("U", m), ("V", n)):
            want |= {f"{part}.q0": rows_ * w8, f"{part}_scales.q0": math.ceil(rows_ / g) * w8 * 2,
                     f"{part}.q1": rows_ * math.ceil(w4 / 2), f"{part}_scales.q1": math.ceil(rows_ / g) * w4 * 2}
        want["S"] = 4 * 5
        assert {p: got[f"lowrank.{key}.{p}"] for p in want} == want
        assert not any(k.startswith(f"lowrank.{key}.") and k[len(f"lowrank.{key}."):] not in want for k in got)
        assert row["bytes"] == sum(want.values()) == ex.factor_bytes(m, n, 5, 2, MIX, g)
    assert stats["totals"]["exclusive_bytes"] == sum(v for k, v in got.items() if not k.startswith("head."))
    meta_only = load_factors(path, data=False)
    key = next(iter(rows))
    U = meta_only.lowrank[key][0]
    assert U.device.type == "meta" and U.shape == (rows[key]["shape"][0], 5)


def test_segments_load_as_their_columns_quantised_alone(bert, tmp_path):
    """Loaded U, V: segment i's columns = quantize(those columns of the exact factors, bits_i) dequantised, exactly;
    the int8 columns' round-trip error is much smaller than the int4 columns'."""
    es, shared = bert
    spec, sched = RankSpec("rank", 8), [(0.25, 8), (0.5, 4), (0.25, 3)]
    exact, _ = compress_expert(es, shared, "task2", spec, "float32", False)  # the same SVD, float32 factors
    path, stats = _file(es, shared, tmp_path, spec, sched, 16, "task2")
    f = load_factors(path)
    err = {8: [], 4: [], 3: []}
    for key in _lowrank(stats):
        U, S, V = f.lowrank[key]
        assert torch.equal(S, exact[f"lowrank.{key}.S"])
        for part, got in (("U", U), ("V", V)):
            x = exact[f"lowrank.{key}.{part}"]
            assert got.dtype == torch.float32 and got.shape == x.shape
            for i, start, stop, bits in quant.segments(8, quant.check_schedule(sched)):
                cols = x[:, start:stop]
                alone = quant.dequantize(*quant.quantize(cols, bits, 16), tuple(cols.shape), bits, 16)
                assert torch.equal(got[:, start:stop], alone), (key, part, i)
                err[bits].append(float(torch.linalg.norm(got[:, start:stop] - cols) / torch.linalg.norm(cols)))
    mean = {b: sum(e) / len(e) for b, e in err.items()}
    assert mean[8] < mean[4] / 8 and mean[4] < mean[3]
    assert max(err[8]) < 0.01


def test_one_segment_schedule_is_plain_bits(bert, tmp_path):
    es, shared = bert
    for spec in (RankSpec("rank", 3), RankSpec("budget_fraction", 0.2)):
        plain = _file(es, shared, tmp_path / "p", spec, 4)
        one = _file(es, shared, tmp_path / "o", spec, [(1.0, 4)])
        assert one[0].read_bytes() == plain[0].read_bytes() and one[1] == plain[1]
    assert ex.factor_bytes(30, 20, 5, 2, [[1.0, 8]], 16) == ex.factor_bytes(30, 20, 5, 2, 8, 16)


def test_rel_error_between_plain_8_and_4(bert):
    """Same rank, same SVD: rel_error (measured on the dequantised factors) of the 8/4 mix lies between plain 8 and
    plain 4 bits, per tensor and overall."""
    es, shared = bert
    for spec in (RankSpec("energy", 0.99), RankSpec("fraction", 0.5)):
        rel = {json.dumps(b): compress_expert(es, shared, "task1", spec, "float32", False, b, 16)[1]
               for b in (8, MIX, 4)}
        r8, rm, r4 = (rel[json.dumps(b)] for b in (8, MIX, 4))
        assert r8["totals"]["rel_error_2d"] < rm["totals"]["rel_error_2d"] < r4["totals"]["rel_error_2d"]
        for key, row in _lowrank(rm).items():
            assert r8["tensors"][key]["rank"] == row["rank"] == r4["tensors"][key]["rank"]
            assert r8["tensors"][key]["rel_error"] <= row["rel_error"] * (1 + 1e-3)
            assert row["rel_error"] <= r4["tensors"][key]["rel_error"] * (1 + 1e-3)


@pytest.mark.parametrize("spec", [RankSpec("budget_fraction", 0.2), RankSpec("budget_bytes", 20000),
                                  RankSpec("budget_fraction", 0.6)], ids=str)
def test_budget_held_and_rank_between_int8_and_int4(bert, spec):
    es, shared = bert
    out = {json.dumps(b): compress_expert(es, shared, "task1", spec, "float16", False, b, 16)
           for b in (16, 8, MIX, 4)}
    budget = int(spec.value) if spec.mode == "budget_bytes" else math.floor(
        spec.value * out["16"][1]["totals"]["dense_2d_bytes_factor_dtype"])
    rank = {b: sum(r["rank"] or 0 for r in s["tensors"].values() if r["kind"] == "lowrank")
            for b, (_, s) in out.items()}
    for _, stats in out.values():
        assert stats["totals"]["lowrank_bytes"] <= budget
    assert rank["8"] < rank[json.dumps(MIX)] < rank["4"]
    tensors, stats = out[json.dumps(MIX)]
    for key, row in _lowrank(stats).items():
        assert row["bytes"] == ex.factor_bytes(*row["shape"], row["rank"], 2, MIX, 16) == sum(
            t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(f"lowrank.{key}."))


def test_allocate_budget_never_exceeds():
    """Random spectra and shapes, many budgets: the stored bytes (factors, or dense at full quantised rank) stay
    within the budget."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(40, 30), (64, 16), (7, 90), (33, 33)]
    spectra = {f"w{i}": (torch.sort(torch.rand(min(m, n), generator=gen) ** 3, descending=True)[0], m, n)
               for i, (m, n) in enumerate(shapes)}
    for bits in (MIX, [(0.1, 8), (0.3, 5), (0.6, 2)], 4):
        for budget in range(0, 14000, 450):
            ranks = ex.allocate_budget(spectra, budget, 2, bits, 8)
            stored = sum(m * n * 2 if r == min(m, n) else ex.factor_bytes(m, n, r, 2, bits, 8)
                         for (r, (_, m, n)) in zip(ranks.values(), spectra.values()))
            assert stored <= budget, (bits, budget)
            full = all(r == min(m, n) for r, (_, m, n) in zip(ranks.values(), spectra.values()))
            assert full or stored > budget - 1500  # the budget is spent (one step <= 1500 bytes here)


def test_lowrank_source_path_gives_the_dense_path_file(merged, tmp_path):  # noqa: F811 - fixture
    """LoRA experts: the low-rank source path writes the same file layout (names, shapes, dtypes, bytes), the same
    plan and stats within rounding, and rel_error measured against L @ R on the dequantised factors."""
    pool, shared = merged
    source = linear_merge_source(pool, "b", LAMBDAS)
    for spec in (RankSpec("rank", 2), RankSpec("budget_fraction", 0.08)):  # below every key's K
        dense = FactorStream(pool, shared, "b", spec, "float16", False, MIX, 16)
        low = FactorStream(pool, shared, "b", spec, "float16", False, MIX, 16, source)
        assert low.specs == dense.specs and low.lowrank_keys == _two_d(pool)
        meta = factor_metadata("b", pool.experts["b"].config, spec, "float16", MIX, 16)
        fd = load_factors(write_factors(tmp_path / "d.safetensors", dense, meta))
        fl = load_factors(write_factors(tmp_path / "l.safetensors", low, meta))
        rows = _lowrank(low.stats)
        assert len(rows) >= 4 and any(r["rank"] >= 2 for r in rows.values())  # both segments non-empty
        for key, row in low.stats["tensors"].items():
            other = dense.stats["tensors"][key]
            assert (row["kind"], row["rank"], row["bytes"]) == (other["kind"], other["rank"], other["bytes"])
            assert row["rel_error"] == pytest.approx(other["rel_error"], abs=0.02), key
        for key in rows:
            L, R = source(key)
            v = L.double() @ R.double()
            got = fl.delta(key).double()
            assert rows[key]["rel_error"] == pytest.approx(
                float(torch.linalg.norm(v - got) / torch.linalg.norm(v)), rel=1e-6, abs=1e-9)
            scale = float(torch.linalg.norm(v))
            assert float(torch.linalg.norm(got - fd.delta(key).double())) < 0.05 * scale, key


def _mixed_file():
    """A valid mixed file's tensors and metadata: w [5, 3] as U [5, 3], S [3], V [3, 3] at [(0.5, 8), (0.5, 4)]
    (segments: columns 0..1 int8, column 2 int4; group size 2)."""
    gen = torch.Generator().manual_seed(4)
    U, V = torch.randn(5, 3, generator=gen), torch.randn(3, 3, generator=gen)
    tensors = {"lowrank.w.S": torch.tensor([3.0, 2.0, 1.0]), "dense.b": torch.ones(3)}
    for part, x in (("U", U), ("V", V)):
        for i, cols, bits in ((0, x[:, :2], 8), (1, x[:, 2:], 4)):
            tensors[f"lowrank.w.{part}.q{i}"], tensors[f"lowrank.w.{part}_scales.q{i}"] = quant.quantize(cols, bits, 2)
    meta = factor_metadata("e", {"model_type": "bert"}, RankSpec("rank", 3), "float16", [[0.5, 8], [0.5, 4]], 2)
    return tensors, meta


def _drop(d, key):
    return {k: v for k, v in d.items() if k != key}


def test_mixed_file_reads_back():
    tensors, meta = _mixed_file()
    f = parse_factors(tensors, meta, "x")
    U, S, V = f.lowrank["w"]
    assert U.shape == (5, 3) and V.shape == (3, 3) and f.names() == ["w", "b"]
    assert torch.equal(U[:, 2:], quant.dequantize(tensors["lowrank.w.U.q1"], tensors["lowrank.w.U_scales.q1"],
                                                  (5, 1), 4, 2))


@pytest.mark.parametrize("change, message", [
    (lambda t, m: (_drop(t, "lowrank.w.V_scales.q1"), m),
     r"tensor w has S/U.q0/U.q1/U_scales.q0/U_scales.q1/V.q0/V.q1/V_scales.q0 but rank-3 factors of bits schedule "
     r"\[\[0.5, 8\], \[0.5, 4\]\] need U.q0/U_scales.q0/U.q1/U_scales.q1/S/V.q0/V_scales.q0/V.q1/V_scales.q1"),
    (lambda t, m: ({**t, "lowrank.w.S": torch.ones(2)}, m),
     r"tensor w.U.q0: codes are torch.int8 \[5, 2\], expected torch.int8 \[5, 1\] for 8-bit factor"),
    (lambda t, m: ({**t, "lowrank.w.S": torch.ones(1)}, m), r"tensor w has .* but rank-1 factors of bits schedule"),
    (lambda t, m: (t, {**m, "factor_bits": "[[0.5, 8], [0.4, 4]]"}),
     r"metadata factor_bits '\[\[0.5, 8\], \[0.4, 4\]\]': bits schedule .* is not a non-empty list"),
    (lambda t, m: (t, {**m, "factor_bits": "[[0.5, 8"}), r"metadata factor_bits '\[\[0.5, 8': Expecting"),
    (lambda t, m: ({**t, "lowrank.w.U.q1": t["lowrank.w.U.q1"].to(torch.int8)}, m),
     r"tensor w.U.q1: codes are torch.int8 \[5, 1\], expected torch.uint8 \[5, 1\] for 4-bit factor"),
    (lambda t, m: ({**t, "lowrank.w.V.q1": t["lowrank.w.V.q1"][:2]}, m),
     r"tensor w.V.q1: codes are torch.uint8 \[2, 1\], expected torch.uint8 \[3, 1\]"),
    (lambda t, m: (t, {**m, "factor_bits": "8"}), r"tensor w has S/U.q0/.* but 8-bit factors need"),
])
def test_malformed_mixed_files(tmp_path, change, message):
    tensors, meta = change(*_mixed_file())
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=meta)
    for data in (True, False):
        with pytest.raises(FactorError, match=f"bad.safetensors: {message}"):
            load_factors(path, data)


def test_routed_mixed_equals_materialised(tiny_bert, tmp_path):
    dyn, _ = _pipeline(*tiny_bert, tmp_path, ("fraction", 0.25), MIX)
    assert all(f.lowrank for f in dyn.factors)
    ids, mask = _batch(seed=7, lengths=(5, 9, 3))
    _assert_mixed_routing_equals_materialize(dyn, ids.clamp(max=99), mask)


# --- single bits: the files as before -------------------------------------------------------------------------

# sha256 of (file, stats JSON with sorted keys) for expert task1 of tiny_bert with `_fake_svd`, float16 factors,
# computed with the code before schedules existed (twinmerge/exclusive.py of git HEAD at the time).
PINNED = {
    (8, 64, "rank", 3): ("0cc3de10140e82af15c242a68cd834c1d3133277f8ba3e9d636cecea76d7209d",
                         "e3c385e98ba540cd6c27381681b41d26d638c82889f0d4a91d8adbb4e051079e"),
    (4, 16, "rank", 5): ("21e60ad46687ad9655294d43e5563f1d986ba05d497559fcaf2776333521774c",
                         "81f62a50f9da0add81d78fd3858dc43baac9605d3429e71868ab333101182577"),
    (4, 64, "fraction", 0.3): ("80a0c18ae46a3defa59c4625de4df5cbd349a14172695e1c7f33d7c0ec3c9318",
                               "17c0f0c13435a42c5181d6ee126f30a090a7e98ddf3ced57d921b491786210f3"),
    (2, 5, "rank", 3): ("08a064b0b937a9be602bf7f992a53552a772b15488a4e2fc17f0e55dcbd2408c",
                        "d257bb8514d1c02c721f0b291a3d54f1a83862f6076f71845f3526226566d352"),
}


def test_single_bits_files_as_before(bert, tmp_path, monkeypatch):
    es, shared = bert
    monkeypatch.setattr(ex, "thin_svd", _fake_svd)
    for (bits, g, mode, value), (file_digest, stats_digest) in PINNED.items():
        spec = RankSpec(mode, value)
        stream = FactorStream(es, shared, "task1", spec, "float16", False, bits, g)
        path = write_factors(tmp_path / "f.safetensors", stream,
                             factor_metadata("task1", es.experts["task1"].config, spec, "float16", bits, g))
        assert hashlib.sha256(path.read_bytes()).hexdigest() == file_digest
        assert hashlib.sha256(json.dumps(stream.stats, sort_keys=True).encode()).hexdigest() == stats_digest


def _head_exclusive():
    """twinmerge/exclusive.py of git HEAD as a module of the twinmerge package (None without git)."""
    try:
        source = subprocess.run(["git", "show", "HEAD:twinmerge/exclusive.py"], capture_output=True, check=True,
                                text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    spec = importlib.util.spec_from_loader("twinmerge._exclusive_head", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "twinmerge"
    sys.modules[spec.name] = module
    exec(compile(source, "HEAD:twinmerge/exclusive.py", "exec"), module.__dict__)  # noqa: S102 - our own file
    return module


def test_single_bits_budget_file_equals_head(bert, tmp_path):
    """A budget mode with real SVD (allocation included) at 4 bits: the same bytes as git HEAD's exclusive.py."""
    head = _head_exclusive()
    if head is None:
        pytest.skip("git HEAD not readable")
    es, shared = bert
    for mod, name in ((ex, "now"), (head, "head")):
        spec = mod.RankSpec("budget_fraction", 0.2)
        mod.write_factors(tmp_path / f"{name}.safetensors", mod.FactorStream(es, shared, "task1", spec, "float16",
                                                                              False, 4, 16),
                          mod.factor_metadata("task1", es.experts["task1"].config, spec, "float16", 4, 16))
    assert (tmp_path / "now.safetensors").read_bytes() == (tmp_path / "head.safetensors").read_bytes()


# --- params and the compress step -------------------------------------------------------------------------------

@pytest.mark.parametrize("value, message", [
    ([[0.5, 8], [0.4, 4]], r"compress.factor_bits: bits schedule .* is not a non-empty list of \[share, bits\] "
                           r"pairs with shares > 0 summing to 1 and bits integers in 2..8"),
    ([[0.5, 16], [0.5, 4]], r"compress.factor_bits: bits schedule"),
    ([[0, 8], [1, 4]], r"compress.factor_bits: bits schedule"),
    ([[0.5, "8"], [0.5, 4]], r"compress.factor_bits: bits schedule"),
    ([], r"compress.factor_bits: bits schedule"),
    (3, r"compress.factor_bits: Input should be 16, 8 or 4, or a list of \[share, bits\] pairs"),
    ("8", r"compress.factor_bits: Input should be 16, 8 or 4"),
])
def test_params_schedule_validation(tmp_path, value, message):
    doc = read_yaml("params.yaml")
    doc["compress"]["factor_bits"] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ParamsError, match=message) as info:
        load_params(path)
    assert "\n" not in str(info.value)
