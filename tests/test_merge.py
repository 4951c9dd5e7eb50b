"""twinmerge.merge: each method equals its formula; options, patterns, heads, dtypes, loading the result."""
import shutil
import zlib

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from twinmerge.errors import CheckpointError, MergeError
from twinmerge.io import ExpertSet, save_hf_model
from twinmerge.merge import (MERGE_METHODS, build_shared_expert, dare, dare_drop, magnitude_thresholds, merge_tensor,
                             resolve_options, ties)

ARCHS = ["tiny_bert", "tiny_roberta"]


@pytest.fixture(params=ARCHS)
def expert_set(request):
    base, experts = request.getfixturevalue(request.param)
    return ExpertSet(base, experts)


def _by_hand(es: ExpertSet, key: str):
    """(theta_0, [theta_t]) for one canonical key, read independently of the merge code."""
    base = load_file(es.base.folder / "model.safetensors")[es.base_key(key)]
    return base, [load_file(es.experts[n].folder / "model.safetensors")[key] for n in es.names]


def test_options_and_defaults_come_from_the_signature():
    assert {"weight_average", "task_arithmetic", "ties", "dare", "tsv_m", "iso_c", "iso_cts"} <= set(MERGE_METHODS)
    assert MERGE_METHODS["ties"].defaults == {"density": 0.2, "scaling": 1.0, "trim": "global"}
    assert MERGE_METHODS["dare"].defaults == {"drop_rate": 0.9, "base_method": "task_arithmetic", "seed": 0}
    assert MERGE_METHODS["iso_cts"].defaults == {"scaling": 1.0, "common_fraction": 0.8}


def test_weight_average_is_mean_of_weights(expert_set):
    state, report = build_shared_expert(expert_set, "weight_average", progress=False)
    assert set(state) == set(expert_set.mergeable_keys()) and report["kept"] == []
    for key in state:
        _, thetas = _by_hand(expert_set, key)
        torch.testing.assert_close(state[key], torch.stack(thetas).mean(0), rtol=0, atol=1e-6)


def test_task_arithmetic_formula(expert_set):
    state, report = build_shared_expert(expert_set, "task_arithmetic", {"scaling": 0.29}, progress=False)
    assert report["options"] == {"scaling": 0.29}
    for key in state:
        base, thetas = _by_hand(expert_set, key)
        torch.testing.assert_close(state[key], base + 0.29 * sum(t - base for t in thetas), rtol=0, atol=1e-6)


def test_ties_hand_worked_example():
    taus = torch.tensor([[1.0, -2.0, 0.5, 3.0, -0.1],
                         [-1.5, 0.2, 0.4, 1.0, -2.5],
                         [2.0, 1.0, -0.3, -0.5, 0.2]])
    # density 0.6 of 5 -> keep 3 per row: [1,-2,0,3,0], [-1.5,0,0,1,-2.5], [2,1,0,-0.5,0]
    # elected signs (sum): +, -, 0, +, -  -> disjoint means 1.5, -2, 0, 2, -2.5
    expected = torch.tensor([1.5, -2.0, 0.0, 2.0, -2.5])
    torch.testing.assert_close(ties(taus, density=0.6, scaling=1.0), expected)
    torch.testing.assert_close(ties(taus.reshape(3, 5, 1), density=0.6, scaling=0.5), 0.5 * expected.reshape(5, 1))


def test_ties_ties_at_threshold_and_cancellation():
    taus = torch.tensor([[1.0, 1.0, 0.1, 0.0], [-1.0, 0.5, 0.2, 0.0]])
    # row 0 keeps both 1.0s (tied with the kth = 2nd largest), row 1 keeps -1, 0.5
    # entry 0: 1 + -1 = 0 -> no elected sign -> 0; entry 1: both positive -> 0.75; rest trimmed -> 0
    torch.testing.assert_close(ties(taus, density=0.5), torch.tensor([0.0, 0.75, 0.0, 0.0]))


def test_ties_density_one_is_sign_consensus_mean():
    taus = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    gamma = torch.sign(taus.sum(0))
    agree = torch.sign(taus) == gamma
    expected = (taus * agree).sum(0) / agree.sum(0).clamp(min=1)
    torch.testing.assert_close(ties(taus, density=1.0), expected)


def test_ties_global_trim_hand_worked_example():
    """Two tensors a [2 entries], b [3 entries], two tasks, density 0.4 -> k = ceil(0.4 * 5) = 2 per task
    over the whole model. Task 0 |tau| = a: 4, 1 | b: 3, 0.5, 2 -> threshold 3 keeps a0 and b0.
    Task 1 |tau| = a: 0.2, 0.1 | b: 5, 1, 6 -> threshold 5 keeps b0 and b2: nothing of a.
    a: task 0 only -> [4, 0]; b: entry 0: 3 and -5 -> sign -, mean -5; entry 2: task 1 only -> 6.
    Per-tensor trim (k = 1 of a, k = 2 of b per task) gives a different merge."""
    a = torch.tensor([[4.0, -1.0], [0.2, 0.1]])
    b = torch.tensor([[3.0, 0.5, -2.0], [-5.0, 1.0, 6.0]])
    whole = torch.cat([a, b], dim=1)
    thresholds = magnitude_thresholds(whole, 0.4)
    torch.testing.assert_close(thresholds, torch.tensor([3.0, 5.0]))
    torch.testing.assert_close(ties(a, density=0.4, thresholds=thresholds), torch.tensor([4.0, 0.0]))
    torch.testing.assert_close(ties(b, density=0.4, thresholds=thresholds), torch.tensor([-5.0, 0.0, 6.0]))
    torch.testing.assert_close(ties(whole, density=0.4), torch.tensor([4.0, 0.0, -5.0, 0.0, 6.0]))
    # per tensor: a keeps 4 (task 0) and 0.2 (task 1), both + -> mean 2.1; b keeps {3, -2} and {-5, 6}
    torch.testing.assert_close(ties(a, density=0.4, trim="per_tensor"), torch.tensor([2.1, 0.0]))
    torch.testing.assert_close(ties(b, density=0.4, trim="per_tensor"), torch.tensor([-5.0, 0.0, 6.0]))


@pytest.mark.parametrize("method,options", [("ties", {"density": 0.3}),
                                            ("dare", {"drop_rate": 0.5, "base_method": "ties", "density": 0.3})])
def test_ties_global_trim_on_checkpoints_equals_flattened_model(tiny_bert, method, options):
    """The streamed global trim equals TIES on the whole flattened task vectors (the official code's way)."""
    es = ExpertSet(*tiny_bert)
    state, report = build_shared_expert(es, method, options, progress=False)
    assert report["options"]["trim"] == "global"
    keys = es.mergeable_keys()
    taus = []
    for t, name in enumerate(es.names):
        parts = []
        for key in keys:
            base = es.base_tensor(key).float()
            tau = es.expert_tensor(name, key).float() - base
            if method == "dare":  # replay the per-tensor draw of merge_tensor
                stacked = torch.stack([es.expert_tensor(n, key).float() - base for n in es.names])
                gen = torch.Generator().manual_seed((0 + zlib.crc32(key.encode())) % 2**63)
                tau = dare_drop(stacked, 0.5, gen)[t]
            parts.append(tau.flatten())
        taus.append(torch.cat(parts))
    flat = ties(torch.stack(taus), density=0.3)
    start = 0
    for key in keys:
        n = es.base_tensor(key).numel()
        expected = es.base_tensor(key).float() + flat[start:start + n].reshape(es.base_tensor(key).shape)
        torch.testing.assert_close(state[key].float(), expected, rtol=0, atol=1e-6)
        start += n
    per_tensor, _ = build_shared_expert(es, method, {**options, "trim": "per_tensor"}, progress=False)
    assert any(not torch.equal(per_tensor[k], state[k]) for k in keys)


def test_dare_rescaling_keeps_expectation():
    taus = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    opts = {"drop_rate": 0.5, "base_method": "task_arithmetic", "scaling": 1.0}
    mean = torch.stack([merge_tensor("dare", {**opts, "seed": s}, taus, "w") for s in range(2000)]).mean(0)
    torch.testing.assert_close(mean, taus.sum(0), atol=0.15, rtol=0)
    one = dare(taus[:1], drop_rate=0.75, base_method="weight_average", generator=torch.Generator().manual_seed(0))
    kept = one != 0
    torch.testing.assert_close(one[kept], taus[0][kept] / 0.25)
    assert 0.1 < kept.float().mean() < 0.45


def test_dare_is_deterministic_per_tensor_name():
    taus = torch.randn(3, 100, generator=torch.Generator().manual_seed(2))
    opts = {"drop_rate": 0.9, "seed": 7}
    a = merge_tensor("dare", opts, taus, "layer.0.weight")
    assert torch.equal(a, merge_tensor("dare", opts, taus, "layer.0.weight"))
    assert not torch.equal(a, merge_tensor("dare", opts, taus, "layer.1.weight"))
    assert not torch.equal(a, merge_tensor("dare", {**opts, "seed": 8}, taus, "layer.0.weight"))
    torch.testing.assert_close(merge_tensor("dare", {"drop_rate": 0.0, "base_method": "ties", "density": 0.5},
                                            taus, "x"), ties(taus, density=0.5))


def test_dare_on_checkpoints_reproducible(tiny_bert):
    es = ExpertSet(*tiny_bert)
    opts = {"drop_rate": 0.5, "base_method": "ties", "density": 0.5, "seed": 3}
    a, report = build_shared_expert(es, "dare", opts, progress=False)
    b, _ = build_shared_expert(es, "dare", opts, progress=False)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert report["options"] == {"drop_rate": 0.5, "base_method": "ties", "seed": 3, "density": 0.5, "scaling": 1.0,
                                 "trim": "global"}


@pytest.mark.parametrize("method, options, message", [
    ("nope", {}, "unknown merge method 'nope'; known: weight_average, task_arithmetic, ties, dare"),
    ("task_arithmetic", {"lambda": 0.3}, "'task_arithmetic': unknown option\\(s\\) lambda; known: scaling"),
    ("weight_average", {"scaling": 1}, "'weight_average': unknown option\\(s\\) scaling; known: none"),
    ("ties", {"density": 0}, "option density=0 must be in \\(0, 1\\]"),
    ("ties", {"density": 1.5}, "option density=1.5 must be in \\(0, 1\\]"),
    ("task_arithmetic", {"scaling": "big"}, "option scaling='big' must be a finite number"),
    ("dare", {"drop_rate": 1.0}, "option drop_rate=1.0 must be in \\[0, 1\\)"),
    ("dare", {"base_method": "dare"}, "option base_method='dare' must be one of"),
    ("dare", {"seed": -1}, "option seed=-1 must be a non-negative integer"),
    ("dare", {"base_method": "ties", "density": 2}, "dare' \\(base 'ties'\\): .*density=2"),
    ("dare", {"scaling": 1, "density": 0.5}, "dare' \\(base 'task_arithmetic'\\): .*unknown option\\(s\\) density"),
])
def test_invalid_options(method, options, message):
    with pytest.raises(MergeError, match=message):
        resolve_options(method, options)


def test_include_exclude_patterns(tiny_roberta):
    es = ExpertSet(*tiny_roberta)
    state, report = build_shared_expert(es, "task_arithmetic", {"scaling": 1.0},
                                        include=["roberta.encoder.layer.0.*"], exclude=["*LayerNorm*"],
                                        progress=False)
    merged = set(report["merged"])
    assert merged and all(k.startswith("roberta.encoder.layer.0.") and "LayerNorm" not in k for k in merged)
    assert set(report["kept"]) == set(es.mergeable_keys()) - merged
    for key in es.mergeable_keys():
        base, thetas = _by_hand(es, key)
        expected = base + sum(t - base for t in thetas) if key in merged else base
        torch.testing.assert_close(state[key], expected, rtol=0, atol=1e-6)
    with pytest.raises(MergeError, match="pattern 'encoder.*' matches no mergeable tensor"):
        build_shared_expert(es, "weight_average", include=["encoder.*"], progress=False)


def test_heads_stay_with_experts(expert_set):
    state, report = build_shared_expert(expert_set, "ties", progress=False)
    assert report["heads"] == expert_set.head_keys() and report["heads"]
    assert not set(state) & set(expert_set.head_keys())


def test_half_precision_base_dtype_is_kept(tmp_path, tiny_bert):
    base, experts = tiny_bert
    folders = {}
    for name, src in [("base", base), *experts.items()]:
        dst = tmp_path / name
        dst.mkdir()
        (dst / "config.json").write_text((src / "config.json").read_text())
        save_file({k: v.half() for k, v in load_file(src / "model.safetensors").items()},
                  dst / "model.safetensors", metadata={"format": "pt"})
        folders[name] = dst
    es = ExpertSet(folders.pop("base"), folders)
    state, _ = build_shared_expert(es, "task_arithmetic", progress=False)
    key = "bert.encoder.layer.0.attention.self.key.weight"
    assert state[key].dtype == torch.float16
    base16, thetas = _by_hand(es, key)
    expected = (base16.float() + 0.3 * sum(t.float() - base16.float() for t in thetas)).half()
    assert torch.equal(state[key], expected)


def test_shared_expert_loads_as_hf_model(tmp_path, tiny_bert):
    es = ExpertSet(*tiny_bert)
    state, _ = build_shared_expert(es, "task_arithmetic", progress=False)
    save_hf_model(state, es.experts["task0"].config, tmp_path / "shared")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "shared")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    out = model(input_ids=torch.randint(0, 100, (2, 7))).logits
    assert out.shape == (2, 2) and torch.isfinite(out).all()


def test_nan_stops_merge_before_any_output(tmp_path, tiny_bert):
    base, experts = tiny_bert
    sick = tmp_path / "sick"
    shutil.copytree(experts["task2"], sick)
    sd = load_file(sick / "model.safetensors")
    sd["bert.encoder.layer.1.output.dense.weight"][0, 0] = float("inf")
    save_file(sd, sick / "model.safetensors", metadata={"format": "pt"})
    es = ExpertSet(base, {**experts, "task2": sick})
    with pytest.raises(CheckpointError, match=r"expert 'task2' \(.*sick\): tensor bert.encoder.layer.1.output.dense.weight"):
        build_shared_expert(es, "weight_average", progress=False)
