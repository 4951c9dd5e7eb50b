"""flows/watch.py: change detection, the run-only-on-change rule, Hub revisions, the file lock, serve wiring.

The body of the flow (`check_and_run_impl`) is called directly with the pipeline flow monkeypatched, so no
Prefect server and no DVC run are needed; tests/test_e2e_incremental.py runs the real thing."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from flows import watch
from flows.lock import LOCK_PATH
from tasks import registry
from tasks.params import load_params


class FakeApi:
    def __init__(self, sha):
        self.sha = sha

    def model_info(self, repo_id, revision="main"):
        if self.sha is None:
            raise ConnectionError("offline")
        return type("Info", (), {"sha": self.sha})()


@pytest.fixture
def project(tmp_path, tiny_bert, monkeypatch):
    base, experts = tiny_bert
    local = tmp_path / "models" / "task0"
    shutil.copytree(experts["task0"], local)
    hub = tmp_path / "data" / "hub" / "remote"
    shutil.copytree(experts["task1"], hub)
    (hub / "source.json").write_text(json.dumps({"repo_id": "org/m", "revision": "main", "commit": "aaa"}))
    (tmp_path / "params.yaml").write_text(textwrap.dedent(f"""\
        base: {{path: {base}}}
        hub_sources:
          remote: {{repo_id: org/m, revision: main}}
        experts:
          task0: {{path: models/task0, task: task0, data: tables/task0}}
          remote: {{path: data/hub/remote, task: task1, data: tables/task1}}
        """))
    calls = {"pipeline": [], "forced": [], "stale": []}
    monkeypatch.setattr(watch, "pipeline", lambda **kw: calls["pipeline"].append(kw) or {"ran": [], "cached": []})
    monkeypatch.setattr(watch, "stale_stages", lambda project: list(calls["stale"]))
    return tmp_path, calls


def _check(root, calls, sha="aaa"):
    return watch.check_and_run_impl(str(root), api=FakeApi(sha),
                                    force_stage=lambda stage, project: calls["forced"].append(stage))


def test_runs_once_for_new_experts_then_cron_check_does_nothing(project):
    root, calls = project
    first = _check(root, calls)
    assert first["ran"] and first["changes"] == {"task0": "new", "remote": "new"}
    assert len(calls["pipeline"]) == 1 and calls["pipeline"][0]["project"] == str(root.resolve())
    state = json.loads((root / registry.STATE_PATH).read_text())
    assert state["experts"]["remote"]["hash"] == "commit:aaa"
    second = _check(root, calls)
    assert second == {"ran": False, "changes": {}, "stale": [], "forced": []}
    assert len(calls["pipeline"]) == 1 and not calls["forced"]


def test_changed_local_expert_or_stale_dvc_triggers_a_run(project):
    root, calls = project
    _check(root, calls)
    config = root / "models" / "task0" / "config.json"
    config.write_text(config.read_text().replace("}", ', "finetuned": "again"}', 1))
    assert _check(root, calls)["changes"] == {"task0": "changed"}
    assert len(calls["pipeline"]) == 2
    calls["stale"] = ["compress@task0"]
    assert _check(root, calls)["stale"] == ["compress@task0"] and len(calls["pipeline"]) == 3


def test_new_hub_commit_forces_hub_fetch(project):
    root, calls = project
    _check(root, calls)
    result = _check(root, calls, sha="bbb")
    assert result["changes"] == {"remote": "changed"} and result["forced"] == ["hub_fetch@remote"]
    assert calls["forced"] == ["hub_fetch@remote"] and len(calls["pipeline"]) == 2


def test_unreachable_hub_is_not_a_change(project):
    root, calls = project
    _check(root, calls)
    assert _check(root, calls, sha=None)["ran"] is False
    assert not calls["forced"]


def test_removed_expert_triggers_a_run(project):
    root, calls = project
    _check(root, calls)
    text = (root / "params.yaml").read_text().replace("  task0: {path: models/task0, task: task0, data: tables/task0}\n", "")
    (root / "params.yaml").write_text(text)
    assert _check(root, calls)["changes"] == {"task0": "removed"}


def test_lock_held_ends_without_work(project):
    root, calls = project
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from flows.lock import pipeline_lock
        with pipeline_lock({str(root)!r}):
            print("held", flush=True)
            time.sleep(30)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = _check(root, calls)
        assert result["ran"] is False
        assert result["skipped"].startswith(f"another pipeline run holds {(root / LOCK_PATH).resolve()}: "
                                            f"pid {holder.pid} on ")
        assert " since 20" in result["skipped"]
        assert not calls["pipeline"]
    finally:
        holder.kill()
        holder.wait()
    assert _check(root, calls)["ran"] is True  # released when the holder dies


def test_serve_wires_cron_trigger_and_concurrency(project, monkeypatch):
    from flows import serve as serve_mod

    root, _ = project
    seen = {}
    monkeypatch.setattr(watch.check_and_run, "serve", lambda **kw: seen.update(kw))
    serve_mod.serve(str(root), cron="*/5 * * * *")
    trigger = seen["triggers"][0]
    assert trigger.expect == {"expert.added"} and trigger.parameters["project"] == str(root.resolve())
    assert seen["schedules"][0].cron == "*/5 * * * *"
    assert seen["global_limit"].limit == 1
    seen.clear()
    serve_mod.serve(str(root))
    assert seen["schedules"][0].cron == load_params(root / "params.yaml").watch.cron == "0 * * * *"
