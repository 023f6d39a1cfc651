"""``gap filter``: the quality filters of the paper's data curation (App. I).

The paper removes rows whose auxiliary-image embedding is degenerate and rows whose ``<parser>`` text fails a
length or coherence check (its third filter, difficulty, is ``gap difficulty`` + difficulty-aware loading). A row is
removed for the first of `REASONS` it trips; the README's "Quality filters" table gives each reason's rule and
threshold flags, `FilterThresholds` their defaults. ``degenerate_aux`` needs the latent targets (``--targets``, or a
``--data`` folder written by ``gap targets``); its query-distance check pools the query images with the vision
tower of ``--model`` (not loaded when ``--min-query-distance`` is 0).

Outputs in ``--output-dir``: the kept rows in the input's format (a JSONL keeps its name and its lines as they
were, so its relative image paths still refer to the input's image folder, recorded in the report as
``image_dir``; a dataset folder, and the ``--targets`` folder, stay dataset folders of the same name) and
``filter_report.json`` (thresholds, checks run, counts per reason, percentiles of the measured values, removed rows).

    gap filter --data train.jsonl --targets data/train_targets --model Qwen/Qwen2.5-VL-7B-Instruct-folder \\
        --output-dir data/filtered
    gap fit-pca --targets data/filtered/train_targets ...     # the next steps read the filtered rows
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from processing_gap import LATENT_PLACEHOLDER

from . import GapError
from .data import (add_allow_outside_image_dir_argument, add_max_image_pixels_argument, check_rows, dataset_base_dir,
                   load_jsonl, turn_texts)
from .datasets_io import (atomic_files_into, atomic_output_dir, check_apart_from_inputs, claimed_output,
                          datasets_progress_bars, load_dataset_folder, utf8_lines, write_json_file)
from .inference import DTYPES, check_model_folder, load_processor, prompt_of_row, resolve_device
from .targets import (TARGETS_COLUMN, check_targets_encoder, load_targets_dataset, load_vision_tower,
                      targets_for_images, targets_metadata, tower_dtype)

HELP = "Remove rows with degenerate aux-image targets or bad <parser> text; write the kept rows and filter_report.json."

REASONS = ("degenerate_aux", "missing_parser", "parser_length", "parser_incoherent")
PARSER_BLOCK = re.compile(r"<parser>(.*?)</parser>", re.DOTALL)
WORD = re.compile(r"\w+")
MIN_NGRAMS = 4  # texts with fewer word n-grams are too short to call repetitive
PARSER_REQUIRED = ("auto", "yes", "no")
REPORT_NAME = "filter_report.json"
PERCENTILES = (1, 5, 50, 95)


class FilterError(GapError):
    """Bad input to ``gap filter``; the message names the file, row or argument and the fix."""


@dataclass(frozen=True)
class FilterThresholds:
    """The thresholds of the four reasons (see the module docstring); the defaults are the command's."""

    min_span_variance_ratio: float = 0.05
    min_query_distance: float = 0.05
    parser_min_tokens: int = 3
    parser_max_tokens: int = 512
    ngram_size: int = 3
    max_repeated_ngrams: float = 0.5
    min_alpha: float = 0.5
    parser_required: str = "auto"

    def __post_init__(self):
        at_least_zero = (("--min-span-variance-ratio", self.min_span_variance_ratio),
                         ("--min-query-distance", self.min_query_distance))
        problems = [f"{name} must be >= 0, got {value}" for name, value in at_least_zero if value < 0]
        if not 0 <= self.parser_min_tokens <= self.parser_max_tokens:
            problems.append(
                f"need 0 <= --parser-min-tokens <= --parser-max-tokens, got {self.parser_min_tokens} and "
                f"{self.parser_max_tokens}"
            )
        if self.ngram_size < 1:
            problems.append(f"--ngram-size must be >= 1, got {self.ngram_size}")
        for name, value in (("--max-repeated-ngrams", self.max_repeated_ngrams), ("--min-alpha", self.min_alpha)):
            if not 0 <= value <= 1:
                problems.append(f"{name} must be in [0, 1], got {value}")
        if self.parser_required not in PARSER_REQUIRED:
            problems.append(f"--parser-required must be one of {PARSER_REQUIRED}, got {self.parser_required!r}")
        if problems:
            raise FilterError("; ".join(problems))


@dataclass(frozen=True)
class Removal:
    """One removed row: its index in the input, its ``id`` (or None), the reason and what was measured."""

    index: int
    id: Any
    reason: str
    detail: str


@dataclass
class FilterResult:
    num_rows: int
    removed: list[Removal]
    thresholds: FilterThresholds
    checked: dict[str, bool]
    statistics: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def kept(self) -> list[int]:
        gone = {r.index for r in self.removed}
        return [i for i in range(self.num_rows) if i not in gone]

    @property
    def counts(self) -> dict[str, int]:
        return {reason: sum(r.reason == reason for r in self.removed) for reason in REASONS}

    def report(self, inputs: dict[str, str | None], outputs: dict[str, str]) -> dict:
        """The content of ``filter_report.json``."""
        return {
            "format": "gap-filter",
            "version": 1,
            "inputs": inputs,
            "outputs": outputs,
            "thresholds": asdict(self.thresholds),
            "checked": self.checked,
            "rows": self.num_rows,
            "kept": self.num_rows - len(self.removed),
            "removed": len(self.removed),
            "counts": self.counts,
            "statistics": self.statistics,
            "removed_rows": [asdict(r) for r in self.removed],
        }


# ---------------------------------------------------------------------------------------------- parsers


def spans_without_parser(text: str) -> list[int]:
    """Indices (within `text`) of the ``<latent>`` placeholders with no non-empty ``<parser>`` block after them."""
    segments = text.split(LATENT_PLACEHOLDER)[1:]
    return [i for i, segment in enumerate(segments) if not any(p.strip() for p in PARSER_BLOCK.findall(segment))]


def repeated_ngram_fraction(text: str, n: int) -> float | None:
    """``1 - distinct / total`` over the word n-grams of `text` (case folded); None below `MIN_NGRAMS` n-grams."""
    words = WORD.findall(text.casefold())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < MIN_NGRAMS:
        return None
    return 1.0 - len(set(grams)) / len(grams)


def alpha_fraction(text: str) -> float:
    """The share of letters (any script) among the non-space characters of `text` (0 for a blank text)."""
    chars = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in chars) / len(chars) if chars else 0.0


def parser_problems(
    assistant_texts: list[list[str]], tokenizer, thresholds: FilterThresholds, batch_size: int = 1024
) -> tuple[dict[int, tuple[str, str]], bool, dict[str, list[float]]]:
    """Per row index, the first parser reason it trips (``missing_parser``, ``parser_length``,
    ``parser_incoherent``) with its detail; whether the data uses parsers; the measured values.

    `assistant_texts` holds, per row, the text of each assistant message.
    """
    blocks: list[tuple[int, str]] = [
        (row, block) for row, texts in enumerate(assistant_texts) for text in texts
        for block in PARSER_BLOCK.findall(text)
    ]
    uses_parsers = thresholds.parser_required == "yes" or (thresholds.parser_required == "auto" and bool(blocks))
    lengths: list[int] = []
    for start in range(0, len(blocks), batch_size):
        chunk = [block.strip() for _, block in blocks[start : start + batch_size]]
        lengths += [len(ids) for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]]
    problems: dict[int, tuple[str, str]] = {}
    measured: dict[str, list[float]] = {"parser_tokens": [], "repeated_ngrams": [], "alpha": []}
    if uses_parsers:
        for row, texts in enumerate(assistant_texts):
            missing = [i for text in texts for i in spans_without_parser(text)]
            if missing:
                problems[row] = ("missing_parser", f"latent span(s) {missing} of an assistant message have no <parser> text")
    t = thresholds
    for (row, block), length in zip(blocks, lengths):
        repeated, alpha = repeated_ngram_fraction(block, t.ngram_size), alpha_fraction(block)
        measured["parser_tokens"].append(length)
        measured["alpha"].append(alpha)
        if repeated is not None:
            measured["repeated_ngrams"].append(repeated)
        if row in problems:
            continue
        if not t.parser_min_tokens <= length <= t.parser_max_tokens:
            problems[row] = ("parser_length", f"a <parser> text has {length} tokens, outside "
                             f"[{t.parser_min_tokens}, {t.parser_max_tokens}]")
        elif repeated is not None and repeated > t.max_repeated_ngrams:
            problems[row] = ("parser_incoherent", f"{repeated:.2f} of a <parser> text's word {t.ngram_size}-grams are "
                             f"repeats (> {t.max_repeated_ngrams})")
        elif alpha < t.min_alpha:
            problems[row] = ("parser_incoherent", f"{alpha:.2f} of a <parser> text's non-space characters are letters "
                             f"(< {t.min_alpha})")
    return problems, uses_parsers, measured


# ----------------------------------------------------------------------------------------- aux targets


def iter_target_spans(dataset, latent_tokens_per_span: int, rows_per_batch: int = 64) -> Iterator[tuple[int, np.ndarray]]:
    """``(row index, spans)`` per row of a ``gap targets`` dataset; spans is (n_spans, K, d) float32 (n may be 0)."""
    K = latent_tokens_per_span
    view = dataset.select_columns([TARGETS_COLUMN]).with_format("numpy")
    values = (value for batch in view.iter(batch_size=rows_per_batch) for value in batch[TARGETS_COLUMN])
    for row, value in enumerate(values):
        array = np.asarray(value, dtype=np.float32)
        if array.size == 0:
            yield row, np.zeros((0, K, 0), dtype=np.float32)
        elif array.ndim != 2 or array.shape[0] % K:
            raise FilterError(f"row {row} of '{TARGETS_COLUMN}' has shape {array.shape}, not (n_spans * K, d) with "
                              f"K={K}; recompute the targets with `gap targets`")
        else:
            yield row, array.reshape(-1, K, array.shape[-1])


def span_variances(spans: np.ndarray) -> np.ndarray:
    """Per span, the mean squared distance of its K vectors from their mean (NaN for a non-finite span)."""
    spans = spans.astype(np.float64)
    centred = spans - spans.mean(axis=1, keepdims=True)
    return (centred**2).sum(axis=-1).mean(axis=1)


class _VectorSpread:
    """Running mean squared distance of all finite target vectors from their mean: E||v||^2 - ||E v||^2."""

    def __init__(self):
        self.count, self.sum, self.sum_sq = 0, 0.0, 0.0

    def update(self, spans: np.ndarray) -> None:
        vectors = spans[np.isfinite(spans).all(axis=(1, 2))].reshape(-1, spans.shape[-1]).astype(np.float64)
        self.count += len(vectors)
        self.sum = self.sum + vectors.sum(axis=0)
        self.sum_sq += float((vectors**2).sum())

    def total_variance(self) -> float:
        if not self.count:
            return 0.0
        mean = self.sum / self.count
        return max(self.sum_sq / self.count - float(mean @ mean), 0.0)


def query_distances(spans: np.ndarray, queries: list[np.ndarray]) -> np.ndarray:
    """Per span, the smallest ``||span - Q|| / ||Q||`` over the query images' pooled (K, d) grids `queries`."""
    if not queries:
        return np.full(len(spans), np.inf)
    stacked = np.stack(queries).astype(np.float64)  # (q, K, d)
    difference = np.linalg.norm((spans[:, None].astype(np.float64) - stacked[None]).reshape(len(spans), len(queries), -1), axis=-1)
    scale = np.maximum(np.linalg.norm(stacked.reshape(len(queries), -1), axis=-1), 1e-12)
    return (difference / scale[None]).min(axis=1)


@dataclass
class QueryEncoder:
    """The vision tower and image processor that pool a row's query images like its latent targets."""

    tower: Any
    image_processor: Any

    def grids(self, images: list, latent_tokens_per_span: int, names: list[str]) -> list[np.ndarray]:
        pooled = targets_for_images(self.tower, self.image_processor, images, latent_tokens_per_span, names)
        return [p.float().cpu().numpy() for p in pooled]


def aux_problems(
    targets,
    rows,
    thresholds: FilterThresholds,
    query_encoder: QueryEncoder | None = None,
    base_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
) -> tuple[dict[int, tuple[str, str]], dict[str, list[float]]]:
    """Per row index, the ``degenerate_aux`` detail of the rows that trip it; and the measured values.

    `targets` is a ``gap targets`` dataset; `rows` the same rows with ``messages`` and ``images`` (the query
    images are read only when `query_encoder` is given and a row has spans).
    """
    K = int(targets_metadata(targets)["latent_tokens_per_span"])
    variances: dict[int, np.ndarray] = {}
    distances: dict[int, np.ndarray] = {}
    pending: list[tuple[int, np.ndarray]] = []
    scale = _VectorSpread()

    def flush():
        images, owners, names = [], [], []
        for row, _ in pending:
            _, opened = prompt_of_row(rows[row], row, base_dir=base_dir)
            images += opened
            owners += [row] * len(opened)
            names += [f"row {row}, query image {i}" for i in range(len(opened))]
        grids = query_encoder.grids(images, K, names) if images else []
        for row, spans in pending:
            distances[row] = query_distances(spans, [g for g, owner in zip(grids, owners) if owner == row])
        pending.clear()

    for row, spans in iter_target_spans(targets, K):
        if not len(spans):
            continue
        variances[row] = span_variances(spans)
        scale.update(spans)
        if query_encoder is not None and thresholds.min_query_distance > 0:
            pending.append((row, spans))
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()

    # The scale a span's spread is judged against: the variance of every target vector around the data set's mean
    # (the PCA's total variance). Unlike a typical span's spread it stays put however many spans are flat.
    total = scale.total_variance()
    ratios = {row: v / total if total > 0 else np.where(v > 0, np.inf, 0.0) for row, v in variances.items()}
    problems: dict[int, tuple[str, str]] = {}
    t = thresholds
    for row, ratio in ratios.items():
        distance = distances.get(row, np.full(len(ratio), np.inf))
        for span, (variance, r, q) in enumerate(zip(variances[row], ratio, distance)):
            if not np.isfinite(variance):
                detail = "its targets hold NaN or infinite values"
            elif r < t.min_span_variance_ratio:
                detail = (f"variance {r:.3g} x the data set's target variance (< {t.min_span_variance_ratio}): "
                          "nearly constant")
            elif q < t.min_query_distance:
                detail = f"relative distance {q:.3g} to a query image's embeddings (< {t.min_query_distance})"
            else:
                continue
            problems[row] = ("degenerate_aux", f"span {span}: {detail}")
            break
    measured = {
        "span_variance_ratio": [float(x) for r in ratios.values() for x in r if np.isfinite(x)],
        "query_distance": [float(x) for d in distances.values() for x in d if np.isfinite(x)],
    }
    return problems, measured


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    points = np.percentile(np.asarray(values, dtype=np.float64), PERCENTILES)
    return {"count": len(values), **{f"p{p}": round(float(v), 6) for p, v in zip(PERCENTILES, points)}}


def filter_rows(
    rows,
    tokenizer,
    thresholds: FilterThresholds = FilterThresholds(),
    *,
    targets=None,
    query_encoder: QueryEncoder | None = None,
    base_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
) -> FilterResult:
    """Apply the four filters to `rows` (a ``datasets.Dataset`` of the project schema); `targets` is its ``gap
    targets`` dataset (same rows, same order) or None, which skips ``degenerate_aux``."""
    if targets is not None and len(targets) != len(rows):
        raise FilterError(
            f"the targets hold {len(targets)} rows but the data {len(rows)}; pass the folder `gap targets` wrote for "
            "these rows"
        )
    columns = [c for c in ("id", "messages") if c in rows.column_names]
    light = rows.select_columns(columns)
    ids = light["id"] if "id" in columns else [None] * len(rows)
    if targets is not None and "id" in columns and "id" in targets.column_names and targets["id"] != ids:
        raise FilterError("the targets' ids differ from the data's; pass the folder `gap targets` wrote for these rows")
    assistant_texts = [turn_texts(messages, role="assistant") for messages in light["messages"]]
    problems, uses_parsers, measured = parser_problems(assistant_texts, tokenizer, thresholds)
    checked = {
        "degenerate_aux": targets is not None,
        "degenerate_aux_query_distance": targets is not None and query_encoder is not None
        and thresholds.min_query_distance > 0,
        "missing_parser": uses_parsers,
        "parser_length": True,
        "parser_incoherent": True,
    }
    if targets is not None:
        prompts = rows.select_columns([c for c in ("messages", "images") if c in rows.column_names])
        aux, aux_measured = aux_problems(targets, prompts, thresholds, query_encoder, base_dir, batch_size)
        measured.update(aux_measured)
        problems = {**problems, **aux}  # degenerate_aux comes first
    removed = [Removal(i, ids[i], *problems[i]) for i in sorted(problems)]
    statistics = {name: _percentiles(values) for name, values in measured.items()}
    return FilterResult(len(rows), removed, thresholds, checked, statistics)


# -------------------------------------------------------------------------------------------- outputs


def write_jsonl_rows(source: Path, destination: Path, kept: list[int]) -> None:
    """Copy the `kept` rows of a JSONL file (by their position among its non-blank lines) to `destination`, as they
    are: relative image paths stay relative to the input's image folder."""
    keep = set(kept)
    with open(destination, "w", encoding="utf-8") as out:
        position = 0
        for line in utf8_lines(source, FilterError):
            if not line.strip():
                continue
            if position in keep:
                out.write(line if line.endswith("\n") else line + "\n")
            position += 1


def format_summary(result: FilterResult, output_dir: str | Path) -> str:
    """The summary line: kept / removed per reason (as App. I reports them)."""
    counts = ", ".join(f"{reason} {n}" for reason, n in result.counts.items())
    skipped = [reason for reason in REASONS if not result.checked[reason]]
    note = f" (not checked: {', '.join(skipped)})" if skipped else ""
    return (
        f"gap filter: kept {result.num_rows - len(result.removed)} of {result.num_rows} rows; removed "
        f"{len(result.removed)}: {counts}{note} -> {output_dir}"
    )


# ---------------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gap filter``."""
    d = FilterThresholds()
    parser.add_argument("--data", required=True,
                        help="the rows: a JSONL file, or a dataset folder (save_to_disk; a `gap targets` folder too)")
    parser.add_argument("--image-dir", default=None,
                        help="folder the image paths are relative to and stay inside (default: the JSONL file's "
                        "folder, or the dataset folder)")
    add_max_image_pixels_argument(parser)
    add_allow_outside_image_dir_argument(parser)
    parser.add_argument("--targets", default=None,
                        help="the `gap targets` folder of the same rows (for degenerate_aux when --data is a JSONL)")
    parser.add_argument("--model", required=True,
                        help="Qwen2.5-VL or GAP folder: its tokenizer counts parser tokens, its vision tower pools "
                        "query images for the query-distance check")
    parser.add_argument("--output-dir", required=True, help="where the kept rows and filter_report.json are written")
    group = parser.add_argument_group("thresholds")
    group.add_argument("--min-span-variance-ratio", type=float, default=d.min_span_variance_ratio,
                       help="degenerate_aux: a span's variance below this times the data set's target variance "
                       f"(default {d.min_span_variance_ratio})")
    group.add_argument("--min-query-distance", type=float, default=d.min_query_distance,
                       help="degenerate_aux: ||T - Q|| / ||Q|| to a query image's pooled embeddings below this; 0 "
                       f"turns the check off (default {d.min_query_distance})")
    group.add_argument("--parser-min-tokens", type=int, default=d.parser_min_tokens,
                       help=f"parser_length: fewer tokens than this (default {d.parser_min_tokens})")
    group.add_argument("--parser-max-tokens", type=int, default=d.parser_max_tokens,
                       help=f"parser_length: more tokens than this (default {d.parser_max_tokens})")
    group.add_argument("--ngram-size", type=int, default=d.ngram_size,
                       help=f"parser_incoherent: word n-gram size (default {d.ngram_size})")
    group.add_argument("--max-repeated-ngrams", type=float, default=d.max_repeated_ngrams,
                       help=f"parser_incoherent: more repeated n-grams than this share (default {d.max_repeated_ngrams})")
    group.add_argument("--min-alpha", type=float, default=d.min_alpha,
                       help=f"parser_incoherent: fewer letters than this share of non-space characters (default {d.min_alpha})")
    group.add_argument("--parser-required", choices=PARSER_REQUIRED, default=d.parser_required,
                       help="missing_parser: auto (when some row has a <parser> block), yes, no (default auto)")
    parser.add_argument("--device", default="auto", help="device of the vision tower: auto, cpu, cuda, cuda:N")
    parser.add_argument("--model-dtype", choices=DTYPES, default="auto",
                        help="dtype of the vision tower (default auto: bfloat16 on CUDA, float32 on CPU, as gap targets)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows whose query images are encoded together")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that exist")


def _load_inputs(args) -> tuple[Any, Any, Path | None]:
    """(rows, targets or None, base folder of relative image paths)."""
    data = Path(args.data)
    with datasets_progress_bars(False):
        if data.is_file():
            base_dir = Path(args.image_dir) if args.image_dir else data.resolve().parent
            rows = load_jsonl(data, base_dir, check_images=False, allow_outside_image_dir=args.allow_outside_image_dir)
        elif data.is_dir():
            base_dir = Path(args.image_dir) if args.image_dir else dataset_base_dir(data)
            rows = load_dataset_folder(data, None, FilterError, "{path} is not a dataset folder written by "
                                       "save_to_disk ({exc}); pass a JSONL file or such a folder")
            check_rows(rows.select_columns([c for c in rows.column_names if c != TARGETS_COLUMN]),
                       source=str(data), image_dir=base_dir, check_images=False,
                       allow_outside_image_dir=args.allow_outside_image_dir)
        else:
            raise FilterError(f"--data {data}: no such file or folder")
        targets = None
        if args.targets:
            if data.is_dir() and TARGETS_COLUMN in rows.column_names:
                raise FilterError(f"--data {data} holds the latent targets already; drop --targets")
            targets = load_targets_dataset(args.targets)
        elif data.is_dir() and TARGETS_COLUMN in rows.column_names:
            targets = rows
    return rows, targets, base_dir


def _outputs(args) -> dict[str, Path]:
    output_dir = Path(args.output_dir)
    outputs = {"data": output_dir / Path(args.data).name}
    if args.targets:
        outputs["targets"] = output_dir / Path(args.targets).name
    if len(set(outputs.values())) != len(outputs):
        raise FilterError(f"--data and --targets have the same name {Path(args.data).name!r}; rename one of them")
    check_apart_from_inputs(output_dir, {"--data": args.data, "--targets": args.targets, "--image-dir": args.image_dir,
                                         "--model folder": args.model}, FilterError)
    existing = [str(p) for p in [*outputs.values(), output_dir / REPORT_NAME] if p.exists()]
    if existing and not args.overwrite:
        raise FilterError(f"{existing} exist; pass --overwrite to replace them")
    return outputs


def run(args: argparse.Namespace) -> int:
    """Run ``gap filter``: measure, decide, write the kept rows and filter_report.json, print the summary line."""
    thresholds = FilterThresholds(
        args.min_span_variance_ratio, args.min_query_distance, args.parser_min_tokens, args.parser_max_tokens,
        args.ngram_size, args.max_repeated_ngrams, args.min_alpha, args.parser_required,
    )
    if args.batch_size < 1:
        raise FilterError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_model_folder(args.model, "--model", FilterError)
    outputs = _outputs(args)
    with claimed_output(args.output_dir, FilterError, "gap filter", inside=outputs.values()):
        return _filter(args, thresholds, outputs)


def _filter(args: argparse.Namespace, thresholds: FilterThresholds, outputs: dict[str, Path]) -> int:
    """Measure, decide and write, once `run` holds the output folder."""
    rows, targets, base_dir = _load_inputs(args)
    processor = load_processor(args.model)  # a GAP folder's too (AutoTokenizer would ask to trust its code)
    query_encoder = None
    if targets is not None and thresholds.min_query_distance > 0:  # query images pooled like the targets' aux images
        check_targets_encoder(targets, args.model, where=args.targets or args.data,
                              fix=f"pass as --model the checkpoint whose tower made them, or rerun `gap targets "
                              f"--model {args.model}`")
        device = resolve_device(args.device)
        dtype = getattr(torch, tower_dtype(args.model_dtype, device))
        tower = load_vision_tower(args.model, dtype=dtype, device=device)
        query_encoder = QueryEncoder(tower, processor.image_processor)
    result = filter_rows(rows, processor.tokenizer, thresholds, targets=targets, query_encoder=query_encoder,
                         base_dir=base_dir, batch_size=args.batch_size)
    output_dir, kept, data = Path(args.output_dir), result.kept, Path(args.data)
    inputs = {"data": str(data), "image_dir": str(base_dir) if data.is_file() else args.image_dir,
              "targets": args.targets, "model": str(args.model)}
    with datasets_progress_bars(False):
        if not data.is_file():
            with atomic_output_dir(outputs["data"]) as staging:
                rows.select(kept).save_to_disk(str(staging))
        if "targets" in outputs:
            with atomic_output_dir(outputs["targets"]) as staging:
                targets.select(kept).save_to_disk(str(staging))
    with atomic_files_into(output_dir) as staging:  # the JSONL and the report appear together
        if data.is_file():
            write_jsonl_rows(data, staging / outputs["data"].name, kept)
        write_json_file(staging / REPORT_NAME, result.report(inputs, {k: str(v) for k, v in outputs.items()}), REPORT_NAME)
    print(format_summary(result, output_dir))
    return 0
