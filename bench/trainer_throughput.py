"""Trainer throughput: `GapSFTTrainer.train()` rows/s over a bare forward + backward + AdamW loop.

The demo's setting: the tiny GAP model (d = 64, K = 4), demo-task rows with their latent targets, and the training
arguments of `configs/tiny_cpu.yaml` (fp32 on the CPU, no activation checkpointing, the dataloader without worker
processes) with the demo's batch 32 and learning rate. Both sides train for the same
number of steps (`--epochs` passes over `--rows` rows) on their own copy of the same weights:

* trainer: `GapSFTTrainer(...).train()` over the targets dataset with `GapDataCollator` (reading, collating,
  the GAP loss and its metrics, clipping, the scheduler, logging every 5 steps as the demo does), timed from the
  end of the first step to the end of the last (a callback), so the one-off setup of `train()` is not counted.
  With its defaults, i.e. the image feature cache on (`image_feature_cache_mb`): the first epoch processes every
  image and runs the frozen tower on it, later epochs take the same features from the cache; also measured with
  the cache off (`image_feature_cache_mb=0`), every step processing and encoding its images;
* bare: the model's forward (with the labels and the latent targets) + backward + `torch.optim.AdamW` over the
  same rows collated once beforehand.

Rows repeat every epoch, as in training; the demo runs 6 epochs, the default here. The sides alternate
(interleaved repeats, median); the ratio is trainer rows/s / bare rows/s. Goal: >= 0.9. Also reported: the
collator's time per batch of 32 rows in a plain loop, on first sight of the rows and on their second epoch.

    python bench/trainer_throughput.py
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import REPO, print_table, spread, write_results
from transformers import TrainerCallback

K = 4  # the demo's latent tokens per span


def build(rows: int, seed: int = 0):
    """(gap model, GapProcessor, targets dataset): the tiny GAP model and `rows` demo-task rows with targets."""
    from gap_pipeline.data import load_jsonl
    from gap_pipeline.demo_task import generate_split
    from gap_pipeline.targets import compute_latent_targets
    from gap_pipeline.tiny import build_tiny_gap_model

    model, processor = build_tiny_gap_model(seed=seed, latent_tokens_per_span=K, pca_num_components=16)
    path = generate_split(Path(tempfile.mkdtemp(prefix="gap-bench-")), "train", rows, seed)  # images stay on disk
    dataset, _ = compute_latent_targets(load_jsonl(path), model, processor.image_processor, latent_tokens_per_span=K,
                                        progress=False)
    return model, processor, dataset


def demo_training_arguments(batch_size: int, epochs: int) -> dict:
    """`configs/tiny_cpu.yaml`'s training arguments with the demo's overrides (`gap demo`: batch 32, lr 5e-3)."""
    import yaml

    from gap_pipeline.trainer import GapSFTConfig

    config = yaml.safe_load((REPO / "configs" / "tiny_cpu.yaml").read_text(encoding="utf-8"))
    fields = {field.name for field in dataclasses.fields(GapSFTConfig)}
    return {**{key: value for key, value in config.items() if key in fields}, "per_device_train_batch_size": batch_size,
            "num_train_epochs": epochs, "learning_rate": 5e-3, "latent_head_learning_rate": 5e-3, "disable_tqdm": True}


class StepClock(TrainerCallback):
    """The wall time at the end of every optimisation step."""

    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def run_trainer(model, processor, dataset, batch_size: int, epochs: int, output_dir: str,
                **overrides) -> tuple[float, int]:
    """(seconds, steps) of one `GapSFTTrainer.train()` from the end of its first step to the end of its last (all
    that happens between steps counts: reading and collating the next batch, logging, a new epoch's iterator);
    `overrides` are GapSFTConfig fields. A new trainer and collator each time: their caches start empty."""
    from gap_pipeline.collator import GapDataCollator
    from gap_pipeline.trainer import GapSFTConfig, GapSFTTrainer

    args = GapSFTConfig(output_dir=output_dir, **demo_training_arguments(batch_size, epochs), **overrides)
    clock = StepClock()
    trainer = GapSFTTrainer(model, args=args, data_collator=GapDataCollator(processor), train_dataset=dataset,
                            processing_class=processor, callbacks=[clock])
    trainer.train()
    return clock.ends[-1] - clock.ends[0], len(clock.ends) - 1


def run_bare(model, batches: list[dict], epochs: int) -> tuple[float, int]:
    """(seconds, steps) of forward + backward + AdamW over `batches`, `epochs` times, from the end of the first
    step to the end of the last, like the trainer's."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.0)
    ends = []
    for _ in range(epochs):
        for batch in batches:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ends.append(time.perf_counter())
    return ends[-1] - ends[0], len(ends) - 1


def collate_times(processor, rows: list[dict], batch_size: int) -> tuple[float, float]:
    """Median seconds per batch of a fresh collator over `rows`: the first epoch, then the second."""
    from gap_pipeline.collator import GapDataCollator

    collator = GapDataCollator(processor)
    epochs = []
    for _ in range(2):
        times = []
        for i in range(0, len(rows) - batch_size + 1, batch_size):
            start = time.perf_counter()
            collator(rows[i : i + batch_size])
            times.append(time.perf_counter() - start)
        epochs.append(statistics.median(times))
    return epochs[0], epochs[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=192, help="training rows (default 192: 6 batches of 32)")
    parser.add_argument("--epochs", type=int, default=6, help="passes over the rows (default 6, as the demo)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.rows % args.batch_size:
        parser.error("--rows must be a multiple of --batch-size (every step a full batch)")

    from gap_pipeline.collator import GapDataCollator

    model, processor, dataset = build(args.rows)
    trainer_model, bare_model = model, copy.deepcopy(model)
    bare_model.model.visual.requires_grad_(False)  # as GapSFTTrainer freezes it
    rows = [dict(dataset[i]) for i in range(len(dataset))]
    collator = GapDataCollator(processor)
    batches = [collator(rows[i : i + args.batch_size]) for i in range(0, len(rows), args.batch_size)]

    times = {"trainer": [], "trainer_no_cache": [], "bare": [], "collate_first": [], "collate_second": []}
    steps = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats + 1):  # the first round warms up (allocator, lazy imports)
            for side in ("trainer", "bare", "trainer_no_cache", "collate"):
                if side.startswith("trainer"):
                    overrides = {"image_feature_cache_mb": 0.0} if side == "trainer_no_cache" else {}
                    seconds, n = run_trainer(trainer_model, processor, dataset, args.batch_size, args.epochs, tmp,
                                             **overrides)
                elif side == "bare":
                    seconds, n = run_bare(bare_model, batches, args.epochs)
                else:
                    first, second = collate_times(processor, rows, args.batch_size)
                    if repeat:
                        times["collate_first"].append(first)
                        times["collate_second"].append(second)
                    continue
                steps[side] = n
                if repeat:
                    times[side].append(seconds)
    if len(set(steps.values())) != 1:
        raise RuntimeError(f"the sides ran different step counts: {steps}")
    step_ms = {side: statistics.median(times[side]) / steps[side] * 1e3 for side in steps}
    rows_per_s = {side: args.batch_size / step_ms[side] * 1e3 for side in step_ms}
    ratio = {side: rows_per_s[side] / rows_per_s["bare"] for side in ("trainer", "trainer_no_cache")}
    collate_ms = [statistics.median(times[key]) * 1e3 for key in ("collate_first", "collate_second")]
    table = [{"metric": "GapSFTTrainer.train() rows/s / bare fwd+bwd+AdamW rows/s", "value": ratio["trainer"],
              "goal": ">= 0.9", "met": ratio["trainer"] >= 0.9,
              "detail": f"{rows_per_s['trainer']:.0f} vs {rows_per_s['bare']:.0f} rows/s ({step_ms['trainer']:.0f} vs "
                        f"{step_ms['bare']:.0f} ms/step of {args.batch_size}, image feature cache on: the default); "
                        f"cache off: {ratio['trainer_no_cache']:.2f} ({step_ms['trainer_no_cache']:.0f} ms/step); "
                        f"a plain collator over {args.batch_size} rows: {collate_ms[0]:.0f} ms first epoch, "
                        f"{collate_ms[1]:.0f} ms after"}]
    breakdown = {"step_ms": step_ms, "rows_per_s": rows_per_s, "ratio": ratio,
                 "collate_ms": {"first_epoch": collate_ms[0], "after": collate_ms[1]}}
    print_table(f"trainer throughput — tiny model, K={K}, {args.rows} rows x {args.epochs} epochs, "
                f"median of {args.repeats}", table)
    path = write_results("trainer_throughput", {"args": vars(args), "rows": table, "breakdown": breakdown,
                                                "raw": {key: spread(value) for key, value in times.items()}})
    print(f"wrote {path}")
    return table


if __name__ == "__main__":
    main()
