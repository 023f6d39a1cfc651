"""Install routes (issue 29): the declared floors hold, and no extra replaces the user's torch.

A user installs torch first (the CPU build, or the CUDA build their driver needs), then the project with the extras
they want. The floors in setup.cfg are checked offline against what the installed stack itself requires. The
`package_index` tests resolve ``pip install -e ".[extra]"`` (``--dry-run --report``: nothing is installed) for every
extra in a fresh virtual environment that has only this environment's torch and its requirements, and fail when pip
would install or change a package of the torch family, or build flash-attn (its sdist needs torch and CUDA at build
time). They need a reachable package index (CI has one); ``-m "not package_index"`` leaves them out offline.
"""

import importlib.metadata
import json
import subprocess
import sys
import venv

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version
from setuptools.config.setupcfg import read_configuration

from conftest import _installed_closure, link_installed_closure
from tests.support import REPO

SETUP = read_configuration(REPO / "setup.cfg")
EXTRAS = sorted(SETUP["options"]["extras_require"])
# What an install must leave as the user has it: torch and the packages built against one torch release.
TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "triton"}
NEVER_BUILT = {"flash-attn"}


def _declared() -> dict[str, Requirement]:
    """The project's requirements, install_requires and every extra's, by name."""
    lines = [*SETUP["options"]["install_requires"], *(r for e in EXTRAS for r in SETUP["options"]["extras_require"][e])]
    return {canonicalize_name(requirement.name): requirement for requirement in map(Requirement, lines)}


def _installed_closure_of_declared() -> dict:
    """The installed distributions the project and its declared requirements need (extras not installed here aside)."""
    names = ["gap-vl"]
    for name in _declared():
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        names.append(name)
    return _installed_closure(names)


def _floor(requirement: Requirement) -> Version | None:
    floors = [Version(spec.version) for spec in requirement.specifier if spec.operator in (">=", "==", "~=")]
    return max(floors, default=None)


def test_python_requires_admits_no_python_the_pinned_stack_refuses():
    """The requirements with a ceiling (transformers, TRL, DeepSpeed, torch) leave pip no older release to fall back
    on, so their installed release's Requires-Python binds the project's."""
    ours = SpecifierSet(SETUP["options"]["python_requires"])
    oldest = min(Version(f"3.{minor}") for minor in range(8, 20) if f"3.{minor}" in ours)
    pinned = [name for name, requirement in _declared().items()
              if any(spec.operator in ("<", "<=", "==", "~=") for spec in requirement.specifier)]
    refusing = {}
    for name in pinned:
        supported = importlib.metadata.distribution(name).metadata["Requires-Python"]
        if supported and oldest not in SpecifierSet(supported):
            refusing[name] = supported
    assert pinned and not refusing, f"python_requires {ours} admits Python {oldest}, which these refuse: {refusing}"


def test_every_declared_floor_satisfies_what_the_installed_stack_requires_of_it():
    """A floor below what transformers, TRL, accelerate or PEFT require would let pip pick a set that cannot work."""
    declared = _declared()
    closure = _installed_closure_of_declared()
    too_low = []
    for name, dist in closure.items():
        for requirement in map(Requirement, dist.requires or []):
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            ours = declared.get(canonicalize_name(requirement.name))
            floor = ours and _floor(ours)
            if floor is not None and not requirement.specifier.contains(floor, prereleases=True):
                too_low.append(f"{ours} (setup.cfg) but {name} requires {requirement}")
    assert not too_low, "\n".join(too_low)


def test_peft_floor_is_one_the_pinned_transformers_accepts():
    # transformers checks PEFT's version at run time (its metadata leaves PEFT out)
    from transformers.integrations.peft import MIN_PEFT_VERSION

    assert _floor(_declared()["peft"]) >= Version(MIN_PEFT_VERSION)
    assert _floor(_declared()["torch"]) >= Version("2.6")  # transformers turns PyTorch off below 2.6 (import_utils)


@pytest.fixture(scope="module")
def torch_only_python(tmp_path_factory):
    """A fresh venv's Python whose only packages are this environment's torch and its requirements (linked)."""
    root = tmp_path_factory.mktemp("torch_only")
    venv.create(root / "venv", with_pip=False)
    (root / "site").mkdir()
    site = link_installed_closure(["torch"], root / "site")
    site_packages = next((root / "venv" / "lib").glob("python*/site-packages"))
    (site_packages / "torch_only.pth").write_text(f"{site}\n")
    return root / "venv" / "bin" / "python"


def _would_install(python, requirement: str, report) -> dict[str, str]:
    """What `pip install` of `requirement` into `python`'s environment would install or change: {name: version}."""
    run = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--quiet",
         "--report", str(report), requirement],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    items = json.loads(report.read_text())["install"]
    return {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"] for item in items}


@pytest.mark.package_index
@pytest.mark.parametrize("extra", ["", *EXTRAS])
def test_installing_the_project_with_each_extra_keeps_the_users_torch(torch_only_python, extra, tmp_path):
    torch_version = importlib.metadata.version("torch")
    found = subprocess.run([str(torch_only_python), "-c", "import torch; print(torch.__version__)"],
                           capture_output=True, text=True)
    assert found.stdout.strip() == torch_version, found.stderr
    planned = _would_install(torch_only_python, f"-e.[{extra}]" if extra else "-e.", tmp_path / "report.json")
    assert planned.get("gap-vl"), planned  # the resolve is the project's
    swapped = {name: version for name, version in planned.items()
               if name in TORCH_FAMILY | NEVER_BUILT or name.startswith("nvidia-")}
    assert not swapped, f'pip install -e ".[{extra}]" beside torch {torch_version} would install {swapped}'


# -- the remote code's transformers range ---------------------------------------------------------------------------


def _declared_transformers_range() -> tuple[Version, Version]:
    """(oldest minor, first minor outside) of configuration_gap.TRANSFORMERS_REQUIREMENT (`>=A.B,<C.D`)."""
    from configuration_gap import TRANSFORMERS_REQUIREMENT

    specifier = Requirement(TRANSFORMERS_REQUIREMENT).specifier
    bounds = {spec.operator: Version(spec.version) for spec in specifier}
    assert set(bounds) == {">=", "<"}, f"{TRANSFORMERS_REQUIREMENT}: declare the range as >=oldest,<first-untested"
    return bounds[">="], bounds["<"]


def test_ci_runs_the_hub_user_tests_at_both_ends_of_the_declared_transformers_range():
    oldest, outside = _declared_transformers_range()
    line = next(line for line in (REPO / "Makefile").read_text().splitlines()
                if line.startswith("REMOTE_CODE_TRANSFORMERS ?="))
    # the oldest end is this environment's transformers (the training pin), where `make test` runs the Hub-user tests
    installed = Version(importlib.metadata.version("transformers"))
    assert installed.release[:2] == oldest.release[:2], f"the installed transformers {installed} must be the oldest end"
    tested = [installed, *(Version(v) for v in line.split("?=", 1)[1].split())]
    assert tested[-1] < outside and tested[-1].release[:2] == (outside.major, outside.minor - 1), (
        f"{line}: the newest tested must be the last minor below {outside}")
    assert "make test-remote-code-range" in (REPO / ".ci" / "run").read_text()


@pytest.mark.parametrize("found", ["5.23.0", "5.26.0"])
def test_the_code_files_refuse_a_transformers_outside_their_range_when_imported(found, monkeypatch):
    import importlib.util

    oldest, outside = _declared_transformers_range()
    assert not oldest <= Version(found) < outside
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: found if name == "transformers" else real_version(name))
    spec = importlib.util.spec_from_file_location("configuration_gap_range_check", REPO / "configuration_gap.py")
    with pytest.raises(ImportError, match=rf"transformers>={oldest},<{outside} .* found transformers=={found}"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_the_model_card_states_the_code_files_transformers_range(tiny_gap):
    from configuration_gap import TRANSFORMERS_REQUIREMENT
    from gap_pipeline.model_card import render_model_card

    card = render_model_card(tiny_gap.config, model_id="me/tiny-gap")
    assert f'pip install "{TRANSFORMERS_REQUIREMENT}" accelerate pillow' in card
