"""Data loading for ``lq_text_ppl``: the bundled public-domain texts (``data/*.txt``), offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "data"


def read_documents(data_dir: str | Path = DATA_DIR) -> list[dict[str, str]]:
    """One document per ``*.txt`` file, in file-name order: ``{"title": stem, "text": text}``.

    The text is the file's content without its final newline.
    """
    files = sorted(Path(data_dir).glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no *.txt documents in {data_dir}")
    return [{"title": f.stem, "text": f.read_text(encoding="utf-8").rstrip("\n")} for f in files]


def load_documents(**_: Any):
    """lm-eval ``custom_dataset`` hook: a DatasetDict with one ``test`` split.

    lm-eval calls it with the run's metadata (which includes ``--model_args``)
    as keyword arguments; none of them changes the data, so all are ignored.
    """
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_documents())})
