"""gap norm-profile: documented JSON keys, the layer-index convention, latent-step alignment, the PNG."""

import json
import math

import datasets
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

from gap_pipeline import cli
from gap_pipeline.convert import convert_checkpoint
from gap_pipeline.norms import LogNormStats, profile_norms
from gap_pipeline.pca import save_pca
from gap_pipeline.tiny import synthetic_pca

K = 4
STATS_KEYS = {"count", "log_norm_mean", "log_norm_std", "norm_mean", "norm_std", "norm_geomean"}


@pytest.fixture(scope="module")
def tiny_gap_dir(tmp_path_factory, tiny_base_dir):
    root = tmp_path_factory.mktemp("norms_gap")
    pca = synthetic_pca(64, 8, seed=1)
    pca_path = save_pca(root / "pca", pca["mean"], pca["components"], pca["eigenvalues"])
    convert_checkpoint(tiny_base_dir, root / "gap", pca_path, latent_tokens_per_span=K, latent_adapter_size=16)
    return root / "gap"


def _question(text):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory, tiny_image):
    rows = [
        {"messages": _question(q) + [{"role": "assistant", "content": [{"type": "text", "text": "<answer>1</answer>"}]}],
         "images": [tiny_image(seed=i)]}
        for i, q in enumerate(["How many cells?", "Which colour appears most often in the grid?", "Is it red?"])
    ]
    path = tmp_path_factory.mktemp("norms_data") / "data"
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def test_log_norm_stats_are_the_mean_and_sample_std_of_log_norms():
    stats = LogNormStats()
    stats.update(torch.tensor([1.0, math.e]))
    stats.update(torch.tensor([[math.e**2]]))
    result = stats.to_dict()
    assert set(result) == STATS_KEYS and result["count"] == 3
    assert result["log_norm_mean"] == pytest.approx(1.0) and result["log_norm_std"] == pytest.approx(1.0)
    assert result["norm_geomean"] == pytest.approx(math.e)
    assert result["norm_mean"] == pytest.approx((1 + math.e + math.e**2) / 3)


def test_cli_writes_documented_json_and_a_png_for_a_gap_model(tmp_path, tiny_gap_dir, dataset_dir, capsys):
    out = tmp_path / "profile"
    status = cli.main(["norm-profile", "--model", str(tiny_gap_dir), "--dataset", str(dataset_dir), "--batch-size", "2",
                       "--output-dir", str(out), "--device", "cpu", "--no-progress"])
    assert status == 0
    summary = capsys.readouterr().out
    assert "latents (pca, K=4, 3 spans)" in summary and "norm_profile.png" in summary
    profile = json.loads((out / "norm_profile.json").read_text())
    assert {"format", "version", "model", "model_type", "is_gap", "num_samples", "num_layers", "hidden_size", "log",
            "layer_index", "layers", "input_embeddings", "final_norm", "peak", "latents", "settings"} <= set(profile)
    assert profile["format"] == "gap-norm-profile" and profile["is_gap"] and profile["num_samples"] == 3
    L = profile["num_layers"]
    assert L == 2 and profile["hidden_size"] == 64
    for modality in ("text", "vision"):
        layers = profile["layers"][modality]
        assert len(layers) == L + 1 and all(set(s) == STATS_KEYS for s in layers)
        assert profile["input_embeddings"][modality] == layers[0]
        assert set(profile["final_norm"][modality]) == STATS_KEYS
        assert set(profile["peak"][modality]) == {"layer", "log_norm_mean", "norm_geomean", "ratio_to_input"}
        assert 1 <= profile["peak"][modality]["layer"] <= L
    assert profile["layers"]["vision"][0]["count"] == 3 * 16  # 16 merged vision tokens per 112 x 112 image
    latents = profile["latents"]
    assert latents["intervention"] == "pca" and latents["latent_tokens_per_span"] == K and latents["num_spans"] == 3
    for key in ("latent", "final_norm_state", "pre_norm_state", "query_vision_input"):
        assert set(latents[key]) == STATS_KEYS and latents[key]["count"] == (3 * 16 if key == "query_vision_input" else 3 * K)
    assert set(latents["ratios"]) == {"final_norm_over_latent", "pre_norm_over_latent", "latent_over_query_vision"}
    assert all(math.isfinite(value) and value > 0 for value in latents["ratios"].values())

    with Image.open(out / "norm_profile.png") as image:
        image.load()
        width, height = image.size
    assert image.format == "PNG" and 800 <= width <= 3000 and 300 <= height <= 1500 and width > height


def test_layer_indices_are_input_embeddings_then_pre_norm_layer_outputs(tiny_base_dir, tiny_processor, tiny_image):
    """Index 0 = input embeddings, l = output of decoder layer l before the final norm, final norm apart."""
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_base_dir).eval()
    samples = [(_question("How many cells?"), [tiny_image(seed=0)]),
               (_question("Which colour appears most often in the grid, and where?"), [tiny_image(seed=1)])]
    profile = profile_norms(model, tiny_processor, samples, batch_size=2)  # left-padded batch of two

    # Reference: each prompt alone, the decoder layers' outputs captured with hooks.
    per_layer = {m: [[] for _ in range(3)] for m in ("text", "vision")}
    final = {m: [] for m in ("text", "vision")}
    for messages, images in samples:
        prompt = tiny_processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = tiny_processor(text=[prompt], images=images, return_tensors="pt")
        outputs = []
        hooks = [layer.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
                 for layer in model.model.language_model.layers]
        with torch.no_grad():
            embeds = model.model.get_input_embeddings()(inputs["input_ids"])
            image_embeds = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
            result = model(**inputs)
        for hook in hooks:
            hook.remove()
        vision = inputs["input_ids"][0] == model.config.image_token_id
        embeds[0, vision] = torch.cat(list(image_embeds))
        states = [embeds[0]] + [o[0] for o in outputs]
        with torch.no_grad():
            h_bar = model.model.language_model.norm(outputs[-1])[0]
        for modality, mask in (("text", ~vision), ("vision", vision)):
            for layer, state in enumerate(states):
                per_layer[modality][layer].append(state[mask].norm(dim=-1).log())
            final[modality].append(h_bar[mask].norm(dim=-1).log())
        del result
    for modality in ("text", "vision"):
        for layer in range(3):
            expected = torch.cat(per_layer[modality][layer]).double()
            got = profile["layers"][modality][layer]
            assert got["count"] == expected.numel()
            assert got["log_norm_mean"] == pytest.approx(float(expected.mean()), abs=1e-4)
            assert got["log_norm_std"] == pytest.approx(float(expected.std()), abs=1e-4)
        expected_final = torch.cat(final[modality]).double()
        assert profile["final_norm"][modality]["log_norm_mean"] == pytest.approx(float(expected_final.mean()), abs=1e-4)
        assert profile["final_norm"][modality]["log_norm_mean"] != pytest.approx(
            profile["layers"][modality][2]["log_norm_mean"], abs=1e-3)
    assert profile["latents"] is None and not profile["is_gap"]


def test_hidden_intervention_latents_equal_the_final_norm_states_they_came_from(tiny_gap_dir, tiny_image):
    """With `hidden` the fed latent *is* h_bar, so the two statistics agree only if the steps are aligned."""
    from gap_pipeline.inference import load_model_and_processor

    model, processor, is_gap = load_model_and_processor(tiny_gap_dir, device="cpu")
    samples = [(_question(q), [tiny_image(seed=i)]) for i, q in enumerate(["How many?", "Which colour is at the top?"])]
    profile = profile_norms(model, processor, samples, batch_size=2, latent_intervention="hidden")
    latents = profile["latents"]
    assert latents["latent"]["count"] == latents["final_norm_state"]["count"] == 2 * K
    for key in ("log_norm_mean", "log_norm_std", "norm_mean"):
        assert latents["latent"][key] == pytest.approx(latents["final_norm_state"][key], rel=1e-5)
    assert latents["ratios"]["final_norm_over_latent"] == pytest.approx(1.0, rel=1e-5)

    pca_profile = profile_norms(model, processor, samples, batch_size=1, latents=True)
    assert pca_profile["latents"]["latent"]["log_norm_mean"] != pytest.approx(
        pca_profile["latents"]["final_norm_state"]["log_norm_mean"], rel=1e-3)


def test_cli_folder_of_images_and_a_prompt_on_a_base_model(tmp_path, tiny_base_dir, tiny_image, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        tiny_image(seed=i).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "profile"
    assert cli.main(["norm-profile", "--model", str(tiny_base_dir), "--images", str(folder), "--prompt",
                     "Describe the grid.", "--max-samples", "2", "--output-dir", str(out), "--no-progress"]) == 0
    profile = json.loads((out / "norm_profile.json").read_text())
    assert profile["num_samples"] == 2 and profile["latents"] is None
    assert profile["settings"]["prompt"] == "Describe the grid."
    with Image.open(out / "norm_profile.png") as image:
        assert image.size[0] >= 500 and image.size[1] >= 300


def test_cli_errors_name_the_argument(tmp_path, tiny_base_dir, dataset_dir, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["norm-profile", "--model", str(tiny_base_dir), "--images", str(empty),
                     "--output-dir", str(tmp_path / "o")]) == 2
    assert "holds no image files" in capsys.readouterr().err
    assert cli.main(["norm-profile", "--model", str(tiny_base_dir), "--dataset", str(dataset_dir), "--prompt", "x",
                     "--output-dir", str(tmp_path / "o")]) == 2
    assert "--prompt applies to --images" in capsys.readouterr().err
    assert cli.main(["norm-profile", "--model", str(dataset_dir), "--dataset", str(dataset_dir),
                     "--output-dir", str(tmp_path / "o")]) == 2
    assert f"--model {dataset_dir}: the folder has no config.json" in capsys.readouterr().err


def test_loading_a_gap_folder_never_asks_to_trust_remote_code(tiny_gap_dir):
    """The GAP processor's tokenizer goes through AutoConfig; unregistered, it would prompt on stdin."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import builtins
        def no_prompt(*args, **kwargs):
            raise SystemExit("asked: " + str(args[:1]))
        builtins.input = no_prompt
        from gap_pipeline.inference import load_model_and_processor
        model, processor, is_gap = load_model_and_processor({str(tiny_gap_dir)!r}, device="cpu")
        assert is_gap and type(processor).__name__ == "GapProcessor"
        print("OK")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), (run.stdout[-2000:], run.stderr[-2000:])
