"""File I/O shared by the pipeline steps.

* Reading ``Dataset.save_to_disk`` folders: the one place that picks a split of a ``DatasetDict``. Used by
  :func:`gap_pipeline.inference.load_rows` and :func:`gap_pipeline.targets.load_targets_dataset` (targets for
  `gap fit-pca`, `gap targets` and `train_sft.py`); each passes its own
  error class and the message for a folder that is not a saved dataset.
* Writing a JSON report (:func:`write_json_file`), used by ``gap fit-pca`` and ``gap norm-profile``, and appending
  result records to a JSON-lines file that a run resumes from (:func:`append_json_lines`) and reading them back, a
  torn last line dropped (:func:`read_json_lines`).
* Replacing an output folder, or files in one, only once the new content is complete (:func:`atomic_output_dir`,
  :func:`atomic_files_into`).
* Refusing an ``--output-dir`` that is an input or holds something (:func:`check_output_dir`).
* Reading a text file line by line, a non-UTF-8 byte named by file and line (:func:`utf8_lines`).
* Turning the ``datasets`` progress bars on or off for a block (:func:`datasets_progress_bars`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "append_json_lines",
    "atomic_files_into",
    "atomic_output_dir",
    "check_output_dir",
    "datasets_progress_bars",
    "load_dataset_folder",
    "read_json_lines",
    "select_split",
    "utf8_lines",
    "write_json_file",
]


@contextmanager
def atomic_files_into(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `folder`; when the block completes, each file written there replaces
    its namesake in `folder` at once (``os.replace``), and the other files of `folder` stay. On failure nothing in
    `folder` changes and the temporary folder is removed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield staging
        for file in sorted(staging.iterdir()):
            os.replace(file, folder / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def utf8_lines(path: str | os.PathLike, error_cls: type[Exception] = ValueError) -> Iterator[str]:
    """The lines of the text file `path` (line endings kept); a byte that is not UTF-8 raises `error_cls` naming the
    file, the line and the byte's column."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise error_cls(
                    f"{path}, line {number}, column {error.start + 1}: byte {raw[error.start:error.start + 1]!r} is "
                    "not UTF-8; re-save the file as UTF-8"
                ) from None


@contextmanager
def atomic_output_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; when the block completes it becomes `path`.

    An existing `path` is moved aside and deleted only after the new folder is in place, so a failure at any
    point (an exception, a full disk) leaves the old output as it was and removes the temporary folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}") if path.exists() else None
    if old is not None:
        os.replace(path, old)
    os.replace(staging, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def select_split(ds, split: str | None, where: object, error_cls: type[Exception] = ValueError):
    """The ``datasets.Dataset`` that ``split`` names in ``ds``.

    A ``DatasetDict`` needs ``split`` unless it has exactly one split; a single ``Dataset`` takes no
    ``split``. ``where`` (the folder) starts each message; errors are raised as ``error_cls``.
    """
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise error_cls(f"{where} holds splits {list(ds)}; choose one with --split")
            split = next(iter(ds))
        if split not in ds:
            raise error_cls(f"{where} has no split {split!r}; it has {list(ds)}")
        return ds[split]
    if split is not None:
        raise error_cls(f"{where} is a single Dataset, not a DatasetDict; drop --split {split}")
    return ds


def load_dataset_folder(
    path: str | os.PathLike,
    split: str | None,
    error_cls: type[Exception],
    not_a_dataset: str,
):
    """``datasets.load_from_disk(path)`` (memory-mapped) narrowed to one split by :func:`select_split`.

    A folder that ``load_from_disk`` rejects raises ``error_cls(not_a_dataset.format(path=path, exc=exc))``.
    """
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise error_cls(not_a_dataset.format(path=path, exc=exc)) from None
    return select_split(ds, split, path, error_cls)


@contextmanager
def datasets_progress_bars(enabled: bool) -> Iterator[None]:
    """Inside the block the ``datasets`` progress bars (casts, maps) are on or off; afterwards as they were."""
    import datasets

    was_enabled = not datasets.are_progress_bars_disabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()


def check_output_dir(output_dir: str | os.PathLike, error_cls: type[Exception], *, overwrite: bool = False,
                     inputs: dict[str, str | os.PathLike] | None = None) -> Path:
    """`output_dir` as a Path; one `error_cls` naming ``--output-dir`` and the fix when it is the folder of one of
    the `inputs` (what the message calls it -> folder), a file, or a non-empty folder and not `overwrite`."""
    output_dir = Path(output_dir)
    for name, folder in (inputs or {}).items():
        if output_dir.resolve() == Path(folder).resolve():
            raise error_cls(f"--output-dir is the {name} folder; write to a new folder")
    if output_dir.exists() and not output_dir.is_dir():
        raise error_cls(f"--output-dir {output_dir} exists and is not a folder")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise error_cls(f"--output-dir {output_dir} is not empty; choose a new folder or pass --overwrite")
    return output_dir


def write_json_file(path: str | os.PathLike, payload: Any, default_name: str | None = None) -> Path:
    """Write `payload` as indented JSON to `path` (to ``path/default_name`` when `default_name` is given and `path`
    is not a ``.json`` file), atomically: a reader sees the old file or the whole new one, also when processes of one
    launch write it together. Returns the file's path."""
    p = Path(path)
    if default_name is not None and p.suffix != ".json":
        p = p / default_name
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    tmp.replace(p)
    return p


def append_json_lines(file: IO[str], records: Iterable[Any]) -> None:
    """Append `records` to the open text file `file`, one JSON line each, and force them to disk (flush, fsync): a
    crash loses at most the last line, which :func:`read_json_lines` drops as torn."""
    file.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    file.flush()
    os.fsync(file.fileno())


def read_json_lines(path: str | os.PathLike, error_cls: type[Exception], *, repair: bool = False,
                    redo: str = "its row is computed again") -> tuple[list[Any], bool]:
    """The records of a JSON-lines file written by :func:`append_json_lines`, and whether its last line was torn.

    What follows the last line break was cut short by a kill or a full disk: it is dropped, and with `repair` cut off
    the file, so that lines appended next start on a line of their own. A damaged line before it raises `error_cls`
    naming the file and the line (`redo` says what deleting it costs)."""
    path = Path(path)
    data = path.read_bytes()
    *lines, torn = data.split(b"\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise error_cls(f"{path}, line {number} is not valid JSON; the file is damaged: delete that line ({redo})"
                            ) from None
    if repair and torn:
        os.truncate(path, len(data) - len(torn))
    return records, bool(torn)
