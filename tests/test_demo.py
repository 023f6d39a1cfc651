"""`gap demo` end to end at a reduced size: every stage runs through the project's own commands."""

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_every_stage_and_prints_the_intervention_table(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run(
        [sys.executable, "-m", "gap_pipeline", "demo", "--output-dir", str(out), "--train-rows", "60",
         "--test-rows", "12", "--epochs", "1", "--difficulty-rows", "12", "--difficulty-samples", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    for stage in ("1 base", "2 data", "3 control", "4 difficulty", "5 GAP", "6 reload", "7 evaluate"):
        assert f"[seed 0] {stage}" in run.stderr + run.stdout, stage
    assert "fresh process, trust_remote_code (transformers_modules)" in run.stderr + run.stdout
    table = json.loads((out / "demo_table.json").read_text())
    names = [row["name"] for row in table["rows"]]
    assert names == [f"GAP (LH+PCA+DA), {iv}" for iv in ("pca", "oracle", "suppress", "noise", "hidden", "hidden_ema")] + [
        "control (no latents)"]
    for name in names:
        assert name in run.stdout
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in table["rows"])
    assert all(set(row["by_type"]) == {"framed", "column"} for row in table["rows"])
    rows = {row["name"]: row for row in table["rows"]}
    assert rows["GAP (LH+PCA+DA), oracle"]["span_rate"] == rows["GAP (LH+PCA+DA), pca"]["span_rate"]
    if rows["GAP (LH+PCA+DA), pca"]["span_rate"] > 0:  # the held-out rows carry targets: fidelity is measured
        assert -1.0 <= rows["GAP (LH+PCA+DA), pca"]["latent_cosine"] <= 1.0
    assert [check["name"] for check in table["checks"]] == [
        "control_learns_one_hop", "latents_carry_content", "beats_control", "spans_where_they_help"]
    assert "clean latents" in run.stdout and "the no-latent control" in run.stdout
    assert table["two_hop_share"] == 8 / 12  # two of every three held-out rows ask the two-hop question
    assert set(rows["GAP (LH+PCA+DA), pca"]["span_by_type"]) == {"framed", "column"}
    import torch  # the table names where it ran: what its rounding depends on
    assert table["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert f"torch CPU kernels {table['machine']['cpu_capability']}" in run.stdout
    assert set(table["norms"]) == {"vision_embedding", "gap_latent", "final_norm_state", "pre_norm_last_layer"}
    assert table["norms"]["vision_embedding"] > 0
    with Image.open(out / "norms" / "norm_profile.png") as plot:
        assert plot.size[0] > 200 and plot.size[1] > 200
    for log in ("tiny-model", "targets-train", "targets-test", "train-control", "difficulty", "train-gap",
                "evaluate-gap", "evaluate-control"):
        assert (out / "logs" / f"{log}.log").is_file()


def _fake_seed_run(seed, accuracy):
    def row(value, span=2 / 3):
        return {"accuracy": value, "span_rate": span, "mean_latent_norm": 0.2, "latent_cosine": 0.9,
                "latent_relse": 0.2, "by_type": {"framed": 1.0, "column": value},
                "span_by_type": {"framed": 0.0, "column": span * 1.5}}

    stats = {"norm_mean": 1.0}
    gap = {name: row(accuracy) for name in ("pca", "oracle")}
    gap.update({name: row(accuracy - 0.3) for name in ("suppress", "noise", "hidden", "hidden_ema")})
    return {
        "seed": seed,
        "two_hop_share": 2 / 3,
        "gap": gap,
        "control": {"suppress": row(accuracy - 0.05, span=0.0)},
        "gap_all": {"pca": row(accuracy - 0.1), "oracle": row(accuracy)},
        "gap_full": {"pca": row(accuracy - 0.2)},
        "norms": {"latents": {key: stats for key in ("query_vision_input", "latent", "final_norm_state",
                                                      "pre_norm_state")}},
    }


def test_full_mode_table_gives_mean_and_std_over_seeds_with_the_ablation_rows_and_the_goal_checks():
    import argparse

    from gap_pipeline.demo import format_table

    runs = [_fake_seed_run(0, 0.5), _fake_seed_run(1, 0.7), _fake_seed_run(2, 0.9)]
    text, table = format_table(runs, argparse.Namespace(test_rows=10))
    assert table["seeds"] == [0, 1, 2]
    rows = {row["name"]: row for row in table["rows"]}
    assert abs(rows["GAP (LH+PCA+DA), pca"]["accuracy"] - 0.7) < 1e-12
    assert abs(rows["GAP (LH+PCA+DA), pca"]["accuracy_std"] - 0.2) < 1e-12
    assert abs(rows["control (no latents)"]["accuracy"] - 0.65) < 1e-12
    assert abs(rows["LH+DA (full head), pca"]["accuracy"] - 0.5) < 1e-12 and "LH+PCA (all-latent), oracle" in rows
    assert rows["GAP (LH+PCA+DA), pca"]["by_type"] == {"framed": 1.0, "column": 0.7}
    assert "mean ± std over seeds [0, 1, 2]" in text and "0.700 ± 0.200" in text
    assert all(c["met"] for c in table["checks"])
    assert "met: clean latents 0.700 >= every intervention + 0.10 (best: suppress 0.400)" in text
    assert "met: GAP (LH+PCA+DA) 0.700 >= the no-latent control 0.650 + 0.05" in text


def test_each_goal_check_fails_on_the_run_that_breaks_its_claim():
    import argparse

    from gap_pipeline.demo import format_table

    def failed(change):
        run = _fake_seed_run(0, 0.5)
        change(run)
        _, table = format_table([run], argparse.Namespace(test_rows=10))
        return [c["name"] for c in table["checks"] if not c["met"]]

    assert failed(lambda run: None) == []
    assert failed(lambda run: run["control"]["suppress"]["by_type"].update(framed=0.89)) == ["control_learns_one_hop"]
    assert failed(lambda run: run["gap"]["noise"].update(accuracy=0.41)) == ["latents_carry_content"]
    assert failed(lambda run: run["control"]["suppress"].update(accuracy=0.46)) == ["beats_control"]
    assert failed(lambda run: run["gap"]["pca"].update(span_rate=0.6)) == ["spans_where_they_help"]
    # the right share of spans, but some on the one-hop questions
    assert failed(lambda run: run["gap"]["pca"]["span_by_type"].update(framed=0.1, column=0.95)) == [
        "spans_where_they_help"]


def test_control_only_table_has_the_control_row_and_its_one_hop_check():
    import argparse

    from gap_pipeline.demo import format_table

    run = _fake_seed_run(0, 0.5)
    del run["gap"], run["gap_all"], run["gap_full"], run["norms"]
    text, table = format_table([run], argparse.Namespace(test_rows=10),
                               {"cpu": "a CPU", "cpu_capability": "AVX2", "threads": 1, "torch": "2"})
    assert [row["name"] for row in table["rows"]] == ["control (no latents)"]
    assert [c["name"] for c in table["checks"]] == ["control_learns_one_hop"]
    assert "seed 0; a CPU, torch CPU kernels AVX2, 1 thread(s)" in text.splitlines()[0]


def test_a_failing_stage_is_one_error_line_naming_the_stage_and_its_log(tmp_path, capsys):
    from gap_pipeline.cli import main as gap_main

    out = tmp_path / "demo"
    out.mkdir()
    (out / "base").write_text("a file where the base checkpoint folder goes")  # stage 1 (tiny-model) fails
    assert gap_main(["demo", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: stage 'tiny-model' failed (exit 1); see " + str(out / "logs" / "tiny-model.log") in err
