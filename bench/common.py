"""Shared pieces of the benchmarks: model sizes, timing, result tables.

Every benchmark measures the two sides of a ratio in the same process, interleaved, on the same
weights, and reports the median of several repeats with the spread (min-max), so that a ratio
compares the code paths and not the machine's mood.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the flat Hub files live at the repository root
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results"

# "cpu": large enough that a decode step is dominated by matrix products, not Python (hidden 512, 8 layers,
# 8k vocabulary: ~30 M multiply-adds per token), small enough for `make bench` on 2 cores in minutes.
# "7b": Qwen2.5-VL-7B's text shapes, for a GPU.
SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1024, vision_hidden=32, vision_depth=1, k=16),
    "cpu": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=1408, vocab_size=8192, vision_hidden=128, vision_depth=2, k=64),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, vision_hidden=1280, vision_depth=32, k=629),
}


def build_models(size: str, latent_tokens_per_span: int = 36, dtype=torch.float32, device="cpu", seed=0):
    """(gap_model, stock_qwen_model) with identical backbone weights; the GAP head holds a random PCA basis."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from configuration_gap import GapConfig
    from gap_pipeline.tiny import synthetic_pca
    from modeling_gap import GapForConditionalGeneration

    s = SIZES[size]
    head_dim = s["hidden_size"] // s["num_attention_heads"]
    half = head_dim // 2
    mrope = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    vocab = s["vocab_size"]
    ids = dict(image_token_id=vocab - 8, video_token_id=vocab - 7, vision_start_token_id=vocab - 6,
               vision_end_token_id=vocab - 5)
    text = dict(hidden_size=s["hidden_size"], num_hidden_layers=s["num_hidden_layers"],
                num_attention_heads=s["num_attention_heads"], num_key_value_heads=s["num_key_value_heads"],
                intermediate_size=s["intermediate_size"], vocab_size=vocab, bos_token_id=0, eos_token_id=1,
                pad_token_id=0, rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=mrope))
    vision = dict(depth=s["vision_depth"], hidden_size=s["vision_hidden"], num_heads=max(2, s["vision_hidden"] // 64),
                  intermediate_size=2 * s["vision_hidden"], out_hidden_size=s["hidden_size"],
                  fullatt_block_indexes=[s["vision_depth"] - 1], window_size=112)
    base_config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    # The SwiGLU adapter is sized like the 7B head's (1024 wide at d = 3584): d / 4, so the head's share of a step
    # is the real model's, not four times it.
    gap_config = GapConfig(text_config=text, vision_config=vision, **ids, latent_tokens_per_span=latent_tokens_per_span,
                           pca_num_components=s["k"], latent_adapter_size=s["hidden_size"] // 4,
                           latent_start_token_id=vocab - 4, latent_pad_token_id=vocab - 3, latent_end_token_id=vocab - 2)
    torch.manual_seed(seed)
    gap = GapForConditionalGeneration(gap_config)
    pca = synthetic_pca(s["hidden_size"], s["k"], seed=seed)
    gap.latent_head.set_pca(pca["mean"], pca["components"], pca["eigenvalues"])
    stock = Qwen2_5_VLForConditionalGeneration(base_config)
    missing, unexpected = stock.load_state_dict(gap.state_dict(), strict=False)
    assert not missing and all(key.startswith("latent_head.") for key in unexpected)
    for model in (gap, stock):
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = None  # fixed lengths: every run decodes max_new_tokens
        model.generation_config.do_sample = False
    return gap.to(device=device, dtype=dtype).eval(), stock.to(device=device, dtype=dtype).eval()


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device="cpu", clock=time.perf_counter):
    """(seconds, result) of one call, synchronised on CUDA; `clock=time.process_time` counts this process's CPU
    time instead of wall time (steadier on a shared CPU when torch runs one thread)."""
    sync(device)
    start = clock()
    result = fn()
    sync(device)
    return clock() - start, result


def spread(values):
    """median, min, max of a list of numbers."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def reset_peak_rss():
    """Reset this process's peak resident memory (Linux: VmHWM), so a later `peak_rss_mb` measures what follows."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (Linux), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def current_rss_mb():
    """Resident memory of this process now, in MB."""
    return _status_mb("VmRSS")


def peak_rss_mb():
    """Peak resident memory of this process since start or the last `reset_peak_rss`, in MB."""
    return _status_mb("VmHWM")


def machine():
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n", encoding="utf-8")
    return path


def print_table(title: str, rows: list[dict]):
    """rows: {"metric", "value", "goal", "met" (True, False or None: no goal), "detail"}"""
    print(f"\n{title}")
    print(f"{'metric':<58} {'value':>9} {'goal':>9}  met  detail")
    for row in rows:
        met = "-" if row["met"] is None else "yes" if row["met"] else "NO"
        print(f"{row['metric']:<58} {row['value']:>9.3f} {row['goal']:>9}  {met:<4} {row.get('detail', '')}")
