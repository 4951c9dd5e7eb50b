"""Twin-Merging (Lu et al., NeurIPS 2024) as a routed method over the pipeline's own artifacts.

Its artifacts are built by the stages before it: the shared expert (modularize, artifacts/shared), each
expert's exclusive knowledge as SVD factors (compress, artifacts/exclusive/<expert>.safetensors) and the router
(artifacts/router). `build` records which files it uses (sha256) and their sizes; `model` is the routed-delta
engine over the shared expert and the factors.
"""
import json
from pathlib import Path

from twinmerge.decoder import RoutedCausalLM
from twinmerge.exclusive import load_factors
from twinmerge.genpool import assemble_causal_lm
from twinmerge.io import sha256_file, write_json_atomic
from twinmerge.methods.base import Context, Mode, RoutedMethod, backbone_bytes, expert_heads, head_bytes
from twinmerge.modelpool import assemble_classifier
from twinmerge.routed import RoutedDeltaModel
from twinmerge.shared import load_shared


class TwinMerging(RoutedMethod):
    key = "twin"
    label = "Twin-Merging"
    reference = "Lu et al., Twin-Merging, NeurIPS 2024 (arXiv 2406.15479)"
    # builds nothing from data beyond the shared `router` stage's router, which the rows using it declare (Mode.data:
    # its inputs); so true-task routing learned nothing, as EMR's oracle row
    data_used = "none"
    modes = {
        "router": Mode("Twin-Merging, router weights and router-chosen head (no task id)", "router", "router"),
        "oracle": Mode("Twin-Merging, router weights + gold task's head (task id picks the head; the official "
                       "code also used the gold task's biases)", "router", "gold"),
        "true_routing": Mode("Twin-Merging, one-hot routing on the gold task (task id; diagnostic)", "gold", "gold"),
    }
    generative = True
    generative_modes = {  # causal LMs: no heads, so the oracle row (gold head) would repeat the router row
        "router": Mode("Twin-Merging, router weights from the prompt (no task id)", "router", "router"),
        "true_routing": modes["true_routing"],
    }

    def build(self, ctx: Context, out_dir: Path, grid: dict) -> dict:
        """Record the shared expert, factor files and router this evaluation uses, and the factor bytes."""
        a = ctx.artifacts
        files = [a / "shared" / "model.safetensors", a / "router" / "model.safetensors",
                 *(a / "exclusive" / f"{n}.safetensors" for n in ctx.pool.names)]
        stats = [json.loads((a / "exclusive" / f"{n}.stats.json").read_text())["totals"] for n in ctx.pool.names]
        exclusive, dense = sum(s["exclusive_bytes"] for s in stats), sum(s["dense_bytes_float32"] for s in stats)
        storage = {"exclusive_bytes": exclusive, "dense_exclusive_bytes": dense, "exclusive_ratio": exclusive / dense,
                   "exclusive_file_bytes": sum(f.stat().st_size for f in files[2:])}
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic({"method": self.key, "uses": {str(f): sha256_file(f) for f in files}, "storage": storage},
                          out_dir / "method.json")
        return {"storage": storage}

    def model(self, ctx: Context, out_dir: Path) -> RoutedDeltaModel:
        shared = load_shared(ctx.artifacts / "shared")
        first = ctx.pool.names[0]
        model = assemble_classifier(ctx.pool.experts[first].config, {**shared, **expert_heads(ctx.pool, first)})
        return RoutedDeltaModel(model, self._factors(ctx))

    def model_lm(self, ctx: Context, out_dir: Path) -> RoutedCausalLM:
        """The routed causal LM: theta_s (a causal LM of the experts' config) + each expert's factors."""
        shared = assemble_causal_lm(ctx.pool.experts[ctx.pool.names[0]].config,
                                    load_shared(ctx.artifacts / "shared"))
        return RoutedCausalLM(shared, self._factors(ctx))

    @staticmethod
    def _factors(ctx: Context) -> list:
        """Every expert's factors (`compress`'s files), in registry order."""
        return [load_factors(ctx.artifacts / "exclusive" / f"{n}.safetensors") for n in ctx.pool.names]

    def static_rows(self, ctx: Context, out_dir: Path) -> dict[str, tuple[str, dict]]:
        how = "no task id" if ctx.generative else "task id picks the head"
        return {"shared": (f"Shared expert alone ({how})", load_shared(ctx.artifacts / "shared"))}

    def stored_bytes(self, ctx: Context, out_dir: Path) -> int:
        """Shared backbone + every expert's factors (as compress counts them) + heads."""
        info = json.loads((out_dir / "method.json").read_text())["storage"]
        return backbone_bytes(ctx.pool) + info["exclusive_bytes"] + head_bytes(ctx.pool)
