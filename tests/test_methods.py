"""The method registry: what every method declares, static merges' scaling linearity and grid shortcut, and
params.yaml's `methods` section. (Every registered method also runs end to end on tiny models in
tests/test_pipeline_steps.py; routed engines equal per-sample materialised models there.)"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from transformers import AutoTokenizer

from tasks.params import ParamsError, load_params
from tiny_models import add_word_tokenizer, make_set
from twinmerge.io import TEMP_MARK, ExpertSet
from twinmerge.merge import MERGE_METHODS, build_shared_expert, merge_tensor, resolve_options
from twinmerge.methods import METHODS, Context
from twinmerge.methods.base import DATA, expert_heads
from twinmerge.methods.static import StaticMethod, grid_points
from twinmerge.modelpool import assemble_classifier, predict_logits
from twinmerge.shared import save_shared
from twinmerge.taskpool import TaskPool, summarize

STATIC = [k for k, m in METHODS.items() if m.kind == "static"]
ROUTED = [k for k, m in METHODS.items() if m.kind == "routed"]


@pytest.mark.parametrize("key", list(METHODS))
def test_every_method_declares_itself(key):
    method = METHODS[key]
    assert method.kind in ("static", "routed") and method.label and method.reference
    assert isinstance(method.defaults, dict)
    assert method.data({}) in DATA
    if method.kind == "routed":
        assert method.modes and all(m.label for m in method.modes.values())
        assert any(not m.uses_task_id for m in method.modes.values())  # a row without the task id
        assert all(callable(getattr(method, f)) for f in ("build", "model", "stored_bytes"))


def test_static_methods_are_the_merge_registry_and_the_learning_methods():
    merges = [k for k in STATIC if isinstance(METHODS[k], StaticMethod)]
    assert set(merges) == set(MERGE_METHODS)
    assert all(METHODS[k].defaults == MERGE_METHODS[k].defaults for k in merges)
    assert set(STATIC) - set(merges) == {"adamerging", "concrete", "self_positioning"}


@pytest.mark.parametrize("key", [k for k in MERGE_METHODS if MERGE_METHODS[k].linear_in_scaling])
@pytest.mark.parametrize("shape", [(6, 5), (7,)])
def test_linear_in_scaling_holds(key, shape):
    """A method declared linear in `scaling`: merge(scaling=s) == s * merge(scaling=1), matrices and vectors."""
    taus = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    unit = merge_tensor(key, {"scaling": 1.0}, taus, "w")
    for s in (0.3, 1.7):
        torch.testing.assert_close(merge_tensor(key, {"scaling": s}, taus, "w"), s * unit, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key", [k for k in MERGE_METHODS if MERGE_METHODS[k].linear_in_scaling])
def test_scaling_grid_equals_direct_merges(tiny_bert, tmp_path, key):
    """A static method's grid shortcut (merge once, rescale) equals merging at each scaling."""
    base, experts = tiny_bert
    pool = ExpertSet(base, experts)
    for opts, backbone, folder in METHODS[key].grid_backbones(pool, {}, {"scaling": [0.3, 0.8]}, tmp_path):
        assert folder is None  # rescaled from the unit merge, not merged again
        direct, _ = build_shared_expert(pool, key, opts, progress=False)
        assert set(backbone) == set(direct) and "nope" not in backbone and backbone.get("nope") is None
        for k in direct:
            torch.testing.assert_close(backbone[k], direct[k], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """(pool, tokenizer, {task: 20 validation texts}): a tiny bare-BERT pool of 3 experts with a word tokenizer."""
    base, experts = make_set(tmp_path_factory.mktemp("static"), "bert", bare_backbone=True)
    words = add_word_tokenizer(base)
    g = torch.Generator().manual_seed(3)
    pool = ExpertSet(base, experts)
    texts = {name: [" ".join(words[i] for i in torch.randint(len(words), (5,), generator=g).tolist())
                    for _ in range(20)] for name in pool.names}
    return pool, AutoTokenizer.from_pretrained(base), texts


def _context(scored, key, point):
    """A Context whose validation labels are the predictions of `key` merged at grid `point` (so that point
    scores 100 and the grid's scores differ)."""
    pool, tokenizer, texts = scored
    backbone, _ = build_shared_expert(pool, key, point, progress=False)
    split = {}
    for name in pool.names:
        model = assemble_classifier(pool.experts[name].config, {**backbone, **expert_heads(pool, name)})
        split[name] = (texts[name], predict_logits(model, tokenizer, texts[name], 4, 16).argmax(-1).tolist())
    val = TaskPool(pool, split, {n: "accuracy" for n in pool.names}, tokenizer, 4, 16)
    return Context(pool, val, {n: 100.0 for n in pool.names}, progress=False)


def _in_memory_build(ctx, key, grid, out_dir):
    """The static build as it was before streaming: every grid point merged in memory (a scaling grid of a
    method linear in it: merged once at scaling 1 and rescaled), the best one kept in memory and saved whole."""
    tried, best = [], None
    rescale = set(grid) == {"scaling"} and MERGE_METHODS[key].linear_in_scaling
    unit = build_shared_expert(ctx.pool, key, {"scaling": 1.0}, progress=False)[0] if rescale else None
    for point in grid_points(grid):
        opts = {**point}
        if rescale:
            base = {k: ctx.pool.base_tensor(k) for k in unit}
            backbone = {k: base[k] + point["scaling"] * (unit[k] - base[k]) for k in unit}
        else:
            backbone, _ = build_shared_expert(ctx.pool, key, opts, progress=False)
        mean = None
        if grid:
            mean = summarize(ctx.validation.score_backbone(backbone), ctx.validation_reference)["mean_normalized"]
            tried.append({"options": opts, "validation_mean_normalized": mean})
        if best is None or mean > best[1]:
            best = (opts, mean, backbone)
    choice = {"options": resolve_options(key, best[0]), "validation_mean_normalized": best[1], "grid": tried}
    save_shared(best[2], ctx.pool, out_dir, {"method": key, "choice": choice})
    return {"choice": choice}


@pytest.mark.parametrize("target", ["first", "last"])  # the winner first (worse points follow it) or last
@pytest.mark.parametrize("key,grid", [("task_arithmetic", {"scaling": [0.3, 0.5, 1.0, 2.0]}),  # rescaled unit
                                      ("ties", {"density": [0.1, 0.5, 0.9], "scaling": [1.0, 2.0]}),  # merged each
                                      ("dare", {"drop_rate": [0.3, 0.9]}),
                                      ("weight_average", {})])
def test_static_build_streams_the_in_memory_result(scored, tmp_path, key, grid, target):
    """The streamed build (lazy grid points, one backbone materialised at a time, the chosen one streamed to
    disk) chooses the same point and writes the same bytes as merging every point in memory; it leaves no
    scratch folder behind."""
    points = grid_points(grid)
    ctx = _context(scored, key, points[0] if target == "first" else points[-1])
    (tmp_path / "ref").mkdir()
    (tmp_path / "new").mkdir()
    expected = _in_memory_build(ctx, key, grid, tmp_path / "ref" / key)
    got = METHODS[key].build(ctx, tmp_path / "new" / key, grid)
    assert got == expected
    if grid:
        means = [t["validation_mean_normalized"] for t in got["choice"]["grid"]]
        assert got["choice"]["validation_mean_normalized"] == 100.0 and min(means) < 100.0, means
    if target == "first":
        assert got["choice"]["options"] == resolve_options(key, points[0])
    files = sorted(p.name for p in (tmp_path / "ref" / key).iterdir())
    assert sorted(p.name for p in (tmp_path / "new" / key).iterdir()) == files
    for name in files:
        assert (tmp_path / "new" / key / name).read_bytes() == (tmp_path / "ref" / key / name).read_bytes(), name
    assert [p.name for p in (tmp_path / "new").iterdir()] == [key]


def test_static_build_failure_leaves_nothing(scored, tmp_path, monkeypatch):
    """A grid point that fails to score deletes the scratch merges and writes no backbone; a scratch folder
    that a killed build left (its process gone) is deleted by the next build."""
    ctx = _context(scored, "ties", {})
    pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                         text=True).stdout.strip()  # a process that has ended
    for killed in (f".ties{TEMP_MARK}{pid}-grid-x",  # a build called on its final folder
                   f"..ties{TEMP_MARK}{pid}-ab12{TEMP_MARK}{pid}-grid-x"):  # on the method step's temporary
        (tmp_path / killed / "point0").mkdir(parents=True)
    calls = []

    def score(backbone, desc="backbone", only=None):
        calls.append(desc)
        if len(calls) == 2:
            raise RuntimeError("scoring failed")
        return {n: 50.0 for n in ctx.validation.names}

    monkeypatch.setattr(ctx.validation, "score_backbone", score)
    with pytest.raises(RuntimeError, match="scoring failed"):
        METHODS["ties"].build(ctx, tmp_path / "ties", {"density": [0.2, 0.5, 0.8]})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("methods,problem", [
    ({"static": {"x": {"method": "nope"}}}, "methods: static.x: unknown method 'nope'"),
    ({"static": {"twin": {}}}, "methods: static.twin: 'twin' is a routed method; list it under methods.routed"),
    ({"routed": {"ties": {}}}, "methods: routed.ties: 'ties' is a static method; list it under methods.static"),
    ({"static": {"ties": {"options": {"densty": 0.3}}}}, "unknown option(s) densty"),
    ({"routed": {"layerwise": {"options": {"splitt": 3}}}}, "method 'layerwise': unknown option(s) splitt"),
    ({"static": {"tsv_m": {"grid": {"alpha": [1.0]}}}}, "methods: static.tsv_m: grid over unknown option(s) alpha"),
    ({"routed": {"layerwise": {"grid": {"split": []}}}}, "a grid option has no values"),
])
def test_methods_section_errors_are_one_line(tmp_path, methods, problem):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"base": {"path": "b"}, "methods": methods}))
    with pytest.raises(ParamsError) as err:
        load_params(tmp_path / "params.yaml")
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_baselines_moved(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"base": {"path": "b"},
                                                          "evaluate": {"baselines": [{"method": "ties"}]}}))
    with pytest.raises(ParamsError, match="baselines moved to methods.static"):
        load_params(tmp_path / "params.yaml")


def test_entry_method_defaults_to_its_key(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"base": {"path": "b"}, "methods": {
        "static": {"ties": {}, "ties_per_tensor": {"method": "ties", "options": {"trim": "per_tensor"}}}}}))
    specs = load_params(tmp_path / "params.yaml").methods.static
    assert specs["ties"].method == "ties" and specs["ties_per_tensor"].method == "ties"


def test_registry_false_skips_only_the_method_registry(tmp_path):
    """load_params(registry=False) (modularize, compress): `methods` is not checked against the registry, which
    is never imported; every other field still is."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"base": {"path": "b"}, "methods": {"static": {"x": {"method": "nope"}}},
                                    "compress": {"gram_svd_mib": None}}))
    assert load_params(path, registry=False).compress.gram_svd_mib is None
    with pytest.raises(ParamsError, match="unknown method 'nope'"):
        load_params(path)
    path.write_text(yaml.safe_dump({"base": {"path": "b"}, "compress": {"gram_svd_mib": -1}}))
    with pytest.raises(ParamsError, match="compress.gram_svd_mib"):
        load_params(path, registry=False)
    root = Path(__file__).resolve().parents[1]
    code = ("import sys; from tasks.params import load_params; load_params('params.yaml', registry=False); "
            "print(sorted(m for m in ('twinmerge.methods', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
