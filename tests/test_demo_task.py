"""The demo task generator: balanced answers, auxiliary images that keep only the relevant row."""

import json
import re
from collections import Counter

import numpy as np
from PIL import Image

from gap_pipeline.data import load_jsonl
from gap_pipeline.demo_task import CELL, COLOURS, GREY, GRID, ROW_NAMES, SIZE, generate_split


def _cell_colour(image, r, c):
    pixels = np.asarray(image)
    return tuple(int(v) for v in pixels[r * CELL + CELL // 2, c * CELL + CELL // 2])


def test_answers_are_balanced_and_match_the_image(tmp_path):
    path = generate_split(tmp_path, "train", 40, seed=3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert Counter(row["answer"] for row in rows) == {str(a): 8 for a in range(GRID + 1)}
    assert Counter(row["question_type"] for row in rows) == {"row": 20, "marked": 20}
    names = {rgb: name for name, rgb in COLOURS.items()}
    for row in rows:
        query = Image.open(tmp_path / row["images"][0])
        aux = Image.open(tmp_path / row["aux_images"][0])
        assert query.size == aux.size == (SIZE, SIZE)
        response = row["messages"][1]["content"][0]["text"]
        colour = re.search(r"count (\w+)\.", response).group(1)
        described = re.search(r"<parser>(.*)</parser>", response).group(1).split()
        kept = [r for r in range(GRID) if any(_cell_colour(aux, r, c) != GREY for c in range(GRID))]
        assert len(kept) == 1, "the auxiliary image keeps exactly one row"
        (r,) = kept
        colours = [names[_cell_colour(query, r, c)] for c in range(GRID)]
        assert [names[_cell_colour(aux, r, c)] for c in range(GRID)] == colours == described
        assert colours.count(colour) == int(row["answer"])
        assert response.count("<latent>") == len(row["aux_images"]) == 1
        if row["question_type"] == "row":
            assert f"row {ROW_NAMES[r]}" in row["messages"][0]["content"][1]["text"]
        else:  # the marked cell sits in the kept row: its frame is black
            frames = [c for c in range(GRID) if tuple(np.asarray(query)[r * CELL + 1, c * CELL + CELL // 2]) == (0, 0, 0)]
            assert len(frames) == 1


def test_generated_rows_pass_the_schema_validator_and_give_one_token_per_cell(tmp_path, tiny_processor):
    path = generate_split(tmp_path, "test", 5, seed=0)
    dataset = load_jsonl(path)  # validates every row
    assert len(dataset) == 5
    image = dataset[0]["images"][0]
    inputs = tiny_processor.image_processor(images=[image], return_tensors="pt")
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert (t, h // 2, w // 2) == (1, GRID, GRID)


def test_every_cell_carries_white_marks_that_encode_its_row_and_column_in_both_images(tmp_path):
    from gap_pipeline.demo_task import MARK_COLOUR, mark_boxes

    path = generate_split(tmp_path, "train", 5, seed=1)
    row = json.loads(path.read_text().splitlines()[1])  # a "marked" row: its frame must not hide the marks
    for name in (row["images"][0], row["aux_images"][0]):
        pixels = np.asarray(Image.open(tmp_path / name))
        patterns = set()
        for r in range(GRID):
            for c in range(GRID):
                cell = pixels[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL]
                white = tuple(map(tuple, np.argwhere((cell == MARK_COLOUR).all(-1))))
                for x0, y0, x1, y1 in mark_boxes(r, c):
                    assert (pixels[y0 : y1 + 1, x0 : x1 + 1] == MARK_COLOUR).all()
                patterns.add(white)
        assert len(patterns) == GRID * GRID, "each cell's marks are unique to its (row, column)"
