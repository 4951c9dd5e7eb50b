"""Expert registry: `twinmerge expert add|list` on tiny random BERT experts (no Prefect server, no DVC)."""
import json
import re
import shutil
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest
import yaml

from tasks import registry
from tasks.cli import main as cli
from tasks.params import ParamsError, load_params
from tiny_models import make_base, make_experts

PARAMS = """# the registry (comment kept)
seed: 0
base:
  path: {base}    # tiny base
hub_sources: {{}}
experts:
  task0: {{path: {e0}, task: task0, data: tables/task0}}
evaluate:
  regression_threshold: 2.0
  batch_size: 8   # trailing comment
router: {{epochs: 5,
         patience: 3}}   # a flow mapping over two lines
"""


def _tables(folder, num_labels=2):
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        pd.DataFrame({"text": ["w1 w2", "w3"], "label": [0, num_labels - 1]}).to_parquet(folder / f"{split}.parquet")
    (folder / "labels.json").write_text(json.dumps({str(i): f"c{i}" for i in range(num_labels)}))
    return folder


@pytest.fixture
def project(tmp_path, tiny_bert, monkeypatch):
    base, experts = tiny_bert
    for name, num_labels in (("task0", 2), ("task1", 3)):  # as the tiny experts' heads
        _tables(tmp_path / "tables" / name, num_labels)
    (tmp_path / "params.yaml").write_text(PARAMS.format(base=base, e0=experts["task0"]))
    monkeypatch.chdir(tmp_path)
    return tmp_path, base, experts


def test_add_local_expert_keeps_comments_and_lists_new(project, capsys):
    root, base, experts = project
    assert cli(["expert", "add", "task1", "--path", str(experts["task1"]), "--task", "task1",
                "--data", "tables/task1", "--no-event"]) == 0
    text = (root / "params.yaml").read_text()
    before = PARAMS.format(base=base, e0=experts["task0"])
    added = f"  task1: {{path: {experts['task1']}, task: task1, data: tables/task1, metric: accuracy}}\n"
    at = before.index("evaluate:")
    assert text == before[:at] + added + before[at:]  # one line added; every other byte kept (comments, layout)
    assert list(load_params("params.yaml").experts) == ["task0", "task1"]
    capsys.readouterr()
    assert cli(["expert", "list"]) == 0
    out = capsys.readouterr().out
    assert "task1" in out and out.count(" new") == 2 and "local:" in out


def test_incompatible_expert_is_refused_and_params_untouched(project, tmp_path_factory, capsys):
    root, _, _ = project
    other = tmp_path_factory.mktemp("other")
    wrong = make_experts(other, make_base(other, "roberta"), (2,), names=["wrong"])["wrong"]
    before = (root / "params.yaml").read_bytes()
    assert cli(["expert", "add", "wrong", "--path", str(wrong), "--task", "t", "--data", "tables/task1",
                "--no-event"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("twinmerge expert: error: expert wrong (") and "incompatible with the base" in err
    assert len(err.splitlines()) == 1
    assert (root / "params.yaml").read_bytes() == before
    # duplicate name and missing data are refused the same way
    assert cli(["expert", "add", "task0", "--path", str(wrong), "--task", "t", "--data", "tables/task1"]) == 2
    assert cli(["expert", "add", "x", "--path", str(wrong), "--task", "t", "--data", "nowhere"]) == 2
    assert (root / "params.yaml").read_bytes() == before


def test_expert_whose_head_does_not_match_the_task_labels_is_refused(project, capsys):
    root, _, experts = project
    before = (root / "params.yaml").read_bytes()
    assert cli(["expert", "add", "x", "--path", str(experts["task1"]), "--task", "t", "--data", "tables/task0",
                "--no-event"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"twinmerge expert: error: expert x: {experts['task1']}/config.json has a 3-label head but its "
                   "task data tables/task0/labels.json has 2 labels")
    (root / "tables" / "task0" / "labels.json").unlink()
    assert cli(["expert", "add", "x", "--path", str(experts["task0"]), "--task", "t", "--data", "tables/task0",
                "--no-event"]) == 2
    assert "tables/task0: task data lacks labels.json" in capsys.readouterr().err
    assert (root / "params.yaml").read_bytes() == before


@pytest.mark.parametrize("table, problem", [
    ({"sentence": ["a", "b"], "label": [0, 1]}, r"validation.parquet: no column text \(columns: sentence, label\)"),
    ({"text": ["a", "b"], "label": [0.0, 1.0]}, r"validation.parquet: column label has type double, expected integers"),
    ({"text": [1, 2], "label": [0, 1]}, r"validation.parquet: column text has type int64, expected strings"),
    ({"text": ["a", "b"], "label": [0, 2]}, r"validation.parquet: labels span 0..2, outside 0..1 \(2 labels in "),
    ({"text": ["a", "b"], "label": [-1, 0]}, r"validation.parquet: labels span -1..0, outside 0..1"),
    ({"text": pd.Series([], dtype=str), "label": pd.Series([], dtype=int)}, r"validation.parquet: no rows"),
    ({"text": ["a", None], "label": [0, 1]}, r"validation.parquet: column text has 1 missing values"),
])
def test_bad_task_table_is_refused_in_one_line(project, capsys, table, problem):
    """Columns, dtypes, non-empty splits and the label range are checked at `expert add` (and `download`)."""
    root, _, experts = project
    pd.DataFrame(table).to_parquet(root / "tables" / "task0" / "validation.parquet")
    before = (root / "params.yaml").read_bytes()
    assert cli(["expert", "add", "x", "--path", str(experts["task0"]), "--task", "t", "--data", "tables/task0",
                "--no-event"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(problem, err), err
    assert (root / "params.yaml").read_bytes() == before
    (root / "tables" / "task0" / "validation.parquet").write_text("not parquet")
    assert cli(["expert", "add", "x", "--path", str(experts["task0"]), "--task", "t", "--data", "tables/task0",
                "--no-event"]) == 2
    assert "validation.parquet: not a parquet table" in capsys.readouterr().err


def test_expert_missing_a_backbone_tensor_is_refused_at_add(project, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    root, _, experts = project
    gap = tmp_path / "gap"
    shutil.copytree(experts["task0"], gap)
    tensors = load_file(gap / "model.safetensors")
    del tensors["bert.encoder.layer.0.attention.self.query.weight"]
    save_file(tensors, gap / "model.safetensors", metadata={"format": "pt"})
    assert cli(["expert", "add", "gap", "--path", str(gap), "--task", "t", "--data", "tables/task0",
                "--no-event"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing tensor bert.encoder.layer.0.attention.self.query.weight" in err


def test_non_finite_expert_is_refused(project, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, experts = project
    bad = tmp_path / "bad"
    shutil.copytree(experts["task1"], bad)
    tensors = load_file(bad / "model.safetensors")
    key = next(k for k in tensors if k.endswith("query.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception, match="incompatible with the base"):
        registry.add_expert("bad", "t", "tables/task1", path=str(bad))


def test_fingerprint_follows_checkpoint_content_only(tmp_path, tiny_bert):
    _, experts = tiny_bert
    folder = tmp_path / "e"
    shutil.copytree(experts["task0"], folder)
    first = registry.folder_fingerprint(folder)
    (folder / "notes.md").write_text("not a checkpoint file")
    assert registry.folder_fingerprint(folder) == first
    for log_file in ("scores.json", "trainer_state.json", "eval_results.json"):  # training logs, not the model
        (folder / log_file).write_text('{"train_seconds": 12.3}')
        assert registry.folder_fingerprint(folder) == first
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {"0": "neg", "1": "pos"}
    (folder / "config.json").write_text(json.dumps(config))
    assert registry.folder_fingerprint(folder) != first
    assert registry.folder_fingerprint(tmp_path / "missing") is None


class FakeApi:
    def __init__(self, sha):
        self.sha = sha

    def model_info(self, repo_id, revision="main"):
        return type("Info", (), {"sha": self.sha})()


def test_add_hub_expert_with_fake_hub(project):
    root, _, experts = project

    def snapshot(repo_id, revision, local_dir, allow_patterns):
        dest = root / local_dir / "sub"
        shutil.copytree(experts["task1"], dest, dirs_exist_ok=True)

    entry = registry.add_expert("hubby", "task1", "tables/task1", repo_id="org/models", subfolder="sub",
                                api=FakeApi("c0ffee"), snapshot_download=snapshot)
    assert entry["path"] == "data/hub/hubby"
    params = load_params("params.yaml")
    assert params.hub_sources["hubby"].repo_id == "org/models" and params.hub_sources["hubby"].subfolder == "sub"
    assert not list((root / "data/hub").iterdir())  # the validation download is not kept
    prints = registry.fingerprints(params, api=FakeApi("c0ffee"))
    assert prints["hubby"]["hash"] == "commit:c0ffee" and prints["hubby"]["source"].startswith("hub:org/models@main")


def test_list_status_against_recorded_state(project):
    root, _, experts = project
    params = load_params("params.yaml")
    prints = registry.fingerprints(params)
    registry.save_state({**prints, "gone": {"source": "local:x", "hash": "h"}})
    assert registry.compare(prints, registry.load_state()) == {"task0": "unchanged", "gone": "removed"}
    registry.add_expert("task1", "task1", "tables/task1", path=str(experts["task1"]))
    rows = {r["name"]: r["status"] for r in registry.expert_table(load_params("params.yaml"))}
    assert rows == {"task0": "unchanged", "task1": "new", "gone": "removed"}
    state = json.loads((root / registry.STATE_PATH).read_text())
    assert "updated" in state


def test_add_emits_expert_added(project, monkeypatch, capsys):
    import prefect.events
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    _, _, experts = project
    sent = []
    monkeypatch.setattr(prefect.events, "emit_event", lambda **kw: sent.append(kw) or object())
    monkeypatch.setattr(EventsWorker, "drain_all", classmethod(lambda cls, *a, **k: None))
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert cli(["expert", "add", "task1", "--path", str(experts["task1"]), "--task", "task1",
                    "--data", "tables/task1"]) == 0
    assert sent[0]["event"] == "expert.added"
    assert sent[0]["resource"]["prefect.resource.id"] == "twinmerge.expert.task1"
    assert "event expert.added emitted" in capsys.readouterr().out


def test_duplicate_keys_are_refused_in_one_line(project, capsys):
    """PyYAML kept the last of two equal keys silently and ruamel (expert add) raised a multi-line traceback."""
    root, _, experts = project
    text = (root / "params.yaml").read_text()
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if ln.startswith("  task0:"))
    dup = text.replace("experts:\n", f"experts:\n  task0: {{path: {experts['task1']}, task: task1, data: tables/task1}}\n")
    (root / "params.yaml").write_text(dup)
    with pytest.raises(ParamsError, match=rf"^params.yaml: line {line + 1}: duplicate key 'task0'$"):
        load_params("params.yaml")
    assert cli(["expert", "add", "task1", "--path", str(experts["task1"]), "--task", "task1",
                "--data", "tables/task1", "--no-event"]) == 2
    assert capsys.readouterr().err == f"twinmerge expert: error: params.yaml: line {line + 1}: duplicate key 'task0'\n"
    assert (root / "params.yaml").read_text() == dup
    nested = text.replace("  batch_size: 8", "  batch_size: 8\n  batch_size: 16")
    (root / "params.yaml").write_text(nested)
    with pytest.raises(ParamsError, match=r"line \d+: duplicate key 'batch_size'"):
        registry.write_params_entry("params.yaml", "x", {"path": "p", "task": "t", "data": "d"})
    assert (root / "params.yaml").read_text() == nested


def _slow_load_params(monkeypatch, seconds=0.5):
    """Every params.yaml read in registry takes `seconds`: without a lock two read-modify-writes overlap."""
    real = registry.load_params

    def slow(path="params.yaml"):
        time.sleep(seconds)
        return real(path)
    monkeypatch.setattr(registry, "load_params", slow)


def test_concurrent_adds_all_land(project, monkeypatch):
    root, _, experts = project
    _slow_load_params(monkeypatch)
    names = ["c1", "c2", "c3"]
    with ThreadPoolExecutor(len(names)) as pool:
        list(pool.map(lambda n: registry.add_expert(n, "task1", "tables/task1", path=str(experts["task1"])), names))
    assert set(load_params("params.yaml").experts) == {"task0", *names}
    assert not [p.name for p in root.iterdir() if p.name.endswith(".tmp")]


def test_concurrent_adds_of_one_name_keep_the_first(project, monkeypatch):
    root, _, experts = project
    _slow_load_params(monkeypatch)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(registry.add_expert, "same", task, f"tables/{task}", path=str(experts[task]))
                   for task in ("task0", "task1")]
    errors = [f.exception() for f in futures if f.exception() is not None]
    assert len(errors) == 1 and "'same' is already registered" in str(errors[0])
    assert load_params("params.yaml").experts["same"].task in ("task0", "task1")


def _add(name, experts, labels):
    _tables(Path("tables") / name, labels)
    assert cli(["expert", "add", name, "--path", str(experts[name]), "--task", name, "--data", f"tables/{name}",
                "--no-event"]) == 0


def test_incremental_add_keeps_the_shared_expert_frozen_until_remerge(project, capsys):
    root, _, experts = project
    text = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(text + "merge:\n  incremental: true   # frozen shared expert\n")
    _add("task1", experts, 3)
    params = load_params("params.yaml")
    assert params.merge.experts == ["task0"] and params.shared_experts == ["task0"]
    assert "incremental mode: the shared expert stays as it is (task0)" in capsys.readouterr().out
    _add("task2", experts, 4)  # the pinned list stays pinned: task1 and task2 both outside
    assert load_params("params.yaml").shared_experts == ["task0"]
    assert "# frozen shared expert" in (root / "params.yaml").read_text()
    pinned = (root / "params.yaml").read_text()
    assert cli(["expert", "remerge"]) == 0
    assert "adds task1, task2 to the shared expert" in capsys.readouterr().out
    assert (root / "params.yaml").read_text() == pinned.replace("experts: [task0]", "experts: null")
    params = load_params("params.yaml")
    assert params.merge.experts is None and params.shared_experts == ["task0", "task1", "task2"]
    assert cli(["expert", "remerge"]) == 0
    assert "all were merged already" in capsys.readouterr().out


def test_remerge_after_re_merges_on_the_nth_outside_expert(project):
    root, _, experts = project
    text = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(text + "merge: {incremental: true, remerge_after: 2}\n")
    _add("task1", experts, 3)
    assert load_params("params.yaml").shared_experts == ["task0"]  # 1 outside: frozen
    _add("task2", experts, 4)
    assert load_params("params.yaml").merge.experts is None  # 2 outside: full re-merge


def test_merge_experts_must_be_registered(project, capsys):
    root, _, _ = project
    text = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(text + "merge: {experts: [task0, gone]}\n")
    with pytest.raises(ParamsError, match=r"^params.yaml: merge.experts: gone not registered under experts"):
        load_params("params.yaml")
    (root / "params.yaml").write_text(text + "merge: {experts: []}\n")
    with pytest.raises(ParamsError, match=r"^params.yaml: merge.experts: list each expert once"):
        load_params("params.yaml")
