"""The demo task: questions about a 4 x 4 grid of coloured cells, some of which a latent span makes easy.

The README's "The task" says what is asked and why the task is built this way. In pixels: the query image is
`GRID` x `GRID` cells of `CELL` px (112 x 112), so with Qwen2.5-VL's 14 px patches and 2 x 2 merge every cell is
exactly one merged vision token. A cell is two merged-token halves: a dark address strip (top 14 px) holding two
white `MARK` px marks, the row's in its left patch and the column's in its right patch (`mark_boxes`), over a block
of the cell's colour; one cell's block has a black frame. The auxiliary image (`evidence_image`, 56 x 56 px) lays the
framed cell and three copies of the asked cell out 2 x 2, unchanged: its four merged tokens are the K = 4 latent
targets. The teacher response is ``<think>`` a plan, ``<latent><parser>`` the cells it names ``</parser></think>
<answer>colour</answer>``: the parser never names a colour, so the text carries no evidence the question lacks.

    gap demo-data --output-dir runs/demo/data --train 3000 --test 300 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HELP = "Generate the demo task (colour questions about a grid, with auxiliary evidence crops) as JSONL + PNG files."

GRID = 4
CELL = 28
SIZE = GRID * CELL
AUX_GRID = 2  # the auxiliary crop lays the relevant row's 4 cells out 2 x 2
LATENT_TOKENS = AUX_GRID * AUX_GRID
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 170),
}
COLOUR_TOP = CELL // 2  # a cell: its address strip above, its colour block from here down
STRIP_COLOUR = (64, 64, 64)
FRAME = 2  # px of the black frame around the marked cell's colour block
MARK = 6  # px side of the white coordinate marks
MARK_SPOTS = [(1, 1), (1, 7), (7, 1), (7, 7)]  # (dy, dx) of code 0-3 inside a 14 px patch
MARK_COLOUR = (255, 255, 255)
COLUMN_NAMES = ["one", "two", "three", "four"]
ONE_HOP, TWO_HOP = "framed", "column"  # the question types (a row's `question_type`)
QUESTION_TYPES = (ONE_HOP, TWO_HOP, TWO_HOP)  # the order rows cycle through: one third framed


def mark_boxes(r: int, c: int):
    """The PIL boxes of cell (r, c)'s two marks: the row's code in the strip's left patch, the column's in its right
    one, each at MARK_SPOTS[code] of its patch."""
    x0, y0 = c * CELL, r * CELL
    return tuple((x0 + px + dx, y0 + dy, x0 + px + dx + MARK - 1, y0 + dy + MARK - 1)
                 for px, (dy, dx) in ((0, MARK_SPOTS[r]), (CELL // 2, MARK_SPOTS[c])))


def draw_grid(cells, marked):
    """A PIL image of `cells` (GRID x GRID colour names): every cell is a dark address strip with its coordinate
    marks over a block of its colour; the `marked` (r, c) cell's colour block has a black frame."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(image)
    for r in range(GRID):
        for c in range(GRID):
            x0, y0 = c * CELL, r * CELL
            draw.rectangle((x0, y0, x0 + CELL - 1, y0 + COLOUR_TOP - 1), fill=STRIP_COLOUR)
            colour_block = (x0, y0 + COLOUR_TOP, x0 + CELL - 1, y0 + CELL - 1)
            draw.rectangle(colour_block, fill=COLOURS[cells[r][c]])
            if marked == (r, c):
                draw.rectangle(colour_block, outline=(0, 0, 0), width=FRAME)
            for mark in mark_boxes(r, c):
                draw.rectangle(mark, fill=MARK_COLOUR)
    return image


def evidence_image(query, first: tuple[int, int], target: tuple[int, int]):
    """The auxiliary image: cell `first` of `query`, then three copies of cell `target`, cut out unchanged and laid
    out 2 x 2 row-major, so latent 0 is the query's cell `first` and latents 1-3 its cell `target`."""
    from PIL import Image

    aux = Image.new("RGB", (AUX_GRID * CELL, AUX_GRID * CELL))
    for k, (r, c) in enumerate([first] + [target] * (LATENT_TOKENS - 1)):
        cell = query.crop((c * CELL, r * CELL, (c + 1) * CELL, (r + 1) * CELL))
        aux.paste(cell, ((k % AUX_GRID) * CELL, (k // AUX_GRID) * CELL))
    return aux


def make_example(rng: random.Random, question_type: str, answer_index: int):
    """One example of `question_type` whose answer is colour number `answer_index`.

    Returns (cells, marked cell, the cell holding the answer, question, response, answer)."""
    names = sorted(COLOURS)
    cells = [[rng.choice(names) for _ in range(GRID)] for _ in range(GRID)]
    marked = (rng.randrange(GRID), rng.randrange(GRID))
    answer = names[answer_index]
    if question_type == ONE_HOP:
        target = marked
        cells[marked[0]][marked[1]] = answer
        question = "What colour is the cell with the black frame?"
        plan = "the framed cell."
    else:
        column = rng.randrange(GRID)
        target = (marked[0], column)
        cells[marked[0]][column] = answer
        question = f"What colour is the cell in column {COLUMN_NAMES[column]} of the row of the framed cell?"
        plan = f"the framed row, column {COLUMN_NAMES[column]}."
    parser = "the framed cell, then the asked cell"
    response = f"<think>{plan} <latent><parser>{parser}</parser></think><answer>{answer}</answer>"
    return cells, marked, target, question, response, answer


def generate_split(output_dir: Path, split: str, n: int, seed: int) -> Path:
    """Write `n` examples (the question types in turn, each with balanced answers) and return the JSONL path."""
    rng = random.Random(f"{seed}-{split}")
    image_dir = output_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{split}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            question_type = QUESTION_TYPES[i % len(QUESTION_TYPES)]
            cells, marked, cell, question, response, answer = make_example(
                rng, question_type, (i // len(QUESTION_TYPES)) % len(COLOURS))
            query_name = f"{split}_{i:05d}.png"
            aux_name = f"{split}_{i:05d}_aux.png"
            query = draw_grid(cells, marked)
            query.save(image_dir / query_name)
            evidence_image(query, marked, cell).save(image_dir / aux_name)
            record = {
                "id": f"{split}-{i}",
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": [{"type": "text", "text": response}]},
                ],
                "images": [f"images/{query_name}"],
                "aux_images": [f"images/{aux_name}"],
                "answer": answer,
                "question_type": question_type,
            }
            f.write(json.dumps(record) + "\n")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--train", type=int, default=3000, help="training rows (default 3000)")
    parser.add_argument("--test", type=int, default=300, help="held-out rows (default 300)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    output_dir = Path(args.output_dir)
    for split, n in tqdm([("train", args.train), ("test", args.test)], desc="demo-data"):
        generate_split(output_dir, split, n, args.seed)
    print(f"demo task: {args.train} train + {args.test} held-out rows (question types framed and column, "
          f"balanced answers) in {output_dir}")
    return 0
