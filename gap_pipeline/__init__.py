"""Offline pipeline for GAP (visual latent reasoning on Qwen2.5-VL).

The steps that run before and around training live here: tiny test checkpoints,
latent targets, PCA fit, difficulty estimation, base-to-GAP conversion and norm
profiling.  Each step is a subcommand of the ``gap`` console command (see
:mod:`gap_pipeline.cli`).  Importing this package is cheap: submodules are
imported only when used.
"""

__version__ = "0.1.0"


class GapError(ValueError):
    """A user error in a GAP step (bad arguments, files or rows): its message names what is wrong and the fix.

    Every step's error class subclasses it; the ``gap`` command and ``train_sft.py`` print ``error: <message>`` for
    it and exit with status 2. Anything else is a bug and keeps its traceback.
    """
