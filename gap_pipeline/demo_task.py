"""The demo task: counting coloured cells in a 4 x 4 grid, where a latent span can carry the evidence.

Query image: a 4 x 4 grid of coloured cells, 28 px each (112 x 112 px), so with Qwen2.5-VL's 14 px patches
and 2 x 2 merge every cell is exactly one merged vision token. Two question types, answers 0-4 balanced
(chance 20 %):

* ``row``: "How many COLOUR cells are in row r?"
* ``marked``: "How many COLOUR cells are in the row of the marked cell?" — one cell carries a black frame;
  the model must find its row first (two hops).

Every cell carries two small white coordinate marks: a 4 x 4 px square on its left half whose height encodes the
row and one on its right half whose height encodes the column. Qwen2.5-VL locates image tokens through its
trained vision tower and M-RoPE; the demo's random frozen tower gives every cell of one colour the same features
(no position at all), and the tiny model's M-RoPE (head_dim 16, theta 1e6) turns by at most 0.03 rad per row
and 2e-4 rad per column, so without the marks no model, latent or not, can tell which cell is which.

Auxiliary image: the same grid with every cell outside the relevant row blanked to grey (marks kept) — the
evidence made explicit. Its 16 merged tokens are the latent targets (K = 16, one latent per cell, no pooling).

Teacher response, in the paper's format: ``<think>`` a short plan, ``<latent>``, ``<parser>`` a one-line
description of the auxiliary image ``</parser>``, ``</think><answer>n</answer>``.

    gap demo-data --output-dir runs/demo/data --train 2000 --test 200 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HELP = "Generate the demo task (grid counting with auxiliary images) as JSONL + PNG files."

GRID = 4
CELL = 28
SIZE = GRID * CELL
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 170),
}
GREY = (128, 128, 128)
FRAME = 5  # px of the black frame on the marked cell
MARK = 4  # px side of the white coordinate marks, drawn inside the frame
MARK_COLOUR = (255, 255, 255)
ROW_NAMES = ["one", "two", "three", "four"]
QUESTION_TYPES = ("row", "marked")


def mark_boxes(r: int, c: int):
    """The two coordinate marks of cell (r, c), as boxes inside the cell: at x 6-9 px, its top at 6 + 4 r px (the
    row), and at x 18-21 px, its top at 6 + 4 c px (the column); the cell's centre pixel stays its colour."""
    x0, y0 = c * CELL, r * CELL
    row_mark = (x0 + 6, y0 + 6 + MARK * r, x0 + 6 + MARK - 1, y0 + 6 + MARK * r + MARK - 1)
    column_mark = (x0 + 18, y0 + 6 + MARK * c, x0 + 18 + MARK - 1, y0 + 6 + MARK * c + MARK - 1)
    return row_mark, column_mark


def draw_grid(cells, marked=None, keep_row=None):
    """A PIL image of `cells` (GRID x GRID colour names) with every cell's coordinate marks; `marked` (r, c) gets
    a black frame; with `keep_row` every cell outside that row is grey (its marks stay)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), GREY)
    draw = ImageDraw.Draw(image)
    for r in range(GRID):
        for c in range(GRID):
            colour = COLOURS[cells[r][c]] if keep_row is None or r == keep_row else GREY
            box = (c * CELL, r * CELL, (c + 1) * CELL - 1, (r + 1) * CELL - 1)
            draw.rectangle(box, fill=colour)
            if marked == (r, c) and (keep_row is None or r == keep_row):
                draw.rectangle(box, outline=(0, 0, 0), width=FRAME)
            for mark in mark_boxes(r, c):
                draw.rectangle(mark, fill=MARK_COLOUR)
    return image


def make_example(rng: random.Random, question_type: str, answer: int):
    """One example whose answer is `answer`: (cells, marked cell, row, colour, question, response)."""
    colour = rng.choice(sorted(COLOURS))
    others = [name for name in sorted(COLOURS) if name != colour]
    row = rng.randrange(GRID)
    cells = [[rng.choice(sorted(COLOURS)) for _ in range(GRID)] for _ in range(GRID)]
    positions = rng.sample(range(GRID), answer)
    cells[row] = [colour if c in positions else rng.choice(others) for c in range(GRID)]
    marked = None
    if question_type == "marked":
        marked = (row, rng.randrange(GRID))
        question = f"How many {colour} cells are in the row of the cell with the black frame?"
        plan = f"framed row, count {colour}."
    else:
        question = f"How many {colour} cells are in row {ROW_NAMES[row]}?"
        plan = f"row {ROW_NAMES[row]}, count {colour}."
    description = " ".join(cells[row])
    response = f"<think>{plan} <latent><parser>{description}</parser></think><answer>{answer}</answer>"
    return cells, marked, row, colour, question, response


def generate_split(output_dir: Path, split: str, n: int, seed: int) -> Path:
    """Write `n` balanced examples (answers 0-4, both question types) and return the JSONL path."""
    rng = random.Random(f"{seed}-{split}")
    image_dir = output_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{split}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            answer = i % (GRID + 1)
            question_type = QUESTION_TYPES[(i // (GRID + 1)) % len(QUESTION_TYPES)]
            cells, marked, row, colour, question, response = make_example(rng, question_type, answer)
            query_name = f"{split}_{i:05d}.png"
            aux_name = f"{split}_{i:05d}_aux.png"
            draw_grid(cells, marked).save(image_dir / query_name)
            draw_grid(cells, marked, keep_row=row).save(image_dir / aux_name)
            record = {
                "id": f"{split}-{i}",
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": [{"type": "text", "text": response}]},
                ],
                "images": [f"images/{query_name}"],
                "aux_images": [f"images/{aux_name}"],
                "answer": str(answer),
                "question_type": question_type,
            }
            f.write(json.dumps(record) + "\n")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--train", type=int, default=2000, help="training rows (default 2000)")
    parser.add_argument("--test", type=int, default=200, help="held-out rows (default 200)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    output_dir = Path(args.output_dir)
    for split, n in tqdm([("train", args.train), ("test", args.test)], desc="demo-data"):
        generate_split(output_dir, split, n, args.seed)
    print(f"demo task: {args.train} train + {args.test} held-out rows (answers 0-4 balanced, question types "
          f"{', '.join(QUESTION_TYPES)}) in {output_dir}")
    return 0
