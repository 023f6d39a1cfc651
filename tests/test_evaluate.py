"""`gap evaluate`: accuracy per intervention, resume, data parallelism, malformed benchmark rows."""

import base64
import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from gap_pipeline.evaluate import evaluate, finalize, load_tsv_items
from tests.support import GOLDS, engineered_gap, free_port, png_base64, write_tsv

REPO = Path(__file__).resolve().parents[1]


def _run_cli(*args, launcher=None, timeout=600):
    command = (launcher or [sys.executable, "-m", "gap_pipeline"]) + ["evaluate", *map(str, args)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_summary_equals_hand_computed_accuracy_for_each_intervention(tmp_path, engineered_dir, benchmark_tsv):
    out = tmp_path / "eval"
    run = _run_cli("--model", engineered_dir, "--data", benchmark_tsv, "--output-dir", out, "--max-new-tokens", 1,
                   "--batch-size", 4, "--no-progress")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = {row["intervention"]: row for row in json.loads((out / "summary.json").read_text())}
    assert list(summary) == ["pca", "suppress", "noise", "hidden", "hidden_ema"]
    expected_suppress = sum(gold == "C" for gold in GOLDS) / len(GOLDS)  # suppress answers "C" everywhere
    for intervention, row in summary.items():
        assert row["n"] == len(GOLDS) and row["budget"] == 4
        if intervention == "suppress":
            assert row["accuracy"] == pytest.approx(expected_suppress) and row["span_rate"] == 0.0
        else:  # a span opens at once and max_new_tokens=1 ends inside it: no answer
            assert row["accuracy"] == 0.0 and row["span_rate"] == 1.0
        assert row["mean_seconds"] > 0 and row["p50_seconds"] > 0 and row["p90_seconds"] >= row["p50_seconds"]
        assert row["mean_vision_norm"] > 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 5 * len(GOLDS)
    suppressed = [r for r in records if r["intervention"] == "suppress"]
    assert [r["id"] for r in suppressed] == [str(100 + i) for i in range(len(GOLDS))]
    assert all(r["extracted"] == "C" and r["correct"] == (r["gold"] == "C") for r in suppressed)
    assert {"id", "prediction", "extracted", "correct", "latent_spans", "latent_span_norms", "seconds"} <= set(records[0])
    assert "| suppress | 4 | 6 | 0.500 |" in (out / "summary.md").read_text()


def test_interrupted_run_resumes_without_regenerating_finished_rows(tmp_path, benchmark_tsv):
    model, processor = engineered_gap()
    items, problems = load_tsv_items(benchmark_tsv)
    assert problems == [] and len(items) == len(GOLDS)
    out = tmp_path / "eval"

    class Interrupt(Exception):
        pass

    calls = {"n": 0}

    def flaky_checker(response, gold, row):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Interrupt  # mid second batch: rows 0-2 are on disk
        return response.strip() == gold

    generated_rows = []
    original = model.generate

    def counting_generate(*args, **kwargs):
        generated_rows.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    with mock.patch.object(model, "generate", side_effect=counting_generate):
        with pytest.raises(Interrupt):
            evaluate(model, processor, items, out, is_gap=True, interventions=["suppress"], batch_size=2,
                     max_new_tokens=1, checker=flaky_checker, progress=False)
        finished = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        assert [r["id"] for r in finished] == ["100", "101", "102"]
        generated_rows.clear()
        written = evaluate(model, processor, items, out, is_gap=True, interventions=["suppress"], batch_size=2,
                           max_new_tokens=1, checker=lambda response, gold, row: response.strip() == gold,
                           progress=False)
    assert sum(generated_rows) == len(GOLDS) - 3  # only the unfinished rows were generated again
    assert [r["id"] for r in written] == ["103", "104", "105"]
    rows = finalize(out, [item.id for item in items])
    assert rows[0]["n"] == len(GOLDS)
    assert rows[0]["accuracy"] == pytest.approx(sum(g == "C" for g in GOLDS) / len(GOLDS))


def test_two_processes_give_the_same_predictions_as_one(tmp_path, engineered_dir, benchmark_tsv):
    common = ["--model", engineered_dir, "--data", benchmark_tsv, "--interventions", "pca,suppress",
              "--max-new-tokens", 6, "--batch-size", 2, "--no-progress"]
    one = _run_cli(*common, "--output-dir", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                "-m", "gap_pipeline"]
    two = _run_cli(*common, "--output-dir", tmp_path / "two", launcher=torchrun)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "on 2 process(es)" in two.stdout

    def load(path):
        records = [json.loads(line) for line in (path / "predictions.jsonl").read_text().splitlines()]
        return [(r["id"], r["intervention"], r["prediction"], r["correct"], r["latent_spans"]) for r in records]

    assert load(tmp_path / "two") == load(tmp_path / "one")
    assert not list((tmp_path / "two").glob("predictions.rank*.jsonl"))


def test_malformed_tsv_rows_are_reported_by_index_and_skipped_or_refused(tmp_path, engineered_dir, tiny_image):
    good = {"image": png_base64(tiny_image()), "question": "How many?", "A": "1", "B": "2", "C": "3", "D": "4"}
    rows = [
        {"index": 1, **good, "answer": "C"},
        {"index": 2, **good, "image": "", "answer": "A"},
        {"index": 3, **good, "image": "not*base64!", "answer": "B"},
        {"index": 4, **good, "answer": ""},
        {"index": 5, **good, "image": base64.b64encode(b"plain text").decode(), "answer": "C"},
    ]
    tsv = write_tsv(tmp_path / "bad.tsv", rows)
    items, problems = load_tsv_items(tsv)
    assert [item.id for item in items] == ["1"]
    assert len(problems) == 4
    assert "index=2" in problems[0] and "no image" in problems[0]
    assert "index=3" in problems[1] and "not valid base64" in problems[1]
    assert "index=4" in problems[2] and "no answer" in problems[2]
    assert "index=5" in problems[3] and "not an image" in problems[3]

    refused = _run_cli("--model", engineered_dir, "--data", tsv, "--output-dir", tmp_path / "refused",
                       "--on-bad-row", "error", "--max-new-tokens", 1, "--no-progress")
    assert refused.returncode == 2 and "index=3" in refused.stderr
    assert not (tmp_path / "refused" / "predictions.jsonl").exists()

    skipped = _run_cli("--model", engineered_dir, "--data", tsv, "--output-dir", tmp_path / "skipped",
                       "--interventions", "suppress", "--max-new-tokens", 1, "--no-progress")
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert "index=2" in skipped.stderr and "4 bad rows skipped" in skipped.stdout
    scored = [json.loads(line)["id"] for line in (tmp_path / "skipped" / "predictions.jsonl").read_text().splitlines()]
    assert scored == ["1"]


def test_dataset_in_the_project_schema_is_evaluated_with_its_gold_answers(tmp_path, engineered_dir):
    from gap_pipeline.demo_task import generate_split

    data = generate_split(tmp_path / "data", "test", 5, seed=1)
    run = _run_cli("--model", engineered_dir, "--data", data, "--output-dir", tmp_path / "eval", "--interventions",
                   "suppress", "--max-new-tokens", 1, "--no-progress")
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert [(r["id"], r["gold"]) for r in records] == [(row["id"], row["answer"]) for row in rows]
    assert all(r["prediction"] == "C" and not r["correct"] for r in records)  # digits 0-4 are never "C"


def test_latent_fidelity_against_the_rows_targets_and_the_oracle_upper_bound(tmp_path, tiny_image):
    """Rows that carry targets get cosine and relative squared error of the written latents per span and slot;
    `oracle` feeds the targets and scores what the head wrote from them."""
    from gap_pipeline.evaluate import EvalItem

    model, processor = engineered_gap()  # h_bar is the same vector everywhere: the head writes one latent
    K = model.config.latent_tokens_per_span
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour?"}]}]
    items = [EvalItem(str(i), messages, [tiny_image(seed=i)], "C") for i in range(3)]
    common = dict(is_gap=True, batch_size=2, max_new_tokens=K + 3, progress=False)
    evaluate(model, processor, items, tmp_path / "plain", interventions=("pca",), **common)
    records = [json.loads(line) for line in (tmp_path / "plain" / "predictions.jsonl").read_text().splitlines()]
    assert all("latent_fidelity" not in r for r in records)  # no targets: nothing to compare

    with torch.no_grad():
        captured = []
        handle = model.model.language_model.norm.register_forward_hook(lambda m, i, o: captured.append(o[0, -1]))
        model(**processor.tokenizer(["x"], return_tensors="pt"))
        handle.remove()
        written = model.latent_head(captured[0]).float()  # what every pad step feeds under pca
    for i, item in enumerate(items):  # targets 2x the written latent: cosine 1, RelSE |v - 2v|^2 / |2v|^2 = 1/4
        item.latent_targets = (2 * written).expand(K, -1).numpy() if i < 2 else None  # the third row has none
    evaluate(model, processor, items, tmp_path / "targets", interventions=("pca",), **common)
    evaluate(model, processor, items[:2], tmp_path / "targets", interventions=("oracle",), **common)
    rows = {r["intervention"]: r for r in finalize(tmp_path / "targets", [item.id for item in items])}
    for intervention in ("pca", "oracle"):
        row = rows[intervention]
        assert row["fidelity_spans"] == 2
        assert row["latent_cosine"] == pytest.approx(1.0, abs=1e-3)
        assert row["latent_relse"] == pytest.approx(0.25, abs=1e-3)
        assert row["latent_relse_per_slot"] == pytest.approx([0.25] * K, abs=1e-3)
    records = [json.loads(line) for line in (tmp_path / "targets" / "predictions.jsonl").read_text().splitlines()]
    oracle = {r["id"]: r for r in records if r["intervention"] == "oracle"}
    assert oracle["0"]["latent_span_norms"][0] == pytest.approx(2 * written.norm().item(), rel=1e-5)  # fed targets
    assert "latent_fidelity" not in next(r for r in records if r["id"] == "2")
    assert "| latent cos | latent RelSE |" in (tmp_path / "targets" / "summary.md").read_text()


def test_oracle_needs_rows_with_targets(tmp_path, engineered_dir):
    from gap_pipeline.demo_task import generate_split

    data = generate_split(tmp_path / "data", "test", 3, seed=1)
    run = _run_cli("--model", engineered_dir, "--data", data, "--output-dir", tmp_path / "eval", "--interventions",
                   "pca,oracle", "--max-new-tokens", 1, "--no-progress")
    assert run.returncode == 2
    assert "run `gap targets` on the evaluation rows" in run.stderr and "['test-0', 'test-1', 'test-2']" in run.stderr


def test_a_user_error_prints_one_error_line_and_exits_2(tmp_path, engineered_dir, capsys):
    from gap_pipeline import cli

    missing = tmp_path / "bench.tsv"
    status = cli.main(["evaluate", "--model", str(engineered_dir), "--data", str(missing), "--output-dir",
                       str(tmp_path / "out")])
    assert status == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {missing}: no such TSV file"]
    with pytest.raises(SystemExit) as exit_status:  # a bad value is argparse's error: usage, then one error line
        cli.main(["evaluate", "--model", str(engineered_dir), "--data", str(missing), "--output-dir",
                  str(tmp_path / "out"), "--budgets", "4,5"])
    err = capsys.readouterr().err.splitlines()
    assert exit_status.value.code == 2 and err[-1].startswith("gap evaluate: error: argument --budgets: `K`=5")


def test_evaluate_help_shows_the_defaults(capsys):
    from gap_pipeline import cli

    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    for shown in ("rows generated together (default: 8;", "latent tokens included (default: 256)",
                  "(default: all but oracle", "(default: the checkpoint's K)", "(default: 0)", "(default: skip)",
                  "(default: all)", "(default: auto = the checkpoint's)"):
        assert shown in text, shown
