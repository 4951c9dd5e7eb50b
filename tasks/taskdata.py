"""Task tables of the registry's experts: `<data>/{train,validation,test}.parquet`, with columns text, label
and a `<data>/labels.json` for a classification task, columns prompt, answer (a string, or a list of acceptable
strings) for a generative one (`ExpertSpec.generative`). The pipeline reads the copies that `download` makes
in `artifacts/taskdata/<expert>` (a DVC output, so task data is tracked wherever the registry keeps it).
One-line errors name the file when a split is missing or empty."""
from pathlib import Path

import pandas as pd

from tasks.params import Params
from twinmerge.errors import SourceError

TASKDATA_DIR = "artifacts/taskdata"


def load_split(folder: str | Path, split: str, generative: bool = False) -> tuple[list[str], list]:
    """(texts, labels) of a classification table, or (prompts, answers) of a generative one."""
    path = Path(folder) / f"{split}.parquet"
    if not path.is_file():
        raise SourceError(f"{path}: no {split} data for this task")
    df = pd.read_parquet(path, columns=["prompt", "answer"] if generative else ["text", "label"])
    if df.empty:
        raise SourceError(f"{path}: the {split} split is empty")
    if generative:
        return (df["prompt"].astype(str).tolist(),
                [a if isinstance(a, str) else [str(x) for x in a] for a in df["answer"]])
    return df["text"].astype(str).tolist(), df["label"].astype(int).tolist()


def load_registry_split(params: Params, split: str, root: str | Path = TASKDATA_DIR
                        ) -> dict[str, tuple[list[str], list]]:
    """{expert: (texts, labels)} (generative: (prompts, answers)) for every expert of params.yaml, in registry
    order, from `<root>/<expert>`."""
    return {name: load_split(Path(root) / name, split, spec.generative) for name, spec in params.experts.items()}
