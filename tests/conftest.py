"""Session fixtures: tiny BERT (bare-backbone base, like MiniLM) and RoBERTa (masked-LM base) expert sets."""
import pytest
import torch

# Test files that take minutes, longest first. `scripts/test.sh` runs the suite in two processes
# (pytest-xdist, one file at a time per process): started first, they run beside all the short ones.
SLOW_FILES = ("test_e2e.py", "test_e2e_incremental.py", "test_dask.py", "test_kill.py", "test_server.py",
              "test_pipeline_flow.py", "test_hostile.py")

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


def pytest_collection_modifyitems(items):
    """Slow files first (SLOW_FILES order), then the rest in collection order."""
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
