"""`GapSFTTrainer`: TRL's `SFTTrainer` for `GapForConditionalGeneration` (paper §4, App. F), and its `GapSFTConfig`.

The loss is L = L_LM + lambda * L_latent (Eq. 2-3), the targets (`gap targets`) fed at the ``<|latent_pad|>``
positions (teacher forcing); rows whose `accuracy` exceeds tau train on text only (Eq. 4, `GapDataCollator`).

```python
from gap_pipeline.collator import GapDataCollator
from gap_pipeline.trainer import GapSFTConfig, GapSFTTrainer

trainer = GapSFTTrainer(
    model,  # a GapForConditionalGeneration
    args=GapSFTConfig("runs/gap", latent_head_learning_rate=1e-4),
    data_collator=GapDataCollator(processor),
    train_dataset=dataset,
    processing_class=processor,
)
trainer.train()
```

`train_sft.py` wires it from the command line (loading or converting the model first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import is_peft_model
from transformers import PreTrainedModel
from transformers.integrations.deepspeed import (
    is_deepspeed_zero3_enabled,
    set_hf_deepspeed_config,
    unset_hf_deepspeed_config,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.trainer import OPTIMIZER_NAME, OPTIMIZER_NAME_BIN, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import is_flash_attn_2_available, logging
from trl import SFTConfig, SFTTrainer

from modeling_gap import IGNORE_INDEX, GapForConditionalGeneration
from processing_gap import GapProcessor

from . import GapError
from .collator import GapDataCollator, ImageFeatureCache
from .data import TARGETS_COLUMN
from .lora import configure_lora, record_adapter_base
from .model_card import RemoteCodeOnPush, TrainingRun, lora_settings, write_model_card
from .datasets_io import read_json_file, write_json_file
from .inference import register_gap_config
from .provenance import data_fingerprint, is_secret_name, model_fingerprint, record_differences, without_secrets

__all__ = [
    "RUN_RECORD",
    "GapSFTConfig",
    "GapSFTTrainer",
    "TrainingError",
    "apply_global_batch_size",
    "check_targets_before_loading",
    "last_checkpoint_of_run",
    "load_for_training",
    "run_record",
    "zero3_init_disabled",
]

# Dataset columns `GapDataCollator` reads: TRL's conversational vision format, the GAP columns, and the image
# processor outputs a dataset may hold precomputed.
COLLATOR_COLUMNS = ("messages", "images", "aux_images", TARGETS_COLUMN, "accuracy", "pixel_values", "image_grid_thw",
                    "id")
# The model's latent head attribute: a parameter belongs to the head when this is one of its name's parts
# (`latent_head.proj.weight`, `base_model.model.latent_head.modules_to_save.default.proj.weight`).
LATENT_HEAD = "latent_head"


class TrainingError(GapError):
    """A training run that cannot start as asked (arguments, inputs, resuming); the message names the fix."""


def is_latent_head_parameter(name: str) -> bool:
    """Whether the parameter called `name` (in `named_parameters()`, with or without a PEFT wrapper) is the head's."""
    return LATENT_HEAD in name.split(".")


@dataclass
class GapSFTConfig(SFTConfig):
    """`SFTConfig` with the GAP trainer's own fields (each field's help says what it does); `dataset_kwargs`
    always gets `skip_prepare_dataset`."""

    latent_head_learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate of the latent head. Default: --learning_rate."}
    )
    freeze_vision_tower: bool = field(
        default=True,
        metadata={"help": "Keep the vision tower frozen (default; a trainable tower collapsed under the latent loss). "
                  "Must stay on with a PEFT config."},
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

    image_feature_cache_mb: float = field(
        default=1024.0,
        metadata={
            "help": "With a frozen vision tower and a GapDataCollator, keep each training image's tower features (CPU "
            "memory, up to this many MB; then no more are added) so that later epochs skip its image processing and "
            "its tower forward (the features are the same); 0 = off. Emptied when train() starts."
        },
    )

    resume_without_optimizer_state: bool = field(
        default=False,
        metadata={
            "help": "Accept a --resume_from_checkpoint folder without the optimizer or learning-rate scheduler state "
            "(saved with --save_only_model, or files removed): training continues from its weights and step with a "
            "fresh optimizer and schedule, so it ends with other weights than an uninterrupted run. Without it such "
            "a checkpoint is an error."
        },
    )

    def __post_init__(self):
        if self.image_feature_cache_mb < 0:
            raise TrainingError(f"`image_feature_cache_mb` must be >= 0, got {self.image_feature_cache_mb}.")
        if self.latent_head_learning_rate is not None and self.latent_head_learning_rate < 0:
            raise TrainingError(f"`latent_head_learning_rate` must be >= 0, got {self.latent_head_learning_rate}.")
        if not 0.0 <= self.scheduled_sampling_prob <= 1.0:
            raise TrainingError(f"`scheduled_sampling_prob` must be in [0, 1], got {self.scheduled_sampling_prob}.")
        # The GAP collator builds every tensor from the raw rows; TRL must not tokenize a dataset without images.
        self.dataset_kwargs = {**(self.dataset_kwargs or {}), "skip_prepare_dataset": True}
        super().__post_init__()
        if self.latent_head_learning_rate is None:
            self.latent_head_learning_rate = self.learning_rate

    def __getstate__(self) -> dict[str, Any]:
        """The arguments as pickled, which is how the Trainer saves them (`training_args.bin` in every saved and
        pushed folder): every field named like a secret (`is_secret_name`: ``hub_token``...) is None there. The
        arguments in memory keep it, so pushes still authenticate."""
        return {name: None if is_secret_name(name) else value for name, value in self.__dict__.items()}


class GapSFTTrainer(SFTTrainer):
    r"""`SFTTrainer` for `GapForConditionalGeneration`: L = L_LM + lambda * L_latent.

    Differences from `SFTTrainer`:

    * the loss is the model's own (`compute_loss` calls the GAP forward; TRL's fused LM head, which would skip the
      latent injection and loss, is removed from the model);
    * both terms are normalised over the global batch (all ranks and accumulation steps): the LM term by the
      Trainer's `num_items_in_batch`, the latent term by the number of latent positions counted the same way;
    * `lm_loss`, `latent_loss`, `latent_norm_ratio` (mean ||v_hat|| / ||v|| over latent positions) and
      `latent_relse` (sum ||v_hat - v||^2 / sum ||v||^2: the teacher-forced relative error, comparable across
      models, lambdas and reductions) are logged next to `loss`; with an `eval_dataset` the same as `eval_*`, so
      the held-out latent error sits next to the held-out LM loss;
    * the GAP dataset columns (`aux_images`, `latent_targets`, `accuracy`) reach the data collator;
    * the latent head has its own learning rate (`args.latent_head_learning_rate`);
    * the vision tower is frozen unless `args.freeze_vision_tower=False`;
    * the vision tower and the latent head run on every micro-batch, so ZeRO-3 ranks gather the same parameters in
      the same order (a micro-batch without images encodes a one-token dummy image whose features are weighted 0);
    * `args.scheduled_sampling_prob` p > 0 turns on scheduled sampling (App. F; `scheduled_sampling_fraction`, the
      share of replaced spans, is logged).

    `model` must be an instance (a `GapForConditionalGeneration`, or a PEFT model around one). With `peft_config`
    (a LoRA config) the adapter goes on the language model only (`gap_pipeline.lora.configure_lora`, on a copy),
    the latent head is fully trainable and so are the three latent tokens' rows of the input embedding and, when
    untied, of the LM head.

    Saving writes a model card (`gap_pipeline.model_card`) into every saved folder; `training_run` (a
    `TrainingRun`) supplies what the trainer cannot know (command, base model, datasets). Pushing is the Trainer's
    own (`push_to_hub`, and the checkpoint pushes of `hub_strategy`): it uploads `output_dir` less `_*` and
    `checkpoint-*`, with GAP's card and remote code in it.
    """

    _tag_names = ["trl", "sft", "gap"]
    _name = "GAP SFT"

    def __init__(
        self,
        model: PreTrainedModel,
        args: GapSFTConfig | SFTConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        *,
        peft_config: Any = None,
        training_run: TrainingRun | None = None,
        run_record: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        if isinstance(model, str):
            raise TypeError(
                "GapSFTTrainer needs a model instance: load it with `gap_pipeline.trainer.load_for_training` "
                "or `GapForConditionalGeneration.from_pretrained` after the training arguments exist."
            )
        if args is None:
            args = GapSFTConfig(f"{Path(model.config._name_or_path).name or 'gap'}-GAP")
        elif not isinstance(args, GapSFTConfig):
            # The given values as `dataclasses.replace` passes them (`to_dict` would mask the *_token fields).
            args = GapSFTConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init})
        if peft_config is not None:
            if not args.freeze_vision_tower:
                raise TrainingError(
                    "With a PEFT config only the adapter, the latent head and the latent-token rows train; the vision "
                    "tower stays frozen. Drop --no_freeze_vision_tower or train without --use_peft."
                )
            peft_config = configure_lora(peft_config, (model.get_base_model() if is_peft_model(model) else model).config)
        callbacks = [*(kwargs.pop("callbacks", None) or []), RemoteCodeOnPush()]
        super().__init__(model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, peft_config=peft_config,
                         callbacks=callbacks, **kwargs)
        gap = self.gap_model
        if gap.config.latent_token_ids is None:
            raise TrainingError("The model has no latent token ids; convert it with `from_qwen2_5_vl` first.")
        # `SFTTrainer.__init__` replaced `forward` on this instance by a fused-LM-head wrapper; with
        # `fused_lm_head=True` it runs backbone + LM head only, skipping GAP's latent injection and latent loss.
        # `compute_loss` below never asks for it, and removing the instance attribute restores the class's forward.
        if "forward" in vars(gap):
            del gap.forward
        if self.args.freeze_vision_tower:
            gap.model.visual.requires_grad_(False)
        # The frozen tower's features of each image, lent to the collator during `train()` (known images get no pixels).
        self._feature_cache = None
        if self.args.freeze_vision_tower and self.args.image_feature_cache_mb > 0 and isinstance(
                self.data_collator, GapDataCollator):
            self._feature_cache = ImageFeatureCache(int(self.args.image_feature_cache_mb * 2**20))
        self._num_latent_items_in_batch = None
        # per mode, over the latent positions since the last log: (sum ||v_hat||/||v||, positions, sum ||v_hat - v||^2,
        # sum ||v||^2)
        self._latent_stats = {mode: torch.zeros(4, dtype=torch.float64) for mode in ("train", "eval")}
        self._replaced_spans = torch.zeros(2, dtype=torch.float64)  # (replaced spans, spans) since the last log
        self._sampling_micro_step = (None, 0)  # (global step, micro-batches seen in it): the coin flips' seed
        self._fp32_head_state: dict[str, torch.Tensor] = {}  # filled by `save_model` for `_save`
        self.training_run = training_run if training_run is not None else TrainingRun()
        self.run_record = run_record

    @property
    def gap_model(self) -> PreTrainedModel:
        """The `GapForConditionalGeneration` inside `self.model` (through a PEFT wrapper if any).

        Looked up once per `self.model` object: `is_peft_model` reads the installed packages' metadata on every call
        (~10 ms), and the loss asks for the model every micro-batch.
        """
        return self._once_per_model("gap_model",
                                    lambda model: model.get_base_model() if is_peft_model(model) else model)

    def _once_per_model(self, name: str, compute):
        """`compute(self.model)`, computed again only when `self.model` is another object."""
        memo = self.__dict__.setdefault("_model_memo", {})
        if name not in memo or memo[name][0] is not self.model:
            memo[name] = self.model, compute(self.model)
        return memo[name][1]

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """`Trainer.floating_point_ops` (6 x input tokens x non-embedding parameters, summed into `total_flos`), with
        the parameters counted once: `num_parameters` walks every module, and this runs every micro-batch."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        return 6 * inputs[main_input].numel() * self._once_per_model(
            "num_parameters", lambda model: model.num_parameters(exclude_embeddings=True)
        )

    def train(self, *args: Any, **kwargs: Any):
        """`Trainer.train`, with the image feature cache (if on) lent to the data collator for its duration: emptied
        first (the tower's weights may have changed, e.g. by `resume_from_checkpoint`), and taken back afterwards, so
        that batches made outside training carry every image's pixels. A checkpoint to resume from must hold the
        optimizer and scheduler state (`check_resume_state`)."""
        resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
        if resume is True:  # the Trainer's own pick
            resume = get_last_checkpoint(self.args.output_dir)
        if isinstance(resume, (str, os.PathLike)):
            self.check_resume_state(resume)
        if self._feature_cache is None:
            return super().train(*args, **kwargs)
        self._feature_cache.clear()
        collator, lent = self.data_collator, self.data_collator.feature_cache
        collator.feature_cache = self._feature_cache
        try:
            return super().train(*args, **kwargs)
        finally:
            collator.feature_cache = lent

    def check_resume_state(self, checkpoint: str | os.PathLike) -> None:
        """Refuse to resume from `checkpoint` when it lacks what the Trainer would silently start afresh (the optimizer
        or scheduler state), unless `args.resume_without_optimizer_state`, which resumes with a warning instead."""
        folder = Path(checkpoint)
        missing = []
        if self.is_deepspeed_enabled:
            if not any(folder.glob("global_step*")):
                raise TrainingError(
                    f"--resume_from_checkpoint {folder}: DeepSpeed resumes from its global_step* folder, which this "
                    "checkpoint lacks (it was not saved under DeepSpeed); resume from a checkpoint of this DeepSpeed run"
                )
        elif not any((folder / name).exists() for name in (OPTIMIZER_NAME, OPTIMIZER_NAME_BIN)) and not any(
                path.is_dir() for path in folder.glob("optimizer*")):
            missing.append(f"the optimizer state ({OPTIMIZER_NAME})")
        uses_deepspeed_scheduler = self.is_deepspeed_enabled and "scheduler" in self.args.hf_deepspeed_config.config
        if not uses_deepspeed_scheduler and not (folder / SCHEDULER_NAME).is_file():
            missing.append(f"the learning-rate scheduler state ({SCHEDULER_NAME})")
        if not missing:
            return
        what = f"--resume_from_checkpoint {folder} lacks {' and '.join(missing)} (saved with --save_only_model, or " \
               "files removed)"
        if not self.args.resume_without_optimizer_state:
            raise TrainingError(
                f"{what}: the run would go on with a fresh optimizer and schedule and end with other weights than an "
                "uninterrupted run. Resume from a complete checkpoint, or pass --resume_without_optimizer_state to "
                "continue from its weights and step anyway."
            )
        logging.get_logger(__name__).warning(
            f"{what}; continuing from its weights and step with a fresh optimizer and schedule "
            "(--resume_without_optimizer_state): the result differs from an uninterrupted run")

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
        """Also count the global batch's ``<|latent_pad|>`` positions (all ranks, all accumulation steps), summed like
        `Trainer._get_num_items_in_batch` sums labels; `compute_loss` passes the count to the model."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        count = None
        if batch_samples:
            pad_id = self.gap_model.config.latent_pad_token_id
            count = torch.as_tensor(sum((batch["input_ids"] == pad_id).sum() for batch in batch_samples), device=device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                count = self.accelerator.gather(count).sum()
        self._num_latent_items_in_batch = count
        return batch_samples, num_items_in_batch

    # -- loss -----------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs = dict(inputs)
        inputs["use_cache"] = False
        inputs["supervised_logits_only"] = True  # the LM head only where labels supervise: the memory peak otherwise
        vision_anchor = self._encode_images(inputs)
        global_counts = mode == "train" and num_items_in_batch is not None
        if global_counts:
            inputs["num_items_in_batch"] = num_items_in_batch
            inputs["num_latent_items_in_batch"] = self._num_latent_items_in_batch
        if mode == "train" and self.args.scheduled_sampling_prob > 0:
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
        """The two passes of scheduled sampling (App. F); returns the second pass's outputs (its loss is against the
        true targets).

        The first, teacher-forced pass runs without gradients but with the labels, so that the latent head runs as
        often as in the second pass on every rank; both passes run on every micro-batch, latents or not (ZeRO-3 ranks
        gather in step). The images are encoded once, for both.
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
        # The second pass's loss compares its predictions with the true targets, not with the inputs it was fed.
        outputs = model(**second_inputs, latent_targets=targets)
        counts = torch.tensor([[float(replaced.sum()), float(n_spans)]], device=self.args.device)
        self._replaced_spans += self.accelerator.gather(counts).sum(0).double().cpu()
        return outputs

    def _span_ids(self, input_ids):
        """(span index of every ``<|latent_pad|>``, in pad order; number of spans): spans are numbered in
        row-major order of their ``<|latent_start|>``, like the rows of `latent_embeds`."""
        starts = (input_ids == self.gap_model.config.latent_start_token_id).long()
        pads = input_ids == self.gap_model.config.latent_pad_token_id
        opened = starts.cumsum(1)
        if (opened[pads] == 0).any():
            raise GapError(
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
        return torch.rand(n_spans, generator=generator) < self.args.scheduled_sampling_prob

    def _encode_images(self, inputs):
        """Run the vision tower before the forward, on every rank and every micro-batch.

        The features go to the model as `mm_encoder_outputs` (the precomputed-encoder path of Qwen2.5-VL's forward).
        With the image feature cache (a frozen tower), the features of the batch's `cached_images` come from it and
        the tower runs on the others' pixels only, whose features it then keeps. A micro-batch whose images all come
        from the cache, or that has none, encodes a one-token dummy image instead (under ZeRO-3 only, for the cached
        case) and returns its features' sum times 0, to be added to the loss, so that under ZeRO-3 every rank gathers
        the tower at the same point of the step. Returns that zero term, or None.
        """
        gap = self.gap_model
        visual = gap.model.visual
        pixel_values = inputs.pop("pixel_values", None)
        keys, cached = inputs.pop("image_keys", None), inputs.pop("cached_images", None)
        trainable = any(parameter.requires_grad for parameter in visual.parameters())
        cache = None if trainable else self._feature_cache
        if cached is not None and bool(cached.any()) and cache is None:
            raise TrainingError(
                "The batch takes image features from the feature cache but the vision tower is trainable now: keep it "
                "frozen during training, or set image_feature_cache_mb=0."
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            if pixel_values is not None or cached is not None:
                grids = inputs["image_grid_thw"]
                features = ()
                if pixel_values is not None:
                    fresh = grids if cached is None else grids[~cached.to(grids.device)]
                    features = gap.model.get_image_features(pixel_values, fresh, return_dict=True).pooler_output
                if cached is not None:
                    features = self._merge_cached_features(cache, keys, cached.tolist(), features, grids)
                inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=tuple(features))}
                if pixel_values is not None or not is_deepspeed_zero3_enabled():
                    return None
            # The tower has not run on this micro-batch: a dummy image keeps the ranks' ZeRO-3 gathers in step.
            dummy, grid_thw = self._dummy_image(gap, inputs["input_ids"].device)
            features = gap.model.get_image_features(dummy, grid_thw, return_dict=True).pooler_output
            return torch.cat(features).float().sum() * 0.0

    def _merge_cached_features(self, cache, keys, cached, computed, grids) -> tuple[torch.Tensor, ...]:
        """Every image's features in batch order: from `cache` where `cached`, else the next of `computed` (the tower's
        output for the other images, in order), which the cache (None: a trainable tower) keeps with its `grids` row."""
        fresh = iter(computed)
        features = []
        for i, (key, hit) in enumerate(zip(keys, cached)):
            if hit:
                features.append(cache.get(key)[0].to(grids.device, non_blocking=True))
                continue
            feature = next(fresh)
            if key is not None and cache is not None:
                cache.add(key, feature, grids[i])
            features.append(feature)
        return tuple(features)

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
        """Append this micro-batch's `lm_loss`, `latent_loss`, `latent_norm_ratio` and `mean_token_accuracy`.

        `lm_loss` and `latent_loss` are recorded as the global batch's loss terms: gathered, scaled like the loss and
        multiplied by the number of accumulation steps, so that their average over a logging window is comparable to
        the logged `loss` (= `lm_loss` + lambda * `latent_loss`). `latent_norm_ratio` is summed over the latent
        positions of all ranks and divided at logging time, so every latent position of the window counts once.
        Every value goes into one tensor, gathered and read back once (one device synchronisation per micro-batch).
        """
        device = self.args.device
        values = torch.zeros(9, device=device)  # lm, latent, the four `_latent_stats`, correct, supervised, tokens
        values[0] = outputs.lm_loss.detach().float() * scale
        values[1] = outputs.latent_loss.detach().float() * scale
        if outputs.latent_predictions is not None:
            predictions = outputs.latent_predictions.detach()
            targets = inputs["latent_embeds"].to(predictions.device, torch.float32)
            ratio = predictions.norm(dim=-1) / targets.norm(dim=-1).clamp_min(1e-12)
            values[2] = ratio.sum()
            values[3] = ratio.numel()
            values[4] = (predictions - targets).pow(2).sum()
            values[5] = targets.pow(2).sum()
        # With labels the model returns logits only at the supervised positions, and their target ids.
        values[6] = (outputs.logits.argmax(-1) == outputs.supervised_labels).sum()
        values[7] = outputs.supervised_labels.numel()
        count_tokens = mode == "train" and self.args.include_num_input_tokens_seen == "no"
        if count_tokens:
            values[8] = inputs["attention_mask"].sum()
        gathered = self.accelerator.gather_for_metrics(values[None])
        sums = gathered[:, 2:].sum(0)
        accuracy = sums[4:5] / sums[5:6].clamp_min(1.0)  # 0 without supervised tokens
        host = torch.cat([gathered[:, :2].mean(0), sums, accuracy]).cpu()
        self._latent_stats[mode] += host[2:6].double()
        lm_loss, latent_loss, tokens, accuracy = host[[0, 1, 8, 9]].tolist()
        metrics = self._metrics[mode]
        metrics["lm_loss"].append(lm_loss * steps)
        metrics["latent_loss"].append(latent_loss * steps)
        metrics["mean_token_accuracy"].append(accuracy)
        if count_tokens:
            # TRL's `num_tokens`, kept in the Trainer's state (saved with each checkpoint, restored on resume); with
            # `include_num_input_tokens_seen` the Trainer counts it itself.
            self.state.num_input_tokens_seen += int(tokens)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """(loss, logits, labels) of an evaluation batch, teacher-forced, in the layout of any causal LM's Trainer.

        The model computes logits only at the supervised positions; for `compute_metrics` they are placed back into
        a `(batch, seq, vocab)` tensor (zeros elsewhere), next to the batch's `(batch, seq)` labels, unshifted as
        for any causal LM: position t's logits predict label t + 1 (IGNORE_INDEX where nothing is supervised, the
        latent pads included).
        """
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            if prediction_loss_only:
                return self.compute_loss(model, inputs).detach(), None, None
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        mask = outputs.supervised_mask
        logits = outputs.logits.new_zeros(*mask.shape, outputs.logits.shape[-1])
        logits[mask] = outputs.logits
        labels = torch.full(mask.shape, IGNORE_INDEX, dtype=torch.long, device=mask.device)
        labels[:, 1:][mask[:, :-1]] = outputs.supervised_labels.to(mask.device)
        return loss.detach(), logits, labels

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        ratio_sum, count, squared_error, squared_norm = self._latent_stats[mode].tolist()
        if count > 0:
            self._metrics[mode]["latent_norm_ratio"] = [ratio_sum / count]
            self._metrics[mode]["latent_relse"] = [squared_error / max(squared_norm, 1e-12)]
        self._latent_stats[mode].zero_()
        if mode == "train" and self.args.scheduled_sampling_prob > 0:
            replaced, spans = self._replaced_spans.tolist()
            if spans > 0:
                self._metrics[mode]["scheduled_sampling_fraction"] = [replaced / spans]
            self._replaced_spans.zero_()
        self._metrics[mode]["num_tokens"] = [self.state.num_input_tokens_seen]
        super().log(logs, start_time)

    # -- saving and the model card --------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, with the latent head written from DeepSpeed's fp32 master weights.

        Under ZeRO-3 with bf16/fp16 the head's working copy is 16-bit (every partitioned parameter is); the saved
        head must be the fp32 one. Runs on every rank (gathering is collective), like `Trainer.save_model`.
        """
        self._fp32_head_state = self._gather_fp32_latent_head()
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self._fp32_head_state = {}

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """`Trainer._save`, then the model card into the same folder (on the processes that write)."""
        if state_dict is not None and self._fp32_head_state:
            state_dict = {**state_dict, **self._fp32_head_state}
        super()._save(output_dir, state_dict=state_dict)
        self.create_model_card(output_dir=output_dir)
        if is_peft_model(self.model) and self.args.should_save:  # what `gap merge-lora` must merge the adapter into
            record_adapter_base(output_dir if output_dir is not None else self.args.output_dir,
                                next(iter(self.model.peft_config.values())).base_model_name_or_path)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """`Trainer._save_checkpoint`, with `run_record` (`run_record()`: what produced the run) written into the
        checkpoint folder first. The Trainer writes ``trainer_state.json`` last and then rotates older checkpoints
        away (`save_total_limit`), so after a kill at any point the newest folder holding both files is complete and
        of this run (`last_checkpoint_of_run`)."""
        if self.run_record is not None and self.args.should_save:
            folder = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            write_json_file(folder / RUN_RECORD, self.run_record)
        super()._save_checkpoint(model, trial)

    def _gather_fp32_latent_head(self) -> dict[str, torch.Tensor]:
        """{state-dict key: fp32 CPU tensor} of the head's low-precision DeepSpeed parameters (empty otherwise)."""
        if not self.is_deepspeed_enabled or self.deepspeed is None or is_peft_model(self.model):
            return {}
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, parameter in self.model.named_parameters():
            if not is_latent_head_parameter(name) or parameter.dtype == torch.float32:
                continue
            full = safe_get_full_fp32_param(parameter)
            if full is not None:
                shape = parameter.ds_shape if hasattr(parameter, "ds_shape") else parameter.shape
                state[name] = full.detach().reshape(shape).to("cpu", torch.float32)
        return state

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None, output_dir: str | None = None) -> None:
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
        write_model_card(output_dir if output_dir is not None else self.args.output_dir, self.gap_model.config,
                         model_name=model_name, model_id=self.hub_model_id or self.args.hub_model_id, training=run,
                         adapter=is_peft_model(self.model),
                         tags=[*self._tag_names, *([tags] if isinstance(tags, str) else list(tags or []))])

    def _training_run_for_card(self) -> TrainingRun:
        """`training_run` completed with what the trainer knows: tau, p, world size, LoRA, hyperparameters."""
        run = self.training_run
        tau = run.difficulty_threshold
        if tau is None:
            tau = getattr(self.data_collator, "difficulty_threshold", None)
        args = self.args
        hyperparameters = {
            "learning_rate": args.learning_rate,
            "latent_head_learning_rate": args.latent_head_learning_rate,
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
            "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
            "activation_checkpointing": args.activation_checkpointing,
            "freeze_vision_tower": args.freeze_vision_tower,
            "seed": args.seed,
            "steps_trained": self.state.global_step,
        }
        if args.deepspeed:
            hyperparameters["deepspeed"] = args.deepspeed if isinstance(args.deepspeed, str) else "dict"
        return dataclasses.replace(run, datasets=list(run.datasets), difficulty_threshold=tau,
                                   scheduled_sampling_prob=args.scheduled_sampling_prob,
                                   world_size=run.world_size or args.world_size,
                                   hyperparameters={**hyperparameters, **run.hyperparameters},
                                   lora=run.lora if run.lora is not None else lora_settings(self.model))

    # -- optimizer ------------------------------------------------------------------------------------------------
    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
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
            key = (is_latent_head_parameter(name), name in decay_names)
            groups.setdefault(key, []).append(parameter)
        param_groups = [{"params": parameters, "weight_decay": self.args.weight_decay if decays else 0.0,
                         **({"lr": self.args.latent_head_learning_rate} if is_head else {})}
                        for (is_head, decays), parameters in sorted(groups.items())]
        if not any(is_head for is_head, _ in groups):
            raise GapError("No trainable latent-head parameter: the GAP latent head must be trained.")

        optimizer_cls, optimizer_kwargs = (self.optimizer_cls_and_kwargs
                                           or self.get_optimizer_cls_and_kwargs(self.args, opt_model))
        replaced = sorted({"params", "model", "optimizer_dict"} & set(optimizer_kwargs))
        if replaced or not isinstance(optimizer_cls, type):
            raise TrainingError(
                f"optim={self.args.optim!r} builds its own parameter groups, which would drop the latent head's "
                f"learning rate; use a standard optimizer such as `adamw_torch`."
            )
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer


def apply_global_batch_size(training_args: GapSFTConfig, global_batch_size: int | None) -> GapSFTConfig:
    """Training arguments with gradient_accumulation_steps derived from `global_batch_size` (None: unchanged),
    rebuilt rather than edited, because constructing them fills the DeepSpeed config's "auto" batch sizes."""
    if global_batch_size is None:
        return training_args
    per_step = training_args.per_device_train_batch_size * training_args.world_size
    if global_batch_size < 1 or global_batch_size % per_step:
        raise TrainingError(
            f"--global_batch_size {global_batch_size} is not a positive multiple of per_device_train_batch_size x "
            f"world_size = {training_args.per_device_train_batch_size} x {training_args.world_size} = {per_step}."
        )
    steps = global_batch_size // per_step
    if steps == training_args.gradient_accumulation_steps:
        return training_args
    return dataclasses.replace(training_args, gradient_accumulation_steps=steps)


# --------------------------------------------------------------------------------------------------------------------
# Building what the trainer trains, after the training arguments exist (so ZeRO-3 partitions the model)
# --------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def zero3_init_disabled(args: GapSFTConfig) -> Iterator[None]:
    """Build models normally (not partitioned by `zero.Init`) inside the block, e.g. for a one-off conversion."""
    if not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(args.hf_deepspeed_config)


def load_for_training(
    path: str | os.PathLike,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    attn_implementation: str | None = None,
    **config_overrides: Any,
) -> tuple[PreTrainedModel, Any]:
    """The GAP checkpoint at `path` and its processor, to train (`config_overrides`: K, lambda, the loss
    reduction; None values are left out). `attn_implementation` None picks flash_attention_2 when installed."""
    if attn_implementation is None:
        attn_implementation = "flash_attention_2" if is_flash_attn_2_available() else "sdpa"
    overrides = {key: value for key, value in config_overrides.items() if value is not None}
    revision_kwargs = {} if revision is None else {"revision": revision}
    model = GapForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                        **revision_kwargs, **overrides)
    model.config.validate_gap()
    # GapProcessor is this repository's class: no code from the folder is needed. Its tokenizer reads the folder's
    # config through AutoConfig, which must know the GAP model type (else it falls back to a bare config and warns
    # "model of type `gap_qwen2_5_vl` to instantiate a model of type ``").
    register_gap_config()
    processor = GapProcessor.from_pretrained(path, **revision_kwargs, trust_remote_code=False,
                                             latent_tokens_per_span=model.config.latent_tokens_per_span)
    return model, processor


def check_targets_before_loading(dataset_paths: list[str], model_path: str, *, revision: str | None = None,
                                 converting: bool, latent_tokens_per_span: int | None) -> None:
    """Before any heavy work (converting, loading the model): the latent targets in the `gap targets` folders
    `dataset_paths` must have the K and width d the model will have and come from the vision tower of `model_path`
    (a GAP checkpoint, or the Qwen2.5-VL base that `converting` turns into one; `latent_tokens_per_span`: the K given
    on the command line). The K error names the training flag that fixes it."""
    from transformers import Qwen2_5_VLConfig

    from configuration_gap import GapConfig

    from .convert import DEFAULT_LATENT_TOKENS_PER_SPAN
    from .targets import check_targets_encoder, targets_metadata

    config = (Qwen2_5_VLConfig if converting else GapConfig).from_pretrained(
        model_path, **({} if revision is None else {"revision": revision}))
    if latent_tokens_per_span is not None:
        K, source = latent_tokens_per_span, "--latent_tokens_per_span"
    elif converting:
        K, source = DEFAULT_LATENT_TOKENS_PER_SPAN, "the conversion's default"
    else:
        K, source = config.latent_tokens_per_span, "the checkpoint's"
    d = config.text_config.hidden_size
    for path in dataset_paths:
        metadata = targets_metadata(path)
        if metadata["latent_tokens_per_span"] != K:
            pooled = metadata["latent_tokens_per_span"]
            raise TrainingError(
                f"{path}: the latent targets were pooled for K={pooled} latent tokens per span, but the model "
                f"{'would be converted with' if converting else 'has'} K={K} ({source}): pass --latent_tokens_per_span "
                f"{pooled} to train with K={pooled}, or recompute the targets with `gap targets "
                f"--latent-tokens-per-span {K}`."
            )
        if metadata["hidden_size"] != d:
            raise TrainingError(
                f"{path}: the latent targets have width d={metadata['hidden_size']} but {model_path} has hidden size "
                f"d={d}: they come from another model's vision tower; rerun `gap targets --model {model_path}`."
            )
        check_targets_encoder(path, model_path)


# -- resuming the same run -------------------------------------------------------------------------------------------

RUN_RECORD = "gap_run.json"  # in each checkpoint: what produced the run (see gap_pipeline.provenance)


# Arguments that may change when a run resumes: its length, where it writes, bookkeeping.
RESUMABLE_CHANGES = {"num_train_epochs", "max_steps", "output_dir", "resume_from_checkpoint", "logging_steps",
                     "save_steps", "save_strategy", "save_total_limit", "eval_steps", "report_to", "run_name",
                     "push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "logging_dir", "disable_tqdm",
                     "dataloader_num_workers", "base_model_id", "converted_model_dir", "eval_dataset_path", "local_rank"}


def run_record(script_args: Any, training_args: GapSFTConfig, model_args: Any) -> dict:
    """What a resumed run must share with the run it continues: the model's and data's fingerprints and every setting
    that changes the result (`RESUMABLE_CHANGES` are left out). `script_args` and `model_args` are train_sft.py's
    `GapScriptArguments` and TRL's `ModelConfig`."""
    settings = {}
    for arguments in (script_args, model_args):
        settings.update(dataclasses.asdict(arguments))
    settings.update({key: getattr(training_args, key) for key in (
        "seed", "learning_rate", "latent_head_learning_rate", "weight_decay", "lr_scheduler_type", "warmup_steps",
        "per_device_train_batch_size", "gradient_accumulation_steps", "optim", "max_length", "freeze_vision_tower",
        "scheduled_sampling_prob", "bf16", "fp16")})
    settings = {key: value for key, value in settings.items() if key not in RESUMABLE_CHANGES}
    return {
        "model": model_fingerprint(model_args.model_name_or_path),
        "data": data_fingerprint(script_args.dataset_path),
        "pca": data_fingerprint(script_args.pca_path) if script_args.pca_path else None,
        "settings": without_secrets(json.loads(json.dumps(settings, default=str))),
    }


def last_checkpoint_of_run(output_dir: str | os.PathLike, record: dict[str, Any]) -> str:
    """The highest complete checkpoint in `output_dir` written by the run `record` describes (`--resume_from_checkpoint
    last`): it holds the record (`GapSFTTrainer` writes it first) and ``trainer_state.json`` (the Trainer's last file
    before it rotates older checkpoints away). Newer checkpoints of another run, or cut short, are skipped with a
    warning; none left is an error."""
    folder = Path(output_dir)
    checkpoints = []
    for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if folder.is_dir() else []:
        step = path.name[len(PREFIX_CHECKPOINT_DIR) + 1:]
        if path.is_dir() and step.isdigit():
            checkpoints.append((int(step), path))
    skipped = []
    for _, path in sorted(checkpoints, reverse=True):
        missing = [name for name in (RUN_RECORD, TRAINER_STATE_NAME) if not (path / name).is_file()]
        if missing:
            skipped.append(f"{path.name} is incomplete (no {' or '.join(missing)}: the run stopped while writing it, "
                           "or an older version wrote it)")
            continue
        stored = read_json_file(path / RUN_RECORD, TrainingError,
                                "pass a checkpoint folder to --resume_from_checkpoint")
        differences = record_differences(stored, record)
        if differences:
            skipped.append(f"{path.name} belongs to another run ({'; '.join(differences)})")
            continue
        for note in skipped:
            logging.get_logger(__name__).warning(f"--resume_from_checkpoint last: skipping {note}")
        return str(path)
    raise TrainingError(
        f"--resume_from_checkpoint last: {folder} holds no complete checkpoint of this run"
        + (f" ({'; '.join(skipped)})" if skipped else "")
        + ". Start afresh into another --output_dir, or pass a checkpoint folder to --resume_from_checkpoint."
    )
