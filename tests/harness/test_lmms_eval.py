"""The lmms-eval plugin (model `gap`) and `gap lmms-task`: lmms-eval scores a task written from a benchmark
file exactly as `gap evaluate` does. Runs where the `lmms-eval` extra is installed (`make install-harness`).

lmms-eval exits 0 on errors, so these tests read its result files, never its exit code alone.
"""

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="the lmms-eval extra is not installed; run `make install-harness`")

from tests.support import GOLDS  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# every deterministic intervention (noise draws from a generator; the oracle needs the rows' true latents)
INTERVENTIONS = ("pca", "suppress", "hidden", "hidden_ema")
MAX_NEW_TOKENS = 1  # suppress answers "C" at once, the other interventions open a span: both scores occur
BATCH_SIZE = 4


def _gap(*args):
    return subprocess.run([sys.executable, "-m", "gap_pipeline", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def _lmms_eval(task_dir, task, model_args, output):
    command = [sys.executable, "-m", "lmms_eval", "eval", "--model", "gap", "--model_args", model_args,
               "--tasks", task, "--include_path", str(task_dir), "--batch_size", str(BATCH_SIZE),
               "--output_path", str(output), "--log_samples"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)


def _results(output: Path, task: str):
    """(accuracy, [(response, correct)] in doc order) from lmms-eval's results and samples files under `output`."""
    results = sorted(output.rglob("*_results.json"))
    samples = sorted(output.rglob(f"*_samples_{task}.jsonl"))
    assert results and samples, f"lmms-eval wrote no results under {output}"
    accuracy = json.loads(results[-1].read_text())["results"][task]["accuracy,none"]
    rows = sorted((json.loads(line) for line in samples[-1].read_text().splitlines() if line.strip()),
                  key=lambda row: row["doc_id"])
    responses = [row["filtered_resps"][0] if isinstance(row["filtered_resps"], list) else row["filtered_resps"]
                 for row in rows]
    return accuracy, [(response, bool(row["accuracy"])) for response, row in zip(responses, rows)]


def test_gap_model_is_registered_through_the_lmms_eval_entry_point():
    from lmms_eval.models import get_model

    (entry_point,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "gap"]
    assert entry_point.value == "gap_pipeline.lmms_plugin:manifest"
    from gap_pipeline.lmms_plugin import GapLmms

    assert get_model("gap") is GapLmms


def test_lmms_eval_accuracies_equal_gap_evaluate_for_every_deterministic_intervention(
        tmp_path, engineered_dir, benchmark_tsv):
    reference = _gap("evaluate", "--model", engineered_dir, "--data", benchmark_tsv, "--output-dir", tmp_path / "ref",
                     "--interventions", ",".join(INTERVENTIONS), "--max-new-tokens", MAX_NEW_TOKENS,
                     "--batch-size", BATCH_SIZE, "--no-progress")
    assert reference.returncode == 0, reference.stderr[-3000:]
    summary = {row["intervention"]: row for row in json.loads((tmp_path / "ref" / "summary.json").read_text())}
    records = [json.loads(line) for line in (tmp_path / "ref" / "predictions.jsonl").read_text().splitlines()]

    task_dir = tmp_path / "task"
    written = _gap("lmms-task", "--data", benchmark_tsv, "--output-dir", task_dir, "--name", "gap_tiny_bench",
                   "--max-new-tokens", MAX_NEW_TOKENS)
    assert written.returncode == 0, written.stderr[-3000:]
    assert "reasoning_tags: none" in (task_dir / "gap_tiny_bench.yaml").read_text()

    for intervention in INTERVENTIONS:
        latent_log = tmp_path / f"latents-{intervention}.jsonl"
        run = _lmms_eval(task_dir, "gap_tiny_bench", f"pretrained={engineered_dir},latent_intervention={intervention},"
                         f"latent_log={latent_log}", tmp_path / f"lmms-{intervention}")
        accuracy, per_doc = _results(tmp_path / f"lmms-{intervention}", "gap_tiny_bench")
        assert accuracy == pytest.approx(summary[intervention]["accuracy"]), (intervention, run.stdout[-2000:])
        mine = [r for r in records if r["intervention"] == intervention]  # in row order
        assert per_doc == [(r["prediction"], r["correct"]) for r in mine], intervention
        logged = sorted(map(json.loads, latent_log.read_text().splitlines()), key=lambda row: row["doc_id"])
        assert [row["latent_spans"] for row in logged] == [r["latent_spans"] for r in mine], intervention
    assert summary["suppress"]["accuracy"] == pytest.approx(sum(g == "C" for g in GOLDS) / len(GOLDS))
