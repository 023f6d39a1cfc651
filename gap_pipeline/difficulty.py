"""``gap difficulty``: each row's base-model pass rate from N sampled answers (paper §4.3, Eq. 4; App. F).

``accuracy`` = num_correct / num_samples (the â of Eq. 4), ``num_correct`` and ``num_samples`` are written into the
dataset; at training time a row with ``accuracy > tau`` trains on text only. The question, the gold answer, the
pluggable sampler and checker, and the output folder (``run.json``, ``results/shard-*.jsonl``, ``summary.json``, the
dataset) are described in the README's "Difficulty labels" section. A results line is flushed and fsync'ed per
batch, so a restart samples only rows that no results file holds; a batch's sampling is seeded from ``--seed`` and
its first row, so results depend only on the seed, batch size and shard layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from collections.abc import Callable, Iterator, Mapping, Sequence

from . import GapError
from .cli import finite_float, nonnegative_int, positive_int
from .answers import gold_answer
from .data import add_allow_outside_image_dir_argument, add_max_image_pixels_argument, undecoded_images
from .datasets_io import (append_json_lines, atomic_files_into, atomic_output_dir, check_apart_from_inputs,
                          check_writable, read_json_file, read_json_lines, write_json_file)
from .inference import (DTYPES, check_model_folder, dataset_base_dir, encode_prompts, generate_texts,
                        load_model_and_processor, load_rows, prompt_of_row, question_of_row)
from .plugins import import_object
from .provenance import RUN_RECORD, check_or_record, record_differences
from .targets import TARGETS_COLUMN

__all__ = [
    "DifficultyError",
    "HFSampler",
    "Question",
    "Sampler",
    "SamplerSettings",
    "estimate_difficulty",
    "is_default_sampler",
    "load_sampler",
    "merge_results",
    "read_results",
    "shard_rows",
]

RESULTS_DIRNAME = "results"
SUMMARY_FILENAME = "summary.json"
DATASET_DIRNAME = "dataset"
MERGE_LOCK = "merge.lock"
NEW_COLUMNS = ("accuracy", "num_correct", "num_samples")
# Columns that a question never needs and that are expensive to read row by row.
HEAVY_COLUMNS = ("aux_images", TARGETS_COLUMN, "pixel_values", "image_grid_thw")
# Settings recorded in run.json that a restart or another shard must share.
RUN_KEYS = ("dataset", "num_rows", "dataset_fingerprint", "model", "num_samples", "temperature", "top_p", "top_k",
            "max_new_tokens", "seed", "sampler", "checker", "answer_column")


class DifficultyError(GapError):
    """Bad input or state of a difficulty run; the message says what to change."""


@dataclass
class Question:
    """One row to sample: what a sampler receives. `row` is the row without ``HEAVY_COLUMNS`` (for samplers and
    checkers that read fields such as ``options``); `messages` / `images` are its question (`prompt_of_row`)."""

    index: int
    row: dict[str, Any]
    messages: list[dict[str, Any]]
    images: list
    answer: str


@runtime_checkable
class Sampler(Protocol):
    """Anything with ``sample(questions, n) -> list[list[str]]``: n responses per question, in order."""

    def sample(self, questions: Sequence[Question], n: int) -> list[list[str]]: ...


@dataclass
class SamplerSettings:
    """What a sampler factory is given (``--sampler module:factory`` is called as ``factory(settings)``)."""

    model: str | None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)


def batch_seed(seed: int, first_index: int) -> int:
    """The RNG seed of a batch: a hash of the run seed and the batch's first row (independent of run order)."""
    digest = hashlib.sha256(f"{seed}:{first_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


class HFSampler:
    """The default sampler: ``generate`` of a Qwen2.5-VL (or GAP) folder, all questions of a call in one batch of
    ``num_return_sequences=n`` sampled sequences (other generation settings from the folder's
    ``generation_config.json``); each call seeds torch from the settings' seed and the first question's row."""

    def __init__(self, settings: SamplerSettings):
        if not settings.model:
            raise DifficultyError("the default sampler needs --model (a Qwen2.5-VL checkpoint folder)")
        if settings.temperature <= 0:
            raise DifficultyError(f"--temperature must be > 0 for sampling, got {settings.temperature}")
        if not 0 < settings.top_p <= 1:
            raise DifficultyError(f"--top-p must be in (0, 1], got {settings.top_p}")
        if settings.top_k < 0:
            raise DifficultyError(f"--top-k must be >= 0 (0 = off), got {settings.top_k}")
        if settings.max_new_tokens < 1:
            raise DifficultyError(f"--max-new-tokens must be >= 1, got {settings.max_new_tokens}")
        self.settings = settings
        self.model, self.processor, _ = load_model_and_processor(settings.model, dtype=settings.dtype, device=settings.device)

    def __repr__(self) -> str:
        s = self.settings
        return f"HFSampler(model={s.model!r}, temperature={s.temperature}, top_p={s.top_p}, top_k={s.top_k})"

    def sample(self, questions: Sequence[Question], n: int) -> list[list[str]]:
        import torch

        if not questions:
            return []
        inputs = encode_prompts(self.processor, [(q.messages, q.images) for q in questions], self.model.device)
        torch.manual_seed(batch_seed(self.settings.seed, questions[0].index))
        _, texts = generate_texts(
            self.model,
            self.processor,
            inputs,
            do_sample=True,
            temperature=self.settings.temperature,
            top_p=self.settings.top_p,
            top_k=self.settings.top_k,
            max_new_tokens=self.settings.max_new_tokens,
            num_return_sequences=n,
            pad_token_id=self.processor.tokenizer.pad_token_id,
        )
        return [texts[i * n : (i + 1) * n] for i in range(len(questions))]


_SPEC_HELP = (
    "use 'package.module:callable' or 'path/to/file.py:callable'; the callable is an object with "
    "sample(questions, n) -> list[list[str]], or a factory called as factory(settings) that returns one"
)


def is_default_sampler(spec: str | None) -> bool:
    """Whether `spec` (``--sampler``) names the default :class:`HFSampler`."""
    return spec is None or not spec.strip() or spec.strip() == "hf"


def load_sampler(spec: str | None, settings: SamplerSettings) -> Sampler:
    """The sampler named by `spec` (None / "" / "hf" = :class:`HFSampler`), built with `settings` if a factory."""
    if is_default_sampler(spec):
        return HFSampler(settings)
    obj, _ = import_object(spec.strip(), "sampler", DifficultyError, _SPEC_HELP, "_gap_user_sampler_")
    if not isinstance(obj, type) and callable(getattr(obj, "sample", None)):
        return obj
    if not callable(obj):
        raise DifficultyError(f"sampler {spec!r} is a {type(obj).__name__}; {_SPEC_HELP}")
    sampler = obj(settings)
    if not callable(getattr(sampler, "sample", None)):
        raise DifficultyError(
            f"sampler factory {spec!r} returned a {type(sampler).__name__} without a sample(questions, n) method"
        )
    return sampler


def _describe(obj: Any, spec: str | None) -> str:
    return spec if spec else (repr(obj) if not isinstance(obj, type) else obj.__name__)


def shard_rows(num_rows: int, num_shards: int = 1, shard_index: int = 0) -> list[int]:
    """The rows a shard takes: ``row % num_shards == shard_index`` (strided, so shards get similar mixes)."""
    if num_shards < 1:
        raise DifficultyError(f"--num-shards must be >= 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise DifficultyError(f"--shard-index must be in [0, {num_shards - 1}] for --num-shards {num_shards}, got {shard_index}")
    return list(range(shard_index, num_rows, num_shards))


def results_path(output_dir: str | os.PathLike, num_shards: int, shard_index: int) -> Path:
    return Path(output_dir) / RESULTS_DIRNAME / f"shard-{shard_index:05d}-of-{num_shards:05d}.jsonl"


def _read_results_file(path: Path, repair: bool) -> dict[int, dict[str, Any]]:
    """Rows of one results file; a torn last line (a crash mid-write) is dropped (and cut off if `repair`)."""
    records, _ = read_json_lines(path, DifficultyError, repair=repair, redo="its row will be sampled again")
    return {int(record["row"]): record for record in records}


def read_results(output_dir: str | os.PathLike, repair_path: Path | None = None) -> dict[int, dict[str, Any]]:
    """Every finished row in ``OUT/results/*.jsonl`` (all shards), keyed by row index."""
    merged: dict[int, dict[str, Any]] = {}
    for path in sorted(Path(output_dir).glob(f"{RESULTS_DIRNAME}/*.jsonl")):
        for row, record in _read_results_file(path, repair=repair_path is not None and path == repair_path).items():
            merged.setdefault(row, record)
    return merged


def check_run_config(output_dir: str | os.PathLike, config: Mapping[str, Any]) -> None:
    """Record the run settings in ``OUT/run.json``, or check them against an earlier start. Settings recorded by a
    start that finished no row are replaced, with a notice: there is nothing to keep."""
    record = {key: config.get(key) for key in RUN_KEYS}
    stored, done = Path(output_dir) / RUN_RECORD, bool(read_results(output_dir))
    if stored.is_file() and not done:
        differences = record_differences(json.loads(stored.read_text(encoding="utf-8")), record)
        if differences:
            print(f"gap difficulty: {stored} recorded other settings ({'; '.join(differences)}) but no row was "
                  "done: recording this run's", file=sys.stderr)
            stored.unlink()
    check_or_record(output_dir, RUN_RECORD, record, what="sampled answers", has_results=done,
                    fresh="resume with the same settings, pass --overwrite to discard them and start afresh, or use "
                    "a new --output-dir")


def discard_run(output_dir: str | os.PathLike) -> None:
    """Remove what a difficulty run wrote into `output_dir` (``--overwrite``): its record, results, summary and
    default output dataset; other files stay."""
    import shutil

    output_dir = Path(output_dir)
    for name in (RUN_RECORD, SUMMARY_FILENAME):
        (output_dir / name).unlink(missing_ok=True)
    for name in (RESULTS_DIRNAME, DATASET_DIRNAME):
        shutil.rmtree(output_dir / name, ignore_errors=True)


@dataclass
class ShardReport:
    """What one call of :func:`estimate_difficulty` did."""

    shard_rows: int
    already_done: int
    sampled_rows: int
    seconds: float
    complete: bool  # every row of the dataset (all shards) has a result


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def _result_records(questions, responses, checker, num_samples: int, id_column: str | None,
                    save_responses: bool) -> list[dict[str, Any]]:
    """One results-file record per question: its n responses checked against its gold answer."""
    if not isinstance(responses, (list, tuple)) or len(responses) != len(questions):
        raise DifficultyError(
            f"the sampler returned {len(responses) if isinstance(responses, (list, tuple)) else type(responses).__name__} "
            f"response lists for {len(questions)} questions (rows {[q.index for q in questions]}); it must "
            "return one list of n strings per question, in order"
        )
    records = []
    for question, answers in zip(questions, responses):
        if not isinstance(answers, (list, tuple)) or len(answers) != num_samples:
            raise DifficultyError(
                f"the sampler returned {len(answers) if isinstance(answers, (list, tuple)) else answers!r} "
                f"responses for row {question.index}; expected {num_samples}"
            )
        try:
            correct = [bool(checker(str(answer), question.answer, question.row)) for answer in answers]
        except Exception as exc:
            raise DifficultyError(
                f"the answer checker failed on row {question.index} (gold {question.answer!r}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        record = {
            "row": question.index,
            "num_correct": sum(correct),
            "num_samples": num_samples,
            "accuracy": sum(correct) / num_samples,
            "answer": question.answer,
        }
        if id_column is not None:
            record["id"] = _json_safe(question.row.get(id_column))
        if save_responses:
            record["responses"] = [str(answer) for answer in answers]
            record["correct"] = correct
        records.append(record)
    return records


def estimate_difficulty(
    dataset,
    sampler: Sampler,
    checker: Callable[[str, str, Mapping[str, Any] | None], bool],
    output_dir: str | os.PathLike,
    *,
    num_samples: int = 8,
    rows_per_batch: int = 4,
    num_shards: int = 1,
    shard_index: int = 0,
    answer_column: str = "answer",
    messages_column: str = "messages",
    images_column: str = "images",
    id_column: str | None = None,
    base_dir: str | os.PathLike | None = None,
    save_responses: bool = False,
    run_config: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> ShardReport:
    """Sample and check this shard's rows that no results file of `output_dir` holds, appending one JSON line per row
    to its results file. Every gold answer is read before sampling starts (a row without one fails fast); prompts and
    images are read per batch. `run_config` (see ``RUN_KEYS``) is recorded in / checked against ``OUT/run.json``."""
    from tqdm.auto import tqdm

    if num_samples < 1:
        raise DifficultyError(f"--num-samples must be >= 1, got {num_samples}")
    if rows_per_batch < 1:
        raise DifficultyError(f"--rows-per-batch must be >= 1, got {rows_per_batch}")
    started = time.time()
    output_dir = Path(output_dir)
    rows = shard_rows(len(dataset), num_shards, shard_index)
    if run_config is not None:
        check_run_config(output_dir, run_config)
    own_path = results_path(output_dir, num_shards, shard_index)
    own_path.parent.mkdir(parents=True, exist_ok=True)
    done = read_results(output_dir, repair_path=own_path)
    todo = [row for row in rows if row not in done]
    heavy = [name for name in HEAVY_COLUMNS if name in dataset.column_names]
    view = dataset.remove_columns(heavy) if heavy else dataset
    view = undecoded_images(view, [images_column])  # opened by prompt_of_row, so a bad image names its row
    text_view = view.select_columns([name for name in (messages_column, answer_column) if name in view.column_names])
    golds = {index: gold_answer(text_view[index], index, answer_column, messages_column) for index in todo}
    with open(own_path, "a", encoding="utf-8") as out, tqdm(
        total=len(rows), initial=len(rows) - len(todo), unit="row", desc=f"difficulty {shard_index}/{num_shards}",
        disable=not progress, dynamic_ncols=True,
    ) as bar:
        for start in range(0, len(todo), rows_per_batch):
            questions = []
            for index in todo[start : start + rows_per_batch]:
                row = dict(view[index])
                messages, images = prompt_of_row(
                    row, index, messages_column=messages_column, images_column=images_column, base_dir=base_dir
                )
                questions.append(Question(index=index, row=row, messages=messages, images=images, answer=golds[index]))
            responses = sampler.sample(questions, num_samples)
            append_json_lines(out, _result_records(questions, responses, checker, num_samples, id_column,
                                                   save_responses))
            bar.update(len(questions))
    finished = read_results(output_dir)
    return ShardReport(shard_rows=len(rows), already_done=len(rows) - len(todo), sampled_rows=len(todo),
                       seconds=time.time() - started, complete=all(row in finished for row in range(len(dataset))))


@dataclass
class MergeReport:
    """The merged dataset's location and its accuracy statistics."""

    path: Path
    rows: int
    mean_accuracy: float
    latent_rows: int  # accuracy <= tau: kept as latent by difficulty-aware assignment
    text_rows: int  # accuracy > tau: spans stripped
    all_correct_rows: int
    num_samples: int
    tau: float
    replaced_columns: list[str]  # columns of those names that held values

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["path"] = str(self.path)
        return data


def _save_dataset(dataset, path: Path) -> None:
    """Write `dataset` to `path` by its suffix, atomically: a kill or a full disk leaves the earlier output (or none),
    never a half-written one."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".parquet"):
        with atomic_files_into(path.parent) as staging:
            if suffix == ".parquet":
                dataset.to_parquet(str(staging / path.name))
            else:
                dataset.to_json(str(staging / path.name), lines=suffix == ".jsonl", force_ascii=False)
    else:
        with atomic_output_dir(path) as staging:
            dataset.save_to_disk(str(staging))


def merge_results(
    dataset,
    output_dir: str | os.PathLike,
    *,
    output_dataset: str | os.PathLike | None = None,
    tau: float = 0.0,
    id_column: str | None = None,
) -> MergeReport:
    """Write `dataset` with ``accuracy``, ``num_correct`` and ``num_samples`` (replacing columns of those names) from
    every results file of `output_dir`, to `output_dataset` (a ``.jsonl`` / ``.json`` / ``.parquet`` file or a
    ``save_to_disk`` folder; default ``OUT/dataset``), and the statistics to ``OUT/summary.json``."""
    output_dir = Path(output_dir)
    results = read_results(output_dir)
    _check_results(dataset, output_dir, results, id_column)
    rows = [results[row] for row in range(len(dataset))]
    accuracy = [float(r["accuracy"]) for r in rows]
    num_correct = [int(r["num_correct"]) for r in rows]
    num_samples = [int(r["num_samples"]) for r in rows]
    present = [name for name in NEW_COLUMNS if name in dataset.column_names]
    merged = dataset.remove_columns(present) if present else dataset
    # reported only when they held values: a JSONL's rows without `accuracy` load with an empty one
    replaced = [name for name in present if any(value is not None for value in dataset[name])]
    for name, values in zip(NEW_COLUMNS, (accuracy, num_correct, num_samples)):
        merged = merged.add_column(name, values)
    path = Path(output_dataset) if output_dataset is not None else output_dir / DATASET_DIRNAME
    _save_dataset(merged, path)
    n = len(dataset)
    report = MergeReport(
        path=path,
        rows=n,
        mean_accuracy=sum(accuracy) / n if n else float("nan"),
        latent_rows=sum(1 for a in accuracy if a <= tau),
        text_rows=sum(1 for a in accuracy if a > tau),
        all_correct_rows=sum(1 for c, s in zip(num_correct, num_samples) if c == s),
        num_samples=max(num_samples) if num_samples else 0,
        tau=tau,
        replaced_columns=replaced,
    )
    write_json_file(output_dir / SUMMARY_FILENAME, report.to_dict())
    return report


def _check_results(dataset, output_dir: Path, results: dict[int, dict[str, Any]], id_column: str | None) -> None:
    """Every row of `dataset` has a result, no result is past its end, and recorded ids match `id_column`."""
    missing = [row for row in range(len(dataset)) if row not in results]
    if missing:
        run_file = output_dir / RUN_RECORD
        run = read_json_file(run_file, DifficultyError, "use a new --output-dir") if run_file.is_file() else {}
        shards = sorted(path.name for path in output_dir.glob(f"{RESULTS_DIRNAME}/*.jsonl"))
        raise DifficultyError(
            f"{len(missing)} of {len(dataset)} rows have no result yet (first: {missing[:10]}); results files: "
            f"{shards or 'none'}. Run the missing shards (or rerun without --merge) for dataset "
            f"{run.get('dataset', '?')}, then merge"
        )
    extra = sorted(row for row in results if row >= len(dataset))
    if extra:
        raise DifficultyError(
            f"{output_dir} has results for rows {extra[:10]} beyond the dataset's {len(dataset)} rows: it belongs to "
            "another dataset; use a new --output-dir"
        )
    if id_column is not None:
        ids = dataset[id_column]
        for row in range(len(dataset)):
            recorded = results[row].get("id")
            if "id" in results[row] and recorded != _json_safe(ids[row]):
                raise DifficultyError(
                    f"row {row}: the results were computed for {id_column}={recorded!r} but the dataset now holds "
                    f"{ids[row]!r}; the dataset changed since sampling: use a new --output-dir"
                )


@contextmanager
def merge_lock(output_dir: Path) -> Iterator[bool]:
    """Hold ``OUT/merge.lock`` inside the block; yields False when another live process holds it. The operating
    system releases the lock of a process that dies, so a merge killed half way never blocks the next one."""
    from filelock import FileLock, Timeout

    output_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(output_dir / MERGE_LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def format_summary(report: MergeReport, seconds: float | None = None) -> str:
    n = report.rows
    pct = lambda k: f"{100.0 * k / n:.1f}%" if n else "-"  # noqa: E731
    lines = [
        f"difficulty: {n} rows, {report.num_samples} samples each; mean accuracy {report.mean_accuracy:.4f}",
        f"  accuracy <= tau={report.tau:g} (latent supervision kept): {report.latent_rows} ({pct(report.latent_rows)})",
        f"  accuracy >  tau (text only, spans stripped):     {report.text_rows} ({pct(report.text_rows)})",
        f"  all {report.num_samples} samples correct: {report.all_correct_rows} ({pct(report.all_correct_rows)})",
    ]
    if report.replaced_columns:
        lines.append(f"  replaced existing columns {report.replaced_columns}")
    lines.append(f"  wrote {report.path}" + (f" ({seconds:.1f}s)" if seconds is not None else ""))
    return "\n".join(lines)


HELP = "Estimate each row's base-model pass rate from N sampled answers (Eq. 4) and write an `accuracy` column."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gap difficulty``."""
    parser.add_argument("--dataset", required=True, help="the training set (save_to_disk folder, .jsonl, .json or .parquet)")
    parser.add_argument("--split", default=None, help="split to use when --dataset is a DatasetDict")
    parser.add_argument("--output-dir", required=True, help="run folder: run.json, results/*.jsonl, summary.json, dataset/")
    parser.add_argument("--output-dataset", default=None,
                        help="where the dataset with the new columns goes: a folder (save_to_disk) or a .jsonl/.json/"
                        ".parquet file (default: OUTPUT_DIR/dataset)")
    parser.add_argument("--model", default=None, help="the base Qwen2.5-VL checkpoint folder (the default sampler needs it)")
    parser.add_argument("--num-samples", type=positive_int, default=8, help="N sampled answers per row (default: 8)")
    parser.add_argument("--rows-per-batch", type=positive_int, default=4,
                        help="rows per sampler call; the default sampler generates rows x N sequences at once (default: 4)")
    parser.add_argument("--temperature", type=finite_float, default=1.0, help="sampling temperature (default: 1.0)")
    parser.add_argument("--top-p", type=finite_float, default=1.0, help="nucleus sampling threshold (default: 1.0 = off)")
    parser.add_argument("--top-k", type=nonnegative_int, default=0, help="top-k sampling (default: 0 = off)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=1024, help="longest response (default: 1024)")
    parser.add_argument("--seed", type=int, default=0, help="run seed; each batch is seeded from it and its first row")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights dtype for the default sampler (default: auto = the checkpoint's)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--sampler", default=None,
                        help="'module:callable' or 'file.py:callable': an object with sample(questions, n), or a "
                        "factory called with a SamplerSettings (default: HF generate)")
    parser.add_argument("--checker", default=None,
                        help="'module:callable' or 'file.py:callable' called as checker(response, gold, row) -> bool "
                        "(default: gap_pipeline.answers.DefaultAnswerChecker)")
    parser.add_argument("--answer-column", default="answer",
                        help="column of the gold answer; rows without it use the <answer>...</answer> block of their "
                        "last assistant turn (default: answer)")
    parser.add_argument("--messages-column", default="messages", help="column of the conversation (default: messages)")
    parser.add_argument("--images-column", default="images", help="column of the images (default: images)")
    add_max_image_pixels_argument(parser)
    add_allow_outside_image_dir_argument(parser)
    parser.add_argument("--id-column", default=None,
                        help="a column identifying rows; recorded with each result and checked at merge time")
    parser.add_argument("--tau", type=finite_float, default=0.0,
                        help="difficulty threshold of Eq. 4 for the summary: accuracy <= tau keeps latents (default: 0)")
    parser.add_argument("--num-shards", type=positive_int, default=1, help="processes sharing the rows (default: 1)")
    parser.add_argument("--shard-index", type=nonnegative_int, default=0, help="this process's shard, 0 .. num_shards-1 (default: 0)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--merge", action="store_true", help="only merge finished results into the dataset (no sampling)")
    mode.add_argument("--no-merge", action="store_true", help="do not merge even when every row is done")
    parser.add_argument("--save-responses", action="store_true", help="also keep the sampled responses in the results files")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard what an earlier run wrote into --output-dir (run.json, results, summary, dataset) "
                        "and start afresh")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_config(args: argparse.Namespace, dataset) -> dict[str, Any]:
    """The ``RUN_KEYS`` settings of this run: the arguments of those names, and what identifies the data and plug-ins."""
    derived = {
        "dataset": str(Path(args.dataset).resolve()),
        "num_rows": len(dataset),
        "dataset_fingerprint": getattr(dataset, "_fingerprint", None),
        "model": str(Path(args.model).resolve()) if args.model else None,
        "sampler": args.sampler or "hf",
        "checker": args.checker or "default",
    }
    return {key: derived[key] if key in derived else getattr(args, key) for key in RUN_KEYS}


def run(args: argparse.Namespace) -> int:
    """Run ``gap difficulty``."""
    from .answers import load_checker

    started = time.time()
    output_dir = Path(args.output_dir)
    if args.no_progress:
        import datasets

        datasets.disable_progress_bars()
    shard_rows(0, args.num_shards, args.shard_index)  # validates the shard arguments
    inputs = {"--dataset": args.dataset, "--model folder": args.model}
    check_apart_from_inputs(output_dir, inputs, DifficultyError)
    check_writable(output_dir, DifficultyError)
    if args.output_dataset is not None:
        check_apart_from_inputs(args.output_dataset, inputs, DifficultyError, option="--output-dataset")
        check_writable(args.output_dataset, DifficultyError, option="--output-dataset")
    if args.model is not None and is_default_sampler(args.sampler) and not args.merge:
        check_model_folder(args.model, "--model", DifficultyError)  # before run.json records a mistyped folder
    dataset = load_rows(args.dataset, split=args.split, image_columns=(args.images_column,),
                        allow_outside_image_dir=args.allow_outside_image_dir)
    merge_kwargs = dict(output_dataset=args.output_dataset, tau=args.tau, id_column=args.id_column)
    if args.merge:
        with merge_lock(output_dir) as locked:
            if not locked:
                raise DifficultyError(f"another process is merging into {output_dir} now (it holds "
                                      f"{output_dir / MERGE_LOCK}); wait for it to finish")
            report = merge_results(dataset, output_dir, **merge_kwargs)
        print(format_summary(report, time.time() - started))
        return 0
    checker = load_checker(args.checker)
    columns = [name for name in (args.messages_column,) if name in dataset.column_names]
    for index, row in enumerate(dataset.select_columns(columns)):  # every question, before anything is recorded
        question_of_row(row, index, args.messages_column)
    config = _run_config(args, dataset)
    if args.overwrite:
        with merge_lock(output_dir) as locked:  # not while another process merges these results
            if not locked:
                raise DifficultyError(f"another process is merging in {output_dir} now; wait for it, then rerun")
            discard_run(output_dir)
    check_run_config(output_dir, config)  # before the model loads
    settings = SamplerSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SamplerSettings)
                                  if f.name != "extra"})
    sampler = load_sampler(args.sampler, settings)
    shard = estimate_difficulty(
        dataset, sampler, checker, output_dir, num_samples=args.num_samples, rows_per_batch=args.rows_per_batch,
        num_shards=args.num_shards, shard_index=args.shard_index, answer_column=args.answer_column,
        messages_column=args.messages_column, images_column=args.images_column, id_column=args.id_column,
        base_dir=dataset_base_dir(args.dataset), save_responses=args.save_responses, run_config=config,
        progress=not args.no_progress,
    )
    print(
        f"difficulty shard {args.shard_index}/{args.num_shards}: {shard.shard_rows} rows, {shard.already_done} "
        f"already done, {shard.sampled_rows} sampled in {shard.seconds:.1f}s "
        f"({_describe(sampler, args.sampler)}, checker {_describe(checker, args.checker)})"
    )
    if not shard.complete:
        finished = len(read_results(output_dir))
        print(f"  {finished}/{len(dataset)} rows done over all shards; the last shard to finish merges "
              f"(or run with --merge once all are done)")
        return 0
    if args.no_merge:
        print("  every row is done; merge with --merge")
        return 0
    with merge_lock(output_dir) as locked:
        if not locked:
            print(f"  another process is merging (it holds {output_dir / MERGE_LOCK}); it writes the dataset")
            return 0
        report = merge_results(dataset, output_dir, **merge_kwargs)
    print(format_summary(report, time.time() - started))
    return 0
