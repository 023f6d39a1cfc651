"""LoRA on a GAP model, in and out: `configure_lora` adapts a PEFT config for training (``train_sft.py
--use_peft``) and `merge_lora` merges the trained adapter into its GAP base (``gap merge-lora``): README, "LoRA, then
merge". The core of the merge is ``PeftModel.from_pretrained(GapForConditionalGeneration.from_pretrained(base),
adapter).merge_and_unload().save_pretrained(out)``; the processor and a model card that keeps the run's record go
with it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path
from typing import Any

from . import GapError
from .datasets_io import check_output_dir, check_safetensors, read_json_file, write_json_file
from .provenance import model_fingerprint

__all__ = ["BASE_RECORD", "LORA_TARGET_MODULES", "MergeError", "configure_lora", "merge_lora", "record_adapter_base"]

HELP = "Merge a LoRA adapter (train_sft.py --use_peft) into its GAP base: a full GAP checkpoint folder."


# The projections LoRA adapts by default (`--use_peft` without `--lora_target_modules`), in the language model only.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_RECORD = "gap_lora_base.json"  # in an adapter folder: the content hash of the GAP base it was trained on


class MergeError(GapError):
    """Bad arguments or inputs of a merge; the message names the argument and the fix."""


def configure_lora(peft_config: Any, config: Any) -> Any:
    """A copy of the PEFT LoRA config `peft_config` adapted to the GAP model whose config is `config`: LoRA on the
    decoder layers only (`target_modules` None or "all-linear": `LORA_TARGET_MODULES`; a list of names is restricted
    to the decoder layers, since the vision tower and the latent head have layers of the same names; a string is a
    regular expression kept as given), the whole `latent_head` in `modules_to_save`, and the three latent tokens'
    rows in `trainable_token_indices` of the embedding and of an untied LM head (not of a layer trained whole)."""
    peft_config = copy.deepcopy(peft_config)
    start, pad, end = config.latent_token_ids
    modules_to_save = list(peft_config.modules_to_save or [])
    if "latent_head" not in modules_to_save:
        modules_to_save.append("latent_head")
    peft_config.modules_to_save = modules_to_save

    targets = peft_config.target_modules
    if not isinstance(targets, str) or targets == "all-linear":
        alternatives = "|".join(sorted(set(LORA_TARGET_MODULES if targets in (None, "all-linear") else targets)))
        peft_config.target_modules = rf"(?:.*\.)?language_model\.layers\.\d+\..*\.(?:{alternatives})"

    indices = peft_config.trainable_token_indices
    if not isinstance(indices, dict):
        indices = {} if indices is None else {"embed_tokens": indices}
    indices = {layer: list(ids) for layer, ids in indices.items()}
    for layer in ["embed_tokens"] if config.tie_word_embeddings else ["embed_tokens", "lm_head"]:
        if layer not in modules_to_save:  # a layer trained whole needs no rows
            indices[layer] = sorted(set(indices.get(layer, [])) | {start, pad, end})
    peft_config.trainable_token_indices = indices or None
    return peft_config


# What a merge needs: the folder `train_sft.py --use_peft` saved.
_ADAPTER_FOLDER = "pass the folder `train_sft.py --use_peft` saved (its --output_dir or a checkpoint-N folder in it)"
_DAMAGED_ADAPTER = "the adapter is damaged (a copy or save cut short?): copy or save the adapter again"


def _adapter_config(adapter: Path) -> dict:
    """The adapter's adapter_config.json, once the folder also holds whole adapter weights; a missing or damaged
    file is one `MergeError` naming it."""
    path = adapter / "adapter_config.json"
    if not path.is_file():
        raise MergeError(f"{adapter} holds no adapter_config.json: {_ADAPTER_FOLDER}")
    config = read_json_file(path, MergeError, _DAMAGED_ADAPTER)
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        if (adapter / "adapter_model.bin").is_file():
            return config
        raise MergeError(f"{weights} is missing: {adapter} holds adapter_config.json but no adapter weights; "
                         f"{_ADAPTER_FOLDER}")
    check_safetensors(weights, MergeError, _DAMAGED_ADAPTER)
    return config


def record_adapter_base(adapter: str | os.PathLike, base: str | os.PathLike) -> None:
    """Record in the adapter folder `adapter` the content hash (`provenance.model_fingerprint`) of the GAP folder
    `base` it was trained on, so that `gap merge-lora` refuses another base (nothing is recorded for a Hub id)."""
    if Path(base).is_dir():
        write_json_file(Path(adapter) / BASE_RECORD, {"sha256": model_fingerprint(base)["sha256"]})


def _check_same_base(adapter: Path, config: dict, base: Path, given: bool) -> None:
    """Refuse merging into a base with other weights than the one the adapter was trained on: its recorded hash,
    else (an adapter saved before the record) the folder adapter_config.json names, when it still exists."""
    named = config.get("base_model_name_or_path")
    if (adapter / BASE_RECORD).is_file():
        trained_on = json.loads((adapter / BASE_RECORD).read_text(encoding="utf-8"))["sha256"]
    elif given and named and Path(named).is_dir():
        trained_on = model_fingerprint(named)["sha256"]
    else:
        return
    if model_fingerprint(base)["sha256"] != trained_on:
        where = f"--base {base} is" if given else f"the adapter's base {base} (adapter_config.json) now holds"
        raise MergeError(
            f"{where} another model than the GAP folder {adapter} was trained on (its weights differ from those "
            f"recorded in {BASE_RECORD if (adapter / BASE_RECORD).is_file() else named}); the merge would combine the "
            "adapter with weights it was never trained with. Pass the folder the run trained on (a copy of it is "
            "fine)"
        )


def _base_folder(adapter: Path, config: dict, base) -> Path:
    from gap_pipeline.inference import GAP_MODEL_TYPE, check_checkpoint_files, model_type_of

    given = base is not None
    base = base if given else config.get("base_model_name_or_path")
    if not base:
        raise MergeError(f"{adapter}/adapter_config.json names no base model; pass --base (the GAP folder trained on)")
    base = Path(base)
    if not (base / "config.json").is_file():
        where = "--base" if given else f"the adapter's base_model_name_or_path ({base})"
        raise MergeError(f"{where} is not a checkpoint folder here; pass --base with the GAP folder the run trained on")
    check_checkpoint_files(base, MergeError)
    model_type = model_type_of(base)
    if model_type != GAP_MODEL_TYPE:
        raise MergeError(
            f"{base} holds a '{model_type}' model; the adapter's base is the GAP folder the run trained on (a plain "
            f"Qwen2.5-VL base was converted by train_sft.py into <output_dir>/_gap-init or --converted_model_dir)"
        )
    _check_same_base(adapter, config, base, given)
    return base


def merge_lora(adapter, output_dir, base=None, *, dtype="auto", overwrite=False) -> dict:
    """Merge the LoRA adapter folder `adapter` into its GAP base and save the result to `output_dir`.

    Args:
        adapter: the folder `train_sft.py --use_peft` saved (adapter_config.json, adapter weights, processor).
        output_dir: the GAP checkpoint folder to write (refused when not empty, unless `overwrite`).
        base: the GAP base folder; default the adapter's `base_model_name_or_path`.
        dtype: dtype of the merged weights ("auto": the base's); the latent head stays fp32.

    Returns a summary dict (output, base, adapter, r, target modules, trainable token rows).
    """
    from peft import PeftModel

    from gap_pipeline.inference import register_gap_config, resolve_dtype
    from gap_pipeline.model_card import read_training_run, write_model_card
    from modeling_gap import GapForConditionalGeneration
    from processing_gap import GapProcessor

    adapter = Path(adapter)
    config = _adapter_config(adapter)
    base = _base_folder(adapter, config, base)
    output_dir = check_output_dir(output_dir, MergeError, overwrite=overwrite,
                                  inputs={"adapter": adapter, "base": base})

    model = GapForConditionalGeneration.from_pretrained(base, dtype=resolve_dtype(dtype))
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.config.validate_gap()
    output_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(output_dir)
    register_gap_config()  # the tokenizer reads the folder's GapConfig through AutoConfig
    processor_source = adapter if (adapter / "processor_config.json").is_file() else base
    processor = GapProcessor.from_pretrained(
        processor_source, trust_remote_code=False, latent_tokens_per_span=merged.config.latent_tokens_per_span
    )
    processor.save_pretrained(output_dir)
    training = read_training_run(adapter)
    if training is not None:
        training.merged = True
    write_model_card(output_dir, merged.config, model_name=output_dir.resolve().name, training=training)
    return {
        "output": str(output_dir),
        "base": str(base),
        "adapter": str(adapter),
        "r": config.get("r"),
        "target_modules": config.get("target_modules"),
        "trainable_token_indices": config.get("trainable_token_indices"),
        "modules_to_save": config.get("modules_to_save"),
    }


# ------------------------------------------------------------------------------------------ command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gap merge-lora``."""
    parser.add_argument("--adapter", required=True,
                        help="the adapter folder train_sft.py --use_peft saved (its --output_dir or a checkpoint-N)")
    parser.add_argument("--output-dir", required=True, help="the merged GAP checkpoint folder to write")
    parser.add_argument("--base", default=None,
                        help="the GAP folder the adapter was trained on (default: base_model_name_or_path of "
                        "adapter_config.json)")
    from .inference import DTYPES

    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="dtype of the merged weights (default: auto = the base's); the latent head stays fp32")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --output-dir")


def run(args: argparse.Namespace) -> int:
    """Run ``gap merge-lora``."""
    started = time.time()
    report = merge_lora(args.adapter, args.output_dir, args.base, dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged {report['adapter']} (LoRA r = {report['r']}) into {report['base']}")
    print(f"  latent head: {'trained copy' if 'latent_head' in (report['modules_to_save'] or []) else 'base'}; "
          f"trainable token rows: {report['trainable_token_indices']}")
    print(f"  wrote {report['output']} in {time.time() - started:.1f} s; it loads with "
          f"AutoModelForImageTextToText.from_pretrained(..., trust_remote_code=True)")
    return 0
