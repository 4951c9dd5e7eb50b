"""The char n-gram classifier (twinmerge.char_ngrams) and the router ensemble that averages it with the MLP."""
import math

import pytest
import torch
from transformers import BertTokenizer

from twinmerge.char_ngrams import VOCAB_FILE, WEIGHTS_FILE, CharNgramClassifier, learn_vocabulary, tfidf
from twinmerge.errors import CheckpointError, TwinMergeError
from twinmerge.router import RouterConfig, load_router, route, router_logits, save_router, train_router


def test_tfidf_vocabulary_idf_and_rows():
    texts = ["abc", "abd", "xyz", "xyw"]  # padded " abc " ...: an n-gram enters the vocabulary in >= 2 texts
    vocab, idf = learn_vocabulary(texts)
    assert vocab == sorted([" ", "a", "b", "x", "y", " a", " x", "ab", "xy", " ab", " xy"])
    expected_idf = {g: 1.0 if g == " " else math.log(5 / 3) + 1 for g in vocab}  # log((1 + N) / (1 + df)) + 1
    torch.testing.assert_close(idf, torch.tensor([expected_idf[g] for g in vocab]))
    dense = tfidf(texts, vocab, idf).to_dense()
    torch.testing.assert_close(dense.norm(dim=1), torch.ones(4))
    # " abc ": " " twice (tf 1 + log 2); "a", "b", " a", "ab", " ab" once; L2-normalised
    row = torch.tensor([1 + math.log(2)] + [expected_idf["a"]] * 5)
    assert math.isclose(dense[0, vocab.index(" ")].item(), (row[0] / row.norm()).item(), rel_tol=1e-6)
    assert dense[0, vocab.index("x")] == 0 and dense[2, vocab.index("x")] > 0
    unseen = tfidf(["qqq", ""], vocab, idf).to_dense()  # only " " is known; "" has "  " -> " " twice
    assert unseen[0, vocab.index(" ")] == 1 and unseen[0].sum() == 1 and unseen[1].sum() == 1


def test_classifier_fits_predicts_deterministically_and_round_trips(tmp_path):
    texts = ["abc", "abd", "xyz", "xyw"]
    model = CharNgramClassifier.fit(texts, [0, 0, 1, 1], 2)
    probs = model.predict_proba(["abx", "xya"])
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    assert probs.argmax(1).tolist() == [0, 1]
    again = CharNgramClassifier.fit(texts, [0, 0, 1, 1], 2)
    assert torch.equal(model.weight, again.weight) and torch.equal(model.bias, again.bias)
    model.save(tmp_path)
    loaded = CharNgramClassifier.load(tmp_path)
    assert loaded.vocab == model.vocab and torch.equal(loaded.weight, model.weight)
    assert torch.equal(loaded.predict_proba(["abx", "xya"]), probs)
    (tmp_path / VOCAB_FILE).write_text('{"format": "other", "vocab": []}')
    with pytest.raises(ValueError, match="format 'other'"):
        CharNgramClassifier.load(tmp_path)


def _texts_decide(n=160, seed=0):
    """Features that carry no task (noise) and texts that do: task t's texts are made of letter t's words."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    words = {0: ["alpha", "apple", "amber"], 1: ["zulu", "zebra", "zinc"]}
    texts = [" ".join(words[int(t)][int(i)] for i in torch.randint(3, (4,), generator=g)) for t in labels]
    return torch.randn(n, 8, generator=g), labels, texts


def test_router_ensemble_reads_the_texts(tmp_path):
    x, y, texts = _texts_decide()
    config = RouterConfig(in_dim=8, n_experts=2, epochs=5, patience=2, ensemble="char_ngrams")
    router, report = train_router(x, y, config, progress=False, texts=texts)
    assert report.holdout_accuracy == 1.0  # the ensemble's holdout accuracy: noise features alone are at chance
    plain, plain_report = train_router(x, y, RouterConfig(in_dim=8, n_experts=2, epochs=5, patience=2),
                                       progress=False)
    assert plain_report.holdout_accuracy < 0.8
    # logits = log_softmax(MLP) + log q: weights p q / sum(p q); temperature and top-k as for the MLP alone
    router.eval()
    p, q = torch.softmax(router(x), 1), router.ngrams.predict_proba(texts)
    expected = torch.log_softmax(router(x), 1) + q.log()
    torch.testing.assert_close(route(router, x, texts=texts), p * q / (p * q).sum(1, keepdim=True))
    torch.testing.assert_close(router_logits(router, x, texts), expected)
    torch.testing.assert_close(route(router, x, 0.5, texts=texts), torch.softmax(expected / 0.5, 1))
    with pytest.raises(TwinMergeError, match="also reads the texts"):
        route(router, x)
    with pytest.raises(TwinMergeError, match="needs the 160 texts"):
        train_router(x, y, config, progress=False)
    with pytest.raises(TwinMergeError, match="unknown router ensemble"):
        train_router(x, y, RouterConfig(in_dim=8, n_experts=2, ensemble="words"), progress=False, texts=texts)


def test_ensemble_router_saves_loads_and_leaves_no_stale_member(tmp_path):
    x, y, texts = _texts_decide()
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    tokenizer = BertTokenizer(str(tok_dir / "vocab.txt"))
    config = RouterConfig(in_dim=8, n_experts=2, epochs=3, ensemble="char_ngrams", refit=True)
    router, _ = train_router(x, y, config, progress=False, texts=texts)
    assert router.ngrams.vocab == learn_vocabulary(texts)[0]  # refit: the member learnt from all 160 texts
    save_router(router, config, tmp_path / "router", tokenizer, "ab" * 32)
    saved = load_router(tmp_path / "router")
    assert saved.config.ensemble == "char_ngrams" and saved.router.ngrams.vocab == router.ngrams.vocab
    assert torch.equal(route(saved.router, x, texts=texts), route(router, x, texts=texts))
    plain_config = RouterConfig(in_dim=8, n_experts=2, epochs=1)
    plain, _ = train_router(x, y, plain_config, progress=False)
    with pytest.raises(TwinMergeError, match="has no n-gram member"):
        save_router(plain, config, tmp_path / "router", tokenizer, "ab" * 32)
    save_router(plain, plain_config, tmp_path / "router", tokenizer, "ab" * 32)
    assert not (tmp_path / "router" / WEIGHTS_FILE).exists() and not (tmp_path / "router" / VOCAB_FILE).exists()
    assert load_router(tmp_path / "router").router.ngrams is None
    save_router(router, config, tmp_path / "router", tokenizer, "ab" * 32)
    (tmp_path / "router" / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="not a router folder"):
        load_router(tmp_path / "router")
