"""``gap evaluate``: accuracy per latent intervention and latent budget, with latency (paper Tables 6, 9, 10).

The inputs (a project-schema dataset, or a VLMEvalKit TSV) and the outputs (``predictions.jsonl``, ``summary.json`` /
``.md``) are described in the README's "Evaluate" section. Under ``accelerate launch`` / ``torchrun`` each rank takes
every world-size-th item into its own ``predictions.rank*.jsonl`` and rank 0 merges; finished (id, intervention,
budget) records are not generated again. Seconds per sample are the batch's wall time divided by its size.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import csv
import io
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modeling_gap import LATENT_INTERVENTIONS

from . import GapError
from .cli import comma_list, positive_int
from .datasets_io import (append_json_lines, check_apart_from_inputs, check_writable, read_json_lines, utf8_lines,
                          write_json_file)
from .data import (add_allow_outside_image_dir_argument, add_max_image_pixels_argument, special_token_problem,
                   undecoded_images)
from .inference import DTYPES, RowError, encode_prompts, generate_texts
from .targets import TARGETS_COLUMN
from .provenance import RUN_RECORD, check_or_record, data_fingerprint, model_fingerprint

HELP = "Evaluate a checkpoint: accuracy per latent intervention and budget, latency, latent norms."

TSV_OPTION_LETTERS = ("A", "B", "C", "D", "E", "F", "G", "H")
TSV_COLUMNS = ("index", "image", "question", "answer")  # the columns a scored VLMEvalKit TSV must have
BASE_SETTING = "base"  # the intervention name recorded for a plain Qwen2.5-VL checkpoint
MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."


class EvaluationError(GapError):
    """Bad arguments or input of ``gap evaluate`` that cannot be evaluated as a whole (missing file or columns,
    duplicate ids, unknown interventions); the message names the file, row or argument."""


def _claim_id(seen: dict[str, str], item_id: str, where: str, path) -> None:
    """Record that `where` uses `item_id`; a second use is an error naming both rows."""
    if item_id in seen:
        raise EvaluationError(
            f"{path}: id {item_id!r} is used by {seen[item_id]} and by {where}; predictions are stored and resumed "
            "by id, so ids must be unique: give each row its own id."
        )
    seen[item_id] = where


@dataclass
class EvalItem:
    """One question: its id, chat messages, opened query images, gold answer and options."""

    id: str
    messages: list
    images: list
    gold: str
    options: dict | None = None
    extra: dict = field(default_factory=dict)
    latent_targets: Any = None  # (n_spans * K, d) true latents, when the rows come from `gap targets`
    latent_targets_k: int | None = None  # their K (None: not recorded)

    def checker_row(self) -> dict:
        row = {"id": self.id, "answer": self.gold, **self.extra}
        if self.options:
            row["options"] = self.options
        return row


# ------------------------------------------------------------------------------------------ inputs


def decode_base64_image(value: str, where: str):
    """The RGB PIL image of a base64 field; a field that is not base64 or not an image raises `RowError` naming `where`."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RowError(f"{where}: the image field is not valid base64") from None
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except (UnidentifiedImageError, OSError):
        raise RowError(f"{where}: the image field decodes to bytes that are not an image") from None


def mcq_prompt(question: str, options: dict, hint: str | None = None) -> str:
    """The text of a multiple-choice question: optional hint, question, lettered options, instruction."""
    lines = []
    if hint:
        lines.append(f"Hint: {hint}")
    lines.append(f"Question: {question}")
    if options:
        lines.append("Options:")
        lines.extend(f"{letter}. {text}" for letter, text in options.items())
        lines.append(MCQ_INSTRUCTION)
    return "\n".join(lines)


def _tsv_shape_problem(record: dict, n_columns: int) -> str | None:
    """Why a `csv.DictReader` record does not line up with the header, or None."""
    if any("\t" in value and "\n" in value for value in record.values() if isinstance(value, str)):
        return ("a field spans tabs and line breaks: a stray '\"' opened a quoted field that swallowed the next "
                "line(s); remove the quote (or double it inside a quoted field)")
    if record.get(None):  # the reader's restkey: fields past the header's
        return (f"{n_columns + len(record[None])} fields but the header has {n_columns}: a tab inside a field shifts "
                "the columns after it; remove the tab")
    present = sum(value is not None for key, value in record.items() if key is not None)
    if present < n_columns:
        return f"{present} fields but the header has {n_columns}; fill in the missing fields"
    return None


def iter_tsv_records(path: str | Path, required: Iterable[str] = TSV_COLUMNS) -> Iterator[tuple[str, str, dict, str | None]]:
    """``(index, where, record, problem)`` for each row of a VLMEvalKit-style TSV, read one row at a time.

    `where` names the file, the row's index and its lines; `record` maps the columns to their raw strings (the base64
    image undecoded); `problem` says why the row does not line up with the header (an extra tab, a missing field, a
    stray quote that swallows the next lines), None when it does. A missing file or `required` column, a byte that is
    not UTF-8 (named by line) and an index used twice (naming both rows) raise `EvaluationError`."""
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    if not Path(path).is_file():
        raise EvaluationError(f"{path}: no such TSV file")
    reader = csv.DictReader(utf8_lines(path, EvaluationError), delimiter="\t")
    missing = set(required) - set(reader.fieldnames or [])
    if missing:
        raise EvaluationError(f"{path}: the TSV lacks columns {sorted(missing)}; VLMEvalKit's layout has {sorted(required)}")
    seen: dict[str, str] = {}
    last_line = reader.line_num
    for line, record in enumerate(reader, start=2):
        lines = f"line {reader.line_num}" if reader.line_num == last_line + 1 else f"lines {last_line + 1}-{reader.line_num}"
        last_line = reader.line_num
        index = (record.get("index") or "").strip() or f"line {line}"
        _claim_id(seen, index, f"the row on {lines}", path)
        yield index, f"{path} row index={index} ({lines})", record, _tsv_shape_problem(record, len(reader.fieldnames))


def load_tsv_items(path: str | Path) -> tuple[list[EvalItem], list[str]]:
    """Items of a VLMEvalKit-style TSV and one problem line per row that cannot be scored.

    Strict (see `iter_tsv_records`): a row whose fields do not line up with the header is a problem naming its index
    and lines; a byte that is not UTF-8 and an index used twice are errors."""
    items, problems = [], []
    for index, where, record, shape_problem in iter_tsv_records(path):
        if shape_problem:
            problems.append(f"{where}: {shape_problem}")
            continue
        fields = {key: (value or "").strip() for key, value in record.items()}
        try:
            if not fields["image"]:
                raise RowError(f"{where}: no image")
            image = decode_base64_image(fields["image"], where)
            for key in ("answer", "question"):
                if not fields[key]:
                    raise RowError(f"{where}: no {key}")
        except RowError as error:
            problems.append(str(error))
            continue
        options = {letter: fields[letter] for letter in TSV_OPTION_LETTERS if fields.get(letter, "").lower() not in ("", "nan")}
        hint = fields.get("hint", "")
        text = mcq_prompt(fields["question"], options, hint if hint.lower() != "nan" else None)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        problem = special_token_problem(messages)
        if problem is not None:
            problems.append(f"{where}: {problem}")
            continue
        extra = {key: record[key] for key in ("category",) if record.get(key)}
        items.append(EvalItem(index, messages, [image], fields["answer"], options or None, extra))
    return items, problems


def load_dataset_items(path: str | Path, split: str | None = None, *, allow_outside_image_dir: bool = False,
                       model: str | Path | None = None) -> tuple[list[EvalItem], list[str]]:
    """Items of a dataset in the project schema and one problem line per row that cannot be scored; image paths stay
    inside the data's folder unless `allow_outside_image_dir` (see `load_rows`). Latent targets (a `gap targets`
    folder) must come from the vision tower of the checkpoint folder `model`, when one is given."""
    from .answers import AnswerError, gold_answer, normalize_options
    from .inference import dataset_base_dir, load_rows, prompt_of_row

    # images stay undecoded until prompt_of_row opens them, so a bad image is a problem naming its row
    dataset = undecoded_images(load_rows(path, split, allow_outside_image_dir=allow_outside_image_dir), ["images"])
    targets_k = _check_targets(dataset, path, model) if TARGETS_COLUMN in dataset.column_names else None
    base_dir = dataset_base_dir(path)
    items, problems = [], []
    seen: dict[str, str] = {}
    for index, row in enumerate(dataset):
        row_id = str(row["id"] if row.get("id") is not None else index)
        _claim_id(seen, row_id, f"row {index}", path)
        try:
            messages, images = prompt_of_row(row, index, base_dir=base_dir)
            gold = gold_answer(row, index)
            options = normalize_options(row["options"]) if row.get("options") else None
        except (RowError, AnswerError) as error:
            problems.append(str(error))
            continue
        items.append(EvalItem(row_id, messages, images, gold, options or None,
                              latent_targets=row.get(TARGETS_COLUMN), latent_targets_k=targets_k))
    return items, problems


def _check_targets(dataset, path, model) -> int | None:
    """The K of the rows' latent targets (None when they record none), checked to come from `model`'s vision tower:
    they are what the oracle feeds and what the fidelity columns compare with."""
    from .targets import TargetsError, check_targets_encoder, targets_metadata
    from transformers.utils import logging

    try:
        metadata = targets_metadata(dataset)
    except TargetsError as exc:
        logging.get_logger(__name__).warning(f"{path}: the latent targets' K and vision tower are unknown ({exc})")
        return None
    if model is not None:
        check_targets_encoder(dataset, model, where=str(path),
                              fix=f"compute the evaluation targets with `gap targets --model {model}`")
    return int(metadata["latent_tokens_per_span"])


def load_items(path: str | Path, split: str | None = None, *, allow_outside_image_dir: bool = False,
               model: str | Path | None = None) -> tuple[list[EvalItem], list[str]]:
    """TSV benchmark files by extension (images inline), datasets otherwise (`load_dataset_items`)."""
    if str(path).lower().endswith(".tsv"):
        return load_tsv_items(path)
    return load_dataset_items(path, split, allow_outside_image_dir=allow_outside_image_dir, model=model)


# ------------------------------------------------------------------------------------------ evaluation


def summarize(records: list[dict]) -> list[dict]:
    """One summary row per (intervention, budget), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((record["intervention"], record["budget"]), []).append(record)
    rows = []
    for (intervention, budget), group in groups.items():
        seconds = [r["seconds"] for r in group]
        norms = [n for r in group for n in r["latent_span_norms"]]
        rows.append({
            "intervention": intervention,
            "budget": budget,
            "n": len(group),
            "accuracy": sum(r["correct"] for r in group) / len(group),
            "span_rate": sum(r["latent_spans"] > 0 for r in group) / len(group),
            "mean_latent_norm": _mean(norms),
            "mean_vision_norm": _mean([r["vision_norm"] for r in group if r.get("vision_norm") is not None]),
            **_fidelity_summary(group),
            "mean_seconds": _mean(seconds),
            "p50_seconds": float(np.percentile(seconds, 50)),
            "p90_seconds": float(np.percentile(seconds, 90)),
        })
    return rows


def _fidelity_summary(group: list[dict]) -> dict:
    """Mean cosine and relative squared error of the written latents against the targets, overall and per slot,
    over the spans of the rows that carry targets (None where no row does)."""
    spans = [(cos, rel) for r in group if r.get("latent_fidelity")
             for cos, rel in zip(r["latent_fidelity"]["cosine"], r["latent_fidelity"]["relse"])]
    if not spans:
        return {"latent_cosine": None, "latent_relse": None, "latent_cosine_per_slot": None,
                "latent_relse_per_slot": None, "fidelity_spans": 0}
    K = min(len(cos) for cos, _ in spans)
    per_slot_cos = [_mean([cos[k] for cos, _ in spans]) for k in range(K)]
    per_slot_rel = [_mean([rel[k] for _, rel in spans]) for k in range(K)]
    return {"latent_cosine": _mean(per_slot_cos), "latent_relse": _mean(per_slot_rel),
            "latent_cosine_per_slot": per_slot_cos, "latent_relse_per_slot": per_slot_rel,
            "fidelity_spans": len(spans)}


def _mean(values):
    return sum(values) / len(values) if values else None


def summary_markdown(rows: list[dict]) -> str:
    def fmt(value, spec):
        return "–" if value is None else format(value, spec)

    lines = [
        "| intervention | K | n | accuracy | opened a span | mean latent norm | vision norm | latent cos | latent RelSE "
        "| mean s | P50 s | P90 s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['intervention']} | {r['budget']} | {r['n']} | {r['accuracy']:.3f} | {r['span_rate']:.2f} | "
            f"{fmt(r['mean_latent_norm'], '.3f')} | {fmt(r['mean_vision_norm'], '.3f')} | "
            f"{fmt(r.get('latent_cosine'), '.3f')} | {fmt(r.get('latent_relse'), '.3f')} | {r['mean_seconds']:.3f} | "
            f"{r['p50_seconds']:.3f} | {r['p90_seconds']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _vision_norms(model, inputs, n_rows):
    """Mean L2 norm of each row's query-image vision tokens (None for rows without an image)."""
    import torch

    if inputs.get("pixel_values") is None:
        return [None] * n_rows
    with torch.no_grad():
        features = torch.cat(model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()  # one token per feature row
    return [rows.float().norm(dim=-1).mean().item() if count else None
            for rows, count in zip(features.split(counts), counts)]


def _targets_as_spans(item: EvalItem, K: int):
    """The item's latent targets as (n_spans, K, d) fp32, or None when it has none or they are not K per span."""
    import torch

    if item.latent_targets is None or item.latent_targets_k not in (None, K):  # spans of another K: none of this budget
        return None
    targets = torch.as_tensor(item.latent_targets, dtype=torch.float32)
    targets = targets.reshape(-1, targets.shape[-1])
    if targets.shape[0] == 0 or targets.shape[0] % K:
        return None
    return targets.reshape(-1, K, targets.shape[-1])


def latent_fidelity(generated, targets) -> dict | None:
    """Cosine and relative squared error ||v_hat - v||^2 / ||v||^2 of generated latents against the targets, per
    span and slot, for the spans both have ((n, K) lists); None when nothing can be compared."""
    import torch

    if targets is None or generated is None:
        return None
    n = min(generated.shape[0], targets.shape[0])
    if n == 0 or generated.shape[1] != targets.shape[1]:
        return None
    v_hat, v = generated[:n].float(), targets[:n].to(generated.device).float()
    cosine = torch.nn.functional.cosine_similarity(v_hat, v, dim=-1)
    relse = (v_hat - v).pow(2).sum(-1) / v.pow(2).sum(-1).clamp_min(1e-12)
    return {"cosine": cosine.tolist(), "relse": relse.tolist()}


def generate_batch(model, processor, items, *, is_gap, intervention, budget, max_new_tokens, generator, do_sample,
                   generation_kwargs: dict | None = None):
    """Generate for a batch of items; returns (texts, span counts, per-span mean norms, vision norms, seconds,
    per-row latent fidelity against the items' targets or None). `generation_kwargs` (temperature, top_p, ...)
    go to ``generate`` as they are."""
    inputs = encode_prompts(processor, [(item.messages, item.images) for item in items], model.device)
    vision_norms = _vision_norms(model, inputs, len(items))
    kwargs = dict(generation_kwargs or {}, max_new_tokens=max_new_tokens, do_sample=do_sample)
    targets = [_targets_as_spans(item, budget) for item in items] if is_gap else [None] * len(items)
    if is_gap:
        kwargs.update(latent_intervention=intervention, latent_tokens_per_span=budget, latent_generator=generator,
                      return_dict_in_generate=True)
        if intervention == "oracle":
            missing = [item.id for item, t in zip(items, targets) if t is None]
            if missing:
                raise RowError(
                    f"rows {missing[:5]} have no latent targets of K={budget} per span, which the 'oracle' "
                    "intervention feeds; evaluate a dataset folder written by `gap targets` with that K")
            kwargs["latent_oracle"] = targets
    started = time.perf_counter()
    output, texts = generate_texts(model, processor, inputs, **kwargs)
    seconds = (time.perf_counter() - started) / len(items)
    if is_gap:
        spans = output.num_latent_spans.tolist()
        norms = [norm.mean(dim=-1).tolist() for norm in output.latent_norms]
        written = output.head_latents if intervention == "oracle" else output.latents  # what the model wrote
        fidelity = [latent_fidelity(w, t) for w, t in zip(written, targets)]
    else:
        spans, norms, fidelity = [0] * len(items), [[] for _ in items], [None] * len(items)
    return texts, spans, norms, vision_norms, seconds, fidelity


def _record_key(record):
    return (str(record["id"]), record["intervention"], int(record["budget"]))


def read_records(output_dir: Path, repair: Path | None = None) -> list[dict]:
    """Every record already written in `output_dir` (merged and per-rank files), without duplicates.

    A torn last line (a kill or a full disk cut its write short) is dropped, so its row is scored again; in the file
    `repair`, the one this process appends to, it is also cut off, with a notice. A damaged line before the last is an
    `EvaluationError` naming the file and the line."""
    records: dict[tuple, dict] = {}
    for path in sorted(output_dir.glob("predictions*.jsonl")):
        lines, torn = read_json_lines(path, EvaluationError, repair=path == repair, redo="its row is scored again")
        if torn and path == repair:
            print(f"gap evaluate: {path}: dropped its torn last line (a write cut short by a kill or a full disk); "
                  "that row is scored again", file=sys.stderr)
        for record in lines:
            records.setdefault(_record_key(record), record)
    return list(records.values())


def evaluate(
    model,
    processor,
    items: list[EvalItem],
    output_dir: str | Path,
    *,
    is_gap: bool,
    interventions=("pca",),
    budgets=(None,),
    batch_size: int = 8,
    max_new_tokens: int = 256,
    checker=None,
    seed: int = 0,
    do_sample: bool = False,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> list[dict]:
    """Run every (intervention, budget) setting on this rank's share of `items`; append records as they finish.

    Returns the records this call wrote. Records already present in `output_dir` are skipped.
    """
    import torch
    from tqdm.auto import tqdm

    from .answers import DefaultAnswerChecker, extract_answer

    checker = checker or DefaultAnswerChecker()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / (f"predictions.rank{rank}.jsonl" if world_size > 1 else "predictions.jsonl")
    done = {_record_key(r) for r in read_records(output_dir, repair=path)}
    settings = [(BASE_SETTING, 0)] if not is_gap else [
        (intervention, budget if budget is not None else model.config.latent_tokens_per_span)
        for intervention in interventions
        for budget in budgets
    ]
    mine = items[rank::world_size]
    todo = [(s, item) for s in settings for item in mine if (item.id, s[0], s[1]) not in done]
    written = []
    generator = torch.Generator(device=model.device).manual_seed(seed + rank)
    bar = tqdm(total=len(todo), desc=f"evaluate[rank {rank}]", disable=not progress)
    with open(path, "a", encoding="utf-8") as out:
        for setting in settings:
            pending = [item for s, item in todo if s == setting]
            for start in range(0, len(pending), batch_size):
                batch = pending[start : start + batch_size]
                texts, spans, norms, vision_norms, seconds, fidelity = generate_batch(
                    model, processor, batch, is_gap=is_gap, intervention=setting[0], budget=setting[1],
                    max_new_tokens=max_new_tokens, generator=generator, do_sample=do_sample,
                )
                for item, text, n_spans, span_norms, vision_norm, span_fidelity in zip(
                    batch, texts, spans, norms, vision_norms, fidelity
                ):
                    record = {
                        "id": item.id,
                        "intervention": setting[0],
                        "budget": setting[1],
                        "prediction": text,
                        "extracted": extract_answer(text, options=item.options),
                        "gold": item.gold,
                        "correct": bool(checker(text, item.gold, item.checker_row())),
                        "latent_spans": n_spans,
                        "latent_span_norms": span_norms,
                        "vision_norm": vision_norm,
                        "seconds": seconds,
                    }
                    if span_fidelity is not None:
                        record["latent_fidelity"] = span_fidelity
                    append_json_lines(out, [record])  # each as it is scored: a checker failure keeps the rest
                    written.append(record)
                bar.update(len(batch))
    bar.close()
    return written


def finalize(output_dir: str | Path, item_order: list[str]) -> list[dict]:
    """Merge the prediction files of the rows `item_order` into ``predictions.jsonl``; write ``summary.json`` / ``.md``."""
    output_dir = Path(output_dir)
    order = {item_id: i for i, item_id in enumerate(item_order)}
    records = [r for r in read_records(output_dir) if str(r["id"]) in order]  # --limit may have shrunk the rows
    settings_order: dict[tuple, int] = {}
    for record in records:
        settings_order.setdefault((record["intervention"], record["budget"]), len(settings_order))
    records.sort(key=lambda r: (settings_order[(r["intervention"], r["budget"])], order.get(str(r["id"]), len(order))))
    merged = output_dir / "predictions.jsonl"
    tmp = merged.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        append_json_lines(f, records)
    for rank_file in output_dir.glob("predictions.rank*.jsonl"):
        rank_file.unlink()
    tmp.replace(merged)
    rows = summarize(records)
    write_json_file(output_dir / "summary.json", rows)
    (output_dir / "summary.md").write_text(summary_markdown(rows), encoding="utf-8")
    return rows


# ------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a GAP or Qwen2.5-VL checkpoint folder")
    parser.add_argument("--data", required=True,
                        help="a dataset (save_to_disk folder, .jsonl, .json, .parquet) or a VLMEvalKit .tsv file")
    parser.add_argument("--split", default=None, help="split of a DatasetDict folder")
    parser.add_argument("--output-dir", required=True, help="where predictions.jsonl and summary.{json,md} go")
    parser.add_argument("--interventions", type=comma_list,
                        default=",".join(name for name in LATENT_INTERVENTIONS if name != "oracle"),
                        help="comma-separated latent interventions of a GAP checkpoint, from "
                        f"{', '.join(LATENT_INTERVENTIONS)} (default: all but oracle, which needs rows with latent "
                        "targets)")
    parser.add_argument("--budgets", type=_budgets, default=None,
                        help="comma-separated latent budgets K, perfect squares (default: the checkpoint's K)")
    parser.add_argument("--batch-size", type=positive_int, default=8,
                        help="rows generated together (default: 8; 1 for unbatched latency)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256,
                        help="longest answer in tokens, latent tokens included (default: 256)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the noise intervention (and of sampling) (default: 0)")
    parser.add_argument("--checker", default=None, help="answer checker as module:callable (default: built-in)")
    parser.add_argument("--on-bad-row", choices=("skip", "error"), default="skip",
                        help="a row without image/answer or with bad base64: report and skip it, or stop "
                        "(default: skip)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="evaluate only the first N usable rows (default: all)")
    add_max_image_pixels_argument(parser)
    add_allow_outside_image_dir_argument(parser)
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights dtype (default: auto = the checkpoint's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard the predictions already in --output-dir (of another model, data or settings)")


RESULT_FILES = ("predictions*.jsonl", "summary.json", "summary.md", RUN_RECORD)


def claim_output_dir(args: argparse.Namespace) -> None:
    """Resume the predictions in --output-dir only if the same model, data and settings made them.

    A folder whose record differs (or that has predictions and no record) is refused with a `ProvenanceError`
    naming what differs; `run` removes earlier results first under --overwrite.
    """
    output_dir = Path(args.output_dir)
    settings = {key: getattr(args, key) for key in ("split", "max_new_tokens", "do_sample", "seed", "checker", "dtype")}
    record = {"model": model_fingerprint(args.model), "data": data_fingerprint(args.data), "settings": settings}
    check_or_record(output_dir, RUN_RECORD, record, what="predictions",
                    has_results=any(output_dir.glob("predictions*.jsonl")),
                    fresh="pass --overwrite to discard them and start fresh, or choose another --output-dir")


def _budgets(value: str) -> list[int]:
    """``--budgets``: comma-separated latent budgets, each a perfect square."""
    from configuration_gap import check_latent_budget

    budgets = []
    for item in comma_list(value):
        try:
            budget = int(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not an integer") from None
        try:
            check_latent_budget(budget, "K")
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        budgets.append(budget)
    return budgets


def run(args: argparse.Namespace) -> int:
    import torch
    from accelerate import PartialState

    from .answers import load_checker
    from .inference import GAP_MODEL_TYPE, check_model_folder, load_model_and_processor, model_type_of

    check_model_folder(args.model, "--model", EvaluationError)
    check_apart_from_inputs(args.output_dir, {"--model folder": args.model, "--data": args.data}, EvaluationError)
    check_writable(args.output_dir, EvaluationError)
    state = PartialState(cpu=not torch.cuda.is_available())
    interventions = args.interventions
    unknown = sorted(set(interventions) - set(LATENT_INTERVENTIONS))
    if unknown:
        raise EvaluationError(f"--interventions: unknown {unknown}; choose from {list(LATENT_INTERVENTIONS)}")
    budgets = args.budgets or [None]
    is_gap_folder = model_type_of(args.model) == GAP_MODEL_TYPE  # targets are compared with a GAP model's latents
    items, problems = load_items(args.data, args.split, allow_outside_image_dir=args.allow_outside_image_dir,
                                 model=args.model if is_gap_folder else None)
    if state.is_main_process:
        for problem in problems:
            print(f"gap evaluate: bad row: {problem}", file=sys.stderr)
    if problems and args.on_bad_row == "error":
        raise RowError(f"{len(problems)} bad row(s) in {args.data}; fix them or pass --on-bad-row skip")
    if args.limit is not None:
        items = items[: args.limit]
    if not items:
        raise EvaluationError(f"{args.data} has no usable rows")
    model, processor, is_gap = load_model_and_processor(args.model, dtype=args.dtype, device=state.device)
    if is_gap and "oracle" in interventions:
        missing = [item.id for item in items if item.latent_targets is None]
        if missing:
            raise EvaluationError(
                f"the 'oracle' intervention feeds each row's true latents, but rows {missing[:5]} ({len(missing)} in "
                f"all) of {args.data} have none; run `gap targets` on the evaluation rows and pass its output folder "
                "as --data"
            )
        pooled = {item.latent_targets_k for item in items} - {None}
        other = sorted({budget or model.config.latent_tokens_per_span for budget in budgets} - pooled) if pooled else []
        if other:
            raise EvaluationError(
                f"the 'oracle' intervention feeds the rows' latent targets, pooled for K={sorted(pooled)} per span, "
                f"which budget(s) {other} cannot take; pass --budgets {','.join(map(str, sorted(pooled)))} or "
                "compute targets of that K with `gap targets --latent-tokens-per-span`"
            )
    if args.overwrite and state.is_main_process:
        for pattern in RESULT_FILES:
            for path in Path(args.output_dir).glob(pattern):
                path.unlink()
    state.wait_for_everyone()
    claim_output_dir(args)
    state.wait_for_everyone()
    started = time.perf_counter()
    evaluate(
        model, processor, items, args.output_dir, is_gap=is_gap, interventions=interventions, budgets=budgets,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, checker=load_checker(args.checker),
        seed=args.seed, do_sample=args.do_sample, rank=state.process_index, world_size=state.num_processes,
        progress=not args.no_progress and state.is_local_main_process,
    )
    state.wait_for_everyone()
    if state.is_main_process:
        rows = finalize(args.output_dir, [item.id for item in items])
        print(summary_markdown(rows), end="")
        print(
            f"{len(items)} rows ({len(problems)} bad rows skipped) x {len(rows)} settings on {state.num_processes} "
            f"process(es) in {time.perf_counter() - started:.1f} s -> {Path(args.output_dir) / 'summary.md'}"
        )
    return 0
