"""Latent targets, computed once (paper §4.1, App. F): ``gap targets``.

Each aux image's merged vision tokens from the *frozen* Qwen2.5-VL vision tower of the base or the GAP model (what
would fill its ``<|image_pad|>`` positions, width d) are reshaped to their grid (t, h/merge, w/merge) from
``image_grid_thw``, adaptive-average-pooled to sqrt(K) x sqrt(K) and read row-major: K x d targets per latent span.

Output (``save_to_disk``): the input dataset plus a column ``latent_targets`` holding, per row, an (n_spans * K, d)
array (spans in placeholder order; (0, d) for a row without spans), stored as ``Array2D(shape=(None, d))`` in float16
by default (``float32``, or ``bfloat16``: values rounded to bfloat16 and stored as float32, since Arrow and numpy have
no bfloat16). ``dataset.info.description`` is a JSON object whose ``"gap_targets"`` entry records the format, K,
sqrt(K), d, the storage dtype, the encoder (its folder and `vision_tower_sha256`), the image-processor settings and
the counts; it travels with the dataset (``load_from_disk``, ``map``, ``select``). `targets_metadata` reads it and
`check_targets_compatible` refuses targets whose K or d disagree with a model config.

Command line::

    gap targets --data train.jsonl [--image-dir imgs/] --model runs/gap-7b --output-dir data/train_targets

Rows are encoded in shards (``--rows-per-shard``), each committed into ``.<output-dir>.cache`` when done; a rerun
of a killed run with the same inputs and settings continues after the last committed shard (`claim_partial_dir`).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from configuration_gap import check_latent_budget

from . import GapError
from .datasets_io import (atomic_output_dir, check_output_dir, claimed_output, load_dataset_folder,
                          write_json_file)
from .data import TARGETS_COLUMN, add_allow_outside_image_dir_argument, add_max_image_pixels_argument, check_messages
from .inference import check_model_folder, resolve_device
from .provenance import data_fingerprint, record_differences

__all__ = [
    "FORMAT_NAME",
    "METADATA_KEY",
    "STORAGE_DTYPES",
    "TARGETS_COLUMN",
    "TargetsError",
    "check_aux_grids",
    "check_targets_compatible",
    "check_targets_encoder",
    "check_vision_tower",
    "claim_partial_dir",
    "committed_shards",
    "compute_latent_targets",
    "encode_images",
    "image_processor_settings",
    "load_vision_tower",
    "merged_grid",
    "pool_latent_grid",
    "targets_for_images",
    "targets_metadata",
    "vision_tower_sha256",
    "vision_tower_state",
]

METADATA_KEY = "gap_targets"
FORMAT_NAME = "gap-latent-targets"
FORMAT_VERSION = 1
STORAGE_DTYPES = ("float16", "float32", "bfloat16")
DEFAULT_ROWS_PER_SHARD = 1000  # rows committed together: what a killed `gap targets` loses at most
RESUME_RECORD = "resume.json"  # in the partial folder: the inputs and settings its shards come from
_IMAGE_PROCESSOR_KEYS = (
    "image_processor_type",
    "size",
    "min_pixels",
    "max_pixels",
    "patch_size",
    "merge_size",
    "temporal_patch_size",
    "image_mean",
    "image_std",
    "resample",
    "do_resize",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "do_convert_rgb",
)


class TargetsError(GapError):
    """Bad input to, or incompatible output of, the latent-target step."""


# ---------------------------------------------------------------------------------------------- pooling


def pool_latent_grid(tokens: torch.Tensor, grid_thw, merge_size: int, latent_tokens_per_span: int, where: str = "the image"):
    """Pool one image's merged vision tokens to K x d latent targets.

    `tokens`: (t * h/merge * w/merge, d) in the vision tower's output order (row-major over the merged
    grid); `grid_thw`: the image's (t, h, w) patch grid. Returns (K, d) float32: adaptive average pooling of
    the (t, h/merge, w/merge) grid to (1, sqrt(K), sqrt(K)), read row-major.
    """
    side = check_latent_budget(latent_tokens_per_span)
    t, h, w = (int(v) for v in grid_thw)
    height, width = h // merge_size, w // merge_size
    if tokens.ndim != 2 or tokens.shape[0] != t * height * width:
        raise TargetsError(
            f"{where}: the vision tower gave {tuple(tokens.shape)} tokens but the grid (t, h, w)={(t, h, w)} with "
            f"merge {merge_size} has {t * height * width}; the image processor and the tower disagree."
        )
    if height < side or width < side:
        raise TargetsError(
            f"{where}: its merged vision grid is {height} x {width} tokens, smaller than the "
            f"sqrt(K) x sqrt(K) = {side} x {side} latent grid (K={latent_tokens_per_span}); use a larger aux "
            f"image (or raise the image processor's min_pixels) or a smaller K."
        )
    d = tokens.shape[1]
    grid = tokens.float().reshape(t, height, width, d).permute(3, 0, 1, 2)  # (d, t, H, W)
    pooled = F.adaptive_avg_pool3d(grid, (1, side, side))  # (d, 1, side, side)
    return pooled.reshape(d, side * side).T.contiguous()


# ---------------------------------------------------------------------------------------------- encoder


def load_vision_tower(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Only the vision tower of a Qwen2.5-VL or GAP checkpoint folder, frozen, in eval mode.

    Reads the ``vision_config`` of ``config.json`` and the ``model.visual.*`` (or legacy ``visual.*``)
    tensors of the safetensors shards, so the language model is never loaded.
    """
    from transformers import Qwen2_5_VLConfig
    from transformers import initialization as init
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise TargetsError(f"{path} has no config.json: pass a Qwen2.5-VL or GAP checkpoint folder as --model.")
    config_dict = json.loads(config_file.read_text())
    if "vision_config" not in config_dict:
        raise TargetsError(f"{config_file} has no vision_config: not a Qwen2.5-VL / GAP checkpoint.")
    vision_config = Qwen2_5_VLConfig(vision_config=config_dict["vision_config"]).vision_config
    state = vision_tower_state(path)
    with init.no_init_weights():
        tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(vision_config)
    missing, unexpected = tower.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise TargetsError(f"{path}: vision-tower weights do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}.")
    tower = tower.to(device=device, dtype=dtype).eval()
    tower.requires_grad_(False)
    return tower


def vision_tower_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The vision-tower tensors (``model.visual.*`` or legacy ``visual.*``, prefix removed) of a checkpoint folder's
    safetensors files, as stored."""
    from safetensors import safe_open

    path = Path(path)
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise TargetsError(f"{path} holds no *.safetensors weights.")
    state = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                if prefix := re.match(r"(model\.)?visual\.", key):
                    state[key[prefix.end() :]] = f.get_tensor(key)
    if not state:
        raise TargetsError(f"{path}: no vision-tower weights (model.visual.* / visual.*) in its safetensors files.")
    return state


def vision_tower_sha256(path: str | os.PathLike) -> str:
    """A content hash of a checkpoint folder's vision-tower weights: names, shapes and values as float32, so the same
    tower stored in bfloat16 or float32 (a converted GAP checkpoint, its base) hashes the same. Computed once per
    process for a folder whose weight files have not changed (it reads the whole tower)."""
    folder = Path(path).resolve()
    files = tuple((file.name, file.stat().st_size, file.stat().st_mtime_ns) for file in sorted(folder.glob("*.safetensors")))
    return _vision_tower_sha256(str(folder), files)


@functools.lru_cache(maxsize=8)
def _vision_tower_sha256(folder: str, files: tuple) -> str:  # `files`: the weight files' names, sizes and times
    digest = hashlib.sha256()
    for name, tensor in sorted(vision_tower_state(folder).items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor.to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_vision_tower(recorded: str | None, recorded_from: Any, model_path: str | os.PathLike, *, what: str,
                       where: str, fix: str, unrecorded: str) -> None:
    """Refuse an artifact made from another vision tower than the one in the checkpoint folder `model_path`: the
    `vision_tower_sha256` it records (`recorded`, of the folder `recorded_from`) against the model's. `what` names the
    artifact with its verb ("the latent targets come", "the PCA basis was fitted on targets"), `where` its file, `fix`
    the way out; an artifact that records no tower (why:
    `unrecorded`), or a model that is not a local folder, only gets a warning, since nothing can be compared."""
    from transformers.utils import logging

    if recorded is None or not Path(model_path).is_dir():
        reason = unrecorded if recorded is None else f"{model_path} is not a local folder"
        logging.get_logger(__name__).warning(
            f"{where}: cannot check that {what} from the vision tower of {model_path}: {reason}.")
        return
    actual = vision_tower_sha256(model_path)
    if recorded != actual:
        raise TargetsError(
            f"{where}: {what} from another vision tower (sha256 {recorded[:16]}, of {recorded_from}) than the "
            f"model's ({actual[:16]}, of {model_path}); {fix}."
        )


def tower_dtype(model_dtype: str, device: torch.device) -> str:
    """The vision tower's dtype name for ``--model-dtype``: ``"auto"`` is bfloat16 on CUDA, float32 elsewhere."""
    if model_dtype == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return model_dtype


def _merge_size(encoder) -> int:
    """The spatial merge size of a vision tower, or of a whole model's."""
    return int(getattr(encoder, "spatial_merge_size", None) or encoder.config.vision_config.spatial_merge_size)


def _hidden_size(encoder) -> int:
    """d: the width of the merged vision tokens (a whole model's text hidden size, a tower's ``out_hidden_size``)."""
    config = encoder.config
    return int(config.text_config.hidden_size if hasattr(config, "text_config") else config.out_hidden_size)


@torch.no_grad()
def encode_images(encoder, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
    """Merged vision tokens of each image: a list of (n_i, d) tensors.

    `encoder` is a Qwen2.5-VL / GAP model (``get_image_features(...).pooler_output``) or its vision tower
    (``model.model.visual``, or `load_vision_tower`).
    """
    parameter = next(encoder.parameters())
    pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
    image_grid_thw = image_grid_thw.to(parameter.device)
    if hasattr(encoder, "get_image_features"):
        return list(encoder.get_image_features(pixel_values, image_grid_thw).pooler_output)
    merged = encoder(pixel_values, grid_thw=image_grid_thw).pooler_output
    sizes = (image_grid_thw.prod(-1) // _merge_size(encoder) ** 2).tolist()
    return list(torch.split(merged, sizes))


def targets_for_images(encoder, image_processor, images, latent_tokens_per_span: int, names=None):
    """(K, d) float32 targets of each PIL image, encoded in one batch; `names` label errors per image."""
    if not images:
        return []
    processed = image_processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
    grids = processed["image_grid_thw"]
    features = encode_images(encoder, processed["pixel_values"], grids)
    merge = _merge_size(encoder)
    return [
        pool_latent_grid(tokens, grid.tolist(), merge, latent_tokens_per_span, where=(names[i] if names else f"image {i}"))
        for i, (tokens, grid) in enumerate(zip(features, grids))
    ]


def merged_grid(image_processor, height: int, width: int) -> tuple[int, int]:
    """The merged vision grid (rows, columns) of a `height` x `width` image: the Qwen2-VL image processor's resize
    (transformers' `smart_resize` with its patch and merge sizes and pixel bounds), over patch x merge pixels."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # needs no torchvision

    factor = image_processor.patch_size * image_processor.merge_size
    resized = smart_resize(height, width, factor, min_pixels=image_processor.size["shortest_edge"],
                           max_pixels=image_processor.size["longest_edge"])
    return resized[0] // factor, resized[1] // factor


def check_aux_grids(dataset, image_processor, latent_tokens_per_span: int) -> None:
    """Refuse, in one error listing every one, the aux images whose merged grid is smaller than sqrt(K) x sqrt(K),
    before anything is encoded: only the image headers are read (their sizes)."""
    from PIL.Image import DecompressionBombError

    from .data import load_image, row_name, undecoded_images

    side = check_latent_budget(latent_tokens_per_span)
    columns = ["aux_images"] + (["id"] if "id" in dataset.column_names else [])
    view = undecoded_images(dataset.select_columns(columns), ["aux_images"])
    small, count = [], 0
    for index, row in enumerate(view):
        for k, image in enumerate(row["aux_images"] or []):
            count += 1
            try:
                width, height = load_image(image).size
                grid = merged_grid(image_processor, height, width)
            except (OSError, TypeError, ValueError, DecompressionBombError):
                continue  # named, with the reason, when the image is encoded
            if min(grid) < side:
                small.append(f"{row_name(index, row.get('id'))}, aux image {k}: {width} x {height} pixels, "
                             f"{grid[0]} x {grid[1]} merged tokens")
    if small:
        listed = "; ".join(small[:20]) + (f"; and {len(small) - 20} more" if len(small) > 20 else "")
        raise TargetsError(
            f"{len(small)} of {count} aux images have a merged vision grid smaller than the sqrt(K) x sqrt(K) = "
            f"{side} x {side} latent grid (K={latent_tokens_per_span}): {listed}. Use larger aux images (or raise the "
            "image processor's min_pixels), a smaller --latent-tokens-per-span, or drop these rows."
        )


# -------------------------------------------------------------------------------------------- metadata


def image_processor_settings(image_processor) -> dict[str, Any]:
    """The image-processor settings that decide the targets (resizing, patching, normalisation)."""
    config = image_processor.to_dict()
    settings = {key: config[key] for key in _IMAGE_PROCESSOR_KEYS if config.get(key) is not None}
    settings["image_processor_type"] = type(image_processor).__name__
    return settings


def _description(dataset) -> dict[str, Any]:
    """``dataset.info.description`` as a JSON object (a plain-text description kept under ``"description"``)."""
    description = dataset.info.description or ""
    try:
        payload = json.loads(description) if description else {}
    except json.JSONDecodeError:
        payload = None
    return payload if isinstance(payload, dict) else {"description": description}


def _where(dataset_or_dir, where: str | None = None) -> str:
    """What names the targets in messages: `where`, else the folder, else "the dataset"."""
    return where or (str(dataset_or_dir) if isinstance(dataset_or_dir, (str, os.PathLike)) else "the dataset")


def load_targets_dataset(path: str | os.PathLike, config: Any = None, split: str | None = None, *,
                         vision_tower: str | os.PathLike | None = None):
    """The dataset folder `path` written by `gap targets` (memory-mapped; a DatasetDict narrowed to `split`),
    checked against the K and d of a GAP model's `config` when one is given (`check_targets_compatible`, then
    `check_targets_finite`), and against the vision tower of the checkpoint folder `vision_tower` when one is given
    (`check_targets_encoder`); with a `config` (to train) every row's messages are checked too (`check_messages`)."""
    if not Path(path).is_dir():
        raise TargetsError(f"{path} is not a dataset folder written by `gap targets`.")
    dataset = load_dataset_folder(
        path, split, TargetsError, "{path} is not a dataset saved with Dataset.save_to_disk ({exc}); run `gap targets`"
    )
    if config is not None:
        check_targets_compatible(dataset, config, where=str(path))
    if vision_tower is not None:
        check_targets_encoder(dataset, vision_tower, where=str(path))
    if config is not None:
        check_targets_finite(dataset, path)
        check_messages(dataset, str(path))
    return dataset


def check_targets_encoder(dataset_or_dir, model_path: str | os.PathLike, where: str | None = None, *,
                          fix: str | None = None) -> None:
    """Refuse latent targets computed by another vision tower than the one in the checkpoint folder `model_path`
    (their recorded ``encoder_sha256``, `check_vision_tower`); targets written before the hash was recorded, and a
    model that is not a local folder, only get a warning. `fix` replaces the advice of the message."""
    metadata = targets_metadata(dataset_or_dir)
    check_vision_tower(
        metadata.get("encoder_sha256"), metadata.get("encoder"), model_path, what="the latent targets come",
        where=_where(dataset_or_dir, where),
        fix=fix or f"rerun `gap targets --model {model_path}` or train the model whose tower made them",
        unrecorded=("they do not record their vision tower (written by an older `gap targets`); rerun `gap targets "
                    f"--model {model_path}` to have it checked"))


def check_targets_finite(dataset, where: Any = "the dataset", batch_size: int = 256) -> None:
    """Refuse a targets column holding NaN or inf, naming the rows, in one streaming pass (before training starts
    rather than at the step that draws the row)."""
    from .data import row_name

    bad = []
    columns = [TARGETS_COLUMN] + (["id"] if "id" in dataset.column_names else [])
    for start, batch in zip(range(0, len(dataset), batch_size),
                            dataset.with_format("numpy", columns=columns).iter(batch_size=batch_size)):
        ids = batch.get("id", [None] * len(batch[TARGETS_COLUMN]))
        for offset, (values, row_id) in enumerate(zip(batch[TARGETS_COLUMN], ids)):
            if not np.isfinite(np.asarray(values, dtype=np.float32)).all():
                bad.append(row_name(start + offset, row_id.item() if isinstance(row_id, np.generic) else row_id))
    if bad:
        listed = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise TargetsError(f"{where}: {listed} hold non-finite (NaN or inf) latent targets; recompute them with "
                           "`gap targets` (--dtype float32 if float16 overflowed) or drop the rows.")


def targets_metadata(dataset_or_dir) -> dict[str, Any]:
    """The ``gap_targets`` record of a dataset (or folder) written by `gap targets`."""
    where = _where(dataset_or_dir)
    dataset = load_targets_dataset(dataset_or_dir) if isinstance(dataset_or_dir, (str, os.PathLike)) else dataset_or_dir
    metadata = _description(dataset).get(METADATA_KEY)
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise TargetsError(
            f"{where} carries no latent-target metadata (dataset.info.description['{METADATA_KEY}']): it was not "
            "written by `gap targets`, or its info was replaced. Run `gap targets` on the data."
        )
    if TARGETS_COLUMN not in dataset.column_names:
        raise TargetsError(f"{where} has no '{TARGETS_COLUMN}' column; run `gap targets` on the data.")
    return metadata


def check_targets_compatible(dataset_or_dir, config, where: str | None = None) -> dict[str, Any]:
    """Refuse latent targets whose K or d disagree with a GAP model config; return their metadata.

    `config` is a `GapConfig` (or any config with ``latent_tokens_per_span`` and ``text_config.hidden_size``);
    `where` names the data in the messages (default: the folder, or "the dataset").
    """
    metadata = targets_metadata(dataset_or_dir)
    where = _where(dataset_or_dir, where)
    K = getattr(config, "latent_tokens_per_span", None)
    text_config = getattr(config, "text_config", config)
    d = getattr(text_config, "hidden_size", None)
    if K is None or d is None:
        raise TargetsError("`config` must have `latent_tokens_per_span` and `text_config.hidden_size` (a GapConfig).")
    if metadata["latent_tokens_per_span"] != K:
        raise TargetsError(
            f"The latent targets in {where} were pooled for K={metadata['latent_tokens_per_span']} latent tokens per "
            f"span, but the model has K={K}: rerun `gap targets --latent-tokens-per-span {K}` or convert the model "
            f"with K={metadata['latent_tokens_per_span']}."
        )
    if metadata["hidden_size"] != d:
        raise TargetsError(
            f"The latent targets in {where} have width d={metadata['hidden_size']} but the model's hidden size is "
            f"d={d}: they come from another model's vision tower; rerun `gap targets --model` with this model."
        )
    return metadata


# --------------------------------------------------------------------------------------------- dataset


def _array_dtype(storage_dtype: str) -> str:
    """The dtype the column is stored in (bfloat16-rounded values are stored as float32)."""
    return "float32" if storage_dtype == "bfloat16" else storage_dtype


def _new_stats() -> dict[str, Any]:
    """Running statistics of computed targets (row, span counts; sum and max of the target norms)."""
    return {"rows": 0, "rows_with_spans": 0, "spans": 0, "norm_sum": 0.0, "norm_max": 0.0}


class _BatchTargets:
    """The `dataset.map` function of `compute_latent_targets`: a batch of rows -> their pooled latent targets (the
    aux images of the whole batch go through the tower together); keeps the running statistics."""

    def __init__(self, encoder, image_processor, latent_tokens_per_span: int, d: int, storage_dtype: str, has_ids: bool):
        self.encoder, self.image_processor = encoder, image_processor
        self.K, self.d, self.storage_dtype, self.has_ids = latent_tokens_per_span, d, storage_dtype, has_ids
        self.start_shard(0)

    def start_shard(self, offset: int) -> None:
        """Fresh statistics for the shard whose first row is row `offset` of the whole dataset."""
        self.offset = offset
        self.stats = _new_stats()

    def _aux_images(self, indices, ids_batch, messages_batch, aux_batch):
        """(names, opened images, owning row index, row index -> row name) of the batch's aux images."""
        from PIL.Image import DecompressionBombError

        from .data import aux_count_problem, count_latent_placeholders, load_image, row_name

        names, images, owners, row_names = [], [], [], {}
        for row_index, row_id, messages, aux in zip(indices, ids_batch, messages_batch, aux_batch):
            aux = aux or []
            name = row_names[row_index] = row_name(row_index, row_id)
            problem = aux_count_problem(count_latent_placeholders(messages), len(aux))
            if problem is not None:
                raise TargetsError(f"{name}: {problem} (gap_pipeline.data.validate_rows lists such rows).")
            for k, image in enumerate(aux):
                try:
                    images.append(load_image(image))
                except DecompressionBombError as error:
                    raise TargetsError(f"{name}: aux image {k} is too large to decode safely ({error}); shrink it, or "
                                       "raise --max-image-pixels if it is trusted.") from None
                except (OSError, TypeError, ValueError) as error:
                    raise TargetsError(f"{name}: aux image {k} cannot be loaded ({error}).") from None
                names.append(f"{name}, aux image {k}")
                owners.append(row_index)
        return names, images, owners, row_names

    def __call__(self, messages_batch, aux_batch, *rest):
        ids_batch, indices = (rest[0], rest[1]) if self.has_ids else ([None] * len(rest[0]), rest[0])
        indices = [self.offset + index for index in indices]
        names, images, owners, row_names = self._aux_images(indices, ids_batch, messages_batch, aux_batch)
        pooled = targets_for_images(self.encoder, self.image_processor, images, self.K, names) if images else []
        out, stats = [], self.stats
        for row_index in indices:
            mine = [p for p, owner in zip(pooled, owners) if owner == row_index]
            values = torch.cat(mine) if mine else torch.zeros(0, self.d)
            rounded = values.cpu().to(getattr(torch, self.storage_dtype))
            stored = rounded.to(getattr(torch, _array_dtype(self.storage_dtype))).numpy()
            if not np.isfinite(stored).all():
                raise TargetsError(
                    f"{row_names[row_index]}: its latent targets overflow {self.storage_dtype} (NaN/inf); rerun with "
                    "--dtype float32."
                )
            stats["rows"] += 1
            if mine:
                stats["rows_with_spans"] += 1
                stats["spans"] += len(mine)
                norms = values.norm(dim=-1)
                stats["norm_sum"] += float(norms.sum())
                stats["norm_max"] = max(stats["norm_max"], float(norms.max()))
            out.append(stored)
        return {TARGETS_COLUMN: out}


def _targets_record(stats, latent_tokens_per_span, d, storage_dtype, encoder_name, image_processor,
                    encoder_sha256) -> dict[str, Any]:
    """The ``gap_targets`` metadata record of a computed dataset (see the module docstring)."""
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "column": TARGETS_COLUMN,
        "latent_tokens_per_span": latent_tokens_per_span,
        "grid_side": check_latent_budget(latent_tokens_per_span),
        "hidden_size": d,
        "storage_dtype": storage_dtype,
        "encoder": encoder_name,
        "encoder_sha256": encoder_sha256,
        "image_processor": image_processor_settings(image_processor),
        "num_rows": stats["rows"],
        "num_rows_with_spans": stats["rows_with_spans"],
        "num_spans": stats["spans"],
        "num_vectors": stats["spans"] * latent_tokens_per_span,
    }


def compute_latent_targets(
    dataset,
    encoder,
    image_processor,
    *,
    latent_tokens_per_span: int,
    batch_size: int = 8,
    storage_dtype: str = "float16",
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    source: str | None = None,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    encoder_sha256: str | None = None,
):
    """Add the ``latent_targets`` column (and its metadata) to `dataset`; return it and a summary dict.

    `dataset` rows follow `gap_pipeline.data` (``aux_images`` as PIL images, paths or ``{"bytes", "path"}``
    dicts; one per ``<latent>`` placeholder). `encoder` is the frozen vision tower or a whole model (see
    `encode_images`); `encoder_sha256` (`vision_tower_sha256` of its folder) is recorded so training can refuse
    targets of another tower. The aux images of `batch_size` rows go through the tower together. Results are
    written to Arrow files in `cache_dir` (default: a fresh temporary folder), so memory stays flat: one per
    `rows_per_shard` rows, committed by renaming it to ``shard-NNNNN.arrow`` when complete. Committed shards already
    in `cache_dir` are reused rather than recomputed (a killed run resumes): give a folder that `claim_partial_dir`
    checked against this run's inputs and settings, or an empty one.
    """
    from datasets import Array2D, Features, concatenate_datasets

    from .data import undecoded_images

    check_latent_budget(latent_tokens_per_span)
    if storage_dtype not in STORAGE_DTYPES:
        raise TargetsError(f"storage dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}.")
    if batch_size < 1 or rows_per_shard < 1:
        raise TargetsError(f"batch size and rows per shard must be >= 1, got {batch_size} and {rows_per_shard}.")
    d = _hidden_size(encoder)
    dataset = undecoded_images(dataset)
    if "aux_images" not in dataset.column_names:
        raise TargetsError("The dataset has no 'aux_images' column: there is nothing to encode.")
    compute = _BatchTargets(encoder, image_processor, latent_tokens_per_span, d, storage_dtype,
                            has_ids="id" in dataset.column_names)
    features = Features({**dataset.features,
                         TARGETS_COLUMN: Array2D(shape=(None, d), dtype=_array_dtype(storage_dtype))})
    if TARGETS_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(TARGETS_COLUMN)
    own_cache = cache_dir is None
    cache_dir = Path(tempfile.mkdtemp(prefix="gap-targets-") if own_cache else cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        shards, stats, resumed = _shards(dataset, compute, cache_dir, rows_per_shard, batch_size, features, progress)
    except BaseException:
        if own_cache:
            shutil.rmtree(cache_dir, ignore_errors=True)
        raise
    result = concatenate_datasets(shards) if len(shards) > 1 else shards[0]
    metadata = _targets_record(stats, latent_tokens_per_span, d, storage_dtype, source or type(encoder).__name__,
                               image_processor, encoder_sha256)
    result.info.description = json.dumps({**_description(result), METADATA_KEY: metadata}, sort_keys=True)
    n_vectors = metadata["num_vectors"]
    summary = {
        **metadata,
        "seconds": time.perf_counter() - started,
        "resumed_rows": resumed,
        "mean_target_norm": stats["norm_sum"] / n_vectors if n_vectors else float("nan"),
        "max_target_norm": stats["norm_max"],
        "bytes": n_vectors * d * np.dtype(_array_dtype(storage_dtype)).itemsize,
        "cache_dir": str(cache_dir),
        "own_cache": own_cache,
    }
    return result, summary


def _shards(dataset, compute: _BatchTargets, cache_dir: Path, rows_per_shard: int, batch_size: int, features,
            progress: bool) -> tuple[list, dict[str, Any], int]:
    """Every shard of `dataset` as a memory-mapped `Dataset`, their summed statistics, and the number of rows reused.

    A shard already committed in `cache_dir` is reused. Any other is computed into a work file, its statistics
    written, and then committed: it is done once its Arrow file has its final name.
    """
    from datasets import Dataset
    from tqdm.auto import tqdm

    from .datasets_io import datasets_progress_bars

    shards, stats, resumed = [], _new_stats(), 0
    with datasets_progress_bars(False), tqdm(total=len(dataset), desc="latent targets", unit="row",
                                             disable=not progress, dynamic_ncols=True) as bar:
        for number, start in enumerate(range(0, max(len(dataset), 1), rows_per_shard)):
            stop = min(start + rows_per_shard, len(dataset))
            arrow = cache_dir / f"shard-{number:05d}.arrow"
            shard_stats, work = arrow.with_suffix(".json"), arrow.with_suffix(".work.arrow")
            if arrow.is_file() and shard_stats.is_file():
                resumed += stop - start
            else:
                compute.start_shard(start)
                dataset.select(range(start, stop)).map(
                    compute,
                    input_columns=["messages", "aux_images"] + (["id"] if compute.has_ids else []),
                    with_indices=True,
                    batched=True,
                    batch_size=batch_size,
                    features=features,
                    cache_file_name=str(work),
                    new_fingerprint=uuid.uuid4().hex,  # the encoder is not hashable cheaply; never reuse a cache
                    load_from_cache_file=False,
                )
                with open(work, "rb") as f:
                    os.fsync(f.fileno())
                write_json_file(shard_stats, compute.stats)
                os.replace(work, arrow)
            shards.append(Dataset.from_file(str(arrow)))
            done = json.loads(shard_stats.read_text(encoding="utf-8"))
            for key in ("rows", "rows_with_spans", "spans", "norm_sum"):
                stats[key] += done[key]
            stats["norm_max"] = max(stats["norm_max"], done["norm_max"])
            bar.update(stop - start)
    return shards, stats, resumed


def committed_shards(cache_dir: str | os.PathLike) -> list[Path]:
    """The committed shard files in `cache_dir` (those a rerun reuses)."""
    cache_dir = Path(cache_dir)
    return sorted(arrow for arrow in cache_dir.glob("shard-*.arrow")
                  if not arrow.name.endswith(".work.arrow") and arrow.with_suffix(".json").is_file())


def claim_partial_dir(cache_dir: str | os.PathLike, record: dict[str, Any]) -> str | None:
    """Make `cache_dir` hold only what this run may reuse; return a line for the user, or None.

    When ``cache_dir/resume.json`` equals `record` (this run's inputs and settings, JSON-normalised) the committed
    shards stay and everything else there (a shard cut short, `datasets`' temporary files) goes; otherwise the
    folder is emptied and `record` written, so shards of other inputs are never mixed in.
    """
    cache_dir = Path(cache_dir)
    path = cache_dir / RESUME_RECORD
    stored = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if stored is not None and not record_differences(stored, record):
        keep = {path, *committed_shards(cache_dir)}
        keep |= {arrow.with_suffix(".json") for arrow in keep}
        for leftover in cache_dir.iterdir():
            if leftover not in keep:
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        shards = committed_shards(cache_dir)
        return f"resuming from {cache_dir}: {len(shards)} shard(s) of an earlier run of the same inputs are done"
    if stored is not None:
        note = (f"{cache_dir} holds part of a run of other inputs or settings "
                f"({'; '.join(record_differences(stored, record))}): starting fresh")
    elif cache_dir.exists():
        note = f"removing {cache_dir}, left by an unfinished earlier run without {RESUME_RECORD}: starting fresh"
    else:
        note = None
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache_dir.mkdir(parents=True)
    write_json_file(path, record)
    return note


def format_summary(summary: dict[str, Any], output_dir: str | None = None) -> str:
    """A one-screen summary of a `compute_latent_targets` run."""
    settings = summary["image_processor"]
    size = settings.get("size") or {}
    pixels = (
        f"{size.get('shortest_edge', settings.get('min_pixels'))}..{size.get('longest_edge', settings.get('max_pixels'))}"
    )
    lines = [
        "latent targets" + (f" -> {output_dir}" if output_dir else ""),
        f"  rows            {summary['num_rows']} ({summary['num_rows_with_spans']} with latent spans)",
        f"  spans           {summary['num_spans']} x K={summary['latent_tokens_per_span']} "
        f"({summary['grid_side']}x{summary['grid_side']} pooled grid) = {summary['num_vectors']} vectors",
        f"  width d         {summary['hidden_size']}; stored as {summary['storage_dtype']} "
        f"({summary['bytes'] / 2**20:.1f} MiB), column '{summary['column']}'",
        f"  target norm     mean {summary['mean_target_norm']:.3f}, max {summary['max_target_norm']:.3f}",
        f"  encoder         {summary['encoder']}"
        + (f" (vision tower sha256 {summary['encoder_sha256'][:16]})" if summary.get("encoder_sha256") else ""),
        f"  image processor {settings.get('image_processor_type')}: patch {settings.get('patch_size')}, merge "
        f"{settings.get('merge_size')}, pixels {pixels}",
        f"  time            {summary['seconds']:.1f} s"
        + (f" ({summary['resumed_rows']} rows resumed from an earlier run)" if summary.get("resumed_rows") else ""),
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ command line

HELP = "Encode every aux image with the frozen vision tower into pooled K x d latent targets (a dataset column)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gap targets``."""
    parser.add_argument("--data", required=True, help="a JSONL file of rows, or a dataset folder (save_to_disk)")
    parser.add_argument(
        "--image-dir", default=None,
        help="folder the image paths are relative to and stay inside (default: the JSONL file's folder, or the dataset "
        "folder)"
    )
    parser.add_argument("--model", required=True, help="Qwen2.5-VL or GAP checkpoint folder whose vision tower encodes")
    parser.add_argument(
        "--processor", default=None, help="folder of the image processor to use (default: the --model folder)"
    )
    parser.add_argument("--output-dir", required=True, help="where the dataset with 'latent_targets' is saved")
    parser.add_argument(
        "--latent-tokens-per-span",
        type=int,
        default=None,
        metavar="K",
        help="latent tokens per span, a perfect square (default: the GAP model's, else 36)",
    )
    parser.add_argument(
        "--dtype",
        choices=STORAGE_DTYPES,
        default="float16",
        help="storage dtype of the targets; bfloat16 = bfloat16-rounded values stored as float32 (default float16)",
    )
    parser.add_argument(
        "--model-dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="dtype the vision tower runs in (default auto: bfloat16 on CUDA, float32 on CPU)",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N (default auto)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows whose aux images are encoded together (default 8)")
    parser.add_argument("--rows-per-shard", type=int, default=DEFAULT_ROWS_PER_SHARD,
                        help="rows committed together; a killed run resumes after the last committed shard "
                        f"(default {DEFAULT_ROWS_PER_SHARD})")
    add_max_image_pixels_argument(parser)
    parser.add_argument("--no-check-images", action="store_true", help="skip opening every image during validation")
    add_allow_outside_image_dir_argument(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _default_k(model_dir: Path) -> tuple[int, str]:
    config = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    if config.get("latent_tokens_per_span") is not None:
        return int(config["latent_tokens_per_span"]), "the GAP model's"
    from .convert import DEFAULT_LATENT_TOKENS_PER_SPAN

    return DEFAULT_LATENT_TOKENS_PER_SPAN, "the paper's default"


def _load_data(args):
    from .data import dataset_base_dir, from_dataset, load_jsonl

    path = Path(args.data)
    if path.is_file():
        return load_jsonl(path, args.image_dir, check_images=not args.no_check_images,
                          allow_outside_image_dir=args.allow_outside_image_dir)
    if path.is_dir():
        dataset = load_dataset_folder(path, None, TargetsError, "{path} is not a dataset saved with "
                                      "Dataset.save_to_disk ({exc}); pass such a folder or a .jsonl file")
        return from_dataset(dataset, image_dir=args.image_dir or dataset_base_dir(path),
                            check_images=not args.no_check_images, source=str(path),
                            allow_outside_image_dir=args.allow_outside_image_dir)
    raise TargetsError(f"--data {path}: no such file or folder.")


def run(args: argparse.Namespace) -> int:
    """Run ``gap targets``: validate the data, encode the aux images, save the dataset, print a summary.

    The dataset is written beside --output-dir and renamed into place when complete; an existing output is replaced
    only then. The partial folder ``.<output-dir>.cache`` is removed once the output is in place; after a failure it
    is kept only when it holds committed shards. The final write's temporary folder is removed on failure, and a
    killed run's on the next run. One run at a time writes an output (`claimed_output`): a second one is an error.
    """
    check_model_folder(args.model, "--model", TargetsError)
    output_dir = Path(args.output_dir)
    inputs = {"--model folder": args.model, "--data": args.data, "--image-dir": args.image_dir,
              "--processor": args.processor}
    check_output_dir(output_dir, TargetsError, overwrite=args.overwrite, inputs=inputs)
    cache_dir = output_dir.with_name(f".{output_dir.name}.cache")
    with claimed_output(output_dir, TargetsError, "gap targets"):
        try:
            _run(args, Path(args.model), output_dir, cache_dir)
        except BaseException:
            done = committed_shards(cache_dir) if cache_dir.is_dir() else []
            if done:
                print(f"gap targets: {len(done)} committed shard(s) kept in {cache_dir}; rerun the same command to "
                      "continue", file=sys.stderr)
            else:
                shutil.rmtree(cache_dir, ignore_errors=True)
            raise
        shutil.rmtree(cache_dir, ignore_errors=True)
    return 0


def _aux_files_sha256(dataset) -> str:
    """A hash of the name, size and modification time of every aux image file the rows point to (images stored in
    the data itself are covered by the data's own hash)."""
    from .data import undecoded_images

    digest = hashlib.sha256()
    column = undecoded_images(dataset.select_columns(["aux_images"]), ["aux_images"])
    for batch in column.iter(batch_size=1000):
        for images in batch["aux_images"]:
            for image in images or []:
                path = image.get("path") if isinstance(image, dict) and image.get("bytes") is None else image
                if isinstance(path, str):
                    stat = os.stat(path) if os.path.exists(path) else None
                    digest.update(f"{path}:{stat and stat.st_size}:{stat and stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _resume_record(args, model_dir: Path, K: int, device, model_dtype: str, dataset, image_processor,
                   tower_sha256: str) -> dict[str, Any]:
    """What a killed run's committed shards must share with this run to be reused: the model's vision tower, the
    data (and the aux image files it points to), and every setting that changes a stored value or a shard."""
    return {
        "model": {"path": str(model_dir.resolve()), "vision_tower_sha256": tower_sha256},
        "data": {**data_fingerprint(args.data), "aux_files_sha256": _aux_files_sha256(dataset),
                 "image_dir": str(Path(args.image_dir).resolve()) if args.image_dir else None},
        "settings": {"latent_tokens_per_span": K, "dtype": args.dtype, "model_dtype": model_dtype,
                     "device": device.type, "batch_size": args.batch_size, "rows_per_shard": args.rows_per_shard,
                     "image_processor": image_processor_settings(image_processor)},
    }


def _run(args: argparse.Namespace, model_dir: Path, output_dir: Path, cache_dir: Path) -> None:
    from transformers import AutoImageProcessor

    given = args.latent_tokens_per_span is not None
    K, origin = (args.latent_tokens_per_span, "given") if given else _default_k(model_dir)
    try:
        check_latent_budget(K, name="--latent-tokens-per-span")
    except ValueError as exc:
        raise TargetsError(str(exc)) from None
    if args.rows_per_shard < 1:
        raise TargetsError(f"--rows-per-shard must be >= 1, got {args.rows_per_shard}.")
    device = resolve_device(args.device)
    model_dtype = tower_dtype(args.model_dtype, device)
    dataset = _load_data(args)
    image_processor = AutoImageProcessor.from_pretrained(args.processor or model_dir)
    check_aux_grids(dataset, image_processor, K)  # every image too small for K, before the tower loads
    tower = load_vision_tower(model_dir, dtype=getattr(torch, model_dtype), device=device)
    tower_sha256 = vision_tower_sha256(model_dir)
    print(f"gap targets: K={K} ({origin}), vision tower of {model_dir} on {device} in {model_dtype}", file=sys.stderr)
    record = _resume_record(args, model_dir, K, device, model_dtype, dataset, image_processor, tower_sha256)
    note = claim_partial_dir(cache_dir, record)
    if note:
        print(f"gap targets: {note}", file=sys.stderr)
    result, summary = compute_latent_targets(
        dataset,
        tower,
        image_processor,
        latent_tokens_per_span=K,
        batch_size=args.batch_size,
        storage_dtype=args.dtype,
        progress=not args.no_progress,
        cache_dir=cache_dir,
        source=str(model_dir),
        rows_per_shard=args.rows_per_shard,
        encoder_sha256=tower_sha256,
    )
    with atomic_output_dir(output_dir) as staging:
        result.save_to_disk(str(staging))
    del result
    print(format_summary(summary, str(output_dir)))
