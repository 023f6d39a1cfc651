"""Offline pipeline for GAP (visual latent reasoning on Qwen2.5-VL).

The steps that run before and around training live here: tiny test checkpoints,
latent targets, PCA fit, difficulty estimation, base-to-GAP conversion and norm
profiling.  Each step is a subcommand of the ``gap`` console command (see
:mod:`gap_pipeline.cli`).  Importing this package is cheap: submodules are
imported only when used.
"""

__version__ = "0.1.0"
