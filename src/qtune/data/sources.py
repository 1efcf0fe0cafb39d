"""Tables that are not text files: Parquet files, Hugging Face `datasets` folders and hub datasets.

A columnar source is one of:

- a Parquet file, ``qa.parquet``;
- a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``, ``data/qa``;
- a dataset on the Hugging Face hub, ``hf://datasets/NAME`` (``hf://datasets/org/qa``).

A split is picked with ``:SPLIT`` after the folder or hub name (``data/qa:train``,
``hf://datasets/org/qa:test``). Without one, a source with a single split reads it and a source with
several is refused, listing them: reading "the first split" would silently train on test data.

Rows are numbered from 1 (the first data row), and that number stands where a text file's line
would: ``qa.parquet:17, field 'label': empty text``. Reading needs the `data` extra (datasets,
pyarrow); a hub dataset also needs network, or its copy in the local cache with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from qtune.errors import DataError
from qtune.hub import hub_reachable

PARQUET_SUFFIX = ".parquet"
# The second is what Path() makes of the first (it folds "//"), so a hub name survives a Path.
HUB_PREFIXES = ("hf://datasets/", "hf:/datasets/")
DATASET_DICT_FILE = "dataset_dict.json"  # what DatasetDict.save_to_disk writes, with the split names
DATASET_FILE = "state.json"  # what Dataset.save_to_disk writes
BATCH_ROWS = 4096
EXTRA = "pip install 'qtune[data]'"
# What the readers take besides text files, as their "unsupported file type" errors list it.
COLUMNAR_TYPES = ".parquet, a datasets folder (save_to_disk) or hf://datasets/NAME"


@dataclass(frozen=True, slots=True)
class ColumnarSource:
    kind: str  # "parquet", "datasets" (a save_to_disk folder) or "hub"
    location: str  # the file, the folder or the hub dataset id
    split: str | None = None


def columnar_source(source: str | Path) -> ColumnarSource | None:
    """What `source` names when it is a Parquet file, a datasets folder (possibly with `:SPLIT`; a
    folder without a suffix counts, so that it is refused as not one) or a hub dataset; None for
    anything else (a text table, or a text file that is not there)."""
    text = str(source)
    for prefix in HUB_PREFIXES:
        if text.startswith(prefix):
            name, _, split = text[len(prefix):].partition(":")
            return ColumnarSource("hub", name, split or None)
    path = Path(text)
    if path.suffix.lower() == PARQUET_SUFFIX and not _is_datasets_folder(path):
        return ColumnarSource("parquet", text)
    if path.is_dir():
        # A folder named like a file (data.csv/) is left to the text readers, which say it is a folder.
        return ColumnarSource("datasets", text) if _is_datasets_folder(path) or not path.suffix else None
    folder, colon, split = text.rpartition(":")
    if colon and split and not any(c in split for c in "/\\") and Path(folder).is_dir():
        return ColumnarSource("datasets", folder, split)
    return None


def source_name(source: str | Path) -> str:
    """How errors name a source: as the user wrote it, with the "//" of a hub name that Path() folds."""
    text = str(source)
    return HUB_PREFIXES[0] + text[len(HUB_PREFIXES[1]):] if text.startswith(HUB_PREFIXES[1]) else text


def is_columnar(source: str | Path) -> bool:
    return columnar_source(source) is not None


def _is_datasets_folder(path: Path) -> bool:
    return (path / DATASET_DICT_FILE).is_file() or (path / DATASET_FILE).is_file()


def read_columnar(source: ColumnarSource, where: str, *, nulls: str) -> tuple[list[str], Iterator[tuple[int, dict]]]:
    """The column names and an iterator of (row number from 1, fields) over a columnar source.

    Values are Python values (str, int, float, bool, list, dict). A null reads as what a text
    format has in its place: with `nulls="empty"` an empty cell "" (tables: CSV, TSV), with
    `nulls="missing"` a missing key (records: JSONL lines, where a columnar file fills the keys a
    line lacks with nulls). `where` is how errors name the source (as the user wrote it).
    """
    if nulls not in ("empty", "missing"):
        raise ValueError(f"nulls must be 'empty' or 'missing', got {nulls!r}")
    names, batches = _parquet(source, where) if source.kind == "parquet" else _dataset_batches(source, where)
    return names, _numbered(batches, nulls)


def _numbered(batches, nulls: str) -> Iterator[tuple[int, dict]]:
    number = 0
    for batch in batches:
        for record in batch.to_pylist():
            number += 1
            if nulls == "empty":
                yield number, {k: "" if v is None else v for k, v in record.items()}
            else:
                yield number, {k: v for k, v in record.items() if v is not None}


def _require(module: str, where: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"reading Parquet files and Hugging Face datasets needs the optional packages datasets "
                        f"and pyarrow: {EXTRA}", path=where) from None


def _parquet(source: ColumnarSource, where: str):
    parquet = _require("pyarrow.parquet", where)
    path = Path(source.location)
    if path.is_dir():
        raise DataError("is a folder, expected a Parquet file", path=where)
    try:
        file = parquet.ParquetFile(path)
    except FileNotFoundError:
        raise DataError("file not found", path=where) from None
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError: not Parquet, cut short
        raise DataError(f"not a readable Parquet file: {e}", path=where) from None
    return file.schema_arrow.names, file.iter_batches(batch_size=BATCH_ROWS)


def _dataset_batches(source: ColumnarSource, where: str):
    _require("pyarrow", where)
    datasets = _require("datasets", where)
    dataset = (_hub_dataset(datasets, source, where) if source.kind == "hub"
               else _folder_dataset(datasets, source, where))
    return list(dataset.column_names), dataset.with_format("arrow").iter(batch_size=BATCH_ROWS)


def _one_split(splits: list[str], split: str | None, where: str) -> str:
    """The split to read: the one asked for, else the only one."""
    if split is not None:
        if split not in splits:
            raise DataError(f"no split '{split}'; the splits are {', '.join(splits)}", path=where)
        return split
    if len(splits) != 1:
        raise DataError(f"holds the splits {', '.join(splits)}; pick one as {where}:SPLIT "
                        f"(e.g. {where}:{splits[0]})", path=where)
    return splits[0]


def _folder_dataset(datasets, source: ColumnarSource, where: str):
    folder = Path(source.location)
    if (folder / DATASET_DICT_FILE).is_file():
        splits = _json_file(folder / DATASET_DICT_FILE, where).get("splits")
        if not isinstance(splits, list) or not all(isinstance(name, str) for name in splits):
            raise DataError(f"{DATASET_DICT_FILE} lists no splits (a list of names under \"splits\"); "
                            f"{REWRITE}", path=where)
        split = _one_split(list(splits), source.split, where)
        return _load_from_disk(datasets, folder, where)[split]
    if (folder / DATASET_FILE).is_file():
        if source.split is not None:
            raise DataError(f"is a single dataset without splits; drop ':{source.split}'", path=where)
        return _load_from_disk(datasets, folder, where)
    raise DataError(f"is a folder but not a Hugging Face datasets folder (no {DATASET_DICT_FILE} or "
                    f"{DATASET_FILE}, which save_to_disk writes)", path=where)


REWRITE = "write the dataset again with save_to_disk"


def _json_file(path: Path, where: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise DataError(f"{path.name} of the datasets folder {where} is not readable JSON ({e}); {REWRITE}",
                        path=str(path)) from None
    if not isinstance(data, dict):
        raise DataError(f"{path.name} of the datasets folder {where} is not a JSON object; {REWRITE}",
                        path=str(path))
    return data


def _load_from_disk(datasets, folder: Path, where: str):
    """`datasets.load_from_disk`, whose errors (pyarrow's "Expected to be able to read 28112 bytes for
    message body, got 27836") name no file: a failure is traced to the file it comes from."""
    try:
        return datasets.load_from_disk(str(folder))
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        error = _broken_file(folder, where) or DataError(f"cannot be read as a datasets folder ({e}); {REWRITE}",
                                                         path=where)
    raise error from None


def _broken_file(folder: Path, where: str) -> DataError | None:
    """The first file of a save_to_disk folder that is missing, truncated or corrupt, as a DataError
    naming it; None if every file reads."""
    import pyarrow as pa

    parts = [folder]
    if (folder / DATASET_DICT_FILE).is_file():
        parts = [folder / name for name in _json_file(folder / DATASET_DICT_FILE, where).get("splits") or []]
    for part in parts:
        state = _json_file(part / DATASET_FILE, where)
        names = [f.get("filename") for f in state.get("_data_files") or [] if isinstance(f, dict)]
        for name in names or sorted(p.name for p in part.glob("*.arrow")):
            path = part / str(name)
            if not path.is_file():
                return DataError(f"missing: {DATASET_FILE} lists it as part of the datasets folder {where}; "
                                 f"{REWRITE}", path=str(path))
            try:
                with pa.memory_map(str(path)) as file:
                    pa.ipc.open_stream(file).read_all()
            except (OSError, ValueError) as e:  # ArrowInvalid is a ValueError
                return DataError(f"truncated or corrupt Arrow file ({e}) in the datasets folder {where}; {REWRITE}",
                                 path=str(path))
    return None


def _hub_dataset(datasets, source: ColumnarSource, where: str):
    """A hub dataset's split, downloaded (or from the local cache) by `datasets`; an unreachable hub
    is refused after one quick probe instead of the client's minute of retries."""
    from huggingface_hub import constants

    if not source.location:
        raise DataError("no dataset name; write hf://datasets/NAME or hf://datasets/NAME:SPLIT", path=where)
    if not constants.HF_HUB_OFFLINE and not hub_reachable(constants.ENDPOINT):
        raise DataError(f"the Hugging Face hub ({constants.ENDPOINT}) cannot be reached (no network: pass a local "
                        f"Parquet file or datasets folder, or set HF_HUB_OFFLINE=1 to read the dataset from the "
                        f"local cache)", path=where)
    try:
        split = source.split
        if split is None:
            split = _one_split(list(datasets.get_dataset_split_names(source.location)), None, where)
        return datasets.load_dataset(source.location, split=split)
    except (OSError, ValueError) as e:  # not on the hub, not in the cache offline, unknown split
        offline = "" if not constants.HF_HUB_OFFLINE else (
            "; HF_HUB_OFFLINE=1 reads only datasets in the local Hugging Face cache: pass a local Parquet file or "
            "datasets folder, or download it once with the network on")
        raise DataError(f"cannot load hub dataset '{source.location}': {e}{offline}", path=where) from None
