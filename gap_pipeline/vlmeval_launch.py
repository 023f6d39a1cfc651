"""``gap vlmeval``: run VLMEvalKit's benchmarks on a GAP checkpoint.

Registers :class:`gap_pipeline.vlmeval_model.GapVLMEval` under ``--name`` in ``vlmeval.config.supported_VLM``
with this checkpoint and intervention, then runs VLMEvalKit's ``run.main()`` with ``--data``, ``--model NAME``,
``--work-dir`` and any arguments after ``--`` (e.g. ``-- --mode infer --reuse``). Needs ``vlmeval``
(``pip install ms-vlmeval``) importable, which it is where a CUDA torch and torchvision are installed.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

from . import GapError

HELP = "Run VLMEvalKit benchmarks (MMStar, HRBench4K, MathVista, ...) on a GAP checkpoint."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a GAP or Qwen2.5-VL checkpoint folder")
    parser.add_argument("--data", required=True, nargs="+", help="VLMEvalKit dataset names, e.g. MMStar HRBench4K")
    parser.add_argument("--work-dir", required=True, help="VLMEvalKit's output folder")
    parser.add_argument("--name", default="GAP", help="the model name VLMEvalKit files results under")
    parser.add_argument("--latent-intervention", default="pca", help="pca, suppress, noise, hidden or hidden_ema")
    parser.add_argument("--budget", type=int, default=None, help="latent budget K (default: the checkpoint's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("vlmeval_args", nargs=argparse.REMAINDER, help="after --: more arguments for VLMEvalKit's run")


def run(args: argparse.Namespace) -> int:
    try:
        from vlmeval import run as vlmeval_run
        from vlmeval.config import supported_VLM

        from .vlmeval_model import GapVLMEval
    except ImportError as error:
        raise GapError(f"VLMEvalKit does not import here ({error}); install it with `pip install ms-vlmeval` in an "
                       "environment with a CUDA torch and its torchvision") from None
    supported_VLM[args.name] = partial(GapVLMEval, pretrained=args.model, latent_intervention=args.latent_intervention,
                                       latent_tokens_per_span=args.budget, seed=args.seed, dtype=args.dtype,
                                       max_new_tokens=args.max_new_tokens)
    extra = [arg for arg in args.vlmeval_args if arg != "--"]
    sys.argv = ["vlmeval", "--data", *args.data, "--model", args.name, "--work-dir", args.work_dir, *extra]
    vlmeval_run.main()
    return 0
