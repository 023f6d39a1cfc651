"""Load and save Qwen2.5-VL processors without torchvision.

In transformers 5.x, ``Qwen2_5_VLProcessor`` always has a video processor, and every
video processor needs torchvision.  Without torchvision (as on the CPU machines this
project tests on) a plain ``Qwen2_5_VLProcessor`` can neither be built nor loaded, and
``AutoProcessor.from_pretrained`` on a Qwen2.5-VL folder fails or, worse, silently
returns only the tokenizer when the processor class it names cannot be resolved.

GAP never feeds videos, so this module provides an image-only subclass:

* :class:`ImageOnlyQwen2_5_VLProcessor` behaves exactly like ``Qwen2_5_VLProcessor`` for
  text and images.  It *saves* a standard Qwen2.5-VL processor folder
  (``processor_class`` is ``"Qwen2_5_VLProcessor"`` and a video-processor entry that
  mirrors the image settings is written), so the folder loads with
  ``AutoProcessor.from_pretrained`` wherever torchvision is installed.
* :func:`load_qwen2_5_vl_processor` loads such a folder here and there: through
  ``AutoProcessor`` when torchvision is importable, through the image-only class
  otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

from transformers import Qwen2_5_VLProcessor

from . import GapError

__all__ = [
    "ImageOnlyQwen2_5_VLProcessor",
    "load_qwen2_5_vl_processor",
    "torchvision_available",
]

# The class name written into saved folders, so they load as plain Qwen2.5-VL processors.
SAVED_PROCESSOR_CLASS = "Qwen2_5_VLProcessor"
# Image-processor settings that a Qwen2-VL video processor shares.
_SHARED_VIDEO_KEYS = (
    "do_convert_rgb",
    "do_normalize",
    "do_rescale",
    "do_resize",
    "image_mean",
    "image_std",
    "merge_size",
    "patch_size",
    "resample",
    "rescale_factor",
    "size",
    "temporal_patch_size",
)


def torchvision_available() -> bool:
    """Return True when torchvision can be found (without importing it)."""
    return importlib.util.find_spec("torchvision") is not None


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """A ``Qwen2_5_VLProcessor`` without a video processor.

    Text, chat templates and images work as in the parent class (including
    ``mm_token_type_ids``); passing ``videos=`` raises, since there is no video processor.
    Saved folders name ``Qwen2_5_VLProcessor`` as their processor class.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # The sub-processors are taken from this signature (ProcessorMixin.get_attributes),
        # so leaving ``video_processor`` out of it is what makes the processor image-only.
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["processor_class"] = SAVED_PROCESSOR_CLASS
        image_config = output.get("image_processor")
        if isinstance(image_config, dict):
            video_config = {k: image_config[k] for k in _SHARED_VIDEO_KEYS if k in image_config}
            video_config["video_processor_type"] = "Qwen2VLVideoProcessor"
            output["video_processor"] = video_config
        return output

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        if push_to_hub:
            raise GapError(
                "ImageOnlyQwen2_5_VLProcessor.save_pretrained does not push to the Hub: save the "
                "folder, then upload it (for example with huggingface_hub.upload_folder)."
            )
        files = super().save_pretrained(save_directory, **kwargs)
        # ProcessorMixin writes the Python class name into the tokenizer config; point it
        # at the standard class so AutoProcessor resolves the folder as Qwen2.5-VL.
        self.tokenizer._set_processor_class(SAVED_PROCESSOR_CLASS)
        tokenizer_config = os.path.join(save_directory, "tokenizer_config.json")
        if os.path.isfile(tokenizer_config):
            with open(tokenizer_config, encoding="utf-8") as f:
                data = json.load(f)
            data["processor_class"] = SAVED_PROCESSOR_CLASS
            with open(tokenizer_config, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, ensure_ascii=False)
                f.write("\n")
        return files


def load_qwen2_5_vl_processor(path: str | os.PathLike, **kwargs) -> Qwen2_5_VLProcessor:
    """Load a Qwen2.5-VL processor folder, with or without torchvision.

    With torchvision installed this is ``AutoProcessor.from_pretrained(path, **kwargs)``
    (checked to really be a Qwen2.5-VL processor); without it, the image-only subclass is
    loaded from the same files.
    """
    if torchvision_available():
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path, **kwargs)
        if not isinstance(processor, Qwen2_5_VLProcessor):
            raise TypeError(
                f"{path} loaded as {type(processor).__name__}, not a Qwen2.5-VL processor; "
                "check processor_config.json (processor_class) in that folder."
            )
        return processor
    return ImageOnlyQwen2_5_VLProcessor.from_pretrained(path, **kwargs)
