"""Supervised fine-tuning of a GAP model (paper §4, App. F): L = L_LM + lambda * L_latent (Eq. 2-3).

This script wires `gap_pipeline.trainer.GapSFTTrainer` (and its `GapSFTConfig`) to the command line.
`--model_name_or_path` is either a GAP checkpoint (loaded as is) or a plain Qwen2.5-VL checkpoint, which is first
converted with `--pca_path`, as `gap convert` does, into `--converted_model_dir` (default `<output_dir>/_gap-init`:
the Trainer's Hub pushes skip `_*`), then loaded from there, so ZeRO-3 partitions it while loading.

# One process (CPU or one GPU): the tiny CPU preset on the demo task, from a tiny base checkpoint
```bash
gap tiny-model --output-dir runs/tiny-base
gap demo-data --output-dir runs/demo/data
gap targets --data runs/demo/data/train.jsonl --model runs/tiny-base --latent-tokens-per-span 4 \
    --output-dir runs/demo/train_targets
gap fit-pca --targets runs/demo/train_targets --output-dir runs/demo/pca
python train_sft.py --config configs/tiny_cpu.yaml --model_name_or_path runs/tiny-base \
    --pca_path runs/demo/pca/pca.safetensors --dataset_path runs/demo/train_targets --output_dir runs/demo/sft
```

# DeepSpeed ZeRO-3 on the GPUs of one node, the paper's recipe (global batch 128 at 1 per device)
```bash
deepspeed --num_gpus 8 train_sft.py --config configs/gap_7b.yaml --deepspeed ds_configs/zero3.json \
    --model_name_or_path path/to/Qwen2.5-VL-7B-Instruct --pca_path runs/pca/pca.safetensors \
    --dataset_path runs/gap-data --output_dir runs/gap-7b
```

# Several nodes: a hostfile with one `hostname slots=N` line per node, launched once from the first
```bash
deepspeed --hostfile hostfile --master_addr node-0 --master_port 29500 train_sft.py --config configs/gap_7b.yaml \
    --deepspeed ds_configs/zero3.json --model_name_or_path runs/gap-7b-init --dataset_path runs/gap-data \
    --output_dir runs/gap-7b
```
(`torchrun --nproc_per_node 8 train_sft.py ...` launches the same way. Without an accelerator it trains on the CPU.)

# Push the final checkpoint with its model card; resume a run; LoRA, then merge; scheduled sampling
```bash
python train_sft.py ... --push_to_hub --hub_model_id me/gap-7b --base_model_id Qwen/Qwen2.5-VL-7B-Instruct
python train_sft.py ... --resume_from_checkpoint runs/gap-7b/checkpoint-500   # or `last`
python train_sft.py ... --use_peft --lora_r 64 --lora_alpha 128 --output_dir runs/gap-lora
gap merge-lora --adapter runs/gap-lora --output-dir runs/gap-lora-merged
python train_sft.py ... --scheduled_sampling_prob 0.25
```
"""

import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import set_seed
from trl import ModelConfig, TrlParser, get_peft_config

from configuration_gap import LATENT_HEAD_TYPES, LATENT_LOSS_REDUCTIONS
from gap_pipeline import GapError
from gap_pipeline.collator import GapDataCollator
from gap_pipeline.convert import ensure_gap_checkpoint
from gap_pipeline.datasets_io import check_apart_from_inputs
from gap_pipeline.inference import GAP_MODEL_TYPE, QWEN_MODEL_TYPE, checkpoint_model_type
from gap_pipeline.model_card import TrainingRun, command_line
from gap_pipeline.targets import load_targets_dataset
from gap_pipeline.trainer import (
    GapSFTConfig,
    GapSFTTrainer,
    TrainingError,
    apply_global_batch_size,
    check_targets_before_loading,
    last_checkpoint_of_run,
    load_for_training,
    run_record,
    zero3_init_disabled,
)


@dataclass
class GapScriptArguments:
    """GAP arguments of `train_sft.py`: the data, converting a base checkpoint, the collator (next to
    `GapSFTConfig` and TRL's `ModelConfig`)."""

    dataset_path: str = field(metadata={"help": "Training data: the dataset folder written by `gap targets`."})
    eval_dataset_path: str | None = field(
        default=None, metadata={"help": "Evaluation data, the same format (used when `eval_strategy` is not 'no')."}
    )
    pca_path: str | None = field(
        default=None, metadata={"help": "pca.safetensors from `gap fit-pca`; needed to convert a Qwen2.5-VL checkpoint."}
    )
    converted_model_dir: str | None = field(
        default=None,
        metadata={"help": "Where a Qwen2.5-VL checkpoint is converted to GAP before training (default "
                  "<output_dir>/_gap-init); reused if it already holds a GAP checkpoint."},
    )
    latent_tokens_per_span: int | None = field(
        default=None, metadata={"help": "K (a perfect square). Default: the checkpoint's, 36 when converting."}
    )
    latent_loss_weight: float | None = field(
        default=None, metadata={"help": "lambda of Eq. 3. Default: the checkpoint's, 1.0 when converting."}
    )
    latent_loss_reduction: str | None = field(
        default=None,
        metadata={"help": "'mean' (per element) or 'sum' (squared L2 over d, Eq. 2). Default: the checkpoint's, "
                  "'mean' when converting.", "choices": list(LATENT_LOSS_REDUCTIONS)},
    )
    latent_head_type: str = field(
        default="pca",
        metadata={"help": "Head built when converting: 'pca' (GAP) or 'full' (LH ablation).", "choices": list(LATENT_HEAD_TYPES)},
    )
    latent_adapter_size: int = field(default=1024, metadata={"help": "Width of the head's SwiGLU adapter, when converting."})
    difficulty_threshold: float = field(default=0.0, metadata={"help": "tau of Eq. 4: rows with accuracy > tau "
                                                                         "train on text only."})
    global_batch_size: int | None = field(default=None, metadata={"help": "Rows per optimizer step over all "
        "processes; sets gradient_accumulation_steps = it / (per_device_train_batch_size * world_size)."})
    base_model_id: str | None = field(
        default=None,
        metadata={"help": "Hub id of the base model (e.g. Qwen/Qwen2.5-VL-7B-Instruct) for the model card's "
                  "`base_model`, when --model_name_or_path is a local folder."},
    )


def make_parser() -> TrlParser:
    """`TrlParser` over (GapScriptArguments, GapSFTConfig, ModelConfig); `--config file.yaml` sets defaults."""
    parser = TrlParser((GapScriptArguments, GapSFTConfig, ModelConfig))
    if not torch.accelerator.is_available():
        # no accelerator: train on the CPU (accelerate counts the processes; DeepSpeed uses gloo)
        parser.set_defaults(use_cpu=True)
    return parser


def main(script_args: GapScriptArguments, training_args: GapSFTConfig, model_args: ModelConfig, argv=None):
    """Convert or load the model, load the data, train, save or push; returns the trainer (`argv`: for the card)."""
    training_args = apply_global_batch_size(training_args, script_args.global_batch_size)
    if training_args.deepspeed and training_args.use_cpu:
        import deepspeed  # on CPUs DeepSpeed needs its process group before `zero.Init` builds the model

        deepspeed.init_distributed(dist_backend="gloo")
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise TrainingError("Quantized loading is not supported by train_sft.py (the latent head trains in fp32).")
    if model_args.model_name_or_path is None:
        raise TrainingError("Pass --model_name_or_path: a GAP checkpoint or a plain Qwen2.5-VL checkpoint folder.")
    inputs = {"--model_name_or_path": model_args.model_name_or_path, "--dataset_path": script_args.dataset_path,
              "--eval_dataset_path": script_args.eval_dataset_path, "--pca_path": script_args.pca_path}
    check_apart_from_inputs(training_args.output_dir, inputs, TrainingError, option="--output_dir")
    if script_args.converted_model_dir is not None:
        check_apart_from_inputs(script_args.converted_model_dir, inputs, TrainingError, option="--converted_model_dir")
    set_seed(training_args.seed)  # before the model exists: converting draws the latent head's adapter weights
    path, revision = model_args.model_name_or_path, model_args.model_revision
    model_type = checkpoint_model_type(path, revision, TrainingError)
    gap_options = {"latent_tokens_per_span": script_args.latent_tokens_per_span,
                   "latent_loss_weight": script_args.latent_loss_weight,
                   "latent_loss_reduction": script_args.latent_loss_reduction}
    if training_args.eval_strategy != "no" and script_args.eval_dataset_path is None:
        raise TrainingError(f"eval_strategy={training_args.eval_strategy!r} needs --eval_dataset_path.")
    datasets = [script_args.dataset_path] + ([script_args.eval_dataset_path] if training_args.eval_strategy != "no"
                                             else [])
    if model_type in (QWEN_MODEL_TYPE, GAP_MODEL_TYPE):  # K, d and the vision tower, before converting or loading
        check_targets_before_loading(datasets, path, revision=revision, converting=model_type == QWEN_MODEL_TYPE,
                                     latent_tokens_per_span=script_args.latent_tokens_per_span)
    if model_type == QWEN_MODEL_TYPE:
        target = script_args.converted_model_dir or os.path.join(training_args.output_dir, "_gap-init")
        head = script_args.latent_head_type
        with training_args.main_process_first(local=True, desc="converting the base checkpoint to GAP"):
            with zero3_init_disabled(training_args):
                path = ensure_gap_checkpoint(
                    path, target, script_args.pca_path if head == "pca" else None, latent_head_type=head,
                    replace_other=script_args.converted_model_dir is None,  # <output_dir>/_gap-init is this run's
                    latent_adapter_size=script_args.latent_adapter_size, dtype=model_args.dtype or "auto",
                    **{key: value for key, value in gap_options.items() if value is not None},
                )
        revision = None
    elif model_type == GAP_MODEL_TYPE and script_args.pca_path is not None:
        raise TrainingError(
            f"--pca_path is used to convert a Qwen2.5-VL checkpoint, but {path} is already a GAP checkpoint with its "
            "own PCA basis: drop --pca_path, or pass the Qwen2.5-VL base checkpoint to convert it with this basis."
        )
    elif model_type != GAP_MODEL_TYPE:
        raise TrainingError(f"{path} holds a '{model_type}' model; train_sft.py needs a GAP or Qwen2.5-VL checkpoint.")
    model, processor = load_for_training(
        path, revision=revision, dtype=model_args.dtype or "auto",
        attn_implementation=model_args.attn_implementation, **gap_options,
    )
    train_dataset = load_targets_dataset(script_args.dataset_path, model.config)  # K and d again, then NaN/inf
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = load_targets_dataset(script_args.eval_dataset_path, model.config)
    K, tau = model.config.latent_tokens_per_span, script_args.difficulty_threshold
    collator = GapDataCollator(processor, difficulty_threshold=tau, max_length=training_args.max_length,
                               latent_tokens_per_span=K)
    training_run = TrainingRun(
        base_model=model_args.model_name_or_path, base_model_id=script_args.base_model_id, datasets=datasets,
        command=command_line(argv if argv is not None else sys.argv), difficulty_threshold=tau,
    )
    record, resume = run_record(script_args, training_args, model_args), training_args.resume_from_checkpoint
    trainer = GapSFTTrainer(model, args=training_args, data_collator=collator, train_dataset=train_dataset,
                            eval_dataset=eval_dataset, processing_class=processor,
                            peft_config=get_peft_config(model_args), training_run=training_run, run_record=record)
    if resume == "last":
        resume = last_checkpoint_of_run(training_args.output_dir, record)
    trainer.train(resume_from_checkpoint=resume)
    if training_args.push_to_hub:
        trainer.push_to_hub()  # saves the final model into output_dir and uploads it
    else:
        trainer.save_model(training_args.output_dir)
    return trainer


if __name__ == "__main__":
    try:  # a user error (GapError) is one line and exit status 2; anything else keeps its traceback
        trainer = main(*make_parser().parse_args_and_config())
    except GapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    trainer.end()  # `main` leaves the process group up (a caller may still evaluate or gather)
