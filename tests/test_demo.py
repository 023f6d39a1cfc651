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
        [sys.executable, "-m", "gap_pipeline", "demo", "--output-dir", str(out), "--train-rows", "40",
         "--test-rows", "10", "--epochs", "1", "--difficulty-rows", "6", "--difficulty-samples", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    for stage in ("1 base", "2 data", "3 control", "4 difficulty", "5 GAP", "6 reload", "7 evaluate"):
        assert f"[seed 0] {stage}" in run.stderr + run.stdout, stage
    assert "fresh process, trust_remote_code (transformers_modules)" in run.stderr + run.stdout
    for name in ("GAP, pca", "GAP, suppress", "GAP, noise", "GAP, hidden", "GAP, hidden_ema", "control (no latents)"):
        assert name in run.stdout
    table = json.loads((out / "demo_table.json").read_text())
    assert [row["name"] for row in table["rows"]][-1] == "control (no latents)"
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in table["rows"])
    assert set(table["norms"]) == {"vision_embedding", "gap_latent", "final_norm_state", "pre_norm_last_layer"}
    assert table["norms"]["vision_embedding"] > 0
    with Image.open(out / "norms" / "norm_profile.png") as plot:
        assert plot.size[0] > 200 and plot.size[1] > 200
    for log in ("tiny-model", "targets", "train-control", "difficulty", "train-gap", "evaluate-gap"):
        assert (out / "logs" / f"{log}.log").is_file()


def _fake_seed_run(seed, accuracy):
    row = {"accuracy": accuracy, "span_rate": 1.0, "mean_latent_norm": 0.2}
    stats = {"norm_mean": 1.0}
    return {
        "seed": seed,
        "gap": {name: dict(row) for name in ("pca", "suppress", "noise", "hidden", "hidden_ema")},
        "control": {"accuracy": accuracy / 2, "span_rate": 0.0, "mean_latent_norm": None},
        "gap_da": dict(row),
        "gap_full_head": dict(row),
        "norms": {"latents": {key: stats for key in ("query_vision_input", "latent", "final_norm_state",
                                                      "pre_norm_state")}},
    }


def test_full_mode_table_gives_mean_and_std_over_seeds_with_the_two_ablation_rows():
    import argparse

    from gap_pipeline.demo import format_table

    runs = [_fake_seed_run(0, 0.2), _fake_seed_run(1, 0.4), _fake_seed_run(2, 0.6)]
    text, table = format_table(runs, argparse.Namespace(test_rows=10))
    assert table["seeds"] == [0, 1, 2]
    rows = {row["name"]: row for row in table["rows"]}
    assert rows["GAP, pca"]["accuracy"] == 0.4 and abs(rows["GAP, pca"]["accuracy_std"] - 0.2) < 1e-12
    assert abs(rows["control (no latents)"]["accuracy"] - 0.2) < 1e-12
    assert "LH+PCA+DA, pca" in rows and "LH (full head), pca" in rows
    assert "mean ± std over seeds [0, 1, 2]" in text and "0.400 ± 0.200" in text
