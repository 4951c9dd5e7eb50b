"""`twinmerge export-peft`: each expert of a bundle as a standard PEFT LoRA adapter over the bundle's shared
model (`twinmerge.lora.export_peft_adapters`), for LoRA servers (PEFT, vLLM multi-LoRA, LoRAX): the twin of
expert t is `PeftModel.from_pretrained(<shared model>, <out>/<t>)`. Not a DVC stage: a user's export.

    twinmerge export-peft --bundle artifacts/twin --out adapters/
"""
from pathlib import Path

from twinmerge.bundle import read_meta
from twinmerge.errors import CheckpointError
from twinmerge.exclusive import load_factors
from twinmerge.lora import export_peft_adapters
from twinmerge.shared import load_shared


def export_bundle(bundle: str | Path, out_dir: str | Path, experts: list[str] | None = None) -> dict[str, Path]:
    """Adapters of `experts` (default: all, in routing order) of `bundle`, one folder `out_dir/<expert>` each,
    written atomically; their `base_model_name_or_path` is the bundle's shared folder."""
    bundle = Path(bundle)
    meta = read_meta(bundle / "twin.json")
    names = experts or meta["experts"]
    unknown = [n for n in names if n not in meta["experts"]]
    if unknown:
        raise CheckpointError(f"{bundle / 'twin.json'}: no expert {', '.join(map(repr, unknown))} "
                                f"(have {', '.join(meta['experts'])})")
    factors = [load_factors(bundle / "exclusive" / f"{n}.safetensors") for n in names]
    return export_peft_adapters(factors, out_dir, str((bundle / "shared").resolve()), load_shared(bundle / "shared"))


def add_arguments(parser) -> None:
    parser.add_argument("--bundle", default="artifacts/twin")
    parser.add_argument("--out", required=True, help="folder for the adapters, one sub-folder per expert")
    parser.add_argument("--expert", action="append", help="only this expert (repeatable; default: all)")


def main(args) -> None:
    for name, folder in export_bundle(args.bundle, args.out, args.expert).items():
        print(f"{name}\t{folder}")
