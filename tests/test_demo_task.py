"""The demo task generator: balanced colour answers, auxiliary crops that hold the path to the answer's cell."""

import json
import re
from collections import Counter

import numpy as np
from PIL import Image

from gap_pipeline.data import load_jsonl
from gap_pipeline.demo_task import AUX_GRID, CELL, COLOUR_TOP, COLOURS, COLUMN_NAMES, GRID, SIZE, generate_split

NAMES = {rgb: name for name, rgb in COLOURS.items()}


def _cell(pixels, r, c):
    return pixels[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL]


def _colour(pixels, r, c):
    """The colour at the centre of the cell's colour block (its bottom half)."""
    return NAMES[tuple(int(v) for v in pixels[r * CELL + (COLOUR_TOP + CELL) // 2, c * CELL + CELL // 2])]


def _frame(pixels):
    """(row, column) of the one cell whose colour block has a black top edge."""
    (found,) = [(r, c) for r in range(GRID) for c in range(GRID)
                if tuple(pixels[r * CELL + COLOUR_TOP + 1, c * CELL + CELL // 2]) == (0, 0, 0)]
    return found


def test_answers_are_balanced_per_question_type_and_match_the_image(tmp_path):
    path = generate_split(tmp_path, "train", 60, seed=3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert Counter(row["question_type"] for row in rows) == {"framed": 20, "column": 40}
    for question_type, share in (("framed", 4), ("column", 8)):
        answers = Counter(row["answer"] for row in rows if row["question_type"] == question_type)
        assert answers == {name: share for name in COLOURS}
    for row in rows:
        query = np.asarray(Image.open(tmp_path / row["images"][0]))
        assert query.shape[:2] == (SIZE, SIZE)
        assert _colour(query, *_asked_cell(row, query)) == row["answer"]


def _asked_cell(row, query):
    """The cell the question asks about: the framed one, or column c of its row."""
    r, c = _frame(query)
    question = row["messages"][0]["content"][1]["text"]
    if row["question_type"] == "column":
        c = COLUMN_NAMES.index(re.search(r"in column (\w+) of the row of the framed cell", question).group(1))
    return r, c


def test_the_aux_image_is_the_framed_cell_then_the_asked_cell_pixel_for_pixel(tmp_path):
    path = generate_split(tmp_path, "test", 12, seed=1)
    for row in map(json.loads, path.read_text().splitlines()):
        query = np.asarray(Image.open(tmp_path / row["images"][0]))
        aux = np.asarray(Image.open(tmp_path / row["aux_images"][0]))
        assert aux.shape[:2] == (AUX_GRID * CELL, AUX_GRID * CELL)
        path_cells = [_frame(query)] + [_asked_cell(row, query)] * 3  # latent k is aux cell k (row-major)
        for k, (r, c) in enumerate(path_cells):
            crop = aux[(k // AUX_GRID) * CELL : (k // AUX_GRID + 1) * CELL, (k % AUX_GRID) * CELL : (k % AUX_GRID + 1) * CELL]
            assert (crop == _cell(query, r, c)).all()
        assert _colour(query, *_asked_cell(row, query)) == row["answer"]


def test_the_response_names_the_row_but_never_a_colour_before_the_answer(tmp_path):
    path = generate_split(tmp_path, "test", 9, seed=2)
    for row in map(json.loads, path.read_text().splitlines()):
        response = row["messages"][1]["content"][0]["text"]
        assert response.count("<latent>") == len(row["aux_images"]) == 1
        assert re.search(r"<parser>the framed cell, then the asked cell</parser></think><answer>(\w+)</answer>$", response).group(1) == row["answer"]
        reasoning = response[: response.index("<answer>")]
        assert not any(name in reasoning for name in COLOURS)  # the colours reach the answer only via image/latents


def test_generated_rows_pass_the_schema_validator_and_give_one_token_per_cell(tmp_path, tiny_processor):
    path = generate_split(tmp_path, "test", 5, seed=0)
    dataset = load_jsonl(path)  # validates every row
    assert len(dataset) == 5
    for image, grid in ((dataset[0]["images"][0], GRID), (dataset[0]["aux_images"][0], AUX_GRID)):
        inputs = tiny_processor.image_processor(images=[image], return_tensors="pt")
        t, h, w = inputs["image_grid_thw"][0].tolist()
        assert (t, h // 2, w // 2) == (1, grid, grid)


def test_every_cell_carries_white_marks_that_encode_its_row_and_column(tmp_path):
    from gap_pipeline.demo_task import MARK_COLOUR, mark_boxes

    path = generate_split(tmp_path, "train", 2, seed=1)
    row = json.loads(path.read_text().splitlines()[0])
    pixels = np.asarray(Image.open(tmp_path / row["images"][0]))
    patterns = set()
    for r in range(GRID):
        for c in range(GRID):
            white = tuple(map(tuple, np.argwhere((_cell(pixels, r, c) == MARK_COLOUR).all(-1))))
            for x0, y0, x1, y1 in mark_boxes(r, c):
                assert (pixels[y0 : y1 + 1, x0 : x1 + 1] == MARK_COLOUR).all()
            patterns.add(white)
    assert len(patterns) == GRID * GRID, "each cell's marks are unique to its (row, column)"
