"""``gap import``: bring other people's training data into the row schema of `gap_pipeline.data`.

Three input formats:

* ``monet``: Monet's SFT records, ``{"metadata": {"sample_id", "dataset_name"}, "data": [messages]}``, content items
  ``{"type": "text", "text"}`` / ``{"type": "image", "image": <path>}``. The user turn holds the question image(s) and
  text; in the assistant turn each helper image follows a text part ending with ``<abs_vis_token></abs_vis_token>``,
  and what the image shows follows it as ``<observation>…</observation>``.
* ``messages``: rows with a list of messages (TRL / Qwen style; a JSON string too) and optionally ``images`` /
  ``aux_images`` columns; helper images either inline in the assistant turn (after the marker, as in Monet) or in
  the aux column, one per marker.
* ``columns``: one column per role (question, response, query image(s), aux image(s), answer, id, source), read from
  the files' schema; a role whose column is not named like its flag's default needs its flag.

Each imported row gets a ``<latent>`` placeholder per marker, its helper images as ``aux_images`` in order, the
observation text as the span's ``<parser>`` block, the gold ``answer`` (a column, else the last ``\\boxed{}`` of the
response, else its ``<answer>`` block), a stable ``id`` and its ``data_source``. Images are embedded in the output
dataset (``{"bytes", "path"}``); they are read from an image folder or from zip archives in place (a folder ``D``
shipped as ``D.zip``), never extracted. A row that cannot be imported is dropped and named with its reason in
``import_report.json`` (or, with ``--strict``, ends the run with one error).
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import re
import shutil
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import GapError

HELP = "Import Monet-format, messages or column data into GAP rows (images from folders or zip archives)."

FORMATS = ("monet", "messages", "columns")
REPORT_NAME = "import_report.json"
MONET_MARKER = "<abs_vis_token></abs_vis_token>"
MONET_OBSERVATION = "observation"
REASONS = ("malformed", "marker_without_image", "image_without_marker", "marker_outside_assistant",
           "path_outside_root", "missing_image", "unreadable_image", "no_answer", "duplicate_id", "invalid_row")
# The column a role is read from when its flag is not given (the flag's default); --format columns.
ROLE_DEFAULTS = {"question": ("question",), "response": ("response",), "images": ("images", "image"),
                 "aux": ("aux_images",), "answer": ("answer",), "id": ("id",), "source": ("data_source",)}
ROLE_FLAGS = {"question": "--question-column", "response": "--response-column", "images": "--image-column",
              "aux": "--aux-column", "answer": "--answer-column", "id": "--id-column", "source": "--source-column"}
ROWS_PER_SHARD = 1000  # rows converted and written together (their images are in memory at once) ...
SHARD_BYTES = 256 * 2**20  # ... or fewer, when their image bytes reach this
LISTED_DROPS = 5  # dropped rows printed in the summary (the report lists all)
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class ImportDataError(GapError):
    """Bad ``gap import`` arguments or input files; the message names the file or flag and the fix."""


class Drop(Exception):
    """A row that cannot be imported: its reason (one of `REASONS`) and what exactly is wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# ------------------------------------------------------------------------------------------------------ images


class ImageRoot:
    """Reads image bytes for the paths of rows, from a folder (archives in it read in place) or from one zip archive.

    A folder ``D`` may be shipped as ``D.zip`` beside where it would be: a path through ``D/`` that is not a file is
    read from that archive, under its folder ``D/`` when all its entries sit there, else (or when not found there) at
    its top level; a zip root is read the same way. Paths leave the root
    neither through ``..`` nor as absolute paths elsewhere (the project's path rule; `allow_outside` lifts it for a
    folder root). Relative paths only, inside a zip root.
    """

    def __init__(self, root: str | os.PathLike | None, allow_outside: bool = False):
        self.root = None if root is None else check_image_root(root)
        self.allow_outside = allow_outside
        self._archives: dict[Path, tuple[zipfile.ZipFile, str, set[str]]] = {}
        self._stack = ExitStack()

    def __enter__(self) -> ImageRoot:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _archive(self, path: Path) -> tuple[zipfile.ZipFile, str, set[str]]:
        """The open archive at `path`, the folder its entries all sit under (``D/`` for ``D.zip``, or ''), its files."""
        if path not in self._archives:
            try:
                archive = self._stack.enter_context(zipfile.ZipFile(path))
            except (zipfile.BadZipFile, OSError) as error:
                raise ImportDataError(f"{path}: not a readable zip archive ({error}); re-download it") from None
            names = {name for name in archive.namelist() if not name.endswith("/")}
            prefix = path.stem + "/"
            self._archives[path] = (archive, prefix if names and all(n.startswith(prefix) for n in names) else "",
                                    names)
        return self._archives[path]

    def _member(self, archive_path: Path, member: str, shown: str) -> bytes:
        """Entry `member` of the archive: under its own folder ``D/`` when all its entries sit there, else (or when
        not found there) at its top level."""
        archive, prefix, files = self._archive(archive_path)
        names = list(dict.fromkeys([prefix + member, member]))
        try:
            name = next(name for name in names if name in files)
        except StopIteration:
            raise Drop("missing_image", f"image {shown!r} is not in the archive {str(archive_path)!r} (no entry "
                       f"{' or '.join(map(repr, names))})") from None
        try:
            return archive.read(name)
        except (zipfile.BadZipFile, OSError, RuntimeError, EOFError) as error:  # CRC error, encrypted or cut entry
            raise Drop("unreadable_image", f"image {shown!r}: entry {name!r} of {str(archive_path)!r} cannot be read "
                       f"({error})") from None

    def read(self, path: str) -> bytes:
        """The bytes of the image at `path` (relative to the root); `Drop` when it leaves the root or is absent."""
        if self.root is None:
            raise Drop("missing_image", f"image {path!r} is a path, and the input has no image folder; pass "
                       "--image-root")
        if self.root.is_file():
            member = posixpath.normpath(path.replace("\\", "/"))
            if posixpath.isabs(member) or member == ".." or member.startswith("../"):
                raise Drop("path_outside_root", f"image path {path!r} leaves the archive {str(self.root)!r}; paths "
                           "inside an archive are relative")
            return self._member(self.root, member, path)
        from .data import image_path_outside

        if not self.allow_outside and image_path_outside(path, self.root) is not None:
            raise Drop("path_outside_root", f"image path {path!r} leaves the image folder {str(self.root)!r}; move "
                       "the file into it, or pass --allow-outside-image-dir if every path is trusted")
        full = Path(path) if Path(path).is_absolute() else self.root / path
        if full.is_file():
            try:
                return full.read_bytes()
            except OSError as error:
                raise Drop("unreadable_image", f"image {path!r} cannot be read ({error})") from None
        return self._from_archive(full, path)

    def _from_archive(self, full: Path, shown: str) -> bytes:
        root = Path(os.path.abspath(self.root))
        full = Path(os.path.abspath(full))
        parts = full.relative_to(root).parts if full.is_relative_to(root) else ()
        for cut in range(len(parts) - 1, 0, -1):  # the deepest folder first
            folder = root.joinpath(*parts[:cut])
            archive = folder.with_name(folder.name + ".zip")
            if archive.is_file():
                return self._member(archive, "/".join(parts[cut:]), shown)
        raise Drop("missing_image", f"image {shown!r}: file {str(full)!r} does not exist, and no folder on its way "
                   "is shipped as a .zip")


def check_image_root(root: str | os.PathLike) -> Path:
    """`root` as a Path when it is a folder or a zip archive; else an `ImportDataError` naming ``--image-root``."""
    root = Path(root)
    if not root.exists():
        raise ImportDataError(f"--image-root {root} does not exist; pass the folder (or .zip) the image paths are "
                              "relative to")
    if root.is_file() and not zipfile.is_zipfile(root):
        raise ImportDataError(f"--image-root {root} is a file but not a zip archive; pass a folder or a .zip")
    return root


def _image_refs(value: Any) -> list[Any]:
    """The image references of a cell: none, one (a path or a {"bytes", "path"} dict) or a list of them."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _embed(ref: Any, images: ImageRoot) -> dict[str, Any]:
    """A ``{"bytes", "path"}`` dict holding the image that `ref` names."""
    if isinstance(ref, Mapping) and ref.get("bytes") is not None:
        return {"bytes": bytes(ref["bytes"]), "path": ref.get("path")}
    path = ref.get("path") if isinstance(ref, Mapping) else ref
    if isinstance(path, str) and path.startswith("file://"):
        path = path[len("file://"):]
    if not isinstance(path, str) or not path.strip():
        raise Drop("malformed", f"image entry {ref!r} is neither a path nor a {{'bytes', 'path'}} dict")
    return {"bytes": images.read(path), "path": path}


# ---------------------------------------------------------------------------------------------- conversations


@dataclass
class Conversation:
    """A row's messages in the project's schema, with the image references they take, in order."""

    messages: list[dict] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    aux_images: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class Markup:
    """How the input marks a latent span and its description."""

    marker: str
    parser_tag: str
    drop_system: bool = False


def _items(message: Mapping, m: int) -> list[Mapping]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, (list, tuple)) or not all(isinstance(item, Mapping) for item in content):
        raise Drop("malformed", f"message {m} content is neither a string nor a list of content items")
    return list(content)


def _kind(item: Mapping) -> str:
    kind = item.get("type")
    if kind in ("text", "image"):
        return kind
    if kind == "image_url":  # OpenAI style: {"type": "image_url", "image_url": {"url": ...}}
        return "image"
    if kind is None and (item.get("image") is not None or item.get("image_url") is not None):
        return "image"
    if kind is None and item.get("text") is not None:
        return "text"
    raise Drop("malformed", f"content item of type {kind!r}; only text and image items are imported")


def _inline_image(item: Mapping) -> Any:
    value = item.get("image") if item.get("image") is not None else item.get("image_url")
    return value.get("url") if isinstance(value, Mapping) and "url" in value else value


def _prompt_turn(message: Mapping, m: int, markup: Markup, external: list[Any], out: Conversation) -> None:
    """A system or user turn: text kept, each image item becomes ``{"type": "image"}`` with its reference (its inline
    path, else the next entry of the images column)."""
    content = []
    for item in _items(message, m):
        if _kind(item) == "image":
            ref = _inline_image(item)
            if ref is None:
                if not external:
                    raise Drop("malformed", f"message {m} has more image entries than the row's images column")
                ref = external.pop(0)
            out.images.append(ref)
            content.append({"type": "image", "text": None})
        else:
            text = item.get("text") or ""
            if markup.marker in text:
                hint = "; pass --drop-system if it is the system prompt's wording" if message["role"] == "system" else ""
                raise Drop("marker_outside_assistant", f"message {m} ({message['role']}) holds the latent marker "
                           f"{markup.marker!r}{hint}")
            content.append({"type": "text", "text": text})
    out.messages.append({"role": message["role"], "content": content})


def _assistant_turn(message: Mapping, m: int, markup: Markup, external_aux: list[Any] | None,
                    out: Conversation) -> None:
    """An assistant turn: its text with each marker replaced by ``<latent>``; its helper images (inline, each right
    after a text part ending with the marker; or the aux column, one per marker) appended to ``out.aux_images``."""
    from .data import LATENT_PLACEHOLDER

    items, texts, marker = _items(message, m), [], markup.marker
    for j, item in enumerate(items):
        if _kind(item) == "image":
            if external_aux is not None:
                raise Drop("malformed", f"message {m} (assistant) holds an image and the row has an aux column too")
            before = items[j - 1] if j else None
            if before is None or _kind(before) != "text" or not (before.get("text") or "").rstrip().endswith(marker):
                raise Drop("image_without_marker", f"message {m} (assistant): helper image "
                           f"{len(out.aux_images) + 1} ({_inline_image(item)!r}) does not follow a text ending with "
                           f"{marker!r}")
            out.aux_images.append(_inline_image(item))
            continue
        text = item.get("text") or ""
        if marker != LATENT_PLACEHOLDER and LATENT_PLACEHOLDER in text:
            raise Drop("malformed", f"message {m} (assistant) already holds {LATENT_PLACEHOLDER}, which would become a "
                       "latent span of its own")
        if external_aux is None and marker in text:
            following = items[j + 1] if j + 1 < len(items) else None
            bound = text.rstrip().endswith(marker) and following is not None and _kind(following) == "image"
            if text.count(marker) > int(bound):
                raise Drop("marker_without_image", f"message {m} (assistant): a {marker!r} marker is not followed by "
                           "a helper image")
        texts.append(text)
    text = _spaced_placeholders("".join(texts).replace(marker, LATENT_PLACEHOLDER))
    if markup.parser_tag != "parser":
        text = _tag_to_parser(text, markup.parser_tag)
    out.messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})


def _spaced_placeholders(text: str) -> str:
    """Whitespace on both sides of each ``<latent>`` inside the text (so stripping a span never glues two words)."""
    from .data import LATENT_PLACEHOLDER

    placeholder = re.escape(LATENT_PLACEHOLDER)
    text = re.sub(r"(?<=\S)" + placeholder, " " + LATENT_PLACEHOLDER, text)
    return re.sub(placeholder + r"(?=\S)", LATENT_PLACEHOLDER + " ", text)


def _tag_to_parser(text: str, tag: str) -> str:
    """``<tag>…</tag>`` blocks after the first ``<latent>`` become ``<parser>…</parser>``; blocks before any span lose
    their tags and keep their text (Monet's rule for an observation with no helper image before it)."""
    from .data import LATENT_PLACEHOLDER

    first = text.find(LATENT_PLACEHOLDER)

    def replace(match: re.Match) -> str:
        return f"<parser>{match.group(1)}</parser>" if 0 <= first < match.start() else match.group(1)

    return re.sub(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", replace, text, flags=re.DOTALL)


def convert_messages(messages: Any, markup: Markup, images: list[Any] | None = None,
                     aux_images: list[Any] | None = None) -> Conversation:
    """The `Conversation` of a list of messages (`images` / `aux_images`: the row's image columns, if any); `Drop`
    when the messages cannot make a row."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise Drop("malformed", "the messages are not a non-empty list")
    out, external = Conversation(), list(images or [])
    external_aux = list(aux_images) if aux_images else None
    for m, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in ("system", "user", "assistant"):
            raise Drop("malformed", f"message {m} has role {role!r}; expected system, user or assistant")
        if role == "system" and markup.drop_system:
            continue
        if role == "assistant":
            _assistant_turn(message, m, markup, external_aux, out)
        else:
            _prompt_turn(message, m, markup, external, out)
    if not any(message["role"] == "assistant" for message in out.messages):
        raise Drop("malformed", "no assistant turn")
    if not any(message["role"] == "user" for message in out.messages):
        raise Drop("malformed", "no user turn")
    if external:
        raise Drop("malformed", f"the images column holds {len(external)} image(s) more than the messages' image "
                   "entries")
    if external_aux is not None:
        _check_span_count(out, len(external_aux), markup.marker)
        out.aux_images = external_aux
    return out


def _check_span_count(out: Conversation, n_aux: int, marker: str) -> None:
    from .data import count_latent_placeholders

    n_spans = count_latent_placeholders(out.messages)
    if n_spans > n_aux:
        raise Drop("marker_without_image", f"{n_spans} {marker!r} marker(s) but {n_aux} aux image(s)")
    if n_aux > n_spans:
        raise Drop("image_without_marker", f"{n_aux} aux image(s) but {n_spans} {marker!r} marker(s)")


# ------------------------------------------------------------------------------------------------------ inputs


@dataclass
class Source:
    """One input: its name in messages, the records, the columns of its schema and its default image root."""

    name: str
    stem: str
    records: Iterator[Mapping]
    columns: list[str]
    image_root: Path | None


def _json_records(path: Path) -> list[Mapping]:
    """The records of a JSON array file or a JSON-lines file (``.json`` or ``.jsonl``)."""
    from .datasets_io import utf8_lines

    lines = list(utf8_lines(path, ImportDataError))
    text = "".join(lines)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ImportDataError(f"{path}, line {error.lineno}: not valid JSON ({error.msg}); re-download or fix "
                                  "the file") from None
    else:
        records = []
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ImportDataError(f"{path}, line {number}: not valid JSON ({error.msg}); one record per line "
                                          "(JSON lines) or one JSON array") from None
    bad = next((i for i, record in enumerate(records) if not isinstance(record, Mapping)), None)
    if bad is not None:
        raise ImportDataError(f"{path}: record {bad} is a {type(records[bad]).__name__}, not a JSON object")
    return records


def _undecoded(dataset):
    """`dataset` with every image column typed to give ``{"bytes", "path"}`` dicts rather than decoded images."""
    from datasets import Image, List

    for name, feature in dataset.features.items():
        if isinstance(feature, Image) and feature.decode:
            dataset = dataset.cast_column(name, Image(decode=False))
        elif isinstance(getattr(feature, "feature", None), Image) and feature.feature.decode:
            dataset = dataset.cast_column(name, List(Image(decode=False)))
    return dataset


def _dataset_source(dataset, name: str, stem: str, image_root: Path | None) -> Source:
    from .datasets_io import datasets_progress_bars

    with datasets_progress_bars(False):
        dataset = _undecoded(dataset)
    return Source(name, stem, iter(dataset), list(dataset.column_names), image_root)


def open_input(spec: str, split: str | None) -> Source:
    """The `Source` of ``--input`` `spec`: a ``.json`` / ``.jsonl`` / ``.parquet`` file, a ``save_to_disk`` folder, or
    a Hub dataset id (where the Hub is reachable)."""
    import datasets

    from .datasets_io import load_dataset_folder, select_split

    path = Path(spec)
    if path.is_file():
        if split is not None:
            raise ImportDataError(f"--input {path} is a single file; drop --split {split}")
        suffix = path.suffix.lower()
        if suffix in (".json", ".jsonl"):
            records = _json_records(path)
            columns = list(records[0]) if records else []
            return Source(str(path), path.stem, iter(records), columns, path.resolve().parent)
        if suffix == ".parquet":
            try:
                dataset = datasets.load_dataset("parquet", data_files=str(path), split="train")
            except (ValueError, datasets.exceptions.DatasetGenerationError) as error:
                cause = error.__cause__ or error
                raise ImportDataError(f"{path}: not a readable parquet file ({str(cause).splitlines()[0]}); "
                                      "re-download it") from None
            return _dataset_source(dataset, str(path), path.stem, path.resolve().parent)
        raise ImportDataError(f"--input {path}: unsupported file type {path.suffix!r}; pass .json, .jsonl, .parquet, "
                              "a dataset folder or a Hub dataset id")
    if path.is_dir():
        dataset = load_dataset_folder(path, split, ImportDataError, "--input {path} is not a dataset folder written "
                                      "by save_to_disk ({exc}); pass such a folder or a .json / .jsonl / .parquet file")
        return _dataset_source(dataset, str(path), path.name, path.resolve())
    if not _HUB_ID.match(spec):
        raise ImportDataError(f"--input {spec}: no such file or folder (nor a Hub dataset id 'owner/name')")
    try:
        dataset = select_split(datasets.load_dataset(spec, split=split), None, spec, ImportDataError)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        if isinstance(error, GapError):
            raise
        raise ImportDataError(f"--input {spec}: not a readable local path, and the Hub dataset could not be loaded "
                              f"({str(error).splitlines()[0]}); download it (hf download --repo-type dataset) and pass "
                              "its files") from None
    return _dataset_source(dataset, spec, spec.split("/")[-1], None)


# ----------------------------------------------------------------------------------------------------- mapping


@dataclass(frozen=True)
class ColumnMap:
    """Which column holds each role of a row (None / empty: the row has none)."""

    messages: str | None = None
    question: str | None = None
    response: str | None = None
    images: tuple[str, ...] = ()
    aux: tuple[str, ...] = ()
    answer: str | None = None
    id: str | None = None
    source: str | None = None


def _flag_columns(args: argparse.Namespace, role: str) -> tuple[str, ...]:
    value = getattr(args, f"{role}_column", None)
    return tuple(value) if isinstance(value, list) else (() if value is None else (value,))


def _role(args, role: str, found: list[str]) -> tuple[str, ...]:
    """The columns of `role`: its flag's, else the first default name that is a column."""
    given = _flag_columns(args, role)
    if given:
        return given
    return next(((name,) for name in ROLE_DEFAULTS[role] if name in found), ())


def resolve_columns(fmt: str, args: argparse.Namespace, source: Source) -> ColumnMap:
    """The `ColumnMap` of `source` for `fmt`; one `ImportDataError` listing the columns found and the flags to set
    when the layout is not recognised or a flag names a column that is not there."""
    found = source.columns
    named = {flag: column for role, flag in ROLE_FLAGS.items() for column in _flag_columns(args, role)}
    if args.messages_column:
        named["--messages-column"] = args.messages_column
    absent = [f"{flag} {column!r}" for flag, column in named.items() if column not in found]
    if absent:
        raise ImportDataError(f"{source.name}: {', '.join(absent)} not among its columns {found}")
    if fmt == "monet":
        if "data" not in found:
            raise ImportDataError(f"{source.name}: no 'data' column, so not Monet's SFT format (columns {found}); "
                                  f"use --format messages or --format columns{_layout_hint(found)}")
        return ColumnMap(messages="data")
    one = {role: (_role(args, role, found) or (None,))[0] for role in ("answer", "id", "source")}
    if fmt == "messages":
        messages = args.messages_column or "messages"
        if messages not in found:
            raise ImportDataError(f"{source.name}: no {messages!r} column (columns {found}); name the column of the "
                                  f"messages with --messages-column{_layout_hint(found)}")
        return ColumnMap(messages=messages, images=_role(args, "images", found), aux=_role(args, "aux", found), **one)
    roles = {role: _role(args, role, found) for role in ("question", "response")}
    missing = [f"{ROLE_FLAGS[role]} (the {role})" for role, columns in roles.items() if not columns]
    if missing:
        raise ImportDataError(
            f"{source.name}: cannot map its columns {found} to GAP rows: set {' and '.join(missing)}, and as needed "
            "--image-column (query images), --aux-column (helper images, one per marker), --answer-column, "
            "--id-column, --source-column, --latent-marker (the text marking a span, default <latent>), --parser-tag "
            f"(the tag whose text describes a span, default parser){_layout_hint(found)}")
    return ColumnMap(question=roles["question"][0], response=roles["response"][0], images=_role(args, "images", found),
                     aux=_role(args, "aux", found), **one)


def _layout_hint(found: list[str]) -> str:
    if "data" in found and "metadata" in found:
        return "; the columns 'data' and 'metadata' look like Monet's SFT format: try --format monet"
    if "messages" in found:
        return "; a 'messages' column: try --format messages"
    return ""


# -------------------------------------------------------------------------------------------------------- rows


def _cell(record: Mapping, column: str | None) -> Any:
    return None if column is None else record.get(column)


def _identity(fmt: str, record: Mapping, index: int, columns: ColumnMap, source: Source) -> tuple[str, str]:
    """A row's stable ``id`` and its ``data_source``."""
    if fmt == "monet":
        metadata = record.get("metadata") if isinstance(record.get("metadata"), Mapping) else {}
        data_source = str(metadata.get("dataset_name") or source.stem)
        sample_id = metadata.get("sample_id")
        return (f"{data_source}-{sample_id}" if sample_id is not None else f"{source.stem}-{index}"), data_source
    row_id, data_source = _cell(record, columns.id), _cell(record, columns.source)
    return (str(row_id) if row_id is not None else f"{source.stem}-{index}",
            str(data_source) if data_source is not None else source.stem)


def _conversation(fmt: str, record: Mapping, index: int, columns: ColumnMap, markup: Markup) -> Conversation:
    from .data import messages_of

    images = [ref for column in columns.images for ref in _image_refs(record.get(column))]
    aux = [ref for column in columns.aux for ref in _image_refs(record.get(column))]
    if columns.messages is not None:
        try:
            messages = messages_of(record, index, columns.messages, ImportDataError)
        except ImportDataError as error:
            raise Drop("malformed", str(error)) from None
        return convert_messages(messages, markup, images, aux)
    question, response = record.get(columns.question), record.get(columns.response)
    if not isinstance(question, str) or not isinstance(response, str) or not response.strip():
        raise Drop("malformed", f"the question ({columns.question!r}) and the response ({columns.response!r}) must be "
                   "text, the response not empty")
    messages = [{"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]},
                {"role": "assistant", "content": response}]
    return convert_messages(messages, markup, images, aux)


def _answer(record: Mapping, index: int, columns: ColumnMap, messages: list[dict]) -> str:
    """The gold answer: the answer column, else the last ``\\boxed{}`` of the last assistant turn, else its
    ``<answer>`` block."""
    from .answers import AnswerError, find_boxed, gold_answer
    from .data import turn_texts

    value = _cell(record, columns.answer)
    if value is not None and str(value).strip():
        return str(value).strip()
    boxed = find_boxed(turn_texts(messages)[-1])
    if boxed is not None and boxed.strip():
        return boxed.strip()
    try:
        return gold_answer({"messages": messages}, index)
    except AnswerError:
        where = f"its {columns.answer!r} column is empty and " if columns.answer else ""
        raise Drop("no_answer", f"{where}the response has no \\boxed{{}} and no <answer>...</answer>; give the row "
                   "its answer (--answer-column) or drop it") from None


def build_row(fmt: str, record: Mapping, index: int, columns: ColumnMap, markup: Markup, images: ImageRoot,
              row_id: str, data_source: str) -> dict:
    """One row of the project's schema from `record`, images embedded; `Drop` when it cannot be imported."""
    from .data import validate_row

    conversation = _conversation(fmt, record, index, columns, markup)
    answer = _answer(record, index, columns, conversation.messages)
    row = {"id": row_id, "data_source": data_source, "messages": conversation.messages,
           "images": [_embed(ref, images) for ref in conversation.images],
           "aux_images": [_embed(ref, images) for ref in conversation.aux_images], "answer": answer}
    problem = validate_row(row, index)
    if problem is not None:
        image_field = problem.field in ("images", "aux_images")
        raise Drop("unreadable_image" if image_field else "invalid_row", f"field {problem.field!r}: {problem.message}")
    return row


def features():
    """The `datasets.Features` of imported rows."""
    from datasets import Features, Image, List, Value

    content = List({"type": Value("string"), "text": Value("string")})
    return Features({"id": Value("string"), "data_source": Value("string"),
                     "messages": List({"role": Value("string"), "content": content}),
                     "images": List(Image()), "aux_images": List(Image()), "answer": Value("string")})


# ------------------------------------------------------------------------------------------------------ report


def _source_counts() -> dict[str, Any]:
    return {"rows_in": 0, "rows_out": 0, "rows_with_latents": 0, "dropped": Counter()}


@dataclass
class ImportReport:
    """What an import read, wrote and dropped (and why), overall and per data source."""

    settings: dict[str, Any]
    rows_in: int = 0
    rows_out: int = 0
    rows_with_latents: int = 0
    latent_spans: int = 0
    spans_without_parser: int = 0
    dropped: Counter = field(default_factory=Counter)
    per_source: dict[str, dict[str, Any]] = field(default_factory=dict)
    dropped_rows: list[dict[str, Any]] = field(default_factory=list)

    def _source(self, data_source: str) -> dict[str, Any]:
        self.rows_in += 1
        counts = self.per_source.setdefault(data_source, _source_counts())
        counts["rows_in"] += 1
        return counts

    def keep(self, row: dict) -> None:
        from .data import turn_texts
        from .filters import spans_without_parser

        counts = self._source(row["data_source"])
        spans = len(row["aux_images"])
        self.rows_out, self.latent_spans = self.rows_out + 1, self.latent_spans + spans
        self.spans_without_parser += sum(len(spans_without_parser(text)) for text in turn_texts(row["messages"]))
        self.rows_with_latents += spans > 0
        counts["rows_out"] += 1
        counts["rows_with_latents"] += spans > 0

    def drop(self, input_name: str, index: int, row_id: str, data_source: str, drop: Drop) -> None:
        self._source(data_source)["dropped"][drop.reason] += 1
        self.dropped[drop.reason] += 1
        self.dropped_rows.append({"input": input_name, "index": index, "id": row_id, "data_source": data_source,
                                  "reason": drop.reason, "detail": drop.detail})

    def to_json(self) -> dict[str, Any]:
        per_source = {name: {**counts, "dropped": dict(sorted(counts["dropped"].items()))}
                      for name, counts in sorted(self.per_source.items())}
        return {"gap_import": self.settings, "rows_in": self.rows_in, "rows_out": self.rows_out,
                "rows_with_latents": self.rows_with_latents, "latent_spans": self.latent_spans,
                "spans_without_parser": self.spans_without_parser,
                "dropped": {reason: self.dropped[reason] for reason in REASONS if self.dropped[reason]},
                "per_source": per_source, "dropped_rows": self.dropped_rows}


def _dropped_text(dropped: Mapping[str, int]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in sorted(dropped.items())) or "none"


def _drop_line(entry: Mapping[str, Any]) -> str:
    return f"{entry['input']}, row {entry['index']} (id={entry['id']!r}): {entry['reason']}: {entry['detail']}"


def format_summary(report: ImportReport, output_dir: Path | None) -> str:
    """The lines ``gap import`` prints."""
    target = f" -> {output_dir}" if output_dir is not None else ""
    lines = [f"gap import: {report.rows_in} rows in, {report.rows_out} out ({report.rows_with_latents} with latent "
             f"spans, {report.latent_spans} spans); dropped {sum(report.dropped.values())}: "
             f"{_dropped_text(report.dropped)}{target}"]
    if report.spans_without_parser:
        lines.append(f"  {report.spans_without_parser} span(s) have no <parser> text after them (`gap filter` removes "
                     "their rows as missing_parser)")
    width = max((len(name) for name in report.per_source), default=0)
    for name, counts in sorted(report.per_source.items()):
        lines.append(f"  {name:<{width}}  in {counts['rows_in']}, out {counts['rows_out']}, with latents "
                     f"{counts['rows_with_latents']}, dropped: {_dropped_text(counts['dropped'])}")
    if report.dropped_rows:
        lines.append(f"  dropped rows (first {min(LISTED_DROPS, len(report.dropped_rows))} of "
                     f"{len(report.dropped_rows)}; all in {REPORT_NAME}):")
        lines += [f"    {_drop_line(entry)}" for entry in report.dropped_rows[:LISTED_DROPS]]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------- run


@dataclass
class Plan:
    """What one ``gap import`` reads and how."""

    fmt: str
    sources: list[tuple[Source, ColumnMap]]
    markup: Markup
    image_root: str | None
    allow_outside: bool
    strict: bool


def import_rows(plan: Plan, report: ImportReport) -> Iterator[dict]:
    """The imported rows, in input order; each drop goes to `report` (with `plan.strict`: an `ImportDataError`)."""
    seen: set[str] = set()
    for source, columns in plan.sources:
        root = plan.image_root if plan.image_root is not None else source.image_root
        with ImageRoot(root, plan.allow_outside) as images:
            for index, record in enumerate(source.records):
                row_id, data_source = _identity(plan.fmt, record, index, columns, source)
                try:
                    if row_id in seen:
                        raise Drop("duplicate_id", f"an earlier row has the id {row_id!r}; give rows unique ids "
                                   "(--id-column) or import each input once")
                    row = build_row(plan.fmt, record, index, columns, plan.markup, images, row_id, data_source)
                except Drop as drop:
                    if plan.strict:
                        raise ImportDataError(f"{source.name}, row {index} (id={row_id!r}): {drop.reason}: "
                                              f"{drop.detail} (--strict: fix the row, or drop --strict to import "
                                              "without it)") from None
                    report.drop(source.name, index, row_id, data_source, drop)
                    continue
                seen.add(row_id)
                report.keep(row)
                yield row


def _batches(rows: Iterator[dict], max_rows: int, max_bytes: int) -> Iterator[list[dict]]:
    """`rows` in lists of at most `max_rows` rows whose images hold at most `max_bytes` (one row more if it alone does)."""
    batch, size = [], 0
    for row in rows:
        batch.append(row)
        size += sum(len(image["bytes"]) for column in ("images", "aux_images") for image in row[column])
        if len(batch) >= max_rows or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _write_shards(rows: Iterator[dict], cache: Path, rows_per_shard: int):
    """`rows` as one memory-mapped `datasets.Dataset`, written to `cache` one shard at a time (at most
    `rows_per_shard` rows and `SHARD_BYTES` of images in memory); None when there is no row."""
    import datasets

    shards = []
    for batch in _batches(rows, rows_per_shard, SHARD_BYTES):
        path = cache / f"shard-{len(shards):05d}"
        datasets.Dataset.from_list(batch, features=features()).save_to_disk(str(path))
        shards.append(datasets.load_from_disk(str(path)))
    return datasets.concatenate_datasets(shards) if shards else None


def write_import(plan: Plan, report: ImportReport, output_dir: Path, progress: bool = True,
                 rows_per_shard: int = ROWS_PER_SHARD) -> None:
    """Import `plan` into the dataset folder `output_dir` (with ``import_report.json``), atomically: nothing is
    written unless at least one row is imported (and, with ``--strict``, none dropped)."""
    from tqdm.auto import tqdm

    from .datasets_io import atomic_output_dir, datasets_progress_bars, write_json_file

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.import-", dir=output_dir.parent))
    try:
        with datasets_progress_bars(False):
            rows = iter(tqdm(import_rows(plan, report), desc="gap import", unit=" rows", disable=not progress))
            dataset = _write_shards(rows, cache, rows_per_shard)
            if dataset is None:
                drops = "".join(f"\n  {_drop_line(entry)}" for entry in report.dropped_rows[:LISTED_DROPS])
                raise ImportDataError(f"no row could be imported from {report.rows_in} input row(s); dropped: "
                                      f"{_dropped_text(report.dropped)}{drops}")
            dataset.info.description = json.dumps({"gap_import": report.settings}, sort_keys=True)
            with atomic_output_dir(output_dir) as staging:
                dataset.save_to_disk(str(staging))
                write_json_file(staging / REPORT_NAME, report.to_json())
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gap import``."""
    from .data import add_allow_outside_image_dir_argument, add_max_image_pixels_argument

    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="monet: Monet's SFT records (metadata + data); messages: rows with a list of messages; "
                        "columns: one column per role")
    parser.add_argument("--input", required=True, nargs="+", metavar="INPUT",
                        help=".json (array or JSON lines), .jsonl or .parquet files, save_to_disk folders, or a Hub "
                        "dataset id (where the Hub is reachable)")
    parser.add_argument("--split", default=None, help="the split of a dataset folder or Hub id with several")
    parser.add_argument("--image-root", default=None,
                        help="folder (or .zip) the image paths are relative to; a folder D inside it may be shipped "
                        "as D.zip (read in place). Default: each input file's folder")
    parser.add_argument("--output-dir", required=True, help="the dataset folder to write (save_to_disk), with "
                        f"{REPORT_NAME}")
    parser.add_argument("--strict", action="store_true", help="a row that cannot be imported is an error (default: "
                        f"dropped and named in {REPORT_NAME})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--rows-per-shard", type=int, default=ROWS_PER_SHARD, metavar="N",
                        help=f"rows converted and written together, their images in memory (default {ROWS_PER_SHARD}; "
                        f"fewer when their images reach {SHARD_BYTES // 2**20} MiB)")
    add_max_image_pixels_argument(parser)
    add_allow_outside_image_dir_argument(parser)
    markup = parser.add_argument_group("markup")
    markup.add_argument("--latent-marker", default=None,
                        help=f"the text marking a latent span (default: {MONET_MARKER} for monet, else <latent>)")
    markup.add_argument("--parser-tag", default=None,
                        help=f"the tag whose text after a span becomes its <parser> block (default: "
                        f"{MONET_OBSERVATION} for monet, else parser)")
    markup.add_argument("--drop-system", action="store_true", help="leave out system turns")
    mapping = parser.add_argument_group("columns (--format messages / columns)")
    mapping.add_argument("--messages-column", default=None, help="the list of messages (messages; default messages)")
    for role, what in (("question", "the question text"), ("response", "the response with its markers"),
                       ("answer", "the gold answer (else the response's last \\boxed{} or <answer> block)"), ("id", "the row id"),
                       ("source", "the data source")):
        mapping.add_argument(ROLE_FLAGS[role], dest=f"{role}_column", default=None,
                             help=f"{what} (default column: {' or '.join(ROLE_DEFAULTS[role])}, if present)")
    mapping.add_argument("--image-column", dest="images_column", nargs="+", default=None,
                         help="the query image(s): paths or images, one or a list per cell (default column: images or "
                         "image, if present)")
    mapping.add_argument("--aux-column", dest="aux_column", nargs="+", default=None,
                         help="the helper images, one per marker in order (default column: aux_images, if present)")


def _plan(args: argparse.Namespace) -> Plan:
    fmt = args.format
    column_flags = [flag for role, flag in ROLE_FLAGS.items() if _flag_columns(args, role)]
    column_flags += ["--messages-column"] if args.messages_column else []
    if fmt == "monet" and column_flags:
        raise ImportDataError(f"{', '.join(column_flags)} map columns of --format messages / columns; Monet records "
                              "have fixed fields: drop them")
    if fmt == "messages" and ({"--question-column", "--response-column"} & set(column_flags)):
        raise ImportDataError("--question-column / --response-column belong to --format columns; --format messages "
                              "reads the messages column")
    if fmt == "columns" and args.messages_column:
        raise ImportDataError("--messages-column belongs to --format messages")
    markup = Markup(args.latent_marker or (MONET_MARKER if fmt == "monet" else "<latent>"),
                    args.parser_tag or (MONET_OBSERVATION if fmt == "monet" else "parser"), args.drop_system)
    if not markup.marker.strip():
        raise ImportDataError("--latent-marker is empty; give the text that marks a latent span")
    if not re.fullmatch(r"[\w-]+", markup.parser_tag):
        raise ImportDataError(f"--parser-tag {markup.parser_tag!r}: give a tag name such as observation (no brackets)")
    if args.image_root is not None:
        check_image_root(args.image_root)
    sources = [open_input(spec, args.split) for spec in args.input]
    return Plan(fmt, [(source, resolve_columns(fmt, args, source)) for source in sources], markup, args.image_root,
                args.allow_outside_image_dir, args.strict)


def _settings(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    return {"format": plan.fmt, "inputs": [source.name for source, _ in plan.sources], "split": args.split,
            "image_roots": {source.name: None if root is None else str(root) for source, _ in plan.sources
                            for root in [args.image_root or source.image_root]}, "latent_marker": plan.markup.marker, "parser_tag": plan.markup.parser_tag,
            "drop_system": plan.markup.drop_system, "strict": plan.strict,
            "columns": {source.name: {k: v for k, v in columns.__dict__.items() if v not in (None, ())}
                        for source, columns in plan.sources}}


def run(args: argparse.Namespace) -> int:
    """Run ``gap import``: read, convert, write the dataset folder and its report, print the summary."""
    from .datasets_io import check_output_dir

    inputs = {f"--input {spec}": spec for spec in args.input if Path(spec).is_dir()}
    if args.image_root and Path(args.image_root).is_dir():
        inputs["--image-root"] = args.image_root
    output_dir = check_output_dir(args.output_dir, ImportDataError, overwrite=args.overwrite, inputs=inputs)
    if args.rows_per_shard < 1:
        raise ImportDataError(f"--rows-per-shard must be >= 1, got {args.rows_per_shard}")
    plan = _plan(args)
    report = ImportReport(_settings(args, plan))
    write_import(plan, report, output_dir, progress=not args.no_progress, rows_per_shard=args.rows_per_shard)
    print(format_summary(report, output_dir))
    return 0
