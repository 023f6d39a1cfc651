"""GAP training data: schema, validation and loaders.

Schema (TRL's conversational vision format plus two GAP fields), one row per example::

    {
      "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many bricks are missing?"}]},
        {"role": "assistant", "content": [{"type": "text",
          "text": "<think>The wall has gaps. <latent> <parser>six bricks are marked</parser></think><answer>6</answer>"}]}
      ],
      "images": ["wall.png"],           # one per {"type": "image"} entry, in order
      "aux_images": ["wall_aux.png"],   # one per <latent> placeholder of the assistant turn(s), in order
      "accuracy": 0.0                   # optional, in [0, 1]: the base model's pass rate (difficulty-aware loading)
    }

* ``content`` may also be a plain string (no images in that message).
* ``<latent>`` placeholders may appear only in assistant turns; the processor expands each into
  ``<|latent_start|>`` + K x ``<|latent_pad|>`` + ``<|latent_end|>``.
* An optional ``id`` field names the row in error messages.
* ``gap targets`` adds ``latent_targets`` ((n_spans * K, d) per row, see `gap_pipeline.targets`).
* Images are PIL images, paths (in a JSONL, relative to its folder) or ``{"bytes", "path"}`` dicts.

Every check reports one `RowProblem` per bad row; `check_rows` raises a `GapDataError` listing them.
"""

from __future__ import annotations

import io
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from processing_gap import LATENT_PLACEHOLDER

from . import GapError
from .answers import normalize_gold
from .datasets_io import utf8_lines

__all__ = [
    "GapDataError",
    "messages_of",
    "LATENT_PLACEHOLDER",
    "RowProblem",
    "accuracy_problem",
    "add_allow_outside_image_dir_argument",
    "add_max_image_pixels_argument",
    "aux_count_problem",
    "check_image_paths",
    "check_messages",
    "check_rows",
    "count_image_entries",
    "count_latent_placeholders",
    "dataset_base_dir",
    "from_dataset",
    "image_count_problem",
    "image_path_outside",
    "load_image",
    "load_jsonl",
    "max_image_pixels",
    "messages_problem",
    "row_name",
    "special_token_problem",
    "strip_latent_placeholders",
    "strip_latent_spans",
    "turn_texts",
    "undecoded_images",
    "validate_row",
    "validate_rows",
]

ROLES = ("system", "user", "assistant")
IMAGE_COLUMNS = ("images", "aux_images")
TARGETS_COLUMN = "latent_targets"  # a row's (n_spans * K, d) latent targets, as `gap targets` writes them
# Text shaped like a special token of the Qwen2.5-VL tokenizer (`<|im_end|>`, `<|image_pad|>`, GAP's `<|latent_pad|>`).
SPECIAL_TOKEN_TEXT = re.compile(r"<\|[^\s<>|]{1,64}\|>")
ANSWER_COLUMN = "answer"  # a row's gold answer (optional; else its last <answer> block): `answers.normalize_gold`
# How many row errors a GapDataError message lists before summarising the rest.
MAX_LISTED_ERRORS = 20


class GapDataError(GapError):
    """Bad training data: the message names each bad row, the field and the fix."""

    def __init__(self, message: str, errors: list[RowProblem] | None = None):
        super().__init__(message)
        self.errors = list(errors or [])


@dataclass(frozen=True)
class RowProblem:
    """One bad row: its index, its ``id`` (if any), the offending field and what to do."""

    row: int
    field: str
    message: str
    row_id: Any = None

    def __str__(self) -> str:
        return f"{row_name(self.row, self.row_id)}, field '{self.field}': {self.message}"


def row_name(index: int, row_id: Any = None, where: str = "row") -> str:
    """``row 3`` or ``row 3 (id='abc')``."""
    return f"{where} {index}" + (f" (id={row_id!r})" if row_id is not None else "")


# --------------------------------------------------------------------------------------------- messages


def _items(message: dict) -> list[dict]:
    content = message.get("content")
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content)


def _item_type(item: Any) -> str | None:
    if not isinstance(item, dict):
        return None
    kind = item.get("type")
    if kind:
        return kind
    if item.get("image") is not None or item.get("image_url") is not None:
        return "image"
    if item.get("text") is not None:
        return "text"
    return None


def _texts(message: dict) -> list[str]:
    return [item.get("text") or "" for item in _items(message) if _item_type(item) == "text"]


def messages_of(row: Mapping[str, Any], index: int, column: str = "messages",
                error_cls: type[GapError] = GapDataError) -> Any:
    """A row's `column` as stored, or decoded when it is a JSON string (parquet and TSV exports store the list of
    messages so); a string that is not JSON raises one `error_cls` naming row `index`."""
    raw = row.get(column)
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise error_cls(f"row {index}: '{column}' is a string that is not JSON; store a list of messages") from None


def turn_texts(messages: list[dict], role: str | None = "assistant") -> list[str]:
    """The text of each message of `role` (every message when `role` is None): its text items joined, in order."""
    return ["".join(_texts(message)) for message in messages if role is None or message.get("role") == role]


def count_latent_placeholders(messages: list[dict], role: str | None = "assistant") -> int:
    """Number of ``<latent>`` placeholders in the messages of `role` (all messages when `role` is None)."""
    return sum(
        text.count(LATENT_PLACEHOLDER)
        for message in messages
        if role is None or message.get("role") == role
        for text in _texts(message)
    )


def count_image_entries(messages: list[dict]) -> int:
    """Number of image content entries over all messages: the one rule for counting a row's images (an item whose
    ``type`` is "image", or that has no type and holds an ``image`` / ``image_url``)."""
    return sum(1 for message in messages for item in _items(message) if _item_type(item) == "image")


# A run of placeholders with the whitespace around it.
_PLACEHOLDER_RUN = re.compile(r"(\s*)" + re.escape(LATENT_PLACEHOLDER) + r"(?:\s*" + re.escape(LATENT_PLACEHOLDER) + r")*(\s*)")


def strip_latent_placeholders(text: str) -> str:
    """Remove the ``<latent>`` placeholders of `text` for text-only training (difficulty-aware loading).

    Whitespace rule: a placeholder (or a run of placeholders separated by whitespace) together with the
    whitespace around it is replaced by one whitespace run, the one before it if any, else the one after
    it: ``"a <latent> b"`` -> ``"a b"``, ``"a\\n<latent> b"`` -> ``"a\\nb"``, ``"a<latent> b"`` -> ``"a b"``,
    ``"a<latent>b"`` -> ``"ab"``. At the very start or end of the text nothing is kept
    (``"<latent> b"`` -> ``"b"``, ``"a <latent>"`` -> ``"a"``).
    """

    def replace(match: re.Match) -> str:
        if match.start() == 0 or match.end() == len(text):
            return ""
        return match.group(1) or match.group(2)

    return _PLACEHOLDER_RUN.sub(replace, text)


def strip_latent_spans(messages: list[dict]) -> list[dict]:
    """A copy of `messages` whose assistant texts have their ``<latent>`` placeholders stripped.

    See `strip_latent_placeholders` for the whitespace rule; other messages are returned as they are.
    """
    def strip(content: str | list) -> str | list:
        if isinstance(content, str):
            return strip_latent_placeholders(content)
        return [{**item, "text": strip_latent_placeholders(item.get("text") or "")} if _item_type(item) == "text"
                else item for item in content]

    return [{**message, "content": strip(message.get("content"))}
            if message.get("role") == "assistant" and count_latent_placeholders([message], role=None) else message
            for message in messages]


# ----------------------------------------------------------------------------------------------- images


def _resolve(path: str, image_dir: str | os.PathLike | None) -> Path:
    p = Path(path)
    if not p.is_absolute() and image_dir is not None:
        p = Path(image_dir) / p
    return p


def dataset_base_dir(path: str | os.PathLike) -> Path:
    """The image folder of the data at `path`, by one rule for every input form: relative image paths resolve in it,
    and every path must stay inside it (unless --allow-outside-image-dir): a data file's folder, or the dataset
    folder (``save_to_disk``) itself. ``--image-dir``, where a command takes it, replaces it."""
    p = Path(path)
    return p if p.is_dir() else p.parent


def _image_path(image: Any) -> str | None:
    """The path of an image entry that is a path or a ``{"bytes": None, "path"}`` dict, else None."""
    if isinstance(image, dict) and image.get("bytes") is None:
        image = image.get("path")
    return str(image) if isinstance(image, (str, os.PathLike)) else None


def _outside_image_dir(image: Any, image_dir: str | os.PathLike) -> str | None:
    """The path of `image` when it is a path that leaves `image_dir` (``..``, an absolute path elsewhere, or a
    symlink, of the file or of a folder on its way, that resolves elsewhere), else None.

    Judged on the resolved path (every symlink followed), which is what opening the file reads."""
    path = _image_path(image)
    if path is None:
        return None
    root = os.path.realpath(image_dir)
    return None if os.path.commonpath([root, os.path.realpath(_resolve(path, image_dir))]) == root else path


def image_path_outside(image: Any, image_dir: str | os.PathLike) -> str | None:
    """The path of `image` when it is a path that leaves `image_dir` (the path rule of `validate_row`), else None."""
    return _outside_image_dir(image, image_dir)


def add_allow_outside_image_dir_argument(parser) -> None:
    """``--allow-outside-image-dir`` of a command that reads rows: lifts the path rule of :func:`load_rows`-style
    loading (image paths stay inside the image folder), for data whose every path is trusted."""
    parser.add_argument("--allow-outside-image-dir", action="store_true",
                        help="accept image paths that leave the image folder ('..', absolute paths elsewhere); "
                        "off by default")


def add_max_image_pixels_argument(parser) -> None:
    """``--max-image-pixels`` of a command that reads images (the `gap` CLI applies it around the command's run with
    `max_image_pixels`)."""
    from PIL import Image

    parser.add_argument(
        "--max-image-pixels", type=int, default=Image.MAX_IMAGE_PIXELS, metavar="N",
        help="decompression-bomb guard: an image over 2N pixels is refused naming its row, one over N warned about "
        f"(PIL's Image.MAX_IMAGE_PIXELS; default {Image.MAX_IMAGE_PIXELS}); 0 turns the guard off")


@contextmanager
def max_image_pixels(limit: int | None) -> Iterator[None]:
    """Inside the block PIL's decompression-bomb limit is `limit` pixels (0 or None: no limit); afterwards as it was."""
    from PIL import Image

    if limit is not None and limit < 0:
        raise GapDataError(f"--max-image-pixels must be >= 0 (0 = no limit), got {limit}")
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit or None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def load_image(image: Any, image_dir: str | os.PathLike | None = None):
    """A PIL image from a PIL image, a path (relative to `image_dir`) or a ``{"bytes", "path"}`` dict."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict) and image.get("bytes") is not None:
        return Image.open(io.BytesIO(image["bytes"]))
    path = _image_path(image)
    if path is None:
        raise TypeError(f"expected a PIL image, a path or a {{'bytes', 'path'}} dict, got {type(image).__name__}")
    return Image.open(_resolve(path, image_dir))


def _image_problem(image: Any, image_dir: str | os.PathLike | None) -> str | None:
    """Why `image` cannot be used, or None."""
    from PIL import Image, UnidentifiedImageError

    if image is None:
        return "is missing (None)"
    if isinstance(image, Image.Image):
        return None
    if isinstance(image, dict) and image.get("bytes") is None and image.get("path") is None:
        return "is an empty {'bytes': None, 'path': None} entry"
    path = _image_path(image)
    if path is not None and not _resolve(path, image_dir).is_file():
        return f"file {str(_resolve(path, image_dir))!r} does not exist"
    try:
        with load_image(image, image_dir) as opened:
            opened.verify()
    except Image.DecompressionBombError as error:
        return f"is too large to decode safely ({error}); shrink the image, or raise --max-image-pixels if it is trusted"
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        return f"cannot be read as an image ({error})"
    except TypeError as error:
        return str(error)
    return None


# ----------------------------------------------------------------------------------------------- checks


def messages_problem(messages: Any) -> str | None:
    """What is wrong with a row's ``messages`` (TRL's conversational format, GAP's rules), or None.

    A non-empty list of {"role", "content"} dicts with known roles and image/text items, a non-empty assistant
    turn, no literal special token and ``<latent>`` only in assistant turns (`special_token_problem`).
    `validate_row` and `GapDataCollator` both check rows with it.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        return "must be a non-empty list of {'role', 'content'} messages (TRL conversational format)"
    for m, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else type(message).__name__
            return f"message {m} has role {role!r}; use one of {list(ROLES)}"
        content = message.get("content")
        if not isinstance(content, (str, list, tuple)):
            return f"message {m} content must be a string or a list of content items"
        for item in content if isinstance(content, (list, tuple)) else ():
            if not isinstance(item, dict) or _item_type(item) not in ("image", "text"):
                return (
                    f"message {m} has content item {item!r}; use {{'type': 'image'}} or "
                    "{'type': 'text', 'text': ...} (GAP is image-only)"
                )
    if not any(message.get("role") == "assistant" for message in messages):
        return "has no assistant turn; add the target response as a {'role': 'assistant'} message"
    for m, message in enumerate(messages):
        if message.get("role") == "assistant" and not "".join(_texts(message)).strip():
            return (f"message {m} (assistant) is empty: the row would train on the end-of-turn token alone; write the "
                    "response or drop the row")
    return special_token_problem(messages)


def special_token_problem(messages: list[dict]) -> str | None:
    """Text of `messages` that would become structure instead of text, or None: a literal special token in any turn
    (anything shaped ``<|name|>``: the chat template's ``<|im_start|>``/``<|im_end|>``, ``<|vision_start|>``,
    ``<|image_pad|>``, GAP's ``<|latent_start|>``/``<|latent_pad|>``/``<|latent_end|>``...), which the tokenizer would
    read as that token, or a ``<latent>`` placeholder outside an assistant turn, which the processor would expand
    into a latent span. The one check of row text for every command that tokenizes rows (`messages_problem`, and the
    question of `gap_pipeline.inference.prompt_of_row`)."""
    for m, message in enumerate(messages):
        for text in _texts(message):
            token = SPECIAL_TOKEN_TEXT.search(text)
            if token is not None:
                return (f"message {m} ({message.get('role')}) holds the literal special token {token.group()!r}, which "
                        "the tokenizer would read as that token and not as text; remove it from the row")
    misplaced = count_latent_placeholders(messages, role=None) - count_latent_placeholders(messages)
    if misplaced:
        return (
            f"has {misplaced} {LATENT_PLACEHOLDER} placeholder(s) outside assistant turns; latent spans belong "
            "in the assistant's response only"
        )
    return None


def accuracy_problem(accuracy: Any) -> str | None:
    """What is wrong with a row's ``accuracy`` (a number in [0, 1], or absent), or None."""
    if accuracy is None:
        return None
    if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float, np.floating)) or not (
        0.0 <= float(accuracy) <= 1.0
    ):
        return f"is {accuracy!r}; it must be a number in [0, 1] (the base model's pass rate) or absent"
    return None


def image_count_problem(n_entries: int, n_images: int) -> str | None:
    """The image rule: one entry of 'images' per ``{"type": "image"}`` item of the messages, in order."""
    if n_entries == n_images:
        return None
    return (
        f"the messages have {n_entries} {{'type': 'image'}} entries but 'images' holds {n_images}; "
        "give one image per entry, in order"
    )


def aux_count_problem(n_spans: int, n_aux: int) -> str | None:
    """The span rule: one entry of 'aux_images' per ``<latent>`` placeholder of the assistant turns, in order."""
    if n_spans == n_aux:
        return None
    return (
        f"the assistant text has {n_spans} {LATENT_PLACEHOLDER} placeholder(s) but 'aux_images' holds "
        f"{n_aux}; give one auxiliary image per placeholder, in order"
    )


def validate_row(
    row: dict,
    index: int,
    *,
    image_dir: str | os.PathLike | None = None,
    check_images: bool = True,
    latent_tokens_per_span: int | None = None,
    allow_outside_image_dir: bool = False,
) -> RowProblem | None:
    """The first problem of one row (checked in the order below), or None.

    messages (`messages_problem`), ``{"type": "image"}`` entries == len(images), placeholders ==
    len(aux_images), accuracy in [0, 1], image paths inside `image_dir` (when given, unless
    `allow_outside_image_dir`), readable images and aux images (when `check_images`), and, when the row has
    ``latent_targets`` and `latent_tokens_per_span` is given, placeholders x K target rows.
    """
    messages = row.get("messages")
    problem = messages_problem(messages)
    if problem is not None:
        return RowProblem(index, "messages", problem, row.get("id"))
    images, aux_images = row.get("images") or [], row.get("aux_images") or []
    n_spans = count_latent_placeholders(messages)
    problems = [
        ("images", image_count_problem(count_image_entries(messages), len(images))),
        ("aux_images", aux_count_problem(n_spans, len(aux_images))),
        ("accuracy", accuracy_problem(row.get("accuracy"))),
    ]
    if image_dir is not None and not allow_outside_image_dir:
        problems += [(column, _outside_problem(values, image_dir))
                     for column, values in (("images", images), ("aux_images", aux_images))]
    if check_images:
        problems += [("images", _images_problem(images, image_dir)), ("aux_images", _images_problem(aux_images, image_dir))]
    if latent_tokens_per_span is not None:
        problems.append((TARGETS_COLUMN, _targets_problem(row.get(TARGETS_COLUMN), n_spans, latent_tokens_per_span)))
    for field, problem in problems:
        if problem is not None:
            return RowProblem(index, field, problem, row.get("id"))
    return None


def _outside_problem(values: list, image_dir: str | os.PathLike) -> str | None:
    for i, image in enumerate(values):
        outside = _outside_image_dir(image, image_dir)
        if outside is not None:
            return (f"entry {i} path {outside!r} leaves the image folder {str(image_dir)!r}; move the file into it, or "
                    "pass --allow-outside-image-dir if every path is trusted")
    return None


def _images_problem(values: list, image_dir: str | os.PathLike | None) -> str | None:
    for i, image in enumerate(values):
        problem = _image_problem(image, image_dir)
        if problem is not None:
            return f"entry {i} {problem}; fix the path (relative to the image folder) or the file"
    return None


def _targets_problem(targets: Any, n_spans: int, K: int) -> str | None:
    if targets is None:
        return None
    shape = _shape(targets)
    rows = shape[0] * (shape[1] if len(shape) == 3 else 1) if shape else 0
    if rows != n_spans * K:
        return (
            f"holds {rows} vectors but {n_spans} placeholder(s) x K={K} need {n_spans * K}; recompute them with "
            "`gap targets` for this K"
        )
    return None


def _shape(value: Any) -> tuple[int, ...]:
    if hasattr(value, "shape"):
        return tuple(value.shape)
    return tuple(np.asarray(value, dtype=np.float32).shape) if len(value) else (0,)


def undecoded_images(dataset, columns: Iterable[str] = IMAGE_COLUMNS):
    """`dataset` with its image `columns` typed so rows hold ``{"bytes", "path"}`` dicts instead of decoded PIL
    images."""
    from datasets import Image, List

    for column in columns:
        if column in dataset.column_names:
            feature = dataset.features[column]
            inner = getattr(feature, "feature", None)
            if isinstance(inner, Image) and inner.decode:
                dataset = dataset.cast_column(column, List(Image(decode=False)))
    return dataset


def validate_rows(
    rows: Iterable[dict],
    *,
    image_dir: str | os.PathLike | None = None,
    check_images: bool = True,
    latent_tokens_per_span: int | None = None,
    allow_outside_image_dir: bool = False,
) -> list[RowProblem]:
    """One `RowProblem` per bad row of `rows` (a list of dicts or a `datasets.Dataset`)."""
    if hasattr(rows, "cast_column"):
        rows = undecoded_images(rows)
    problems = (validate_row(row, index, image_dir=image_dir, check_images=check_images,
                             latent_tokens_per_span=latent_tokens_per_span,
                             allow_outside_image_dir=allow_outside_image_dir) for index, row in enumerate(rows))
    return [problem for problem in problems if problem is not None]


def check_image_paths(rows: Iterable[dict], image_dir: str | os.PathLike, *, columns: Iterable[str] = IMAGE_COLUMNS,
                      source: str = "the data") -> None:
    """Raise a `GapDataError` listing every row of `rows` (dicts or a `datasets.Dataset`) with an image path in
    `columns` that leaves `image_dir` (the path rule of `validate_row`), without opening any image."""
    columns = list(columns)
    if hasattr(rows, "cast_column"):
        columns = [column for column in columns if column in rows.column_names]
        if not columns:
            return
        rows = undecoded_images(rows.select_columns(columns + (["id"] if "id" in rows.column_names else [])), columns)
    errors = []
    for index, row in enumerate(rows):
        for column in columns:
            problem = _outside_problem(row.get(column) or [], image_dir)
            if problem is not None:
                errors.append(RowProblem(index, column, problem, row.get("id")))
                break
    raise_row_errors(errors, source)


def check_messages(dataset, source: str = "the dataset", batch_size: int = 1000) -> None:
    """Raise a `GapDataError` listing every row of the `datasets.Dataset` whose ``messages`` `messages_problem`
    refuses, reading only that column (and ``id``): for rows checked when they were written, perhaps by an older
    version, before training starts rather than at the step that draws them."""
    columns = ["messages"] + (["id"] if "id" in dataset.column_names else [])
    errors = []
    for start, batch in zip(range(0, len(dataset), batch_size), dataset.select_columns(columns).iter(batch_size)):
        ids = batch.get("id", [None] * len(batch["messages"]))
        for offset, (messages, row_id) in enumerate(zip(batch["messages"], ids)):
            problem = messages_problem(messages)
            if problem is not None:
                errors.append(RowProblem(start + offset, "messages", problem, row_id))
    raise_row_errors(errors, source)


def raise_row_errors(errors: list[RowProblem], source: str) -> None:
    """Raise a `GapDataError` listing `errors` (the first `MAX_LISTED_ERRORS`, then a count), if there are any."""
    if not errors:
        return
    lines = [f"{len(errors)} bad row(s) in {source}:"] + [f"  {e}" for e in errors[:MAX_LISTED_ERRORS]]
    if len(errors) > MAX_LISTED_ERRORS:
        lines.append(f"  ... and {len(errors) - MAX_LISTED_ERRORS} more")
    raise GapDataError("\n".join(lines), errors)


def check_rows(rows: Iterable[dict], *, source: str = "the data", **kwargs) -> None:
    """Raise a `GapDataError` listing every bad row (see `validate_rows` for the keyword arguments)."""
    raise_row_errors(validate_rows(rows, **kwargs), source)


# ---------------------------------------------------------------------------------------------- loaders


def load_jsonl(
    path: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    *,
    validate: bool = True,
    check_images: bool = True,
    allow_outside_image_dir: bool = False,
):
    """Load a JSONL file of rows into a `datasets.Dataset`, images as lazily decoded `datasets.Image` lists.

    Image paths are relative to `image_dir` (default: the file's folder) and must stay inside it unless
    `allow_outside_image_dir`, also without `validate`. With `validate` a `GapDataError` lists the bad rows first.
    String message contents become one-item content lists; rows without ``accuracy`` get None.
    """
    from datasets import Dataset, Image, List

    path = Path(path)
    if not path.is_file():
        raise GapDataError(f"JSONL file not found: {path}")
    folder = Path(image_dir) if image_dir is not None else path.resolve().parent
    rows = []
    for line_number, line in enumerate(utf8_lines(path, GapDataError), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise GapDataError(f"{path}, line {line_number}: not valid JSON ({error.msg}); one object per line") from None
        if not isinstance(row, dict):
            raise GapDataError(f"{path}, line {line_number}: expected a JSON object, got {type(row).__name__}")
        if ANSWER_COLUMN in row:  # one type per column: "3" beside "blue", the item of ["blue"]
            row[ANSWER_COLUMN] = normalize_gold(row[ANSWER_COLUMN], f"{path}, line {line_number}")
        rows.append(row)
    if not rows:
        raise GapDataError(f"{path} holds no rows")
    if validate:
        check_rows(rows, source=str(path), image_dir=folder, check_images=check_images,
                   allow_outside_image_dir=allow_outside_image_dir)
    elif not allow_outside_image_dir:  # the path rule holds even when the rows are validated where they are used
        check_image_paths(rows, folder, source=str(path))
    for row in rows:  # Arrow needs one type per column
        row["messages"] = [
            {**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str) else m
            for m in row["messages"]
        ]
        for column in IMAGE_COLUMNS:
            row[column] = [str(_resolve(p, folder)) if isinstance(p, str) else p for p in (row.get(column) or [])]
        row["accuracy"] = None if row.get("accuracy") is None else float(row["accuracy"])
    dataset = Dataset.from_list(rows)
    for column in IMAGE_COLUMNS:
        dataset = dataset.cast_column(column, List(Image()))
    return dataset


def from_dataset(
    dataset,
    *,
    image_dir: str | os.PathLike | None = None,
    validate: bool = True,
    check_images: bool = True,
    source: str = "the dataset",
    allow_outside_image_dir: bool = False,
):
    """Check any `datasets.Dataset` of this schema and return it with image columns as `datasets.Image` lists.

    String image entries are resolved against `image_dir` (default: the working directory) and, when it is
    given, must stay inside it unless `allow_outside_image_dir`; a command reading a dataset folder passes the folder
    (`dataset_base_dir`) unless told another. A `GapDataError` lists the bad rows.
    """
    from datasets import Image, List, Value

    if validate:
        check_rows(dataset, source=source, image_dir=image_dir, check_images=check_images,
                   allow_outside_image_dir=allow_outside_image_dir)
    for column in IMAGE_COLUMNS:
        if column not in dataset.column_names:
            continue
        inner = getattr(dataset.features[column], "feature", None)
        if isinstance(inner, Value) and inner.dtype in ("string", "large_string"):
            folder = image_dir
            dataset = dataset.map(
                lambda values: {column: [[str(_resolve(p, folder)) for p in row] for row in values]},
                input_columns=[column],
                batched=True,
                desc=f"resolving {column}",
            )
            dataset = dataset.cast_column(column, List(Image()))
    return dataset

