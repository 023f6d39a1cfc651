"""train_sft.py: GapSFTTrainer mechanics, the CLI and its presets, DeepSpeed ZeRO-2/ZeRO-3 on 2 CPU processes.

The data go through the real pipeline: rows -> `compute_latent_targets` (tiny base vision tower) -> PCA fitted on
those targets -> `convert_checkpoint`, so the latent loss can actually fall.
"""

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from trl import SFTConfig

import train_sft
from gap_pipeline.collator import GapDataCollator
from gap_pipeline.convert import convert_checkpoint
from gap_pipeline.data import from_dataset
from gap_pipeline.pca import fit_pca, save_basis
from gap_pipeline.targets import TARGETS_COLUMN, compute_latent_targets
from gap_pipeline.tiny import build_tiny_base_model
from modeling_gap import GapForConditionalGeneration
from processing_gap import GapProcessor
from train_sft import GapSFTTrainer


REPO = Path(__file__).resolve().parent.parent
K = 4
PCA_K = 16
TEXT_ONLY_ROWS = (1, 5)  # no image, no latent span
STRIPPED_ROW = 6  # accuracy above tau: its span is stripped, it keeps its image


def _row(i, image):
    if i in TEXT_ONLY_ROWS:
        return {
            "id": f"row{i}",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": f"Say hello to row {i}."}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"Hello row {i}."}]},
            ],
            "images": [],
            "aux_images": [],
            "accuracy": 0.0,
        }
    return {
        "id": f"row{i}",
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"How many red cells are in row {i % 4}?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"Look at the row. <latent> The answer is {i % 5}."}]},
        ],
        "images": [image(seed=i)],
        "aux_images": [image(seed=100 + i)],
        "accuracy": 0.75 if i == STRIPPED_ROW else 0.0,
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_base_dir, tiny_image):
    """8 rows with latent targets, a PCA fitted on them, and the GAP checkpoint converted with it."""
    root = tmp_path_factory.mktemp("train_sft")
    rows = from_dataset(datasets.Dataset.from_list([_row(i, tiny_image) for i in range(8)]))
    base_model, base_processor = build_tiny_base_model(seed=0)
    data, _ = compute_latent_targets(rows, base_model, base_processor.image_processor, latent_tokens_per_span=K,
                                     progress=False)
    data.save_to_disk(str(root / "data"))
    fit = fit_pca(v for v in data.with_format("numpy")[TARGETS_COLUMN] if len(v))
    pca = save_basis(root / "pca", fit.basis(PCA_K))
    convert_checkpoint(tiny_base_dir, root / "gap", pca, latent_tokens_per_span=K, latent_adapter_size=32,
                       dtype="float32")
    return SimpleNamespace(root=root, base=Path(tiny_base_dir), data=root / "data", pca=pca, gap=root / "gap")


def _args(output_dir, **overrides):
    values = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        bf16=False,
        activation_checkpointing=False,
        max_length=None,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        logging_steps=1,
        disable_tqdm=True,
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        seed=0,
    )
    values.update(overrides)
    return SFTConfig(**values)


def _trainer(work, output_dir, rows=None, trainer_kwargs=None, **args):
    model = GapForConditionalGeneration.from_pretrained(work.gap).train()
    processor = GapProcessor.from_pretrained(work.gap, trust_remote_code=False)
    dataset = datasets.load_from_disk(str(work.data))
    if rows is not None:
        dataset = dataset.select(rows)
    return GapSFTTrainer(
        model,
        args=_args(output_dir, **args),
        data_collator=GapDataCollator(processor),
        train_dataset=dataset,
        processing_class=processor,
        **(trainer_kwargs or {}),
    )


def _first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


# -- TRL integration -----------------------------------------------------------------------------------------------


def test_trl_fused_head_is_removed_and_the_gap_columns_reach_the_collator(work, tmp_path):
    trainer = _trainer(work, tmp_path, rows=[0, 1, 2, 3])
    # SFTTrainer installed an instance-level fused-LM-head forward; GapSFTTrainer removed it.
    assert "forward" not in vars(trainer.model)
    assert type(trainer.model).forward is GapForConditionalGeneration.forward
    assert trainer.model_accepts_loss_kwargs and trainer.args.remove_unused_columns
    batch = _first_batch(trainer)  # remove_unused_columns is on: latent_targets must survive it
    assert batch["latent_embeds"].dtype == torch.float32
    assert batch["latent_embeds"].shape == (3 * K, 64)  # rows 0, 2, 3 keep one span each
    loss = trainer.compute_loss(trainer.model, batch)
    metrics = trainer._metrics["train"]
    assert metrics["latent_loss"][-1] > 0 and math.isfinite(metrics["lm_loss"][-1])
    assert loss.item() == pytest.approx(metrics["lm_loss"][-1] + metrics["latent_loss"][-1], rel=1e-5)


def test_vision_tower_runs_on_every_micro_batch_with_and_without_images(work, tmp_path):
    trainer = _trainer(work, tmp_path, rows=[1, 5], per_device_train_batch_size=2)
    calls = []
    handle = trainer.model.model.visual.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    try:
        text_batch = _first_batch(trainer)
        assert "pixel_values" not in text_batch and "latent_embeds" not in text_batch
        trainer.compute_loss(trainer.model, text_batch)
        image_batch = _first_batch(_trainer(work, tmp_path, rows=[0, 2], per_device_train_batch_size=2))
        trainer.compute_loss(trainer.model, image_batch)
    finally:
        handle.remove()
    vision = trainer.model.config.vision_config
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    assert calls == [(vision.spatial_merge_size**2, patch_dim), tuple(image_batch["pixel_values"].shape)]


# -- optimizer and frozen tower ------------------------------------------------------------------------------------


def test_head_learning_rate_is_on_exactly_the_head_parameters(work, tmp_path):
    trainer = _trainer(work, tmp_path, rows=[0], weight_decay=0.1,
                       trainer_kwargs={"latent_head_learning_rate": 7e-4})
    optimizer = trainer.create_optimizer()
    head = {id(p) for p in trainer.model.latent_head.parameters()}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    seen = []
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        seen += list(ids)
        if ids & head:
            assert ids <= head and group["lr"] == 7e-4
        else:
            assert group["lr"] == 2e-3
        decays = {names[i].endswith(".bias") or "norm" in names[i] for i in ids}
        assert decays == {group["weight_decay"] == 0.0}  # weight decay as the Trainer assigns it
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert len(seen) == len(set(seen)) and set(seen) == trainable and head <= trainable
    assert not any(p.requires_grad for p in trainer.model.model.visual.parameters())


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_vision_tower_gets_no_gradient(work, tmp_path, freeze):
    trainer = _trainer(work, tmp_path, rows=[0, 1], per_device_train_batch_size=2,
                       trainer_kwargs={"freeze_vision_tower": freeze})
    trainer.compute_loss(trainer.model, _first_batch(trainer)).backward()
    tower = list(trainer.model.model.visual.parameters())
    if freeze:
        assert all(p.grad is None for p in tower)
    else:
        assert all(p.grad is not None for p in tower) and any(p.grad.abs().sum() > 0 for p in tower)
    assert all(p.grad is not None for p in trainer.model.latent_head.parameters())
    assert trainer.model.model.language_model.embed_tokens.weight.grad is not None


# -- loss normalisation and logging --------------------------------------------------------------------------------


def test_logged_losses_of_two_accumulation_steps_equal_one_step_on_the_same_rows(work, tmp_path):
    # Rows 0, 1 hold one span (4 latents); rows 2, 3 hold two spans (8): per-micro-batch means would differ.
    one = _trainer(work, tmp_path / "one", rows=[0, 1, 2, 3], per_device_train_batch_size=4, max_steps=1)
    two = _trainer(work, tmp_path / "two", rows=[0, 1, 2, 3], per_device_train_batch_size=2,
                   gradient_accumulation_steps=2, max_steps=1)
    one.train()
    two.train()
    first, second = one.state.log_history[0], two.state.log_history[0]
    for key in ("loss", "lm_loss", "latent_loss", "latent_norm_ratio", "grad_norm"):
        assert second[key] == pytest.approx(first[key], rel=1e-5), key
    reference = GapForConditionalGeneration.from_pretrained(work.gap)  # the weights before the step
    with torch.no_grad():
        full = reference(**one._prepare_inputs(next(iter(one.get_train_dataloader()))))
    assert first["latent_loss"] == pytest.approx(full.latent_loss.item(), rel=1e-5)
    assert first["lm_loss"] == pytest.approx(full.lm_loss.item(), rel=1e-5)


def test_tiny_model_overfits_eight_rows(work, tmp_path):
    trainer = _trainer(work, tmp_path, per_device_train_batch_size=8, max_steps=20, learning_rate=3e-3,
                       trainer_kwargs={"latent_head_learning_rate": 1e-2})
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "lm_loss" in entry and "train_runtime" not in entry]
    assert len(logs) == 20
    assert all({"loss", "lm_loss", "latent_loss", "latent_norm_ratio", "mean_token_accuracy"} <= set(e) for e in logs)
    assert logs[-1]["latent_loss"] <= 0.5 * logs[0]["latent_loss"]
    assert logs[-1]["lm_loss"] < 0.7 * logs[0]["lm_loss"]
    for entry in logs:
        assert entry["loss"] == pytest.approx(entry["lm_loss"] + entry["latent_loss"], rel=1e-4)


def test_evaluation_logs_both_loss_terms(work, tmp_path):
    trainer = _trainer(work, tmp_path, rows=[0, 1, 2, 3], per_device_eval_batch_size=2)
    dataset = datasets.load_from_disk(str(work.data)).select([4, 5, 6, 7])
    metrics = trainer.evaluate(eval_dataset=dataset)
    assert {"eval_loss", "eval_lm_loss", "eval_latent_loss", "eval_latent_norm_ratio"} <= set(metrics)
    assert metrics["eval_latent_loss"] > 0 and math.isfinite(metrics["eval_lm_loss"])
