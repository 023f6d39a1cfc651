"""The VLMEvalKit adapter answers a benchmark row as `gap evaluate` does. Runs where `vlmeval` imports (a CUDA
torch with its torchvision); skipped with the reason elsewhere."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import vlmeval  # noqa: F401
except Exception as error:  # its model zoo imports torchvision, which fails in several ways beside a CPU torch
    pytest.skip(f"VLMEvalKit does not import here ({type(error).__name__}: {error}); install ms-vlmeval where a CUDA "
                "torch and its torchvision are installed", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]


def test_vlmeval_adapter_answers_as_gap_evaluate_does(tmp_path, engineered_dir, benchmark_tsv):
    from gap_pipeline.evaluate import load_tsv_items
    from gap_pipeline.vlmeval_model import GapVLMEval

    run = subprocess.run([sys.executable, "-m", "gap_pipeline", "evaluate", "--model", str(engineered_dir), "--data",
                          str(benchmark_tsv), "--output-dir", str(tmp_path / "ref"), "--interventions", "suppress",
                          "--max-new-tokens", "1", "--batch-size", "1", "--no-progress"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    predictions = [json.loads(line)["prediction"] for line in (tmp_path / "ref" / "predictions.jsonl").open()]
    model = GapVLMEval(str(engineered_dir), latent_intervention="suppress", max_new_tokens=1)
    items, _ = load_tsv_items(benchmark_tsv)
    answers = []
    for k, item in enumerate(items):
        path = tmp_path / f"{k}.png"
        item.images[0].save(path)
        message = [{"type": "image", "value": str(path)}, {"type": "text", "value": item.messages[0]["content"][1]["text"]}]
        answers.append(model.generate(message, dataset="gap_tiny"))
    assert answers == predictions
