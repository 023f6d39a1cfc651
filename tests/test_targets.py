"""Latent targets: pooling, the vision tower, the stored column and its metadata, PCA on it, the CLI."""

import json

import numpy as np
import pytest
import torch

from gap_pipeline.cli import main as gap_main
from gap_pipeline.data import load_jsonl
from gap_pipeline.pca import fit_pca, iter_target_vectors
from gap_pipeline.targets import (
    TARGETS_COLUMN,
    TargetsError,
    check_targets_compatible,
    compute_latent_targets,
    encode_images,
    load_vision_tower,
    pool_latent_grid,
    targets_for_images,
    targets_metadata,
)
from gap_pipeline.tiny import build_tiny_base_model


K = 4
D = 64


@pytest.fixture(scope="module")
def base_model_and_processor():
    return build_tiny_base_model(seed=0)


@pytest.fixture()
def jsonl(tmp_path, tiny_image):
    """Three rows: two spans (one with a non-square aux image), no spans, one span; images on disk."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name, seed, size in (("q.png", 0, (112, 112)), ("a0.png", 1, (112, 112)), ("a1.png", 2, (150, 90)),
                             ("a2.png", 3, (112, 112))):
        tiny_image(seed=seed, size=size).save(folder / name)

    def row(rid, answer, aux, accuracy):
        return {"id": rid, "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
                                        {"role": "assistant", "content": answer}],
                "images": ["q.png"], "aux_images": aux, "accuracy": accuracy}

    rows = [row("two", "A <latent> B <latent> C", ["a0.png", "a1.png"], 0.0), row("none", "plain", [], 0.5),
            row("one", "D <latent> E", ["a2.png"], None)]
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# 4. pooling --------------------------------------------------------------------------------------------------


def test_pooling_a_non_square_grid_gives_hand_computed_averages():
    # merged grid 3 x 5 (patch grid 6 x 10, merge 2); channel 0 = 10 * row + col, channel 1 = 1
    height, width = 3, 5
    values = torch.tensor([[10.0 * r + c, 1.0] for r in range(height) for c in range(width)])
    pooled = pool_latent_grid(values, (1, 2 * height, 2 * width), merge_size=2, latent_tokens_per_span=4)
    # adaptive bins: rows {0,1} / {1,2}, cols {0,1,2} / {2,3,4}
    expected = torch.tensor(
        [
            [np.mean([10 * r + c for r in (0, 1) for c in (0, 1, 2)]), 1.0],
            [np.mean([10 * r + c for r in (0, 1) for c in (2, 3, 4)]), 1.0],
            [np.mean([10 * r + c for r in (1, 2) for c in (0, 1, 2)]), 1.0],
            [np.mean([10 * r + c for r in (1, 2) for c in (2, 3, 4)]), 1.0],
        ],
        dtype=torch.float32,
    )
    assert expected[:, 0].tolist() == [6.0, 8.0, 16.0, 18.0]
    torch.testing.assert_close(pooled, expected)


def test_pooling_reads_blocks_row_major_and_identity_when_the_grid_is_the_latent_grid():
    tokens = torch.arange(16, dtype=torch.float32).reshape(16, 1)  # 4 x 4 grid, value = 4 r + c
    pooled = pool_latent_grid(tokens, (1, 8, 8), merge_size=2, latent_tokens_per_span=4)
    assert pooled[:, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    assert torch.equal(pool_latent_grid(tokens, (1, 8, 8), 2, 16), tokens)


def test_a_grid_smaller_than_sqrt_k_is_an_error_naming_the_image():
    tokens = torch.zeros(2 * 6, 3)  # merged grid 2 x 6
    with pytest.raises(TargetsError, match=r"row 5, aux image 1: its merged vision grid is 2 x 6 tokens, smaller "
                                           r"than the sqrt\(K\) x sqrt\(K\) = 3 x 3"):
        pool_latent_grid(tokens, (1, 4, 12), 2, 9, where="row 5, aux image 1")


def test_too_small_grid_error_names_the_row_and_image_in_a_dataset(jsonl, base_model_and_processor):
    model, processor = base_model_and_processor
    dataset = load_jsonl(jsonl)
    with pytest.raises(TargetsError, match=r"row 0 \(id='two'\), aux image 1: its merged vision grid is 3 x 5"):
        compute_latent_targets(dataset, model, processor.image_processor, latent_tokens_per_span=16, progress=False)


def test_gap_targets_reports_every_aux_image_too_small_for_k_in_one_pass(tmp_path, jsonl, tiny_base_dir, capsys):
    out = tmp_path / "out"
    args = ["targets", "--data", str(jsonl), "--model", str(tiny_base_dir), "--output-dir", str(out),
            "--latent-tokens-per-span", "25", "--no-progress"]
    assert gap_main(args) == 2
    err = capsys.readouterr().err
    assert ("error: 3 of 3 aux images have a merged vision grid smaller than the sqrt(K) x sqrt(K) = 5 x 5 latent "
            "grid (K=25): row 0 (id='two'), aux image 0: 112 x 112 pixels, 4 x 4 merged tokens; row 0 (id='two'), "
            "aux image 1: 150 x 90 pixels, 3 x 5 merged tokens; row 2 (id='one'), aux image 0: 112 x 112 pixels, "
            "4 x 4 merged tokens. Use larger aux images") in err, err
    assert not out.exists() and not (tmp_path / ".out.cache").exists()  # found before any encoding
    assert gap_main(args[:-2] + ["16", "--no-progress"]) == 2  # the same grid the tower gives (3 x 5 above)
    assert "1 of 3 aux images" in capsys.readouterr().err


# encoding --------------------------------------------------------------------------------------------------------


def test_targets_are_k_by_d_pooled_merged_vision_tokens_of_the_model(base_model_and_processor, tiny_image):
    model, processor = base_model_and_processor
    images = [tiny_image(seed=1), tiny_image(seed=2, size=(150, 90))]
    targets = targets_for_images(model, processor.image_processor, images, K)
    assert [t.shape for t in targets] == [(K, D), (K, D)]
    inputs = processor.image_processor(images=images, return_tensors="pt")
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    grid = features[1].reshape(3, 5, D)  # 150 x 90 -> patch grid 6 x 10 -> merged 3 x 5
    torch.testing.assert_close(targets[1][0], grid[0:2, 0:3].reshape(-1, D).mean(0))
    torch.testing.assert_close(targets[1][3], grid[1:3, 2:5].reshape(-1, D).mean(0))


def test_the_vision_tower_alone_loads_from_a_checkpoint_and_matches_the_model(tiny_base_dir, base_model_and_processor,
                                                                              tiny_image):
    model, processor = base_model_and_processor
    tower = load_vision_tower(tiny_base_dir)
    assert not any(p.requires_grad for p in tower.parameters()) and not tower.training
    inputs = processor.image_processor(images=[tiny_image(seed=4)], return_tensors="pt")
    from_tower = encode_images(tower, inputs["pixel_values"], inputs["image_grid_thw"])
    from_visual = encode_images(model.model.visual, inputs["pixel_values"], inputs["image_grid_thw"])
    from_model = encode_images(model, inputs["pixel_values"], inputs["image_grid_thw"])
    assert torch.equal(from_tower[0], from_model[0]) and torch.equal(from_visual[0], from_model[0])


def test_load_vision_tower_refuses_a_folder_without_a_checkpoint(tmp_path):
    with pytest.raises(TargetsError, match="no config.json"):
        load_vision_tower(tmp_path)


# the stored column -------------------------------------------------------------------------------------------------


def test_column_round_trips_save_load_with_recorded_k_and_d(tmp_path, jsonl, base_model_and_processor, tiny_gap):
    import datasets

    model, processor = base_model_and_processor
    dataset = load_jsonl(jsonl)
    result, summary = compute_latent_targets(dataset, model, processor.image_processor, latent_tokens_per_span=K,
                                             batch_size=2, progress=False)
    assert result.features[TARGETS_COLUMN].shape == (None, D) and result.features[TARGETS_COLUMN].dtype == "float16"
    assert summary["num_spans"] == 3 and summary["num_vectors"] == 3 * K and summary["num_rows_with_spans"] == 2
    result.save_to_disk(tmp_path / "targets")
    loaded = datasets.load_from_disk(str(tmp_path / "targets"))
    metadata = targets_metadata(loaded)
    assert metadata == targets_metadata(tmp_path / "targets")
    assert (metadata["latent_tokens_per_span"], metadata["hidden_size"], metadata["grid_side"]) == (K, D, 2)
    assert metadata["storage_dtype"] == "float16"
    assert metadata["image_processor"]["merge_size"] == 2 and metadata["image_processor"]["patch_size"] == 14
    column = loaded.with_format("numpy")[TARGETS_COLUMN]
    assert [c.shape for c in column] == [(2 * K, D), (0, D), (K, D)]
    images = [load_image_for(jsonl, "a0.png"), load_image_for(jsonl, "a1.png"), load_image_for(jsonl, "a2.png")]
    expected = torch.cat(targets_for_images(model, processor.image_processor, images, K))
    stored = torch.from_numpy(np.concatenate([column[0], column[2]]))
    torch.testing.assert_close(stored, expected.half().float(), rtol=0, atol=0)
    as_torch = loaded.with_format("torch")[0][TARGETS_COLUMN]
    assert isinstance(as_torch, torch.Tensor) and as_torch.shape == (2 * K, D)
    # training refuses targets pooled for another K or from another model
    assert check_targets_compatible(tmp_path / "targets", tiny_gap.config)["hidden_size"] == D
    other_k = tiny_gap.config.__class__(**{**tiny_gap.config.to_dict(), "latent_tokens_per_span": 9})
    with pytest.raises(TargetsError, match=r"pooled for K=4 .* the model has K=9"):
        check_targets_compatible(loaded, other_k)
    wide = tiny_gap.config.__class__(**{**tiny_gap.config.to_dict(), "latent_head_type": "full"})
    wide.text_config.hidden_size = 128
    with pytest.raises(TargetsError, match=r"width d=64 but the model's hidden size is d=128"):
        check_targets_compatible(loaded, wide)


def load_image_for(jsonl, name):
    from PIL import Image

    return Image.open(jsonl.parent / name)


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_storage_dtypes(jsonl, base_model_and_processor, storage):
    model, processor = base_model_and_processor
    dataset = load_jsonl(jsonl).select([2])
    result, _ = compute_latent_targets(dataset, model, processor.image_processor, latent_tokens_per_span=K,
                                       storage_dtype=storage, progress=False)
    assert result.features[TARGETS_COLUMN].dtype == "float32"
    stored = torch.from_numpy(result.with_format("numpy")[0][TARGETS_COLUMN])
    exact = targets_for_images(model, processor.image_processor, [load_image_for(jsonl, "a2.png")], K)[0]
    expected = exact if storage == "float32" else exact.to(torch.bfloat16).float()
    assert torch.equal(stored, expected)
    assert targets_metadata(result)["storage_dtype"] == storage


def test_data_without_metadata_or_column_is_refused(jsonl, tiny_gap):
    dataset = load_jsonl(jsonl)
    with pytest.raises(TargetsError, match="not written by `gap targets`"):
        check_targets_compatible(dataset, tiny_gap.config)


def test_pca_fits_on_the_targets_column(tmp_path, jsonl, base_model_and_processor):
    model, processor = base_model_and_processor
    result, _ = compute_latent_targets(load_jsonl(jsonl), model, processor.image_processor, latent_tokens_per_span=K,
                                       progress=False)
    result.save_to_disk(tmp_path / "targets")
    fit = fit_pca(iter_target_vectors(tmp_path / "targets"))
    assert fit.n == 3 * K and fit.d == D
    vectors = np.concatenate([v for v in result.with_format("numpy")[TARGETS_COLUMN] if len(v)]).astype(np.float64)
    np.testing.assert_allclose(fit.mean.numpy(), vectors.mean(0), rtol=1e-6, atol=1e-7)


# the command --------------------------------------------------------------------------------------------------------


def test_gap_targets_command_writes_the_dataset_and_a_summary(tmp_path, jsonl, tiny_base_dir, capsys):
    out = tmp_path / "out"
    args = ["targets", "--data", str(jsonl), "--model", str(tiny_base_dir), "--output-dir", str(out),
            "--latent-tokens-per-span", str(K), "--no-progress"]
    assert gap_main(args) == 0
    printed = capsys.readouterr().out
    assert "3 x K=4 (2x2 pooled grid) = 12 vectors" in printed and "rows            3 (2 with latent spans)" in printed
    assert targets_metadata(out)["latent_tokens_per_span"] == K
    assert gap_main(args) == 2  # refuses to overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    assert gap_main(args + ["--overwrite", "--dtype", "float32"]) == 0
    assert targets_metadata(out)["storage_dtype"] == "float32"
    bad_k = ["targets", "--data", str(jsonl), "--model", str(tiny_base_dir), "--output-dir", str(tmp_path / "o2"),
             "--latent-tokens-per-span", "5"]
    assert gap_main(bad_k) == 2 and "not a perfect square" in capsys.readouterr().err


def test_targets_refuse_to_write_into_the_model_folder(tiny_base_dir, capsys):
    status = gap_main(["targets", "--model", str(tiny_base_dir), "--data", str(tiny_base_dir / "missing.jsonl"),
                       "--output-dir", str(tiny_base_dir), "--overwrite"])
    assert status == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --output-dir {tiny_base_dir} is the --model folder {tiny_base_dir}; writing there could delete or "
        "alter an input: choose a folder apart from every input")
