"""PEFT LoRA adapters as experts, low-rank exclusive SVD, and exclusive knowledge exported as PEFT adapters.

Reading (`read_adapter`, `LoraExpert`): a PEFT LoRA adapter folder (`adapter_config.json` +
`adapter_model.safetensors`; pickles are refused) trained on a base model is presented as a lazily materialised
full checkpoint: tensor k = base[k] + Delta W_k for LoRA target modules, the saved value for `modules_to_save`
(heads) and trained biases (`bias: all | lora_only`), base[k] otherwise. Delta W = scaling * B @ A with
scaling = lora_alpha / r (lora_alpha / sqrt(r) with `use_rslora`), r and alpha per module from `rank_pattern` /
`alpha_pattern` (matched as PEFT does), transposed for `fan_in_fan_out` (GPT-2 Conv1D) and for embeddings
(`lora_embedding_A/B`). `twinmerge.io.ExpertSet` opens an expert folder holding `adapter_config.json` this way,
so a LoRA expert works wherever a full expert folder does. The same computation as PEFT's `merge_and_unload`.

Low-rank SVD (`lowrank_svd`, `lowrank_exclusive`): for LoRA experts and a linear shared merge
theta_s = theta_0 + sum_s lambda_s Delta W_s, v_t = Delta W_t - sum_s lambda_s Delta W_s = L @ R with
L = [B_t, -lambda_1 B_1, ...] [m, K] and R = [A_t; A_1; ...] [K, n]; its SVD comes from two thin QRs and the SVD
of a K x K core, never forming the m x n matrix.

Export (`export_peft_adapter(s)`): an expert's exclusive factors U S V^T become a standard PEFT LoRA adapter
(scaling 1: lora_alpha = r per module), loadable with `peft.PeftModel.from_pretrained(shared_model, folder)`:
  - nn.Linear weight deltas: lora_B = U * S [m, k], lora_A = V^T [k, n] (a dense 2-D delta D as the exact pair
    (I, D) or (D, I)); Linear bias deltas: `bias: lora_only`, the full bias theta_s + db saved as PEFT does
    (a Linear with a bias delta only gets a zero rank-1 LoRA so that its bias is saved);
  - nn.Embedding deltas: PEFT's embedding LoRA, lora_embedding_A = (U S)^T [k, num_embeddings],
    lora_embedding_B = V [dim, k];
  - anything else PEFT LoRA cannot express (LayerNorm gamma/beta, other module types): the whole module in
    `modules_to_save` with its full values theta_s + v_t (needs theta_s: the `shared` argument);
  - heads: `modules_to_save` with the expert's head values; task_type SEQ_CLS.
The expert's labels go to `twinmerge_adapter.json` (a `config.json` beside the adapter would make transformers
treat the folder as a full model), which `LoraExpert` reads back.
"""
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .errors import CheckpointError, FactorError
from .io import Checkpoint, atomic_dir, is_causal_lm, save_safetensors_atomic, write_json_atomic

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "twinmerge_adapter.json"
PEFT_PREFIX = "base_model.model."
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
LABEL_FIELDS = ("num_labels", "id2label", "label2id", "problem_type")
HEAD_OUTPUTS = ("classifier.weight", "classifier.out_proj.weight", "score.weight")  # label count = rows

log = logging.getLogger(__name__)


def is_adapter_folder(folder: str | Path) -> bool:
    """Whether `folder` is a PEFT adapter folder (holds adapter_config.json)."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


@dataclass
class LoraModule:
    """One LoRA target module: Delta W = scaling * B @ A, transposed when `transpose` (fan_in_fan_out Linear or
    Conv1D, embeddings). `name` is the module path in the expert's naming; `bias` the lora_B bias (lora_bias)."""
    name: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    transpose: bool
    embedding: bool
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of Delta W (= of the module's weight)."""
        m, n = self.B.shape[0], self.A.shape[1]
        return (n, m) if self.transpose else (m, n)

    def delta(self, rows: slice | None = None) -> torch.Tensor:
        """Delta W (float32), or its `rows`; computed as PEFT's get_delta_weight (same operations and order)."""
        A, B = self.A.to(torch.float32), self.B.to(torch.float32)
        if self.transpose:
            return (B @ (A if rows is None else A[:, rows])).T * self.scaling
        return ((B if rows is None else B[rows]) @ A) * self.scaling

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_scaled [m, r], A [r, n]) float32 with Delta W = B_scaled @ A in the weight's orientation."""
        A, B = self.A.to(torch.float32), self.B.to(torch.float32)
        if self.transpose:
            return A.T * self.scaling, B.T.contiguous()
        return B * self.scaling, A


@dataclass
class LoraAdapter:
    """A parsed PEFT LoRA adapter folder. Names are relative to the PEFT-wrapped model (`base_model.model.`
    stripped): `modules` {module path: LoraModule}, `saved` {tensor name: full value} (modules_to_save, biases)."""
    folder: Path
    config: dict
    modules: dict[str, LoraModule]
    saved: dict[str, torch.Tensor]
    labels: dict


def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's `get_pattern_key`: the first pattern key k with re.match(rf"(.*\\.)?({k})$", module)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _weights_file(folder: Path) -> Path:
    path = folder / ADAPTER_WEIGHTS
    if path.is_file():
        return path
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{pickles[0]}: pickled adapter weights are refused (unsafe to load); "
                              f"convert them to {ADAPTER_WEIGHTS}")
    raise CheckpointError(f"{path}: adapter weights not found")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def read_adapter(folder: str | Path) -> LoraAdapter:
    """Read and validate a PEFT LoRA adapter folder (CheckpointError naming the file on any problem)."""
    folder = Path(folder)
    cfg_path = folder / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: adapter config not found")
    cfg = _read_json(cfg_path)
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    if cfg.get("use_dora"):
        raise CheckpointError(f"{cfg_path}: use_dora is not supported (DoRA is not a low-rank delta)")
    for field in ("target_parameters", "trainable_token_indices", "layer_replication"):
        if cfg.get(field):
            raise CheckpointError(f"{cfg_path}: {field} is not supported")
    if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
        raise CheckpointError(f"{cfg_path}: bias {cfg.get('bias')!r} is not supported (none, all, lora_only)")
    r_default, alpha_default = cfg.get("r"), cfg.get("lora_alpha")
    for field, value in (("r", r_default), ("lora_alpha", alpha_default)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise CheckpointError(f"{cfg_path}: {field} {value!r} is not a positive number")
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    weights = _weights_file(folder)
    try:
        with safe_open(weights, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types on corrupt files
        raise CheckpointError(f"{weights}: cannot read safetensors file ({exc})") from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise CheckpointError(f"{weights}: unexpected tensor {key} (PEFT names start with {PEFT_PREFIX})")
        if not t.is_floating_point():
            raise CheckpointError(f"{weights}: tensor {key} is not floating point ({t.dtype})")
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{weights}: tensor {key} has NaN/Inf values")
        name = key[len(PEFT_PREFIX):]
        if "lora_magnitude_vector" in name:
            raise CheckpointError(f"{weights}: tensor {key} is a DoRA magnitude (not supported)")
        m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B)",
                         name)
        if m:
            parts.setdefault(m.group(1), {})[m.group(2)] = t
        elif ".lora_" in name or name.startswith("lora_"):
            raise CheckpointError(f"{weights}: tensor {key} is an unsupported LoRA variant")
        else:  # a full value: modules_to_save (saved without ".modules_to_save.<adapter>") or a trained bias
            name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name).replace(".base_layer.", ".")
            saved[name] = t
    modules = {}
    for path, p in parts.items():
        embedding = "lora_embedding_A" in p or "lora_embedding_B" in p
        need = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        if not all(k in p for k in need) or (embedding and "lora_A.weight" in p):
            raise CheckpointError(f"{weights}: module {path} has {', '.join(sorted(p))}; needs {' and '.join(need)}")
        A, B = p[need[0]], p[need[1]]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise CheckpointError(f"{weights}: module {path}: lora A {list(A.shape)} and B {list(B.shape)} are not "
                                  "[r, in] and [out, r] (conv LoRA is not supported)")
        r = _pattern_value(rank_pattern, path, r_default)
        alpha = _pattern_value(alpha_pattern, path, alpha_default)
        if A.shape[0] != r:
            raise CheckpointError(f"{weights}: module {path} has rank {A.shape[0]}, {ADAPTER_CONFIG} says r={r}")
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        bias = p.get("lora_B.bias")
        modules[path] = LoraModule(path, A, B, scaling, embedding or bool(cfg.get("fan_in_fan_out")), embedding,
                                   None if bias is None else bias * scaling)
    return LoraAdapter(folder, cfg, modules, saved, _labels(folder))


def _labels(folder: Path) -> dict:
    """Label fields of the expert: from the folder's config.json, else twinmerge_adapter.json, else {}."""
    for file, where in (("config.json", None), (ADAPTER_META, "labels")):
        if (folder / file).is_file():
            data = _read_json(folder / file)
            data = data.get(where, {}) if where else data
            return {k: data[k] for k in LABEL_FIELDS if k in data}
    return {}


def _same_base(declared: str | None, candidates: Iterable[str | None]) -> bool:
    """Whether the adapter's base_model_name_or_path matches a base name: empty, equal, or equal basename
    (`google-bert/bert-base-uncased` ~ `/models/bert-base-uncased` ~ `google-bert--bert-base-uncased`)."""
    if not declared:
        return True
    def base(s: str) -> str:
        return Path(str(s).rstrip("/")).name.split("--")[-1]
    return any(c and (str(c) == declared or base(c) == base(declared)) for c in candidates)


def _causal_lm_adapter(adapter: "LoraAdapter", base: Checkpoint) -> bool:
    """Whether an adapter fine-tunes a whole causal LM: PEFT task_type CAUSAL_LM, or none given over a causal-LM
    base with no saved tensor the base lacks (a classifier's adapter saves its head, e.g. `score`). Then the
    expert is every tensor of the base, its untied output head (Llama's `lm_head`) included, not the backbone
    that a classifier's head sits on."""
    task = adapter.config.get("task_type")
    if task is not None:
        return task == "CAUSAL_LM"
    base_keys = set(base.keys())
    return is_causal_lm(base.config) and all(k in base_keys for k in adapter.saved)


class LoraExpert(Checkpoint):
    """A PEFT LoRA adapter folder seen as the full expert checkpoint it stands for (see the module docstring).

    Tensor names are those of the model the adapter was trained on (e.g. `bert.encoder...`, `classifier.*`):
    the base's tensors under the backbone prefix (base_model_prefix of its model type; a bare-backbone base's
    names get the prefix), or every base tensor for a causal LM's adapter (`_causal_lm_adapter`), and every saved
    full value (heads, modules_to_save, trained biases). The config is the
    base's plus the expert's label fields. Tensors are computed on `get`, one at a time.
    `base_name`: the registered name of the base (e.g. its Hub id), matched against the adapter's
    `base_model_name_or_path` besides the base folder and its config's `_name_or_path`.
    """

    def __init__(self, folder: str | Path, base: Checkpoint, name: str | None = None, base_name: str | None = None):
        adapter = read_adapter(folder)
        self.folder, self.name, self.adapter, self.base = Path(folder), name or Path(folder).name, adapter, base
        cfg_path = self.folder / ADAPTER_CONFIG
        declared = adapter.config.get("base_model_name_or_path")
        if not _same_base(declared, (base_name, str(base.folder), base.config.get("_name_or_path"))):
            # A warning, not an error: names are not identities (local paths, mirrors, a renamed repository;
            # the embedded MiniLM's config says nreimers/MiniLM-L6-H384-uncased). Structure is checked below.
            log.warning("%s: base_model_name_or_path %r does not match the base (%s); using it since its "
                        "modules and shapes fit", cfg_path, declared, base_name or base.folder)
        self.config = {k: v for k, v in base.config.items() if k not in LABEL_FIELDS}
        self.config.update(adapter.labels)
        prefix = self.base_model_prefix
        keys = base.keys()
        if prefix and not any(k.startswith(prefix + ".") for k in keys):  # bare backbone: add the prefix
            self._base_key = {f"{prefix}.{k}": k for k in keys}
        elif _causal_lm_adapter(adapter, base):  # the whole LM: its output head is the expert's too
            self._base_key = {k: k for k in keys}
        else:
            self._base_key = {k: k for k in keys if not prefix or k.startswith(prefix + ".")}
        self._file, self._pickled = {}, None
        self._meta = {k: (base.shape(b), base.dtype(b)) for k, b in self._base_key.items()}
        self.modules: dict[str, LoraModule] = {}
        for path, mod in adapter.modules.items():
            key = f"{path}.weight"
            if key not in self._base_key:
                raise CheckpointError(f"{self.folder / ADAPTER_WEIGHTS}: target module {path} not in the base "
                                      f"({base.folder})")
            if mod.shape != self._meta[key][0]:
                raise CheckpointError(f"{self.folder / ADAPTER_WEIGHTS}: module {path}: Delta W has shape "
                                      f"{list(mod.shape)}, base weight {self._base_key[key]} has "
                                      f"{list(self._meta[key][0])}")
            if mod.bias is not None and (f"{path}.bias" not in self._base_key
                                         or self._meta[f"{path}.bias"][0] != tuple(mod.bias.shape)):
                raise CheckpointError(f"{self.folder / ADAPTER_WEIGHTS}: module {path}: lora_B bias does not "
                                      "match a bias of the base")
            self.modules[key] = mod
        self.saved = dict(adapter.saved)
        for key, t in self.saved.items():
            if key in self._base_key and tuple(t.shape) != self._meta[key][0]:
                raise CheckpointError(f"{self.folder / ADAPTER_WEIGHTS}: tensor {key} has shape {list(t.shape)}, "
                                      f"base {self._base_key[key]} has {list(self._meta[key][0])}")
            self._meta[key] = (tuple(t.shape), self._meta[key][1] if key in self._meta else t.dtype)
        self.biases = {f"{m.name}.bias": m.bias for m in self.modules.values() if m.bias is not None}
        if "num_labels" not in self.config and "id2label" not in self.config:
            self._infer_labels()

    def _infer_labels(self) -> None:
        """No label fields anywhere: the label count from the head's output rows (HEAD_OUTPUTS)."""
        for key in HEAD_OUTPUTS:
            if key in self.saved and key not in self._base_key:
                self.config["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.saved[key].shape[0])}
                self.config["label2id"] = {f"LABEL_{i}": i for i in range(self.saved[key].shape[0])}
                return

    def get(self, key: str, rows: slice | None = None) -> torch.Tensor:
        """Tensor `key` (or its `rows`): the saved value or the base's, plus the LoRA delta of its module (in
        float32, cast back to the tensor's dtype, as PEFT's merge)."""
        self._check(key)
        if key in self.saved:
            value = self.saved[key].to(self._meta[key][1])
            value = value if rows is None else value[rows]
        else:
            value = self.base.get(self._base_key[key], rows)
        if key in self.modules:
            return (value.to(torch.float32) + self.modules[key].delta(rows)).to(value.dtype)
        if key in self.biases:
            b = self.biases[key] if rows is None else self.biases[key][rows]
            return (value.to(torch.float32) + b.to(torch.float32)).to(value.dtype)
        return value

    def factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_scaled [m, r], A [r, n]) float32 with Delta W = B_scaled @ A for the weight `key` (or a module
        path) of a LoRA target module (KeyError otherwise)."""
        key = key if key in self.modules else f"{key}.weight"
        return self.modules[key].factors()

    def delta_kind(self, key: str) -> str:
        """How `key` differs from the base: "lowrank" (a LoRA weight), "full" (a saved value or a lora_B bias:
        a dense delta), or "none"."""
        if key in self.modules:
            return "lowrank"
        return "full" if key in self.saved or key in self.biases else "none"

    def __repr__(self) -> str:
        return f"LoraExpert({self.name!r}, {str(self.folder)!r}, {len(self.modules)} LoRA modules)"


def open_expert(folder: str | Path, name: str | None, allow_pickle: bool, base: Checkpoint,
                base_name: str | None = None) -> Checkpoint:
    """An expert folder as a Checkpoint: a `LoraExpert` when it holds adapter_config.json, else a full one."""
    if is_adapter_folder(folder):
        return LoraExpert(folder, base, name, base_name)
    return Checkpoint(folder, name, allow_pickle)


# --- low-rank exclusive SVD ---------------------------------------------------------------------------------

def lowrank_svd(L: torch.Tensor, R: torch.Tensor, rank: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD of L @ R (L [m, K], R [K, n]) without forming it: U [m, k], S [k] (descending), V [n, k],
    k = min(rank, min(m, n, K)) (all when rank is None), with L @ R ~ U diag(S) V^T.

    L = Q_L R_L, R^T = Q_R R_R (thin QR), so L @ R = Q_L (R_L R_R^T) Q_R^T; the SVD of the small core
    R_L R_R^T = Uc S Vc^T gives U = Q_L Uc, V = Q_R Vc. Exact (up to rounding) for rank-deficient inputs too.
    Computed in the promoted dtype of L and R (at least float32), float32 retried in float64 if LAPACK fails.
    Cost O((m + n) K^2 + K^3) instead of O(m n min(m, n)).
    """
    from .exclusive import one_thread

    if L.ndim != 2 or R.ndim != 2 or L.shape[1] != R.shape[0]:
        raise FactorError(f"lowrank_svd: L {list(L.shape)} and R {list(R.shape)} are not [m, K] and [K, n]")
    dtype = torch.promote_types(torch.promote_types(L.dtype, R.dtype), torch.float32)

    def run(dt):
        Ql, Rl = torch.linalg.qr(L.to(dt))
        Qr, Rr = torch.linalg.qr(R.to(dt).T)
        Uc, S, Vhc = torch.linalg.svd(Rl @ Rr.T, full_matrices=False)
        return Ql, Uc, S, Vhc, Qr

    with one_thread():
        try:
            Ql, Uc, S, Vhc, Qr = run(dtype)
            if not bool(torch.isfinite(S).all()):
                raise torch.linalg.LinAlgError("non-finite singular values")
        except torch.linalg.LinAlgError:
            if dtype == torch.float64:
                raise
            Ql, Uc, S, Vhc, Qr = (t.to(dtype) for t in run(torch.float64))
    k = S.shape[0] if rank is None else max(0, min(int(rank), S.shape[0]))
    return Ql @ Uc[:, :k], S[:k].contiguous(), Qr @ Vhc[:k].T


def lowrank_exclusive(experts, expert_name: str, key: str, lambdas: Mapping[str, float]
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(L, R) with v_t = L @ R for weight `key` of expert `expert_name` of an ExpertSet of LoRA experts and a
    linear shared merge theta_s = theta_0 + sum_s lambdas[s] Delta W_s (Task Arithmetic: every lambda = its
    scaling; weight averaging: 1/n). None when no expert has a LoRA delta for `key` (v_t = 0).
    FactorError when an expert is not a LoraExpert or holds a dense delta for `key` (use the dense path)."""
    Ls, Rs = [], []
    missing = [n for n in experts.names if n not in lambdas]
    if missing:
        raise FactorError(f"lowrank_exclusive: no lambda for expert(s) {', '.join(missing)}")
    for name, coef in [(expert_name, 1.0)] + [(n, -float(lambdas[n])) for n in experts.names]:
        ckpt = experts.experts[name]
        if not isinstance(ckpt, LoraExpert):
            raise FactorError(f"expert {name!r} ({ckpt.folder}) is not a LoRA adapter: no low-rank form of {key}")
        kind = ckpt.delta_kind(key)
        if kind == "full":
            raise FactorError(f"expert {name!r} ({ckpt.folder}): {key} has a dense delta, not a low-rank one")
        if kind == "none" or coef == 0.0:
            continue
        B, A = ckpt.factors(key)
        Ls.append(coef * B)
        Rs.append(A)
    if not Ls:
        return None
    return torch.cat(Ls, dim=1), torch.cat(Rs, dim=0)


# --- export as PEFT adapters --------------------------------------------------------------------------------

def _skeleton(config: Mapping) -> torch.nn.Module:
    """The expert's sequence-classification model on the meta device (module types, parameter names)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    conf = CONFIG_MAPPING[config["model_type"]].from_dict(dict(config))
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(conf)


def _exact_pair(D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [m, k], A [k, n]) with B @ A == D exactly, k = min(m, n): (I, D) or (D, I)."""
    m, n = D.shape
    return (torch.eye(m, dtype=D.dtype), D) if m <= n else (D, torch.eye(n, dtype=D.dtype))


def export_peft_adapter(factors, out_dir: str | Path, base_name_or_path: str | None,
                        shared: Mapping[str, torch.Tensor] | None = None,
                        model: torch.nn.Module | None = None) -> Path:
    """Write expert `factors` (ExclusiveFactors) as a PEFT LoRA adapter folder `out_dir` (atomically) that
    turns the shared model theta_s into theta_s + v_t (+ the expert's head): see the module docstring.

    shared: theta_s with canonical names (a state dict, `load_shared`, `SharedModel`), read only for modules
    whose deltas PEFT LoRA cannot express (LayerNorm, Linear biases); model: the expert's model or a skeleton
    of it (module types; default built from factors.config on the meta device).
    """
    from torch import nn

    from .routed import _head_modules

    model = model if model is not None else _skeleton(factors.config)
    by_module: dict[str, dict[str, str]] = {}
    for name in [*factors.lowrank, *factors.dense]:
        path, _, param = name.rpartition(".")
        by_module.setdefault(path, {})[param] = name
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    lora_linear, lora_embedding, to_save = [], [], []

    def full(name: str) -> torch.Tensor:
        if shared is None or name not in shared:
            raise FactorError(f"expert {factors.expert!r}: exporting {name} needs its shared value (pass shared=)")
        delta = factors.delta(name)
        value = shared[name].to(torch.float32)
        return value if delta is None else value + delta

    def pair(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) float32 with B @ A = v_t of 2-D `name`."""
        if name in factors.lowrank:
            U, S, V = factors.lowrank[name]
            return U.to(torch.float32) * S.to(torch.float32), V.to(torch.float32).T
        return _exact_pair(factors.dense[name].to(torch.float32))

    for path, params in sorted(by_module.items()):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise FactorError(f"expert {factors.expert!r}: exclusive knowledge for {path}: no such module") from None
        weight_2d = "weight" in params and factors.delta(params["weight"]).ndim == 2
        key = f"{PEFT_PREFIX}{path}"
        if type(module) is nn.Linear and set(params) <= {"weight", "bias"} and (weight_2d or "weight" not in params):
            if weight_2d:
                B, A = pair(params["weight"])
            else:  # bias delta only: a zero rank-1 LoRA carries the module into `bias: lora_only`
                B, A = torch.zeros(module.out_features, 1), torch.zeros(1, module.in_features)
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = A.contiguous(), B.contiguous()
            ranks[path] = A.shape[0]
            lora_linear.append(path)
        elif type(module) is nn.Embedding and set(params) == {"weight"} and weight_2d:
            B, A = pair(params["weight"])  # v [num_embeddings, dim] = B @ A; PEFT: v = (B' @ A')^T
            tensors[f"{key}.lora_embedding_A"], tensors[f"{key}.lora_embedding_B"] = B.T.contiguous(), A.T.contiguous()
            ranks[path] = B.shape[1]
            lora_embedding.append(path)
        else:  # the whole module, full values
            for pname, _ in module.named_parameters():
                tensors[f"{key}.{pname}"] = full(f"{path}.{pname}").contiguous()
            to_save.append(path)
    bias_mode = "none"
    if any("bias" in by_module[p] for p in lora_linear):
        bias_mode = "lora_only"
        for path in lora_linear:
            if model.get_submodule(path).bias is not None:
                tensors[f"{PEFT_PREFIX}{path}.base_layer.bias"] = full(f"{path}.bias").contiguous()
    heads = _head_modules(model, set(factors.head)) if factors.head else []
    for name, t in factors.head.items():
        tensors[f"{PEFT_PREFIX}{name}"] = t.to(torch.float32).contiguous()
    if not ranks:  # PEFT needs a LoRA target: a zero rank-1 LoRA on the first Linear
        path = next(n for n, m in model.named_modules() if type(m) is nn.Linear and n not in heads
                    and not any(n.startswith(h + ".") for h in heads))
        module = model.get_submodule(path)
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = torch.zeros(1, module.in_features)
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = torch.zeros(module.out_features, 1)
        ranks[path] = 1
    r = max(ranks.values())
    pattern = {re.escape(p): k for p, k in ranks.items()}
    config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if heads else None, "inference_mode": True,
        "base_model_name_or_path": base_name_or_path, "r": r, "lora_alpha": r,
        "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks), "modules_to_save": sorted(to_save + heads) or None,
        "lora_dropout": 0.0, "bias": bias_mode, "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
    }
    labels = {k: factors.config[k] for k in LABEL_FIELDS if k in factors.config}
    meta = {"format": "twinmerge-peft/1", "expert": factors.expert, "labels": labels,
            "lowrank_linear": sorted(p for p in lora_linear), "lowrank_embedding": sorted(lora_embedding),
            "modules_to_save_full_values": sorted(to_save), "heads": heads}
    with atomic_dir(out_dir) as tmp:
        write_json_atomic(config, tmp / ADAPTER_CONFIG)
        save_safetensors_atomic(tensors, tmp / ADAPTER_WEIGHTS, {"format": "pt"})
        write_json_atomic(meta, tmp / ADAPTER_META)
    return Path(out_dir)


def export_peft_adapters(factors, out_dir: str | Path, base_name_or_path: str | None,
                         shared: Mapping[str, torch.Tensor] | None = None,
                         model: torch.nn.Module | None = None) -> Path | dict[str, Path]:
    """`export_peft_adapter` for one ExclusiveFactors (out_dir is the adapter folder), or for several
    (a sequence: one folder out_dir/<expert> each; returns {expert: folder})."""
    if not isinstance(factors, Sequence):
        return export_peft_adapter(factors, out_dir, base_name_or_path, shared, model)
    names = [f.expert for f in factors]
    if len(set(names)) != len(names):
        raise FactorError(f"export_peft_adapters: duplicate expert names {names}")
    return {f.expert: export_peft_adapter(f, Path(out_dir) / f.expert, base_name_or_path, shared, model)
            for f in factors}
