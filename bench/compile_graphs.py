"""torch.compile: graphs and graph breaks of GAP's forward against stock Qwen2.5-VL's, on the same weights.

Dynamo traces each case once per model (`torch._dynamo.explain`, no kernels compiled) and counts the graphs it
splits the forward into; GAP's goal is stock's count on every case stock has (one graph: `fullgraph=True` works),
and one graph on the cases only GAP has (a latent span in the input, teacher-forced with labels; a decoding step
that feeds a latent).

    python bench/compile_graphs.py            # tiny size, seconds
"""

from __future__ import annotations

import argparse

import torch
from common import build_models, write_results


def cases(gap, K):
    start, pad, end = gap.config.latent_token_ids
    d = gap.config.text_config.hidden_size
    text = torch.tensor([[11, 12, 13, 14, 15, 16, 17, 18]])
    span = torch.tensor([[11, 12, start] + [pad] * K + [end, 13, 14]])
    latents = torch.randn(K, d, generator=torch.Generator().manual_seed(0))
    yield "text", {"input_ids": text}, True
    yield "text + labels", {"input_ids": text, "labels": text}, True
    yield "latent span + labels", {"input_ids": span, "labels": span, "latent_embeds": latents}, False


def explain(model, inputs):
    torch._dynamo.reset()
    with torch.no_grad():
        report = torch._dynamo.explain(model)(**inputs)
    return {"graphs": report.graph_count, "breaks": report.graph_break_count,
            "reasons": sorted({str(b.reason).splitlines()[0][:120] for b in report.break_reasons})}


def decode_step(gap):
    """A cached decoding step that feeds one latent, as `generate` runs it (the prefix is in the cache)."""
    start, pad, _ = gap.config.latent_token_ids
    with torch.no_grad():
        prefill = gap(input_ids=torch.tensor([[11, 12, 13, start]]), use_cache=True)
    return {"input_ids": torch.tensor([[pad]]), "latent_embeds": prefill.next_latent, "return_next_latent": False,
            "cache": prefill.cache}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny")
    args = parser.parse_args()
    K = 4
    gap, stock = build_models(args.size, latent_tokens_per_span=K)
    rows = []
    for name, inputs, stock_too in cases(gap, K):
        row = {"case": name, "gap": explain(gap, inputs)}
        if stock_too:
            row["stock"] = explain(stock, inputs)
        rows.append(row)
    rows.append({"case": "decoding step feeding a latent", "gap": explain(gap, decode_step(gap))})
    print("\ntorch.compile: graphs per forward (Dynamo explain), GAP vs stock Qwen2.5-VL")
    print(f"{'case':<34} {'GAP graphs':>10} {'GAP breaks':>10} {'stock graphs':>12} {'stock breaks':>12}")
    for r in rows:
        stock_row = r.get("stock", {"graphs": "-", "breaks": "-"})
        print(f"{r['case']:<34} {r['gap']['graphs']:>10} {r['gap']['breaks']:>10} {stock_row['graphs']:>12} "
              f"{stock_row['breaks']:>12}  {'; '.join(r['gap']['reasons'])}")
    met = all(r["gap"]["breaks"] <= r.get("stock", {"breaks": 0})["breaks"] for r in rows)
    print(("met" if met else "NOT met") + ": GAP breaks no more graphs than stock on any case (none where stock has none)")
    path = write_results("compile_graphs", {"size": args.size, "rows": rows, "met": met})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
