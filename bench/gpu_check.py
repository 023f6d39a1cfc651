"""GPU check: GAP at Qwen2.5-VL-7B's real width on one CUDA GPU, in one command (`make gpu-check`).

Random weights with the 7B's text and vision dimensions (hidden 3584, intermediate 18944, 28 heads / 4 KV heads,
vocabulary 152,064, vision width 1280), fewer decoder layers and vision blocks than the 7B's 28 and 32 (stated in the
results: `--layers`, `--vision-depth`), in bf16, with SDPA and FlashAttention-2 when `flash_attn` is importable. The
tokenizer is the tiny one built in code (nothing is downloaded), so token ids use the first rows of the vocabulary.

1. numerics     no-latent logits of GAP vs stock Qwen2.5-VL on the same weights (max abs diff, per attention
                implementation); the latent head's parameters, buffers and output stay fp32 in a bf16 model
2. generation   latent decoding and `suppress` tokens/s vs stock `generate`, batch 1 and 8 (goal >= 0.95);
                latent step vs text step (goal <= 1.05); a KV-cached K=36 span vs recomputing the prefix at
                prompt lengths 512 / 2048 / 8192; bf16 cached vs uncached decoding agreement (tokens, latents)
3. train        GapSFTTrainer vs TRL's SFTTrainer on the same model and batch (an image prompt, a K=36 span,
                ~1k tokens per row): rows/s ratio (goal >= 0.95), peak memory of a step; loss finite and the
                head still fp32 after training
4. zero3        DeepSpeed ZeRO-3 in one process (torchrun): 3 steps, save, reload with `trust_remote_code`,
                weights equal to the ones gathered from the engine (the head from its fp32 master copy)

Every ratio is measured side by side (interleaved, same weights, same inputs). A part that fails is recorded with
its error and the others still run; the exit status is 1 then. Results: bench/results/gpu_<device>.json and a
markdown table on stdout (the README's table).

    python bench/gpu_check.py                         # CUDA GPU, ~3 minutes (estimated) for 8 layers
    python bench/gpu_check.py --layers 28 --vision-depth 32 --parts numerics generation
    python bench/gpu_check.py --tiny                  # the same code paths on CPU with a tiny config, in seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from argparse import Namespace
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from common import (REPO, RESULTS, current_rss_mb, machine, peak_rss_mb, print_table, reset_peak_rss, spread, sync,
                    timed)
from decode import OpenSpanEvery, bench_step_ratio, cache_vs_recompute, random_prompts
from transformers import TrainerCallback

PARTS = ("numerics", "generation", "train", "zero3")


@dataclass(frozen=True)
class Spec:
    """Model dimensions and workload sizes of one run."""

    name: str
    text: dict  # text_config of the model (Qwen2.5-VL names)
    vision: dict  # vision_config
    vocab_size: int | None  # None: the tiny tokenizer's size
    latent_tokens_per_span: int  # K
    pca_components: int  # k
    latent_adapter_size: int
    image_side: int  # query image, pixels per side
    aux_side: int  # aux image: sqrt(K) merged tokens per side
    row_tokens: int  # tokens per training row, about
    train_rows: int  # rows per training step
    train_steps: int  # timed steps per round (one more runs first, untimed)
    train_rounds: int
    new_tokens: int  # tokens per generation in the throughput rows
    gen_prompt: int  # prompt tokens of the throughput rows
    span_period: int  # free tokens between spans in the throughput rows
    cache_lengths: tuple
    agree_prompt: int  # prompt tokens of the cached-vs-uncached agreement
    repeats: int
    zero3_layers: int
    zero3_vision_depth: int


def qwen2_5_vl_7b(layers: int, vision_depth: int) -> Spec:
    """Qwen2.5-VL-7B's dimensions (its config.json) with `layers` decoder layers and `vision_depth` vision blocks."""
    text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers, num_attention_heads=28,
                num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24]))
    return Spec(name="qwen2.5-vl-7b-width", text=text, vision=_vision_7b(vision_depth), vocab_size=152064,
                latent_tokens_per_span=36, pca_components=629, latent_adapter_size=1024, image_side=448, aux_side=168,
                row_tokens=1024, train_rows=4, train_steps=4, train_rounds=2, new_tokens=96, gen_prompt=128,
                span_period=24, cache_lengths=(512, 2048, 8192), agree_prompt=512, repeats=3, zero3_layers=2,
                zero3_vision_depth=2)


def _vision_7b(depth: int) -> dict:
    # The 7B runs full attention in blocks 7, 15, 23, 31 and windowed attention elsewhere; keep those below `depth`
    # and always the last block.
    full = sorted({b for b in (7, 15, 23, 31) if b < depth} | {depth - 1})
    return dict(depth=depth, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                window_size=112, fullatt_block_indexes=full, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2, tokens_per_second=2)


def tiny() -> Spec:
    """The tiny test model's dimensions (`gap_pipeline.tiny`): every code path in seconds on a CPU."""
    return Spec(name="tiny", text={}, vision={}, vocab_size=None,
                latent_tokens_per_span=4, pca_components=8, latent_adapter_size=32, image_side=112, aux_side=56,
                row_tokens=96, train_rows=2, train_steps=2, train_rounds=1, new_tokens=16, gen_prompt=24,
                span_period=4, cache_lengths=(32, 64, 128), agree_prompt=32, repeats=1, zero3_layers=2,
                zero3_vision_depth=2)


# ----------------------------------------------------------------------------------------------------------- models


def build(spec: Spec, device: str, dtype: torch.dtype, attn: str, seed: int = 0):
    """(gap, stock, processor): a random Qwen2.5-VL of `spec`'s dimensions and its GAP conversion.

    The two models share every backbone tensor (conversion reuses the base's weights), so both see the same weights
    throughout; the GAP head holds a random orthonormal PCA basis. Both vision towers are frozen (GAP's trainer
    freezes its own by default; the stock one is frozen here so both trainers train the same parameters).
    """
    from gap_pipeline.tiny import build_tiny_processor, build_tiny_tokenizer, synthetic_pca, tiny_qwen2_5_vl_config
    from modeling_gap import GapForConditionalGeneration
    from processing_gap import GapProcessor
    from transformers import AutoModelForImageTextToText

    tokenizer = build_tiny_tokenizer()
    side = spec.image_side
    base_processor = build_tiny_processor(tokenizer, min_pixels=spec.aux_side**2, max_pixels=side * side)
    # Room for the three latent tokens in the vocabulary (the 7B's 152,064 rows leave ~400 spare), so conversion reuses
    # rows instead of growing the embedding, and GAP and stock share every tensor.
    vocab_size = spec.vocab_size or len(tokenizer) + 8
    config = tiny_qwen2_5_vl_config(vocab_size, tokenizer=tokenizer, text_config=spec.text, vision_config=spec.vision)
    torch.manual_seed(seed)
    with torch.device(device):
        base = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn)
    pca = synthetic_pca(config.text_config.hidden_size, spec.pca_components, seed=seed)
    gap, tokenizer = GapForConditionalGeneration.from_qwen2_5_vl(
        base, tokenizer, pca, latent_tokens_per_span=spec.latent_tokens_per_span,
        latent_adapter_size=spec.latent_adapter_size)
    gap.set_attn_implementation(attn)
    base.model.visual.requires_grad_(False)
    for model in (gap, base):
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = None  # fixed lengths: every run decodes max_new_tokens
        model.generation_config.do_sample = False
        model.eval()
    processor = GapProcessor.from_qwen2_5_vl_processor(base_processor, tokenizer, spec.latent_tokens_per_span)
    return gap, base, processor


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------------------- data

WORDS = ("look at the grid and count the red green blue and yellow cells in each row then compare the rows "
         "the marked cell sits in the second column so the answer follows from that row alone").split()


def noise_image(side: int, rng: random.Random):
    from PIL import Image

    return Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))


def words(tokenizer, n_tokens: int, rng: random.Random) -> str:
    """Random words from `WORDS`, cut to `n_tokens` tokens (every word is at least one token)."""
    text = " ".join(rng.choice(WORDS) for _ in range(n_tokens))
    return tokenizer.decode(tokenizer(text).input_ids[:n_tokens])


def training_rows(spec: Spec, gap, processor, n: int, seed: int = 0) -> list[dict]:
    """`n` rows of the GAP schema: an image prompt, an assistant turn with one `<latent>` span, ~row_tokens tokens;
    latent targets from the model's own frozen vision tower (as `gap targets` computes them)."""
    from gap_pipeline.targets import targets_for_images

    rng = random.Random(seed)
    image_tokens = (spec.image_side // 28) ** 2
    free = max(8, spec.row_tokens - image_tokens - spec.latent_tokens_per_span - 24)
    rows, aux = [], []
    for _ in range(n):
        question = words(processor.tokenizer, free // 4, rng)
        before, after = words(processor.tokenizer, free // 2, rng), words(processor.tokenizer, free // 4, rng)
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"<think>{before} <latent> {after}</think>"
                                                                     f"<answer>{rng.randint(0, 9)}</answer>"}]}],
            "images": [noise_image(spec.image_side, rng)]})
        aux.append(noise_image(spec.aux_side, rng))
    with torch.no_grad():
        targets = targets_for_images(gap, processor.image_processor, aux, spec.latent_tokens_per_span)
    for row, target in zip(rows, targets):
        row["latent_targets"] = target.float().cpu().numpy()
    return rows


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# -------------------------------------------------------------------------------------------------------- 1 numerics


@torch.no_grad()
def part_numerics(ctx: Namespace) -> tuple[list, dict]:
    """No-latent logits of GAP vs stock on the same weights and an image prompt; the head's dtypes."""
    from gap_pipeline.collator import GapDataCollator

    gap, stock = ctx.gap, ctx.stock
    collator = GapDataCollator(ctx.processor)
    plain = [{"messages": [row["messages"][0], {"role": "assistant", "content": "the answer is 3"}],
              "images": row["images"]} for row in ctx.rows[:2]]
    batch = to_device(collator(plain), ctx.device)
    batch.pop("labels")
    rows, raw = [], {}
    for attn in ctx.attentions:
        gap.set_attn_implementation(attn)
        stock.set_attn_implementation(attn)
        a, b = gap(**batch).logits, stock(**batch).logits
        valid = batch["attention_mask"].bool()
        diff = (a.float() - b.float()).abs()[valid]
        raw[attn] = {"max_abs_diff": diff.max().item(), "logit_max_abs": b.float().abs()[valid].max().item(),
                     "argmax_equal": bool((a.argmax(-1) == b.argmax(-1))[valid].all()),
                     "logits_dtype": str(a.dtype)}
        rows.append({"metric": f"no-latent logits, GAP vs stock ({attn}): max abs diff", "value": raw[attn]["max_abs_diff"],
                     "goal": "report", "met": None,
                     "detail": f"{a.dtype}, |logit| up to {raw[attn]['logit_max_abs']:.2f}, argmax equal: "
                               f"{raw[attn]['argmax_equal']}, {int(valid.sum())} positions"})
    gap.set_attn_implementation(ctx.attentions[0])
    stock.set_attn_implementation(ctx.attentions[0])
    out = gap(**to_device(collator(ctx.rows[:1]), ctx.device))  # a teacher-forced span: latent predictions
    head = gap.latent_head
    dtypes = {"parameters": {str(p.dtype) for p in head.parameters()}, "buffers": {str(b.dtype) for b in head.buffers()},
              "latent_predictions": {str(out.latent_predictions.dtype)}, "next_latent": {str(out.next_latent.dtype)}}
    fp32 = all(found == {"torch.float32"} for found in dtypes.values())
    dtypes["backbone"] = {str(gap.model.language_model.embed_tokens.weight.dtype)}
    raw["head_dtypes"] = {key: sorted(found) for key, found in dtypes.items()}
    raw["latent_loss"] = out.latent_loss.item()
    rows.append({"metric": "latent head parameters, buffers and output fp32", "value": float(fp32), "goal": "1",
                 "met": fp32, "detail": f"backbone {raw['head_dtypes']['backbone'][0]}; latent loss {out.latent_loss.item():.4g}"})
    return rows, raw


# ------------------------------------------------------------------------------------------------------ 2 generation


def throughput(ctx: Namespace, batch: int) -> tuple[list, dict]:
    """Tokens/s of latent decoding (spans opening at different steps), `suppress` and stock `generate`."""
    gap, stock, spec, device = ctx.gap, ctx.stock, ctx.spec, ctx.device
    start, _, end = gap.config.latent_token_ids
    lengths = [spec.gen_prompt + 8 * (i % 4) for i in range(batch)]
    input_ids, mask = random_prompts(batch, lengths, start - 20, seed=batch)
    input_ids, mask = input_ids.to(device), mask.to(device)
    offsets = torch.arange(batch) * 3
    width = input_ids.shape[1]
    common = dict(input_ids=input_ids, attention_mask=mask, max_new_tokens=spec.new_tokens)
    runs = {
        "latent": lambda: gap.generate(**common, logits_processor=[OpenSpanEvery(start, end, spec.span_period,
                                                                                 offsets, width)]),
        "suppress": lambda: gap.generate(**common, latent_intervention="suppress"),
        "stock": lambda: stock.generate(**common),
    }
    times = {name: [] for name in runs}
    outputs = {}
    for repeat in range(spec.repeats + 1):
        for name, run in runs.items():
            seconds, outputs[name] = timed(run, device)
            if repeat:
                times[name].append(seconds)
    tokens = batch * spec.new_tokens
    per_second = {name: tokens / statistics.median(values) for name, values in times.items()}
    spans = (outputs["latent"][:, width:] == start).sum(1).tolist()
    same = bool(torch.equal(outputs["suppress"], outputs["stock"]))
    rows = [{"metric": f"latent decoding / stock generate, tokens/s, batch {batch}",
             "value": per_second["latent"] / per_second["stock"], "goal": ">= 0.95",
             "met": per_second["latent"] / per_second["stock"] >= 0.95,
             "detail": f"{per_second['latent']:.0f} vs {per_second['stock']:.0f} tok/s, spans per row {spans}"},
            {"metric": f"suppress / stock generate, tokens/s, batch {batch}",
             "value": per_second["suppress"] / per_second["stock"], "goal": ">= 0.95",
             "met": per_second["suppress"] / per_second["stock"] >= 0.95,
             "detail": f"{per_second['suppress']:.0f} vs {per_second['stock']:.0f} tok/s, same tokens: {same}"}]
    return rows, {"tokens_per_s": per_second, "seconds": {k: spread(v) for k, v in times.items()},
                  "spans_per_row": spans, "suppress_equals_stock": same}


@torch.no_grad()
def agreement(ctx: Namespace) -> tuple[dict, dict]:
    """Greedy latent decoding with and without the KV cache (two rows, left padding): tokens and latents."""
    gap, spec, device = ctx.gap, ctx.spec, ctx.device
    start, _, end = gap.config.latent_token_ids
    K = spec.latent_tokens_per_span
    input_ids, mask = random_prompts(2, [spec.agree_prompt, spec.agree_prompt - 7], start - 20, seed=5)
    input_ids, mask = input_ids.to(device), mask.to(device)
    outs = {}
    for use_cache in (True, False):  # row 0 opens a span at once, row 1 after 4 free tokens, neither a second one
        opener = OpenSpanEvery(start, end, 10**6, torch.tensor([0, 4 - 10**6]), input_ids.shape[1])
        outs[use_cache] = gap.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=K + 8,
                                       logits_processor=[opener], use_cache=use_cache, return_dict_in_generate=True)
    a, b = outs[True], outs[False]
    equal = bool(torch.equal(a.sequences, b.sequences))
    differing = (a.sequences != b.sequences).any(0).nonzero().flatten().tolist()
    latent_diff = latent_rel = None
    if all(x.shape == y.shape for x, y in zip(a.latents, b.latents)):
        diffs = [(x - y).abs().max().item() for x, y in zip(a.latents, b.latents) if x.numel()]
        rels = [((x - y).norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-12)).max().item()
                for x, y in zip(a.latents, b.latents) if x.numel()]
        latent_diff, latent_rel = max(diffs, default=0.0), max(rels, default=0.0)
    raw = {"tokens_equal": equal, "first_differing_column": differing[0] if differing else None,
           "latent_max_abs_diff": latent_diff, "latent_max_rel_diff": latent_rel,
           "spans": a.num_latent_spans.tolist()}
    row = {"metric": f"{str(gap.dtype).removeprefix('torch.')} cached vs uncached decoding: latent max rel diff",
           "value": latent_rel if latent_rel is not None else float("nan"), "goal": "report", "met": None,
           "detail": f"greedy tokens equal: {equal}, latent max abs diff {latent_diff}, spans {raw['spans']}"}
    return row, raw


def part_generation(ctx: Namespace) -> tuple[list, dict]:
    gap, spec, device = ctx.gap, ctx.spec, ctx.device
    rows, raw = [], {}
    for batch in (1, 8):
        new_rows, raw[f"batch_{batch}"] = throughput(ctx, batch)
        rows.extend(new_rows)
    step_row, raw["step"] = bench_step_ratio(gap, Namespace(device=device, repeats=spec.repeats, steps=spec.new_tokens))
    rows.append(step_row)
    raw["cache"] = [cache_vs_recompute(gap, n, spec.repeats, device) for n in spec.cache_lengths]
    for run in raw["cache"]:
        rows.append({"metric": f"K={run['latent_tokens_per_span']} span after {run['prompt_length']} tokens: "
                               f"recompute / KV cache", "value": run["steps_ratio"], "goal": "report", "met": None,
                     "detail": f"span steps {run['recompute_steps_s']['median']:.3f} s vs "
                               f"{run['cached_steps_s']['median']:.3f} s; with the prefill {run['call_ratio']:.1f}x"})
    agree_row, raw["cached_vs_uncached"] = agreement(ctx)
    rows.append(agree_row)
    return rows, raw


# ----------------------------------------------------------------------------------------------------------- 3 train


class StepMeter(TrainerCallback):
    """Seconds and peak memory of each optimisation step (data already fetched: `on_step_begin` to `on_step_end`)."""

    def __init__(self, device: str):
        self.device = device
        self.seconds, self.peak_mb = [], []

    def on_step_begin(self, args, state, control, **kwargs):
        sync(self.device)
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated() / 2**20
        else:
            gc.collect()
            self._base = current_rss_mb()
            reset_peak_rss()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.device)
        self.seconds.append(time.perf_counter() - self._start)
        peak = torch.cuda.max_memory_allocated() / 2**20 if self.device == "cuda" else peak_rss_mb()
        self.peak_mb.append(peak - self._base)


def trainer_arguments(output_dir: str, spec: Spec, ctx: Namespace, **overrides) -> dict:
    bf16 = ctx.dtype == torch.bfloat16
    return dict(output_dir=output_dir, per_device_train_batch_size=spec.train_rows, learning_rate=1e-5,
                lr_scheduler_type="constant", max_steps=spec.train_steps + 1, logging_steps=1, save_strategy="no",
                report_to="none", bf16=bf16, use_cpu=ctx.device == "cpu", remove_unused_columns=False, max_length=None,
                dataloader_num_workers=0, gradient_checkpointing=True, disable_tqdm=True, seed=0, **overrides)


def gap_trainer(model, processor, dataset, args, callbacks=()):
    """The trainer `train_sft.py` builds (`args`: a `GapSFTConfig`)."""
    from gap_pipeline.collator import GapDataCollator
    from gap_pipeline.trainer import GapSFTTrainer

    return GapSFTTrainer(model, args=args, data_collator=GapDataCollator(processor), train_dataset=dataset,
                         processing_class=processor, callbacks=list(callbacks))


def part_train(ctx: Namespace) -> tuple[list, dict]:
    """GapSFTTrainer vs SFTTrainer: the same weights, rows and step count, interleaved rounds of `Trainer.train`."""
    from datasets import Dataset
    from gap_pipeline.collator import GapDataCollator
    from gap_pipeline.trainer import GapSFTConfig
    from trl import SFTConfig, SFTTrainer

    spec, device = ctx.spec, ctx.device
    collate = GapDataCollator(ctx.processor)

    def stock_collator(rows):  # the same tensors; stock Qwen2.5-VL reads the pads as ordinary (unsupervised) tokens
        return {k: v for k, v in collate(rows).items() if k != "latent_embeds"}

    rows = ctx.rows[: spec.train_rows]
    tokens = int(collate(rows)["attention_mask"].sum()) / len(rows)
    dataset = Dataset.from_list(rows)  # images and targets stored as `gap targets` stores them, decoded per step
    meters = {"gap": StepMeter(device), "stock": StepMeter(device)}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {
            "gap": gap_trainer(ctx.gap, ctx.processor, dataset,
                               GapSFTConfig(**trainer_arguments(tmp + "/gap", spec, ctx)), [meters["gap"]]),
            "stock": SFTTrainer(ctx.stock, args=SFTConfig(**trainer_arguments(
                tmp + "/stock", spec, ctx, dataset_kwargs={"skip_prepare_dataset": True})),
                data_collator=stock_collator, train_dataset=dataset, processing_class=ctx.processor,
                callbacks=[meters["stock"]]),
        }
        logs = {}
        for _ in range(spec.train_rounds):
            for name, trainer in trainers.items():
                meter = meters[name]
                first = len(meter.seconds)
                trainer.train()
                del meter.seconds[first], meter.peak_mb[first]  # each call's first step: warm-up, optimizer state
                logs[name] = [e for e in trainer.state.log_history if "loss" in e]
        for trainer in trainers.values():
            trainer.accelerator.free_memory()
        del trainers
    ctx.gap.eval()
    ctx.stock.eval()
    head = ctx.gap.latent_head
    head_fp32 = all(t.dtype == torch.float32 for t in [*head.parameters(), *head.buffers()])
    finite = all(math.isfinite(e[key]) for e in logs["gap"] for key in ("loss", "lm_loss", "latent_loss"))
    rows_per_s = {name: spec.train_rows / statistics.median(m.seconds) for name, m in meters.items()}
    peak = {name: max(m.peak_mb) for name, m in meters.items()}
    ratio = rows_per_s["gap"] / rows_per_s["stock"]
    out = [{"metric": "GapSFTTrainer / SFTTrainer rows/s (same model and rows)", "value": ratio, "goal": ">= 0.95",
            "met": ratio >= 0.95,
            "detail": f"{rows_per_s['gap']:.2f} vs {rows_per_s['stock']:.2f} rows/s, {spec.train_rows} rows of "
                      f"~{tokens:.0f} tokens, K={spec.latent_tokens_per_span}; step peak above start "
                      f"{peak['gap']:.0f} vs {peak['stock']:.0f} MB"},
           {"metric": "after training: loss terms finite, head and PCA buffers fp32", "value": float(finite and head_fp32),
            "goal": "1", "met": finite and head_fp32,
            "detail": f"last GAP log: loss {logs['gap'][-1]['loss']:.4g}, lm {logs['gap'][-1]['lm_loss']:.4g}, "
                      f"latent {logs['gap'][-1]['latent_loss']:.4g}"}]
    raw = {"rows_per_step": spec.train_rows, "tokens_per_row": tokens, "rows_per_s": rows_per_s,
           "step_s": {k: spread(m.seconds) for k, m in meters.items()},
           "step_peak_mb_above_start": peak, "log_history": logs, "head_fp32": head_fp32, "loss_finite": finite}
    if device == "cuda":
        raw["max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out, raw


# ----------------------------------------------------------------------------------------------------------- 4 zero3


def part_zero3(ctx: Namespace) -> tuple[list, dict]:
    """Runs `zero3_worker` in a fresh single-process torchrun, then reloads its output with remote code here."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    with tempfile.TemporaryDirectory() as work:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                   str(Path(__file__).resolve()), "--zero3-worker", work, "--device", ctx.device,
                   "--dtype", str(ctx.dtype).removeprefix("torch."), "--attn", ctx.attentions[0]]
        command += ["--tiny"] if ctx.spec.name == "tiny" else []
        started = time.perf_counter()
        run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        worker_s = time.perf_counter() - started
        if run.returncode != 0:
            raise RuntimeError(f"the ZeRO-3 worker failed (exit {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}")
        report = json.loads(Path(work, "report.json").read_text())
        gathered = load_file(str(Path(work, "gathered.safetensors")))
        model = AutoModelForImageTextToText.from_pretrained(Path(work, "out"), trust_remote_code=True)
        state = model.state_dict()
        mismatched = sorted(name for name, value in gathered.items()
                            if name not in state or not torch.equal(state[name].float(), value.float()))
        remote = type(model).__module__.startswith("transformers_modules.")
        head_fp32 = all(p.dtype == torch.float32 for p in model.latent_head.parameters())
    partitioned = report["partitioned_parameters"] == report["parameters"]
    ok = not mismatched and remote and head_fp32 and partitioned and report["loss_finite"] and report["steps"] == 3
    row = {"metric": "ZeRO-3, 1 process: 3 steps, save, remote-code reload equals gathered", "value": float(ok),
           "goal": "1", "met": ok,
           "detail": f"{report['partitioned_parameters']} of {report['parameters']} parameters partitioned; "
                     f"{len(mismatched)} of {len(gathered)} differ; remote code: {remote}; head fp32: {head_fp32}; "
                     f"losses {[round(x, 4) for x in report['losses']]}; worker {worker_s:.0f} s"}
    return [row], {**report, "mismatched": mismatched[:20], "remote_code": remote, "reloaded_head_fp32": head_fp32,
                   "worker_s": worker_s}


def zero3_worker(work: str, spec: Spec, device: str, dtype: torch.dtype, attn: str) -> None:
    """Under torchrun: build a small model of `spec`'s width, save it, load it back under ZeRO-3 (`zero.Init`
    partitions it while loading, as `train_sft.py` does), train 3 steps, save, gather every weight."""
    import deepspeed
    from datasets import Dataset
    from deepspeed.utils import safe_get_full_fp32_param
    from gap_pipeline.trainer import GapSFTConfig
    from modeling_gap import GapForConditionalGeneration
    from safetensors.torch import save_file

    depth = spec.zero3_vision_depth
    small = replace(spec, text={**spec.text, "num_hidden_layers": spec.zero3_layers},
                    vision={**spec.vision, "depth": depth, "fullatt_block_indexes": [depth - 1]},
                    train_steps=2)  # + the first step = 3 steps
    gap, _, processor = build(small, device, dtype, attn)
    rows = training_rows(small, gap, processor, small.train_rows)
    init = Path(work, "init")
    gap.save_pretrained(init)
    processor.save_pretrained(init)
    del gap
    ds_config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every tensor
    ctx = Namespace(device=device, dtype=dtype)
    if device == "cpu":  # DeepSpeed's process group before `zero.Init` (gloo on CPUs, as train_sft.py does)
        deepspeed.init_distributed(dist_backend="gloo")
    # The DeepSpeed config is live while `args` exists: from_pretrained partitions the model under zero.Init.
    args = GapSFTConfig(**trainer_arguments(str(Path(work, "out")), small, ctx, deepspeed=ds_config))
    model = GapForConditionalGeneration.from_pretrained(init, dtype=dtype)
    trainer = gap_trainer(model, processor, Dataset.from_list(rows), args)
    trainer.train()
    trainer.save_model(str(Path(work, "out")))
    state = {}
    for name, parameter in trainer.model.named_parameters():
        if name.startswith("latent_head.") and parameter.dtype != torch.float32:
            value = safe_get_full_fp32_param(parameter).reshape(parameter.ds_shape)
        else:
            with deepspeed.zero.GatheredParameters([parameter]):
                value = parameter.detach().clone()
        state[name] = value.cpu().contiguous()
    save_file(state, str(Path(work, "gathered.safetensors")))
    logs = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
    partitioned = sum(hasattr(p, "ds_id") for p in trainer.model.parameters())
    report = {"steps": trainer.state.global_step, "losses": [e["loss"] for e in logs],
              "loss_finite": all(math.isfinite(e[k]) for e in logs for k in ("loss", "lm_loss", "latent_loss")),
              "partitioned_parameters": partitioned, "parameters": len(state),
              "decoder_layers": small.zero3_layers, "vision_blocks": depth}
    Path(work, "report.json").write_text(json.dumps(report))
    trainer.accelerator.free_memory()


# ------------------------------------------------------------------------------------------------------------ driver


def attention_implementations(device: str) -> list[str]:
    from transformers.utils import is_flash_attn_2_available

    return ["sdpa"] + (["flash_attention_2"] if device == "cuda" and is_flash_attn_2_available() else [])


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the ZeRO-3 worker)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def device_slug(device: str) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_json(path: Path, payload: dict) -> None:
    """Write atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def markdown(rows: list[dict]) -> str:
    lines = ["| check | value | goal | met | detail |", "|---|---:|---|---|---|"]
    for row in rows:
        met = "–" if row["met"] is None else "yes" if row["met"] else "**no**"
        lines.append(f"| {row['metric']} | {row['value']:.4g} | {row['goal']} | {met} | {row['detail']} |")
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny config on the CPU: every code path in seconds")
    parser.add_argument("--device", default=None, help="default: cuda (required unless --tiny), cpu with --tiny")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (Qwen2.5-VL-7B has 28)")
    parser.add_argument("--vision-depth", type=int, default=8, help="vision blocks (Qwen2.5-VL-7B has 32)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--output", type=Path, default=None,
                        help="results JSON (default bench/results/gpu_<device>.json, gpu_tiny-cpu.json with --tiny)")
    parser.add_argument("--attn", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--zero3-worker", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    device = args.device or ("cpu" if args.tiny else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_check.py: no CUDA GPU is visible to torch; run it on a GPU machine, or pass "
                         "--tiny to check the code paths on the CPU.")
    dtype = getattr(torch, args.dtype)
    spec = tiny() if args.tiny else qwen2_5_vl_7b(args.layers, args.vision_depth)
    if args.tiny:  # its matrices are too small to split across threads: more threads only wait on each other
        torch.set_num_threads(1)
    if args.zero3_worker:
        zero3_worker(args.zero3_worker, spec, device, dtype, args.attn)
        return 0

    started = time.perf_counter()
    attentions = attention_implementations(device)
    build_s, (gap, stock, processor) = timed(lambda: build(spec, device, dtype, attentions[0]), device)
    rows_s, rows = timed(lambda: training_rows(spec, gap, processor, spec.train_rows), device)
    ctx = Namespace(spec=spec, device=device, dtype=dtype, attentions=attentions, gap=gap, stock=stock,
                    processor=processor, rows=rows)
    results = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
               "model": {"spec": asdict(spec), "dtype": args.dtype, "attention": attentions,
                         "decoder_layers": gap.config.text_config.num_hidden_layers,
                         "vision_blocks": gap.config.vision_config.depth,
                         "parameters": parameter_count(gap), "build_s": build_s, "rows_s": rows_s},
               "parts": {}, "errors": {}}
    table = []
    parts = {"numerics": part_numerics, "generation": part_generation, "train": part_train, "zero3": part_zero3}
    for name in PARTS:
        if name not in args.parts:
            continue
        if name == "zero3":  # the worker needs the memory
            del ctx.gap, ctx.stock, gap, stock
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        print(f"[gpu-check] {name} ...", flush=True)
        part_started, cpu_started = time.perf_counter(), cpu_seconds()
        try:
            new_rows, raw = parts[name](ctx)
        except Exception as error:  # record it, run the other parts, exit 1 at the end
            results["errors"][name] = "".join(traceback.format_exception(error))
            print(results["errors"][name], file=sys.stderr, flush=True)
            continue
        table.extend(new_rows)
        results["parts"][name] = {"rows": new_rows, "raw": raw, "wall_s": time.perf_counter() - part_started,
                                  "cpu_s": cpu_seconds() - cpu_started}
        for row in new_rows:
            print(f"  {row['metric']}: {row['value']:.4g} ({row['detail']})", flush=True)
    results["rows"] = table
    results["wall_s"] = time.perf_counter() - started
    results["cpu_s"] = cpu_seconds()
    output = args.output or RESULTS / f"gpu_{'tiny-cpu' if args.tiny else device_slug(device)}.json"
    write_json(output, results)
    layers = f"{results['model']['decoder_layers']} decoder layers, {results['model']['vision_blocks']} vision blocks"
    print_table(f"GPU check — {spec.name}, {layers}, {args.dtype}, {device} "
                f"({machine().get('gpu', 'no GPU')}), {results['wall_s']:.0f} s", table)
    print("\n" + markdown(table))
    print(f"\nwrote {output}" + (f"; FAILED parts: {', '.join(results['errors'])}" if results["errors"] else ""))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
