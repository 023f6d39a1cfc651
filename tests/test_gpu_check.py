"""`make gpu-check` and `make wheels`: the GPU check's code paths run on the CPU (`--tiny`) so they cannot rot
before a GPU is at hand, and the wheels for a GPU machine without network leave its torch alone."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import wheels  # noqa: E402  (bench/wheels.py)


def test_gpu_check_tiny_runs_every_part_and_writes_the_results(tmp_path):
    out = tmp_path / "gpu_tiny.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--tiny", "--output", str(out)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    results = json.loads(out.read_text())
    assert results["errors"] == {}
    assert list(results["parts"]) == ["numerics", "generation", "train", "zero3"]
    assert "| check | value | goal | met | detail |" in run.stdout  # the README table

    numerics = results["parts"]["numerics"]["raw"]
    assert numerics["sdpa"]["max_abs_diff"] == 0.0  # no latent pads: GAP's logits are Qwen2.5-VL's
    assert numerics["head_dtypes"]["backbone"] == ["torch.bfloat16"]
    assert all(numerics["head_dtypes"][key] == ["torch.float32"]
               for key in ("parameters", "buffers", "latent_predictions", "next_latent"))

    generation = results["parts"]["generation"]["raw"]
    for batch in ("batch_1", "batch_8"):
        assert set(generation[batch]["tokens_per_s"]) == {"latent", "suppress", "stock"}
        assert generation[batch]["suppress_equals_stock"]
        assert sum(generation[batch]["spans_per_row"]) >= 1
    assert [run["prompt_length"] for run in generation["cache"]] == [32, 64, 128]
    agreement = generation["cached_vs_uncached"]
    assert agreement["spans"] == [1, 1] and isinstance(agreement["tokens_equal"], bool)

    train = results["parts"]["train"]["raw"]
    assert train["loss_finite"] and train["head_fp32"]
    assert set(train["rows_per_s"]) == {"gap", "stock"}

    zero3 = results["parts"]["zero3"]["raw"]
    assert zero3["steps"] == 3 and zero3["loss_finite"]
    assert zero3["partitioned_parameters"] == zero3["parameters"] > 0
    assert zero3["mismatched"] == [] and zero3["remote_code"] and zero3["reloaded_head_fp32"]


def test_wheels_never_fetch_torch_and_build_deepspeed_here():
    direct, found = wheels.closure("3.12")
    assert "torch" in {wheels.canonical(r.name) for r in direct}  # required, but the GPU machine's own
    assert "torch" not in found and not any(name.startswith("nvidia-") for name in found)
    assert {"transformers", "trl", "peft", "accelerate", "datasets", "deepspeed"} <= set(found)
    assert wheels.is_pure(found["transformers"]) and not wheels.is_pure(found["numpy"])
    assert "deepspeed" in wheels.BUILT_HERE


def test_wheels_install_leaves_fitting_versions_alone(tmp_path):
    from importlib.metadata import version

    (tmp_path / "requirements.txt").write_text(f"tqdm=={version('tqdm')}\ntorch>=2.4,<3\n")
    run = subprocess.run([sys.executable, str(REPO / "bench" / "wheels.py"), "install", "--wheels", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "nothing (every version fits)" in run.stdout


def test_wheels_install_names_the_missing_folder(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "bench" / "wheels.py"), "install", "--wheels",
                          str(tmp_path / "wheels")], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "requirements.txt does not exist: run `make wheels`" in run.stderr
