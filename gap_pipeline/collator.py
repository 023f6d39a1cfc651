"""Batches for GAP training: `GapDataCollator`.

The collator turns rows of the GAP schema (`gap_pipeline.data`) plus their precomputed ``latent_targets``
(`gap targets`) into the inputs of `GapForConditionalGeneration.forward`:

* ``input_ids``, ``attention_mask``: the chat template's rendering of ``messages`` (`GapProcessor`), each
  ``<latent>`` expanded to ``<|latent_start|>`` + K x ``<|latent_pad|>`` + ``<|latent_end|>`` and each image to
  its ``<|image_pad|>`` tokens; right padding with the tokenizer's pad token.
* ``labels``: the token ids on assistant content and each assistant turn's closing ``<|im_end|>`` (latent
  start/end tokens included), -100 on the prompt, padding and ``<|latent_pad|>`` tokens.
* ``mm_token_type_ids``: 1 on ``<|image_pad|>`` tokens, 0 elsewhere (latent tokens are text for M-RoPE).
* ``pixel_values``, ``image_grid_thw``: when any row has images; taken from a row's precomputed columns (the
  image processor's output for its images) when present, from the image processor otherwise (with a
  `feature_cache`, images whose features it holds have a grid and no pixels; see `GapDataCollator`).
* ``latent_embeds``: (n_latent, d) float32, the targets of every kept span, concatenated in the row-major
  order of the ``<|latent_pad|>`` tokens; present when any row keeps latents.

Difficulty-aware assignment (paper Eq. 4, App. F): a row whose ``accuracy`` is above
``difficulty_threshold`` (tau) loses its latent spans (the placeholders are removed from the assistant text,
see `gap_pipeline.data.strip_latent_placeholders` for the whitespace rule) and its targets are dropped: it
trains on text only. ``accuracy <= tau`` or no accuracy keeps them.

Errors name the row (its position in the batch and its ``id`` if it has one) and the fix; they are
`gap_pipeline.data.GapDataError` (a `ValueError`).

Imports only torch, numpy, PIL and transformers (not TRL).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from modeling_gap import IGNORE_INDEX
from processing_gap import GAP_CHAT_TEMPLATE, LATENT_PLACEHOLDER, GapProcessor

from . import GapError
from .data import (
    TARGETS_COLUMN,
    GapDataError,
    accuracy_problem,
    aux_count_problem,
    count_image_entries,
    count_latent_placeholders,
    image_count_problem,
    load_image,
    messages_problem,
    row_name,
    strip_latent_spans,
)

__all__ = ["GapDataCollator", "ImageFeatureCache"]


def _is_gap_processor(processor) -> bool:
    return type(processor).__name__ == "GapProcessor" and all(
        hasattr(processor, name) for name in ("latent_tokens_per_span", "encode_conversation", "tokenizer")
    )


def _as_gap_processor(processor, latent_tokens_per_span):
    """`processor` as a GapProcessor with K = `latent_tokens_per_span` (sharing tokenizer and image processor)."""
    # A GapProcessor from AutoProcessor(trust_remote_code=True) is the class of the checkpoint's own
    # processing_gap.py (a `transformers_modules` copy), not this repository's: recognise it by its interface.
    if isinstance(processor, GapProcessor) or _is_gap_processor(processor):
        if latent_tokens_per_span is None or latent_tokens_per_span == processor.latent_tokens_per_span:
            return processor
        return type(processor)(
            image_processor=processor.image_processor,
            tokenizer=processor.tokenizer,
            chat_template=processor.chat_template,
            latent_tokens_per_span=latent_tokens_per_span,
        )
    if latent_tokens_per_span is None:
        raise GapError(
            f"{type(processor).__name__} is not a GapProcessor, so it does not know K: pass "
            "`latent_tokens_per_span`, or build the processor with GapProcessor.from_qwen2_5_vl_processor."
        )
    # A plain Qwen2.5-VL processor whose tokenizer holds the latent tokens: use GAP's chat template (it marks
    # assistant turns for the labels); the processor's own template is left untouched.
    return GapProcessor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        chat_template=GAP_CHAT_TEMPLATE,
        latent_tokens_per_span=latent_tokens_per_span,
    )


def _present(row: dict, key: str) -> bool:
    value = row.get(key)
    if value is None:
        return False
    return not (isinstance(value, (list, tuple)) and len(value) == 0)


def _cache_key(messages: list[dict], image_grid_thw: torch.Tensor | None) -> tuple[str, tuple] | None:
    """What a conversation's tokens depend on: its messages (as JSON) and its images' grids; None when a message
    holds something JSON cannot write (such a row is tokenized every time)."""
    try:
        text = json.dumps(messages)
    except (TypeError, ValueError):
        return None
    return text, () if image_grid_thw is None else tuple(image_grid_thw.flatten().tolist())


def _image_key(image, settings: str) -> str | None:
    """A digest of an image's content (its file's or entry's encoded bytes, or a PIL image's mode, size and pixels)
    and of the image processor's `settings`; None when the file cannot be read (loading it then says why)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        data = f"{image.mode} {image.size}".encode() + image.tobytes()
    elif isinstance(image, dict) and image.get("bytes") is not None:
        data = bytes(image["bytes"])
    else:
        path = image.get("path") if isinstance(image, dict) else image
        if not isinstance(path, (str, os.PathLike)):
            return None
        try:
            data = Path(path).read_bytes()
        except OSError:
            return None
    digest = hashlib.blake2b(settings.encode(), digest_size=16)
    digest.update(data)
    return digest.hexdigest()


def _load_rgb(image, name: str):
    """`image` (a path, a {"bytes", "path"} entry or a PIL image) as an RGB PIL image; `name` names it in the error."""
    try:
        return load_image(image).convert("RGB")
    except (OSError, TypeError, ValueError) as error:
        raise GapDataError(f"{name} cannot be loaded ({error}).") from None


class ImageFeatureCache:
    """The frozen vision tower's features of each image, with its ``image_grid_thw`` row, keyed by the image's content.

    `GapSFTTrainer` fills it (the tower's output for every image it encodes) and lends it to its `GapDataCollator`
    during `train()`; the collator then gives a known image no pixels and the trainer takes its features from here.
    Valid only while the tower's weights do not change: the trainer uses it with a frozen tower only and empties it
    when `train()` starts. Holds at most `max_bytes` of features (on the CPU); once full, new images are not added
    and nothing is evicted, so a copy held by a dataloader worker never claims an image the trainer's cache lacks.
    """

    def __init__(self, max_bytes: int):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise GapError(f"`max_bytes` must be an integer >= 0, got {max_bytes!r}.")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(features, grid) of the image with content key `key`, or None."""
        return self._entries.get(key)

    def add(self, key: str, features: torch.Tensor, grid: torch.Tensor) -> None:
        """Keep a CPU copy of `features` (the tower's output for one image) and its (3,) `grid`, if they fit."""
        size = features.numel() * features.element_size()
        if key in self._entries or self.nbytes + size > self.max_bytes:
            return
        self._entries[key] = features.detach().to("cpu", copy=True), grid.detach().to("cpu", copy=True)
        self.nbytes += size

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0


def _to_tensor(value, dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(dtype)
    array = np.asarray(value)
    if array.dtype == object:  # a numpy-formatted list-of-lists column: an object array of row arrays
        array = np.stack([np.asarray(v, dtype=np.float64) for v in array]) if array.size else np.zeros((0,))
    return torch.from_numpy(np.array(array, copy=True)).to(dtype)


class GapDataCollator:
    """Collate GAP rows into a training batch (see the module docstring for what each tensor holds).

    Args:
        processor: a `GapProcessor`, or a Qwen2.5-VL processor whose tokenizer holds the latent tokens
            (then `latent_tokens_per_span` is required and GAP's chat template is used).
        difficulty_threshold: tau of Eq. 4; rows with ``accuracy > tau`` train on text only. Default 0.
        max_length: the longest allowed row in tokens; a longer row is an error (a row is never truncated:
            a cut could fall inside an image or a latent span). None: no limit.
        latent_tokens_per_span: K; default the processor's.
        cache_tokens: rows repeat every epoch, so the collator keeps each row's token ids and labels (keyed by its
            messages, after difficulty-aware stripping, and its images' grids) and renders and tokenizes it once,
            up to this many tokens in all (16 bytes each: 128 MB at the default 2**23); 0 turns the cache off.
            With dataloader workers each worker holds its own cache (`dataloader_persistent_workers` keeps it
            across epochs).

    `feature_cache` (an `ImageFeatureCache`, None by default; `GapSFTTrainer.train()` lends it its own): an image
    whose features it holds gets no pixels (its grid comes from the cache), and the batch also holds ``image_keys``
    (each image's content key, None for precomputed pixels) and ``cached_images`` (bool per image: its features come
    from the cache). Only `GapSFTTrainer` reads such a batch: the model alone would see no pixels for those images.

    Rows are dicts with ``messages`` and, as needed, ``images``, ``aux_images``, ``accuracy``,
    ``latent_targets`` ((n_spans * K, d) or (n_spans, K, d)), ``pixel_values`` / ``image_grid_thw``
    (the image processor's output for the row's images, precomputed) and ``id``.
    """

    def __init__(
        self, processor, *, difficulty_threshold=0.0, max_length=None, latent_tokens_per_span=None, cache_tokens=2**23
    ):
        if isinstance(difficulty_threshold, bool) or not isinstance(difficulty_threshold, (int, float)) or (
            not math.isfinite(difficulty_threshold)
        ):
            raise GapDataError(f"`difficulty_threshold` must be a finite number (tau of Eq. 4), got {difficulty_threshold!r}.")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
            raise GapDataError(f"`max_length` must be a positive integer or None, got {max_length!r}.")
        if isinstance(cache_tokens, bool) or not isinstance(cache_tokens, int) or cache_tokens < 0:
            raise GapDataError(f"`cache_tokens` must be an integer >= 0 (0: no cache), got {cache_tokens!r}.")
        self.processor = _as_gap_processor(processor, latent_tokens_per_span)
        self.difficulty_threshold = float(difficulty_threshold)
        self.max_length = max_length
        self.latent_tokens_per_span = self.processor.latent_tokens_per_span
        self.pad_token_id = self.processor.tokenizer.pad_token_id
        if self.pad_token_id is None:
            raise GapDataError("The tokenizer has no pad token; set one (Qwen2.5-VL pads with <|endoftext|>).")
        self.image_token_id = self.processor.image_token_id
        self.latent_pad_token_id = self.processor.latent_pad_token_id
        self.cache_tokens = cache_tokens
        self._token_cache: dict[tuple[str, tuple], tuple[torch.Tensor, torch.Tensor]] = {}
        self._cached_tokens = 0
        self.feature_cache: ImageFeatureCache | None = None
        self._image_settings = self.processor.image_processor.to_json_string()  # part of every image's cache key

    # -- per row -----------------------------------------------------------------------------------------
    def keeps_latents(self, row: dict) -> bool:
        """Eq. 4: True (latent supervision) when the row has no accuracy or ``accuracy <= tau``."""
        accuracy = row.get("accuracy")
        return accuracy is None or not accuracy > self.difficulty_threshold

    def _targets(self, row: dict, n_spans: int, name: str) -> torch.Tensor | None:
        """The row's (n_spans * K, d) float32 targets (None for a row without spans)."""
        K = self.latent_tokens_per_span
        has_targets = _present(row, TARGETS_COLUMN)
        if n_spans == 0:
            if has_targets and _to_tensor(row[TARGETS_COLUMN], torch.float32).numel() > 0:
                raise GapDataError(
                    f"{name}: has 'latent_targets' but no {LATENT_PLACEHOLDER} placeholder in its assistant "
                    "text; recompute the targets with `gap targets` after fixing the row."
                )
            return None
        if not has_targets:
            if _present(row, "aux_images"):
                raise GapDataError(
                    f"{name}: has 'aux_images' but no 'latent_targets'; run `gap targets` to compute them "
                    "(frozen vision tower over the aux images) and train on its output dataset."
                )
            raise GapDataError(
                f"{name}: has {n_spans} {LATENT_PLACEHOLDER} placeholder(s) but neither 'aux_images' nor "
                "'latent_targets'; add one aux image per placeholder and run `gap targets`."
            )
        targets = _to_tensor(row[TARGETS_COLUMN], torch.float32)
        if targets.ndim == 3:
            targets = targets.reshape(-1, targets.shape[-1])
        if targets.ndim != 2 or targets.shape[0] != n_spans * K:
            raise GapDataError(
                f"{name}: 'latent_targets' has shape {tuple(targets.shape)} but {n_spans} placeholder(s) x K={K} "
                f"need ({n_spans * K}, d); recompute them with `gap targets` for K={K}."
            )
        if not torch.isfinite(targets).all():
            raise GapDataError(f"{name}: 'latent_targets' contain NaN or inf; recompute them (e.g. --dtype float32).")
        return targets

    def encode_row(self, row: dict, index: int = 0) -> dict:
        """One row checked and made ready to tokenize; its images are counted, not processed.

        Returns ``{"name" (for errors), "messages" (spans stripped when above tau), "latent_targets" (or None),
        "images" (the row's images, or None when precomputed), "pixel_values", "image_grid_thw" (precomputed or
        None)}``.
        """
        name = row_name(index, row.get("id"), where="batch row")
        messages = row.get("messages")
        # The row schema is the validator's (gap_pipeline.data); aux images may be gone once targets exist.
        message_problem = messages_problem(messages)
        n_spans = count_latent_placeholders(messages) if message_problem is None else 0
        for field, problem in (
            ("messages", message_problem),
            ("accuracy", accuracy_problem(row.get("accuracy"))),
            ("aux_images", aux_count_problem(n_spans, len(row["aux_images"])) if _present(row, "aux_images") else None),
        ):
            if problem is not None:
                raise GapDataError(f"{name}, field '{field}': {problem}.")

        if self.keeps_latents(row):
            targets = self._targets(row, n_spans, name)
        else:
            messages = strip_latent_spans(list(messages))
            targets = None

        n_image_entries = count_image_entries(messages)
        pixel_values = grid = images = None
        if _present(row, "pixel_values") or _present(row, "image_grid_thw"):
            if not (_present(row, "pixel_values") and _present(row, "image_grid_thw")):
                raise GapDataError(f"{name}: has only one of 'pixel_values' / 'image_grid_thw'; precompute both with the image processor.")
            pixel_values = _to_tensor(row["pixel_values"], torch.float32)
            grid = _to_tensor(row["image_grid_thw"], torch.long).reshape(-1, 3)
            if grid.shape[0] != n_image_entries or pixel_values.shape[0] != int(grid.prod(-1).sum()):
                raise GapDataError(
                    f"{name}: precomputed 'image_grid_thw' describes {grid.shape[0]} image(s) / "
                    f"{int(grid.prod(-1).sum())} patches but the row has {n_image_entries} image entries and "
                    f"{pixel_values.shape[0]} patch rows; precompute them again with the image processor."
                )
        else:
            images = list(row.get("images") or [])
            problem = image_count_problem(n_image_entries, len(images))
            if problem is not None:
                raise GapDataError(f"{name}, field 'images': {problem}.")
        return {
            "name": name,
            "messages": messages,
            "latent_targets": targets,
            "images": images,
            "pixel_values": pixel_values,
            "image_grid_thw": grid,
        }

    # -- batch -------------------------------------------------------------------------------------------
    def _process_images(self, encoded: list[dict]) -> torch.Tensor | None:
        """Run the image processor once over the images of every row that has no precomputed pixels, less those
        whose features `feature_cache` holds (their grids come from it and they get no pixels).

        Sets those rows' ``image_grid_thw``, ``image_keys`` and ``cached`` (and ``pixel_values``, as views of the
        processor's output, when another row of the batch brings precomputed pixels). When no row does, the
        processor's ``pixel_values`` already are the batch's, in row order, and are returned; otherwise None.
        """
        todo = [item for item in encoded if item["images"]]
        settings = self._image_settings if self.feature_cache is not None else ""
        flat, slots = [], []  # the images to process, and (row, grids of the row) for each
        for item in todo:
            grids = []
            item["image_keys"] = [_image_key(image, settings) if settings else None for image in item["images"]]
            for k, (image, key) in enumerate(zip(item["images"], item["image_keys"])):
                hit = self.feature_cache.get(key) if key is not None else None
                grids.append(None if hit is None else hit[1])
                if hit is None:
                    flat.append(_load_rgb(image, f"{item['name']}: image {k}"))
                    slots.append((item, grids))
            item["cached"] = [grid is not None for grid in grids]
            item["image_grid_thw"] = grids
        pixel_values = None
        if flat:
            out = self.processor.image_processor(images=flat, return_tensors="pt")
            pixel_values, processed = out["pixel_values"], out["image_grid_thw"].to(torch.long)
            for (item, grids), grid in zip(slots, processed):
                grids[grids.index(None)] = grid
        for item in todo:
            item["image_grid_thw"] = torch.stack(item["image_grid_thw"])
        mixed = any(item["pixel_values"] is not None for item in encoded)
        if mixed and pixel_values is not None:
            patch = 0
            for item in todo:
                grids = item["image_grid_thw"][~torch.tensor(item["cached"])]
                rows_patches = int(grids.prod(-1).sum())
                item["pixel_values"] = pixel_values[patch : patch + rows_patches] if rows_patches else None
                patch += rows_patches
        return None if mixed else pixel_values

    def _tokens(self, messages: list[dict], image_grid_thw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) of one conversation, kept for its next collation while `cache_tokens` allows."""
        key = _cache_key(messages, image_grid_thw)
        cached = self._token_cache.get(key) if key is not None else None
        if cached is not None:
            return cached
        tokens = self.processor.encode_conversation(messages, image_grid_thw=image_grid_thw)
        ids = torch.tensor(tokens["input_ids"], dtype=torch.long)
        supervised = torch.tensor(tokens["assistant_masks"], dtype=torch.bool) & (ids != self.latent_pad_token_id)
        labels = torch.where(supervised, ids, IGNORE_INDEX)
        if key is not None and self._cached_tokens + len(ids) <= self.cache_tokens:
            self._token_cache[key] = ids, labels
            self._cached_tokens += len(ids)
        return ids, labels

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if not rows:
            raise GapDataError("The collator got an empty batch.")
        encoded = [self.encode_row(row, index) for index, row in enumerate(rows)]
        processed = self._process_images(encoded)

        sequences, labels = [], []
        for item in encoded:
            ids, row_labels = self._tokens(item["messages"], item["image_grid_thw"])
            if self.max_length is not None and len(ids) > self.max_length:
                raise GapDataError(
                    f"{item['name']}: is {len(ids)} tokens long, more than max_length={self.max_length}; rows are "
                    "never truncated (a cut could split an image or a latent span): raise max_length, shrink its "
                    "images (image processor max_pixels) or drop the row."
                )
            sequences.append(ids)
            labels.append(row_labels)

        input_ids = pad_sequence(sequences, batch_first=True, padding_value=self.pad_token_id)  # right padding
        lengths = torch.tensor([len(ids) for ids in sequences])
        attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
            "mm_token_type_ids": ((input_ids == self.image_token_id) & attention_mask.bool()).long(),
        }

        with_images = [item for item in encoded
                       if item["image_grid_thw"] is not None and item["image_grid_thw"].numel()]
        if with_images:
            batch["image_grid_thw"] = torch.cat([item["image_grid_thw"] for item in with_images])
            with_pixels = [item["pixel_values"] for item in with_images if item["pixel_values"] is not None]
            if processed is not None:  # no precomputed pixels: the image processor's output is the batch's
                batch["pixel_values"] = processed
            elif with_pixels:
                batch["pixel_values"] = torch.cat(with_pixels)
            if self.feature_cache is not None:  # rows with precomputed pixels have no key and are never cached
                n_images = [len(item["image_grid_thw"]) for item in with_images]
                batch["image_keys"] = [key for item, n in zip(with_images, n_images)
                                       for key in item.get("image_keys") or [None] * n]
                batch["cached_images"] = torch.tensor([hit for item, n in zip(with_images, n_images)
                                                       for hit in item.get("cached") or [False] * n])

        targets = [item["latent_targets"] for item in encoded if item["latent_targets"] is not None]
        if targets:
            widths = {t.shape[1] for t in targets}
            if len(widths) > 1:
                raise GapDataError(
                    f"The batch mixes latent targets of widths {sorted(widths)}; every target must have the model's "
                    "hidden size d (recompute them all with one model)."
                )
            batch["latent_embeds"] = torch.cat(targets)
            n_pads = int((input_ids == self.latent_pad_token_id).sum())
            if n_pads != batch["latent_embeds"].shape[0]:  # the tokenizer split a span: a processor/tokenizer bug
                raise GapDataError(
                    f"The batch holds {n_pads} <|latent_pad|> tokens but {batch['latent_embeds'].shape[0]} targets; "
                    "check that the tokenizer keeps the latent tokens whole (use the checkpoint's tokenizer)."
                )
        return batch

