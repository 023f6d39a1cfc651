"""Merge a LoRA adapter trained with ``train_sft.py --use_peft`` into its GAP base (``gap merge-lora``).

The adapter folder (the run's ``output_dir`` or one of its ``checkpoint-N`` folders) holds the LoRA weights of the
language model, the whole latent head (``modules_to_save``) and the trained rows of the three latent tokens
(``trainable_token_indices``). Merging loads the GAP base the adapter was trained on (``base_model_name_or_path``
of ``adapter_config.json``, or ``--base``), applies the adapter with PEFT and `merge_and_unload`, and writes a
normal GAP checkpoint folder: weights, ``config.json``, the remote code, the processor (the adapter folder's, else
the base's) and a model card that keeps the run's record. The result loads with
``AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)`` and generates latent spans.

In Python: ``PeftModel.from_pretrained(GapForConditionalGeneration.from_pretrained(base), adapter)
.merge_and_unload().save_pretrained(out)`` is the core of it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["MergeError", "merge_lora"]

HELP = "Merge a LoRA adapter (train_sft.py --use_peft) into its GAP base: a full GAP checkpoint folder."


class MergeError(ValueError):
    """Bad arguments or inputs of a merge; the message names the argument and the fix."""


def _adapter_config(adapter: Path) -> dict:
    path = adapter / "adapter_config.json"
    if not path.is_file():
        raise MergeError(
            f"{adapter} holds no adapter_config.json: pass the folder `train_sft.py --use_peft` saved (its "
            f"--output_dir or a checkpoint-N folder in it)"
        )
    return json.loads(path.read_text())


def _base_folder(adapter: Path, config: dict, base) -> Path:
    from gap_pipeline.inference import GAP_MODEL_TYPE, model_type_of

    given = base is not None
    base = Path(base) if given else config.get("base_model_name_or_path")
    if not base:
        raise MergeError(f"{adapter}/adapter_config.json names no base model; pass --base (the GAP folder trained on)")
    base = Path(base)
    if not (base / "config.json").is_file():
        where = "--base" if given else f"the adapter's base_model_name_or_path ({base})"
        raise MergeError(f"{where} is not a checkpoint folder here; pass --base with the GAP folder the run trained on")
    model_type = model_type_of(base)
    if model_type != GAP_MODEL_TYPE:
        raise MergeError(
            f"{base} holds a '{model_type}' model; the adapter's base is the GAP folder the run trained on (a plain "
            f"Qwen2.5-VL base was converted by train_sft.py into <output_dir>/gap-init or --converted_model_dir)"
        )
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

    adapter, output_dir = Path(adapter), Path(output_dir)
    config = _adapter_config(adapter)
    base = _base_folder(adapter, config, base)
    for other in (adapter, base):
        if output_dir.exists() and output_dir.resolve() == other.resolve():
            raise MergeError(f"--output-dir is the {'adapter' if other == adapter else 'base'} folder; write to a new one")
    if output_dir.exists() and (not output_dir.is_dir() or (any(output_dir.iterdir()) and not overwrite)):
        raise MergeError(f"--output-dir {output_dir} exists and is not an empty folder; pick another or pass --overwrite")

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


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gap merge-lora``."""
    parser.add_argument("--adapter", required=True,
                        help="the adapter folder train_sft.py --use_peft saved (its --output_dir or a checkpoint-N)")
    parser.add_argument("--output-dir", required=True, help="the merged GAP checkpoint folder to write")
    parser.add_argument("--base", default=None,
                        help="the GAP folder the adapter was trained on (default: base_model_name_or_path of "
                        "adapter_config.json)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="dtype of the merged weights (default: auto = the base's); the latent head stays fp32")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --output-dir")


def run(args: argparse.Namespace) -> int:
    """Run ``gap merge-lora``."""
    started = time.time()
    try:
        report = merge_lora(args.adapter, args.output_dir, args.base, dtype=args.dtype, overwrite=args.overwrite)
    except (MergeError, FileNotFoundError) as exc:
        print(f"merge-lora: error: {exc}", file=sys.stderr)
        return 2
    print(f"merged {report['adapter']} (LoRA r = {report['r']}) into {report['base']}")
    print(f"  latent head: {'trained copy' if 'latent_head' in (report['modules_to_save'] or []) else 'base'}; "
          f"trainable token rows: {report['trainable_token_indices']}")
    print(f"  wrote {report['output']} in {time.time() - started:.1f} s; it loads with "
          f"AutoModelForImageTextToText.from_pretrained(..., trust_remote_code=True)")
    return 0
