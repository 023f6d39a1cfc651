"""File I/O shared by the pipeline steps.

* Reading ``Dataset.save_to_disk`` folders: the one place that picks a split of a ``DatasetDict``. Used by
  :func:`gap_pipeline.inference.load_rows` and :func:`gap_pipeline.targets.load_targets_dataset` (targets for
  `gap fit-pca`, `gap targets` and `train_sft.py`); each passes its own
  error class and the message for a folder that is not a saved dataset.
* Reading a JSON file or checking a safetensors file, damage named by file and fix (:func:`read_json_file`,
  :func:`check_safetensors`).
* Writing a JSON report (:func:`write_json_file`), used by ``gap fit-pca`` and ``gap norm-profile``, and appending
  result records to a JSON-lines file that a run resumes from (:func:`append_json_lines`) and reading them back, a
  torn last line dropped (:func:`read_json_lines`).
* Replacing an output folder, or files in one, only once the new content is complete (:func:`atomic_output_dir`,
  :func:`atomic_files_into`), and removing what a killed run left of that (:func:`remove_stale_staging`).
* Refusing an output folder that is, contains or lies inside an input (:func:`check_apart_from_inputs`), that cannot
  be written (:func:`check_writable`), or an ``--output-dir`` that holds something (:func:`check_output_dir`);
  holding an output folder so one run at a time writes it (:func:`claimed_output`).
* Reading a text file line by line, a non-UTF-8 byte named by file and line (:func:`utf8_lines`).
* Turning the ``datasets`` progress bars on or off for a block (:func:`datasets_progress_bars`).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "append_json_lines",
    "atomic_files_into",
    "atomic_output_dir",
    "check_apart_from_inputs",
    "check_output_dir",
    "check_safetensors",
    "check_writable",
    "claimed_output",
    "datasets_progress_bars",
    "load_dataset_folder",
    "read_json_file",
    "read_json_lines",
    "remove_stale_staging",
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


def remove_stale_staging(path: str | os.PathLike, command: str) -> None:
    """Remove what a killed run of `command` left beside the output `path`: the temporary folders of
    :func:`atomic_output_dir` / :func:`atomic_files_into` (``.<name>.tmp-*``) and, once `path` exists, an old output
    set aside by :func:`atomic_output_dir` (``.<name>.old-*``); each named on stderr. The name is matched literally
    (`glob.escape`), so an output called ``run*`` never sweeps another output's folders. Run it only while no other
    process writes `path` (:func:`claimed_output`)."""
    path = Path(path)
    name = glob.escape(path.name)
    patterns = [f".{name}.tmp-*"] + ([f".{name}.old-*"] if path.exists() else [])
    for stale in sorted(p for pattern in patterns for p in path.parent.glob(pattern)):
        print(f"{command}: removing {stale}, left by an unfinished earlier run", file=sys.stderr)
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()


def check_writable(path: str | os.PathLike, error_cls: type[Exception], option: str = "--output-dir") -> None:
    """One `error_cls` naming `option` when the output `path` cannot be written, found before any work: the folder
    itself when it exists (a command writes into it or replaces it) and the nearest existing folder above it (where it
    and its staging folders are made). Probed by creating and removing a temporary file (a read-only folder or
    file system, a missing permission)."""
    path = Path(path).absolute()
    above = path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    for folder in ([path] if path.is_dir() else []) + [above]:
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            raise error_cls(f"{option} {path}: cannot write in {folder} ({error.strerror}); make it writable or "
                            "choose another folder") from None


@contextmanager
def claimed_output(path: str | os.PathLike, error_cls: type[Exception], command: str, *,
                   inside: Iterable[str | os.PathLike] = (), option: str = "--output-dir") -> Iterator[Path]:
    """Hold the output folder `path` for the block, so one run at a time writes it: one `error_cls` up front when
    another process holds it (a `filelock` lock file ``.<name>.lock`` beside it, removed when the block ends) or it
    cannot be written (`check_writable`); then what killed runs left is removed (`remove_stale_staging`, for `path`
    and each output folder in `inside`)."""
    from filelock import FileLock, Timeout

    path = Path(path)
    check_writable(path, error_cls, option)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path.parent / f".{path.name}.lock")
    try:
        lock.acquire(timeout=0)  # never waits: a second run into the same output is a mistake to report
    except Timeout:
        raise error_cls(f"{option} {path} is being written by another {command} run (it holds {lock.lock_file}); "
                        "wait for it to finish, or choose another folder") from None
    try:
        for folder in (path, *map(Path, inside)):
            remove_stale_staging(folder, command)
        yield path
    finally:
        # removed while still held: a process that opens the name now makes a new lock, and this run is done
        Path(lock.lock_file).unlink(missing_ok=True)
        lock.release()


def utf8_lines(path: str | os.PathLike, error_cls: type[Exception] = ValueError) -> Iterator[str]:
    """The lines of the text file `path` (line endings kept); a byte that is not UTF-8 raises `error_cls` naming the
    file, the line and the byte's column; a file that cannot be opened (a missing permission) raises it naming the
    file."""
    try:
        f = open(path, "rb")
    except OSError as error:
        raise error_cls(f"{path} cannot be read ({error.strerror}); fix its permissions or pass another file") from None
    with f:
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
    except OSError as exc:  # a file of the folder that cannot be read (a missing permission)
        raise error_cls(f"{exc.filename or path} cannot be read ({exc.strerror}); fix its permissions") from None
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


def check_apart_from_inputs(output: str | os.PathLike,
                            inputs: Mapping[str, str | os.PathLike | None] | Iterable[tuple[str, str | os.PathLike]],
                            error_cls: type[Exception], option: str = "--output-dir") -> None:
    """One `error_cls` naming `option` when the output folder `output` is one of the `inputs` (what the message calls
    it -> a file or folder, or such pairs; None or a path that does not exist, such as a Hub id, is skipped),
    contains one, or lies inside an input folder: writing or replacing it could then delete or alter that input.
    Judged on resolved paths (symlinks followed)."""
    out = Path(output).resolve()
    for name, given in inputs.items() if isinstance(inputs, Mapping) else inputs:
        if given is None or not Path(given).exists():
            continue
        source = Path(given).resolve()
        if out == source:
            relation = "is"
        elif out in source.parents:
            relation = "contains"
        elif source in out.parents and source.is_dir():
            relation = "lies inside"
        else:
            continue
        raise error_cls(f"{option} {output} {relation} the {name} {given}; writing there could delete or alter an "
                        "input: choose a folder apart from every input")


def check_output_dir(output_dir: str | os.PathLike, error_cls: type[Exception], *, overwrite: bool = False,
                     inputs: dict[str, str | os.PathLike | None] | None = None) -> Path:
    """`output_dir` as a Path; one `error_cls` naming ``--output-dir`` and the fix when it is, contains or lies inside
    one of the `inputs` (`check_apart_from_inputs`), cannot be written (`check_writable`), is a file, or is a non-empty
    folder and not `overwrite`."""
    output_dir = Path(output_dir)
    check_apart_from_inputs(output_dir, inputs or {}, error_cls)
    check_writable(output_dir, error_cls)
    if output_dir.exists() and not output_dir.is_dir():
        raise error_cls(f"--output-dir {output_dir} exists and is not a folder")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise error_cls(f"--output-dir {output_dir} is not empty; choose a new folder or pass --overwrite")
    return output_dir


def read_json_file(path: str | os.PathLike, error_cls: type[Exception], fix: str, expect: type = dict) -> Any:
    """The JSON value (of type `expect`) in the file `path`; a file that cannot be read or is not such JSON (truncated,
    garbage, not UTF-8) is one `error_cls` naming it, what is wrong and `fix`."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        problem = f"is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})"
    except UnicodeDecodeError:
        problem = "is not UTF-8 text"
    except OSError as error:
        problem = f"cannot be read ({error.strerror})"
    else:
        if isinstance(value, expect):
            return value
        problem = f"holds a JSON {type(value).__name__}, not a {expect.__name__}"
    raise error_cls(f"{path} {problem}; {fix}")


def check_safetensors(path: str | os.PathLike, error_cls: type[Exception], fix: str) -> None:
    """One `error_cls` naming `path` and `fix` when it is not a whole safetensors file: a header that does not parse
    or does not cover the file (a truncated copy, a save cut short, garbage), or a file that cannot be read. Reads
    only the header."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as error:
        raise error_cls(f"{path} is not a whole safetensors file ({error}); {fix}") from None
    except OSError as error:
        raise error_cls(f"{path} cannot be read ({error.strerror}); {fix}") from None


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
