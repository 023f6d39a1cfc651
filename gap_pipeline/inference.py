"""Loading a model folder and turning dataset rows into encoded generation prompts (``gap difficulty``,
``gap evaluate``, ``gap norm-profile``, ``gap audit``).

``datasets`` stores a list of content items as one struct type, so a text item read back from Arrow is
``{"type": "text", "text": "...", "image": None}``; Qwen2.5-VL chat templates test ``'image' in item`` and would
render it as an image. :func:`clean_messages` drops None-valued keys before rendering.
"""

from __future__ import annotations

import json
import os
from itertools import takewhile
from pathlib import Path
from typing import Any
from collections.abc import Mapping, Sequence

import torch
from transformers import AutoConfig, PretrainedConfig, Qwen2_5_VLConfig

from configuration_gap import GapConfig

from . import GapError
from .data import (IMAGE_COLUMNS, check_image_paths, count_image_entries, dataset_base_dir, load_image, load_jsonl,
                   messages_of, special_token_problem)
from .datasets_io import check_safetensors, load_dataset_folder, read_json_file

__all__ = [
    "RowError",
    "check_checkpoint_files",
    "check_model_folder",
    "checkpoint_model_type",
    "clean_messages",
    "encode_prompts",
    "generate_texts",
    "load_model_and_processor",
    "load_rows",
    "model_type_of",
    "open_image",
    "prompt_of_row",
    "question_of_row",
    "resolve_device",
    "resolve_dtype",
]

GAP_MODEL_TYPE = GapConfig.model_type
QWEN_MODEL_TYPE = Qwen2_5_VLConfig.model_type
DTYPES = ("auto", "float32", "bfloat16", "float16")


class RowError(GapError):
    """A dataset row that cannot be used as it is; the message names the row and the fix."""


def load_rows(path: str | os.PathLike, split: str | None = None, *, image_columns: Sequence[str] = ("images",),
              allow_outside_image_dir: bool = False):
    """A ``datasets.Dataset`` from a ``save_to_disk`` folder (one split) or a ``.jsonl``/``.json``/``.parquet`` file.

    Image paths (a JSONL's ``images``/``aux_images``, and `image_columns`) must stay inside the data's folder
    (`dataset_base_dir`) unless `allow_outside_image_dir`: a `GapDataError` names the rows, before any image is opened.
    """
    import datasets

    p = Path(path)
    if not p.exists():
        raise GapError(f"dataset not found: {p}")
    if p.is_dir():
        dataset = load_dataset_folder(p, split, GapError, "{path} is not a dataset folder written by "
                                      "Dataset.save_to_disk ({exc}); pass such a folder or a .jsonl / .json / .parquet file")
    elif split is not None:
        raise GapError(f"{p} is a single file; drop --split {split}")
    elif p.suffix.lower() == ".jsonl":
        # rows are validated where they are used; load_jsonl checks the paths and makes them absolute
        dataset = load_jsonl(p, validate=False, allow_outside_image_dir=allow_outside_image_dir)
        image_columns = [column for column in image_columns if column not in IMAGE_COLUMNS]  # checked, now absolute
    else:
        builder = {".json": "json", ".parquet": "parquet"}.get(p.suffix.lower())
        if builder is None:
            raise GapError(f"{p}: unsupported dataset file type {p.suffix!r}; use a save_to_disk folder, .jsonl, .json "
                           "or .parquet")
        try:
            dataset = datasets.load_dataset(builder, data_files=str(p), split="train")
        except (ValueError, datasets.exceptions.DatasetGenerationError) as error:  # pyarrow's ArrowInvalid: ValueError
            cause = error.__cause__ or error
            raise GapError(f"{p}: not a readable {builder} dataset file ({str(cause).splitlines()[0]}); fix or "
                           "re-export it") from None
    if not allow_outside_image_dir:
        check_image_paths(dataset, dataset_base_dir(p), columns=image_columns, source=str(p))
    return dataset


def clean_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plain-dict copies of `messages` with None-valued keys dropped from messages and content items."""
    def drop_none(mapping: Mapping[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in dict(mapping).items() if value is not None}

    cleaned = [drop_none(message) for message in messages]
    for item in cleaned:
        if isinstance(item.get("content"), (list, tuple)):
            item["content"] = [drop_none(part) if isinstance(part, Mapping) else part for part in item["content"]]
    return cleaned


def open_image(value: Any, base_dir: str | os.PathLike | None = None, where: str = "image"):
    """An RGB PIL image from a PIL image, a path (relative to `base_dir`), or a ``{"bytes", "path"}`` dict (read by
    :func:`gap_pipeline.data.load_image`); a missing or unreadable image raises :class:`RowError` naming `where`."""
    from PIL import Image, UnidentifiedImageError

    try:
        return load_image(value, base_dir).convert("RGB")
    except Image.DecompressionBombError as exc:
        raise RowError(f"{where}: too large to decode safely ({exc}); shrink the image, or raise --max-image-pixels if "
                       "it is trusted") from None
    except FileNotFoundError as exc:
        raise RowError(
            f"{where}: image file {exc.filename} does not exist (relative paths are resolved against {base_dir})"
        ) from None
    except (OSError, UnidentifiedImageError, TypeError, ValueError) as exc:
        raise RowError(
            f"{where}: cannot read the image ({exc}); store PIL images (datasets.Image), file paths, or "
            "{'bytes': ..., 'path': ...} dicts"
        ) from None


def question_of_row(row: Mapping[str, Any], index: int, messages_column: str = "messages") -> list[dict[str, Any]]:
    """The question of a row: its cleaned messages before the first assistant turn. A row without a user turn, or
    whose question holds text that would forge structure (`special_token_problem`), raises :class:`RowError` naming
    row `index`; opens no image, so a command can check every row's question before any heavy work."""
    raw = messages_of(row, index, messages_column, RowError)
    if raw is None:
        raise RowError(
            f"row {index} has no '{messages_column}' field; rows need TRL's conversational format "
            f"(a list of {{'role', 'content'}} messages)"
        )
    prompt = list(takewhile(lambda message: message.get("role") != "assistant", clean_messages(raw)))
    if not any(message.get("role") == "user" for message in prompt):
        raise RowError(
            f"row {index} has no user turn before its first assistant turn; the question must be a user message"
        )
    problem = special_token_problem(prompt)
    if problem is not None:
        raise RowError(f"row {index}, field '{messages_column}': {problem}")
    return prompt


def prompt_of_row(
    row: Mapping[str, Any],
    index: int,
    *,
    messages_column: str = "messages",
    images_column: str = "images",
    base_dir: str | os.PathLike | None = None,
) -> tuple[list[dict[str, Any]], list]:
    """``(messages, images)``: the row's question (`question_of_row`), and the first n of its images opened, n being
    the number of image items in those messages (TRL's order). A row with fewer images than it refers to raises
    :class:`RowError` naming row `index`, like a bad question."""
    prompt = question_of_row(row, index, messages_column)
    n_images = count_image_entries(prompt)
    images = list(row.get(images_column) or [])
    if len(images) < n_images:
        raise RowError(
            f"row {index}: its question refers to {n_images} image(s) but '{images_column}' holds {len(images)}; "
            "add the missing images or remove the image items"
        )
    opened = [open_image(value, base_dir, f"row {index}, image {i}") for i, value in enumerate(images[:n_images])]
    return prompt, opened


def encode_prompts(processor: Any, prompts: Sequence[tuple[list, list]], device: str | torch.device):
    """The processor's batch for `prompts` (``(messages, images)`` pairs, as :func:`prompt_of_row` returns them) on
    `device`: each rendered by the chat template with a generation prompt, the images in order, left-padded (generation
    appends at the end). The one prompt encoding of difficulty sampling, norm profiling and evaluation."""
    texts = [processor.apply_chat_template(messages, add_generation_prompt=True) for messages, _ in prompts]
    images = [image for _, row_images in prompts for image in row_images]
    return processor(text=texts, images=images or None, return_tensors="pt", padding=True,
                     padding_side="left").to(device)


def generate_texts(model: Any, processor: Any, inputs: Mapping[str, Any], **kwargs: Any) -> tuple[Any, list[str]]:
    """``(output, texts)``: ``model.generate(**inputs, **kwargs)`` without gradients, and the tokens it added to each
    sequence decoded without special tokens (a tensor output or a ``return_dict_in_generate`` one)."""
    with torch.no_grad():
        output = model.generate(**inputs, **kwargs)
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    return output, processor.batch_decode(sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The one device rule of the steps: ``"auto"`` -> CUDA when available, else CPU; ``None`` -> CPU. An explicit
    CUDA device without CUDA is an error, not a silent fallback."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GapError(
            f"device {str(device)!r} was requested but CUDA is not available; use --device cpu (or --device auto to "
            "pick CUDA only when present)"
        )
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype:
    """``"auto"`` (the checkpoint's dtype) or a torch dtype from its name."""
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise GapError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return getattr(torch, dtype)


# What to do about a damaged checkpoint file (a truncated or garbage config.json, index or weight file).
DAMAGED_CHECKPOINT = "the checkpoint is damaged (a copy or save cut short?): copy or save the checkpoint again"


def model_type_of(path: str | os.PathLike) -> str:
    """The ``model_type`` in ``path/config.json``."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise GapError(f"{path} is not a model folder: it has no config.json")
    return str(read_json_file(config_path, GapError, DAMAGED_CHECKPOINT).get("model_type", ""))


def check_checkpoint_files(folder: Path, error_cls: type[GapError] = GapError) -> None:
    """One `error_cls` naming the file when the checkpoint `folder`'s config.json, weight index or a safetensors
    weight file is damaged (does not parse, or a weight file's header does not cover it) or listed but missing.
    Reads the headers only."""
    read_json_file(folder / "config.json", error_cls, DAMAGED_CHECKPOINT)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_file(index, error_cls, DAMAGED_CHECKPOINT).get("weight_map")
        if not isinstance(weight_map, dict):
            raise error_cls(f"{index} has no weight_map; {DAMAGED_CHECKPOINT}")
        files = sorted({folder / str(name) for name in weight_map.values()})
    else:
        files = [file for file in (folder / "model.safetensors",) if file.exists()]
    for file in files:
        if not file.is_file():
            raise error_cls(f"{file}, listed in {index.name}, is missing; {DAMAGED_CHECKPOINT}")
        check_safetensors(file, error_cls, DAMAGED_CHECKPOINT)


def check_model_folder(path: str | os.PathLike, flag: str, error_cls: type[GapError] = GapError, *,
                       hub_id_ok: bool = False) -> None:
    """One `error_cls` naming `flag` when `path` is not a checkpoint folder (missing, or without config.json), or
    naming the file when one is damaged (`check_checkpoint_files`), raised before a step reads or writes anything,
    so a mistyped folder never becomes a Hub download or a traceback. With `hub_id_ok` a name that does not look
    like a path (``org/name``) is left to the Hub."""
    path = str(path)
    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or "\\" in path
    if hub_id_ok and not looks_local:
        return
    folder = Path(os.path.expanduser(path))
    if not folder.is_dir():
        raise error_cls(f"{flag} {path}: no such folder; pass the folder of a GAP or Qwen2.5-VL checkpoint"
                        f"{' (or a Hub id)' if hub_id_ok else ''}.")
    if not (folder / "config.json").is_file():
        raise error_cls(f"{flag} {path}: the folder has no config.json; pass the checkpoint folder itself (the one "
                        "holding config.json and the weights).")
    check_checkpoint_files(folder, error_cls)


def checkpoint_model_type(path: str, revision: str | None = None, error_cls: type[GapError] = GapError) -> str | None:
    """The `model_type` of the checkpoint `path` (a folder or a Hub id); one clear `error_cls` when there is none."""
    check_model_folder(path, "--model_name_or_path", error_cls, hub_id_ok=True)
    try:
        return PretrainedConfig.get_config_dict(path, revision=revision)[0].get("model_type")
    except OSError as error:
        raise error_cls(f"--model_name_or_path {path}: not a local checkpoint folder, and no Hub model could be "
                        f"read ({str(error).splitlines()[0]})") from None


def register_gap_config() -> None:
    """Make ``AutoConfig`` know ``gap_qwen2_5_vl`` from this repository's `configuration_gap`: loading a GAP folder's
    tokenizer goes through ``AutoConfig``, which would otherwise ask whether to trust the folder's remote code."""
    AutoConfig.register(GAP_MODEL_TYPE, GapConfig, exist_ok=True)


def load_processor(path: str | os.PathLike):
    """The processor saved in a model folder: ``GapProcessor`` for GAP folders, Qwen2.5-VL's otherwise."""
    if model_type_of(path) == GAP_MODEL_TYPE:
        from processing_gap import GapProcessor

        register_gap_config()
        return GapProcessor.from_pretrained(str(path))
    from .qwen_processor import load_qwen2_5_vl_processor

    return load_qwen2_5_vl_processor(path)


def load_model_and_processor(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
):
    """``(model, processor, is_gap)`` for a Qwen2.5-VL or GAP folder, the model in eval mode on `device`."""
    model_type = model_type_of(path)
    if model_type == GAP_MODEL_TYPE:
        from modeling_gap import GapForConditionalGeneration as model_class
    elif model_type == QWEN_MODEL_TYPE:
        from transformers import Qwen2_5_VLForConditionalGeneration as model_class
    else:
        raise GapError(
            f"{path} holds a '{model_type}' model; these steps need a Qwen2.5-VL ('{QWEN_MODEL_TYPE}') or GAP "
            f"('{GAP_MODEL_TYPE}') checkpoint folder"
        )
    processor = load_processor(path)
    if model_type == GAP_MODEL_TYPE:  # before the weights load
        check_latent_budgets_agree(path, processor)
    model = model_class.from_pretrained(str(path), dtype=resolve_dtype(dtype))
    model.to(resolve_device(device)).eval()
    return model, processor, model_type == GAP_MODEL_TYPE


def check_latent_budgets_agree(path: str | os.PathLike, processor) -> None:
    """A GAP folder's ``config.json`` and ``processor_config.json`` must give the same K (latent tokens per span): the
    model decodes spans of the one, the processor expands ``<latent>`` into spans of the other."""
    with open(Path(path) / "config.json", encoding="utf-8") as f:
        model_k = json.load(f).get("latent_tokens_per_span")
    processor_k = getattr(processor, "latent_tokens_per_span", None)
    if model_k != processor_k:
        raise GapError(
            f"{path}: config.json has latent_tokens_per_span={model_k} but processor_config.json has {processor_k}; "
            "one folder must give one K: set latent_tokens_per_span in one file to the other's value (the K the model "
            "was trained with)"
        )
