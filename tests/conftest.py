"""Shared pytest fixtures: a tiny Qwen2.5-VL tokenizer, processor, checkpoints and images.

Everything is built in code (see ``gap_pipeline.tiny``); nothing is downloaded.  Session
fixtures are shared by all tests: do not mutate them (a test that adds tokens or changes
weights builds its own copy, e.g. with ``build_tiny_tokenizer()``, or loads the folder).
"""

import os
import subprocess
import sys
from pathlib import Path

# Any accidental Hub access must fail loudly; set before transformers / huggingface_hub
# are imported (they read these at import time).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from gap_pipeline.tiny import (  # noqa: E402
    TINY_IMAGE_SIZE,
    build_tiny_processor,
    build_tiny_tokenizer,
    save_tiny_base_checkpoint,
)

# What a Hub user who loads a GAP checkpoint has installed (issue 18), and what they do not.
HUB_USER_PACKAGES = ("torch", "transformers", "accelerate", "pillow")
TRAINING_STACK = ("deepspeed", "trl", "peft", "datasets")

# Spare embedding rows of the `tiny_base_dir_spare` checkpoint: more than the three GAP
# latent tokens, so conversion can place them without growing the matrix.
TINY_SPARE_VOCAB = 5


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny Qwen2.5-VL tokenizer (special tokens + chat template, no latent tokens)."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_processor(tiny_tokenizer):
    """The tiny Qwen2.5-VL processor (112 x 112 image -> 16 image tokens)."""
    return build_tiny_processor(tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """A saved tiny base checkpoint folder: seed 0, untied, no spare rows."""
    return save_tiny_base_checkpoint(tmp_path_factory.mktemp("tiny_base"), seed=0)


@pytest.fixture(scope="session")
def tiny_base_dir_tied(tmp_path_factory):
    """A saved tiny base checkpoint folder with the LM head tied to the input embedding."""
    return save_tiny_base_checkpoint(tmp_path_factory.mktemp("tiny_base_tied"), seed=0, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_base_dir_spare(tmp_path_factory):
    """A saved tiny base checkpoint folder with TINY_SPARE_VOCAB unused embedding rows."""
    return save_tiny_base_checkpoint(
        tmp_path_factory.mktemp("tiny_base_spare"), seed=0, spare_vocab=TINY_SPARE_VOCAB
    )


def _grid_image(seed: int, size: tuple[int, int], cells: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = size
    colours = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
    rows = np.minimum(np.arange(height) * cells // height, cells - 1)
    cols = np.minimum(np.arange(width) * cells // width, cells - 1)
    pixels = colours[rows[:, None], cols[None, :]]
    return Image.fromarray(pixels)  # (H, W, 3) uint8 -> RGB


@pytest.fixture(scope="session")
def tiny_image():
    """Factory of deterministic RGB test images: ``tiny_image(seed=0, size=(112, 112), cells=4)``.

    The image is a ``cells x cells`` grid of random colours (one merged vision token per
    cell at the default size); the same arguments always give the same pixels.
    """

    def make(seed: int = 0, size: tuple[int, int] = (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), cells: int = 4):
        return _grid_image(seed, tuple(size), cells)

    return make


@pytest.fixture(scope="session")
def tiny_gap_and_processor(tiny_base_dir):
    """A tiny GAP model (K = 4, k = 8, synthetic PCA) converted from `tiny_base_dir`, and its processor.

    Tests that change its weights or config must restore them.
    """
    from gap_pipeline.tiny import build_tiny_gap_model

    return build_tiny_gap_model(tiny_base_dir, latent_tokens_per_span=4)


@pytest.fixture(scope="session")
def tiny_gap(tiny_gap_and_processor):
    """The model of `tiny_gap_and_processor`."""
    return tiny_gap_and_processor[0]


def _installed_closure(names):
    """The distributions `names` need installed: them and their requirements (no extras), recursively."""
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    todo, closure = list(names), {}
    while todo:
        name = canonicalize_name(todo.pop())
        if name in closure:
            continue
        closure[name] = distribution = importlib.metadata.distribution(name)
        for line in distribution.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return closure


@pytest.fixture(scope="session")
def hub_user_python(tmp_path_factory):
    """Runs Python code as a Hub user would: ``hub_user_python(code, cwd) -> subprocess.CompletedProcess``.

    The interpreter starts without its site-packages (``-S``); its only packages are HUB_USER_PACKAGES and what
    they require, linked into one folder on PYTHONPATH. So the training stack, this repository and everything
    else installed here are absent: not importable, and not found by ``importlib.util.find_spec`` or
    ``importlib.metadata``, which transformers' ``is_*_available`` checks use.
    """
    site = tmp_path_factory.mktemp("hub_user_site")
    for distribution in _installed_closure(HUB_USER_PACKAGES).values():
        if distribution.files is None:
            raise RuntimeError(f"{distribution.metadata['Name']} lists no files (RECORD); reinstall it with pip.")
        for top in {file.parts[0] for file in distribution.files if file.parts[0] != ".."}:
            link = site / top
            if not link.exists():
                link.symlink_to(Path(distribution.locate_file(top)))
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(site)

    def run(code: str, cwd) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=300)

    return run
