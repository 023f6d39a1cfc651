"""`gap lmms-task`: the lmms-eval task folder it writes gives the model the rows' images and question text, and
scores with the project's answer checker (lmms-eval itself runs in tests/harness)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _gap(*args):
    return subprocess.run([sys.executable, "-m", "gap_pipeline", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def _task_module(task_dir, name):
    spec = importlib.util.spec_from_file_location(f"{name}_utils", task_dir / f"{name}_utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_task_folder_holds_the_rows_images_prompts_and_scores_with_the_answer_checker(tmp_path, benchmark_tsv):
    from gap_pipeline.evaluate import load_tsv_items

    run = _gap("lmms-task", "--data", benchmark_tsv, "--output-dir", tmp_path / "task", "--name", "bench_t",
               "--max-new-tokens", 32)
    assert run.returncode == 0, run.stderr[-2000:]
    yaml_text = (tmp_path / "task" / "bench_t.yaml").read_text()
    assert "reasoning_tags: none" in yaml_text and "max_new_tokens: 32" in yaml_text and "task: bench_t" in yaml_text
    docs = [json.loads(line) for line in (tmp_path / "task" / "docs.jsonl").read_text().splitlines()]
    items, _ = load_tsv_items(benchmark_tsv)
    assert [doc["id"] for doc in docs] == [item.id for item in items]
    utils = _task_module(tmp_path / "task", "bench_t")
    for doc, item in zip(docs, items):
        assert utils.doc_to_text(doc) == item.messages[0]["content"][1]["text"]
        (image,) = utils.doc_to_visual(doc)
        assert np.array_equal(np.asarray(image), np.asarray(item.images[0]))  # PNG: the pixels `gap evaluate` sees
        assert utils.process_results(doc, [f"<answer>{item.gold}</answer>"]) == {"accuracy": 1.0}
        wrong = next(letter for letter in "ABCD" if letter != item.gold)
        assert utils.process_results(doc, [wrong]) == {"accuracy": 0.0}


def test_rows_whose_question_is_not_one_user_turn_are_refused_naming_the_row(tmp_path, tiny_image):
    image = tmp_path / "q.png"
    tiny_image(seed=0).save(image)
    row = {"id": "two-turns", "images": [str(image)], "answer": "3", "messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]}
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(row) + "\n")
    run = _gap("lmms-task", "--data", data, "--output-dir", tmp_path / "task", "--name", "rows")
    assert run.returncode == 2 and "row two-turns" in run.stderr and "single user turn" in run.stderr


def test_an_image_outside_the_data_folder_is_refused_unless_allowed(tmp_path):
    from PIL import Image

    (tmp_path / "data").mkdir()
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (56, 56), (200, 10, 10)).save(tmp_path / "elsewhere" / "a.png")
    row = {"id": "r0", "images": ["../elsewhere/a.png"], "answer": "red",
           "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
                        {"role": "assistant", "content": "<answer>red</answer>"}]}
    data = tmp_path / "data" / "test.jsonl"
    data.write_text(json.dumps(row) + "\n")
    refused = _gap("lmms-task", "--data", data, "--output-dir", tmp_path / "task", "--name", "t")
    assert refused.returncode == 2
    assert "leaves the image folder" in refused.stderr and "--allow-outside-image-dir" in refused.stderr
    allowed = _gap("lmms-task", "--data", data, "--output-dir", tmp_path / "task", "--name", "t",
                   "--allow-outside-image-dir")
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads((tmp_path / "task" / "docs.jsonl").read_text())["images"] == ["images/000000_0.png"]
