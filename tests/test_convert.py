"""gap convert: a tiny Qwen2.5-VL folder + pca.safetensors -> a GAP folder that reloads as remote code."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gap_pipeline.convert import ConversionError, convert_checkpoint
from gap_pipeline.pca import save_pca
from gap_pipeline.tiny import synthetic_pca

REPO = Path(__file__).resolve().parent.parent
K = 4
k = 8


@pytest.fixture(scope="module")
def pca_file(tmp_path_factory):
    pca = synthetic_pca(64, k, seed=3)
    return save_pca(tmp_path_factory.mktemp("pca"), pca["mean"], pca["components"], pca["eigenvalues"])


def _clean_env():
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def test_cli_converts_and_the_folder_reloads_as_remote_code_with_base_logits(tmp_path, tiny_base_dir, pca_file,
                                                                            tiny_image):
    out = tmp_path / "gap"
    run = subprocess.run(
        [sys.executable, "-m", "gap_pipeline", "convert", "--base", str(tiny_base_dir), "--pca", str(pca_file),
         "--output-dir", str(out), "--latent-tokens-per-span", str(K), "--latent-loss-weight", "0.5",
         "--latent-loss-reduction", "sum", "--latent-adapter-size", "16", "--dtype", "float32"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "latent tokens: <|latent_start|>=" in run.stdout and "grown" in run.stdout
    assert f"K = {K} latent tokens per span (2 x 2); head: pca, k = {k} components of d = 64" in run.stdout
    assert {"configuration_gap.py", "modeling_gap.py", "processing_gap.py", "model.safetensors", "config.json",
            "processor_config.json", "tokenizer.json"} <= set(os.listdir(out))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gap_qwen2_5_vl"
    assert (config["latent_tokens_per_span"], config["pca_num_components"], config["latent_head_type"]) == (K, k, "pca")
    assert (config["latent_loss_weight"], config["latent_loss_reduction"], config["latent_adapter_size"]) == (0.5, "sum", 16)

    tiny_image(seed=5).save(tmp_path / "probe.png")
    script = textwrap.dedent(f"""
        import sys, torch
        from PIL import Image
        assert not any(name.split(".")[0] in ("configuration_gap", "modeling_gap", "processing_gap", "gap_pipeline")
                       for name in sys.modules)
        from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
        from transformers import Qwen2_5_VLForConditionalGeneration
        gap_dir, base_dir = {str(out)!r}, {str(tiny_base_dir)!r}
        model = AutoModelForImageTextToText.from_pretrained(gap_dir, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(gap_dir, trust_remote_code=True)
        base = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir).eval()
        n_base = len(AutoTokenizer.from_pretrained(base_dir))
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        assert type(processor).__name__ == "GapProcessor" and processor.latent_tokens_per_span == {K}
        ids = processor.tokenizer.convert_tokens_to_ids(["<|latent_start|>", "<|latent_pad|>", "<|latent_end|>"])
        assert tuple(ids) == model.config.latent_token_ids, (ids, model.config.latent_token_ids)
        messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "How many cells?"}}]}}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=[prompt], images=[Image.open({str(tmp_path / "probe.png")!r})], return_tensors="pt")
        assert not (inputs["input_ids"] == ids[1]).any()
        with torch.no_grad():
            gap_logits = model(**inputs).logits
            base_logits = base(**inputs).logits
        assert gap_logits.shape[-1] == model.config.text_config.vocab_size > n_base
        assert torch.equal(gap_logits[..., :n_base], base_logits[..., :n_base])
        print("OK", n_base, gap_logits.shape[-1])
    """)
    reload = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_clean_env(), capture_output=True,
                            text=True, timeout=300)
    assert reload.returncode == 0, reload.stderr[-3000:]
    assert reload.stdout.split()[-3] == "OK"


def test_full_head_needs_no_pca_and_spare_rows_are_not_grown(tmp_path, tiny_base_dir_spare):
    report = convert_checkpoint(tiny_base_dir_spare, tmp_path / "gap", latent_head_type="full",
                                latent_tokens_per_span=9, latent_adapter_size=8)
    assert not report["grown"] and report["embedding_rows_after"] == report["embedding_rows_before"]
    assert report["latent_head_type"] == "full" and report["pca_num_components"] is None
    assert max(report["latent_token_ids"].values()) < report["embedding_rows_before"]
    config = json.loads((tmp_path / "gap" / "config.json").read_text())
    assert config["latent_head_type"] == "full" and config["latent_tokens_per_span"] == 9


def test_bfloat16_conversion_keeps_the_latent_head_fp32(tmp_path, tiny_base_dir, pca_file):
    from safetensors import safe_open

    report = convert_checkpoint(tiny_base_dir, tmp_path / "gap", pca_file, latent_tokens_per_span=K,
                                latent_adapter_size=8, dtype="bfloat16")
    assert report["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "gap" / "model.safetensors"), framework="pt") as f:
        dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
    assert dtypes["model.language_model.embed_tokens.weight"] == "BF16"
    assert {dtype for key, dtype in dtypes.items() if key.startswith("latent_head.")} == {"F32"}
    with safe_open(str(tmp_path / "gap" / "model.safetensors"), framework="pt") as f:
        torch.testing.assert_close(f.get_tensor("latent_head.pca_components"),
                                   synthetic_pca(64, k, seed=3)["components"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"latent_tokens_per_span": 8}, "not a perfect square"),
        ({"pca": None}, "--head-type pca needs --pca"),
        ({"latent_head_type": "full"}, "--head-type full has no PCA; drop --pca"),
        ({"latent_loss_weight": -1.0}, "--latent-loss-weight must be a finite number >= 0"),
    ],
)
def test_bad_arguments_are_refused_with_the_fix(tmp_path, tiny_base_dir, pca_file, kwargs, message):
    arguments = {"pca": pca_file, "latent_tokens_per_span": K, **kwargs}
    pca = arguments.pop("pca")
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(tiny_base_dir, tmp_path / "gap", pca, **arguments)
    assert not (tmp_path / "gap").exists()


def test_pca_of_another_width_and_non_empty_output_are_refused(tmp_path, tiny_base_dir):
    wide = synthetic_pca(32, 4)
    pca_path = save_pca(tmp_path / "pca32", wide["mean"], wide["components"], wide["eigenvalues"])
    with pytest.raises(ConversionError, match=r"width d=32 but .* hidden size d=64"):
        convert_checkpoint(tiny_base_dir, tmp_path / "gap", pca_path, latent_tokens_per_span=K)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="is not empty.*--overwrite"):
        convert_checkpoint(tiny_base_dir, tmp_path / "busy", latent_head_type="full", latent_tokens_per_span=K)
    convert_checkpoint(tiny_base_dir, tmp_path / "gap_full", latent_head_type="full", latent_tokens_per_span=K,
                       latent_adapter_size=8)
    with pytest.raises(ConversionError, match="already a GAP checkpoint"):
        convert_checkpoint(tmp_path / "gap_full", tmp_path / "again", latent_head_type="full", latent_tokens_per_span=K)
