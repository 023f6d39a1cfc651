"""GAP data schema: validator (one error per bad row), placeholder stripping, JSONL and `datasets` loaders."""

import json
import math

import pytest
from PIL import Image

from gap_pipeline.data import (
    LATENT_PLACEHOLDER,
    GapDataError,
    check_rows,
    count_image_entries,
    count_latent_placeholders,
    from_dataset,
    load_jsonl,
    strip_latent_placeholders,
    strip_latent_spans,
    validate_row,
    validate_rows,
)
from processing_gap import LATENT_PLACEHOLDER as PROCESSOR_PLACEHOLDER


@pytest.fixture()
def image_dir(tmp_path, tiny_image):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, seed in (("q.png", 0), ("aux0.png", 1), ("aux1.png", 2)):
        tiny_image(seed=seed).save(folder / name)
    (folder / "broken.png").write_bytes(b"this is not an image")
    return folder


def _row(**overrides):
    row = {
        "id": "ex1",
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many bricks?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Think <latent> then <latent> 6."}]},
        ],
        "images": ["q.png"],
        "aux_images": ["aux0.png", "aux1.png"],
        "accuracy": 0.0,
    }
    row.update(overrides)
    return row


def test_the_placeholder_is_the_processors():
    assert LATENT_PLACEHOLDER == PROCESSOR_PLACEHOLDER == "<latent>"


def test_a_good_row_passes(image_dir):
    assert validate_row(_row(), 0, image_dir=image_dir) is None
    assert validate_row(_row(accuracy=None), 0, image_dir=image_dir) is None
    assert validate_row(_row(accuracy=1), 0, image_dir=image_dir) is None
    text_only = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert validate_row(text_only, 0) is None


# 7. one clear error per bad case -------------------------------------------------------------------------

BAD_ROWS = {
    "placeholder count != aux images": (_row(aux_images=["aux0.png"]), "aux_images", "2 <latent> placeholder(s)"),
    "missing image file": (_row(images=["nowhere.png"]), "images", "does not exist"),
    "missing aux image file": (_row(aux_images=["aux0.png", "gone.png"]), "aux_images", "entry 1 file"),
    "unreadable image": (_row(images=["broken.png"]), "images", "cannot be read as an image"),
    "None image": (_row(images=[None]), "images", "is missing"),
    "accuracy above 1": (_row(accuracy=1.5), "accuracy", "in [0, 1]"),
    "accuracy below 0": (_row(accuracy=-0.1), "accuracy", "in [0, 1]"),
    "accuracy NaN": (_row(accuracy=math.nan), "accuracy", "in [0, 1]"),
    "accuracy not a number": (_row(accuracy="high"), "accuracy", "in [0, 1]"),
    "no assistant turn": (
        _row(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}], aux_images=[]),
        "messages",
        "no assistant turn",
    ),
    "image entries != images": (_row(images=["q.png", "q.png"]), "images", "1 {'type': 'image'} entries but 'images' holds 2"),
    "placeholder in a user turn": (
        _row(
            messages=[
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q <latent>"}]},
                {"role": "assistant", "content": "A <latent> <latent>"},
            ]
        ),
        "messages",
        "outside assistant turns",
    ),
    "unknown role": (_row(messages=[{"role": "robot", "content": "x"}]), "messages", "role 'robot'"),
    "video item": (
        _row(messages=[{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "x"}]),
        "messages",
        "image-only",
    ),
    "no messages": (_row(messages=[]), "messages", "non-empty list"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_each_bad_row_gets_a_clear_error_naming_row_field_and_fix(image_dir, case):
    row, field, fragment = BAD_ROWS[case]
    error = validate_row(row, 7, image_dir=image_dir)
    assert error is not None, case
    assert error.row == 7 and error.row_id == "ex1" and error.field == field
    assert fragment in error.message, error.message
    assert str(error).startswith("row 7 (id='ex1'), field '" + field + "'")


def test_latent_targets_must_match_placeholders_times_k(image_dir):
    import numpy as np

    good = _row(latent_targets=np.zeros((8, 3), dtype=np.float16))
    assert validate_row(good, 0, image_dir=image_dir, latent_tokens_per_span=4) is None
    bad = validate_row(_row(latent_targets=np.zeros((4, 3))), 0, image_dir=image_dir, latent_tokens_per_span=4)
    assert bad.field == "latent_targets" and "need 8" in bad.message and "gap targets" in bad.message


def test_one_error_per_bad_row_and_check_rows_lists_them(image_dir):
    rows = [_row(id="a"), _row(id="b", accuracy=2.0, aux_images=[]), _row(id="c"), _row(id="d", images=[])]
    errors = validate_rows(rows, image_dir=image_dir)
    assert [(e.row, e.row_id) for e in errors] == [(1, "b"), (3, "d")]  # row b has two problems, one error
    with pytest.raises(GapDataError) as info:
        check_rows(rows, image_dir=image_dir, source="train.jsonl")
    assert "2 bad row(s) in train.jsonl" in str(info.value) and "id='b'" in str(info.value)
    assert info.value.errors == errors


def test_image_checks_can_be_skipped(image_dir):
    assert validate_row(_row(images=["nowhere.png"]), 0, image_dir=image_dir, check_images=False) is None


# placeholders and stripping ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, stripped",
    [
        ("a <latent> b", "a b"),
        ("a\n<latent> b", "a\nb"),
        ("a<latent> b", "a b"),
        ("a<latent>b", "ab"),
        ("<latent> b", "b"),
        ("a <latent>", "a"),
        ("a <latent> <latent> b", "a b"),
        ("see <latent> <parser>six</parser>", "see <parser>six</parser>"),
        ("no spans here", "no spans here"),
    ],
)
def test_stripping_removes_placeholders_and_keeps_one_whitespace_run(text, stripped):
    assert strip_latent_placeholders(text) == stripped


def test_strip_latent_spans_touches_only_assistant_text():
    messages = _row()["messages"] + [{"role": "assistant", "content": "and <latent> again"}]
    stripped = strip_latent_spans(messages)
    assert stripped[0] is messages[0]
    assert stripped[1]["content"][0]["text"] == "Think then 6."
    assert stripped[2]["content"] == "and again"
    assert count_latent_placeholders(stripped) == 0 and count_latent_placeholders(messages) == 3
    assert messages[1]["content"][0]["text"] == "Think <latent> then <latent> 6."  # input untouched


def test_counts_follow_item_types():
    messages = [{"role": "user", "content": [{"type": "text", "text": "x", "image": None}, {"type": "image", "text": None}]}]
    assert count_image_entries(messages) == 1


# loaders ----------------------------------------------------------------------------------------------------


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_load_jsonl_resolves_images_against_the_folder_and_decodes_lazily(tmp_path, image_dir):
    text_row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = _write_jsonl(image_dir / "train.jsonl", [_row(), text_row])
    dataset = load_jsonl(path)
    assert len(dataset) == 2
    first = dataset[0]
    assert isinstance(first["images"][0], Image.Image) and len(first["aux_images"]) == 2
    assert first["accuracy"] == 0.0 and dataset[1]["accuracy"] is None
    assert dataset[1]["messages"][1]["content"] == [{"type": "text", "text": "hello"}]
    assert dataset[1]["images"] == [] and dataset[1]["aux_images"] == []
    # an explicit image folder, with the JSONL elsewhere
    elsewhere = _write_jsonl(tmp_path / "elsewhere.jsonl", [_row()])
    assert len(load_jsonl(elsewhere, image_dir=image_dir)) == 1


def test_load_jsonl_reports_bad_rows_and_bad_lines(tmp_path, image_dir):
    path = _write_jsonl(image_dir / "bad.jsonl", [_row(), _row(id="x2", aux_images=["aux0.png"])])
    with pytest.raises(GapDataError, match=r"row 1 \(id='x2'\), field 'aux_images'"):
        load_jsonl(path)
    broken = image_dir / "broken.jsonl"
    broken.write_text(json.dumps(_row()) + "\n{not json\n")
    with pytest.raises(GapDataError, match="line 2: not valid JSON"):
        load_jsonl(broken)
    with pytest.raises(GapDataError, match="JSONL file not found"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_from_dataset_validates_and_types_string_paths_as_images(image_dir):
    from datasets import Dataset

    rows = [_row(), _row(id="t2", accuracy=None)]
    for row in rows:
        row["messages"][1]["content"] = [{"type": "text", "text": row["messages"][1]["content"][0]["text"]}]
    dataset = from_dataset(Dataset.from_list(rows), image_dir=image_dir)
    assert isinstance(dataset[1]["aux_images"][1], Image.Image)
    with pytest.raises(GapDataError, match="field 'images'"):
        from_dataset(Dataset.from_list([_row(images=["nowhere.png"])]), image_dir=image_dir)
