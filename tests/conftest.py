"""Session fixtures: tiny BERT (bare-backbone base, like MiniLM) and RoBERTa (masked-LM base) expert sets."""
import pytest
import torch

from tiny_models import make_set

# Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spin-waiting made a
# 384x384 SVD take 7 s instead of 0.05 s (test_io/merge/exclusive: 51 s -> 4 s).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """(base_folder, {name: folder}): bare BertModel base, 3 BertForSequenceClassification experts (2/3/4 labels)."""
    return make_set(tmp_path_factory.mktemp("tiny_bert"), "bert", bare_backbone=True)


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory):
    """(base_folder, {name: folder}): RobertaForMaskedLM base, 3 RobertaForSequenceClassification experts."""
    return make_set(tmp_path_factory.mktemp("tiny_roberta"), "roberta", bare_backbone=False)
