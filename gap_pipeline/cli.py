"""The ``gap`` console command: one subcommand per pipeline step.

Contract for a subcommand
-------------------------
Add one line to :data:`COMMANDS` mapping the subcommand name to a module.  That module
defines, at top level:

* ``HELP: str`` -- a one-line summary, written as a plain string literal (``gap --help``
  reads it from the source without importing the module);
* ``add_arguments(parser: argparse.ArgumentParser) -> None`` -- adds the subcommand's
  options to the parser it is given;
* ``run(args: argparse.Namespace) -> int`` -- does the work and returns the exit status. A user
  error is raised as a :class:`gap_pipeline.GapError` (or a subclass): :func:`main` prints
  ``error: <message>`` for it and returns 2.

Only the chosen subcommand's module is imported, so ``gap --help`` stays fast no matter
how heavy the steps' imports are.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import logging
import math
import sys
from collections.abc import Sequence

from . import GapError, __version__

# subcommand name -> module that implements it (see the module docstring for the contract)
COMMANDS: dict[str, str] = {
    "import": "gap_pipeline.importer",
    "tiny-model": "gap_pipeline.tiny",
    "fit-pca": "gap_pipeline.pca",
    "targets": "gap_pipeline.targets",
    "difficulty": "gap_pipeline.difficulty",
    "filter": "gap_pipeline.filters",
    "audit": "gap_pipeline.audit",
    "convert": "gap_pipeline.convert",
    "merge-lora": "gap_pipeline.lora",
    "norm-profile": "gap_pipeline.norms",
    "evaluate": "gap_pipeline.evaluate",
    "lmms-task": "gap_pipeline.lmms_task",
    "vlmeval": "gap_pipeline.vlmeval_launch",
    "demo-data": "gap_pipeline.demo_task",
    "demo": "gap_pipeline.demo",
}


# -- argument types: a bad value is argparse's own error (usage line, `error: argument --x: ...`, exit status 2) -------


def positive_int(value: str) -> int:
    """An ``int`` >= 1 (a count, a size, a limit)."""
    number = _int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return number


def nonnegative_int(value: str) -> int:
    """An ``int`` >= 0 (0 usually meaning "off")."""
    number = _int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return number


def finite_float(value: str) -> float:
    """A ``float`` that is neither NaN nor infinite (a threshold every comparison must be able to decide)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
    return number


def comma_list(value: str) -> list[str]:
    """A comma-separated list with at least one non-empty item (spaces around items dropped)."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"must name at least one item (comma-separated), got {value!r}")
    return items


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {value!r}") from None


def read_help(module_name: str) -> str:
    """Return the module's ``HELP`` string literal without importing the module ('' if absent)."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return ""
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return ""
    try:
        with open(spec.origin, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=spec.origin)
    except (OSError, SyntaxError):
        return ""
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "HELP" for t in targets):
            try:
                help_text = ast.literal_eval(value)
            except ValueError:
                return ""
            return help_text if isinstance(help_text, str) else ""
    return ""


def _chosen_command(argv: Sequence[str]) -> str | None:
    # The top-level parser takes only flags without values (--help, --version), so the
    # first argument that is not a flag names the subcommand.
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """Build the ``gap`` parser; only the subcommand named in ``argv`` gets imported."""
    parser = argparse.ArgumentParser(
        prog="gap",
        description="GAP offline pipeline: visual latent reasoning for Qwen2.5-VL.",
        epilog="Run 'gap COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = _chosen_command(argv)
    for name, module_name in COMMANDS.items():
        if name == chosen:
            module = importlib.import_module(module_name)
            sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
            module.add_arguments(sub)
            sub.set_defaults(_run=module.run)
        else:
            subparsers.add_parser(name, help=read_help(module_name))
    return parser


class _NoAcceleratorGuess(logging.Filter):
    """Drops DeepSpeed's "Setting accelerator to CPU ..." warning. accelerate imports DeepSpeed, when it is installed,
    on every ``save_pretrained`` (to unwrap a DeepSpeed engine), and DeepSpeed logs its accelerator guess on import;
    no ``gap`` command runs DeepSpeed, so the line says nothing about the command. Other DeepSpeed messages pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gap`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    deepspeed_logger = logging.getLogger("DeepSpeed")  # DeepSpeed's own logger, kept when DeepSpeed configures it
    if not any(isinstance(f, _NoAcceleratorGuess) for f in deepspeed_logger.filters):
        deepspeed_logger.addFilter(_NoAcceleratorGuess())
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "max_image_pixels"):  # a command that reads images (data.add_max_image_pixels_argument)
            from .data import max_image_pixels

            with max_image_pixels(args.max_image_pixels):
                status = args._run(args)
        else:
            status = args._run(args)
    except GapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if status is None else int(status)


if __name__ == "__main__":
    raise SystemExit(main())
