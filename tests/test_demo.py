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
    assert [check["name"] for check in table["checks"]] == ["latents_carry_content", "beats_control"]
    assert "clean latents" in run.stdout and "the no-latent control" in run.stdout
    assert set(table["norms"]) == {"vision_embedding", "gap_latent", "final_norm_state", "pre_norm_last_layer"}
    assert table["norms"]["vision_embedding"] > 0
    with Image.open(out / "norms" / "norm_profile.png") as plot:
        assert plot.size[0] > 200 and plot.size[1] > 200
    for log in ("tiny-model", "targets-train", "targets-test", "train-control", "difficulty", "train-gap",
                "evaluate-gap", "evaluate-control"):
        assert (out / "logs" / f"{log}.log").is_file()


def _fake_seed_run(seed, accuracy):
    def row(value, span=1.0):
        return {"accuracy": value, "span_rate": span, "mean_latent_norm": 0.2, "latent_cosine": 0.9,
                "latent_relse": 0.2, "by_type": {"framed": 1.0, "column": value}}

    stats = {"norm_mean": 1.0}
    gap = {name: row(accuracy) for name in ("pca", "oracle")}
    gap.update({name: row(accuracy - 0.3) for name in ("suppress", "noise", "hidden", "hidden_ema")})
    return {
        "seed": seed,
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
    assert [(c["name"], c["met"]) for c in table["checks"]] == [("latents_carry_content", True), ("beats_control", True)]
    assert "met: clean latents 0.700 >= every intervention + 0.10 (best: suppress 0.400)" in text


def test_the_goal_checks_fail_when_an_intervention_is_within_the_margin_or_the_control_wins():
    import argparse

    from gap_pipeline.demo import format_table

    run = _fake_seed_run(0, 0.5)
    run["gap"]["noise"]["accuracy"] = 0.45
    run["control"]["suppress"]["accuracy"] = 0.6
    _, table = format_table([run], argparse.Namespace(test_rows=10))
    assert [(c["name"], c["met"]) for c in table["checks"]] == [("latents_carry_content", False), ("beats_control", False)]


def test_a_failing_stage_is_one_error_line_naming_the_stage_and_its_log(tmp_path, capsys):
    from gap_pipeline.cli import main as gap_main

    out = tmp_path / "demo"
    out.mkdir()
    (out / "base").write_text("a file where the base checkpoint folder goes")  # stage 1 (tiny-model) fails
    assert gap_main(["demo", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: stage 'tiny-model' failed (exit 1); see " + str(out / "logs" / "tiny-model.log") in err
