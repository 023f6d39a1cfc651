"""Supervised fine-tuning of a GAP model (paper §4, App. F) with TRL's `SFTTrainer`.

The loss is L = L_LM + lambda * L_latent (Eq. 2-3): the latent targets of each row (precomputed into the dataset's
`latent_targets` column) are fed at the ``<|latent_pad|>`` positions (teacher forcing) and the latent head is
trained to predict them; rows whose `accuracy` exceeds tau train on text only (Eq. 4).

`--model_name_or_path` is either a GAP checkpoint (loaded as is) or a plain Qwen2.5-VL checkpoint, which is first
converted with `--pca_path`, as `gap convert` does (`GapForConditionalGeneration.from_qwen2_5_vl`), into
`--converted_model_dir` (default `<output_dir>/gap-init`), then loaded from there, so ZeRO-3 partitions it while
loading.

# One process (CPU or one GPU): the tiny CPU preset on the demo task, from a tiny base checkpoint
```bash
gap tiny-model --output-dir runs/tiny-base
gap demo-data --output-dir runs/demo/data
gap targets --data runs/demo/data/train.jsonl --model runs/tiny-base --latent-tokens-per-span 16 \
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

# Several nodes: list them in a hostfile (one `hostname slots=N` line per node; passwordless ssh between them and
# the same paths on each) and launch once, from the first
```bash
deepspeed --hostfile hostfile --master_addr node-0 --master_port 29500 train_sft.py --config configs/gap_7b.yaml \
    --deepspeed ds_configs/zero3.json --model_name_or_path runs/gap-7b-init --dataset_path runs/gap-data \
    --output_dir runs/gap-7b
```

# torchrun (DeepSpeed or not)
```bash
torchrun --nproc_per_node 8 train_sft.py --config configs/gap_7b.yaml --deepspeed ds_configs/zero2.json \
    --model_name_or_path runs/gap-7b-init --dataset_path runs/gap-data --output_dir runs/gap-7b
```

`--global_batch_size G` sets `gradient_accumulation_steps = G / (per_device_train_batch_size * world_size)` (it
must divide); without it, `--gradient_accumulation_steps` is used as given. On a machine without an accelerator the
script trains on the CPU (`use_cpu` defaults to true there) and DeepSpeed uses the gloo backend.

# Push the final checkpoint with its model card; resume a run; LoRA, then merge; scheduled sampling
```bash
python train_sft.py ... --push_to_hub --hub_model_id me/gap-7b --base_model_id Qwen/Qwen2.5-VL-7B-Instruct
python train_sft.py ... --resume_from_checkpoint runs/gap-7b/checkpoint-500   # or `last`
python train_sft.py ... --use_peft --lora_r 64 --lora_alpha 128 --output_dir runs/gap-lora
gap merge-lora --adapter runs/gap-lora --output-dir runs/gap-lora-merged
python train_sft.py ... --scheduled_sampling_prob 0.25
```
"""

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate.utils import is_peft_model
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, SaveStrategy, get_last_checkpoint
from transformers.utils import PushInProgress
from transformers.utils.hub import hf_api
from trl import SFTConfig, SFTTrainer

from gap_pipeline.model_card import TrainingRun, write_model_card


# Dataset columns `GapDataCollator` reads: TRL's conversational vision format, the GAP columns, and the image
# processor outputs `gap_pipeline.collator.prepare_dataset` may have precomputed.
COLLATOR_COLUMNS = (
    "messages",
    "images",
    "aux_images",
    "latent_targets",
    "accuracy",
    "pixel_values",
    "image_grid_thw",
    "id",
)
# Name of the model's latent head in parameter names (`latent_head.proj.weight`, ...).
LATENT_HEAD_PREFIX = "latent_head."
# The projections LoRA adapts by default (`--use_peft` without `--lora_target_modules`), in the language model only.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# GAP's own resumable state in a checkpoint folder (next to the Trainer's trainer_state.json).
GAP_STATE_NAME = "gap_trainer_state.json"
# What a checkpoint folder holds only to resume training (not pushed as the model): Trainer, DeepSpeed, GAP.
TRAINING_STATE_PATTERNS = (
    "optimizer.pt",
    "optimizer.bin",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "trainer_state.json",
    GAP_STATE_NAME,
    "global_step*",
    "latest",
    "zero_to_fp32.py",
)
# Where `push_to_hub` saves the model it uploads, inside output_dir ("_*" is never uploaded by checkpoint pushes).
HUB_STAGING_DIR = "_hub_push"


# --------------------------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------------------------


def configure_lora(peft_config, config):
    """Adapt a PEFT LoRA config to a GAP model (in place; returns it).

    * LoRA goes on the language model only: `target_modules` None or "all-linear" becomes the decoder layers'
      projections (`LORA_TARGET_MODULES`), a list of names is restricted to the decoder layers (the vision tower
      and the latent head have layers of the same names); a string is a regular expression and is kept as given.
    * `latent_head` joins `modules_to_save`: the whole head trains and is saved with the adapter.
    * The rows of ``<|latent_start|>``, ``<|latent_pad|>`` and ``<|latent_end|>`` train
      (`trainable_token_indices`): in the input embedding, and in the LM head when it is not tied to it (a tied
      head follows the embedding), unless a layer is already in `modules_to_save` (trained whole). Without them
      the model could never learn to open a span.
    """
    start, pad, end = config.latent_token_ids
    modules_to_save = list(peft_config.modules_to_save or [])
    if "latent_head" not in modules_to_save:
        modules_to_save.append("latent_head")
    peft_config.modules_to_save = modules_to_save

    targets = peft_config.target_modules
    if targets is None or targets == "all-linear":
        names = LORA_TARGET_MODULES
    elif isinstance(targets, str):
        names = None
    else:
        names = sorted(targets)
    if names is not None:
        alternatives = "|".join(sorted(dict.fromkeys(names)))
        peft_config.target_modules = rf"(?:.*\.)?language_model\.layers\.\d+\..*\.(?:{alternatives})"

    indices = peft_config.trainable_token_indices
    if indices is None:
        indices = {}
    elif not isinstance(indices, dict):
        indices = {"embed_tokens": list(indices)}
    else:
        indices = {layer: list(ids) for layer, ids in indices.items()}
    layers = ["embed_tokens"] if config.tie_word_embeddings else ["embed_tokens", "lm_head"]
    for layer in layers:
        if layer in modules_to_save:
            continue
        indices[layer] = sorted(set(indices.get(layer, [])) | {start, pad, end})
    peft_config.trainable_token_indices = indices or None
    return peft_config


# --------------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------------


class GapSFTTrainer(SFTTrainer):
    r"""`SFTTrainer` for `GapForConditionalGeneration`: L = L_LM + lambda * L_latent.

    Differences from `SFTTrainer`:

    * the loss is the model's own (`compute_loss` calls the GAP forward; TRL's fused LM head, which would skip the
      latent injection and loss, is removed from the model);
    * both terms are normalised over the global batch (all ranks and accumulation steps): the LM term by the
      Trainer's `num_items_in_batch`, the latent term by the number of latent positions counted the same way;
    * `lm_loss`, `latent_loss` and `latent_norm_ratio` (mean ||v_hat|| / ||v|| over latent positions) are logged
      next to `loss`;
    * the GAP dataset columns (`aux_images`, `latent_targets`, `accuracy`) reach the data collator;
    * the latent head has its own learning rate (`latent_head_learning_rate`, default: `args.learning_rate`);
    * the vision tower is frozen unless `freeze_vision_tower=False`;
    * the vision tower and the latent head run on every micro-batch, so ZeRO-3 ranks gather the same parameters in
      the same order (a micro-batch without images encodes a one-token dummy image whose features are weighted 0).

    `model` must be an instance (a `GapForConditionalGeneration`, or a PEFT model around one). With `peft_config`
    (a LoRA config) the adapter goes on the language model only (`configure_lora`), the latent head is fully
    trainable (`modules_to_save`) and so are the three latent tokens' rows of the input embedding and, when untied,
    of the LM head (`trainable_token_indices`).

    `scheduled_sampling_prob` p > 0 turns on scheduled sampling (paper App. F, an ablation): every training
    micro-batch runs a teacher-forced first pass without gradients, then each latent span's inputs are replaced,
    with probability p per span (seeded by `args.seed`, the step and the rank), by the first pass's detached
    predictions, and the loss optimised is the second pass's, against the true targets. Both passes run on every
    rank and every micro-batch (ZeRO-3 lock-step). `scheduled_sampling_fraction` (replaced spans / spans) is logged.
    Evaluation stays teacher-forced.

    Saving writes a model card (`gap_pipeline.model_card`) into every saved folder; `training_run` (a
    `TrainingRun`) supplies what the trainer cannot know (command, base model, datasets). `push_to_hub` uploads a
    fresh save of the model (the folder `save_model` writes, card included) and nothing else from `output_dir`.
    """

    _tag_names = ["trl", "sft", "gap"]
    _name = "GAP SFT"

    def __init__(
        self,
        model,
        args=None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *,
        latent_head_learning_rate=None,
        freeze_vision_tower=True,
        peft_config=None,
        scheduled_sampling_prob=0.0,
        training_run=None,
        **kwargs,
    ):
        if isinstance(model, str):
            raise TypeError(
                "GapSFTTrainer needs a model instance: load it with `load_gap_model_and_processor` (train_sft.py) or "
                "`GapForConditionalGeneration.from_pretrained` after the training arguments exist."
            )
        if latent_head_learning_rate is not None and latent_head_learning_rate < 0:
            raise ValueError(f"`latent_head_learning_rate` must be >= 0, got {latent_head_learning_rate}.")
        if not isinstance(args, SFTConfig):
            raise TypeError(f"GapSFTTrainer needs an `SFTConfig` as `args`, got {type(args).__name__}.")
        if not 0.0 <= scheduled_sampling_prob <= 1.0:
            raise ValueError(f"`scheduled_sampling_prob` must be in [0, 1], got {scheduled_sampling_prob}.")
        # The collator builds every tensor from the raw rows; TRL must not tokenize a dataset without images.
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        if peft_config is not None:
            if not freeze_vision_tower:
                raise ValueError(
                    "With a PEFT config only the adapter, the latent head and the latent-token rows train; the vision "
                    "tower stays frozen. Drop --no_freeze_vision_tower or train without --use_peft."
                )
            configure_lora(peft_config, (model.get_base_model() if is_peft_model(model) else model).config)
        super().__init__(
            model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            **kwargs,
        )
        gap = self._gap_model()
        if gap.config.latent_token_ids is None:
            raise ValueError("The model has no latent token ids; convert it with `from_qwen2_5_vl` first.")
        # `SFTTrainer.__init__` replaced `forward` on this instance by a fused-LM-head wrapper; with
        # `fused_lm_head=True` it runs backbone + LM head only, skipping GAP's latent injection and latent loss.
        # `compute_loss` below never asks for it, and removing the instance attribute restores the class's forward.
        if "forward" in vars(gap):
            del gap.forward
        self.latent_head_learning_rate = (
            self.args.learning_rate if latent_head_learning_rate is None else latent_head_learning_rate
        )
        self.freeze_vision_tower = freeze_vision_tower
        if freeze_vision_tower:
            gap.model.visual.requires_grad_(False)
        self._latent_pad_id = gap.config.latent_pad_token_id
        self._num_latent_items_in_batch = None
        self._latent_norm_ratio = {mode: torch.zeros(2, dtype=torch.float64) for mode in ("train", "eval")}
        self.scheduled_sampling_prob = float(scheduled_sampling_prob)
        self._replaced_spans = torch.zeros(2, dtype=torch.float64)  # (replaced spans, spans) since the last log
        self._sampling_micro_step = (None, 0)  # (global step, micro-batches seen in it): the coin flips' seed
        self.training_run = training_run if training_run is not None else TrainingRun()

    # -- model access ---------------------------------------------------------------------------------------------
    def _gap_model(self):
        """The `GapForConditionalGeneration` inside `self.model` (through a PEFT wrapper if any)."""
        return self.model.get_base_model() if is_peft_model(self.model) else self.model

    # -- data -----------------------------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        """The columns `remove_unused_columns` keeps: those the GAP collator reads.

        TRL's vision path would keep only `messages`, `prompt`, `completion`, `image(s)`, dropping `aux_images`,
        `latent_targets` and `accuracy`; its text path only tokenized columns.
        """
        if self._signature_columns is None:
            self._signature_columns = list(COLLATOR_COLUMNS)

    def _prepare_inputs(self, inputs):
        """Move the batch to the device; `latent_embeds` stays fp32 (DeepSpeed would cast it to bf16/fp16)."""
        inputs = dict(inputs)
        latent_embeds = inputs.pop("latent_embeds", None)
        inputs = super()._prepare_inputs(inputs)
        if latent_embeds is not None:
            inputs["latent_embeds"] = latent_embeds.to(device=self.args.device, dtype=torch.float32)
        return inputs

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Also count the latent positions of the global batch (all ranks, all accumulation steps)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._num_latent_items_in_batch = self._count_latent_items(batch_samples, device)
        return batch_samples, num_items_in_batch

    def _count_latent_items(self, batch_samples, device):
        """Number of ``<|latent_pad|>`` positions, summed like `Trainer._get_num_items_in_batch` sums labels."""
        if not batch_samples:
            return None
        count = sum((batch["input_ids"] == self._latent_pad_id).sum() for batch in batch_samples)
        count = torch.as_tensor(count, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    # -- loss -----------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs = dict(inputs)
        inputs["use_cache"] = False
        vision_anchor = self._encode_images(inputs)
        global_counts = mode == "train" and num_items_in_batch is not None
        if global_counts:
            inputs["num_items_in_batch"] = num_items_in_batch
            inputs["num_latent_items_in_batch"] = self._num_latent_items_in_batch
        if mode == "train" and self.scheduled_sampling_prob > 0:
            outputs = self._scheduled_sampling_forward(model, inputs)
        else:
            outputs = model(**inputs)
        loss = outputs.loss
        if vision_anchor is not None:
            loss = loss + vision_anchor
        # Like `Trainer.compute_loss`: the counts cover every rank and the gradients are averaged across ranks.
        scale = 1
        if global_counts and self.args.average_tokens_across_devices:
            scale = self.accelerator.num_processes // self.get_tp_size()
            loss = loss * scale
        self._record_metrics(mode, inputs, outputs, scale, self.current_gradient_accumulation_steps if global_counts else 1)
        return (loss, outputs) if return_outputs else loss

    def _scheduled_sampling_forward(self, model, inputs):
        """The two passes of scheduled sampling (App. F); returns the second pass's outputs, its loss against the
        true targets.

        The first pass is the teacher-forced forward, without gradients (with the labels, so that the latent head
        runs as many times as in the second pass on every rank, latents or not). Each latent span is then picked with
        probability p (`_span_coin_flips`), and the inputs of the picked spans' pads become the first pass's
        detached predictions (v_hat, PCA-decoded). Both passes run on every micro-batch, latents or not, so ZeRO-3
        ranks gather the same parameters in the same order; the images are encoded once, for both.
        """
        with torch.no_grad():
            first = model(**inputs)
        targets = inputs.get("latent_embeds")
        span_of_pad, n_spans = self._span_ids(inputs["input_ids"])
        replaced = self._span_coin_flips(n_spans)
        second_inputs = dict(inputs)
        if targets is not None:
            predictions = first.latent_predictions.detach().to(targets.device, targets.dtype)
            picked = replaced.to(targets.device)[span_of_pad.to(targets.device)]
            second_inputs["latent_embeds"] = torch.where(picked[:, None], predictions, targets)
        outputs = model(**second_inputs)
        if targets is not None:
            # The forward compared its predictions with the inputs it was given; the loss compares them with v.
            gap = self._gap_model()
            latent_loss = gap._latent_loss(outputs.latent_predictions, targets, inputs.get("num_latent_items_in_batch"))
            outputs["latent_loss"] = latent_loss
            outputs["loss"] = outputs.lm_loss + gap.config.latent_loss_weight * latent_loss.to(outputs.lm_loss.device)
        counts = torch.tensor([[float(replaced.sum()), float(n_spans)]], device=self.args.device)
        self._replaced_spans += self.accelerator.gather(counts).sum(0).double().cpu()
        return outputs

    def _span_ids(self, input_ids):
        """(span index of every ``<|latent_pad|>``, in pad order; number of spans): spans are numbered in
        row-major order of their ``<|latent_start|>``, like the rows of `latent_embeds`."""
        starts = (input_ids == self._gap_model().config.latent_start_token_id).long()
        pads = input_ids == self._latent_pad_id
        opened = starts.cumsum(1)
        if (opened[pads] == 0).any():
            raise ValueError(
                "A <|latent_pad|> has no <|latent_start|> before it in its row: scheduled sampling replaces whole "
                "spans, so every pad must belong to one (expand `<latent>` placeholders with the GAP processor)."
            )
        per_row = starts.sum(1)
        earlier = per_row.cumsum(0) - per_row
        return (opened + earlier[:, None] - 1)[pads], int(per_row.sum())

    def _span_coin_flips(self, n_spans):
        """Which of `n_spans` spans get their inputs replaced: True with probability p each.

        The generator is seeded from (`args.seed`, global step, micro-batch within the step, process index), so a
        run repeats exactly and a resumed run flips the same coins as an uninterrupted one, with no state saved.
        """
        step = self.state.global_step
        last_step, seen = self._sampling_micro_step
        seen = seen if last_step == step else 0
        self._sampling_micro_step = (step, seen + 1)
        entropy = [self.args.seed, step, seen, self.args.process_index]
        seed = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(n_spans, generator=generator) < self.scheduled_sampling_prob

    def _encode_images(self, inputs):
        """Run the vision tower before the forward, on every rank and every micro-batch.

        The features go to the model as `mm_encoder_outputs` (the precomputed-encoder path of Qwen2.5-VL's forward).
        A micro-batch without images encodes a one-token dummy image instead and returns its features' sum times 0,
        to be added to the loss, so that under ZeRO-3 every rank gathers the tower at the same point of the step.
        Returns that zero term, or None.
        """
        gap = self._gap_model()
        visual = gap.model.visual
        pixel_values = inputs.pop("pixel_values", None)
        trainable = any(parameter.requires_grad for parameter in visual.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            if pixel_values is not None:
                image_outputs = gap.model.get_image_features(pixel_values, inputs["image_grid_thw"], return_dict=True)
                inputs["mm_encoder_outputs"] = {"image": image_outputs}
                return None
            pixel_values, grid_thw = self._dummy_image(gap, inputs["input_ids"].device)
            features = gap.model.get_image_features(pixel_values, grid_thw, return_dict=True).pooler_output
            return torch.cat(features).float().sum() * 0.0

    @staticmethod
    def _dummy_image(gap, device):
        """Zero pixels for the smallest grid the tower accepts: 1 x m x m patches (m = merge size) = 1 token."""
        vision = gap.config.vision_config
        merge = vision.spatial_merge_size
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        pixel_values = torch.zeros(merge * merge, patch_dim, device=device)
        grid_thw = torch.tensor([[1, merge, merge]], device=device)
        return pixel_values, grid_thw

    def _record_metrics(self, mode, inputs, outputs, scale, steps):
        """Append this micro-batch's `lm_loss`, `latent_loss`, `latent_norm_ratio` and TRL's token metrics.

        `lm_loss` and `latent_loss` are recorded as the global batch's loss terms: gathered, scaled like the loss and
        multiplied by the number of accumulation steps, so that their average over a logging window is comparable to
        the logged `loss` (= `lm_loss` + lambda * `latent_loss`). `latent_norm_ratio` is summed over the latent
        positions of all ranks and divided at logging time, so every latent position of the window counts once.
        """
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        for name in ("lm_loss", "latent_loss"):
            value = getattr(outputs, name).detach().float() * scale
            metrics[name].append(gather(value).mean().item() * steps)

        ratios = torch.zeros(2, device=self.args.device)  # (sum of ||v_hat|| / ||v||, number of latent positions)
        if outputs.latent_predictions is not None:
            predictions = outputs.latent_predictions.detach()
            targets = inputs["latent_embeds"].to(predictions.device, torch.float32)
            ratio = predictions.norm(dim=-1) / targets.norm(dim=-1).clamp_min(1e-12)
            ratios = torch.stack([ratio.sum(), torch.tensor(float(ratio.numel()), device=ratio.device)]).to(ratios.device)
        self._latent_norm_ratio[mode] += gather(ratios[None]).sum(0).double().cpu()

        # With labels the model returns logits only at supervised positions (row-major), as labelled here.
        labels = inputs["labels"].masked_fill(inputs["input_ids"] == self._latent_pad_id, -100)[:, 1:]
        supervised = labels != -100
        correct = (outputs.logits.argmax(-1) == labels[supervised].to(outputs.logits.device)).sum().float()
        num_correct = gather(correct.to(self.args.device)).sum()
        num_valid = gather(supervised.sum().float().to(self.args.device)).sum()
        metrics["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += int(gather(inputs["attention_mask"].sum()).sum().item())
        metrics["num_tokens"] = [self._total_train_tokens]

    def log(self, logs, start_time=None):
        mode = "train" if self.model.training else "eval"
        ratio_sum, count = self._latent_norm_ratio[mode].tolist()
        if count > 0:
            self._metrics[mode]["latent_norm_ratio"] = [ratio_sum / count]
        self._latent_norm_ratio[mode].zero_()
        if mode == "train" and self.scheduled_sampling_prob > 0:
            replaced, spans = self._replaced_spans.tolist()
            if spans > 0:
                self._metrics[mode]["scheduled_sampling_fraction"] = [replaced / spans]
            self._replaced_spans.zero_()
        super().log(logs, start_time)

    # -- saving ---------------------------------------------------------------------------------------------------
    def save_model(self, output_dir=None, _internal_call=False):
        """`Trainer.save_model`, with the latent head written from DeepSpeed's fp32 master weights.

        Under ZeRO-3 with bf16/fp16 the head's working copy is 16-bit (every partitioned parameter is); the saved
        head must be the fp32 one. Runs on every rank (gathering is collective), like `Trainer.save_model`.
        """
        self._fp32_head_state = self._gather_fp32_latent_head()
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self._fp32_head_state = None

    def _save(self, output_dir=None, state_dict=None):
        """`Trainer._save`, then the model card into the same folder (on the processes that write)."""
        if state_dict is not None and getattr(self, "_fp32_head_state", None):
            state_dict = {**state_dict, **self._fp32_head_state}
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            self.create_model_card(output_dir=output_dir if output_dir is not None else self.args.output_dir)

    # -- model card and Hub ---------------------------------------------------------------------------------------
    def create_model_card(self, model_name=None, dataset_name=None, tags=None, output_dir=None):
        """Write GAP's model card (`gap_pipeline.model_card`) as README.md into `output_dir` (default
        `args.output_dir`), replacing TRL's; on the processes that save.

        `dataset_name` is added to the card's datasets, `tags` to its metadata tags.
        """
        if not self.args.should_save:
            return
        if model_name is None:
            model_name = (self.args.hub_model_id or os.path.abspath(self.args.output_dir)).rstrip("/").split("/")[-1]
        run = self._training_run_for_card()
        if dataset_name is not None and dataset_name not in run.datasets:
            run.datasets = [*run.datasets, dataset_name]
        write_model_card(
            output_dir if output_dir is not None else self.args.output_dir,
            self._gap_model().config,
            model_name=model_name,
            model_id=self.hub_model_id or self.args.hub_model_id,
            training=run,
            adapter=is_peft_model(self.model),
            tags=[*self._tag_names, *([tags] if isinstance(tags, str) else list(tags or []))],
        )

    def _training_run_for_card(self):
        """`training_run` completed with what the trainer knows: tau, p, world size, LoRA, hyperparameters."""
        run = self.training_run
        tau = run.difficulty_threshold
        if tau is None:
            tau = getattr(self.data_collator, "difficulty_threshold", None)
        args = self.args
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
        hyperparameters = {
            "learning_rate": args.learning_rate,
            "latent_head_learning_rate": self.latent_head_learning_rate,
            "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "warmup_steps": args.warmup_steps,
            "weight_decay": args.weight_decay,
            "optim": str(getattr(args.optim, "value", args.optim)),
            "num_train_epochs": args.num_train_epochs,
            "max_steps": args.max_steps,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
            "max_grad_norm": args.max_grad_norm,
            "precision": precision,
            "activation_checkpointing": args.activation_checkpointing,
            "freeze_vision_tower": self.freeze_vision_tower,
            "seed": args.seed,
            "steps_trained": self.state.global_step,
        }
        if args.deepspeed:
            hyperparameters["deepspeed"] = args.deepspeed if isinstance(args.deepspeed, str) else "dict"
        return dataclasses.replace(
            run,
            datasets=list(run.datasets),
            difficulty_threshold=tau,
            scheduled_sampling_prob=self.scheduled_sampling_prob,
            world_size=run.world_size or args.world_size,
            hyperparameters={**hyperparameters, **run.hyperparameters},
            lora=run.lora if run.lora is not None else self._lora_settings(),
        )

    def _lora_settings(self):
        """The active LoRA config's main fields, or None without PEFT."""
        if not is_peft_model(self.model):
            return None
        config = self.model.peft_config[self.model.active_adapter]
        fields = ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "trainable_token_indices")
        return {name: getattr(config, name, None) for name in fields}

    def push_to_hub(self, commit_message="End of training", blocking=True, token=None, revision=None, private=None,
                    **kwargs):
        """Upload the model to `hub_model_id`: exactly the folder `save_model` writes (weights or adapter, config,
        remote code, processor and chat template, training_args.bin), with GAP's model card as README.md.

        The folder is saved afresh into `<output_dir>/_hub_push` (every process takes part, as in `save_model`),
        uploaded from there and removed, so nothing else in `output_dir` (a converted `gap-init`, logs,
        checkpoints) is pushed. `kwargs` go to `create_model_card` (`model_name`, `dataset_name`, `tags`).
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        staging = os.path.join(self.args.output_dir, HUB_STAGING_DIR)
        if self.args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)
        self.save_model(staging, _internal_call=True)
        if not self.is_world_process_zero():
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            return None
        if kwargs:
            self.create_model_card(output_dir=staging, **kwargs)
        self._finish_current_push()
        result = hf_api().upload_folder(
            repo_id=self.hub_model_id,
            folder_path=staging,
            commit_message=commit_message,
            token=token,
            run_as_future=not blocking,
            revision=revision if revision is not None else self.args.hub_revision,
        )
        if blocking:
            shutil.rmtree(staging, ignore_errors=True)
        else:
            result.add_done_callback(lambda _: shutil.rmtree(staging, ignore_errors=True))
        return result

    def _push_from_checkpoint(self, checkpoint_folder):
        """During training (`hub_strategy` every_save, checkpoint, all_checkpoints): upload the checkpoint's model
        files (the folder less what only resuming needs, `TRAINING_STATE_PATTERNS`) to the repository's root, and
        for `checkpoint` / `all_checkpoints` the whole folder under `last-checkpoint/` or `checkpoint-N/`, as the
        Trainer does. Unlike the Trainer's version it uploads from the checkpoint folder itself, so the remote code,
        processor and card go along and nothing else from `output_dir` does."""
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        if self.args.save_strategy == SaveStrategy.STEPS:
            commit_message = f"Training in progress, step {self.state.global_step}"
        else:
            commit_message = f"Training in progress, epoch {int(self.state.epoch)}"
        common = {
            "repo_id": self.hub_model_id,
            "token": self.args.hub_token,
            "run_as_future": True,
            "revision": self.args.hub_revision,
        }
        jobs = [
            hf_api().upload_folder(
                folder_path=checkpoint_folder,
                commit_message=commit_message,
                ignore_patterns=list(TRAINING_STATE_PATTERNS),
                **common,
            )
        ]
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            path_in_repo = (
                "last-checkpoint" if self.args.hub_strategy == HubStrategy.CHECKPOINT else os.path.basename(checkpoint_folder)
            )
            jobs.append(
                hf_api().upload_folder(
                    folder_path=checkpoint_folder,
                    path_in_repo=path_in_repo,
                    commit_message=commit_message + ", checkpoint",
                    **common,
                )
            )
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)

    # -- checkpoints and resuming ---------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint, plus GAP's state (`GAP_STATE_NAME`: the token count TRL logs as `num_tokens`).

        The scheduled-sampling coin flips need no state (`_span_coin_flips`); the logging windows of
        `latent_norm_ratio` and `scheduled_sampling_fraction` restart on resume, like the Trainer's loss window.
        """
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, GAP_STATE_NAME), "w") as f:
                json.dump({"num_tokens": self._total_train_tokens}, f)
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`; a resumed run also restores GAP's state from the checkpoint folder.

        `resume_from_checkpoint` is a checkpoint folder, or True for the last one in `output_dir`.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No checkpoint-* folder to resume from in {self.args.output_dir}.")
        if resume_from_checkpoint:
            path = os.path.join(resume_from_checkpoint, GAP_STATE_NAME)
            if os.path.isfile(path):
                with open(path) as f:
                    self._total_train_tokens = int(json.load(f)["num_tokens"])
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def _gather_fp32_latent_head(self):
        """{state-dict key: fp32 CPU tensor} of the head's low-precision DeepSpeed parameters (empty otherwise)."""
        if not self.is_deepspeed_enabled or self.deepspeed is None or is_peft_model(self.model):
            return {}
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, parameter in self.model.named_parameters():
            if not name.startswith(LATENT_HEAD_PREFIX) or parameter.dtype == torch.float32:
                continue
            full = safe_get_full_fp32_param(parameter)
            if full is not None:
                shape = parameter.ds_shape if hasattr(parameter, "ds_shape") else parameter.shape
                state[name] = full.detach().reshape(shape).to("cpu", torch.float32)
        return state

    # -- optimizer ------------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the latent head in its own parameter groups at `latent_head_learning_rate`.

        Weight decay is applied as the Trainer does (`get_decay_parameter_names`): four groups, {rest, head} x
        {decay, no decay}, empty ones left out.
        """
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay_names = set(self.get_decay_parameter_names(opt_model))
        groups = {}
        for name, parameter in opt_model.named_parameters():
            if not parameter.requires_grad:
                continue
            key = (LATENT_HEAD_PREFIX in name, name in decay_names)
            groups.setdefault(key, []).append(parameter)
        param_groups = []
        for (is_head, decays), parameters in sorted(groups.items()):
            group = {"params": parameters, "weight_decay": self.args.weight_decay if decays else 0.0}
            if is_head:
                group["lr"] = self.latent_head_learning_rate
            param_groups.append(group)
        if not any(is_head for is_head, _ in groups):
            raise ValueError("No trainable latent-head parameter: the GAP latent head must be trained.")

        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs = dict(optimizer_kwargs)
        replaced = sorted({"params", "model", "optimizer_dict"} & set(optimizer_kwargs))
        if replaced or not isinstance(optimizer_cls, type):
            raise ValueError(
                f"optim={self.args.optim!r} builds its own parameter groups, which would drop the latent head's "
                f"learning rate; use a standard optimizer such as `adamw_torch`."
            )
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer


# --------------------------------------------------------------------------------------------------------------------
# Script
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class GapScriptArguments:
    """GAP arguments of `train_sft.py` (next to TRL's `SFTConfig` and `ModelConfig`)."""

    dataset_path: str = field(
        metadata={"help": "Training data: the dataset folder written by `gap targets` (rows + `latent_targets`)."}
    )
    eval_dataset_path: str | None = field(
        default=None, metadata={"help": "Evaluation data, the same format (used when `eval_strategy` is not 'no')."}
    )
    pca_path: str | None = field(
        default=None,
        metadata={"help": "pca.safetensors from `gap fit-pca`; needed to convert a plain Qwen2.5-VL checkpoint."},
    )
    converted_model_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where a plain Qwen2.5-VL checkpoint is converted to GAP before training (default "
            "<output_dir>/gap-init); reused if it already holds a GAP checkpoint."
        },
    )
    latent_tokens_per_span: int | None = field(
        default=None,
        metadata={"help": "K, latent tokens per span (a perfect square). Default: the checkpoint's, 36 when converting."},
    )
    latent_loss_weight: float | None = field(
        default=None, metadata={"help": "lambda of Eq. 3. Default: the checkpoint's, 1.0 when converting."}
    )
    latent_loss_reduction: str | None = field(
        default=None,
        metadata={
            "help": "'mean' (per element) or 'sum' (squared L2 over d, Eq. 2). Default: the checkpoint's, 'mean' "
            "when converting.",
            "choices": ["mean", "sum"],
        },
    )
    latent_head_type: str = field(
        default="pca",
        metadata={"help": "Head built when converting: 'pca' (GAP) or 'full' (LH ablation).", "choices": ["pca", "full"]},
    )
    latent_adapter_size: int = field(
        default=1024, metadata={"help": "Width of the head's SwiGLU adapter, when converting."}
    )
    difficulty_threshold: float = field(
        default=0.0,
        metadata={"help": "tau of Eq. 4: rows with accuracy > tau train on text only (their latent spans are stripped)."},
    )
    latent_head_learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate of the latent head. Default: --learning_rate."}
    )
    freeze_vision_tower: bool = field(
        default=True,
        metadata={"help": "Keep the vision tower frozen (default; a trainable tower collapsed under the latent loss)."},
    )
    global_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Rows per optimizer step over all processes; sets gradient_accumulation_steps = global_batch_size "
            "/ (per_device_train_batch_size * world_size), which must be a whole number."
        },
    )
    scheduled_sampling_prob: float = field(
        default=0.0,
        metadata={
            "help": "Scheduled sampling (paper App. F ablation; 0 = off, teacher forcing). With p > 0 every training "
            "step runs two forward passes: a teacher-forced one without gradients, then one where each latent span's "
            "inputs are, with probability p (seeded), the first pass's detached PCA-decoded predictions. The loss "
            "optimised (and logged) is the second pass's, against the true targets; `scheduled_sampling_fraction` "
            "logs the share of replaced spans. Evaluation stays teacher-forced."
        },
    )
    base_model_id: str | None = field(
        default=None,
        metadata={
            "help": "Hub id of the base model (e.g. Qwen/Qwen2.5-VL-7B-Instruct) for the model card's `base_model` "
            "metadata, when --model_name_or_path is a local folder."
        },
    )


def make_parser():
    """`TrlParser` over (GapScriptArguments, SFTConfig, ModelConfig); `--config file.yaml` sets defaults."""
    from trl import ModelConfig, SFTConfig, TrlParser

    parser = TrlParser((GapScriptArguments, SFTConfig, ModelConfig))
    if not torch.accelerator.is_available():
        # Without an accelerator, train on the CPU; with several processes accelerate then counts them (and
        # DeepSpeed, which uses gloo here, agrees with it).
        parser.set_defaults(use_cpu=True)
    return parser


def apply_global_batch_size(training_args, global_batch_size):
    """Training arguments with gradient_accumulation_steps derived from `global_batch_size` (None: unchanged).

    The arguments are rebuilt rather than edited, because constructing them fills the DeepSpeed config's "auto"
    batch sizes.
    """
    if global_batch_size is None:
        return training_args
    per_step = training_args.per_device_train_batch_size * training_args.world_size
    if global_batch_size < 1 or global_batch_size % per_step:
        raise ValueError(
            f"--global_batch_size {global_batch_size} is not a positive multiple of per_device_train_batch_size x "
            f"world_size = {training_args.per_device_train_batch_size} x {training_args.world_size} = {per_step}."
        )
    steps = global_batch_size // per_step
    if steps == training_args.gradient_accumulation_steps:
        return training_args
    return dataclasses.replace(training_args, gradient_accumulation_steps=steps)


@contextlib.contextmanager
def _zero3_init_disabled(training_args):
    """Build models normally (not partitioned by `zero.Init`) inside the block, e.g. for a one-off conversion."""
    from transformers.integrations.deepspeed import (
        is_deepspeed_zero3_enabled,
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    if not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(training_args.hf_deepspeed_config)


def _is_gap_folder(path):
    from gap_pipeline.inference import GAP_MODEL_TYPE, model_type_of

    try:
        return model_type_of(path) == GAP_MODEL_TYPE
    except FileNotFoundError:
        return False


def convert_base_checkpoint(script_args, training_args, model_args):
    """Convert the plain Qwen2.5-VL `--model_name_or_path` into a GAP folder once; return that folder.

    The local main process of each node converts (outside ZeRO-3 partitioning) into a temporary folder and renames
    it into place; the other processes wait, then load the result. A folder that already holds a GAP checkpoint is
    reused.
    """
    from gap_pipeline.convert import convert_checkpoint

    base = model_args.model_name_or_path
    if not os.path.isdir(base):
        raise ValueError(
            f"{base} is not a local folder: download the Qwen2.5-VL checkpoint first (e.g. `hf download {base} "
            f"--local-dir <dir>`) and pass the folder."
        )
    if script_args.latent_head_type == "pca" and script_args.pca_path is None:
        raise ValueError(
            f"{base} is a plain Qwen2.5-VL checkpoint: pass --pca_path (the pca.safetensors of `gap fit-pca`) to "
            f"convert it, or a GAP checkpoint as --model_name_or_path."
        )
    target = script_args.converted_model_dir or os.path.join(training_args.output_dir, "gap-init")
    with training_args.main_process_first(local=True, desc="converting the base checkpoint to GAP"):
        if _is_gap_folder(target):
            return target
        if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
            raise ValueError(f"--converted_model_dir {target} exists and holds no GAP checkpoint; remove it or pick another.")
        parent = os.path.dirname(os.path.abspath(target))
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".gap-init-", dir=parent)
        options = {
            "latent_tokens_per_span": script_args.latent_tokens_per_span,
            "latent_loss_weight": script_args.latent_loss_weight,
            "latent_loss_reduction": script_args.latent_loss_reduction,
        }
        with _zero3_init_disabled(training_args):
            convert_checkpoint(
                base,
                staging,
                script_args.pca_path if script_args.latent_head_type == "pca" else None,
                latent_head_type=script_args.latent_head_type,
                latent_adapter_size=script_args.latent_adapter_size,
                dtype=model_args.dtype or "auto",
                overwrite=True,
                **{key: value for key, value in options.items() if value is not None},
            )
        try:
            os.rename(staging, target)
        except OSError:  # another node sharing this filesystem renamed its copy first
            shutil.rmtree(staging)
            if not _is_gap_folder(target):
                raise
    return target


def load_gap_model_and_processor(script_args, training_args, model_args):
    """The GAP model and processor to train, built after the training arguments (so ZeRO-3 partitions the model).

    A GAP checkpoint is loaded as is (K, lambda and the loss reduction overridden when given); a plain Qwen2.5-VL
    checkpoint is converted first (`convert_base_checkpoint`).
    """
    from transformers.utils import is_flash_attn_2_available

    from modeling_gap import GapForConditionalGeneration
    from processing_gap import GapProcessor

    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise ValueError("Quantized loading is not supported by train_sft.py (the latent head trains in fp32).")
    from transformers import PretrainedConfig

    path = model_args.model_name_or_path
    if path is None:
        raise ValueError("Pass --model_name_or_path: a GAP checkpoint or a plain Qwen2.5-VL checkpoint folder.")
    config_dict, _ = PretrainedConfig.get_config_dict(path, revision=model_args.model_revision)
    model_type = config_dict.get("model_type")
    if model_type == "qwen2_5_vl":
        path = convert_base_checkpoint(script_args, training_args, model_args)
        revision = None
    elif model_type == "gap_qwen2_5_vl":
        revision = model_args.model_revision
    else:
        raise ValueError(f"{path} holds a '{model_type}' model; train_sft.py needs a GAP or Qwen2.5-VL checkpoint.")

    attn_implementation = model_args.attn_implementation
    if attn_implementation is None:
        attn_implementation = "flash_attention_2" if is_flash_attn_2_available() else "sdpa"
    overrides = {
        "latent_tokens_per_span": script_args.latent_tokens_per_span,
        "latent_loss_weight": script_args.latent_loss_weight,
        "latent_loss_reduction": script_args.latent_loss_reduction,
    }
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if revision is not None:
        overrides["revision"] = revision
    model = GapForConditionalGeneration.from_pretrained(
        path,
        dtype=model_args.dtype or "auto",
        attn_implementation=attn_implementation,
        **overrides,
    )
    model.config.validate_gap()
    processor = GapProcessor.from_pretrained(
        path,
        **({} if revision is None else {"revision": revision}),
        trust_remote_code=False,  # GapProcessor is this repository's class: no code from the folder is needed
        latent_tokens_per_span=model.config.latent_tokens_per_span,
    )
    return model, processor


def load_gap_dataset(path, config):
    """A dataset folder written by `gap targets`, checked against the model's K and d."""
    import datasets

    from gap_pipeline.targets import check_targets_compatible

    dataset = datasets.load_from_disk(path)
    if isinstance(dataset, datasets.DatasetDict):
        raise ValueError(f"{path} holds several splits ({list(dataset)}); pass one split's folder (`gap targets` writes one).")
    check_targets_compatible(dataset, config)
    return dataset


def main(script_args, training_args, model_args, argv=None):
    """Load (or convert) the model, load the data, train `GapSFTTrainer`, save (and push); returns the trainer.

    `argv` is the command line the model card records (default `sys.argv`).
    """
    from trl import get_peft_config

    from gap_pipeline.collator import GapDataCollator

    training_args = apply_global_batch_size(training_args, script_args.global_batch_size)
    if training_args.deepspeed and training_args.use_cpu:
        # On CPUs DeepSpeed needs its process group before `zero.Init` builds the model (no-op once it exists).
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")

    # Seed before the model exists: converting a base checkpoint draws the latent head's adapter weights.
    from transformers import set_seed

    set_seed(training_args.seed)
    model, processor = load_gap_model_and_processor(script_args, training_args, model_args)
    train_dataset = load_gap_dataset(script_args.dataset_path, model.config)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        if script_args.eval_dataset_path is None:
            raise ValueError(f"eval_strategy={training_args.eval_strategy!r} needs --eval_dataset_path.")
        eval_dataset = load_gap_dataset(script_args.eval_dataset_path, model.config)
    collator = GapDataCollator(
        processor,
        difficulty_threshold=script_args.difficulty_threshold,
        max_length=training_args.max_length,
        latent_tokens_per_span=model.config.latent_tokens_per_span,
    )
    datasets = [script_args.dataset_path]
    if eval_dataset is not None:
        datasets.append(script_args.eval_dataset_path)
    training_run = TrainingRun(
        base_model=model_args.model_name_or_path,
        base_model_id=script_args.base_model_id,
        datasets=datasets,
        command=command_line(argv if argv is not None else sys.argv),
        difficulty_threshold=script_args.difficulty_threshold,
    )
    trainer = GapSFTTrainer(
        model,
        args=training_args,
        data_collator=collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=get_peft_config(model_args),
        latent_head_learning_rate=script_args.latent_head_learning_rate,
        freeze_vision_tower=script_args.freeze_vision_tower,
        scheduled_sampling_prob=script_args.scheduled_sampling_prob,
        training_run=training_run,
    )
    resume = training_args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume == "last" else resume)
    if training_args.push_to_hub:
        # `push_to_hub` saves the final model itself (into a folder it uploads whole); save it to output_dir too.
        trainer.save_model(training_args.output_dir, _internal_call=True)
        trainer.push_to_hub()
    else:
        trainer.save_model(training_args.output_dir)
    return trainer


def command_line(argv):
    """The command that started this process, as one shell line: `python train_sft.py ...`, without the
    `--local_rank` a launcher adds."""
    args, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        if arg == "--local_rank":
            skip = True
            continue
        if arg.startswith("--local_rank="):
            continue
        args.append(arg)
    return shlex.join(["python", os.path.basename(argv[0]) if argv else "train_sft.py", *args])


if __name__ == "__main__":
    # `main` leaves the process group up (a caller may still evaluate or gather); the script ends it here.
    main(*make_parser().parse_args_and_config()).end()
