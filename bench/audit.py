"""Leakage-audit benchmark: `gap audit` on 50,000 training rows x 20,000 evaluation rows of synthetic data.

Training rows are a project JSONL with JPEG files, evaluation rows one VLMEvalKit TSV with base64 images, so both
loaders are exercised. Images are 128 x 128 smooth random colour fields, questions ten random pseudo-words. Among
the evaluation rows, `--planted` rows of each kind copy a training row: its decoded pixels re-saved as PNG
(exact_image), its question in upper case with extra spaces and punctuation (exact_question), its image resized
to 112 x 112 and re-compressed (near_image), its question with one word swapped and one added (near_question,
Jaccard 9/12). The command runs as a user runs it, in a fresh `python -m gap_pipeline audit` process.

Reported: wall time and CPU time (all processes; on a busy machine the wall time is the CPU time shared) of the
full-size audit per `--num-proc`, with its phases; the planted pairs found and the pairs beyond them; and
a ratio showing the search is indexed: the matching phase's time at full size over its time with every side
`--small` times smaller (an all-pairs search grows with the product of the sides, 1/small^2 = 100x; the hash
tables, the LSH index and the range search over distinct hashes grow about linearly, ~10x).

    python bench/audit.py                                   # 50k x 20k, --num-proc 1 and 2
    python bench/audit.py --train 5000 --eval 2000 --num-proc 2
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO, print_table, write_results
from PIL import Image

SIDE = 128
KINDS = ("exact_image", "exact_question", "near_image", "near_question")


def smooth_image(rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((SIDE, SIDE), Image.BICUBIC)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3))


def make_data(folder: Path, n_train: int, n_eval: int, planted: int, seed: int = 0) -> set[tuple[str, str, str]]:
    """Write train.jsonl + images/ and eval.tsv into `folder`; return the planted (kind, train id, eval id) pairs."""
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    questions, jpegs = [], []
    with open(folder / "train.jsonl", "w", encoding="utf-8") as f:
        for i in range(n_train):
            question = " ".join(pseudo_word(rng) for _ in range(10)).capitalize() + "?"
            data = encode(smooth_image(np_rng), "JPEG", quality=90)
            (folder / "images" / f"t{i}.jpg").write_bytes(data)
            if i < 4 * planted:
                questions.append(question)
                jpegs.append(data)
            row = {"id": f"t{i}", "images": [f"images/t{i}.jpg"],
                   "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                                {"role": "assistant", "content": "<answer>A</answer>"}]}
            f.write(json.dumps(row) + "\n")
    pairs = set()
    with open(folder / "eval.tsv", "w", encoding="utf-8") as f:
        f.write("index\timage\tquestion\tanswer\n")
        for j in range(n_eval):
            image = encode(smooth_image(np_rng), "JPEG", quality=90)
            question = " ".join(pseudo_word(rng) for _ in range(10)).capitalize() + "?"
            kind, k = (KINDS[j // planted], j % planted) if j < 4 * planted else (None, None)
            if kind is not None:
                t = KINDS.index(kind) * planted + k  # each kind copies its own training rows
                source = Image.open(io.BytesIO(jpegs[t])).convert("RGB")
                if kind == "exact_image":
                    image = encode(source, "PNG")
                elif kind == "exact_question":
                    question = "  " + questions[t].upper().replace(" ", " ,  ") + " ?!"
                elif kind == "near_image":
                    image = encode(source.resize((112, 112), Image.BILINEAR), "JPEG", quality=75)
                else:
                    words = questions[t].rstrip("?").split()
                    question = " ".join(words[:-1] + [pseudo_word(rng), pseudo_word(rng)]) + "?"
                pairs.add((kind, f"t{t}", f"e{j}"))
            f.write(f"e{j}\t{base64.b64encode(image).decode()}\t{question}\tA\n")
    return pairs


def run_audit(folder: Path, num_proc: int) -> dict:
    out = folder / f"out{num_proc}"
    command = [sys.executable, "-m", "gap_pipeline", "audit", "--train", str(folder / "train.jsonl"), "--eval",
               str(folder / "eval.tsv"), "--output-dir", str(out), "--num-proc", str(num_proc), "--no-progress"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the audit and its worker processes
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode:
        raise RuntimeError(f"gap audit failed ({done.returncode}):\n{done.stderr[-3000:]}")
    report = json.loads((out / "audit.json").read_text())
    return {"wall_seconds": seconds, "cpu_seconds": cpu, "phases": report["seconds"], "counts": report["counts"],
            "pairs": {(p["kind"], p["train_id"], p["eval_id"]) for p in report["pairs"]}, "summary": done.stdout.strip()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=50_000)
    parser.add_argument("--eval", type=int, default=20_000)
    parser.add_argument("--planted", type=int, default=50, help="planted pairs of each kind")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--small", type=int, default=10, help="the scaling run divides both sides by this")
    args = parser.parse_args(argv)

    rows, raw = [], {}
    with tempfile.TemporaryDirectory(prefix="gap-audit-bench-") as tmp:
        sizes = {"full": (args.train, args.eval), "small": (args.train // args.small, args.eval // args.small)}
        runs = {}
        for name, (n_train, n_eval) in sizes.items():
            folder = Path(tmp) / name
            started = time.perf_counter()
            planted = make_data(folder, n_train, n_eval, min(args.planted, n_eval // 8))
            print(f"{name}: {n_train} x {n_eval} rows written in {time.perf_counter() - started:.0f} s", flush=True)
            for num_proc in args.num_proc if name == "full" else args.num_proc[-1:]:
                result = run_audit(folder, num_proc)
                print(f"  --num-proc {num_proc}: {result['summary']}", flush=True)
                found = {kind: len({p for p in planted if p[0] == kind} & result["pairs"]) for kind in KINDS}
                runs[(name, num_proc)] = result
                raw[f"{name}_proc{num_proc}"] = {
                    "train": n_train, "eval": n_eval, "wall_seconds": result["wall_seconds"],
                    "cpu_seconds": result["cpu_seconds"], "phases": result["phases"],
                    "counts": result["counts"], "planted_per_kind": len(planted) // 4, "planted_found": found,
                    "pairs_beyond_planted": len(result["pairs"] - planted),
                }
        for num_proc in args.num_proc:
            full = raw[f"full_proc{num_proc}"]
            found = sum(full["planted_found"].values())
            rows.append({"metric": f"{args.train} x {args.eval} rows, --num-proc {num_proc}: wall minutes",
                         "value": full["wall_seconds"] / 60, "goal": "minutes", "met": full["wall_seconds"] < 600,
                         "detail": f"CPU {full['cpu_seconds'] / 60:.1f} min over all processes; read+hash "
                                   f"{full['phases']['read']:.0f} s, match {full['phases']['match']:.1f} s; "
                                   f"planted found {found}/{4 * full['planted_per_kind']}, "
                                   f"other pairs {full['pairs_beyond_planted']}"})
        proc = args.num_proc[-1]
        growth = raw[f"full_proc{proc}"]["phases"]["match"] / max(raw[f"small_proc{proc}"]["phases"]["match"], 1e-3)
        rows.append({"metric": f"match time, full / sides {args.small}x smaller", "value": growth,
                     "goal": f"<< {args.small ** 2}", "met": growth < args.small ** 2 / 4,
                     "detail": f"all-pairs would be {args.small ** 2}x; linear {args.small}x"})
    print_table(f"gap audit — {args.train} train x {args.eval} eval synthetic rows", rows)
    path = write_results("audit", {"args": vars(args), "rows": rows, "raw": raw})
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
