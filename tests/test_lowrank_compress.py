"""Low-rank exclusive SVD of PEFT LoRA experts in the factor stream and the `compress` step (issue 17): the same
plan, factors and stats as the dense computation, no m x n matrix formed, taken only where exact, and full-weight
experts' files unchanged."""
import logging
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertForSequenceClassification

import twinmerge.exclusive as ex
from tasks import compress as compress_step
from tasks import modularize
from tasks.params import Params
from tiny_models import make_base
from twinmerge.exclusive import FactorStream, RankSpec, compress_expert, factor_metadata, linear_merge_source, \
    write_factors
from twinmerge.errors import FactorError
from twinmerge.io import ExpertSet, write_json_atomic
from twinmerge.merge import build_shared_expert
from twinmerge.shared import SharedModel

# (labels, LoraConfig kwargs): ranks 4 / 8 / 2, rslora + alpha_pattern on "b"; every adapter saves its classifier
# (task_type SEQ_CLS: modules_to_save). "c"'s output.dense covers [32, 32] and [32, 64] matrices, and it trains
# its targets' biases (dense 1-D deltas: the dense path).
RECIPES = {
    "a": (2, dict(r=4, lora_alpha=8, target_modules=["query", "value"])),
    "b": (3, dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["query", "key", "intermediate.dense"],
                  alpha_pattern={"key": 4})),
    "c": (4, dict(r=2, lora_alpha=4, target_modules=["value", "output.dense"], bias="lora_only")),
}
LAMBDAS = {"a": 0.3, "b": 0.3, "c": 0.3}
# Ranks below every key's K (>= 2) and budgets that do not buy every true triplet, so that the dense plan (rank up to
# min(m, n)) and the low-rank plan (rank capped at K) agree (see test_rank_capped_at_K and test_generous_budget).
SPECS = [RankSpec("rank", 2), RankSpec("fraction", 0.07), RankSpec("energy", 0.9), RankSpec("budget_fraction", 0.15),
         RankSpec("budget_bytes", 10000)]


def _peft_expert(base, labels, kwargs, seed, folder, full_folder=None):
    """A PEFT LoRA adapter of `base` with nonzero random factors and head, saved to `folder` (and, merged by PEFT,
    as a full checkpoint to `full_folder`)."""
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(base, num_labels=labels)
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", lora_dropout=0.0, **kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
        peft_model.save_pretrained(folder)
    if full_folder is not None:
        peft_model.merge_and_unload().save_pretrained(full_folder)


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory):
    """(base folder, checkpoints folder): adapters a, b, c and "f", the full-weight (merged) twin of "a"."""
    tmp = tmp_path_factory.mktemp("lowrank")
    base = make_base(tmp, "bert", bare_backbone=True)
    ckpts = tmp / "checkpoints"
    for i, (name, (labels, kwargs)) in enumerate(RECIPES.items()):
        _peft_expert(base, labels, kwargs, 20 + i, ckpts / name, ckpts / "f" if name == "a" else None)
    return base, ckpts


@pytest.fixture(scope="module")
def merged(lora_dirs):
    """(ExpertSet of a, b, c, Task Arithmetic theta_s with lambda 0.3)."""
    base, ckpts = lora_dirs
    pool = ExpertSet(base, {n: ckpts / n for n in RECIPES})
    return pool, build_shared_expert(pool, "task_arithmetic", {"scaling": 0.3}, progress=False)[0]


def _two_d(pool):
    return [k for k in pool.mergeable_keys() if len(pool.base.shape(pool.base_key(k))) == 2]


def _both(pool, shared, name, spec, dtype="float32", bits=16, lambdas=LAMBDAS):
    dense = compress_expert(pool, shared, name, spec, dtype, False, bits)
    source = linear_merge_source(pool, name, lambdas)
    low = compress_expert(pool, shared, name, spec, dtype, False, bits, lowrank=source)
    return dense, low


def _product(tensors, key):
    U, S, V = (tensors[f"lowrank.{key}.{p}"].to(torch.float64) for p in "USV")
    return (U * S) @ V.T


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.mode)
def test_lowrank_path_equals_dense(merged, spec):
    pool, shared = merged
    (td, sd), (tl, sl) = _both(pool, shared, "b", spec)
    rows_d, rows_l = sd["tensors"], sl["tensors"]
    plan = lambda rows: [(k, r["kind"], r["rank"]) for k, r in rows.items()]  # noqa: E731
    assert plan(rows_d) == plan(rows_l)
    assert td.keys() == tl.keys()
    lowrank = [k for k, r in rows_l.items() if r["kind"] == "lowrank"]
    assert len(lowrank) >= 4 and {r["kind"] for r in rows_l.values()} >= {"zero", "lowrank", "dense"}
    for key in lowrank:
        scale = float(td[f"lowrank.{key}.S"][0])
        torch.testing.assert_close(tl[f"lowrank.{key}.S"], td[f"lowrank.{key}.S"], atol=1e-5 * scale, rtol=0)
        torch.testing.assert_close(_product(tl, key), _product(td, key), atol=1e-5 * scale, rtol=0)
    for key, row in rows_d.items():
        for field in ("energy_kept", "rel_error"):
            assert rows_l[key][field] == pytest.approx(row[field], abs=1e-4), (key, field)
        assert rows_l[key]["bytes"] == row["bytes"] and rows_l[key]["shape"] == row["shape"]
    assert sl["totals"]["rel_error_2d"] == pytest.approx(sd["totals"]["rel_error_2d"], abs=1e-4)
    for key in (k for k in td if k.startswith(("head.", "dense."))):
        assert torch.equal(tl[key], td[key]), key
    assert any(k.startswith("head.classifier") for k in tl)


@pytest.mark.parametrize("dtype,bits", [("float16", 16), ("bfloat16", 16), ("float16", 8), ("float16", 4)])
def test_lowrank_rel_error_of_rounded_factors(merged, dtype, bits):
    """rel_error from Gram products of the stored (rounded, dequantised) factors equals ||L R - X||_F / ||L R||_F
    computed densely (float64) and the dense path's, also where every triplet is kept (energy 1: rounding alone)."""
    pool, shared = merged
    source = linear_merge_source(pool, "a", LAMBDAS)
    for spec in (RankSpec("rank", 2), RankSpec("energy", 1.0)):
        (_, sd), (tl, sl) = _both(pool, shared, "a", spec, dtype, bits)
        meta = factor_metadata("a", pool.experts["a"].config, spec, dtype, bits)
        read = ex.parse_factors(tl, meta, "low-rank file")
        for key, row in sd["tensors"].items():
            assert sl["tensors"][key]["kind"] == row["kind"] and sl["tensors"][key]["rank"] == row["rank"]
            if row["kind"] != "lowrank":
                continue
            L, R = source(key)
            v = L.double() @ R.double()
            U, S, V = (t.double() for t in read.lowrank[key])
            exact = float(torch.linalg.norm(v - (U * S) @ V.T) / torch.linalg.norm(v))
            assert sl["tensors"][key]["rel_error"] == pytest.approx(exact, rel=1e-6, abs=1e-9), key
            assert sl["tensors"][key]["rel_error"] == pytest.approx(row["rel_error"], abs=1e-4), key
            assert row["rel_error"] > (1e-5 if bits == 16 else 1e-3)  # rounding is measured, not assumed away


def test_rank_capped_at_K_and_incremental_expert(merged):
    """Ranks above K are capped at K (the dense SVD's extra triplets are rounding noise): the factors still give
    v_t; an expert outside the shared merge (incremental mode) has coefficient 1."""
    pool, shared = merged
    for name, lambdas in (("a", LAMBDAS), ("c", {"a": 0.3, "b": 0.3})):
        shared_now = shared if "c" in lambdas else build_shared_expert(
            ExpertSet(pool.base.folder, {n: pool.experts[n].folder for n in lambdas}), "task_arithmetic",
            {"scaling": 0.3}, progress=False)[0]
        (td, sd), (tl, sl) = _both(pool, shared_now, name, RankSpec("rank", 12), lambdas=lambdas)
        capped = 0
        for key, row in sl["tensors"].items():
            if row["kind"] != "lowrank":
                continue
            v = pool.expert_tensor(name, key).double() - shared_now[key].double()
            torch.testing.assert_close(_product(tl, key), v, atol=1e-5 * float(v.abs().max()), rtol=0)
            capped += row["rank"] < sd["tensors"][key]["rank"]
            assert row["rel_error"] < 1e-5
        assert capped >= 4


@pytest.mark.parametrize("spec", [RankSpec("budget_fraction", 0.5), RankSpec("budget_bytes", 40000)], ids=str)
def test_generous_budget_buys_no_noise(merged, spec):
    """A budget above what every true triplet costs: the dense path spends the rest on rounding-noise triplets
    (or stores dense), the low-rank path stops at rank K: every v_t kept, in fewer bytes."""
    pool, shared = merged
    (_, sd), (tl, sl) = _both(pool, shared, "b", spec)
    assert sl["totals"]["exclusive_bytes"] < sd["totals"]["exclusive_bytes"]
    assert sl["totals"]["rel_error_2d"] < 1e-5 and sd["totals"]["rel_error_2d"] < 1e-5
    for key, row in sl["tensors"].items():
        assert row["kind"] in ("zero", "dense") or row["rank"] <= sd["tensors"][key]["rank"]


def test_lowrank_path_forms_no_m_by_n_matrix(merged, monkeypatch):
    """Every 2-D key is covered (LoRA factors, or K = 0): no dense SVD, no v_t of a 2-D key is read."""
    pool, shared = merged
    two_d = set(_two_d(pool))

    def refuse(*args):
        raise AssertionError("dense SVD called")
    real_delta = FactorStream._delta

    def delta(self, key):
        assert key not in two_d, f"v_t formed for {key}"
        return real_delta(self, key)
    monkeypatch.setattr(ex, "thin_svd", refuse)
    monkeypatch.setattr(ex, "singular_values", refuse)
    monkeypatch.setattr(FactorStream, "_delta", delta)
    for spec in SPECS:
        source = linear_merge_source(pool, "a", LAMBDAS)
        stream = FactorStream(pool, shared, "a", spec, "float16", False, lowrank=source)
        tensors = dict(stream)
        assert stream.lowrank_keys == _two_d(pool) and tensors
        assert {r["kind"] for k, r in stream.stats["tensors"].items() if k in two_d} <= {"zero", "lowrank", "dropped"}


# --- the compress step ----------------------------------------------------------------------------------------

def _params(names, method="task_arithmetic", options=None, exclude=(), merged_experts=("a", "b", "c"),
            rank=("rank", 2)):
    return Params.model_validate({
        "base": {"path": "unused"},
        "experts": {n: {"path": "unused", "task": n, "data": "unused"} for n in names},
        "merge": {"method": method, "options": options or {}, "exclude": list(exclude),
                  "experts": merged_experts and list(merged_experts)},
        "compress": {"rank": {"mode": rank[0], "value": rank[1]}, "dtype": "float32"}})


def _run(params, expert, base, ckpts, tmp_path, caplog):
    """modularize + compress `expert`; (the INFO line of compress, factor file bytes, shared folder)."""
    dirs = {"base_dir": base, "checkpoints_dir": ckpts}
    shared = modularize.modularize(params, tmp_path / "shared", **dirs)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tasks.compress"):
        compress_step.compress(params, expert, shared, tmp_path / "out", False, **dirs)
    line, = [r.getMessage() for r in caplog.records if r.name == "tasks.compress"]
    return line, (tmp_path / "out" / f"{expert}.safetensors").read_bytes(), shared


@pytest.mark.parametrize("case,expect", [  # 39 mergeable tensors, 16 of them 2-D (all covered by the source)
    (dict(method="task_arithmetic", options={"scaling": 0.4}), "low-rank path for 16 of 39 tensors (LoRA experts, "
                                                               "task_arithmetic merge)"),
    (dict(method="weight_average"), "low-rank path for 16 of 39 tensors (LoRA experts, weight_average merge)"),
    (dict(merged_experts=["a", "c"]), "low-rank path for 16 of 39 tensors"),  # b compressed, not merged
    (dict(method="ties"), "dense path for all 39 tensors (the shared merge (ties, 0 tensors kept) is not linear"),
    (dict(exclude=["*.key.weight"]), "dense path for all 39 tensors (the shared merge (task_arithmetic, 2 tensors "
                                     "kept) is not linear"),
    (dict(merged_experts=["a", "b", "f"]), "dense path for all 39 tensors (expert(s) f not LoRA adapters)"),
    (dict(merged_experts=None), "dense path for all 39 tensors (expert(s) f not LoRA adapters)"),
])
def test_compress_step_takes_the_lowrank_path_only_when_exact(lora_dirs, tmp_path, caplog, case, expect):
    base, ckpts = lora_dirs
    params = _params(["a", "b", "c", "f"], **case)
    line, produced, shared_dir = _run(params, "b", base, ckpts, tmp_path, caplog)
    assert expect in line, line
    if "low-rank" not in line:
        return
    pool = ExpertSet(base, {"b": ckpts / "b"})  # the file equals the dense computation's within rounding
    spec = RankSpec("rank", 2)
    dense = dict(FactorStream(pool, SharedModel(shared_dir), "b", spec, "float32", False))
    low = ex.load_factors(tmp_path / "out" / "b.safetensors")
    assert set(low.lowrank) == {k[len("lowrank."):-len(".U")] for k in dense if k.endswith(".U")}
    assert set(low.dense) == {k[len("dense."):] for k in dense if k.startswith("dense.")}
    for key in low.lowrank:
        scale = float(dense[f"lowrank.{key}.S"][0])
        torch.testing.assert_close(low.delta(key).double(), _product(dense, key), atol=1e-5 * scale, rtol=0)


def test_full_weight_experts_bytes_unchanged(tiny_bert, tmp_path, caplog):
    """Full fine-tunes: the step's factor file and stats are byte-identical to the dense stream's (no low-rank
    source; the dense path is also checked byte-identical to the code before the low-rank path existed)."""
    base, experts = tiny_bert
    ckpts = next(iter(experts.values())).parent
    for rank in (("fraction", 0.1), ("energy", 0.9), ("budget_fraction", 0.2)):
        params = _params(list(experts), merged_experts=None, rank=rank)
        name = list(experts)[1]
        line, produced, shared_dir = _run(params, name, base, ckpts, tmp_path / rank[0], caplog)
        assert "dense path" in line and "not LoRA adapters" in line
        pool = ExpertSet(base, {name: experts[name]})
        spec = RankSpec(*rank)
        stream = FactorStream(pool, SharedModel(shared_dir), name, spec, "float32", False, lowrank=None)
        path = write_factors(tmp_path / "ref.safetensors", stream,
                             factor_metadata(name, pool.experts[name].config, spec, "float32"))
        assert path.read_bytes() == produced
        stats = write_json_atomic(stream.stats, tmp_path / "ref.stats.json").read_bytes()
        assert stats == (tmp_path / rank[0] / "out" / f"{name}.stats.json").read_bytes()


def test_linear_merge_source_refuses_full_weight_experts(lora_dirs):
    base, ckpts = lora_dirs
    pool = ExpertSet(base, {n: ckpts / n for n in ("a", "f")})
    with pytest.raises(FactorError, match=r"low-rank source: expert 'f' is not a LoRA adapter"):
        linear_merge_source(pool, "a", {"a": 0.5, "f": 0.5})
    with pytest.raises(FactorError, match=r"low-rank source: expert 'b' is not in the expert set"):
        linear_merge_source(pool, "a", {"b": 0.5})
