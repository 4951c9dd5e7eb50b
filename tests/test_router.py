"""Router features, MLP training with early stopping on a validation holdout, routing, save/load."""
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer

from twinmerge.errors import CheckpointError, TwinMergeError
from twinmerge.router import (RouterConfig, extract_features, features_from_batch, load_router, route,
                              save_router, stratified_split, train_router)

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "dog", "sat", "on", "mat", "a", "big", "red"]


def _clusters(n=400, d=16, k=4, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 2 * torch.randn(k, d, generator=g)
    labels = torch.arange(n) % k
    return centers[labels] + noise * torch.randn(n, d, generator=g), labels


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=32)).eval()


def test_learns_separable_problem():
    x, y = _clusters()
    router, report = train_router(x, y, RouterConfig(in_dim=16, n_experts=4, epochs=25, patience=5), progress=False)
    assert report.holdout_accuracy >= 0.95
    assert report.n_holdout == 80 and report.n_fit == 320
    assert sum(map(sum, report.confusion)) == 80 and all(a >= 0.9 for a in report.per_class_accuracy)
    assert (route(router, x).argmax(1) == y).float().mean() >= 0.95


def test_early_stopping_restores_best_state():
    x, _ = _clusters(n=200)
    y = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(1))  # unlearnable: holdout acc noisy
    config = RouterConfig(in_dim=16, n_experts=4, epochs=200, patience=3, lr=1e-2)
    router, report = train_router(x, y, config, progress=False)
    assert report.epochs_run < config.epochs
    accs = [h["holdout_accuracy"] for h in report.history]
    best = max(range(len(accs)), key=lambda i: (accs[i], -report.history[i]["holdout_loss"]))
    assert report.best_epoch == best + 1 and report.epochs_run - report.best_epoch == config.patience
    _, hold = stratified_split(y, config.holdout_fraction, config.seed)
    acc = (route(router, x[hold]).argmax(1) == y[hold]).float().mean().item()
    assert acc == pytest.approx(accs[best]) == pytest.approx(report.holdout_accuracy)


def test_refit_trains_on_all_validation_data_for_the_best_epoch_count():
    x, y = _clusters(n=200, noise=1.5)
    config = RouterConfig(in_dim=16, n_experts=4, epochs=40, patience=5)
    plain, report = train_router(x, y, config, progress=False)
    config.refit = True
    refit, refit_report = train_router(x, y, config, progress=False)
    assert refit_report == report  # the report describes the honest holdout run either way
    assert torch.allclose(refit.mean, x.mean(0)) and not torch.allclose(plain.mean, x.mean(0))
    assert not torch.equal(refit.net[0].weight, plain.net[0].weight)
    assert (route(refit, x).argmax(1) == y).float().mean() >= 0.8


def test_stratified_split_is_seeded_and_disjoint():
    y = torch.tensor([0] * 10 + [1] * 5 + [2])
    fit, hold = stratified_split(y, 0.2, 3)
    assert set(fit.tolist()).isdisjoint(hold.tolist()) and len(fit) + len(hold) == 16
    assert torch.bincount(y[hold], minlength=3).tolist() == [2, 1, 0]
    assert torch.equal(hold, stratified_split(y, 0.2, 3)[1])


def _tokenizer(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"))


def test_save_load_round_trip(tmp_path):
    x, y = _clusters(n=120)
    config = RouterConfig(in_dim=16, n_experts=4, epochs=3, layers=[-2, -1], pooling="mean_max", max_length=12)
    router, _ = train_router(x, y, config, progress=False)
    save_router(router, config, tmp_path / "router", _tokenizer(tmp_path / "tok"), "ab" * 32)
    saved = load_router(tmp_path / "router")
    assert saved.config == config and saved.feature_model_sha256 == "ab" * 32
    assert torch.equal(route(saved.router, x, 0.5, 2), route(router, x, 0.5, 2))
    with pytest.raises(CheckpointError):
        load_router(tmp_path / "missing")


def test_saved_router_carries_its_feature_recipe(encoder, tmp_path):
    """Features come from the router's own layers, pooling, max_length and tokenizer, whatever the consumer's
    settings; another feature model than the one trained on is refused in one line."""
    from safetensors.torch import save_file

    tokenizer = _tokenizer(tmp_path / "tok")
    texts = ["the cat sat on the mat the big red dog sat on a mat", "a dog"]
    config = RouterConfig(in_dim=2 * 16, n_experts=2, epochs=1, layers=[1, -1], pooling="mean", max_length=5)
    x = extract_features(encoder, tokenizer, texts * 4, layers=(1, -1), max_length=5, progress=False)
    router, _ = train_router(x, torch.tensor([0, 1] * 4), config, progress=False)
    save_file({"w": torch.ones(2)}, tmp_path / "feature.safetensors")
    from twinmerge.io import sha256_file

    save_router(router, config, tmp_path / "router", tokenizer, sha256_file(tmp_path / "feature.safetensors"))
    saved = load_router(tmp_path / "router")
    expected = extract_features(encoder, tokenizer, texts, layers=(1, -1), max_length=5, progress=False)
    torch.testing.assert_close(saved.features(encoder, texts, progress=False), expected)
    longer = extract_features(encoder, tokenizer, texts, layers=(1, -1), max_length=32, progress=False)
    assert not torch.allclose(expected, longer)  # truncation matters: the recipe's max_length is used
    saved.check_feature_model(tmp_path / "feature.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="router.json: trained on features of a model with sha256"):
        saved.check_feature_model(tmp_path / "other.safetensors")


def test_route_temperature_and_top_k():
    x, y = _clusters(n=120)
    router, _ = train_router(x, y, RouterConfig(in_dim=16, n_experts=4, epochs=3), progress=False)
    logits = router.eval()(x).detach()
    torch.testing.assert_close(route(router, x, temperature=2.0), torch.softmax(logits / 2, 1))
    w = route(router, x, top_k=2)
    assert ((w > 0).sum(1) == 2).all()
    torch.testing.assert_close(w.sum(1), torch.ones(len(x)))
    top2 = logits.topk(2, 1)
    torch.testing.assert_close(w.gather(1, top2.indices), torch.softmax(top2.values, 1))


def test_training_rejects_bad_labels():
    x, y = _clusters(n=40)
    with pytest.raises(TwinMergeError, match="labels"):
        train_router(x, y + 4, RouterConfig(in_dim=16, n_experts=4, epochs=1), progress=False)


def test_mean_pooling_ignores_padding(encoder):
    ids = torch.tensor([[2, 5, 6, 7, 3, 0, 0], [2, 8, 9, 10, 11, 12, 3]])
    mask = (ids != 0).long()
    noisy = ids.clone()
    noisy[0, 5:] = torch.tensor([6, 13])  # different token ids at padded positions
    with torch.no_grad():
        a, b = (features_from_batch(encoder(input_ids=i, attention_mask=mask, output_hidden_states=True).hidden_states,
                                    mask, layers=(-1, 1), pooling="mean_max") for i in (ids, noisy))
    assert a.shape == (2, 4 * 16)
    torch.testing.assert_close(a, b)


def test_pooling_formulas():
    h = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(features_from_batch((h,), mask, pooling="mean")[0], h[0, :2].mean(0))
    torch.testing.assert_close(features_from_batch((h,), mask, pooling="max")[0], h[0, :2].max(0).values)
    torch.testing.assert_close(features_from_batch((h,), mask, pooling="cls"), h[:, 0])
    with pytest.raises(TwinMergeError, match="pooling"):
        features_from_batch((h,), mask, pooling="sum")


def test_extract_features_batching_and_order(encoder, tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"))
    texts = ["the cat sat on the mat", "a dog", "the big red dog sat", "cat"]
    batched = extract_features(encoder, tokenizer, texts, batch_size=3, progress=False)
    single = torch.cat([extract_features(encoder, tokenizer, [t], progress=False) for t in texts])
    assert batched.shape == (4, 16)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
