"""Tiny random BERT / RoBERTa checkpoints in Hugging Face layout, for tests (each build well under 1 s).

`make_base` writes a base model; `make_experts` fine-tunes it "by noise": it loads the base into
`AutoModelForSequenceClassification` (a new head per expert), perturbs every parameter with seeded Gaussian
noise (so task vectors are dense and full rank) and saves with `save_pretrained` (safetensors), exactly as a
real fine-tuning script would leave it.

Layouts: `bare_backbone=True` saves `BertModel` / `RobertaModel` (keys `embeddings.*`, `encoder.*`,
`pooler.*`, like sentence-transformers' MiniLM); `bare_backbone=False` saves the masked-LM model (keys
`bert.*` + `cls.*`, or `roberta.*` + `lm_head.*`, like `FacebookAI/roberta-base`). Experts always use the
prefixed names (`bert.*` / `roberta.*`) plus their head (`classifier.*`; for BERT from a masked-LM base also a
freshly initialised `bert.pooler.*`, which is then a head since the base lacks it).
"""
from pathlib import Path

import torch
import transformers
from transformers import (AutoModelForSequenceClassification, BertConfig, BertForMaskedLM, BertModel,
                          RobertaConfig, RobertaForMaskedLM, RobertaModel)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)
ARCHS = {"bert": (BertConfig, BertModel, BertForMaskedLM),
         "roberta": (RobertaConfig, RobertaModel, RobertaForMaskedLM)}


def make_base(tmp: str | Path, arch: str = "bert", bare_backbone: bool = False, seed: int = 0,
              name: str = "base") -> Path:
    """Write a tiny random `arch` base model to `tmp/name` and return the folder."""
    config_cls, bare_cls, mlm_cls = ARCHS[arch]
    torch.manual_seed(seed)
    model = (bare_cls if bare_backbone else mlm_cls)(config_cls(**TINY))
    folder = Path(tmp) / name
    model.save_pretrained(folder)
    return folder


def add_word_tokenizer(folder: str | Path) -> list[str]:
    """Save a BERT WordPiece tokenizer over TINY's vocabulary (5 special tokens + words w0, w1, ...) into
    `folder`; return the words."""
    from transformers import BertTokenizerFast

    words = [f"w{i}" for i in range(TINY["vocab_size"] - 5)]
    vocab = Path(folder) / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    return words


def make_experts(tmp: str | Path, base_folder: str | Path, num_labels=(2, 3, 4), seed: int = 1,
                 noise: float = 0.02, names=None) -> dict[str, Path]:
    """Write one expert per entry of `num_labels` to `tmp/<name>`; return {name: folder} in order.

    Expert i: base + N(0, noise^2) on every parameter (generator seeded with seed + i), new head with
    num_labels[i] classes, saved with save_pretrained. Names default to task0, task1, ...
    """
    names = list(names or [f"task{i}" for i in range(len(num_labels))])
    out = {}
    for i, (name, labels) in enumerate(zip(names, num_labels)):
        torch.manual_seed(seed + i)
        model = AutoModelForSequenceClassification.from_pretrained(base_folder, num_labels=labels)
        gen = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn(p.shape, generator=gen))
        out[name] = Path(tmp) / name
        model.save_pretrained(out[name])
    return out


def make_set(tmp: str | Path, arch: str = "bert", bare_backbone: bool = False, num_labels=(2, 3, 4),
             seed: int = 0) -> tuple[Path, dict[str, Path]]:
    """A base and its experts under `tmp`: (base_folder, {name: folder})."""
    base = make_base(tmp, arch, bare_backbone, seed)
    return base, make_experts(tmp, base, num_labels, seed + 1)


def at_thread_counts(fn, counts=(1, 2)) -> list:
    """[fn() with torch.set_num_threads(n) for n in counts]; the caller's thread count is restored after each."""
    results = []
    for threads in counts:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            results.append(fn())
        finally:
            torch.set_num_threads(before)
        assert torch.get_num_threads() == before
    return results
