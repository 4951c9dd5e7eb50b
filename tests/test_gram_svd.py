"""The Gram path of the exclusive SVD (twinmerge/gram_svd.py) and v_t built in blocks of rows: same factors as
LAPACK's thin SVD within 1e-5, and the same bytes where the Gram path is not taken."""
import math

import pytest
import torch

import twinmerge.exclusive as ex
import twinmerge.gram_svd as gs
from tasks.modularize import modularize
from tasks.params import CompressParams, ExpertSpec, MergeParams, MethodsParams, Params
from twinmerge.exclusive import FactorStream, RankSpec, factor_metadata, write_factors
from twinmerge.io import ExpertSet
from twinmerge.shared import SharedModel


def _decaying(m, n, seed=0, rank=None):
    """A float32 [m, n] matrix with singular values 10^(-3 i / k) (k = its rank, default min(m, n))."""
    g = torch.Generator().manual_seed(seed)
    k = rank or min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    s = 10 ** (-3 * torch.arange(k, dtype=torch.float64) / k)
    return ((U * s) @ V.T).to(torch.float32)


@pytest.mark.parametrize("shape", [(400, 30), (30, 400), (257, 64)])
@pytest.mark.parametrize("r", [1, 7, 30])
def test_gram_svd_equals_lapack(shape, r, monkeypatch):
    monkeypatch.setattr(gs, "BLOCK_BYTES", 8 * 64 * 13)  # many uneven blocks of rows
    v = _decaying(*shape)
    U, S, V = gs.gram_svd(v, r)
    k = min(shape)
    assert U.shape == (shape[0], r) and S.shape == (k,) and V.shape == (shape[1], r)
    assert U.dtype == S.dtype == V.dtype == torch.float32
    Ul, Sl, Vhl = torch.linalg.svd(v.double(), full_matrices=False)
    torch.testing.assert_close(S.double(), Sl, atol=1e-6 * float(Sl[0]), rtol=1e-5)
    lapack = (Ul[:, :r] * Sl[:r]) @ Vhl[:r]
    torch.testing.assert_close(((U.double() * S[:r].double()) @ V.double().T), lapack, atol=1e-5 * float(Sl[0]),
                               rtol=0)
    torch.testing.assert_close(U.double().T @ U.double(), torch.eye(r, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(V.double().T @ V.double(), torch.eye(r, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(gs.gram_spectrum(v), S)


def test_gram_svd_of_a_rank_deficient_matrix_has_no_nan():
    v = _decaying(120, 20, rank=3)
    U, S, V = gs.gram_svd(v, 8)
    assert torch.isfinite(U).all() and torch.isfinite(V).all()
    assert float(S[3:].max()) < 1e-5 * float(S[0])
    torch.testing.assert_close((U * S[:8]) @ V.T, v, atol=1e-5, rtol=0)
    zero = gs.gram_svd(torch.zeros(40, 5), 2)
    assert not zero[0].any() and not zero[1].any()


def test_use_gram_needs_size_and_elongation():
    mib = 2**20
    assert gs.use_gram((mib // 16, 4), 1.0)  # 1 MiB in float32, 2^14 : 1
    assert gs.use_gram((4, mib // 16), 1.0)  # wide
    assert not gs.use_gram((mib // 16, 4), 1.01)  # too small
    assert not gs.use_gram((1024, 257), 0)  # 3.98 : 1
    assert gs.use_gram((1028, 257), 0)
    assert not gs.use_gram((1028, 257), None) and not gs.use_gram((1028,), 0) and not gs.use_gram((0, 5), 0)


def test_lowrank_error2_equals_the_dense_norm(monkeypatch):
    monkeypatch.setattr(gs, "BLOCK_BYTES", 8 * 64 * 5)
    v = _decaying(300, 50, seed=1)
    U, S, V = gs.gram_svd(v, 6)
    U16, V16 = U.half(), V.half()
    dense = float(torch.linalg.norm((U16.float() * S[:6]) @ V16.float().T - v)) ** 2
    assert math.isclose(gs.lowrank_error2(U16, S[:6], V16, v), dense, rel_tol=1e-5)


def _params(names, folders):
    experts = {n: ExpertSpec(path=str(folders[n]), task=n, data="unused") for n in names}
    return Params.model_construct(experts=experts, merge=MergeParams(method="task_arithmetic",
                                                                    options={"scaling": 0.4}),
                                  compress=CompressParams(), methods=MethodsParams.model_construct())


@pytest.fixture(scope="module")
def shared_set(tiny_bert, tmp_path_factory):
    base, experts = tiny_bert
    ckpts = next(iter(experts.values())).parent
    out = tmp_path_factory.mktemp("gram") / "shared"
    modularize(_params(list(experts), experts), out, base_dir=base, checkpoints_dir=ckpts)
    name = list(experts)[0]
    return ExpertSet(base, {name: experts[name]}), SharedModel(out), name


def _file(tmp_path, stream, pool, name, spec, label):
    meta = factor_metadata(name, pool.experts[name].config, spec, stream.factor_dtype, stream.factor_bits)
    return write_factors(tmp_path / f"{label}.safetensors", stream, meta).read_bytes()


@pytest.mark.parametrize("spec", [RankSpec("fraction", 0.25), RankSpec("budget_fraction", 0.3)])
def test_blocks_of_rows_give_the_same_bytes(shared_set, tmp_path, monkeypatch, spec):
    """v_t read in 16 MiB blocks (one block on tiny models) and in blocks of 2 rows: identical factor files."""
    pool, shared, name = shared_set
    whole = FactorStream(pool, shared, name, spec, "float32", False)
    ref = _file(tmp_path, whole, pool, name, spec, "whole")
    monkeypatch.setattr(ex, "ROW_BLOCK_BYTES", 2 * 32 * 4)
    reads = []
    read = SharedModel.read
    monkeypatch.setattr(SharedModel, "read", lambda self, key, rows=None: reads.append(rows) or read(self, key, rows))
    blocks = FactorStream(pool, shared, name, spec, "float32", False)
    assert _file(tmp_path, blocks, pool, name, spec, "blocks") == ref
    assert blocks.stats == whole.stats
    assert slice(0, 2) in reads and None not in [r for r in reads if r is not None]


@pytest.mark.parametrize("spec,bits", [(RankSpec("fraction", 0.25), 16), (RankSpec("budget_fraction", 0.3), 16),
                                       (RankSpec("energy", 0.5), [[0.5, 4], [0.5, 2]])])
def test_gram_path_equals_the_lapack_path(shared_set, monkeypatch, spec, bits):
    """The embeddings' v_t [100, 32] and [2, 32] through the Gram path (aspect rule lowered to 3, no size floor):
    the same ranks, energy and products as LAPACK's within 1e-5; every other tensor byte-identical."""
    pool, shared, name = shared_set
    monkeypatch.setattr(gs, "MIN_ASPECT", 3)
    lapack = FactorStream(pool, shared, name, spec, "float32", False, bits, 16, gram_svd_mib=None)
    gram = FactorStream(pool, shared, name, spec, "float32", False, bits, 16, gram_svd_mib=0)
    a, b = dict(lapack), dict(gram)
    grams = [k for k, row in gram.stats["tensors"].items() if row.get("svd") == "gram"]
    elongated = ["bert.embeddings.token_type_embeddings.weight",  # [2, 32]: wide
                 "bert.embeddings.word_embeddings.weight"]  # [100, 32]: tall
    assert grams == [k for k in elongated if gram.plan[k][0] == "lowrank"] and elongated[1] in grams
    assert not any("svd" in row for row in lapack.stats["tensors"].values())
    assert lapack.plan == gram.plan
    for key, row in gram.stats["tensors"].items():
        other = lapack.stats["tensors"][key]
        if key not in grams:
            assert row == other
            continue
        assert math.isclose(row["energy_kept"], other["energy_kept"], rel_tol=1e-5)
        assert math.isclose(row["rel_error"], other["rel_error"], rel_tol=1e-3 if bits != 16 else 1e-4)
    factors_a = ex.parse_factors(a, _meta(lapack, pool, name, spec), "lapack")
    factors_b = ex.parse_factors(b, _meta(gram, pool, name, spec), "gram")
    assert set(factors_a.lowrank) == set(factors_b.lowrank) and set(grams) <= set(factors_a.lowrank)
    for key in factors_a.lowrank:
        da, db = factors_a.delta(key).double(), factors_b.delta(key).double()
        if key not in grams:
            assert torch.equal(da, db)
        elif bits == 16:
            torch.testing.assert_close(db, da, atol=1e-5 * float(da.abs().max()), rtol=0)


def _meta(stream, pool, name, spec):
    return factor_metadata(name, pool.experts[name].config, spec, stream.factor_dtype, stream.factor_bits,
                           stream.group_size)
