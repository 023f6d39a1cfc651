"""Latent decoding benchmarks (issue: benchmarks), each ratio measured side by side in one run.

1. latent step vs text step within the same generation           goal <= 1.05
2. a K=36 span, KV-cached vs a loop that re-encodes the whole
   prefix every step (COCONUT-style), at prompt lengths 256..4096: the span's steps alone (O(1) cached steps
   against O(n) re-encodings, so the ratio grows linearly with n; the slope of a linear fit is reported) and the
   whole call with its prefill
3. throughput at batch 8 vs batch 1, rows opening spans at
   different steps                                                 goal >= 4x
4. `suppress` vs stock Qwen2.5-VL `generate` on the same weights   goal >= 0.95x

    python bench/decode.py                 # CPU default size (hidden 512, 8 layers)
    python bench/decode.py --parts cache --cache-lengths 256 512 1024
    python bench/decode.py --size 7b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from common import SIZES, build_models, print_table, spread, sync, timed, write_results
from transformers import LogitsProcessor, StoppingCriteria


class OpenSpanEvery(LogitsProcessor):
    """Opens a latent span once a row has written `period` free tokens (offset per row), so spans start at
    different steps in different rows; vectorised like the model's own span processor."""

    def __init__(self, start_id, end_id, period, offsets, prompt_length):
        self.start_id, self.end_id, self.period = start_id, end_id, period
        self.offsets = offsets
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.prompt_length:]
        if generated.shape[1] == 0:
            due = self.offsets.to(input_ids.device) == 0
        else:
            marks = (generated == self.end_id) | (generated == self.start_id)
            positions = torch.arange(generated.shape[1], device=input_ids.device)
            last_mark = torch.where(marks, positions, -1).amax(dim=1)
            since = generated.shape[1] - 1 - last_mark
            due = since >= self.period + self.offsets.to(input_ids.device)
        boost = torch.zeros_like(scores)
        boost[:, self.start_id] = torch.where(due, 1e4, 0.0).to(scores.dtype)
        return scores + boost


class StepClock(StoppingCriteria):
    """Time between consecutive calls = one full generation step; classified by the token that step read."""

    def __init__(self, pad_id, device, clock=time.perf_counter):
        self.pad_id, self.device, self.clock = pad_id, device, clock
        self.last = None
        self.latent, self.text = [], []

    def __call__(self, input_ids, scores, **kwargs):
        sync(self.device)
        now = self.clock()
        if self.last is not None:  # the first call closes the prefill step: not counted
            read = input_ids[0, -2].item()
            (self.latent if read == self.pad_id else self.text).append(now - self.last)
        self.last = now
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def random_prompts(batch, lengths, vocab_limit, seed=0):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(batch, width, dtype=torch.long)
    attention_mask = torch.zeros(batch, width, dtype=torch.long)
    for row, length in enumerate(lengths):  # left padding
        input_ids[row, width - length:] = torch.randint(10, vocab_limit, (length,), generator=generator)
        attention_mask[row, width - length:] = 1
    return input_ids, attention_mask


def bench_step_ratio(gap, args):
    start, pad, end = gap.config.latent_token_ids
    input_ids, mask = random_prompts(1, [128], start - 20)
    input_ids, mask = input_ids.to(args.device), mask.to(args.device)
    clock = StepClock(pad, args.device)
    for repeat in range(args.repeats + 1):
        clock.last = None
        if repeat == 0:  # warm-up
            latent_keep, text_keep = len(clock.latent), len(clock.text)
        opener = OpenSpanEvery(start, end, 12, torch.zeros(1, dtype=torch.long), input_ids.shape[1])
        gap.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=args.steps, logits_processor=[opener],
                     stopping_criteria=[clock])
        if repeat == 0:
            del clock.latent[latent_keep:], clock.text[text_keep:]
    ratio = statistics.median(clock.latent) / statistics.median(clock.text)
    return {"metric": "latent step / text step (same generation)", "value": ratio, "goal": "<= 1.05",
            "met": ratio <= 1.05,
            "detail": f"median {statistics.median(clock.latent) * 1e3:.2f} vs {statistics.median(clock.text) * 1e3:.2f} ms "
                      f"over {len(clock.latent)} latent / {len(clock.text)} text steps"}, {
        "latent_step_s": spread(clock.latent), "text_step_s": spread(clock.text)}


@torch.no_grad()
def recompute_span(gap, input_ids, mask, K, device="cpu", clock=time.perf_counter):
    """COCONUT-style: every step re-encodes the whole prefix (no cache) and feeds all latents so far.

    Returns (sequence, seconds after the first forward): the first forward reads the prompt alone, as the prefill of
    a cached decoder does once; the K + 1 forwards after it are the span's steps.
    """
    start, pad, end = gap.config.latent_token_ids
    latents = []
    sequence, attention = input_ids, mask
    after_prefill = None
    for token in [start] + [pad] * K + [end]:
        out = gap(input_ids=sequence, attention_mask=attention,
                  latent_embeds=torch.stack(latents) if latents else None, use_cache=False, logits_to_keep=1)
        if sequence[0, -1].item() in (start, pad) and len(latents) < K:
            latents.append(out.next_latent[0].to(gap.dtype))
        new = torch.full((sequence.shape[0], 1), token, dtype=sequence.dtype, device=sequence.device)
        sequence = torch.cat([sequence, new], dim=1)
        attention = torch.cat([attention, torch.ones_like(new)], dim=1)
        if after_prefill is None:
            sync(device)
            after_prefill = clock()
    sync(device)
    return sequence, clock() - after_prefill


def cached_span(gap, input_ids, mask, K, device="cpu", clock=time.perf_counter):
    """`generate` opening a span at once: (sequence, seconds after the prefill), the K + 1 cached span steps."""
    start, pad, end = gap.config.latent_token_ids
    opener = OpenSpanEvery(start, end, 10**6, torch.zeros(input_ids.shape[0], dtype=torch.long), input_ids.shape[1])
    steps = StepClock(pad, device, clock)
    sequence = gap.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=K + 2, logits_processor=[opener],
                            stopping_criteria=[steps])
    return sequence, sum(steps.latent) + sum(steps.text)


def cache_vs_recompute(gap, prompt_length, repeats, device="cpu", seed=1, clock=time.perf_counter, warmup=True):
    """A K-latent span after a `prompt_length`-token prompt, KV-cached vs recomputed, interleaved `repeats` times
    (after one untimed warm-up of each unless `warmup=False`). Ratios: the span's steps alone (the prefix already
    encoded: O(1) cached steps against O(n) re-encodings, so the ratio grows linearly with n) and the whole call
    with its prefill. `clock`: `time.perf_counter` (wall) or `time.process_time` (CPU time, CPU only)."""
    start, _, _ = gap.config.latent_token_ids
    K = gap.config.latent_tokens_per_span
    input_ids, mask = random_prompts(1, [prompt_length], start - 20, seed=seed)
    input_ids, mask = input_ids.to(device), mask.to(device)
    times = {"cached_s": [], "cached_steps_s": [], "recompute_s": [], "recompute_steps_s": []}
    for repeat in range(0 if warmup else 1, repeats + 1):
        t_cache, (out, cached_steps) = timed(lambda: cached_span(gap, input_ids, mask, K, device, clock), device, clock)
        t_loop, (seq, recompute_steps) = timed(lambda: recompute_span(gap, input_ids, mask, K, device, clock), device,
                                               clock)
        if repeat:
            for key, value in zip(times, (t_cache, cached_steps, t_loop, recompute_steps)):
                times[key].append(value)
    # Every span token is forced (start by the opener, pads and end by the span processor), in any precision.
    assert torch.equal(out[0, prompt_length:], seq[0, prompt_length:]), "both paths must produce the same span"
    median = {key: statistics.median(value) for key, value in times.items()}
    return {"prompt_length": prompt_length, "latent_tokens_per_span": K,
            "steps_ratio": median["recompute_steps_s"] / median["cached_steps_s"],
            "call_ratio": median["recompute_s"] / median["cached_s"],
            **{key: spread(value) for key, value in times.items()}}


def linear_fit(xs, ys):
    """(slope, intercept, R^2) of a least-squares line."""
    slope, intercept = np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), 1)
    residual = np.asarray(ys) - (slope * np.asarray(xs) + intercept)
    total = np.asarray(ys) - np.mean(ys)
    return float(slope), float(intercept), float(1.0 - (residual @ residual) / max(total @ total, 1e-300))


def bench_cache_vs_recompute(gap, args):
    """The cached/recompute ratio against prompt length: one row per length and the slope of a linear fit."""
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    # one warm-up, before the first length: the later ones run on warm kernels and allocator
    runs = [cache_vs_recompute(gap, n, args.cache_repeats, args.device, clock=clock, warmup=i == 0)
            for i, n in enumerate(args.cache_lengths)]
    rows = []
    for run in runs:
        K, n = run["latent_tokens_per_span"], run["prompt_length"]
        rows.append({"metric": f"K={K} span after {n} tokens: recompute / KV cache (span steps)", "value": run["steps_ratio"],
                     "goal": "-", "met": None,
                     "detail": f"{run['recompute_steps_s']['median']:.2f} s vs {run['cached_steps_s']['median']:.3f} s; "
                               f"with the prefill {run['call_ratio']:.1f}x ({run['recompute_s']['median']:.2f} s vs "
                               f"{run['cached_s']['median']:.2f} s)"})
    lengths = [run["prompt_length"] for run in runs]
    slope, intercept, r2 = linear_fit(lengths, [run["steps_ratio"] for run in runs])
    rows.append({"metric": f"span-steps ratio growth per 1k prompt tokens ({lengths[0]}-{lengths[-1]})",
                 "value": slope * 1000, "goal": "linear", "met": len(runs) >= 3 and r2 >= 0.95,
                 "detail": f"ratio = {intercept:.2f} + {slope * 1000:.2f} x n/1000, R^2 = {r2:.3f}"})
    return rows, {"runs": runs, "fit": {"slope_per_token": slope, "intercept": intercept, "r2": r2}}


def bench_batching(gap, args):
    start, pad, end = gap.config.latent_token_ids
    lengths = [64, 96, 80, 120, 72, 100, 88, 110]
    input_ids, mask = random_prompts(8, lengths, start - 20, seed=2)
    input_ids, mask = input_ids.to(args.device), mask.to(args.device)
    offsets = torch.arange(8) * 3  # rows open spans at different steps
    new_tokens = args.steps

    def batch_run():
        opener = OpenSpanEvery(start, end, 8, offsets, input_ids.shape[1])
        return gap.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens, logits_processor=[opener])

    def single_runs():
        for row in range(8):
            keep = mask[row].bool()
            ids = input_ids[row:row + 1, keep]
            opener = OpenSpanEvery(start, end, 8, offsets[row:row + 1], ids.shape[1])
            gap.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         logits_processor=[opener])

    batched, single = [], []
    for repeat in range(args.repeats + 1):
        t_batch, out = timed(batch_run, args.device)
        t_single, _ = timed(single_runs, args.device)
        if repeat:
            batched.append(t_batch)
            single.append(t_single)
    spans = (out[:, input_ids.shape[1]:] == start).sum(1).tolist()
    ratio = statistics.median(single) / statistics.median(batched)
    return {"metric": "throughput batch 8 / batch 1 (spans at different steps)", "value": ratio, "goal": ">= 4",
            "met": ratio >= 4,
            "detail": f"8 rows in {statistics.median(batched):.2f} s vs {statistics.median(single):.2f} s one by one; "
                      f"spans per row {spans}"}, {"batch8_s": spread(batched), "eight_batch1_s": spread(single)}


def bench_suppress_vs_stock(gap, stock, args):
    start, _, _ = gap.config.latent_token_ids
    input_ids, mask = random_prompts(4, [100, 80, 120, 90], start - 20, seed=3)
    input_ids, mask = input_ids.to(args.device), mask.to(args.device)
    gap_times, stock_times = [], []
    for repeat in range(args.repeats + 1):
        t_gap, a = timed(lambda: gap.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=args.steps,
                                              latent_intervention="suppress"), args.device)
        t_stock, b = timed(lambda: stock.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=args.steps),
                           args.device)
        if repeat:
            gap_times.append(t_gap)
            stock_times.append(t_stock)
    ratio = statistics.median(stock_times) / statistics.median(gap_times)
    return {"metric": "suppress throughput / stock Qwen2.5-VL generate", "value": ratio, "goal": ">= 0.95",
            "met": ratio >= 0.95,
            "detail": f"{statistics.median(gap_times):.2f} s vs {statistics.median(stock_times):.2f} s, "
                      f"same tokens: {bool((a == b).all()) if a.shape == b.shape else False}"}, {
        "suppress_s": spread(gap_times), "stock_s": spread(stock_times)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=96, help="new tokens per generation (parts 1, 3, 4)")
    parser.add_argument("--cache-lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096],
                        help="prompt lengths of part 2")
    parser.add_argument("--cache-repeats", type=int, default=1,
                        help="timed repeats of part 2 per length (its long prompts are slow; 5 lengths make the fit)")
    parser.add_argument("--parts", nargs="+", choices=["step", "cache", "batch", "suppress"],
                        default=["step", "cache", "batch", "suppress"])
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="part 2's clock: wall time, or this process's CPU time (CPU device; with --threads 1 it "
                             "is steady on a shared machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gap, stock = build_models(args.size, dtype=getattr(torch, args.dtype), device=args.device)
    benches = {"step": lambda: bench_step_ratio(gap, args), "cache": lambda: bench_cache_vs_recompute(gap, args),
               "batch": lambda: bench_batching(gap, args), "suppress": lambda: bench_suppress_vs_stock(gap, stock, args)}
    rows, raw = [], {}
    for name in args.parts:
        new_rows, detail = benches[name]()
        new_rows = new_rows if isinstance(new_rows, list) else [new_rows]
        rows.extend(new_rows)
        raw[name] = detail
        for row in new_rows:
            print(f"  {row['metric']}: {row['value']:.3f} ({row['detail']})", flush=True)
    print_table(f"decode benchmarks — size {args.size}, {args.device}, {args.dtype}, median of {args.repeats} "
                f"(part 2: {args.cache_repeats})", rows)
    name = f"decode_{args.size}_{args.device}" + ("" if len(args.parts) == len(benches) else "_" + "_".join(args.parts))
    path = write_results(name, {"args": vars(args), "rows": rows, "raw": raw})
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
