"""What produced an output folder: fingerprints of a run's model, data and settings, recorded beside its results.

A resumable output (``gap evaluate``'s predictions, a training run's checkpoints, the converted ``gap-init``
model) keeps a small JSON record of its inputs. A rerun into the same folder calls :func:`check_or_record`: it
resumes only when the new record equals the stored one, and otherwise stops with an error that names what
differs and how to start fresh, so results of one model or data set are never reported as another's.

Fingerprints are content hashes, cheap enough to take on every run: a file is hashed whole; a model folder
by its config, its weight index and the size, head and tail of each weight file (a retrained checkpoint
changes the tail even when its config and shapes do not).

No secret is ever recorded: a setting or argument named like one (:func:`is_secret_name`: ``hub_token``, ``api_key``,
``*_password``...) is left out of every record (:func:`without_secrets`), of the command line a model card shows
(:func:`command_without_secrets`) and of the training arguments saved beside a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from . import GapError
from .datasets_io import read_json_file, write_json_file

__all__ = ["RUN_RECORD", "ProvenanceError", "check_or_record", "command_without_secrets", "data_fingerprint",
           "is_secret_name", "model_fingerprint", "record_differences", "without_secrets"]

RUN_RECORD = "run.json"  # the record's name in an output folder of gap difficulty and gap evaluate

_CHUNK = 1 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


# A name holds a secret when its last word is one of these, or any word is one of `_SECRET_ANYWHERE`; the tokenizer's
# special-token settings (`pad_token`, `eos_token`...) are text, not secrets.
_SECRET_LAST = {"token", "key"}
_SECRET_ANYWHERE = {"secret", "secrets", "password", "passwd", "credential", "credentials", "apikey"}
_TOKENIZER_TOKENS = {f"{name}_token" for name in ("pad", "eos", "bos", "unk", "sep", "cls", "mask")}


def is_secret_name(name: str) -> bool:
    """Whether an argument or setting called `name` (``--hub-token``, ``hub_token``, ``wandb_api_key``...) holds a
    secret: its last word is ``token`` or ``key``, or a word is ``secret``, ``password``, ``credential``..."""
    words = name.lower().lstrip("-").replace("-", "_").split("_")
    if "_".join(words) in _TOKENIZER_TOKENS:
        return False
    return words[-1] in _SECRET_LAST or not _SECRET_ANYWHERE.isdisjoint(words)


def without_secrets(value: Any) -> Any:
    """`value` with every mapping key named like a secret (`is_secret_name`) left out, at any depth."""
    if isinstance(value, dict):
        return {key: without_secrets(item) for key, item in value.items()
                if not (isinstance(key, str) and is_secret_name(key))}
    if isinstance(value, (list, tuple)):
        return [without_secrets(item) for item in value]
    return value


def command_without_secrets(args: list[str]) -> list[str]:
    """Command-line `args` less every option named like a secret (`is_secret_name`) and its value
    (``--hub_token X``, ``--hub_token=X``); the rest in order."""
    kept, skip_value = [], False
    for arg in args:
        if skip_value and not arg.startswith("-"):
            skip_value = False
            continue
        skip_value = False
        name, equals, _ = arg.partition("=")
        if arg.startswith("-") and is_secret_name(name):
            skip_value = not equals
            continue
        kept.append(arg)
    return kept


class ProvenanceError(GapError):
    """An output folder holds results of other inputs or settings; the message names them and the fix."""


def _hash_file(digest, path: Path, head_and_tail: bool = False) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}:".encode())
    with open(path, "rb") as f:
        if head_and_tail and size > 2 * _CHUNK:
            digest.update(f.read(_CHUNK))
            f.seek(size - _CHUNK)
            digest.update(f.read(_CHUNK))
            return
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)


def model_fingerprint(path: str | os.PathLike) -> dict[str, str]:
    """``{"path", "sha256"}`` of a local checkpoint folder (config, index, weight files); a Hub id is kept as is."""
    folder = Path(path)
    if not folder.is_dir():
        return {"path": str(path), "sha256": "hub:" + str(path)}
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.name == "config.json" or file.name.endswith(".index.json"):
            _hash_file(digest, file)
        elif file.is_file() and file.name.endswith(_WEIGHT_SUFFIXES):
            _hash_file(digest, file, head_and_tail=True)
    return {"path": str(folder.resolve()), "sha256": digest.hexdigest()}


def data_fingerprint(path: str | os.PathLike) -> dict[str, str]:
    """``{"path", "sha256"}`` of a data file, or of every file in a dataset folder (by relative path)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        _hash_file(digest, file)
    return {"path": str(path.resolve()), "sha256": digest.hexdigest()}


def record_differences(stored: dict[str, Any], record: dict[str, Any], prefix: str = "") -> list[str]:
    """``"key was A, now B"`` for every (nested) key whose value differs; `record` is JSON-normalised first."""
    record = json.loads(json.dumps(record))
    out = []
    for key in sorted(set(stored) | set(record)):
        old, new = stored.get(key), record.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out.extend(record_differences(old, new, f"{prefix}{key}."))
        elif old != new:
            out.append(f"{prefix}{key} was {old!r}, now {new!r}")
    return out


def check_or_record(folder: str | os.PathLike, filename: str, record: dict[str, Any], *, what: str,
                    has_results: bool, fresh: str) -> None:
    """Resume `folder` only if ``folder/filename`` holds `record`; write `record` there otherwise.

    `has_results`: whether `folder` already holds results (a folder with results but no record was written by
    unknown inputs and is refused too). `what` names the results in the message, `fresh` the way to start over
    (a flag or another folder). The record is JSON-normalised and its secrets left out (`without_secrets`) before
    comparing.
    """
    record = without_secrets(json.loads(json.dumps(record)))
    folder = Path(folder)
    path = folder / filename
    if path.is_file():
        stored = read_json_file(path, ProvenanceError, f"it records what produced the {what} beside it: {fresh}")
        differences = record_differences(stored, record)
        if differences:
            raise ProvenanceError(
                f"{folder} holds {what} of another run ({'; '.join(differences)}); {fresh}."
            )
        return
    if has_results:
        raise ProvenanceError(
            f"{folder} holds {what} but no {filename}, the record of what produced them, so it cannot be reused; "
            f"{fresh}."
        )
    folder.mkdir(parents=True, exist_ok=True)
    write_json_file(path, record)
