"""twinmerge.exclusive: SVD factors, rank selection (vs brute force), byte accounting, factor files."""
import itertools
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import twinmerge.exclusive as ex
from twinmerge.errors import FactorError
from twinmerge.exclusive import (FORMAT, RankSpec, allocate_budget, bytes_per_rank, compress_expert,
                                 factor_metadata, load_factors, parse_factors, save_factors, thin_svd)
from tiny_models import at_thread_counts
from twinmerge.io import ExpertSet
from twinmerge.merge import build_shared_expert


@pytest.fixture(scope="module", params=["tiny_bert", "tiny_roberta"])
def merged(request):
    """(ExpertSet, shared state dict from Task Arithmetic)."""
    es = ExpertSet(*request.getfixturevalue(request.param))
    return es, build_shared_expert(es, "task_arithmetic", progress=False)[0]


def _v(es, shared, name, key):
    return es.expert_tensor(name, key).float() - shared[key].float()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- SVD and ranks ----------------------------------------------------------------------------------------

def test_thin_svd_shapes_and_reconstruction():
    a = torch.randn(40, 7, generator=_gen())
    U, S, V = thin_svd(a)
    assert U.shape == (40, 7) and S.shape == (7,) and V.shape == (7, 7)
    torch.testing.assert_close((U * S) @ V.T, a, atol=1e-5, rtol=0)
    assert torch.all(S[:-1] >= S[1:])


def test_thin_svd_falls_back_to_float64(monkeypatch):
    real = torch.linalg.svd
    calls = []

    def flaky(a, full_matrices=True):
        calls.append(a.dtype)
        assert full_matrices is False
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return real(a, full_matrices=full_matrices)
    monkeypatch.setattr(torch.linalg, "svd", flaky)
    a = torch.randn(9, 5, generator=_gen())
    U, S, V = thin_svd(a)
    assert calls == [torch.float32, torch.float64] and U.dtype == S.dtype == V.dtype == torch.float32
    torch.testing.assert_close((U * S) @ V.T, a, atol=1e-5, rtol=0)

    def nan_out(a, full_matrices=True):
        U, S, Vh = real(a, full_matrices=full_matrices)
        return (U, S * float("nan"), Vh) if a.dtype == torch.float32 else (U, S, Vh)
    monkeypatch.setattr(torch.linalg, "svd", nan_out)
    assert torch.isfinite(thin_svd(a)[1]).all()


def test_rank_modes():
    s = torch.linspace(10, 1, 768)
    assert RankSpec("fraction", 0.1).rank_for(s) == 76  # the paper: 76 of 768
    assert RankSpec("fraction", 0.29).rank_for(torch.ones(100)) == 29  # no float floor trap
    assert RankSpec("fraction", 0.01).rank_for(torch.ones(20)) == 1  # at least 1
    assert RankSpec("rank", 8).rank_for(torch.ones(5)) == 5 and RankSpec("rank", 3).rank_for(torch.ones(5)) == 3
    for _ in range(20):
        s = torch.rand(12, generator=_gen(_)).sort(descending=True).values
        for value in (0.1, 0.5, 0.9, 0.99, 1.0):
            e = (s.double() ** 2)
            brute = min(r for r in range(1, 13) if e[:r].sum() >= value * e.sum() * (1 - 1e-12))
            assert RankSpec("energy", value).rank_for(s) == brute


@pytest.mark.parametrize("mode, value, message", [
    ("top", 1, "unknown mode 'top'"), ("rank", 0, "integer >= 1"), ("rank", 2.5, "integer >= 1"),
    ("fraction", 0, "in \\(0, 1\\]"), ("energy", 1.2, "in \\(0, 1\\]"), ("budget_bytes", -5, "integer >= 1"),
    ("budget_fraction", float("nan"), "not a finite number"), ("energy", True, "not a finite number"),
])
def test_rank_spec_validation(mode, value, message):
    with pytest.raises(FactorError, match=message):
        RankSpec(mode, value)


def _brute_budget(spectra, budget, itemsize):
    best = 0.0
    for ranks in itertools.product(*[range(len(s) + 1) for s, _, _ in spectra.values()]):
        cost = sum(r * bytes_per_rank(m, n, itemsize) for r, (_, m, n) in zip(ranks, spectra.values()))
        if cost <= budget:
            best = max(best, sum(float((s[:r] ** 2).sum()) for r, (s, _, _) in zip(ranks, spectra.values())))
    return best


def _kept(spectra, ranks):
    return sum(float((s[:ranks[k]] ** 2).sum()) for k, (s, _, _) in spectra.items())


def test_budget_allocation_vs_brute_force():
    for trial in range(15):
        g = _gen(trial)
        same = {f"w{i}": (thin_svd(torch.randn(6, 4, generator=g) * (i + 1))[1], 6, 4) for i in range(3)}
        budget = int(torch.randint(0, 12 * bytes_per_rank(6, 4, 2), (1,), generator=g))
        ranks = allocate_budget(same, budget, 2)
        assert sum(r * bytes_per_rank(6, 4, 2) for r in ranks.values()) <= budget
        assert _kept(same, ranks) == pytest.approx(_brute_budget(same, budget, 2), rel=1e-9)  # equal costs: exact
        mixed = {"a": (thin_svd(torch.randn(8, 3, generator=g))[1], 8, 3),
                 "b": (thin_svd(torch.randn(4, 4, generator=g) * 2)[1], 4, 4),
                 "c": (thin_svd(torch.randn(20, 2, generator=g))[1], 20, 2)}
        ranks = allocate_budget(mixed, budget, 4)
        assert sum(r * bytes_per_rank(m, n, 4) for r, (_, m, n) in zip(ranks.values(), mixed.values())) <= budget
        best = _brute_budget(mixed, budget, 4)
        slack = sum(float(s[0] ** 2) for s, _, _ in mixed.values())  # at most one triplet per matrix lost
        assert best - slack - 1e-6 <= _kept(mixed, ranks) <= best + 1e-6


# --- compress_expert --------------------------------------------------------------------------------------

def test_factors_follow_eckart_young(merged):
    es, shared = merged
    tensors, stats = compress_expert(es, shared, "task1", RankSpec("rank", 4), "float32", progress=False)
    lowrank = [k for k, row in stats["tensors"].items() if row["kind"] == "lowrank"]
    assert len(lowrank) >= 12
    for key in lowrank:
        v = _v(es, shared, "task1", key)
        s = torch.linalg.svdvals(v.double())
        U, S, V = (tensors[f"lowrank.{key}.{p}"] for p in "USV")
        assert U.shape == (v.shape[0], 4) and S.shape == (4,) and V.shape == (v.shape[1], 4)
        err2 = float(torch.linalg.norm((v - (U * S) @ V.T).double()) ** 2)
        assert err2 == pytest.approx(float((s[4:] ** 2).sum()), rel=1e-4)
        assert stats["tensors"][key]["energy_kept"] == pytest.approx(float((s[:4] ** 2).sum() / (s ** 2).sum()), rel=1e-5)
        assert stats["tensors"][key]["rel_error"] == pytest.approx((err2 / float((s ** 2).sum())) ** 0.5, rel=1e-4)


def test_kinds_dense_heads_and_zero(merged):
    es, shared = merged
    tensors, stats = compress_expert(es, shared, "task2", RankSpec("fraction", 0.1), progress=False)
    for key in es.mergeable_keys():
        row, v = stats["tensors"][key], _v(es, shared, "task2", key)
        if v.ndim == 1:
            assert row["kind"] == "dense" and tensors[f"dense.{key}"].dtype == torch.float32
            assert torch.equal(tensors[f"dense.{key}"], v)
        elif row["rank"] * (v.shape[0] + v.shape[1] + 1) >= v.numel():
            assert row["kind"] == "dense" and tensors[f"dense.{key}"].dtype == torch.float16  # e.g. [2, 32]
        else:
            assert row["kind"] == "lowrank" and row["rank"] == max(1, int(0.1 * min(v.shape)))
    for key in es.head_keys():
        assert torch.equal(tensors[f"head.{key}"], es.expert_tensor("task2", key).float())
    own = {k: es.expert_tensor("task2", k) for k in es.mergeable_keys()}  # theta_s = theta_t -> v_t = 0
    tensors, stats = compress_expert(es, own, "task2", RankSpec("rank", 2), progress=False)
    assert all(k.startswith("head.") for k in tensors) and stats["totals"]["tensors"] == 0
    assert {row["kind"] for row in stats["tensors"].values()} == {"zero"}


def test_energy_mode_ranks(merged):
    es, shared = merged
    _, stats = compress_expert(es, shared, "task0", RankSpec("energy", 0.8), "float32", progress=False)
    for key, row in stats["tensors"].items():
        if row["kind"] == "lowrank":
            e = torch.linalg.svdvals(_v(es, shared, "task0", key).double()) ** 2
            brute = min(r for r in range(1, len(e) + 1) if e[:r].sum() >= 0.8 * e.sum() * (1 - 1e-9))
            assert row["rank"] == brute and row["energy_kept"] >= 0.8 - 1e-6


@pytest.mark.parametrize("factor_dtype", ["float16", "bfloat16", "float32"])
def test_budget_modes_and_byte_accounting(merged, factor_dtype):
    es, shared = merged
    itemsize = {"float16": 2, "bfloat16": 2, "float32": 4}[factor_dtype]
    two_d = [k for k in es.mergeable_keys() if len(es.base.shape(es.base_key(k))) == 2]
    dense_2d = sum(torch.Size(es.base.shape(es.base_key(k))).numel() * itemsize for k in two_d)
    for spec, budget in [(RankSpec("budget_bytes", 20000), 20000),
                         (RankSpec("budget_fraction", 0.25), int(0.25 * dense_2d))]:
        tensors, stats = compress_expert(es, shared, "task1", spec, factor_dtype, progress=False)
        totals = stats["totals"]
        assert totals["dense_2d_bytes_factor_dtype"] == dense_2d
        assert budget - bytes_per_rank(64, 32, itemsize) * 2 < totals["lowrank_bytes"] <= budget
        spectra = {k: (torch.linalg.svdvals(_v(es, shared, "task1", k)), *es.base.shape(es.base_key(k))) for k in two_d}
        expected = allocate_budget(spectra, budget, itemsize)
        for k in two_d:
            row = stats["tensors"][k]
            m, n = row["shape"]
            assert row["rank"] == (min(m, n) if expected[k] * (m + n + 1) >= m * n else expected[k])
        # bytes in the stats are the bytes of the stored tensors
        stored = {k: t.numel() * t.element_size() for k, t in tensors.items()}
        for key, row in stats["tensors"].items():
            assert row["bytes"] == sum(b for k, b in stored.items() if k in (f"dense.{key}", f"lowrank.{key}.U",
                                                                             f"lowrank.{key}.S", f"lowrank.{key}.V"))
        assert totals["exclusive_bytes"] == sum(b for k, b in stored.items() if not k.startswith("head."))
        assert totals["head_bytes"] == sum(b for k, b in stored.items() if k.startswith("head."))
        assert totals["dense_bytes_float32"] == sum(torch.Size(r["shape"]).numel() * 4
                                                    for r in stats["tensors"].values())
        assert totals["ratio"] == pytest.approx(totals["exclusive_bytes"] / totals["dense_bytes_float32"])
        for k in two_d:
            if stats["tensors"][k]["kind"] == "lowrank":
                assert tensors[f"lowrank.{k}.U"].dtype == tensors[f"lowrank.{k}.V"].dtype == ex.FACTOR_DTYPES[factor_dtype]
                assert tensors[f"lowrank.{k}.S"].dtype == torch.float32


def test_half_factors_close_to_float32(merged):
    es, shared = merged
    _, s32 = compress_expert(es, shared, "task0", RankSpec("rank", 6), "float32", progress=False)
    for dtype, tol in [("float16", 2e-3), ("bfloat16", 2e-2)]:
        _, s16 = compress_expert(es, shared, "task0", RankSpec("rank", 6), dtype, progress=False)
        for key, row in s16["tensors"].items():
            assert row["rel_error"] == pytest.approx(s32["tensors"][key]["rel_error"], abs=tol)


def test_bad_arguments(merged):
    es, shared = merged
    with pytest.raises(FactorError, match="unknown expert 'nope'"):
        compress_expert(es, shared, "nope", RankSpec("rank", 1), progress=False)
    with pytest.raises(FactorError, match="factor dtype 'int8'"):
        compress_expert(es, shared, "task0", RankSpec("rank", 1), "int8", progress=False)
    key = es.mergeable_keys()[3]
    with pytest.raises(FactorError, match=f"shared state dict has no tensor {key}"):
        compress_expert(es, {k: v for k, v in shared.items() if k != key}, "task0", RankSpec("rank", 1),
                        progress=False)


# --- factor files -----------------------------------------------------------------------------------------

def test_file_roundtrip(tmp_path, merged):
    es, shared = merged
    spec = RankSpec("energy", 0.7)
    tensors, stats = compress_expert(es, shared, "task2", spec, "float16", progress=False)
    meta = factor_metadata("task2", es.experts["task2"].config, spec, "float16")
    path = save_factors(tmp_path / "task2.safetensors", tensors, meta)
    f = load_factors(path)
    assert f.expert == "task2" and f.config["id2label"] == es.experts["task2"].config["id2label"]
    assert f.metadata["format"] == FORMAT and json.loads(f.metadata["rank_spec"]) == {"mode": "energy", "value": 0.7}
    assert set(f.names()) == set(es.mergeable_keys())
    for key in es.mergeable_keys():
        v = _v(es, shared, "task2", key)
        d = f.delta(key)
        assert d.dtype == torch.float32 and d.shape == v.shape
        rel = float(torch.linalg.norm(v - d) / torch.linalg.norm(v))
        assert rel == pytest.approx(stats["tensors"][key]["rel_error"], abs=1e-6)
    assert f.delta("not.there") is None
    assert set(f.head) == set(es.head_keys())
    f.check_shapes({k: v.shape for k, v in shared.items()})
    key = f.names()[0]
    with pytest.raises(FactorError, match=f"expert 'task2': tensor {key} has shape"):
        f.check_shapes({**{k: v.shape for k, v in shared.items()}, key: (1, 1)})
    with pytest.raises(FactorError, match=f"tensor {key} not in shared model"):
        f.check_shapes({k: v.shape for k, v in shared.items() if k != key})


def _meta():
    return factor_metadata("e", {"model_type": "bert"}, RankSpec("rank", 2), "float32")


@pytest.mark.parametrize("tensors, meta, message", [
    ({}, {**_meta(), "format": "other/1"}, "format 'other/1', expected 'twinmerge-exclusive/1'"),
    ({}, {k: v for k, v in _meta().items() if k != "config"}, "metadata lacks 'config'"),
    ({}, {**_meta(), "config": "{"}, "metadata is not valid JSON"),
    ({"lowrank.w.U": torch.zeros(4, 2), "lowrank.w.S": torch.zeros(2)}, _meta(), "tensor w has S/U but needs U, S and V"),
    ({"lowrank.w.U": torch.zeros(4, 2), "lowrank.w.S": torch.zeros(3), "lowrank.w.V": torch.zeros(5, 2)}, _meta(),
     "tensor w has inconsistent factor shapes U \\[4, 2\\], S \\[3\\], V \\[5, 2\\]"),
    ({"lowrank.w.U": torch.zeros(4, 2), "lowrank.w.S": torch.zeros(2), "lowrank.w.V": torch.zeros(5, 2),
      "dense.w": torch.zeros(4, 5)}, _meta(), "tensor w is stored both low-rank and dense"),
    ({"weird.w": torch.zeros(1)}, _meta(), "unexpected tensor weird.w"),
])
def test_malformed_factor_files(tmp_path, tensors, meta, message):
    path = tmp_path / "bad.safetensors"
    save_file(tensors or {"dense.x": torch.zeros(1)}, path, metadata=meta)
    with pytest.raises(FactorError, match=f"bad.safetensors: {message}"):
        load_factors(path)
    with pytest.raises(FactorError, match=message):  # save refuses it and leaves nothing behind
        save_factors(tmp_path / "out.safetensors", tensors or {"dense.x": torch.zeros(1)}, meta)
    assert not (tmp_path / "out.safetensors").exists()


def test_unreadable_factor_files(tmp_path):
    with pytest.raises(FactorError, match="missing.safetensors: factor file not found"):
        load_factors(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(FactorError, match="junk.safetensors: cannot read safetensors file"):
        load_factors(tmp_path / "junk.safetensors")


def test_saved_factors_are_read_as_written(tmp_path):
    U, S, V = torch.randn(4, 2), torch.tensor([2.0, 1.0]), torch.randn(5, 2)
    save_factors(tmp_path / "f.safetensors", {"lowrank.w.U": U, "lowrank.w.S": S, "lowrank.w.V": V,
                                             "dense.b": torch.ones(5), "head.h": torch.zeros(2)}, _meta())
    raw = load_file(tmp_path / "f.safetensors")
    assert set(raw) == {"lowrank.w.U", "lowrank.w.S", "lowrank.w.V", "dense.b", "head.h"}
    f = load_factors(tmp_path / "f.safetensors")
    torch.testing.assert_close(f.delta("w"), U @ torch.diag(S) @ V.T)
    assert torch.equal(f.delta("b"), torch.ones(5)) and torch.equal(f.head["h"], torch.zeros(2))
    assert parse_factors(raw, _meta(), "x").names() == ["w", "b"]


def test_svd_bytes_do_not_depend_on_thread_count():
    """Factor files must be byte-identical run to run: MKL's float32 SVD of a tall matrix differs with the
    thread count, so thin_svd runs single-threaded whatever the caller set."""
    a = torch.randn(3000, 96, generator=_gen(5))
    assert all(torch.equal(x, y) for x, y in zip(*at_thread_counts(lambda: thin_svd(a))))
