"""gap difficulty: exact pass rates from a stub sampler, resume, shards + merge, gold answers, the tiny model."""

import json
import math
import textwrap

import datasets
import pytest

from gap_pipeline import cli
from gap_pipeline.answers import AnswerError, DefaultAnswerChecker, gold_answer
from gap_pipeline.difficulty import (
    DifficultyError,
    HFSampler,
    SamplerSettings,
    estimate_difficulty,
    load_sampler,
    merge_results,
    read_results,
    results_path,
    shard_rows,
)
from gap_pipeline.provenance import ProvenanceError

N = 4
NUM_ROWS = 11


def _rows(num_rows=NUM_ROWS):
    """Text-only questions; row i's gold answer is str(10 + i)."""
    return [
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": f"What is {i} plus ten?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"<answer>{10 + i}</answer>"}]},
            ],
            "answer": str(10 + i),
        }
        for i in range(num_rows)
    ]


def _expected_correct(index):
    return index % (N + 1)  # row i: i mod 5 of the 4 samples are right


def _stub_answers(index, n=N):
    gold = 10 + index
    right = _expected_correct(index)
    return [f"The answer is {gold}." for _ in range(right)] + [f"The answer is {gold + 1}." for _ in range(n - right)]


class StubSampler:
    """Known answers per row; records the rows of every call; raises once `fail_after_rows` rows were sampled."""

    def __init__(self, fail_after_rows=None):
        self.calls = []
        self.fail_after_rows = fail_after_rows

    @property
    def sampled_rows(self):
        return [row for call in self.calls for row in call]

    def sample(self, questions, n):
        if self.fail_after_rows is not None and len(self.sampled_rows) >= self.fail_after_rows:
            raise KeyboardInterrupt("stub interrupted")
        self.calls.append([q.index for q in questions])
        return [_stub_answers(q.index, n) for q in questions]


@pytest.fixture
def dataset():
    return datasets.Dataset.from_list(_rows())


def _run(dataset, out, sampler, **kwargs):
    kwargs.setdefault("num_samples", N)
    kwargs.setdefault("rows_per_batch", 3)
    return estimate_difficulty(dataset, sampler, DefaultAnswerChecker(), out, **kwargs)


def test_stub_sampler_gives_exactly_the_expected_accuracy_per_row(tmp_path, dataset):
    report = _run(dataset, tmp_path, StubSampler())
    assert report.complete and report.sampled_rows == NUM_ROWS
    merged = merge_results(dataset, tmp_path)
    out = datasets.load_from_disk(str(merged.path))
    assert out["num_correct"] == [_expected_correct(i) for i in range(NUM_ROWS)]
    assert out["num_samples"] == [N] * NUM_ROWS
    assert out["accuracy"] == [_expected_correct(i) / N for i in range(NUM_ROWS)]
    assert out["messages"] == dataset["messages"]  # the other columns are kept as they were
    assert merged.latent_rows == sum(1 for i in range(NUM_ROWS) if _expected_correct(i) == 0)
    assert merged.mean_accuracy == pytest.approx(sum(_expected_correct(i) for i in range(NUM_ROWS)) / N / NUM_ROWS)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rows"] == NUM_ROWS and summary["latent_rows"] == merged.latent_rows


def test_interrupted_run_resumes_without_sampling_finished_rows_again(tmp_path, dataset):
    first = StubSampler(fail_after_rows=6)  # two batches of three rows, then the "crash"
    with pytest.raises(KeyboardInterrupt):
        _run(dataset, tmp_path, first)
    assert sorted(read_results(tmp_path)) == list(range(6))

    second = StubSampler()
    report = _run(dataset, tmp_path, second)
    assert report.already_done == 6 and report.sampled_rows == NUM_ROWS - 6
    assert sorted(second.sampled_rows) == list(range(6, NUM_ROWS))  # no finished row sampled again

    third = StubSampler()
    assert _run(dataset, tmp_path, third).sampled_rows == 0 and third.calls == []

    resumed = datasets.load_from_disk(str(merge_results(dataset, tmp_path).path))
    assert resumed["accuracy"] == [_expected_correct(i) / N for i in range(NUM_ROWS)]


def test_a_torn_last_line_is_cut_off_and_its_row_sampled_again(tmp_path, dataset):
    with pytest.raises(KeyboardInterrupt):
        _run(dataset, tmp_path, StubSampler(fail_after_rows=3))
    path = results_path(tmp_path, 1, 0)
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"row": 3, "num_correct": 1, "num_sa')  # a write the crash cut short
    sampler = StubSampler()
    _run(dataset, tmp_path, sampler)
    assert sorted(sampler.sampled_rows) == list(range(3, NUM_ROWS))
    lines = path.read_text().splitlines()
    assert len(lines) == NUM_ROWS and all(json.loads(line) for line in lines)


def test_shards_partition_rows_and_merge_equals_one_process(tmp_path, dataset):
    single = tmp_path / "single"
    _run(dataset, single, StubSampler())
    expected = datasets.load_from_disk(str(merge_results(dataset, single).path))

    sharded = tmp_path / "sharded"
    samplers = []
    for shard in range(3):
        sampler = StubSampler()
        report = _run(dataset, sharded, sampler, num_shards=3, shard_index=shard)
        samplers.append(sampler)
        assert report.complete == (shard == 2)
    rows = [sorted(s.sampled_rows) for s in samplers]
    assert rows == [shard_rows(NUM_ROWS, 3, i) for i in range(3)]
    assert sorted(r for shard in rows for r in shard) == list(range(NUM_ROWS))  # disjoint and complete
    merged = datasets.load_from_disk(str(merge_results(dataset, sharded).path))
    for column in ("accuracy", "num_correct", "num_samples"):
        assert merged[column] == expected[column]


def test_merge_before_every_row_is_done_names_the_missing_rows(tmp_path, dataset):
    _run(dataset, tmp_path, StubSampler(), num_shards=2, shard_index=0)
    with pytest.raises(DifficultyError, match=r"5 of 11 rows have no result yet \(first: \[1, 3, 5, 7, 9\]\)"):
        merge_results(dataset, tmp_path)


def test_gold_answer_comes_from_the_answer_column_else_the_answer_block():
    row = _rows(1)[0]
    assert gold_answer(row, 0) == "10"
    row["answer"] = None
    row["messages"][1]["content"][0]["text"] = "<think>2+2</think><answer> 4 </answer> more <answer>42</answer>"
    assert gold_answer(row, 0) == "42"
    row["messages"][1]["content"][0]["text"] = "no block here"
    with pytest.raises(AnswerError, match=r"row 7 has no gold answer.*--answer-column"):
        gold_answer(row, 7)


def test_a_row_without_gold_answer_fails_before_any_sampling(tmp_path):
    rows = _rows(3)
    rows[2]["answer"] = ""
    rows[2]["messages"][1]["content"][0]["text"] = "I think it is 12"
    sampler = StubSampler()
    with pytest.raises(AnswerError, match="row 2 has no gold answer"):
        _run(datasets.Dataset.from_list(rows), tmp_path, sampler)
    assert sampler.calls == []


def test_restart_with_other_settings_is_refused(tmp_path, dataset):
    config = {"dataset": "d", "num_rows": NUM_ROWS, "num_samples": N, "temperature": 1.0, "seed": 0}
    _run(dataset, tmp_path, StubSampler(fail_after_rows=100), run_config=config)
    with pytest.raises(ProvenanceError, match=r"sampled answers of another run \(temperature was 1.0, now 0.7\)"):
        _run(dataset, tmp_path, StubSampler(), run_config={**config, "temperature": 0.7})


def test_a_sampler_returning_the_wrong_number_of_answers_is_an_error(tmp_path, dataset):
    class Short:
        def sample(self, questions, n):
            return [["The answer is 1."] * (n - 1) for _ in questions]

    with pytest.raises(DifficultyError, match="responses for row 0; expected 4"):
        _run(dataset, tmp_path, Short())


_SAMPLER_FILE = '''
import json, os

class Stub:
    def __init__(self, settings):
        self.settings = settings

    def sample(self, questions, n):
        with open(os.environ["GAP_STUB_LOG"], "a") as log:
            log.write(json.dumps([q.index for q in questions]) + "\\n")
        out = []
        for q in questions:
            gold = int(q.answer)
            right = (gold - 10) % (n + 1)
            out.append([f"The answer is {gold}."] * right + ["The answer is -1."] * (n - right))
        return out
'''


def test_cli_shards_merge_automatically_when_the_last_one_finishes(tmp_path, dataset, monkeypatch, capsys):
    data_dir = tmp_path / "data"
    dataset.save_to_disk(str(data_dir))
    sampler_file = tmp_path / "stub_sampler.py"
    sampler_file.write_text(textwrap.dedent(_SAMPLER_FILE))
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("GAP_STUB_LOG", str(log))
    out = tmp_path / "run"
    common = ["difficulty", "--dataset", str(data_dir), "--output-dir", str(out), "--num-samples", str(N),
              "--sampler", f"{sampler_file}:Stub", "--no-progress", "--num-shards", "2"]
    assert cli.main(common + ["--shard-index", "1"]) == 0
    assert not (out / "dataset").exists()
    assert "5/11 rows done" in capsys.readouterr().out
    assert cli.main(common + ["--shard-index", "0"]) == 0
    summary = capsys.readouterr().out
    assert "difficulty: 11 rows, 4 samples each" in summary and "accuracy <= tau=0" in summary
    merged = datasets.load_from_disk(str(out / "dataset"))
    assert merged["accuracy"] == [_expected_correct(i) / N for i in range(NUM_ROWS)]
    calls = [row for line in log.read_text().splitlines() for row in json.loads(line)]
    assert sorted(calls) == list(range(NUM_ROWS))
    # --merge alone rewrites the dataset (here as JSONL) from the results, sampling nothing
    assert cli.main(["difficulty", "--dataset", str(data_dir), "--output-dir", str(out), "--merge",
                     "--output-dataset", str(tmp_path / "with_accuracy.jsonl")]) == 0
    written = [json.loads(line) for line in (tmp_path / "with_accuracy.jsonl").read_text().splitlines()]
    assert [row["num_correct"] for row in written] == [_expected_correct(i) for i in range(NUM_ROWS)]
    assert [row for line in log.read_text().splitlines() for row in json.loads(line)] == calls  # no new calls


_KILLED_MERGE = """
import sys, time
from pathlib import Path

import datasets

from gap_pipeline.cli import main

reached = Path(sys.argv[1])
save = datasets.Dataset.save_to_disk


def half_written(self, path, *args, **kwargs):  # the output dataset written, the merge not yet finished
    save(self, path, *args, **kwargs)
    reached.touch()
    time.sleep(600)


datasets.Dataset.save_to_disk = half_written
sys.exit(main(sys.argv[2:]))
"""


def test_difficulty_killed_while_merging_reruns_to_the_result_of_an_uninterrupted_run(tmp_path, dataset, capsys):
    import os
    import sys

    from tests.support import REPO, clean_env, paused_then_killed

    data_dir = tmp_path / "data"
    dataset.save_to_disk(str(data_dir))
    sampler_file = tmp_path / "stub_sampler.py"
    sampler_file.write_text(textwrap.dedent(_SAMPLER_FILE))
    env = dict(clean_env(), GAP_STUB_LOG=str(tmp_path / "calls.jsonl"))
    os.environ["GAP_STUB_LOG"] = env["GAP_STUB_LOG"]

    def args(out):
        return ["difficulty", "--dataset", str(data_dir), "--output-dir", str(tmp_path / out), "--num-samples", str(N),
                "--sampler", f"{sampler_file}:Stub", "--no-progress"]

    try:
        assert cli.main(args("reference")) == 0
        (tmp_path / "killed.py").write_text(_KILLED_MERGE)
        reached = tmp_path / "reached"
        command = [sys.executable, str(tmp_path / "killed.py"), str(reached), *args("run")]
        with paused_then_killed(command, reached, timeout=300, cwd=str(REPO), env=env):
            pass
        assert not (tmp_path / "run" / "dataset").exists()  # never a half-written output
        capsys.readouterr()
        assert cli.main(args("run")) == 0  # the lock the killed merge held is not taken for a live merge
        out = capsys.readouterr().out
        assert "another process is merging" not in out and f"wrote {tmp_path / 'run' / 'dataset'}" in out
    finally:
        del os.environ["GAP_STUB_LOG"]
    merged, reference = (datasets.load_from_disk(str(tmp_path / name / "dataset")) for name in ("run", "reference"))
    assert merged.to_list() == reference.to_list()
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in (tmp_path / "reference").iterdir() if not p.name.startswith("."))


def test_difficulty_settings_change_freely_before_any_row_is_done_and_with_overwrite(tmp_path, dataset, monkeypatch,
                                                                                     capsys):
    data_dir = tmp_path / "data"
    dataset.save_to_disk(str(data_dir))
    sampler_file = tmp_path / "stub_sampler.py"
    sampler_file.write_text(textwrap.dedent(_SAMPLER_FILE) + textwrap.dedent("""
        class Broken:
            def __init__(self, settings):
                pass

            def sample(self, questions, n):
                raise RuntimeError("out of memory")
        """))
    monkeypatch.setenv("GAP_STUB_LOG", str(tmp_path / "calls.jsonl"))
    out = tmp_path / "run"

    def args(sampler, *extra):
        return ["difficulty", "--dataset", str(data_dir), "--output-dir", str(out), "--num-samples", str(N),
                "--sampler", f"{sampler_file}:{sampler}", "--no-progress", *extra]

    with pytest.raises(RuntimeError, match="out of memory"):  # run.json recorded, no row done
        cli.main(args("Broken", "--temperature", "0.5"))
    assert cli.main(args("Stub", "--temperature", "0.7")) == 0
    captured = capsys.readouterr()
    assert "recorded other settings (sampler was" in captured.err
    assert "temperature was 0.5, now 0.7) but no row was done: recording this run's" in captured.err
    assert "11 sampled" in captured.out
    assert cli.main(args("Stub", "--temperature", "0.9")) == 2  # rows done: kept unless --overwrite
    assert "temperature was 0.7, now 0.9); resume with the same settings, pass --overwrite" in capsys.readouterr().err
    assert cli.main(args("Stub", "--temperature", "0.9", "--overwrite")) == 0
    assert "0 already done, 11 sampled" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["temperature"] == 0.9
    assert datasets.load_from_disk(str(out / "dataset"))["accuracy"] == [_expected_correct(i) / N for i in range(NUM_ROWS)]


def test_merge_reports_replaced_columns_only_when_they_held_values(tmp_path, dataset):
    from gap_pipeline.difficulty import format_summary

    _run(dataset, tmp_path / "a", StubSampler())
    empty = dataset.add_column("accuracy", [None] * NUM_ROWS)  # what a JSONL without `accuracy` loads as
    assert "replaced existing columns" not in format_summary(merge_results(empty, tmp_path / "a"))
    held = dataset.add_column("accuracy", [0.5] * NUM_ROWS)
    assert "replaced existing columns ['accuracy']" in format_summary(merge_results(held, tmp_path / "a"))


def test_cli_reports_bad_shard_arguments(tmp_path, dataset, capsys):
    data_dir = tmp_path / "data"
    dataset.save_to_disk(str(data_dir))
    status = cli.main(["difficulty", "--dataset", str(data_dir), "--output-dir", str(tmp_path / "o"),
                       "--num-shards", "2", "--shard-index", "2"])
    assert status == 2 and "--shard-index must be in [0, 1]" in capsys.readouterr().err


def test_load_sampler_accepts_an_object_or_a_factory(tmp_path):
    path = tmp_path / "samplers.py"
    path.write_text("class F:\n    def __init__(self, settings):\n        self.t = settings.temperature\n"
                    "    def sample(self, questions, n):\n        return []\n"
                    "instance = F(type('S', (), {'temperature': 0.5})())\nnot_a_sampler = 3\n")
    settings = SamplerSettings(model=None, temperature=0.3)
    assert load_sampler(f"{path}:F", settings).t == 0.3
    assert load_sampler(f"{path}:instance", settings).t == 0.5
    with pytest.raises(DifficultyError, match="is a int"):
        load_sampler(f"{path}:not_a_sampler", settings)
    with pytest.raises(DifficultyError, match="has no attribute 'missing'"):
        load_sampler(f"{path}:missing", settings)


def test_tiny_model_sampling_wiring(tmp_path, tiny_base_dir, tiny_image):
    rows = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"How many red cells? {i}"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "<answer>2</answer>"}]},
            ],
            "images": [tiny_image(seed=i)],
        }
        for i in range(3)
    ]
    dataset = datasets.Dataset.from_list(rows)
    settings = SamplerSettings(model=str(tiny_base_dir), max_new_tokens=6, seed=1, device="cpu")
    sampler = HFSampler(settings)
    report = estimate_difficulty(dataset, sampler, DefaultAnswerChecker(), tmp_path, num_samples=3, rows_per_batch=2,
                                 save_responses=True)
    assert report.complete
    results = read_results(tmp_path)
    for row in range(3):
        record = results[row]
        assert record["num_samples"] == 3 and len(record["responses"]) == 3 and record["answer"] == "2"
        assert all(isinstance(text, str) for text in record["responses"])
        assert math.isfinite(record["accuracy"]) and 0.0 <= record["accuracy"] <= 1.0
    responses = [results[row]["responses"] for row in range(3)]
    assert len({text for texts in responses for text in texts}) > 1  # sampled, not one greedy answer
    # same seed, same batches: the same samples again
    again = tmp_path / "again"
    estimate_difficulty(dataset, sampler, DefaultAnswerChecker(), again, num_samples=3, rows_per_batch=2,
                        save_responses=True)
    assert [read_results(again)[row]["responses"] for row in range(3)] == responses
    merged = datasets.load_from_disk(str(merge_results(dataset, tmp_path).path))
    assert merged["num_samples"] == [3, 3, 3] and len(merged["images"]) == 3


# The question of a row (shared with norm-profile and evaluate) ------------------------------------------


def test_question_is_the_turns_before_the_first_assistant_turn_with_their_images(tmp_path, tiny_processor, tiny_image):
    from gap_pipeline.inference import load_rows, prompt_of_row

    tiny_image(seed=1).save(tmp_path / "q.png")
    tiny_image(seed=2).save(tmp_path / "aux.png")
    row = {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many red cells?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "<latent> so <answer>2</answer>"}]},
            {"role": "user", "content": "And blue?"},
        ],
        "images": ["q.png"],
        "aux_images": ["aux.png"],
        "answer": "2",
    }
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    dataset = load_rows(tmp_path / "rows.jsonl")
    messages, images = prompt_of_row(dataset[0], 0)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert all(None not in part.values() for m in messages for part in m["content"])  # Arrow's None keys dropped
    assert len(images) == 1 and images[0].mode == "RGB" and images[0].size == (112, 112)
    prompt = tiny_processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.count("<|vision_start|>") == 1 and "How many red cells?" in prompt and "And blue?" not in prompt
    assert prompt.endswith("<|im_start|>assistant\n") and "<answer>" not in prompt


def test_bad_question_rows_name_the_row_and_the_fix(tmp_path):
    from gap_pipeline.inference import RowError, prompt_of_row

    no_user = {"messages": [{"role": "assistant", "content": [{"type": "text", "text": "hi"}]}]}
    with pytest.raises(RowError, match="row 4 has no user turn before its first assistant turn"):
        prompt_of_row(no_user, 4)
    missing = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}], "images": ["a.png"]}
    with pytest.raises(RowError, match=r"row 5: its question refers to 2 image\(s\) but 'images' holds 1"):
        prompt_of_row(missing, 5)
    gone = {"messages": [{"role": "user", "content": [{"type": "image"}]}], "images": ["nowhere.png"]}
    with pytest.raises(RowError, match="row 6, image 0: image file .*nowhere.png does not exist"):
        prompt_of_row(gone, 6, base_dir=tmp_path)


def test_questions_carry_the_row_without_aux_images_or_latent_targets(tmp_path):
    rows = _rows(2)
    for row in rows:
        row["aux_images"] = ["never/read.png"]
        row["latent_targets"] = [[0.5] * 4]
        row["options"] = ["10", "11"]
    seen = []

    class Recorder:
        def sample(self, questions, n):
            seen.extend(sorted(q.row) for q in questions)
            return [_stub_answers(q.index, n) for q in questions]

    _run(datasets.Dataset.from_list(rows), tmp_path, Recorder())
    assert seen == [["answer", "messages", "options"]] * 2


def test_a_failing_checker_is_reported_with_the_row(tmp_path, dataset):
    def checker(response, gold, row):
        if gold == "13":
            raise KeyError("options")
        return False

    with pytest.raises(DifficultyError, match=r"answer checker failed on row 3 \(gold '13'\): KeyError"):
        estimate_difficulty(dataset, StubSampler(), checker, tmp_path, num_samples=N, rows_per_batch=2)
    assert sorted(read_results(tmp_path)) == [0, 1]  # the batch before it was kept


def test_messages_stored_as_json_follow_one_rule_for_the_gold_answer_and_the_question():
    """Parquet and TSV exports store the messages as a JSON string: the gold answer and the question read them alike,
    and a string that is not JSON is the same error naming the row for both (it was 'no gold answer' for one)."""
    import json

    from gap_pipeline.inference import RowError, prompt_of_row

    row = _rows(1)[0]
    row["answer"] = None
    row["messages"][1]["content"][0]["text"] = "<answer>42</answer>"
    row = {**row, "messages": json.dumps(row["messages"]), "images": []}
    assert gold_answer(row, 0) == "42"
    assert prompt_of_row(row, 0)[0][0]["role"] == "user"
    row["messages"] = row["messages"][:-1]
    with pytest.raises(AnswerError, match=r"row 3: 'messages' is a string that is not JSON"):
        gold_answer(row, 3)
    with pytest.raises(RowError, match=r"row 3: 'messages' is a string that is not JSON"):
        prompt_of_row(row, 3)
