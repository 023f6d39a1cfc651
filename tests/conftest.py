"""Shared pytest fixtures: a tiny Qwen2.5-VL tokenizer, processor, checkpoints and images.

Everything is built in code (see ``gap_pipeline.tiny``); nothing is downloaded.  Session
fixtures are shared by all tests: do not mutate them (a test that adds tokens or changes
weights builds its own copy, e.g. with ``build_tiny_tokenizer()``, or loads the folder).
"""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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
from tests.support import GOLDS, K, engineered_gap, png_base64, write_tsv  # noqa: E402

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


def link_installed_closure(names, site: Path) -> Path:
    """Symlinks into `site` the top-level files and folders (packages and dist-info) of `names`' closure here."""
    for distribution in _installed_closure(names).values():
        if distribution.files is None:
            raise RuntimeError(f"{distribution.metadata['Name']} lists no files (RECORD); reinstall it with pip.")
        for top in {file.parts[0] for file in distribution.files if file.parts[0] != ".."}:
            link = site / top
            if not link.exists():
                link.symlink_to(Path(distribution.locate_file(top)))
    return site


def pytest_addoption(parser):
    parser.addoption(
        "--hub-user-python", action="append", default=[], metavar="PYTHON",
        help="also run the Hub-user tests with this Python: a plain environment of torch, transformers, accelerate "
             "and pillow (make test-remote-code-range builds them, one per end of the remote code's range)",
    )


def pytest_generate_tests(metafunc):
    """Every test that uses `hub_user_python` runs once per Hub-user environment: this one, then each given."""
    if "hub_user_python" in metafunc.fixturenames:
        pythons = metafunc.config.getoption("--hub-user-python")
        metafunc.parametrize("hub_user_environment", ["installed", *pythons], indirect=True, scope="session",
                             ids=["installed", *(Path(python).parent.parent.name for python in pythons)])


@pytest.fixture(scope="session")
def hub_user_environment(request, tmp_path_factory):
    """(the Python command, its environment variables) of one Hub-user environment (see `hub_user_python`)."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    if request.param == "installed":
        site = link_installed_closure(HUB_USER_PACKAGES, tmp_path_factory.mktemp("hub_user_site"))
        return [sys.executable, "-S"], {**env, "PYTHONPATH": str(site)}
    python = Path(request.param).absolute()  # not resolved: a venv's python is a link to the base interpreter
    if not python.is_file():
        raise FileNotFoundError(f"--hub-user-python {python}: no such Python (make test-remote-code-range builds it)")
    return [str(python)], env


@pytest.fixture(scope="session")
def hub_user_python(hub_user_environment):
    """Runs Python code as a Hub user would: ``hub_user_python(code, cwd) -> subprocess.CompletedProcess``.

    In this environment ("installed"), the interpreter starts without its site-packages (``-S``); its only packages
    are HUB_USER_PACKAGES and what they require, linked into one folder on PYTHONPATH. So the training stack, this
    repository and everything else installed here are absent: not importable, and not found by
    ``importlib.util.find_spec`` or ``importlib.metadata``, which transformers' ``is_*_available`` checks use. With
    ``--hub-user-python PYTHON`` the tests run again with each such Python, a plain environment of its own.
    """
    command, env = hub_user_environment

    def run(code: str, cwd) -> subprocess.CompletedProcess:
        return subprocess.run([*command, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)

    return run


# -- the training data: 8 rows through the real pipeline ---------------------------------------------------------

PCA_K = 16
TEXT_ONLY_ROWS = (1, 5)  # no image, no latent span
STRIPPED_ROW = 6  # accuracy above tau: its span is stripped, it keeps its image


def _training_row(i, image):
    if i in TEXT_ONLY_ROWS:
        return {
            "id": f"row{i}",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": f"Say hello to row {i}."}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"Hello row {i}."}]},
            ],
            "images": [],
            "aux_images": [],
            "accuracy": 0.0,
        }
    return {
        "id": f"row{i}",
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"How many red cells are in row {i % 4}?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"Look at the row. <latent> The answer is {i % 5}."}]},
        ],
        "images": [image(seed=i)],
        "aux_images": [image(seed=100 + i)],
        "accuracy": 0.75 if i == STRIPPED_ROW else 0.0,
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_base_dir, tiny_image):
    """8 rows with latent targets, a PCA fitted on them, and the GAP checkpoint converted with it (K = `K`).

    Built with `compute_latent_targets` (tiny base vision tower), `fit_pca` and `convert_checkpoint`, so the latent
    loss can actually fall.
    """
    import datasets

    from gap_pipeline.convert import convert_checkpoint
    from gap_pipeline.data import from_dataset
    from gap_pipeline.pca import fit_pca, save_basis
    from gap_pipeline.targets import TARGETS_COLUMN, compute_latent_targets
    from gap_pipeline.tiny import build_tiny_base_model

    root = tmp_path_factory.mktemp("train_sft")
    rows = from_dataset(datasets.Dataset.from_list([_training_row(i, tiny_image) for i in range(8)]))
    base_model, base_processor = build_tiny_base_model(seed=0)
    data, _ = compute_latent_targets(rows, base_model, base_processor.image_processor, latent_tokens_per_span=K,
                                     progress=False)
    data.save_to_disk(str(root / "data"))
    fit = fit_pca(v for v in data.with_format("numpy")[TARGETS_COLUMN] if len(v))
    pca = save_basis(root / "pca", fit.basis(PCA_K))
    convert_checkpoint(tiny_base_dir, root / "gap", pca, latent_tokens_per_span=K, latent_adapter_size=32,
                       dtype="float32")
    return SimpleNamespace(root=root, base=Path(tiny_base_dir), data=root / "data", pca=pca, gap=root / "gap")


# -- evaluation ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engineered_dir(tmp_path_factory):
    """The saved `engineered_gap()` model and its processor."""
    model, processor = engineered_gap()
    path = tmp_path_factory.mktemp("engineered_gap")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def benchmark_tsv(tmp_path_factory, tiny_image):
    """A six-row benchmark TSV (four options each) whose answers are GOLDS."""
    rows = [
        {"index": 100 + i, "image": png_base64(tiny_image(seed=i)), "question": f"How many red cells are in row {i}?",
         "A": "1", "B": "2", "C": "3", "D": "4", "answer": gold, "category": "count"}
        for i, gold in enumerate(GOLDS)
    ]
    return write_tsv(tmp_path_factory.mktemp("bench") / "bench.tsv", rows)
