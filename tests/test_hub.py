"""Hub downloads through the real huggingface_hub client against a local Hub (tests/hub_server.py).

huggingface_hub reads HF_ENDPOINT into its constants at import, so the project's code runs in a subprocess with
HF_ENDPOINT pointing at the local server, HF_HUB_OFFLINE=0, an isolated HF_HOME and no token. Starting one costs
seconds (torch, transformers), so two module fixtures each run one: `fetched` calls `fetch_hub` for one job per
scenario, and `cli_run` runs `twinmerge expert add` / `download hub` commands in a scratch project; the tests
check their results and the server's request log (faults are per repo, so scenarios do not touch each other).

Served: `org/tiny-bert` (a tiny BERT classifier with tokenizer files, pickles beside the safetensors, and a second
checkpoint in `sub/`; `main` -> commit C1, an older commit C0 whose `sub/` differs), the same files as
`org/flaky-bert` (first model_info, weights GET and config HEAD answer 503), `org/down-bert` (model_info always
503) and `org/cdn-down-bert` (weights GET always 503), and `org/tiny-bert-lora` (a PEFT LoRA adapter of the tiny
base, with a pickled copy of its weights).
"""
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from hub_server import FakeHub
from tiny_models import add_word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
BERT, FLAKY, DOWN, CDN_DOWN, LORA = ("org/tiny-bert", "org/flaky-bert", "org/down-bert", "org/cdn-down-bert",
                                     "org/tiny-bert-lora")
C0, C1, L1 = (hashlib.sha1(name.encode()).hexdigest() for name in ("c0", "c1", "lora1"))
MARK = "=== job "  # printed to stdout and stderr before each job of a subprocess

# fetch_hub (huggingface_hub's own HfApi and snapshot_download) for each job of argv[1]; last stdout line: one
# JSON list, {"record": the source.json record} or {"error": the SourceError's message} per job.
FETCH = f"""
import json, logging, sys
from tasks.download import fetch_hub
from tasks.params import HubSource
from twinmerge.errors import SourceError
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
results = []
for i, job in enumerate(json.loads(sys.argv[1])):
    print("{MARK}%d" % i, file=sys.stderr, flush=True)
    try:
        results.append({{"record": fetch_hub(HubSource(**job["source"]), job["out"], retry_delay=job["delay"])}})
    except SourceError as e:
        results.append({{"error": str(e)}})
print(json.dumps(results))
"""

# `twinmerge ARGV` (tasks.cli.main, as the console script) for each ARGV of argv[1], in one interpreter; last
# stdout line: one JSON list of {"rc", "params": params.yaml after the command}.
CLI = f"""
import json, sys
from tasks.cli import main
results = []
for i, argv in enumerate(json.loads(sys.argv[1])):
    print("{MARK}%d" % i, flush=True)
    print("{MARK}%d" % i, file=sys.stderr, flush=True)
    rc = main(argv)
    sys.stdout.flush(); sys.stderr.flush()
    results.append({{"rc": rc, "params": open("params.yaml").read()}})
print(json.dumps(results))
"""


def _files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    """{relative path: bytes} of every file under `folder`."""
    return {prefix + p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _pickle(tensors: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()


def _sections(text: str) -> list[list[str]]:
    """A subprocess output split at the MARK lines: the lines of each job."""
    out = []
    for line in text.splitlines():
        if line.startswith(MARK):
            out.append([])
        elif out:
            out[-1].append(line)
    return out


def _of(hub: FakeHub, repo: str) -> list:
    """The requests `hub` got for `repo` (API, resolve and CDN paths)."""
    return [r for r in hub.requests if f"/{repo}/" in r.path + "/"]


@pytest.fixture(scope="module")
def served(tiny_bert, tmp_path_factory):
    """(repos, refs, {name: local folder of what is served}) for a FakeHub."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import BertForSequenceClassification

    base, experts = tiny_bert
    tmp = tmp_path_factory.mktemp("hub")
    bert = tmp / "bert"
    shutil.copytree(experts["task0"], bert)
    add_word_tokenizer(bert)
    top = _files(bert)
    top.update({"pytorch_model.bin": _pickle(load_file(bert / "model.safetensors")), "training_args.bin": b"pickle",
                "README.md": b"# tiny-bert\n",
                ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
    c0 = {**top, **_files(experts["task2"], "sub/")}
    c1 = {**top, **_files(experts["task1"], "sub/"), "sub/pytorch_model.bin": b"pickle"}

    torch.manual_seed(5)
    model = BertForSequenceClassification.from_pretrained(base, num_labels=2)
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, lora_dropout=0.0,
                                                  target_modules=["query", "value"]))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:  # LoRA factors and the head (modules_to_save)
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    lora = tmp / "lora"
    peft_model.save_pretrained(lora)
    adapter = {**_files(lora), "adapter_model.bin": _pickle(load_file(lora / "adapter_model.safetensors"))}
    repos = {BERT: {C0: c0, C1: c1}, FLAKY: {C1: c1}, DOWN: {C1: c1}, CDN_DOWN: {C1: c1}, LORA: {L1: adapter}}
    refs = {**{repo: {"main": C1} for repo in (BERT, FLAKY, DOWN, CDN_DOWN)}, LORA: {"main": L1}}
    return repos, refs, {"bert": bert, "sub_c0": experts["task2"], "lora": lora, "base": base,
                         "task0": experts["task0"]}


def _run(hub: FakeHub, args: list[str], home: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`python ARGS` in the environment of a user pointed at the local Hub (online, no token, own cache)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_", "PREFECT_API"))}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_IMPLICIT_TOKEN="1", DO_NOT_TRACK="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def fetched(served, tmp_path_factory):
    """One subprocess, one fetch_hub call per scenario: {job: {"result", "log" (its stderr lines), "out"}} and the
    (stopped) FakeHub with its request log."""
    repos, refs, _ = served
    tmp = tmp_path_factory.mktemp("fetched")
    jobs = {"main": ({"repo_id": BERT}, 0.01), "sub": ({"repo_id": BERT, "subfolder": "sub", "revision": C0}, 0.01),
            "flaky": ({"repo_id": FLAKY}, 0.05), "down": ({"repo_id": DOWN}, 0.01),
            "cdn_down": ({"repo_id": CDN_DOWN, "revision": C1}, 0.01), "missing": ({"repo_id": "org/missing"}, 0.01)}
    with FakeHub(repos, refs) as hub:
        hub.fail(f"/api/models/{FLAKY}/revision/main")  # the first answer of each: 503
        hub.fail(f"/lfs/{FLAKY}/", method="GET")
        hub.fail(f"/{FLAKY}/resolve/{C1}/config.json", method="HEAD")
        hub.fail(f"/api/models/{DOWN}/", times=None)  # every answer: 503
        hub.fail(f"/lfs/{CDN_DOWN}/", times=None, method="GET")
        spec = [{"source": source, "out": str(tmp / name), "delay": delay} for name, (source, delay) in jobs.items()]
        proc = _run(hub, ["-c", FETCH, json.dumps(spec)], tmp / "hf", tmp)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    logs = _sections(proc.stderr)
    return {name: {"result": results[i], "log": logs[i], "out": tmp / name} for i, name in enumerate(jobs)}, hub


@pytest.fixture(scope="module")
def cli_run(served, tmp_path_factory):
    """One subprocess in a scratch project (tiny base, expert task0, 2-label task tables): `expert add` of
    org/tiny-bert at a revision that does not exist, `expert add lora0 --repo-id org/tiny-bert-lora`, then
    `download hub --name lora0` (stage hub_fetch). Returns (project, original params.yaml text,
    [{"rc", "params", "stdout", "stderr" (lines)}] per command, the stopped FakeHub)."""
    repos, refs, local = served
    project = tmp_path_factory.mktemp("project")
    tables = project / "tables" / "task0"
    tables.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        pd.DataFrame({"text": ["w1 w2", "w3"], "label": [0, 1]}).to_parquet(tables / f"{split}.parquet")
    (tables / "labels.json").write_text(json.dumps({"0": "c0", "1": "c1"}))
    params = (f"seed: 0\nbase:\n  path: {local['base']}\nhub_sources: {{}}\n"
              f"experts:\n  task0: {{path: {local['task0']}, task: task0, data: tables/task0}}\n")
    (project / "params.yaml").write_text(params)
    common = ["--task", "task0", "--data", "tables/task0", "--no-event"]
    commands = [["expert", "add", "x", "--repo-id", BERT, "--revision", "nope", *common],
                ["expert", "add", "lora0", "--repo-id", LORA, *common],
                ["download", "hub", "--name", "lora0"]]
    with FakeHub(repos, refs) as hub:
        proc = _run(hub, ["-c", CLI, json.dumps(commands)], project / ".hf", project)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    outs, errs = _sections(proc.stdout), _sections(proc.stderr)
    outs[-1] = outs[-1][:-1]  # the JSON line
    return project, params, [{**r, "stdout": o, "stderr": e} for r, o, e in zip(results, outs, errs)], hub


def test_fetch_main_pins_commit_and_fetches_only_the_checkpoint(served, fetched):
    """revision main -> C1: the folder's checkpoint files byte for byte (safetensors, config, tokenizer), the
    commit in source.json, every file request pinned to the commit; no pickle and no file of another folder is
    ever requested. A subfolder at a pinned older commit gets that commit's files, with no branch warning."""
    _, _, local = served
    jobs, hub = fetched
    main, sub = jobs["main"], jobs["sub"]
    assert main["result"] == {"record": {"repo_id": BERT, "subfolder": None, "revision": "main", "commit": C1}}
    assert sub["result"] == {"record": {"repo_id": BERT, "subfolder": "sub", "revision": C0, "commit": C0}}
    served_top = _files(local["bert"])
    assert sorted(served_top) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                  "vocab.txt"]
    assert _files(main["out"]) == {**served_top, "source.json": (main["out"] / "source.json").read_bytes()}
    assert json.loads((main["out"] / "source.json").read_text())["commit"] == C1
    assert _files(sub["out"]) == {**_files(local["sub_c0"]), "source.json": (sub["out"] / "source.json").read_bytes()}
    assert sum(f"revision 'main' is a branch or tag, resolved to commit {C1}" in line for line in main["log"]) == 1
    assert not [line for line in sub["log"] if "branch or tag" in line]  # a commit does not move

    requests = _of(hub, BERT)
    assert [r.path for r in requests if r.path.startswith("/api/")] == [
        f"/api/models/{BERT}/revision/main", f"/api/models/{BERT}/tree/{C1}",
        f"/api/models/{BERT}/revision/{C0}", f"/api/models/{BERT}/tree/{C0}"]
    heads = sorted(r.path.split("/resolve/")[1] for r in requests if r.method == "HEAD")
    assert heads == sorted([f"{C1}/{name}" for name in served_top]  # pinned: "main" is never sent again
                           + [f"{C0}/sub/config.json", f"{C0}/sub/model.safetensors"])
    assert not [r for r in requests if r.path.endswith(".bin")]  # pickles: never asked for, not even a HEAD
    weights = sorted(r.path.rsplit("/", 1)[1] for r in requests if r.path.startswith("/lfs/"))
    assert weights == ["model.safetensors", "model.safetensors"]  # top level at C1, sub/ at C0: one GET each
    assert {(r.status, r.auth) for r in requests} == {(200, False), (302, False)}  # no error, no token sent


def test_transient_503_is_retried(served, fetched):
    """A 503 on model_info and on the weights download (the CDN GET) is retried by fetch_hub's backoff, a 503 on
    a file's HEAD by the client itself: the fetch succeeds with the served bytes, each retry in the log."""
    _, _, local = served
    jobs, hub = fetched
    flaky = jobs["flaky"]
    assert flaky["result"] == {"record": {"repo_id": FLAKY, "subfolder": None, "revision": "main", "commit": C1}}
    assert _files(flaky["out"]) == {**_files(local["bert"]), "source.json": (flaky["out"] / "source.json").read_bytes()}
    requests = _of(hub, FLAKY)
    info = f"/api/models/{FLAKY}/revision/main"
    assert [(r.method, r.status) for r in requests if r.path == info] == [("GET", 503), ("GET", 200)]
    weights = [r for r in requests if r.path.startswith("/lfs/")]
    assert [(r.method, r.status) for r in weights] == [("GET", 503), ("GET", 200)]
    assert weights[0].path == weights[1].path and weights[0].path.endswith("/model.safetensors")
    config = f"/{FLAKY}/resolve/{C1}/config.json"
    assert [(r.method, r.status) for r in requests if r.path == config] == [("HEAD", 503), ("HEAD", 200),
                                                                            ("GET", 200)]
    retried = [line for line in flaky["log"] if "attempt 1 failed" in line]
    assert len(retried) == 2 and "retrying in 0s" in retried[0]  # model_info, then snapshot_download
    assert "503 Service Unavailable" in retried[0] and "503 Service Unavailable" in retried[1]


def test_permanent_errors_fail_in_one_line(fetched):
    """A Hub that keeps answering 503 (to model_info, or to the weights download) fails after fetch_hub's 4
    attempts; a repo that does not exist fails at once (a 404 is not retried). Each: a one-line SourceError
    naming the repo and revision, and no output folder."""
    jobs, hub = fetched
    errors = {name: jobs[name]["result"]["error"] for name in ("down", "cdn_down", "missing")}
    assert all(len(e.splitlines()) == 1 for e in errors.values()), errors
    assert errors["down"] == (f"hub {DOWN}@main: failed after 4 attempts: HfHubHTTPError: Server error '503 Service "
                              f"Unavailable' for url '{hub.url}/api/models/{DOWN}/revision/main' For more "
                              "information check: https://developer.mozilla.org/en-US/docs/Web/HTTP/Status/503 "
                              "injected 503")
    assert errors["cdn_down"].startswith(f"hub {CDN_DOWN}@{C1}: failed after 4 attempts: HfHubHTTPError: Server "
                                         f"error '503 Service Unavailable' for url '{hub.cdn_url}/lfs/{CDN_DOWN}/")
    assert errors["missing"].startswith(
        "hub org/missing@main: RepositoryNotFoundError: 404 Client Error. Repository Not Found for url: "
        f"{hub.url}/api/models/org/missing/revision/main.")
    assert [r.status for r in _of(hub, DOWN)] == [503] * 4
    assert len([r for r in _of(hub, CDN_DOWN) if r.path.startswith("/lfs/")]) == 4  # one weights GET per attempt
    assert [(r.path, r.status) for r in _of(hub, "org/missing")] == [
        ("/api/models/org/missing/revision/main", 404)]
    assert not [name for name in errors if jobs[name]["out"].exists()]


def test_expert_add_lora_adapter_from_hub_then_hub_fetch(served, cli_run):
    """`twinmerge expert add NAME --repo-id` downloads the adapter through the real client (no pickle), validates
    it against the base and registers the Hub source (the branch it tracks; the commit it resolved is logged);
    `twinmerge download hub` (stage hub_fetch) then fetches the same commit into data/hub/NAME, which
    twinmerge.lora reads as the served adapter."""
    from twinmerge.lora import read_adapter

    _, _, local = served
    project, _, (_, add, fetch), hub = cli_run
    assert (add["rc"], fetch["rc"]) == (0, 0), add["stderr"] + fetch["stderr"]
    entry = {"path": "data/hub/lora0", "task": "task0", "data": "tables/task0", "metric": "accuracy"}
    assert add["stdout"][0] == f"expert lora0 added to params.yaml: {json.dumps(entry)}"
    written = yaml.safe_load(add["params"])
    assert written["experts"]["lora0"] == entry
    assert written["hub_sources"] == {"lora0": {"repo_id": LORA, "revision": "main"}}
    assert fetch["params"] == add["params"]
    for step in (add, fetch):  # each download resolved main to the served commit
        assert sum(f"revision 'main' is a branch or tag, resolved to commit {L1}" in line
                   for line in step["stderr"]) == 1
    assert sorted(os.listdir(project / "data/hub")) == ["lora0"]  # add's validation copy is not kept

    fetched = project / "data/hub/lora0"
    assert json.loads((fetched / "source.json").read_text()) == {"repo_id": LORA, "subfolder": None,
                                                                  "revision": "main", "commit": L1}
    assert _files(fetched) == {"adapter_config.json": (local["lora"] / "adapter_config.json").read_bytes(),
                               "adapter_model.safetensors": (local["lora"] / "adapter_model.safetensors").read_bytes(),
                               "source.json": (fetched / "source.json").read_bytes()}
    got, want = read_adapter(fetched), read_adapter(local["lora"])
    assert sorted(got.modules) == sorted(want.modules) and len(got.modules) == 4  # query, value x 2 layers
    assert all(torch.equal(got.modules[k].delta(), want.modules[k].delta()) for k in want.modules)
    assert sorted(got.saved) == ["classifier.bias", "classifier.weight"]

    requests = _of(hub, LORA)
    assert [r.path for r in requests if r.path.startswith("/api/")] == 2 * [
        f"/api/models/{LORA}/revision/main", f"/api/models/{LORA}/tree/{L1}"]
    assert sorted(r.path for r in requests if r.method == "HEAD") == sorted(
        2 * [f"/{LORA}/resolve/{L1}/adapter_config.json", f"/{LORA}/resolve/{L1}/adapter_model.safetensors"])
    assert not [r for r in requests if r.path.endswith((".bin", "README.md"))]
    assert {(r.status, r.auth) for r in requests} == {(200, False), (302, False)}


def test_unknown_revision_fails_in_one_line_and_params_untouched(cli_run):
    """`expert add --revision nope`: the Hub's RevisionNotFound -> exit 2, one error line naming the repo and the
    revision and nothing else on stderr, asked once (a 404 is not retried), params.yaml
    unchanged."""
    _, params, (nope, _, _), hub = cli_run
    assert nope["rc"] == 2 and nope["params"] == params and nope["stdout"] == []
    assert nope["stderr"] == [
        f"twinmerge expert: error: hub {BERT}@nope: RevisionNotFoundError: 404 Client Error. Revision Not Found "
        f"for url: {hub.url}/api/models/{BERT}/revision/nope. Invalid rev id: nope"]  # no HTTP client log line
    assert [(r.path, r.status) for r in _of(hub, BERT)] == [(f"/api/models/{BERT}/revision/nope", 404)]
