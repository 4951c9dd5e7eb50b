"""Session fixtures: tiny BERT (bare-backbone base, like MiniLM) and RoBERTa (masked-LM base) expert sets."""
import pytest

from tiny_models import make_set


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """(base_folder, {name: folder}): bare BertModel base, 3 BertForSequenceClassification experts (2/3/4 labels)."""
    return make_set(tmp_path_factory.mktemp("tiny_bert"), "bert", bare_backbone=True)


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory):
    """(base_folder, {name: folder}): RobertaForMaskedLM base, 3 RobertaForSequenceClassification experts."""
    return make_set(tmp_path_factory.mktemp("tiny_roberta"), "roberta", bare_backbone=False)
