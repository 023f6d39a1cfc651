"""Importing a user object named on the command line: ``"module:attr"``, ``"path/to/file.py:attr"``
and, where allowed, ``"module.attr"``.

Used by :func:`gap_pipeline.answers.load_checker` (``--checker``) and
:func:`gap_pipeline.difficulty.load_sampler` (``--sampler``); each passes its own error class and help
text and decides itself what to do with the object (instantiate a class, call a factory).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from typing import Any

__all__ = ["import_object"]

# A bare Windows path ("C:\\dir\\file.py"): its colon does not separate a callable.
_DRIVE_PATH_ONLY = re.compile(r"^[A-Za-z]:[\\/][^:]*$")


def import_object(
    spec: str,
    what: str,
    error_cls: type[Exception],
    help_text: str,
    module_prefix: str,
    allow_dotted: bool = False,
) -> tuple[Any, str]:
    """The object that ``spec`` names, and the attribute path it was found at.

    ``spec`` is ``"module:attr"`` or ``"path/to/file.py:attr"`` (``attr`` may be dotted);
    ``"module.attr"`` too when ``allow_dotted``. A file is executed as a module named
    ``module_prefix`` + its stem and registered in ``sys.modules`` (so pickling and dataclasses work).
    Every failure raises ``error_cls`` with a message starting ``cannot load {what} {spec!r}``;
    ``help_text`` tells the user what to pass.
    """
    if ":" in spec and not _DRIVE_PATH_ONLY.match(spec):
        module_name, _, attr = spec.rpartition(":")
    elif allow_dotted and "." in spec:
        module_name, _, attr = spec.rpartition(".")
    else:
        raise error_cls(f"cannot load {what} {spec!r}: no callable named; {help_text}")
    if not module_name or not attr:
        raise error_cls(f"cannot load {what} {spec!r}: {help_text}")

    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = os.path.abspath(module_name)
        if not os.path.isfile(path):
            raise error_cls(f"cannot load {what} {spec!r}: file {path} does not exist; {help_text}")
        name = module_prefix + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
        file_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[name] = module
        try:
            file_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise error_cls(
                f"cannot load {what} {spec!r}: executing {path} failed with {type(exc).__name__}: {exc}"
            ) from exc
    else:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise error_cls(
                f"cannot load {what} {spec!r}: importing module {module_name!r} failed with "
                f"{type(exc).__name__}: {exc}; {help_text}"
            ) from exc

    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise error_cls(f"cannot load {what} {spec!r}: {module_name!r} has no attribute {attr!r}") from None
    return obj, attr
