"""Convert a Qwen2.5-VL checkpoint folder into a GAP checkpoint folder (``gap convert``; what the folder holds is in
the README, "Convert a checkpoint"), and `ensure_gap_checkpoint`, the conversion ``train_sft.py`` runs on a plain base.

The embedding matrix grows only when the new token ids do not fit into its rows (Qwen2.5-VL-7B has 152,064 rows for
151,665 tokens, so it keeps its size); it never shrinks. With no latent tokens in the input, the converted model
computes the base model's logits on the base tokenizer's vocabulary (`verify_conversion`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from configuration_gap import LATENT_HEAD_TYPES, LATENT_LOSS_REDUCTIONS, LATENT_TOKENS, check_latent_budget

from . import GapError
from .datasets_io import atomic_output_dir, check_output_dir, remove_stale_staging, write_json_file
from .inference import DTYPES, GAP_MODEL_TYPE, QWEN_MODEL_TYPE, check_model_folder, model_type_of, resolve_dtype
from .provenance import check_or_record, data_fingerprint, model_fingerprint, record_differences

__all__ = ["ConversionReport", "convert_checkpoint", "ensure_gap_checkpoint"]

CONVERSION_RECORD = "gap_conversion.json"  # what a converted folder was made from (see ensure_gap_checkpoint)
DEFAULT_LATENT_TOKENS_PER_SPAN = 36  # K of a conversion that is not given one: the paper's 6 x 6


class ConversionError(GapError):
    """Bad arguments or inputs of a conversion; the message names the argument and the fix."""


class ConversionReport(dict):
    """What :func:`convert_checkpoint` wrote (a dict: output, token ids, rows before/after, K, k, ...)."""


def _check_arguments(base: Path, pca: str | os.PathLike | None, latent_tokens_per_span: int, latent_head_type: str,
                     latent_adapter_size: int, latent_loss_weight: float, latent_loss_reduction: str) -> None:
    """Refuse conversion arguments that cannot make a GAP checkpoint, before anything is loaded."""
    try:
        check_latent_budget(latent_tokens_per_span, "--latent-tokens-per-span")
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    if latent_head_type not in LATENT_HEAD_TYPES:
        raise ConversionError(f"--head-type must be one of {LATENT_HEAD_TYPES}, got {latent_head_type!r}")
    if latent_loss_reduction not in LATENT_LOSS_REDUCTIONS:
        raise ConversionError(f"--latent-loss-reduction must be one of {LATENT_LOSS_REDUCTIONS}, got {latent_loss_reduction!r}")
    if not (latent_loss_weight >= 0 and latent_loss_weight != float("inf")):
        raise ConversionError(f"--latent-loss-weight must be a finite number >= 0, got {latent_loss_weight}")
    if latent_adapter_size < 1:
        raise ConversionError(f"--latent-adapter-size must be >= 1, got {latent_adapter_size}")
    if latent_head_type == "pca" and pca is None:
        raise ConversionError("--head-type pca needs --pca (the pca.safetensors written by `gap fit-pca`)")
    if latent_head_type == "full" and pca is not None:
        raise ConversionError("--head-type full has no PCA; drop --pca (or use --head-type pca)")
    check_model_folder(base, "--base", ConversionError)
    model_type = model_type_of(base)
    if model_type == GAP_MODEL_TYPE:
        raise ConversionError(f"--base {base} is already a GAP checkpoint; pass the Qwen2.5-VL folder it came from")
    if model_type != QWEN_MODEL_TYPE:
        raise ConversionError(f"--base {base} holds a '{model_type}' model; a Qwen2.5-VL ('{QWEN_MODEL_TYPE}') folder is needed")


def _conversion_report(base: Path, output_dir: Path, pca, model, tokens_before: int, rows_before: int,
                       had_tokens: list[str], weights_dtype) -> ConversionReport:
    """What `convert_checkpoint` wrote; `*_before` and `had_tokens`: the base tokenizer's and embedding's."""
    config = model.config
    return ConversionReport(
        base=str(base),
        output_dir=str(output_dir),
        latent_token_ids=dict(zip(LATENT_TOKENS, config.latent_token_ids)),
        tokens_added=[token for token in LATENT_TOKENS if token not in had_tokens],
        tokens_before=tokens_before,
        embedding_rows_before=rows_before,
        embedding_rows_after=int(config.text_config.vocab_size),
        grown=int(config.text_config.vocab_size) > rows_before,
        latent_tokens_per_span=config.latent_tokens_per_span,
        latent_grid_side=config.latent_grid_side,
        latent_head_type=config.latent_head_type,
        pca_num_components=config.pca_num_components,
        pca_file=str(pca) if pca is not None else None,
        hidden_size=config.text_config.hidden_size,
        latent_adapter_size=config.latent_adapter_size,
        latent_loss_weight=config.latent_loss_weight,
        latent_loss_reduction=config.latent_loss_reduction,
        latent_head_parameters=int(sum(p.numel() for p in model.latent_head.parameters())),
        dtype=str(weights_dtype).replace("torch.", ""),
        tied_word_embeddings=bool(config.tie_word_embeddings),
        files=sorted(p.name for p in output_dir.iterdir() if p.is_file()),
    )


def convert_checkpoint(
    base: str | os.PathLike,
    output_dir: str | os.PathLike,
    pca: str | os.PathLike | None = None,
    *,
    latent_tokens_per_span: int = DEFAULT_LATENT_TOKENS_PER_SPAN,
    latent_head_type: str = "pca",
    latent_adapter_size: int = 1024,
    latent_loss_weight: float = 1.0,
    latent_loss_reduction: str = "mean",
    dtype: str = "auto",
    overwrite: bool = False,
) -> ConversionReport:
    """Convert the Qwen2.5-VL folder `base` into a GAP folder `output_dir`; returns a :class:`ConversionReport`.

    The folder is written beside `output_dir` and renamed into place when complete (with `overwrite`, a non-empty
    `output_dir` is replaced then), so a kill or failure never leaves one that looks complete.

    `pca` (a ``pca.safetensors`` or a folder holding one) is required for ``latent_head_type="pca"`` and
    refused for ``"full"``. `dtype` is ``"auto"`` (the checkpoint's), ``"float32"``, ``"bfloat16"`` or
    ``"float16"``; the latent head and PCA buffers are fp32 whatever it is.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from modeling_gap import GapForConditionalGeneration
    from processing_gap import GapProcessor

    from .pca import check_pca_encoder, load_pca
    from .qwen_processor import load_qwen2_5_vl_processor

    base = Path(base)
    _check_arguments(base, pca, latent_tokens_per_span, latent_head_type, latent_adapter_size, latent_loss_weight,
                     latent_loss_reduction)
    output_dir = check_output_dir(output_dir, ConversionError, overwrite=overwrite,
                                  inputs={"base checkpoint": base, "PCA basis": pca})
    basis = load_pca(pca) if pca is not None else None
    if basis is not None:  # before the model loads: the basis must come from this model's tower
        d = Qwen2_5_VLConfig.from_pretrained(str(base)).text_config.hidden_size
        if basis.d != d:
            raise ConversionError(
                f"the PCA in {pca} has width d={basis.d} but {base} has hidden size d={d}: fit the PCA on latent "
                "targets from this model's vision tower"
            )
        check_pca_encoder(basis, base, str(pca))

    base_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(base), dtype=resolve_dtype(dtype)).eval()
    base_processor = load_qwen2_5_vl_processor(base)
    tokenizer = base_processor.tokenizer
    rows_before = int(base_model.get_input_embeddings().weight.shape[0])
    tokens_before = len(tokenizer)
    had_tokens = [token for token in LATENT_TOKENS if token in tokenizer.get_vocab()]
    weights_dtype = base_model.dtype

    model, tokenizer = GapForConditionalGeneration.from_qwen2_5_vl(
        base_model, tokenizer, basis, latent_tokens_per_span=latent_tokens_per_span, latent_head_type=latent_head_type,
        latent_adapter_size=latent_adapter_size, latent_loss_weight=latent_loss_weight,
        latent_loss_reduction=latent_loss_reduction,
    )
    del base_model
    processor = GapProcessor.from_qwen2_5_vl_processor(base_processor, tokenizer, latent_tokens_per_span=latent_tokens_per_span)

    with atomic_output_dir(output_dir) as staging:  # never a folder that looks complete and is not
        model.save_pretrained(str(staging))
        processor.save_pretrained(str(staging))
        missing_code = [name for name in ("configuration_gap.py", "modeling_gap.py", "processing_gap.py")
                        if not (staging / name).is_file()]
        if missing_code:
            raise RuntimeError(f"saving did not write the remote-code files {missing_code} into {output_dir}")
    return _conversion_report(base, output_dir, pca, model, tokens_before, rows_before, had_tokens, weights_dtype)


def is_gap_folder(path: str | os.PathLike) -> bool:
    """Whether `path` holds a GAP checkpoint (a ``config.json`` of model type ``gap_qwen2_5_vl``)."""
    try:
        return model_type_of(path) == GAP_MODEL_TYPE
    except GapError:  # no config.json
        return False


def ensure_gap_checkpoint(
    base: str | os.PathLike,
    target: str | os.PathLike,
    pca: str | os.PathLike | None = None,
    *,
    replace_other: bool = False,
    **options: Any,
) -> Path:
    """The GAP folder `target`, converted from the Qwen2.5-VL folder `base` unless it already holds one.

    The conversion (:func:`convert_checkpoint` with `pca` and `options`) writes into a temporary folder next to
    `target` and renames it into place, so several processes sharing a filesystem may race: the first rename wins
    and the others reuse its folder. The folder records its base, PCA basis and options (`CONVERSION_RECORD`); an
    existing `target` is reused only when they match. One converted from other inputs is refused, or with
    `replace_other` (a folder this run owns, such as ``<output_dir>/_gap-init``) converted again with a notice; a
    `target` that holds something else is refused.
    """
    target = Path(target)
    if not os.path.isdir(base):
        raise ConversionError(
            f"{base} is not a local folder: download the Qwen2.5-VL checkpoint first (e.g. `hf download {base} "
            f"--local-dir <dir>`) and pass the folder."
        )
    if options.get("latent_head_type", "pca") == "pca" and pca is None:
        raise ConversionError(
            f"{base} is a plain Qwen2.5-VL checkpoint: pass --pca_path (the pca.safetensors of `gap fit-pca`) to "
            f"convert it, or a GAP checkpoint as --model_name_or_path."
        )
    record = {"base": model_fingerprint(base), "pca": data_fingerprint(pca) if pca is not None else None,
              "options": options}
    replace = False
    if is_gap_folder(target):
        stored = target / CONVERSION_RECORD
        differences = (record_differences(json.loads(stored.read_text(encoding="utf-8")), record) if stored.is_file()
                       else [f"no {CONVERSION_RECORD}"])
        if not (replace_other and differences):
            check_or_record(target, CONVERSION_RECORD, record, what="a converted GAP checkpoint", has_results=True,
                            fresh=f"remove {target} or pass another --converted_model_dir")
            return target
        print(f"{target} holds a GAP checkpoint converted from other inputs ({'; '.join(differences)}): converting "
              "again", file=sys.stderr)
        replace = True
    elif target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConversionError(f"--converted_model_dir {target} exists and holds no GAP checkpoint; remove it or pick another.")
    target.absolute().parent.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".gap-init-", dir=target.absolute().parent)
    try:
        convert_checkpoint(base, staging, pca, overwrite=True, **options)
        write_json_file(Path(staging) / CONVERSION_RECORD, record)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if replace:  # the earlier conversion goes only once the new one is complete
        old = tempfile.mkdtemp(prefix=".gap-init-old-", dir=target.absolute().parent)
        os.replace(target, old)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
        return target
    try:
        os.rename(staging, target)
    except OSError:  # another node sharing this filesystem renamed its copy first
        shutil.rmtree(staging)
        if not is_gap_folder(target):
            raise
    return target


def verify_conversion(base: str | os.PathLike, output_dir: str | os.PathLike) -> dict[str, Any]:
    """Reload the GAP folder with ``trust_remote_code`` and compare its logits with the base on a text probe.

    Returns ``{"max_abs_diff", "columns", "equal"}`` over the base tokenizer's vocabulary columns. Loads both
    models (twice the memory of one).
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    base_tokenizer = AutoTokenizer.from_pretrained(str(base))
    columns = len(base_tokenizer)
    probe = base_tokenizer(["Count the red cells in the first row of the grid."], return_tensors="pt")
    gap = AutoModelForImageTextToText.from_pretrained(str(output_dir), trust_remote_code=True, dtype="auto").eval()
    with torch.no_grad():
        gap_logits = gap(**probe).logits[..., :columns].float()
    del gap
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(base), dtype="auto").eval()
    with torch.no_grad():
        base_logits = reference(**probe).logits[..., :columns].float()
    diff = float((gap_logits - base_logits).abs().max())
    return {"max_abs_diff": diff, "columns": columns, "equal": bool(torch.equal(gap_logits, base_logits))}


def format_summary(report: ConversionReport, seconds: float | None = None) -> str:
    ids = ", ".join(f"{token}={token_id}" for token, token_id in report["latent_token_ids"].items())
    added = f"added {len(report['tokens_added'])}" if report["tokens_added"] else "already in the tokenizer"
    if report["grown"]:
        rows = (f"grown {report['embedding_rows_before']} -> {report['embedding_rows_after']} "
                "(new rows = mean of the existing rows)")
    else:
        rows = f"kept at {report['embedding_rows_after']} (the new ids fit into unused rows)"
    side = report["latent_grid_side"]
    head = (f"pca, k = {report['pca_num_components']} components of d = {report['hidden_size']}"
            if report["latent_head_type"] == "pca" else f"full (d -> d, no PCA), d = {report['hidden_size']}")
    lines = [
        f"converted {report['base']} -> {report['output_dir']}" + (f" in {seconds:.1f}s" if seconds is not None else ""),
        f"  latent tokens: {ids} ({added})",
        f"  embedding rows: {rows}; tied LM head: {report['tied_word_embeddings']}",
        f"  K = {report['latent_tokens_per_span']} latent tokens per span ({side} x {side}); head: {head}",
        f"  latent loss: lambda = {report['latent_loss_weight']:g}, reduction {report['latent_loss_reduction']}; "
        f"head parameters: {report['latent_head_parameters']:,} (fp32, adapter {report['latent_adapter_size']}); "
        f"weights: {report['dtype']}",
        f"  files: {', '.join(report['files'])}",
        "  load: AutoModelForImageTextToText.from_pretrained(OUT, trust_remote_code=True), "
        "AutoProcessor.from_pretrained(OUT, trust_remote_code=True)",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ command line

HELP = "Convert a Qwen2.5-VL checkpoint folder (+ pca.safetensors) into a GAP checkpoint folder."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gap convert``."""
    parser.add_argument("--base", required=True, help="the Qwen2.5-VL checkpoint folder (weights, tokenizer, processor)")
    parser.add_argument("--pca", default=None, help="pca.safetensors from `gap fit-pca` (or its folder); needed for --head-type pca")
    parser.add_argument("--output-dir", required=True, help="the GAP checkpoint folder to write")
    parser.add_argument("--latent-tokens-per-span", type=int, default=DEFAULT_LATENT_TOKENS_PER_SPAN,
                        help="K, latent tokens per span, a perfect square (default: 36 = 6 x 6)")
    parser.add_argument("--head-type", choices=LATENT_HEAD_TYPES, default="pca",
                        help="pca: GAP's PCA-aligned head; full: d -> d head without PCA, the paper's LH ablation (default: pca)")
    parser.add_argument("--latent-adapter-size", type=int, default=1024, help="width of the head's SwiGLU adapter (default: 1024)")
    parser.add_argument("--latent-loss-weight", type=float, default=1.0, help="lambda of Eq. 3 (default: 1.0)")
    parser.add_argument("--latent-loss-reduction", choices=LATENT_LOSS_REDUCTIONS, default="mean",
                        help="mean: per element (default); sum: squared L2 over d, Eq. 2 literally")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="dtype of the saved weights (default: auto = the base checkpoint's); the latent head stays fp32")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir (once the new one "
                        "is complete)")
    parser.add_argument("--verify", action="store_true",
                        help="reload the result with trust_remote_code and compare its logits with the base (loads both)")


def run(args: argparse.Namespace) -> int:
    """Run ``gap convert``."""
    started = time.time()
    remove_stale_staging(args.output_dir, "gap convert")
    report = convert_checkpoint(
        args.base, args.output_dir, args.pca, latent_tokens_per_span=args.latent_tokens_per_span,
        latent_head_type=args.head_type, latent_adapter_size=args.latent_adapter_size,
        latent_loss_weight=args.latent_loss_weight, latent_loss_reduction=args.latent_loss_reduction, dtype=args.dtype,
        overwrite=args.overwrite,
    )
    print(format_summary(report, time.time() - started))
    if args.verify:
        check = verify_conversion(args.base, args.output_dir)
        verdict = "identical" if check["equal"] else f"max |diff| {check['max_abs_diff']:.3g}"
        print(f"  verify: reloaded with trust_remote_code; logits on the base vocabulary ({check['columns']} columns) "
              f"vs the base model without latents: {verdict}")
        if not check["equal"] and check["max_abs_diff"] > 1e-3:
            print("error: the converted model does not reproduce the base logits", file=sys.stderr)
            return 1
    return 0
