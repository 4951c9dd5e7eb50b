"""Hostile params.yaml (e.g. from an untrusted branch): names, write paths, shell injection.

Every test runs in a temporary project folder `tmp_path/project` beside a `tmp_path/outside` folder with a
file in it, and checks that the step fails with one line naming the file and the field, and that nothing
appeared or changed outside the project (no marker file anywhere, `outside` untouched).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.cli import main as cli
from tasks.params import NAME_RULE, Params, ParamsError, check_name, inside_project, load_params, stage_item

REPO = Path(__file__).resolve().parents[1]
MARKER = "pwned_marker"
INJECTIONS = [f"x$(touch {MARKER})", f"x`touch {MARKER}`", f"x'$(touch {MARKER})'", f"x;touch {MARKER}"]
BAD_NAMES = INJECTIONS + ["-rf", "_x", "../x", "/abs/x", "a/b", "a.b", "a b", "ünï", "x\n", ""]


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = tmp_path / "project"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep.txt").write_text("precious\n")
    monkeypatch.chdir(root)
    return root


def _valid() -> dict:
    """A complete valid params dict (every key dvc.yaml interpolates), no registry sources."""
    full = Params.model_validate({"base": {"path": "models/base"},
                                  "experts": {"ok": {"path": "models/ok", "task": "ok", "data": "tables/ok"}}})
    raw = full.model_dump(mode="json")
    raw["data"].update(pypi={}, debian={}, tasks=[])
    return raw


def _outside_untouched(project: Path) -> None:
    tmp = project.parent
    assert not [p for p in tmp.rglob(f"*{MARKER}*")], "an injected command ran"
    assert sorted(p.relative_to(tmp).as_posix() for p in tmp.iterdir()) == ["outside", "project"]
    assert [p.name for p in (tmp / "outside").iterdir()] == ["keep.txt"]
    assert (tmp / "outside" / "keep.txt").read_text() == "precious\n"


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------------------ names
def _with_name(raw: dict, where: str, name: str) -> dict:
    if where == "experts":
        raw["experts"][name] = raw["experts"].pop("ok")
    elif where == "hub_sources":
        raw["hub_sources"][name] = {"repo_id": "org/model"}
    elif where == "experts.ok.task":
        raw["experts"]["ok"]["task"] = name
    elif where == "merge.method":
        raw["merge"]["method"] = name
    elif where == "methods.static":
        raw["methods"] = {"static": {name: {"method": "weight_average"}}}
    elif where == "methods.static.x.method":
        raw["methods"] = {"static": {"x": {"method": name}}}
    elif where in ("data.pypi", "data.debian"):
        raw["data"][where.split(".")[1]][name] = {"version": "1.0"}
    return raw


NAME_FIELDS = ["experts", "hub_sources", "experts.ok.task", "merge.method", "methods.static",
               "methods.static.x.method"]


@pytest.mark.parametrize("where,name", [(w, n) for w in NAME_FIELDS for n in BAD_NAMES]
                         + [(w, n) for w in ("data.pypi", "data.debian") for n in BAD_NAMES
                            if n != "a.b"])  # package names may have dots (zope.interface)
def test_every_name_in_params_passes_one_rule(project, where, name):
    (project / "params.yaml").write_text(yaml.safe_dump(_with_name(_valid(), where, name)))
    with pytest.raises(ParamsError) as e:
        load_params("params.yaml")
    msg = _one_line(str(e.value))
    assert msg.startswith(f"params.yaml: {where}: name {name!r} is not allowed")
    _outside_untouched(project)


def test_the_rule_is_ascii_and_anchored():
    for good in ("movie", "fortune_topic", "cola-2", "A1"):
        assert check_name(good) == good
    for bad in BAD_NAMES:
        assert not NAME_RULE.fullmatch(bad)
        with pytest.raises(ParamsError, match="not allowed"):
            check_name(bad)


@pytest.mark.parametrize("name", ["x$(touch pwned_marker)", "../x", "ünï"])
def test_expert_add_uses_the_same_rule(project, capsys, name):
    (project / "params.yaml").write_text(yaml.safe_dump(_valid()))
    before = (project / "params.yaml").read_bytes()
    assert cli(["expert", "add", name, "--path", "models/x", "--task", "t", "--data", "tables/t",
                "--no-event"]) == 2
    assert _one_line(capsys.readouterr().err).startswith(f"twinmerge expert: error: expert add: name {name!r}")
    assert cli(["expert", "add", "x", "--path", "models/x", "--task", name, "--data", "tables/t",
                "--no-event"]) == 2
    assert "not allowed" in _one_line(capsys.readouterr().err)
    assert (project / "params.yaml").read_bytes() == before
    _outside_untouched(project)


# -------------------------------------------------------------------------------------------------- injection
def test_dvc_yaml_passes_no_params_text_to_the_shell():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    cmds = {name: (s.get("do") or s)["cmd"] for name, s in stages.items()}
    assert all("${" not in cmd for cmd in cmds.values()), cmds


def _dvc_project(root: Path, key: str) -> None:
    """A git+DVC project with the repository's dvc.yaml and one expert named `key` whose deps exist."""
    raw = _valid()
    raw["experts"] = {key: {"path": "models/e", "task": "t", "data": "tables/e"}}
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    (root / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    for f in ("tasks/download.py", "twinmerge/io.py", "twinmerge/lora.py", "artifacts/base/config.json",
              "models/e/config.json", "tables/e/labels.json"):
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("{}")
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)


@pytest.mark.parametrize("key", [INJECTIONS[0], INJECTIONS[2]])  # the second escapes '${key}' quoting too
def test_dvc_repro_of_a_hostile_expert_key_runs_nothing(project, key):
    _dvc_project(project, key)
    env = {**os.environ, "PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", f"download@{key}"],
                          cwd=project, env=env, capture_output=True, text=True)
    _outside_untouched(project)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "> twinmerge download expert\n" in out  # what DVC handed to the shell: no name in it
    error = [ln for ln in out.splitlines() if ln.startswith("twinmerge download: error:")]
    assert error == [f"twinmerge download: error: params.yaml: experts: name {key!r} is not allowed: use ASCII "
                     "letters, digits, '_' or '-', starting with a letter or digit"]


def test_twinmerge_run_validates_params_before_any_stage(project, capsys):
    raw = _valid()
    raw["experts"][INJECTIONS[0]] = raw["experts"].pop("ok")
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    assert cli(["run", "--project", str(project)]) == 2
    assert "experts: name 'x$(touch pwned_marker)' is not allowed" in _one_line(capsys.readouterr().err)
    _outside_untouched(project)


@pytest.mark.parametrize("step", [["download", "expert"], ["download", "hub"], ["compress"], ["train-expert"]])
def test_foreach_steps_take_their_item_from_dvc_stage(project, monkeypatch, capsys, step):
    (project / "params.yaml").write_text(yaml.safe_dump(_valid()))
    stage = {"expert": "download", "hub": "hub_fetch", "compress": "compress", "train-expert": "train_expert"}
    monkeypatch.setenv("DVC_STAGE", f"{stage[step[-1]]}@{INJECTIONS[0]}")
    assert cli(step) == 2
    assert _one_line(capsys.readouterr().err).endswith(f"name {INJECTIONS[0]!r} is not allowed: use ASCII "
                                                       "letters, digits, '_' or '-', starting with a letter or digit")
    monkeypatch.delenv("DVC_STAGE")
    assert cli(step) == 2  # neither the option nor a DVC stage: say which option
    assert "error: give --" in _one_line(capsys.readouterr().err)
    _outside_untouched(project)


def test_stage_item_is_the_option_or_the_item_of_this_step_stage(monkeypatch):
    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert stage_item("movie", "download", "--name") == "movie"
    for addressed, item in (("download@movie", "movie"), ("sub/dvc.yaml:download@cola-2", "cola-2")):
        monkeypatch.setenv("DVC_STAGE", addressed)
        assert stage_item(None, "download", "--name") == item
    for other in ("compress@movie", "download_base", "download@a:download@movie"):
        monkeypatch.setenv("DVC_STAGE", other)
        with pytest.raises(ParamsError, match="give --name|not allowed"):
            stage_item(None, "download", "--name")


# ------------------------------------------------------------------------------------------------------ paths
def test_inside_project_is_checked_on_the_text(tmp_path):
    root = tmp_path / "p"
    for ok in ("data/raw", "./data", "data/../data/x", str(root / "data"), "."):
        assert inside_project(ok, "f", root=root) == Path(ok)
    for bad in ("..", "../x", "data/../../x", "/abs/x", str(tmp_path / "outside"), str(tmp_path / "p2")):
        with pytest.raises(ParamsError, match=r"^params.yaml: f: .* is outside the project"):
            inside_project(bad, "f", root=root)


@pytest.mark.parametrize("field,value", [("data.raw_dir", "OUTSIDE"), ("data.raw_dir", "../outside"),
                                         ("data.tasks_dir", "../outside"), ("data.tasks_dir", "OUTSIDE"),
                                         ("zoo.experts_dir", "../outside")])
def test_steps_never_write_outside_the_project(project, capsys, field, value):
    """fetch (no sources: it would swap `outside` for a folder with a manifest), prepare (no tasks: it would
    write summary.json there) and train-expert refuse before any I/O."""
    value = str(project.parent / "outside") if value == "OUTSIDE" else value
    raw = _valid()
    section, key = field.split(".")
    raw[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    step = {"data.raw_dir": ["fetch"], "data.tasks_dir": ["prepare"],
            "zoo.experts_dir": ["train-expert", "--task", "movie"]}[field]
    assert cli(step) == 2
    assert _one_line(capsys.readouterr().err) == (
        f"twinmerge {step[0]}: error: params.yaml: {field}: {value!r} is outside the project {project} "
        "(steps write only inside it)")
    _outside_untouched(project)
    assert sorted(p.name for p in project.iterdir()) == ["params.yaml"]
