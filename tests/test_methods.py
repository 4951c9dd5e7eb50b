"""The method registry: what every method declares, static merges' scaling linearity and grid shortcut, and
params.yaml's `methods` section. (Every registered method also runs end to end on tiny models in
tests/test_pipeline_steps.py; routed engines equal per-sample materialised models there.)"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tasks.params import ParamsError, load_params
from twinmerge.io import ExpertSet
from twinmerge.merge import MERGE_METHODS, build_shared_expert, merge_tensor
from twinmerge.methods import METHODS
from twinmerge.methods.base import DATA
from twinmerge.methods.static import StaticMethod

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
def test_scaling_grid_equals_direct_merges(tiny_bert, key):
    """A static method's grid shortcut (merge once, rescale) equals merging at each scaling."""
    base, experts = tiny_bert
    pool = ExpertSet(base, experts)
    for opts, backbone in METHODS[key].grid_backbones(pool, {}, {"scaling": [0.3, 0.8]}):
        direct, _ = build_shared_expert(pool, key, opts, progress=False)
        for k in direct:
            torch.testing.assert_close(backbone[k], direct[k], rtol=1e-5, atol=1e-6)


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
