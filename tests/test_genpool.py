"""Generative metrics (exact match, ROUGE-L) and the generative task pool on a tiny random GPT-2."""
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from twinmerge.errors import TwinMergeError
from twinmerge.genpool import GenerativeTaskPool, answer_text, left_padded
from twinmerge.metrics import _lcs_length, exact_match, normalize_answer, rouge_l, rouge_l_f1, score

WORDS = [f"w{i}" for i in range(40)]


def word_tokenizer():
    """A whitespace word-level tokenizer over WORDS with <eos> (id 0) and <pad> (id 1)."""
    vocab = {"<eos>": 0, "<pad>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(WORDS) + 2, n_embd=16, n_layer=2, n_head=2, n_positions=64, eos_token_id=0,
                     bos_token_id=0, pad_token_id=1)
    return GPT2LMHeadModel(cfg).double().eval()


def test_exact_match_normalises_like_squad_and_takes_the_best_reference():
    assert normalize_answer("  The  Eiffel-Tower!! ") == "eiffeltower"
    assert normalize_answer("An apple, a day") == "apple day"
    assert exact_match(["The Cat!", "dog", "(B)"], ["cat", ["Dog", "hound"], "b"]) == 1.0
    assert exact_match(["cat", "a dog", "b"], ["cat", "dogs", "c"]) == pytest.approx(1 / 3)
    assert score("exact_match", ["yes"], ["Yes."]) == 1.0


def test_rouge_l_is_the_lcs_f1_of_rouge_tokens():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" (5 of 6 and 5 of 6)
    assert rouge_l_f1("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l_f1("A b c", "a c") == pytest.approx(2 * 2 / (3 + 2))  # P = 2/3, R = 1, F = 0.8
    assert rouge_l_f1("x y", "a b") == 0.0 and rouge_l_f1("", "a") == 0.0 and rouge_l_f1("!!", "!!") == 0.0
    assert rouge_l_f1("Police killed the gunman.", "the gunman police killed") == pytest.approx(2 * 2 / 8)
    assert rouge_l(["a b c", "x"], ["a c", ["y", "x"]]) == pytest.approx((0.8 + 1.0) / 2)
    assert _lcs_length(list("abcbdab"), list("bdcaba")) == 4  # CLRS's example


def test_lcs_equals_brute_force_on_random_sequences():
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(30):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        def in_b(sub):
            rest = iter(b)
            return all(c in rest for c in sub)  # `in` consumes the iterator: an ordered subsequence test

        brute = max(k for k in range(len(a) + 1) if any(in_b(s) for s in itertools.combinations(a, k)))
        assert _lcs_length(a, b) == brute


def test_text_metrics_refuse_mismatched_lengths():
    with pytest.raises(TwinMergeError, match="2 generations and 1 references"):
        rouge_l(["a", "b"], ["a"])
    with pytest.raises(TwinMergeError, match="must be equal and non-zero"):
        exact_match([], [])


def test_answer_text_keeps_the_first_line_for_short_answers_only():
    assert answer_text("\n  B) Paris\nbecause ...", "exact_match") == "B) Paris"
    assert answer_text(" one\ntwo ", "rouge_l") == "one\ntwo"


def test_left_padding_keeps_the_last_tokens_and_pads_on_the_left():
    tok = word_tokenizer()
    ids, mask = left_padded(tok, ["w1 w2 w3", "w4"], max_length=2, pad_id=1)
    assert ids.tolist() == [[4, 5], [1, 6]] and mask.tolist() == [[1, 1], [0, 1]]
    with pytest.raises(TwinMergeError, match="tokenises to nothing"):
        left_padded(tok, [""], 8, 1)


def _unpadded_greedy(model, tok, prompt, new):
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         pad_token_id=1)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_batched_left_padded_generation_equals_one_prompt_at_a_time():
    tok, model = word_tokenizer(), tiny_gpt2()
    prompts = ["w1 w2 w3 w4 w5", "w7", "w9 w3", "w20 w21 w22", "w5 w5 w5 w5 w5 w5 w5"]
    pool = GenerativeTaskPool({"qa": (prompts, [""] * len(prompts))}, {"qa": "rouge_l"}, tok, batch_size=3,
                              max_new_tokens=6)
    got = pool.generate(model, prompts)
    assert got == [_unpadded_greedy(model, tok, p, 6) for p in prompts]
    assert [len(g.split()) for g in got] == [6] * len(prompts)  # this seed never generates <eos>


def test_scores_are_the_metrics_of_the_generations_per_task():
    tok, model = word_tokenizer(), tiny_gpt2()
    qa, summ = ["w1 w2", "w3", "w4 w5 w6"], ["w7 w8 w9", "w10"]
    pool = GenerativeTaskPool({"qa": (qa, ["?"] * 3), "summ": (summ, ["?"] * 2)},
                              {"qa": "exact_match", "summ": "rouge_l"}, tok, batch_size=2, max_new_tokens=4)
    gens = pool.generate(model, pool.prompts)
    # references: the model's own answers for the first qa prompt and the first summary, a miss elsewhere
    refs_qa = [gens[0].split("\n")[0], "nothing", "nothing"]
    refs_summ = [gens[3], " ".join(gens[4].split()[:2]) + " w39"]
    pool = GenerativeTaskPool({"qa": (qa, refs_qa), "summ": (summ, refs_summ)},
                              {"qa": "exact_match", "summ": "rouge_l"}, tok, batch_size=2, max_new_tokens=4)
    scores = pool.score_model(model)
    assert scores["qa"] == pytest.approx(100 / 3)
    assert scores["summ"] == pytest.approx(100 * (1.0 + rouge_l_f1(gens[4], refs_summ[1])) / 2)
    assert pool.score_model(model, only="summ") == {"summ": scores["summ"]}
    assert pool.task_ids.tolist() == [0, 0, 0, 1, 1]


def test_a_classification_metric_is_refused_for_generative_tasks():
    with pytest.raises(TwinMergeError, match="exact_match, rouge_l"):
        GenerativeTaskPool({"qa": (["w1"], ["w2"])}, {"qa": "accuracy"}, word_tokenizer())


def test_routed_scores_equal_each_prompt_generated_by_its_materialised_merge():
    """score_routed (a RoutedCausalLM, routes fixed per prompt) == scoring each prompt's generation by the
    materialised theta_s + sum_t w_t v_t, for soft weights and top-1."""
    import copy

    from twinmerge.decoder import RoutedCausalLM
    from twinmerge.routed import dense_delta_set

    tok, base = word_tokenizer(), tiny_gpt2()
    experts = []
    for seed in (1, 2):
        expert, gen = copy.deepcopy(base), torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        experts.append(expert)
    base_state = dict(base.named_parameters())
    shared = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in shared.named_parameters():
            p.add_(0.3 * sum(dict(e.named_parameters())[name] - base_state[name] for e in experts))
    shared_state = dict(shared.named_parameters())
    factors = [dense_delta_set(f"e{t}", e.config.to_dict(),
                               {n: (p - shared_state[n]).detach() for n, p in e.named_parameters()}, {})
               for t, e in enumerate(experts)]
    model = RoutedCausalLM(shared, factors, dtype=torch.float64)
    qa, summ = ["w1 w2", "w3", "w4 w5 w6"], ["w7 w8 w9", "w10"]
    split = {"qa": (qa, ["w1", "w2", "w3"]), "summ": (summ, ["w7 w8 w11", "w10 w12"])}
    pool = GenerativeTaskPool(split, {"qa": "exact_match", "summ": "rouge_l"}, tok, batch_size=4, max_new_tokens=3)
    weights = torch.tensor([[0.8, 0.2], [0.1, 0.9], [0.6, 0.4], [0.3, 0.7], [1.0, 0.0]], dtype=torch.float64)
    for top_k in (None, 1):
        routed = pool.generate(model, pool.prompts, weights, top_k=top_k)
        used = weights if top_k is None else torch.nn.functional.one_hot(weights.argmax(1), 2).double()
        alone = [pool.generate(model.materialize(w), [p])[0] for p, w in zip(pool.prompts, used)]
        assert routed == alone
        assert len(set(routed)) > 1  # the routes make a difference
        scores = pool.score_routed(model, weights, top_k=top_k)
        assert scores == {"qa": pool.score_texts("qa", alone[:3]), "summ": pool.score_texts("summ", alone[3:])}


def test_twin_merging_on_decoder_experts_from_folders_to_scores(tmp_path):
    """The library's whole Twin-Merging path on causal-LM experts: saved GPT-2 experts -> ExpertSet -> Task
    Arithmetic shared expert -> full-rank exclusive factors (files) -> a router trained on VALIDATION prompts'
    features (read once per prompt) -> RoutedCausalLM top-1 -> GenerativeTaskPool. Task A prompts use words
    w0-w9, task B w20-w29, so the router separates them: every test prompt is generated by its own expert
    (theta_s + v_t = theta_t at full rank) and scores 100 against that expert's generations, while the shared
    expert alone scores less."""
    import copy
    import random

    from twinmerge.decoder import RoutedCausalLM
    from twinmerge.exclusive import RankSpec, compress_expert, factor_metadata, load_factors, save_factors
    from twinmerge.io import ExpertSet
    from twinmerge.merge import build_shared_expert
    from twinmerge.router import RouterConfig, extract_features, route, train_router

    tok, base = word_tokenizer(), tiny_gpt2().float()
    base.save_pretrained(tmp_path / "base")
    folders = {}
    for t, name in enumerate(("a", "b")):
        expert, gen = copy.deepcopy(base), torch.Generator().manual_seed(10 + t)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        folders[name] = tmp_path / name
        expert.save_pretrained(folders[name])
    experts = ExpertSet(tmp_path / "base", folders)
    shared_state, _ = build_shared_expert(experts, "task_arithmetic", {"scaling": 0.3}, progress=False)
    spec, factors = RankSpec("fraction", 1.0), []
    for name in experts.names:
        tensors, _ = compress_expert(experts, shared_state, name, spec, "float32", progress=False)
        meta = factor_metadata(name, experts.experts[name].config, spec, "float32")
        factors.append(load_factors(save_factors(tmp_path / f"{name}.safetensors", tensors, meta)))
    shared = GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval()
    shared.load_state_dict(shared_state, strict=False)

    rng = random.Random(0)

    def prompts(words, n):
        return [" ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) for _ in range(n)]

    vocab = {"a": WORDS[:10], "b": WORDS[20:30]}
    validation = {name: prompts(words, 80) for name, words in vocab.items()}
    features = extract_features(shared, tok, validation["a"] + validation["b"], layers=(0, 1, 2), progress=False)
    router, _ = train_router(features, [0] * 80 + [1] * 80, RouterConfig(features.shape[1], 2, dropout=0.1,
                                                                         epochs=100, patience=30), progress=False)
    test = {name: prompts(words, 6) for name, words in vocab.items()}
    own = {name: GenerativeTaskPool({name: (test[name], [""] * 6)}, {name: "exact_match"}, tok,
                                    max_new_tokens=4).generate(
        GPT2LMHeadModel.from_pretrained(folders[name]).eval(), test[name]) for name in vocab}
    pool = GenerativeTaskPool({name: (test[name], own[name]) for name in vocab}, {"a": "exact_match",
                              "b": "exact_match"}, tok, batch_size=5, max_new_tokens=4)
    weights = route(router, extract_features(shared, tok, pool.prompts, layers=(0, 1, 2), progress=False))
    assert weights.argmax(1).tolist() == pool.task_ids.tolist()  # the router reads each prompt once
    model = RoutedCausalLM(copy.deepcopy(shared), factors)
    assert pool.score_routed(model, weights, top_k=1) == {"a": 100.0, "b": 100.0}
    alone = pool.score_model(shared)
    assert alone["a"] < 100 or alone["b"] < 100
