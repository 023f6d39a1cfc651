"""train_sft.py and gap_pipeline.trainer: GapSFTTrainer mechanics, the CLI and its presets, DeepSpeed ZeRO-2/ZeRO-3 on 2 CPU processes.

The data, PCA and converted checkpoint are conftest's `work` fixture (8 rows through the real pipeline).
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch

import train_sft
from gap_pipeline.collator import GapDataCollator
from modeling_gap import GapForConditionalGeneration
from processing_gap import GapProcessor
from gap_pipeline.trainer import GapSFTConfig, GapSFTTrainer, TrainingError, apply_global_batch_size
from tests.support import REPO, K, build_trainer, clean_env, first_batch, sft_config


# -- TRL integration -----------------------------------------------------------------------------------------------


def test_trl_fused_head_is_removed_and_the_gap_columns_reach_the_collator(work, tmp_path):
    trainer = build_trainer(work, tmp_path, rows=[0, 1, 2, 3])
    # SFTTrainer installed an instance-level fused-LM-head forward; GapSFTTrainer removed it.
    assert "forward" not in vars(trainer.model)
    assert type(trainer.model).forward is GapForConditionalGeneration.forward
    assert trainer.model_accepts_loss_kwargs and trainer.args.remove_unused_columns
    batch = first_batch(trainer)  # remove_unused_columns is on: latent_targets must survive it
    assert batch["latent_embeds"].dtype == torch.float32
    assert batch["latent_embeds"].shape == (3 * K, 64)  # rows 0, 2, 3 keep one span each
    loss = trainer.compute_loss(trainer.model, batch)
    metrics = trainer._metrics["train"]
    assert metrics["latent_loss"][-1] > 0 and math.isfinite(metrics["lm_loss"][-1])
    assert loss.item() == pytest.approx(metrics["lm_loss"][-1] + metrics["latent_loss"][-1], rel=1e-5)


def test_vision_tower_runs_on_every_micro_batch_with_and_without_images(work, tmp_path):
    trainer = build_trainer(work, tmp_path, rows=[1, 5], per_device_train_batch_size=2)
    calls = []
    handle = trainer.model.model.visual.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    try:
        text_batch = first_batch(trainer)
        assert "pixel_values" not in text_batch and "latent_embeds" not in text_batch
        trainer.compute_loss(trainer.model, text_batch)
        image_batch = first_batch(build_trainer(work, tmp_path, rows=[0, 2], per_device_train_batch_size=2))
        trainer.compute_loss(trainer.model, image_batch)
    finally:
        handle.remove()
    vision = trainer.model.config.vision_config
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    assert calls == [(vision.spatial_merge_size**2, patch_dim), tuple(image_batch["pixel_values"].shape)]


def test_a_plain_sft_config_is_converted_and_the_callers_arguments_are_not_changed(work, tmp_path):
    from peft import LoraConfig
    from trl import SFTConfig

    values = sft_config(tmp_path).to_dict()
    plain = SFTConfig(**{key: values[key] for key in ("output_dir", "use_cpu", "report_to", "learning_rate")})
    lora = LoraConfig(r=4, target_modules=["q_proj"])
    model = GapForConditionalGeneration.from_pretrained(work.gap)
    processor = GapProcessor.from_pretrained(work.gap, trust_remote_code=False)
    trainer = GapSFTTrainer(model, args=plain, data_collator=GapDataCollator(processor),
                            train_dataset=datasets.load_from_disk(str(work.data)), processing_class=processor,
                            peft_config=lora)
    assert isinstance(trainer.args, GapSFTConfig) and trainer.args.latent_head_learning_rate == 2e-3
    assert trainer.args.dataset_kwargs == {"skip_prepare_dataset": True}
    assert plain.dataset_kwargs is None  # the caller's config is left as given
    assert lora.modules_to_save is None and lora.target_modules == {"q_proj"}  # so is the caller's LoRA config
    assert "latent_head" in trainer.model.peft_config["default"].modules_to_save


# -- optimizer and frozen tower ------------------------------------------------------------------------------------


def test_head_learning_rate_is_on_exactly_the_head_parameters(work, tmp_path):
    trainer = build_trainer(work, tmp_path, rows=[0], weight_decay=0.1,
                            latent_head_learning_rate=7e-4)
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
    trainer = build_trainer(work, tmp_path, rows=[0, 1], per_device_train_batch_size=2,
                            freeze_vision_tower=freeze)
    trainer.compute_loss(trainer.model, first_batch(trainer)).backward()
    tower = list(trainer.model.model.visual.parameters())
    if freeze:
        assert all(p.grad is None for p in tower)
    else:
        assert all(p.grad is not None for p in tower) and any(p.grad.abs().sum() > 0 for p in tower)
    assert all(p.grad is not None for p in trainer.model.latent_head.parameters())
    assert trainer.model.model.language_model.embed_tokens.weight.grad is not None


def test_cached_image_features_train_exactly_like_the_tower_and_skip_it_after_the_first_epoch(work, tmp_path):
    runs = {}
    for cache_mb in (1024.0, 0.0):  # the default, and off
        trainer = build_trainer(work, tmp_path / str(cache_mb), per_device_train_batch_size=4, max_steps=4,
                                image_feature_cache_mb=cache_mb)  # 8 rows: two epochs of two steps
        calls = []
        handle = trainer.model.model.visual.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
        try:
            trainer.train()
        finally:
            handle.remove()
        runs[cache_mb] = trainer, calls
    (cached, cached_calls), (plain, plain_calls) = runs[1024.0], runs[0.0]
    assert plain._feature_cache is None and cached.data_collator.feature_cache is None  # lent during train() only
    assert len(cached._feature_cache) == 6  # the six rows with an image
    assert len(plain_calls) == 4 and cached_calls == plain_calls[:2]  # the second epoch took every feature from it
    for key in ("loss", "lm_loss", "latent_loss", "grad_norm", "mean_token_accuracy", "latent_relse"):
        assert [log.get(key) for log in cached.state.log_history] == [log.get(key) for log in plain.state.log_history]
    plain_state = plain.model.state_dict()
    assert all(torch.equal(value, plain_state[name]) for name, value in cached.model.state_dict().items())

    assert "image_keys" not in first_batch(cached)  # outside train() a batch is a plain one
    cached.data_collator.feature_cache = cached._feature_cache  # as during train(): every image is known, no pixels
    batch = first_batch(cached)
    assert "pixel_values" not in batch and batch["cached_images"].all()
    cached.model.model.visual.requires_grad_(True)
    with pytest.raises(TrainingError, match="vision tower is trainable"):
        cached.compute_loss(cached.model, batch)
    assert build_trainer(work, tmp_path, rows=[0], freeze_vision_tower=False)._feature_cache is None


# -- loss normalisation and logging --------------------------------------------------------------------------------


def test_logged_losses_of_two_accumulation_steps_equal_one_step_on_the_same_rows(work, tmp_path):
    # Rows 0, 1 hold one span (4 latents); rows 2, 3 hold two spans (8): per-micro-batch means would differ.
    one = build_trainer(work, tmp_path / "one", rows=[0, 1, 2, 3], per_device_train_batch_size=4, max_steps=1)
    two = build_trainer(work, tmp_path / "two", rows=[0, 1, 2, 3], per_device_train_batch_size=2,
                        gradient_accumulation_steps=2, max_steps=1)
    one.train()
    two.train()
    first, second = one.state.log_history[0], two.state.log_history[0]
    for key in ("loss", "lm_loss", "latent_loss", "latent_norm_ratio", "latent_relse", "grad_norm"):
        assert second[key] == pytest.approx(first[key], rel=1e-5), key
    reference = GapForConditionalGeneration.from_pretrained(work.gap)  # the weights before the step
    with torch.no_grad():
        full = reference(**one._prepare_inputs(next(iter(one.get_train_dataloader()))))
    assert first["latent_loss"] == pytest.approx(full.latent_loss.item(), rel=1e-5)
    assert first["lm_loss"] == pytest.approx(full.lm_loss.item(), rel=1e-5)


def test_tiny_model_overfits_eight_rows(work, tmp_path):
    trainer = build_trainer(work, tmp_path, per_device_train_batch_size=8, max_steps=60, learning_rate=3e-3,
                            latent_head_learning_rate=3e-3)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "lm_loss" in entry and "train_runtime" not in entry]
    assert len(logs) == 60
    assert all({"loss", "lm_loss", "latent_loss", "latent_norm_ratio", "mean_token_accuracy"} <= set(e) for e in logs)
    assert logs[-1]["latent_loss"] <= 0.5 * logs[0]["latent_loss"]
    assert logs[-1]["lm_loss"] < 0.7 * logs[0]["lm_loss"]
    for entry in logs:
        assert entry["loss"] == pytest.approx(entry["lm_loss"] + entry["latent_loss"], rel=1e-4)


def test_evaluation_logs_both_loss_terms_and_the_held_out_latent_error(work, tmp_path):
    trainer = build_trainer(work, tmp_path, rows=[0, 1, 2, 3], per_device_eval_batch_size=4)
    dataset = datasets.load_from_disk(str(work.data)).select([4, 5, 6, 7])
    metrics = trainer.evaluate(eval_dataset=dataset)
    assert {"eval_loss", "eval_lm_loss", "eval_latent_loss", "eval_latent_norm_ratio", "eval_latent_relse"} <= set(metrics)
    assert metrics["eval_latent_loss"] > 0 and math.isfinite(metrics["eval_lm_loss"])
    # the relative squared error of the teacher-forced predictions over every held-out latent position
    batch = trainer._prepare_inputs(next(iter(trainer.get_eval_dataloader(dataset))))
    with torch.no_grad():
        out = trainer.model.eval()(**batch)
    v_hat, v = out.latent_predictions.float(), batch["latent_embeds"].float()
    expected = ((v_hat - v).pow(2).sum() / v.pow(2).sum()).item()
    assert metrics["eval_latent_relse"] == pytest.approx(expected, rel=1e-4)


def test_compute_metrics_gets_logits_and_labels_of_matching_shape(work, tmp_path):
    seen = []

    def compute_metrics(prediction):
        logits, labels = prediction.predictions, prediction.label_ids
        seen.append((logits.shape, labels.shape))
        # the layout of any causal LM: logits at t predict label t + 1
        supervised = labels[:, 1:] != -100
        return {"accuracy": float((logits[:, :-1].argmax(-1)[supervised] == labels[:, 1:][supervised]).mean())}

    trainer = build_trainer(work, tmp_path, rows=[0, 1, 2, 3], per_device_eval_batch_size=2,
                            trainer_kwargs={"compute_metrics": compute_metrics})
    dataset = datasets.load_from_disk(str(work.data)).select([4, 5, 6, 7])
    metrics = trainer.evaluate(eval_dataset=dataset)
    (logits_shape, labels_shape), = seen
    assert logits_shape[:2] == labels_shape and logits_shape[0] == 4  # (rows, seq, vocab) next to (rows, seq)
    assert logits_shape[2] == trainer.model.config.text_config.vocab_size
    # the same supervised positions as the trainer's own token accuracy (two batches of two rows, averaged)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and "eval_mean_token_accuracy" in metrics


# -- the command line ----------------------------------------------------------------------------------------------


def _code_processor_and_weights(folder):
    names = {p.name for p in Path(folder).iterdir()}
    expected = {"configuration_gap.py", "modeling_gap.py", "processing_gap.py", "processor_config.json",
                "chat_template.jinja", "tokenizer.json", "config.json", "model.safetensors"}
    return expected - names


def test_python_launch_converts_a_base_checkpoint_and_saves_complete_checkpoints(work, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "train_sft.py"), "--config", str(REPO / "configs" / "tiny_cpu.yaml"),
               "--model_name_or_path", str(work.base), "--pca_path", str(work.pca), "--dataset_path", str(work.data),
               "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", "4",
               "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1",
               "--latent_tokens_per_span", str(K)]
    run = subprocess.run(command, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    config = json.loads((out / "_gap-init" / "config.json").read_text())
    assert config["model_type"] == "gap_qwen2_5_vl" and config["latent_tokens_per_span"] == K
    for folder in (out / "checkpoint-2", out / "checkpoint-4", out):
        assert not _code_processor_and_weights(folder), folder
    logs = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in logs if "lm_loss" in entry and "train_runtime" not in entry]
    assert [entry["step"] for entry in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(entry["latent_loss"]) and entry["latent_loss"] > 0 for entry in steps)


def test_a_user_error_prints_one_error_line_and_exits_2(tmp_path):
    command = [sys.executable, str(REPO / "train_sft.py"), "--config", str(REPO / "configs" / "tiny_cpu.yaml"),
               "--model_name_or_path", str(tmp_path / "model"), "--dataset_path", str(tmp_path / "data"),
               "--output_dir", str(tmp_path / "out"), "--global_batch_size", "7"]
    run = subprocess.run(command, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-4000:]
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == [run.stderr.strip().splitlines()[-1]]
    assert errors[0].startswith("error: --global_batch_size 7 is not a positive multiple of")


def test_presets_parse_and_global_batch_size_sets_accumulation(tmp_path):
    parser = train_sft.make_parser()
    required = ["--dataset_path", "data", "--model_name_or_path", "model", "--output_dir", str(tmp_path)]
    script_args, training_args, model_args = parser.parse_args_and_config(
        ["--config", str(REPO / "configs" / "gap_7b.yaml"), *required, "--bf16", "false", "--use_cpu", "true"]
    )
    assert (training_args.learning_rate, training_args.latent_head_learning_rate) == (1e-5, 1e-5)
    assert (training_args.weight_decay, training_args.lr_scheduler_type, training_args.warmup_steps) == (
        0.01, "cosine", 0.03)
    assert (training_args.num_train_epochs, training_args.seed, training_args.dataloader_num_workers) == (2, 12345, 16)
    assert training_args.activation_checkpointing and model_args.dtype == "bfloat16"
    assert (script_args.latent_tokens_per_span, script_args.latent_loss_weight, script_args.difficulty_threshold) == (
        36, 1.0, 0.0)
    assert training_args.freeze_vision_tower and script_args.global_batch_size == 128
    # one process here: 128 rows per step at 1 per device = 128 accumulation steps
    derived = apply_global_batch_size(training_args, script_args.global_batch_size)
    assert derived.gradient_accumulation_steps == 128 and derived.per_device_train_batch_size == 1
    with pytest.raises(ValueError, match="not a positive multiple"):
        apply_global_batch_size(sft_config(tmp_path, per_device_train_batch_size=3), 128)
    script_args, training_args, model_args = parser.parse_args_and_config(
        ["--config", str(REPO / "configs" / "tiny_cpu.yaml"), *required, "--no_freeze_vision_tower"]
    )
    assert not training_args.bf16 and not training_args.activation_checkpointing and training_args.use_cpu
    assert model_args.dtype == "float32" and not training_args.freeze_vision_tower
    # the CPU preset trains the latents as `gap demo` does: `sum` over d with lambda 5 (not the 7B's mean, lambda 1)
    assert (script_args.latent_loss_reduction, script_args.latent_loss_weight) == ("sum", 5.0)


# -- DeepSpeed, 2 CPU processes ------------------------------------------------------------------------------------

# Launched by the `deepspeed` launcher: train_sft's own parser and main, then the trained weights gathered from the
# engine (the fp32 master copy for a 16-bit latent head) and saved by rank 0 for comparison with the saved folder.
DS_SCRIPT = """
import json, sys
sys.path.insert(0, {repo!r})
import torch
from deepspeed import zero
from deepspeed.utils import safe_get_full_fp32_param
import train_sft

script_args, training_args, model_args = train_sft.make_parser().parse_args_and_config()
trainer = train_sft.main(script_args, training_args, model_args)
state = {{}}
for name, parameter in trainer.model.named_parameters():
    if name.startswith("latent_head.") and parameter.dtype != torch.float32:
        value = safe_get_full_fp32_param(parameter).reshape(parameter.ds_shape)
    else:
        with zero.GatheredParameters([parameter]):
            value = parameter.detach().clone()
    state[name] = value.cpu()
if trainer.args.process_index == 0:
    torch.save(state, training_args.output_dir + "/gathered.pt")
    with open(training_args.output_dir + "/log_history.json", "w") as f:
        json.dump(trainer.state.log_history, f)
print("world", trainer.args.world_size, "accumulation", trainer.args.gradient_accumulation_steps, flush=True)
trainer.end()
"""

# Run in a fresh process that never imported this repository: reload each saved folder with remote code.
RELOAD_SCRIPT = """
import json, sys
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

for out, init, checkpoint in json.loads(sys.argv[1]):
    gathered = torch.load(out + "/gathered.pt")
    for folder in (out, checkpoint):
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        assert type(processor).__name__ == "GapProcessor", type(processor).__name__
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    state = model.state_dict()
    for name, value in gathered.items():
        assert torch.equal(state[name].float(), value.float()), name
    assert all(p.dtype == torch.float32 for p in model.latent_head.parameters())
    with safe_open(out + "/model.safetensors", "pt") as f:
        head = {k: f.get_slice(k).get_dtype() for k in f.keys() if k.startswith("latent_head.")}
    assert set(head.values()) == {"F32"}, head
    with safe_open(init + "/model.safetensors", "pt") as f:
        before = f.get_tensor("latent_head.proj.weight")
    assert not torch.equal(before.float(), state["latent_head.proj.weight"].float()), "the head did not train"
    print("OK", out)
"""


def _ds_config(tmp_path, name, **zero_overrides):
    config = json.loads((REPO / "ds_configs" / name).read_text())
    config["zero_optimization"].update(zero_overrides)
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def deepspeed_runs(work, tmp_path_factory):
    """ZeRO-3 (from the base checkpoint, converted in the run) and ZeRO-2 (from the GAP checkpoint), launched
    together, 2 processes each, bf16, 2 steps; rank 1 gets a row with no image and no latent in the first step."""
    root = tmp_path_factory.mktemp("deepspeed")
    script = root / "train_and_gather.py"
    script.write_text(DS_SCRIPT.format(repo=str(REPO)))
    common = ["--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--dataset_path", str(work.data),
              "--bf16", "true", "--dtype", "bfloat16", "--per_device_train_batch_size", "1", "--max_steps", "2",
              "--logging_steps", "1", "--save_strategy", "steps", "--train_sampling_strategy", "sequential",
              "--latent_tokens_per_span", str(K), "--latent_loss_reduction", "mean", "--latent_loss_weight", "1.0"]
    runs = {
        "zero3": (29631, [
            "--deepspeed", str(_ds_config(root, "zero3.json", stage3_param_persistence_threshold=0)),
            "--model_name_or_path", str(work.base), "--pca_path", str(work.pca),
            "--converted_model_dir", str(root / "zero3-init"), "--global_batch_size", "4", "--save_steps", "1",
        ]),
        "zero2": (29632, [
            "--deepspeed", str(_ds_config(root, "zero2.json")), "--model_name_or_path", str(work.gap),
            "--save_steps", "2",
        ]),
    }
    processes, logs = {}, {}
    start = time.monotonic()
    for stage, (port, extra) in runs.items():
        out = root / stage
        logs[stage] = open(root / f"{stage}.log", "w")
        command = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2",
                   "--master_port", str(port), str(script), *common, *extra, "--output_dir", str(out)]
        processes[stage] = subprocess.Popen(command, cwd=root, env=clean_env(), stdout=logs[stage],
                                            stderr=subprocess.STDOUT, start_new_session=True)
    codes = {}
    for stage, process in processes.items():
        try:
            codes[stage] = process.wait(timeout=max(1.0, 300 - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)  # the launcher and its ranks share this session
            codes[stage] = "timeout"
        logs[stage].close()
    results = {stage: SimpleNamespace(code=codes[stage], out=root / stage, log=(root / f"{stage}.log").read_text())
               for stage in runs}
    done = [stage for stage in runs if codes[stage] == 0]
    inits = {"zero3": root / "zero3-init", "zero2": work.gap}
    checkpoints = {"zero3": root / "zero3" / "checkpoint-1", "zero2": root / "zero2" / "checkpoint-2"}
    if done:
        argument = json.dumps([[str(root / s), str(inits[s]), str(checkpoints[s])] for s in done])
        reload = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, argument], cwd=root, env=clean_env(),
                                capture_output=True, text=True, timeout=300)
        for stage in done:
            results[stage].reload = reload
    return results


@pytest.mark.parametrize("stage", ["zero3", "zero2"])
def test_deepspeed_two_processes_train_save_and_reload(deepspeed_runs, stage):
    run = deepspeed_runs[stage]
    assert run.code == 0, run.log[-6000:]
    assert "world 2 accumulation " + ("2" if stage == "zero3" else "1") in run.log
    assert run.reload.returncode == 0, run.reload.stderr[-4000:]
    assert f"OK {run.out}" in run.reload.stdout
    logs = json.loads((run.out / "log_history.json").read_text())
    steps = [entry for entry in logs if "lm_loss" in entry and "train_runtime" not in entry]
    assert [entry["step"] for entry in steps] == [1, 2]
    assert all(math.isfinite(e["loss"]) and math.isfinite(e["latent_loss"]) and e["latent_loss"] > 0 for e in steps)
    for folder in [run.out] + sorted(run.out.glob("checkpoint-*")):
        assert not _code_processor_and_weights(folder), folder
    # the card records the launcher that started the run, not `python train_and_gather.py`
    assert "\ndeepspeed --num_gpus 2 train_and_gather.py --config " in (run.out / "README.md").read_text()


def test_deepspeed_loss_terms_are_normalised_over_both_ranks(deepspeed_runs, work):
    # ZeRO-2, first step: rank 0 trains row 0 (one span, 4 latents), rank 1 row 1 (no latent). Normalised per rank,
    # the latent loss would be half the loss of the two rows computed together.
    run = deepspeed_runs["zero2"]
    assert run.code == 0, run.log[-6000:]
    first = json.loads((run.out / "log_history.json").read_text())[0]
    model = GapForConditionalGeneration.from_pretrained(work.gap, dtype=torch.bfloat16)
    processor = GapProcessor.from_pretrained(work.gap, trust_remote_code=False)
    rows = datasets.load_from_disk(str(work.data)).select([0, 1])
    with torch.no_grad():
        both = model(**GapDataCollator(processor)(list(rows)))
    assert first["latent_loss"] == pytest.approx(both.latent_loss.item(), rel=5e-3)
    assert first["lm_loss"] == pytest.approx(both.lm_loss.item(), rel=5e-3)
