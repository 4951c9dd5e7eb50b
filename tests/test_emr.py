"""twinmerge.emr: EMR-Merging on hand-worked tensors (ties, zeros, whole-model rescalers), mask packing, the
folder format, and build_emr on a tiny expert set against a direct whole-model computation."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from twinmerge.emr import (FORMAT, EMRMerge, build_emr, emr_from_task_vectors, load_emr, pack_mask, save_emr,
                           unpack_mask)
from twinmerge.errors import FactorError, MergeError
from twinmerge.io import ExpertSet

NAMES = ["t0", "t1", "t2"]
# 3 tasks on a 4-entry tensor. Sums [2, -2, 0, 0]: entry 2 is a tie (1 - 1 + 0, and task 2 has tau = 0 there),
# entry 3 is zero in every task.
HAND = torch.tensor([[2.0, -1.0, 1.0, 0.0],
                     [-1.0, -3.0, -1.0, 0.0],
                     [1.0, 2.0, 0.0, 0.0]])


def _emr(taus_by_key, variant="official", names=NAMES):
    return emr_from_task_vectors(names, taus_by_key.items(), variant)


def test_hand_worked_official():
    """gamma = [+, -, -(tie -> -1), -]; agreeing values: entry 0 {2, 1}, entry 1 {-1, -3}, entry 2 {-1 (t1)},
    entry 3 none -> tau_uni [2, -3, -1, 0]. Masks: t0 [T T F F], t1 [F T T F], t2 [T F F F] (t2's 0 at
    entry 2 is never in a mask). lambda = sum|tau_t| / sum|M_t tau_uni|: t0 4/5, t1 5/4, t2 3/2."""
    emr = _emr({"w": HAND})
    assert emr.names == NAMES and emr.keys == ["w"] and emr.variant == "official"
    assert torch.equal(emr.unified["w"], torch.tensor([2.0, -3.0, -1.0, 0.0]))
    assert emr.unified["w"].dtype == torch.float32 and not torch.signbit(emr.unified["w"][3])  # +0.0, not -0.0
    expected_masks = {"t0": [True, True, False, False], "t1": [False, True, True, False],
                      "t2": [True, False, False, False]}
    for t, m in expected_masks.items():
        assert emr.mask(t, "w").tolist() == m
    assert emr.rescalers == pytest.approx({"t0": 0.8, "t1": 1.25, "t2": 1.5}, rel=1e-7)
    torch.testing.assert_close(emr.delta("t0", "w"), torch.tensor([1.6, -2.4, 0.0, 0.0]))
    torch.testing.assert_close(emr.delta("t1", "w"), torch.tensor([0.0, -3.75, -1.25, 0.0]))
    torch.testing.assert_close(emr.delta("t2", "w"), torch.tensor([3.0, 0.0, 0.0, 0.0]))
    assert emr.delta("t0", "w").dtype == torch.float32
    # 4 float32 + 3 tasks x ceil(4 / 8) bytes + 3 float32 rescalers
    assert emr.stored_bytes() == 16 + 3 + 12


def test_hand_worked_paper_variant_tie_elects_nothing():
    """"paper": sign(0) = 0 at the tie, so tau_uni [2, -3, 0, 0] and no mask holds entry 2:
    lambda t0 4/5, t1 5/3 (only entry 1 left), t2 3/2."""
    emr = _emr({"w": HAND}, "paper")
    assert torch.equal(emr.unified["w"], torch.tensor([2.0, -3.0, 0.0, 0.0]))
    assert [emr.mask(t, "w").tolist() for t in NAMES] == [[True, True, False, False], [False, True, False, False],
                                                          [True, False, False, False]]
    assert emr.rescalers == pytest.approx({"t0": 0.8, "t1": 5 / 3, "t2": 1.5}, rel=1e-7)


def test_rescaler_is_over_the_whole_model_not_per_tensor():
    """a: tau0 [1, 1], tau1 [1, 3] -> tau_uni [1, 3], both masks full.
    b: tau0 [4, 0, 0, 0], tau1 [-1, 2, 0, 0] -> tau_uni [4, 2, 0, 0], M0 [T F F F], M1 [F T F F].
    paper: t0 (1+1+4) / (1+3+4) = 0.75, t1 (1+3+1+2) / (1+3+2) = 7/6 (per tensor t0 would be 0.5 and 1).
    official (sum of per-tensor means): t0 (1 + 1) / (2 + 1) = 2/3, t1 (2 + 0.75) / (2 + 0.5) = 1.1."""
    taus = {"a": torch.tensor([[1.0, 1.0], [1.0, 3.0]]),
            "b": torch.tensor([[4.0, 0.0, 0.0, 0.0], [-1.0, 2.0, 0.0, 0.0]])}
    for variant, want in (("paper", [0.75, 7 / 6]), ("official", [2 / 3, 1.1])):
        emr = _emr(taus, variant, ["t0", "t1"])
        assert torch.equal(emr.unified["a"], torch.tensor([1.0, 3.0]))
        assert torch.equal(emr.unified["b"], torch.tensor([4.0, 2.0, 0.0, 0.0]))
        assert emr.mask("t0", "b").tolist() == [True, False, False, False]
        assert emr.mask("t1", "b").tolist() == [False, True, False, False]
        assert [emr.rescalers["t0"], emr.rescalers["t1"]] == pytest.approx(want, rel=1e-7)
        torch.testing.assert_close(emr.delta("t1", "a"), want[1] * torch.tensor([1.0, 3.0]))
    one = _emr({"a": taus["a"]}, "paper", ["t0", "t1"])
    assert one.rescalers["t0"] == pytest.approx(0.5)


def _reference_emr(taus_by_key):
    """A re-derivation of the official / FusionBench algorithm (float32 accumulation, flag = +1 if the sum is
    > 0 else -1, running max over the agreeing |tau_t|, lambda = sum of per-tensor means ratio)."""
    n = next(iter(taus_by_key.values())).shape[0]
    uni, masks = {}, {}
    num, den = torch.zeros(n), torch.zeros(n)
    for key, taus in taus_by_key.items():
        flag = (taus.sum(0) > 0).float() * 2 - 1
        best = torch.zeros_like(taus[0])
        masks[key] = []
        for t in range(n):
            m = taus[t] * flag > 0
            masks[key].append(m)
            best = torch.maximum(best, (taus[t] * m).abs())
            num[t] += taus[t].abs().mean()
        uni[key] = best * flag
    for t in range(n):
        for key in uni:
            den[t] += (uni[key] * masks[key][t]).abs().mean()
    return uni, masks, num / den


def test_official_variant_matches_reference_rederivation():
    """Integer-valued taus (exact ties and zeros), a float tensor, and an exact cancellation [1, -1, 0, 0]."""
    g = torch.Generator().manual_seed(0)
    taus = {"a": torch.randint(-3, 4, (4, 5, 7), generator=g).float(),
            "b": torch.randint(-2, 3, (4, 13), generator=g).float(),
            "c": torch.randn(4, 4, 3, 2, generator=g),
            "d": torch.tensor([[1.0], [-1.0], [0.0], [0.0]])}
    names = ["t0", "t1", "t2", "t3"]
    emr = _emr(taus, "official", names)
    uni, masks, resc = _reference_emr(taus)
    for key in taus:
        assert torch.equal(emr.unified[key], uni[key])
        for i, t in enumerate(names):
            assert torch.equal(emr.mask(t, key), masks[key][i])
            torch.testing.assert_close(emr.delta(t, key), uni[key] * masks[key][i] * resc[i], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.tensor([emr.rescalers[t] for t in names]), resc, rtol=1e-6, atol=0)
    assert emr.unified["d"].tolist() == [-1.0] and emr.mask("t1", "d").tolist() == [True]


def test_single_task_and_zero_denominator():
    emr = _emr({"w": torch.tensor([[0.5, -2.0, 0.0]])}, "paper", ["only"])
    assert torch.equal(emr.unified["w"], torch.tensor([0.5, -2.0, 0.0]))
    assert emr.rescalers == {"only": 1.0}
    # task 1 agrees nowhere and task 2 is all zero: lambda 0 (not NaN), delta 0
    emr = _emr({"w": torch.tensor([[3.0, 2.0], [-1.0, -1.0], [0.0, 0.0]])})
    assert emr.rescalers["t1"] == 0.0 and emr.rescalers["t2"] == 0.0 and emr.rescalers["t0"] == 1.0
    assert torch.equal(emr.delta("t1", "w"), torch.zeros(2))
    with pytest.raises(MergeError, match="variant"):
        _emr({"w": HAND}, "ties")


@pytest.mark.parametrize("shape", [(1,), (7,), (9,), (17,), (64,), (3, 5), (13, 3), (2, 2, 3), (0,)])
def test_pack_unpack_round_trip(shape):
    g = torch.Generator().manual_seed(math.prod(shape) + len(shape))
    mask = torch.rand(shape, generator=g) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == ((mask.numel() + 7) // 8,)
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy().reshape(-1), bitorder="little"))
    assert torch.equal(unpack_mask(packed, shape), mask)


def test_pack_bit_order_and_bad_size():
    assert pack_mask(torch.tensor([True, False, False, False, False, False, False, False, False, True])).tolist() \
        == [1, 2]
    with pytest.raises(ValueError, match="does not fit"):
        unpack_mask(torch.zeros(2, dtype=torch.uint8), (17,))


def _random_emr():
    g = torch.Generator().manual_seed(3)
    taus = {"enc.w": torch.randn(3, 6, 5, generator=g), "enc.b": torch.randn(3, 11, generator=g),
            "ln": torch.randint(-1, 2, (3, 3), generator=g).float()}
    return _emr(taus)


def test_save_load_round_trip_and_byte_identical(tmp_path):
    emr = _random_emr()
    save_emr(emr, tmp_path / "a")
    save_emr(emr, tmp_path / "b")
    for f in ("unified.safetensors", "masks.safetensors", "emr.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    info = json.loads((tmp_path / "a" / "emr.json").read_text())
    assert info["format"] == FORMAT == "twinmerge-emr/1" and info["names"] == NAMES
    assert info["keys"] == ["enc.w", "enc.b", "ln"] and info["stored_bytes"] == emr.stored_bytes()
    assert info["rescalers"] == emr.rescalers and info["variant"] == "official"
    masks = load_file(tmp_path / "a" / "masks.safetensors")
    assert set(masks) == {f"{t}/{k}" for t in NAMES for k in emr.keys}
    assert masks["t1/enc.w"].dtype == torch.uint8 and masks["t1/enc.w"].shape == (4,)
    back = load_emr(tmp_path / "a")
    assert back.names == emr.names and back.keys == emr.keys and back.rescalers == emr.rescalers
    for k in emr.keys:
        assert torch.equal(back.unified[k], emr.unified[k])
        for t in NAMES:
            assert torch.equal(back.masks[t][k], emr.masks[t][k])
            assert torch.equal(back.delta(t, k), emr.delta(t, k))
    save_emr(back, tmp_path / "a")  # overwrite in place: same bytes
    assert (tmp_path / "a" / "masks.safetensors").read_bytes() == (tmp_path / "b" / "masks.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporaries left


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / "masks.safetensors").unlink(), r"masks\.safetensors: EMR file not found"),
    (lambda d: (d / "emr.json").unlink(), r"emr\.json: EMR file not found"),
    (lambda d: (d / "unified.safetensors").write_bytes((d / "unified.safetensors").read_bytes()[:40]),
     r"unified\.safetensors: cannot read safetensors file"),
    (lambda d: (d / "emr.json").write_text("{not json"), r"emr\.json: invalid JSON"),
    (lambda d: (d / "emr.json").write_text(json.dumps({"format": "other/1"})), r"emr\.json: format 'other/1'"),
    (lambda d: (d / "emr.json").write_text((d / "emr.json").read_text().replace('"t2"', '"t9"', 1)),
     r"emr\.json: 'rescalers' must map every task"),
    (lambda d: (d / "emr.json").write_text((d / "emr.json").read_text().replace('"ln"', '"ln2"')),
     r"unified\.safetensors: tensors do not match"),
])
def test_load_errors_name_the_file(tmp_path, damage, match):
    save_emr(_random_emr(), tmp_path / "e")
    damage(tmp_path / "e")
    with pytest.raises(FactorError, match=match) as info:
        load_emr(tmp_path / "e")
    assert "\n" not in str(info.value)


def test_load_rejects_wrong_mask_size(tmp_path):
    emr = _random_emr()
    emr.masks["t0"]["ln"] = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(FactorError, match=r"mask t0/ln is torch.uint8 \[3\], expected uint8 \[1\]"):
        save_emr(emr, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _direct(es: ExpertSet, keys, variant):
    """Whole-model EMR computed directly from the safetensors files, all tensors at once (flattened and
    concatenated), independently of the streaming code."""
    base = load_file(es.base.folder / "model.safetensors")
    thetas = [load_file(es.experts[n].folder / "model.safetensors") for n in es.names]
    taus = {k: torch.stack([th[k].float() - base[es.base_key(k)].float() for th in thetas]) for k in keys}
    flat = torch.cat([taus[k].reshape(len(es.names), -1) for k in keys], dim=1)
    total = flat.sum(0)
    gamma = torch.sign(total) if variant == "paper" else torch.where(total > 0, 1.0, -1.0)
    agree = flat * gamma > 0
    uni = torch.where(agree.any(0), gamma * (flat.abs() * agree).max(0).values, 0.0)
    if variant == "paper":
        lam = flat.abs().double().sum(1) / (uni.abs() * agree).double().sum(1)
    else:  # sum over tensors of per-tensor means
        w = torch.cat([torch.full((taus[k][0].numel(),), 1.0 / taus[k][0].numel(), dtype=torch.float64)
                       for k in keys])
        lam = (flat.abs().double() * w).sum(1) / ((uni.abs() * agree).double() * w).sum(1)
    out, start = {}, 0
    for k in keys:
        n = taus[k][0].numel()
        for t, name in enumerate(es.names):
            out[name, k] = (lam[t].float() * agree[t, start:start + n] * uni[start:start + n]).reshape(
                taus[k].shape[1:])
        start += n
    return out, lam


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_build_emr_on_tiny_experts_matches_direct_whole_model(tiny_bert, variant):
    es = ExpertSet(*tiny_bert)
    emr = build_emr(es, progress=False, variant=variant)
    keys = es.mergeable_keys()
    assert emr.keys == keys and emr.names == es.names
    assert not set(es.head_keys()) & set(emr.unified)  # heads are never merged
    expected, lam = _direct(es, keys, variant)
    assert [emr.rescalers[n] for n in es.names] == pytest.approx(lam.tolist(), rel=1e-6)
    for (name, k), want in expected.items():
        torch.testing.assert_close(emr.delta(name, k), want, rtol=1e-6, atol=1e-8)
    numels = [emr.unified[k].numel() for k in keys]
    assert emr.stored_bytes() == 4 * sum(numels) + 3 * sum((n + 7) // 8 for n in numels) + 12


def test_build_emr_key_subset_and_errors(tiny_bert):
    es = ExpertSet(*tiny_bert)
    keys = [k for k in es.mergeable_keys() if ".encoder.layer.0." in k]
    emr = build_emr(es, keys, progress=False, variant="paper")
    expected, lam = _direct(es, keys, "paper")  # rescalers over the selected tensors only
    assert emr.keys == keys
    assert [emr.rescalers[n] for n in es.names] == pytest.approx(lam.tolist(), rel=1e-6)
    with pytest.raises(MergeError, match="not a mergeable tensor"):
        build_emr(es, [es.head_keys()[0]], progress=False)
    with pytest.raises(MergeError, match="no tensors"):
        build_emr(es, [], progress=False)
    assert isinstance(emr, EMRMerge)
