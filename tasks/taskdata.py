"""Task tables of the registry's experts: `<data>/{train,validation,test}.parquet` (columns text, label)
and `<data>/labels.json`. One-line errors name the file when a split is missing or empty."""
from pathlib import Path

import pandas as pd

from tasks.params import Params
from twinmerge.errors import SourceError


def load_split(folder: str | Path, split: str) -> tuple[list[str], list[int]]:
    path = Path(folder) / f"{split}.parquet"
    if not path.is_file():
        raise SourceError(f"{path}: no {split} data for this task")
    df = pd.read_parquet(path, columns=["text", "label"])
    if df.empty:
        raise SourceError(f"{path}: the {split} split is empty")
    return df["text"].astype(str).tolist(), df["label"].astype(int).tolist()


def load_registry_split(params: Params, split: str) -> dict[str, tuple[list[str], list[int]]]:
    """{expert: (texts, labels)} for every expert of params.yaml, in registry order."""
    return {name: load_split(spec.data, split) for name, spec in params.experts.items()}
