"""bench/demo_robustness.py: the demo under each kernel level, thread count and seed, one row per run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import demo_robustness  # noqa: E402  (bench/demo_robustness.py)


def test_each_run_has_its_kernel_level_and_thread_count_and_a_finished_run_is_reused(tmp_path):
    out = tmp_path / "robustness"
    argv = [sys.executable, str(REPO / "bench" / "demo_robustness.py"), "--output-dir", str(out), "--kernels",
            "default", "--threads", "1", "--seeds", "0", "--control-only", "--", "--train-rows", "30",
            "--test-rows", "6", "--epochs", "1"]
    first = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert first.returncode in (0, 1), first.stdout[-3000:] + first.stderr[-3000:]
    cell = json.loads((out / "default-t1-s0" / "demo_table.json").read_text())
    assert cell["machine"]["cpu_capability"] == "DEFAULT" and cell["machine"]["threads"] == 1  # the stages' torch
    assert cell["settings"]["control_only"] and cell["settings"]["train_rows"] == 30
    result = json.loads((out / "robustness.json").read_text())
    (run,) = result["runs"]
    assert (run["kernels"], run["threads"], run["seed"], run["reused"]) == ("default", 1, 0, False)
    assert set(run["checks"]) == {"control_learns_one_hop"}
    assert first.returncode == (0 if result["all_met"] else 1)
    table = (out / "robustness.md").read_text().splitlines()
    assert table[0].startswith("| kernels | threads | seed | control lm_loss | control, framed |")
    assert table[2].startswith("| default | 1 | 0 |") and table[3].startswith("| spread (min–max) |")

    again = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "default-t1-s0: control_learns_one_hop" in again.stdout and "(reused)" in again.stdout
    assert json.loads((out / "robustness.json").read_text())["runs"][0]["reused"] is True


def test_options_the_script_sets_per_run_are_refused_after_the_separator(capsys):
    with pytest.raises(SystemExit) as exit_:
        demo_robustness.main(["--seeds", "0", "--", "--seeds", "3"])
    assert exit_.value.code == 2
    assert "--seeds: set per run by this script" in capsys.readouterr().err
