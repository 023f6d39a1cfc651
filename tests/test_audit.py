"""`gap audit`: planted duplicates of each kind among clean rows are found, and only they (paper App. I)."""

import base64
import io
import json
import random

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from gap_pipeline.audit import (
    DEFAULT_IMAGE_THRESHOLD,
    audit,
    audit_json,
    max_hamming_bits,
    near_question_pairs,
    normalize_question,
)
from gap_pipeline.cli import main as gap_main

N_TRAIN = 12
# Planted questions: t5's exact question comes back with other case, spacing, punctuation and a full-width "？";
# t9's question comes back paraphrased (word-set Jaccard 8/10).
EXACT_QUESTION = ("What is the area of triangle ABC?", "  WHAT is the   area of triangle, abc？")
NEAR_QUESTION = ("How many bricks are missing in the wall?", "How many of the bricks in this wall are missing?")


def smooth_image(seed: int, size=(96, 96)) -> Image.Image:
    """A photo-like test image: a 6 x 6 grid of random colours, bicubically smoothed."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)


def clean_question(rng: random.Random) -> str:
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    return " ".join("".join(rng.sample(syllables, 3)) for _ in range(8)).capitalize() + "?"


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def tsv_file(path, rows):
    """A VLMEvalKit TSV: (index, image bytes or a raw string, question) per row."""
    lines = ["index\timage\tquestion\tanswer"]
    for index, image, question in rows:
        field = base64.b64encode(image).decode() if isinstance(image, bytes) else image
        lines.append(f"{index}\t{field}\t{question}\tA")
    path.write_text("\n".join(lines) + "\n")
    return path


def project_row(row_id, question, image):
    return {"id": row_id, "images": [image],
            "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                         {"role": "assistant", "content": [{"type": "text", "text": "<answer>A</answer>"}]}]}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """train.jsonl (12 clean rows, two of them with the planted questions); bench_a.tsv (one planted pair of each
    kind, clean rows, a row with bad base64); bench_b (a dataset folder: a re-saved PNG with metadata, clean
    rows); clean.tsv (clean rows only)."""
    from datasets import Dataset, Image as ImageFeature, List

    root = tmp_path_factory.mktemp("audit")
    rng = random.Random(0)
    (root / "img").mkdir()
    train = []
    for i in range(N_TRAIN):
        smooth_image(i).save(root / "img" / f"t{i}.png")
        question = {5: EXACT_QUESTION[0], 9: NEAR_QUESTION[0]}.get(i) or clean_question(rng)
        train.append(project_row(f"t{i}", question, f"img/t{i}.png"))
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))

    resized = smooth_image(7).resize((88, 88), Image.BILINEAR)
    clean = [(f"c{i}", encode(smooth_image(100 + i), "PNG"), clean_question(rng)) for i in range(6)]
    tsv_file(root / "bench_a.tsv", [
        ("e_img", encode(smooth_image(2), "BMP"), clean_question(rng)),  # t2's pixels in another format
        ("e_q", encode(smooth_image(200), "PNG"), EXACT_QUESTION[1]),
        ("e_near_img", encode(resized, "JPEG", quality=70), clean_question(rng)),  # t7 resized and re-compressed
        ("e_near_q", encode(smooth_image(201), "PNG"), NEAR_QUESTION[1]),
        ("e_bad", "not base64!", clean_question(rng)),
        *clean,
    ])
    metadata = PngImagePlugin.PngInfo()
    metadata.add_text("Software", "another editor")
    b_rows = [project_row("b_img", clean_question(rng), {"bytes": encode(smooth_image(3), "PNG", pnginfo=metadata),
                                                          "path": None})]
    b_rows += [project_row(f"b{i}", clean_question(rng), {"bytes": encode(smooth_image(300 + i), "PNG"), "path": None})
               for i in range(4)]
    Dataset.from_list(b_rows).cast_column("images", List(ImageFeature())).save_to_disk(str(root / "bench_b"))
    tsv_file(root / "clean.tsv", [(f"k{i}", encode(smooth_image(400 + i), "PNG"), clean_question(rng)) for i in range(4)])
    return root


PLANTED = {
    ("exact_image", "t2", "bench_a.tsv:e_img"),
    ("exact_question", "t5", "bench_a.tsv:e_q"),
    ("near_image", "t7", "bench_a.tsv:e_near_img"),
    ("near_question", "t9", "bench_a.tsv:e_near_q"),
    ("exact_image", "t3", "bench_b:b_img"),
}


@pytest.fixture(scope="module")
def result(files):
    return audit([files / "train.jsonl"], [files / "bench_a.tsv", files / "bench_b"])


def test_exactly_the_planted_pairs_are_reported(result):
    pairs = audit_json(result)["pairs"]
    assert {(p["kind"], p["train_id"], p["eval_id"]) for p in pairs} == PLANTED
    assert len(pairs) == len(PLANTED)  # no pair twice (an exact image is not also a near image)


def test_scores_exact_one_near_image_hash_similarity_near_question_jaccard(result):
    scores = {p["kind"]: p["score"] for p in audit_json(result)["pairs"] if p["eval_id"].startswith("bench_a")}
    assert scores["exact_image"] == scores["exact_question"] == 1.0
    assert 1 - max_hamming_bits(DEFAULT_IMAGE_THRESHOLD) / 64 <= scores["near_image"] < 1.0
    assert scores["near_question"] == pytest.approx(8 / 10)


def test_a_row_that_cannot_be_read_is_listed_and_left_out(result):
    report = audit_json(result)
    assert len(report["unreadable"]["eval"]) == 1 and "index=e_bad" in report["unreadable"]["eval"][0]
    assert report["rows"] == {"train": N_TRAIN, "eval": 10 + 5}
    assert report["inputs"]["eval"][0]["id_prefix"] == "bench_a.tsv"


def test_question_normalisation_ignores_case_spacing_punctuation_and_width_but_not_symbols():
    assert normalize_question(EXACT_QUESTION[0]) == normalize_question(EXACT_QUESTION[1]) == "what is the area of triangle abc"
    assert normalize_question("Ｘ＋２＝５") == "x+2=5" != normalize_question("x-2=5")
    assert normalize_question(" ？ ") == ""


def test_near_questions_are_different_texts_above_the_jaccard_threshold():
    train = ["a b c d e", "a b c d e", "q r s t u", ""]
    eval_texts = ["a b c d x", "a b c d e", "q r s t u v w x y z"]
    # 4/6 with texts 0 and 1 (identical texts are exact pairs, not near ones); 5/10 below the threshold
    assert near_question_pairs(train, eval_texts, 0.6) == {(0, 0): 4 / 6, (1, 0): 4 / 6}
    assert near_question_pairs(train, eval_texts, 0.7) == {}


def test_gap_audit_writes_audit_json_and_a_self_contained_report(tmp_path, files, capsys):
    out = tmp_path / "out"
    args = ["audit", "--train", str(files / "train.jsonl"), "--eval", str(files / "bench_a.tsv"), str(files / "bench_b"),
            "--output-dir", str(out), "--no-progress"]
    assert gap_main(args) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"gap audit: {N_TRAIN} train x 15 eval rows: exact_image 2, exact_question 1, near_image 1, "
                           "near_question 1 (1 unreadable rows skipped) in ")
    report = json.loads((out / "audit.json").read_text())
    assert report["counts"] == {"exact_image": 2, "exact_question": 1, "near_image": 1, "near_question": 1}
    page = (out / "report.html").read_text()
    assert "http" not in page and page.count("data:image/jpeg;base64,") == 2 * len(PLANTED)
    assert NEAR_QUESTION[1] in page and "bench_a.tsv:e_near_img" in page
    assert page.index("e_near_img") < page.index("e_near_q")  # near pairs: highest score first
    assert gap_main(args + ["--fail-on-exact"]) == 1


def test_fail_on_exact_passes_without_exact_pairs_and_a_single_file_keeps_bare_ids(tmp_path, files, capsys):
    out = tmp_path / "out"
    args = ["audit", "--train", str(files / "train.jsonl"), "--eval", str(files / "clean.tsv"), "--output-dir", str(out),
            "--no-progress", "--fail-on-exact"]
    assert gap_main(args) == 0
    assert json.loads((out / "audit.json").read_text())["pairs"] == []
    audit_a = audit([files / "train.jsonl"], [files / "bench_a.tsv"])
    assert {p["eval_id"] for p in audit_json(audit_a)["pairs"]} == {"e_img", "e_q", "e_near_img", "e_near_q"}


def test_audit_fails_only_on_the_chosen_kinds(tmp_path, files, capsys):
    out = tmp_path / "out"
    args = ["audit", "--train", str(files / "train.jsonl"), "--eval", str(files / "bench_b"), "--output-dir", str(out),
            "--no-progress"]
    assert gap_main(args) == 0
    assert json.loads((out / "audit.json").read_text())["counts"]["exact_image"] == 1
    assert gap_main(args + ["--fail-on", "exact_question,near_question"]) == 0  # e.g. templated questions
    capsys.readouterr()
    assert gap_main(args + ["--fail-on", "exact_image"]) == 1
    assert "gap audit: 1 exact_image pair(s) found (failing on exact_image); inspect them in " in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_status:
        gap_main(args + ["--fail-on", "exact_images"])
    assert exit_status.value.code == 2
    assert "argument --fail-on: unknown kind(s) ['exact_images']; choose from exact_image," in capsys.readouterr().err


def test_bad_arguments_are_one_error_line(tmp_path, files, capsys):
    base = ["audit", "--train", str(files / "train.jsonl"), "--output-dir", str(tmp_path / "out")]
    assert gap_main(base + ["--eval", str(tmp_path / "missing.tsv")]) == 2
    assert "missing.tsv: no such file or folder" in capsys.readouterr().err
    assert gap_main(base + ["--eval", str(files / "clean.tsv"), "--image-threshold", "1.5"]) == 2
    assert "--image-threshold must be in (0, 1]" in capsys.readouterr().err
    (tmp_path / "bench.parquet").write_text("not parquet")
    assert gap_main(base + ["--eval", str(tmp_path / "bench.parquet")]) == 2
    assert "bench.parquet: not a readable parquet dataset file" in capsys.readouterr().err


def test_training_rows_with_images_outside_their_folder_are_refused_unless_allowed(tmp_path, files, capsys):
    sub = tmp_path / "data"
    sub.mkdir()
    outside = project_row("o0", "What is in the outside picture?", str(files / "img" / "t0.png"))  # absolute, elsewhere
    (sub / "train.jsonl").write_text(json.dumps(outside) + "\n")
    base = ["audit", "--train", str(sub / "train.jsonl"), "--eval", str(files / "clean.tsv"), "--no-progress"]
    assert gap_main(base + ["--output-dir", str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error:") and "--allow-outside-image-dir" in error
    assert not (tmp_path / "refused").exists()
    assert gap_main(base + ["--output-dir", str(tmp_path / "allowed"), "--allow-outside-image-dir"]) == 0
    assert json.loads((tmp_path / "allowed" / "audit.json").read_text())["pairs"] == []
