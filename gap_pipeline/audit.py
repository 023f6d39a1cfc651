"""``gap audit``: the leakage audit of training data against evaluation benchmarks (paper App. I, App. B item 6).

Every training row is compared with every evaluation row through indexes, not pairwise loops, for four kinds of
duplicate (the README's "Leakage audit" has the table and the outputs): ``exact_image`` (identical decoded RGB
pixels: a hash table of `pixel_digest`), ``exact_question`` (equal after `normalize_question`: a hash table),
``near_image`` (`perceptual_hash` at most ``64 * (1 - threshold)`` bits apart: a faiss binary range search) and
``near_question`` (word-set Jaccard at least the threshold: MinHash LSH candidates, then the exact Jaccard). An exact
pair is not repeated as a near pair of its modality. Only the question is compared: the turns before the first
assistant turn and their (query) images; a TSV's ``question`` and ``image``. Rows are read one at a time, so memory
holds fingerprints, not images; a row that cannot be read is listed under ``unreadable`` and left out.

    gap audit --train data/train.jsonl --eval bench/MathVista_MINI.tsv bench/MMStar.tsv --output-dir runs/audit
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import hashlib
import html
import io
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import GapError
from .data import add_allow_outside_image_dir_argument, add_max_image_pixels_argument, turn_texts, undecoded_images
from .datasets_io import (atomic_files_into, check_apart_from_inputs, claimed_output, datasets_progress_bars,
                          write_json_file)
from .evaluate import decode_base64_image, iter_tsv_records
from .inference import RowError, dataset_base_dir, load_rows, prompt_of_row

HELP = "Audit training data against evaluation benchmarks: exact and near duplicate images and questions."

KINDS = ("exact_image", "exact_question", "near_image", "near_question")
HASH_BITS = 64  # imagehash.phash with hash_size 8
# pHash similarity: at most 6 of 64 bits differ. A copy resized by 10 % and re-compressed lands within 0-4 bits (6 at
# most in our tests), unrelated images ~32 bits apart; 1 pair in 10^7 of random smooth colour fields comes within 6.
DEFAULT_IMAGE_THRESHOLD = 0.9
DEFAULT_QUESTION_THRESHOLD = 0.7  # Jaccard similarity of the normalised questions' word sets
MINHASH_PERMUTATIONS = 256
LSH_MAX_MISS = 1e-3  # the most often a pair exactly at the question threshold may miss the LSH bands (`lsh_bands`)
TSV_AUDIT_COLUMNS = ("index", "image", "question")
THUMBNAIL_SIDE = 160
EXTRA_HINT = "gap audit needs the 'audit' extra: pip install -e \".[audit]\" (imagehash, datasketch, faiss-cpu)"


class AuditError(GapError):
    """Bad input to ``gap audit``; the message names the file or argument and the fix."""


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise AuditError(f"{EXTRA_HINT}; importing {module} failed ({error})") from None


# ---------------------------------------------------------------------------------------- fingerprints


@functools.cache
def _punctuation_to_space() -> dict[int, str]:
    return {cp: " " for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp)).startswith("P")}


def normalize_question(text: str) -> str:
    """NFKC, case folding, and every run of whitespace and Unicode punctuation collapsed to one space.

    ``"  What's the AREA of ΔABC？"`` and ``"what s the area of δabc"`` normalise alike; symbols such as ``+`` and
    ``=`` are kept, so ``x+2=5`` and ``x 2 5`` stay different.
    """
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return " ".join(text.translate(_punctuation_to_space()).split())


def pixel_digest(image) -> str:
    """A digest of the decoded RGB pixels and the size of a PIL image (not of its file)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    digest = hashlib.blake2b(f"{rgb.width}x{rgb.height}:".encode(), digest_size=16)
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def perceptual_hash(image) -> bytes:
    """The 64-bit DCT perceptual hash of a PIL image as 8 bytes (faiss' binary vector layout)."""
    imagehash = _require("imagehash")
    bits = imagehash.phash(image).hash.reshape(-1)
    return np.packbits(bits).tobytes()


@dataclass(frozen=True)
class Source:
    """One input: a TSV file or a dataset (JSONL, folder, .json, .parquet); `label` prefixes its row ids."""

    path: Path
    label: str = ""
    allow_outside_image_dir: bool = False  # image paths may leave the data's folder (`load_rows`' path rule)

    @property
    def is_tsv(self) -> bool:
        return self.path.suffix.lower() == ".tsv"

    def row_id(self, row_id: Any) -> str:
        return f"{self.label}:{row_id}" if self.label else str(row_id)


def sources_of(paths: Iterable[str | Path], option: str, allow_outside_image_dir: bool = False) -> list[Source]:
    """The inputs of one side; several files prefix their ids with the file name (the path if names repeat)."""
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.exists():
            raise AuditError(f"{option} {path}: no such file or folder")
    if len(paths) == 1:
        return [Source(paths[0], allow_outside_image_dir=allow_outside_image_dir)]
    names = [p.name for p in paths]
    if len(set(map(str, paths))) != len(paths):
        raise AuditError(f"{option} names {sorted({str(p) for p in paths if paths.count(p) > 1})} more than once")
    return [Source(p, p.name if names.count(p.name) == 1 else str(p), allow_outside_image_dir) for p in paths]


def iter_rows(source: Source, positions: Iterable[int] | None = None) -> Iterator[tuple[int, str, tuple]]:
    """``(position, row id, job)`` for every row of `source` (or the given positions); `job` goes to `read_row`."""
    wanted = None if positions is None else set(positions)
    if source.is_tsv:
        for position, (index, where, record, problem) in enumerate(iter_tsv_records(source.path, TSV_AUDIT_COLUMNS)):
            if wanted is None or position in wanted:
                yield position, index, ("tsv", where, problem, (record.get("image") or "").strip(), record.get("question") or "")
        return
    with datasets_progress_bars(False):  # the audit's own bar counts rows
        dataset = load_rows(source.path, allow_outside_image_dir=source.allow_outside_image_dir)
        columns = [c for c in ("id", "messages", "images") if c in dataset.column_names]
        if "messages" not in columns:
            raise AuditError(f"{source.path} has no 'messages' column (columns: {dataset.column_names}); audit data "
                             "in the project schema or a VLMEvalKit TSV")
        dataset = undecoded_images(dataset.select_columns(columns))
    base_dir = str(dataset_base_dir(source.path))
    order = range(len(dataset)) if wanted is None else sorted(wanted)
    rows = dataset if wanted is None else dataset.select(order)
    for position, row in zip(order, rows):
        row_id = row.get("id")
        yield position, str(position if row_id is None else row_id), ("row", position, row, base_dir)


def read_row(job: tuple) -> tuple[str, list]:
    """The question text and the RGB query images of one job from `iter_rows`."""
    if job[0] == "tsv":
        _, where, problem, image, question = job
        if problem:
            raise RowError(f"{where}: {problem}")
        if not image:
            raise RowError(f"{where}: no image")
        return question.strip(), [decode_base64_image(image, where)]
    _, position, row, base_dir = job
    messages, images = prompt_of_row(row, position, base_dir=base_dir)
    return "\n".join(turn_texts(messages, role="user")).strip(), images


def fingerprint_row(item: tuple[int, str, tuple]) -> tuple[int, str, tuple[str, list[str], list[bytes]] | str]:
    """``(position, row id, fingerprint)`` of one item of `iter_rows`; the fingerprint is ``(question, pixel
    digests, perceptual hashes)``, or the problem line of an unreadable row."""
    position, row_id, job = item
    try:
        question, images = read_row(job)
    except RowError as error:
        return position, row_id, str(error)
    return position, row_id, (question, [pixel_digest(i) for i in images], [perceptual_hash(i) for i in images])


@dataclass
class Side:
    """The fingerprints of one side (train or eval): one entry per readable row."""

    sources: list[Source]
    ids: list[str] = field(default_factory=list)
    questions: list[str] = field(default_factory=list)
    normalized: list[str] = field(default_factory=list)
    digests: list[list[str]] = field(default_factory=list)
    hashes: list[list[bytes]] = field(default_factory=list)
    locations: list[tuple[int, int]] = field(default_factory=list)  # (source number, position in the source)
    rows_per_source: list[int] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def _windowed_map(
    function: Callable, items: Iterator, pool: ProcessPoolExecutor | None, window: int = 512, chunksize: int = 16
) -> Iterator:
    """``map(function, items)`` in order, in `pool` when given, with at most `window` items in flight."""
    if pool is None:
        yield from map(function, items)
        return
    while batch := [item for _, item in zip(range(window), items)]:
        yield from pool.map(function, batch, chunksize=chunksize)


def fingerprint_side(
    sources: list[Source], pool: ProcessPoolExecutor | None = None, progress: bool = False, desc: str = ""
) -> Side:
    """Read every row of `sources` (in `pool`'s processes when given) and keep its id, question, pixel digests and
    perceptual hashes."""
    from tqdm.auto import tqdm

    side = Side(sources)
    with tqdm(desc=f"audit {desc}", unit="row", disable=not progress) as bar:
        for number, source in enumerate(sources):
            count = 0
            for position, row_id, result in _windowed_map(fingerprint_row, iter_rows(source), pool):
                count += 1
                bar.update(1)
                if isinstance(result, str):
                    side.unreadable.append(result)
                    continue
                question, digests, hashes = result
                side.ids.append(source.row_id(row_id))
                side.questions.append(question)
                side.normalized.append(normalize_question(question))
                side.digests.append(digests)
                side.hashes.append(hashes)
                side.locations.append((number, position))
            side.rows_per_source.append(count)
    return side


# --------------------------------------------------------------------------------------------- matching


def _owners(values: list[list[Any]]) -> dict[Any, list[int]]:
    """Each distinct value over all rows (in order of appearance) -> the rows holding it."""
    owners: dict[Any, list[int]] = {}
    for row, row_values in enumerate(values):
        for value in set(row_values):
            owners.setdefault(value, []).append(row)
    return owners


def _questions(texts: list[str]) -> list[list[str]]:
    return [[text] if text else [] for text in texts]


def exact_pairs(train_keys: list[list[str]], eval_keys: list[list[str]]) -> set[tuple[int, int]]:
    """(train row, eval row) pairs sharing a key, through a hash table of the training keys."""
    table = _owners(train_keys)
    return {(t, e) for key, rows in _owners(eval_keys).items() for t in table.get(key, ()) for e in rows}


def _row_pairs(scores: dict[tuple[int, int], float], train_owners: list[list[int]], eval_owners: list[list[int]]
               ) -> dict[tuple[int, int], float]:
    """(train row, eval row) -> the best score of the distinct (train value, eval value) pairs they hold."""
    pairs: dict[tuple[int, int], float] = {}
    for (i, j), score in scores.items():
        for t in train_owners[i]:
            for e in eval_owners[j]:
                pairs[(t, e)] = max(score, pairs.get((t, e), -1.0))
    return pairs


def near_image_pairs(train_hashes: list[list[bytes]], eval_hashes: list[list[bytes]], max_bits: int
                     ) -> dict[tuple[int, int], float]:
    """(train row, eval row) -> pHash similarity ``1 - bits / 64`` for images at most `max_bits` bits apart.

    A faiss ``IndexBinaryFlat`` over the distinct training hashes answers one range search per distinct
    evaluation hash (popcount in C++); rows sharing a hash are expanded afterwards.
    """
    faiss = _require("faiss")
    train, evals = _owners(train_hashes), _owners(eval_hashes)
    if not train or not evals:
        return {}
    index = faiss.IndexBinaryFlat(HASH_BITS)
    index.add(np.frombuffer(b"".join(train), dtype=np.uint8).reshape(-1, HASH_BITS // 8))
    queries = np.frombuffer(b"".join(evals), dtype=np.uint8).reshape(-1, HASH_BITS // 8)
    lims, distances, labels = index.range_search(queries, max_bits + 1)  # distances < max_bits + 1
    scores = {(int(i), j): 1.0 - float(bits) / HASH_BITS for j in range(len(evals))
              for i, bits in zip(labels[lims[j]:lims[j + 1]], distances[lims[j]:lims[j + 1]])}
    return _row_pairs(scores, list(train.values()), list(evals.values()))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def lsh_bands(threshold: float, num_perm: int = MINHASH_PERMUTATIONS, max_miss: float = LSH_MAX_MISS) -> tuple[int, int]:
    """``(bands, rows per band)`` of a MinHash LSH index that misses a pair of Jaccard similarity `threshold` with
    probability ``(1 - threshold**rows) ** bands <= max_miss``, with the most rows per band (fewest candidates) and at
    least two bands (datasketch's minimum)."""
    for rows in range(num_perm // 2, 0, -1):
        bands = num_perm // rows
        if (1.0 - threshold**rows) ** bands <= max_miss:
            return bands, rows
    raise AuditError(f"no MinHash LSH banding of {num_perm} permutations reaches threshold {threshold}")


def near_question_pairs(
    train_texts: list[str], eval_texts: list[str], threshold: float, num_perm: int = MINHASH_PERMUTATIONS, seed: int = 1
) -> dict[tuple[int, int], float]:
    """(train row, eval row) -> Jaccard similarity of the word sets of two *different* normalised questions.

    Word sets of the distinct questions go into a MinHash LSH index (datasketch) banded by `lsh_bands`; every
    candidate's exact Jaccard similarity is checked against `threshold`.
    """
    datasketch = _require("datasketch")
    train, evals = _owners(_questions(train_texts)), _owners(_questions(eval_texts))
    if not train or not evals:
        return {}
    train_words, eval_words = [frozenset(t.split()) for t in train], [frozenset(t.split()) for t in evals]

    def minhashes(word_sets):
        return datasketch.MinHash.generator(([w.encode() for w in words] for words in word_sets), num_perm=num_perm,
                                            seed=seed)

    lsh = datasketch.MinHashLSH(num_perm=num_perm, params=lsh_bands(threshold, num_perm))
    with lsh.insertion_session() as session:
        for i, minhash in enumerate(minhashes(train_words)):
            session.insert(i, minhash, check_duplication=False)
    train_distinct, eval_distinct = list(train), list(evals)
    scores = {}
    for j, minhash in enumerate(minhashes(eval_words)):
        for i in lsh.query(minhash):
            score = jaccard(train_words[i], eval_words[j])
            if score >= threshold and train_distinct[i] != eval_distinct[j]:  # equal: an exact_question pair
                scores[(i, j)] = score
    return _row_pairs(scores, list(train.values()), list(evals.values()))


@dataclass
class AuditResult:
    """Pairs per kind as ``{(train row, eval row): score}`` over the readable rows of both sides."""

    train: Side
    eval: Side
    pairs: dict[str, dict[tuple[int, int], float]]
    image_threshold: float
    question_threshold: float
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        return {kind: len(self.pairs[kind]) for kind in KINDS}

    def ranked(self, kind: str) -> list[tuple[int, int, float]]:
        """The pairs of `kind`, highest score first, then by ids."""
        items = [(t, e, s) for (t, e), s in self.pairs[kind].items()]
        return sorted(items, key=lambda p: (-p[2], self.train.ids[p[0]], self.eval.ids[p[1]]))


def max_hamming_bits(image_threshold: float) -> int:
    """The most differing pHash bits whose similarity ``1 - bits / 64`` reaches `image_threshold`."""
    return int(np.floor((1.0 - image_threshold) * HASH_BITS + 1e-9))


def match(train: Side, eval_side: Side, image_threshold: float = DEFAULT_IMAGE_THRESHOLD,
          question_threshold: float = DEFAULT_QUESTION_THRESHOLD) -> AuditResult:
    """All four kinds of pair between two fingerprinted sides."""
    started = time.perf_counter()
    exact_image = dict.fromkeys(exact_pairs(train.digests, eval_side.digests), 1.0)
    exact_question = exact_pairs(_questions(train.normalized), _questions(eval_side.normalized))
    near_image = near_image_pairs(train.hashes, eval_side.hashes, max_hamming_bits(image_threshold))
    pairs = {
        "exact_image": exact_image,
        "exact_question": dict.fromkeys(exact_question, 1.0),
        "near_image": {pair: score for pair, score in near_image.items() if pair not in exact_image},
        "near_question": near_question_pairs(train.normalized, eval_side.normalized, question_threshold),
    }
    return AuditResult(train, eval_side, pairs, image_threshold, question_threshold,
                       {"match": time.perf_counter() - started})


def audit(
    train_paths: Iterable[str | Path],
    eval_paths: Iterable[str | Path],
    *,
    image_threshold: float = DEFAULT_IMAGE_THRESHOLD,
    question_threshold: float = DEFAULT_QUESTION_THRESHOLD,
    num_proc: int = 1,
    progress: bool = False,
    allow_outside_image_dir: bool = False,
) -> AuditResult:
    """Fingerprint both sides and match them (see the module docstring)."""
    for name, value in (("--image-threshold", image_threshold), ("--question-threshold", question_threshold)):
        if not 0.0 < value <= 1.0:
            raise AuditError(f"{name} must be in (0, 1], got {value}")
    if num_proc < 1:
        raise AuditError(f"--num-proc must be >= 1, got {num_proc}")
    for module in ("imagehash", "datasketch", "faiss"):
        _require(module)
    train_sources = sources_of(train_paths, "--train", allow_outside_image_dir)
    eval_sources = sources_of(eval_paths, "--eval", allow_outside_image_dir)
    started = time.perf_counter()
    with ProcessPoolExecutor(num_proc) if num_proc > 1 else contextlib.nullcontext() as pool:
        train = fingerprint_side(train_sources, pool, progress, "train")
        eval_side = fingerprint_side(eval_sources, pool, progress, "eval")
    read_seconds = time.perf_counter() - started
    for option, side in (("--train", train), ("--eval", eval_side)):
        if not len(side):
            raise AuditError(
                f"{option}: no readable row in {[str(s.path) for s in side.sources]} "
                f"({len(side.unreadable)} unreadable; first: {side.unreadable[:1]})"
            )
    result = match(train, eval_side, image_threshold, question_threshold)
    result.seconds["read"] = read_seconds
    return result


# ---------------------------------------------------------------------------------------------- reports


def audit_json(result: AuditResult) -> dict:
    """The content of ``audit.json``."""
    def inputs(side: Side) -> list[dict]:
        return [
            {"path": str(source.path), "id_prefix": source.label or None, "rows": rows}
            for source, rows in zip(side.sources, side.rows_per_source)
        ]

    return {
        "format": "gap-audit",
        "version": 1,
        "inputs": {"train": inputs(result.train), "eval": inputs(result.eval)},
        "rows": {"train": len(result.train), "eval": len(result.eval)},
        "thresholds": {
            "near_image": result.image_threshold,
            "near_image_max_bits": max_hamming_bits(result.image_threshold),
            "near_question": result.question_threshold,
        },
        "methods": {
            "exact_image": "blake2b of decoded RGB pixels and size",
            "exact_question": "NFKC + casefold + whitespace/punctuation runs collapsed",
            "near_image": f"imagehash.phash ({HASH_BITS} bits), faiss IndexBinaryFlat range search; "
            "score = 1 - differing bits / 64",
            "near_question": "Jaccard similarity of normalised word sets; candidates from datasketch MinHash LSH "
            f"({MINHASH_PERMUTATIONS} permutations, bands x rows {lsh_bands(result.question_threshold)})",
        },
        "counts": result.counts,
        "unreadable": {"train": result.train.unreadable, "eval": result.eval.unreadable},
        "seconds": {key: round(value, 3) for key, value in result.seconds.items()},
        "pairs": [{"kind": kind, "train_id": result.train.ids[t], "eval_id": result.eval.ids[e],
                   "score": round(score, 6)} for kind in KINDS for t, e, score in result.ranked(kind)],
    }


def _thumbnail_uri(image) -> str:
    image = image.convert("RGB")
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def thumbnails(side: Side, rows: Iterable[int]) -> dict[int, list[str]]:
    """Row -> data URIs of its query images' thumbnails, re-reading only those rows from their sources."""
    wanted: dict[tuple[int, int], int] = {side.locations[row]: row for row in rows}
    by_source: dict[int, list[int]] = {}
    for number, position in wanted:
        by_source.setdefault(number, []).append(position)
    out: dict[int, list[str]] = {}
    for number, positions in by_source.items():
        for position, _, job in iter_rows(side.sources[number], positions):
            _, images = read_row(job)
            out[wanted[(number, position)]] = [_thumbnail_uri(image) for image in images]
    return out


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin-bottom:2em}td,th{border:1px solid #ccc;padding:6px;vertical-align:top}
th{background:#f3f3f3}td.q{max-width:28em;white-space:pre-wrap}img{max-width:160px;max-height:160px;margin:2px}
.id{font-family:monospace;font-size:90%;color:#555}.kind{font-family:monospace}
"""


def render_html(result: AuditResult, max_pairs: int) -> str:
    """``report.html``: counts, thresholds, then the exact and the near pairs side by side (inline thumbnails)."""
    sections = [
        ("Exact duplicates", [(k, *p) for k in ("exact_image", "exact_question") for p in result.ranked(k)]),
        ("Near duplicates, highest score first",
         sorted(((k, *p) for k in ("near_image", "near_question") for p in result.ranked(k)), key=lambda x: -x[3])),
    ]
    shown = [(title, rows[:max_pairs], len(rows)) for title, rows in sections]
    train_thumbs = thumbnails(result.train, {t for _, rows, _ in shown for _, t, _, _ in rows})
    eval_thumbs = thumbnails(result.eval, {e for _, rows, _ in shown for _, _, e, _ in rows})
    esc = html.escape

    def cell(side: Side, thumbs: dict[int, list[str]], row: int) -> str:
        images = "".join(f'<img src="{uri}" alt="">' for uri in thumbs.get(row, []))
        return f'<td><div class="id">{esc(side.ids[row])}</div>{images}</td><td class="q">{esc(side.questions[row])}</td>'

    counts = "".join(f"<tr><td class=kind>{kind}</td><td>{n}</td></tr>" for kind, n in result.counts.items())
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>gap audit</title>",
        f"<style>{_STYLE}</style></head><body><h1>Leakage audit</h1>",
        f"<p>{len(result.train)} training rows x {len(result.eval)} evaluation rows. Near thresholds: image "
        f"{result.image_threshold} (pHash, at most {max_hamming_bits(result.image_threshold)} of {HASH_BITS} bits "
        f"differ), question {result.question_threshold} (word-set Jaccard).</p>",
        f"<table><tr><th>kind</th><th>pairs</th></tr>{counts}</table>",
    ]
    for title, rows, total in shown:
        note = f" (the first {len(rows)} of {total}; all are in audit.json)" if len(rows) < total else ""
        parts.append(f"<h2>{esc(title)}: {total}{esc(note)}</h2>")
        if not rows:
            parts.append("<p>none</p>")
            continue
        parts.append("<table><tr><th>kind</th><th>score</th><th>train</th><th>train question</th>"
                     "<th>eval</th><th>eval question</th></tr>")
        for kind, t, e, score in rows:
            parts.append(f"<tr><td class=kind>{kind}</td><td>{score:.3f}</td>{cell(result.train, train_thumbs, t)}"
                         f"{cell(result.eval, eval_thumbs, e)}</tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def format_summary(result: AuditResult, output_dir: str | Path) -> str:
    """The one-line summary ``gap audit`` prints."""
    counts = ", ".join(f"{kind} {n}" for kind, n in result.counts.items())
    unreadable = len(result.train.unreadable) + len(result.eval.unreadable)
    seconds = sum(result.seconds.values())
    return (
        f"gap audit: {len(result.train)} train x {len(result.eval)} eval rows: {counts} "
        f"({unreadable} unreadable rows skipped) in {seconds:.1f} s -> {Path(output_dir) / 'audit.json'}, "
        f"{Path(output_dir) / 'report.html'}"
    )


# ------------------------------------------------------------------------------------------ command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gap audit``."""
    sources = "project JSONL files, dataset folders (save_to_disk), .json/.parquet files or VLMEvalKit .tsv files"
    parser.add_argument("--train", nargs="+", required=True, metavar="TRAIN", help=f"training data: {sources}")
    parser.add_argument("--eval", nargs="+", required=True, metavar="EVAL", help=f"evaluation benchmarks: {sources}")
    parser.add_argument("--output-dir", required=True, help="where audit.json and report.html are written")
    parser.add_argument(
        "--image-threshold", type=float, default=DEFAULT_IMAGE_THRESHOLD,
        help=f"near_image: pHash similarity 1 - differing bits/64 at least this (default {DEFAULT_IMAGE_THRESHOLD}: "
        f"at most {max_hamming_bits(DEFAULT_IMAGE_THRESHOLD)} bits)",
    )
    parser.add_argument(
        "--question-threshold", type=float, default=DEFAULT_QUESTION_THRESHOLD,
        help=f"near_question: Jaccard similarity of the normalised word sets at least this "
        f"(default {DEFAULT_QUESTION_THRESHOLD})",
    )
    parser.add_argument("--num-proc", type=int, default=1, help="processes that decode and hash images (default 1)")
    parser.add_argument("--html-max-pairs", type=int, default=500,
                        help="report.html shows at most this many exact and this many near pairs (default 500)")
    parser.add_argument("--fail-on", type=_kinds, default=[], metavar="KINDS",
                        help=f"exit with status 1 when a pair of one of these comma-separated kinds is found "
                        f"({', '.join(KINDS)}). A templated data set (questions written from a few templates, "
                        "'Find x.') has thousands of exact_question pairs between unrelated rows: fail on "
                        "exact_image there and read the question pairs in report.html")
    parser.add_argument("--fail-on-exact", action="store_true", help="the same as --fail-on exact_image,exact_question")
    add_max_image_pixels_argument(parser)
    add_allow_outside_image_dir_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run ``gap audit``: fingerprint, match, write audit.json and report.html, print the summary line."""
    check_apart_from_inputs(args.output_dir, [*(("--train data", path) for path in args.train),
                                              *(("--eval data", path) for path in args.eval)], AuditError)
    output_dir = Path(args.output_dir)
    with claimed_output(output_dir, AuditError, "gap audit"):
        result = audit(
            args.train, args.eval, image_threshold=args.image_threshold, question_threshold=args.question_threshold,
            num_proc=args.num_proc, progress=not args.no_progress, allow_outside_image_dir=args.allow_outside_image_dir,
        )
        with atomic_files_into(output_dir) as staging:  # both files appear together, or neither changes
            write_json_file(staging / "audit.json", audit_json(result), "audit.json")
            (staging / "report.html").write_text(render_html(result, args.html_max_pairs), encoding="utf-8")
    print(format_summary(result, output_dir))
    fail_on = [kind for kind in KINDS if kind in args.fail_on
               or (args.fail_on_exact and kind in ("exact_image", "exact_question"))]
    found = {kind: result.counts[kind] for kind in fail_on if result.counts[kind]}
    if found:
        print(f"gap audit: {', '.join(f'{count} {kind}' for kind, count in found.items())} pair(s) found (failing on "
              f"{','.join(fail_on)}); inspect them in {output_dir / 'report.html'}", file=sys.stderr)
        return 1
    return 0


def _kinds(value: str) -> list[str]:
    """``--fail-on``: comma-separated pair kinds, each one of `KINDS`."""
    from .cli import comma_list

    kinds = comma_list(value)
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown kind(s) {unknown}; choose from {', '.join(KINDS)}")
    return kinds
