"""Wheels for a GPU machine without network access: `make wheels` here, `make gpu-check` there.

    python bench/wheels.py download --dest wheels [--python-version 3.12] [--binary pydantic-core]
    python3 bench/wheels.py install --wheels wheels          # on the GPU machine, with its own CUDA torch

`download` runs where a package index is reachable, in the project's environment (`make install`). It walks the
project's requirements (`install_requires` and the `train` extra) through the distributions installed here and, for
the GPU machine's Python, fetches the wheel of the version installed here of every pure-Python one (tag
`py3-none-any`), builds DeepSpeed (published as a source distribution only; its CUDA ops compile on first use, and
ZeRO with the Trainer's AdamW needs none) into one, and fetches compiled wheels only of the distributions named by
`--binary` (for the GPU machine's platform). torch and what only torch needs are never fetched. The folder is
written whole, then renamed into place, with `requirements.txt`: the project's direct requirements, pinned to the
fetched versions where a wheel is in the folder, with the project's own bounds otherwise (torch, numpy, ...: those
must already be installed there).

`install` runs on the GPU machine with no network: `pip install --no-index --find-links <folder> -r
requirements.txt`, so pip installs the pinned requirements whose installed versions differ, and the dependencies
they need that are missing or too old there; what is installed and fits is left alone (the CUDA torch above all,
which is never in the folder). It uses only the standard library and pip.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT = "gap-vl"
EXTRAS = ("train",)
# Never fetched: the GPU machine's own CUDA build stays (what only torch needs is not walked either).
KEEP = ("torch",)
# Published as a source distribution only: built into a wheel here.
BUILT_HERE = ("deepspeed",)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def is_pure(dist: metadata.Distribution) -> bool:
    """True when every tag of the installed wheel is `...-none-any` (no compiled code, any Python 3)."""
    wheel = dist.read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip() for line in wheel.splitlines() if line.startswith("Tag:")]
    return bool(tags) and all(tag.endswith("-none-any") for tag in tags)


def closure(python_version: str):
    """(direct requirements, {canonical name: installed distribution}) of the project, markers evaluated for the
    GPU machine's Python on Linux x86-64; torch is kept out and not walked."""
    from packaging.requirements import Requirement

    environment = {"python_version": python_version, "python_full_version": f"{python_version}.0",
                   "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                   "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython"}

    def applies(requirement, extras):
        marker = requirement.marker
        return marker is None or any(marker.evaluate({**environment, "extra": extra}) for extra in ("", *extras))

    try:
        project = metadata.distribution(PROJECT)
    except metadata.PackageNotFoundError:
        raise SystemExit(f"{PROJECT} is not installed in this environment ({sys.executable}); run `make install` "
                         "first: the wheels are the versions installed here.") from None
    direct = [r for r in map(Requirement, project.requires or []) if applies(r, EXTRAS)]
    found: dict[str, metadata.Distribution] = {}
    todo = list(direct)
    while todo:
        requirement = todo.pop()
        name = canonical(requirement.name)
        if name in found or name in KEEP:
            continue
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{requirement.name} (needed by the project) is not installed in {sys.executable}; run "
                             "`make install` first.") from None
        found[name] = dist
        todo.extend(sub for sub in map(Requirement, dist.requires or []) if applies(sub, requirement.extras))
    return direct, found


def download(args: argparse.Namespace) -> int:
    direct, found = closure(args.python_version)
    binary = {canonical(name) for name in args.binary}
    unknown = sorted(binary - set(found))
    if unknown:
        raise SystemExit(f"--binary {' '.join(unknown)}: not among the project's dependencies ({', '.join(sorted(found))}).")
    fetch = sorted(name for name, dist in found.items()
                   if name not in BUILT_HERE and (is_pure(dist) or name in binary))
    build = sorted(name for name in found if name in BUILT_HERE)
    expected = sorted(name for name, dist in found.items() if name not in fetch and name not in build)
    dest = Path(args.dest)
    staging = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent if dest.parent.exists() else None))
    try:
        abi = "cp" + args.python_version.replace(".", "")
        platforms = [f"manylinux_2_{n}_x86_64" for n in range(args.glibc_minor, 16, -1)]
        platforms += ["manylinux2014_x86_64", "manylinux1_x86_64"]
        pip = [sys.executable, "-m", "pip"]
        specs = [f"{name}=={found[name].version}" for name in fetch]
        subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", args.python_version,
                        "--implementation", "cp", "--abi", abi, *[f"--platform={p}" for p in platforms],
                        "--dest", str(staging), *specs], check=True)
        if build:
            subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(staging),
                            *[f"{name}=={found[name].version}" for name in build]], check=True)
        in_folder = set(fetch) | set(build)
        lines = []
        for requirement in direct:
            name = canonical(requirement.name)
            if name in in_folder:
                lines.append(f"{name}=={found[name].version}")
            else:  # must be installed there already (torch, compiled packages)
                lines.append(f"{name}{requirement.specifier}")
        (staging / "requirements.txt").write_text(
            "# written by bench/wheels.py download; installed with bench/wheels.py install\n" + "\n".join(lines) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in dest.iterdir()) / 2**20
    print(f"{dest}: {len(in_folder)} wheels for CPython {args.python_version} ({size:.0f} MB), requirements.txt")
    print("expected on the GPU machine already (compiled, not in the folder): " + ", ".join(expected + list(KEEP)))
    return 0


def install(args: argparse.Namespace) -> int:
    folder = Path(args.wheels)
    requirements = folder / "requirements.txt"
    if not requirements.is_file():
        raise SystemExit(f"{requirements} does not exist: run `make wheels` where a package index is reachable and "
                         f"bring the folder {folder} along.")
    before = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(folder), "--no-cache-dir",
               "--disable-pip-version-check", "-q", "-r", str(requirements)]
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"pip could not install from {folder} without network access (above). A compiled "
                         f"dependency missing on this machine can be added with `make wheels WHEELS_BINARY=\"... NAME\"`.")
    after = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    changed = sorted(f"{name} {before.get(name, '-')} -> {version}" for name, version in after.items()
                     if before.get(name) != version)
    print("installed from " + str(folder) + ": " + (", ".join(changed) if changed else "nothing (every version fits)"))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("download", help="fetch the wheels (here, with a package index)")
    get.add_argument("--dest", default="wheels", help="the folder to write (replaced whole)")
    get.add_argument("--python-version", default="3.12", help="the GPU machine's Python (major.minor)")
    get.add_argument("--binary", nargs="*", default=[], help="compiled distributions to fetch too, for the GPU "
                     "machine's platform (for those it lacks)")
    get.add_argument("--glibc-minor", type=int, default=28, help="newest manylinux_2_N tag to accept (glibc 2.N)")
    put = commands.add_parser("install", help="install what differs from the folder (on the GPU machine)")
    put.add_argument("--wheels", default="wheels", help="the folder `download` wrote")
    args = parser.parse_args(argv)
    return download(args) if args.command == "download" else install(args)


if __name__ == "__main__":
    sys.exit(main())
