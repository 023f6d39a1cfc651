"""Training-step benchmark: a GapSFTTrainer step vs a plain TRL SFTTrainer step on the same batch and weights.

Both trainers run `training_step` (forward + backward) and an AdamW step on the same rows: the GAP side with its
latent spans fed their targets and the latent loss, the plain side as stock Qwen2.5-VL on the same token ids
(the pads are ordinary tokens to it). Time is the median over interleaved repeats; peak memory is each side's
peak resident memory above its resident size between steps (activations, gradients, temporaries), measured in a
fresh process per side. Goal: <= 1.05x time.

    python bench/train_step.py                   # hidden 512, 8 layers, 16 demo rows (K = 4)
    python bench/train_step.py --size 7b --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import REPO, SIZES, current_rss_mb, peak_rss_mb, print_table, reset_peak_rss, spread, sync, write_results


def build(size: str, rows: int, seed: int = 0):
    """(gap_model, stock_model, gap_processor, batch rows) on the tiny tokenizer, model dims from SIZES[size]."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from gap_pipeline.demo_task import LATENT_TOKENS, generate_split
    from gap_pipeline.tiny import build_tiny_processor, build_tiny_tokenizer, synthetic_pca, tiny_qwen2_5_vl_config
    from modeling_gap import GapForConditionalGeneration
    from processing_gap import GapProcessor

    s = SIZES[size]
    tokenizer = build_tiny_tokenizer()
    base_processor = build_tiny_processor(tokenizer)
    head_dim = s["hidden_size"] // s["num_attention_heads"]
    half = head_dim // 2
    mrope = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    config = tiny_qwen2_5_vl_config(
        tokenizer=tokenizer,
        text_config=dict(hidden_size=s["hidden_size"], num_hidden_layers=s["num_hidden_layers"],
                         num_attention_heads=s["num_attention_heads"], num_key_value_heads=s["num_key_value_heads"],
                         intermediate_size=s["intermediate_size"],
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=mrope)),
        vision_config=dict(depth=s["vision_depth"], hidden_size=s["vision_hidden"], num_heads=max(2, s["vision_hidden"] // 64),
                           intermediate_size=2 * s["vision_hidden"], out_hidden_size=s["hidden_size"]),
    )
    torch.manual_seed(seed)
    base = Qwen2_5_VLForConditionalGeneration(config)
    gap, tokenizer = GapForConditionalGeneration.from_qwen2_5_vl(
        base, tokenizer, synthetic_pca(s["hidden_size"], min(s["k"], s["hidden_size"])), latent_tokens_per_span=LATENT_TOKENS,
        latent_adapter_size=256)
    stock = Qwen2_5_VLForConditionalGeneration(gap.config.__class__.__bases__[0](**{
        k: v for k, v in gap.config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}))
    missing, unexpected = stock.load_state_dict(gap.state_dict(), strict=False)
    assert not missing and all(key.startswith("latent_head.") for key in unexpected)
    processor = GapProcessor.from_qwen2_5_vl_processor(base_processor, tokenizer, LATENT_TOKENS)
    from gap_pipeline.data import load_jsonl
    from gap_pipeline.targets import compute_latent_targets

    path = generate_split(Path(tempfile.mkdtemp(prefix="gap-bench-")), "train", rows, seed)  # images stay on disk
    dataset, _ = compute_latent_targets(load_jsonl(path), gap, processor.image_processor, latent_tokens_per_span=LATENT_TOKENS,
                                        progress=False)
    return gap, stock, processor, [dict(dataset[i]) for i in range(len(dataset))]


def trainers(gap, stock, processor, output_dir):
    from trl import SFTConfig, SFTTrainer

    from gap_pipeline.trainer import GapSFTConfig, GapSFTTrainer

    common = dict(output_dir=output_dir, per_device_train_batch_size=16, learning_rate=1e-4, report_to="none",
                  use_cpu=not torch.cuda.is_available(), remove_unused_columns=False, max_length=None,
                  dataloader_num_workers=0, logging_steps=10**6, save_strategy="no")
    from datasets import Dataset

    dummy = Dataset.from_list([{"messages": [{"role": "user", "content": "x"}]}])
    gap_trainer = GapSFTTrainer(model=gap, args=GapSFTConfig(**common), train_dataset=dummy, processing_class=processor)
    stock_trainer = SFTTrainer(model=stock, args=SFTConfig(**common, dataset_kwargs={"skip_prepare_dataset": True}),
                               train_dataset=dummy, processing_class=processor)
    for trainer in (gap_trainer, stock_trainer):
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which we bypass
    return gap_trainer, stock_trainer


def step(trainer, batch):
    """One optimisation step the way the Trainer's loop does it: get_batch_samples (which counts the batch's
    supervised tokens, and for GAP its latent positions), training_step, then the optimizer."""
    trainer.model.train()
    (batch,), num_items = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
    loss = trainer.training_step(trainer.model, dict(batch), num_items)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return loss


def batches(processor, rows):
    from gap_pipeline.collator import GapDataCollator

    gap_batch = GapDataCollator(processor)(rows)
    stock_batch = {k: v for k, v in gap_batch.items() if k != "latent_embeds"}
    return gap_batch, stock_batch


def worker(side: str, size: str, rows: int, steps: int) -> dict:
    gap, stock, processor, data = build(size, rows)
    with tempfile.TemporaryDirectory() as tmp:
        gap_trainer, stock_trainer = trainers(gap, stock, processor, tmp)
        gap_batch, stock_batch = batches(processor, data)
        trainer, batch = (gap_trainer, gap_batch) if side == "gap" else (stock_trainer, stock_batch)
        step(trainer, batch)  # optimizer state exists after the first step
        import gc

        gc.collect()
        resident = current_rss_mb()
        reset_peak_rss()
        for _ in range(steps):
            step(trainer, batch)
        return {"peak_mb": peak_rss_mb() - resident}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--worker", choices=["gap", "stock"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.size, args.rows, 3)))
        return None

    gap, stock, processor, data = build(args.size, args.rows)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        gap_trainer, stock_trainer = trainers(gap, stock, processor, tmp)
        gap_batch, stock_batch = batches(processor, data)
        times = {"gap": [], "stock": []}
        for repeat in range(args.repeats + 1):
            for side, trainer, batch in (("gap", gap_trainer, gap_batch), ("stock", stock_trainer, stock_batch)):
                sync(device)
                start = time.perf_counter()
                step(trainer, batch)
                sync(device)
                if repeat:
                    times[side].append(time.perf_counter() - start)
    memory = {}
    for side in ("gap", "stock"):
        out = subprocess.run([sys.executable, __file__, "--worker", side, "--size", args.size, "--rows", str(args.rows)],
                             capture_output=True, text=True, cwd=REPO, check=True)
        memory[side] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    ratio = statistics.median(times["gap"]) / statistics.median(times["stock"])
    tokens = int(gap_batch["attention_mask"].sum())
    rows = [{"metric": "GapSFTTrainer step / SFTTrainer step (same batch)", "value": ratio, "goal": "<= 1.05",
             "met": ratio <= 1.05,
             "detail": f"{statistics.median(times['gap']) * 1e3:.0f} vs {statistics.median(times['stock']) * 1e3:.0f} ms, "
                       f"{args.rows} rows / {tokens} tokens; peak RSS growth {memory['gap']:.0f} vs {memory['stock']:.0f} MB"}]
    print_table(f"train step — size {args.size}, {device}, median of {args.repeats}", rows)
    path = write_results(f"train_step_{args.size}_{device}", {"args": vars(args), "rows": rows,
                                                              "raw": {k: spread(v) for k, v in times.items()},
                                                              "peak_mb": memory})
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
