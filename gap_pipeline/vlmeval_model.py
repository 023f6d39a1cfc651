"""VLMEvalKit model ``GapVLMEval``: a GAP (or plain Qwen2.5-VL) checkpoint as a VLMEvalKit ``BaseModel``.

VLMEvalKit has no plugin system; ``gap vlmeval`` (:mod:`gap_pipeline.vlmeval_launch`) registers this class in
``vlmeval.config.supported_VLM`` and runs VLMEvalKit's own ``run.main()``. Importing this module imports
``vlmeval``, which needs a torchvision that imports (a CUDA environment, in practice).
"""

from __future__ import annotations

from vlmeval.vlm.base import BaseModel

from .harness import HarnessModel
from .inference import open_image


class GapVLMEval(BaseModel):
    """One sample at a time (VLMEvalKit's ``generate_inner``): the message's images, then its text parts joined
    by newlines, in one user turn, generated as `gap evaluate` does."""

    INTERLEAVE = False
    allowed_types = ["text", "image"]

    def __init__(self, pretrained: str, latent_intervention: str = "pca", latent_tokens_per_span=None,
                 seed: int = 0, dtype: str = "auto", device: str = "auto", max_new_tokens: int = 256, **unused):
        super().__init__()
        self.gap = HarnessModel(pretrained, latent_intervention=latent_intervention,
                                latent_tokens_per_span=latent_tokens_per_span, seed=seed, dtype=dtype, device=device)
        self.max_new_tokens = int(max_new_tokens)

    def generate_inner(self, message, dataset=None) -> str:
        images = [open_image(part["value"], where=f"VLMEvalKit image {part['value']}")
                  for part in message if part["type"] == "image"]
        text = "\n".join(part["value"] for part in message if part["type"] == "text")
        (answer,) = self.gap.generate([(images, text)], max_new_tokens=self.max_new_tokens)
        return answer.text
