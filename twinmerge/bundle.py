"""A Twin-Merging bundle: everything inference needs, in one folder, loaded with one call.

Layout (`twinmerge-bundle/1`):
    README.md                      model card (Hugging Face layout: metadata block, scores, bytes, how to load)
    twin.json                      experts (order = routing column), their tasks and label names, routing options
                                   (temperature, top_k) and the classification max_length; for causal LM
                                   experts `generative: true`, no labels, max_new_tokens (greedy generation)
                                   and max_length = prompt tokens kept
    shared/                        the shared expert (HF backbone folder + tokenizer, see `twinmerge.shared`)
    exclusive/<expert>.safetensors each expert's SVD factors and its own head (see docs/DESIGN.md)
    router/                        router weights + router.json (with its feature recipe) + tokenizer/

Router features follow the router's own recipe (`twinmerge.router.SavedRouter`), checked at load against the
bundle's shared model.

    >>> bundle = TwinBundle.load("artifacts/twin")
    >>> bundle.predict(["a gripping, beautifully shot film"])[0]["task"]
"""
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from twinmerge.card import model_card
from twinmerge.decoder import RoutedCausalLM
from twinmerge.genpool import assemble_causal_lm, generate
from twinmerge.routed import RoutedDeltaModel
from twinmerge.errors import CheckpointError, InputError
from twinmerge.exclusive import load_factors
from twinmerge.io import atomic_dir
from twinmerge.modelpool import assemble_classifier, config_from_dict, map_batches
from twinmerge.router import SavedRouter, load_router
from twinmerge.shared import load_shared

BUNDLE_FORMAT = "twinmerge-bundle/2"


def write_bundle(out_dir: str | Path, shared_dir: str | Path, factor_files: dict[str, Path], router_dir: str | Path,
                 tasks: dict[str, str], max_length: int, temperature: float = 1.0, top_k: int | None = None,
                 metrics: dict | None = None, base_model: str | None = None,
                 max_new_tokens: int | None = None) -> Path:
    """Copy the pipeline's outputs into one bundle folder, atomically (temp folder, then rename), with its model
    card (README.md, `twinmerge.card`: `metrics` is the evaluation's metrics.json, `base_model` a Hub repo id).

    Files are copied by the OS (`shutil.copy2`, in chunks), never loaded: memory does not depend on the model's
    size; a factor file is checked and its labels read from its header alone. max_new_tokens (not None): the
    experts are causal LMs, the bundle generates (no labels)."""
    with atomic_dir(out_dir) as tmp:
        shutil.copytree(shared_dir, tmp / "shared")
        shutil.copytree(router_dir, tmp / "router")
        (tmp / "exclusive").mkdir()
        labels = {}
        for name, path in factor_files.items():
            shutil.copy2(path, tmp / "exclusive" / f"{name}.safetensors")
            config = config_from_dict(load_factors(path, data=False).config)
            labels[name] = [] if max_new_tokens else [str(config.id2label[i]) for i in range(config.num_labels)]
        meta = {"format": BUNDLE_FORMAT, "experts": list(factor_files), "tasks": tasks, "labels": labels,
                "max_length": max_length, "temperature": temperature, "top_k": top_k}
        if max_new_tokens:
            meta.update(generative=True, max_new_tokens=max_new_tokens)
        (tmp / "twin.json").write_text(json.dumps(meta, indent=2))
        (tmp / "README.md").write_text(model_card(tmp, meta, metrics, base_model, Path(out_dir).name))
    return Path(out_dir)


META_FIELDS = {"experts": (list,), "tasks": (dict,), "labels": (dict,), "max_length": (int,),  # field -> types
               "temperature": (int, float), "top_k": (int, type(None))}


def read_meta(meta_path: Path) -> dict:
    """twin.json, checked: valid JSON object, this format, META_FIELDS with their types, a task and labels per
    expert; else a one-line CheckpointError naming the file."""
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: not found (is {meta_path.parent} a Twin-Merging bundle?)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{meta_path}: format {found!r}, expected {BUNDLE_FORMAT}")
    for field, kind in META_FIELDS.items():
        if field not in meta or not isinstance(meta[field], kind):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kind)
            raise CheckpointError(f"{meta_path}: field {field!r} missing or not a JSON {names}")
    for name in meta["experts"]:
        if not isinstance(name, str) or name not in meta["tasks"] or not isinstance(meta["labels"].get(name), list):
            raise CheckpointError(f"{meta_path}: expert {name!r} lacks its entry in 'tasks' or 'labels'")
    if meta.get("generative", False) is not False and (meta["generative"] is not True or not (
            isinstance(meta.get("max_new_tokens"), int) and meta["max_new_tokens"] >= 1)):
        raise CheckpointError(f"{meta_path}: 'generative' must be true or false, and a generative bundle needs "
                              "an integer max_new_tokens >= 1")
    return meta


def check_inputs(texts: list[str], top_k: int | None) -> None:
    """Refuse (InputError, one line) an empty or whitespace-only text, naming its 1-based position, and a
    top_k below 1. Empty texts are refused rather than routed: the router would pick an arbitrary task."""
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k (--top-k) is {top_k}: must be at least 1")
    for i, text in enumerate(texts, 1):
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"input {i} of {len(texts)} is empty or whitespace only: nothing to route")


@dataclass
class TwinBundle:
    experts: list[str]
    tasks: dict[str, str]
    labels: dict[str, list[str]]
    tokenizer: object
    feature_model: torch.nn.Module
    router: SavedRouter
    dynamic: RoutedDeltaModel  # a RoutedCausalLM for causal LM experts
    max_length: int
    temperature: float
    top_k: int | None
    max_new_tokens: int | None = None  # set: causal LM experts, `predict` generates

    @property
    def generative(self) -> bool:
        return self.max_new_tokens is not None

    @classmethod
    def load(cls, folder: str | Path) -> "TwinBundle":
        folder = Path(folder)
        meta = read_meta(folder / "twin.json")
        factors = [load_factors(folder / "exclusive" / f"{n}.safetensors") for n in meta["experts"]]
        shared = load_shared(folder / "shared")
        generative = meta.get("generative", False)
        if generative:  # float32 once: both models hold the same tensors (`assemble_causal_lm` assigns them)
            shared = {k: v.float() if v.is_floating_point() else v for k, v in shared.items()}
            feature_model = assemble_causal_lm(factors[0].config, shared)
            dynamic = RoutedCausalLM(assemble_causal_lm(factors[0].config, shared), factors)
        else:
            head = factors[0].head
            feature_model = assemble_classifier(factors[0].config, {**shared, **head})
            dynamic = RoutedDeltaModel(assemble_classifier(factors[0].config, {**shared, **head}), factors)
        router = load_router(folder / "router")
        router.check_feature_model(folder / "shared")
        tokenizer = AutoTokenizer.from_pretrained(folder / "shared")
        return cls(meta["experts"], meta["tasks"], meta["labels"], tokenizer, feature_model, router, dynamic,
                   meta["max_length"], meta["temperature"], meta["top_k"],
                   meta["max_new_tokens"] if generative else None)

    @torch.inference_mode()
    def predict(self, texts: list[str], batch_size: int = 32, top_k: int | None = None) -> list[dict]:
        """Per text: routed expert and task (argmax), routing weights, predicted label and its probability.
        Empty texts and top_k < 1 are refused (`check_inputs`). A generative bundle gives, instead of the label,
        the greedy generation of at most max_new_tokens new tokens (`generation`)."""
        check_inputs(texts, top_k)
        top_k = self.top_k if top_k is None else top_k
        weights = self.router.weights(self.feature_model, texts, self.temperature, top_k, batch_size, progress=False)
        if self.generative:
            generations = generate(self.dynamic, self.tokenizer, texts, self.max_new_tokens, self.max_length,
                                   batch_size, weights, top_k)
            names = [self.experts[int(w.argmax())] for w in weights]
            return [{"text": text, "expert": name, "task": self.tasks[name],
                     "weights": {n: round(float(x), 4) for n, x in zip(self.experts, w)}, "generation": g}
                    for text, name, w, g in zip(texts, names, weights, generations)]
        logits = map_batches(lambda idx, enc: self.dynamic(**enc, weights=weights[torch.tensor(idx)]).logits,
                             self.tokenizer, texts, batch_size, self.max_length)
        out = []
        for text, w, row in zip(texts, weights, logits):
            t = int(w.argmax())
            name = self.experts[t]
            probs = torch.softmax(row[:len(self.labels[name])], 0)
            label = int(probs.argmax())
            out.append({"text": text, "expert": name, "task": self.tasks[name],
                        "weights": {n: round(float(x), 4) for n, x in zip(self.experts, w)},
                        "label": self.labels[name][label], "probability": round(float(probs[label]), 4)})
        return out
