"""A checkpoint loaded for an evaluation harness (lmms-eval, VLMEvalKit): one intervention and budget, a seeded
generator, and `gap evaluate`'s batched generation (:func:`gap_pipeline.evaluate.generate_batch`)."""

from __future__ import annotations

from dataclasses import dataclass

from . import GapError
from .evaluate import EvalItem, generate_batch


@dataclass
class Generated:
    """One answer and what the latent decoder did for it."""

    text: str
    latent_spans: int
    latent_span_norms: list
    vision_norm: float | None


class HarnessModel:
    """A GAP or Qwen2.5-VL checkpoint answering one user turn of images then text, as `gap evaluate` prompts."""

    def __init__(self, pretrained: str, *, latent_intervention: str = "pca", latent_tokens_per_span=None,
                 seed: int = 0, dtype: str = "auto", device="auto") -> None:
        import torch

        from modeling_gap import LATENT_INTERVENTIONS

        from .inference import load_model_and_processor

        if latent_intervention not in LATENT_INTERVENTIONS or latent_intervention == "oracle":
            choices = [name for name in LATENT_INTERVENTIONS if name != "oracle"]
            raise GapError(f"latent_intervention={latent_intervention!r}: choose from {choices} (the oracle "
                             "feeds each row's true latents, which a harness does not have; use `gap evaluate`)")
        self.model, self.processor, self.is_gap = load_model_and_processor(pretrained, dtype=dtype, device=device)
        self.intervention = latent_intervention
        self.budget = int(latent_tokens_per_span or getattr(self.model.config, "latent_tokens_per_span", 0))
        if self.is_gap:
            from configuration_gap import check_latent_budget

            check_latent_budget(self.budget, "latent_tokens_per_span")
        self.generator = torch.Generator(device=self.model.device).manual_seed(int(seed))

    def generate(self, questions: list[tuple[list, str]], *, max_new_tokens: int, do_sample: bool = False,
                 generation_kwargs: dict | None = None) -> list[Generated]:
        """Answers to `questions`, each ``(images, text)``, generated as one batch."""
        items = [EvalItem(str(k), [{"role": "user", "content": [{"type": "image"} for _ in images]
                                    + [{"type": "text", "text": text}]}], list(images), gold="")
                 for k, (images, text) in enumerate(questions)]
        texts, spans, norms, vision_norms, _, _ = generate_batch(
            self.model, self.processor, items, is_gap=self.is_gap, intervention=self.intervention,
            budget=self.budget, max_new_tokens=max_new_tokens, generator=self.generator, do_sample=do_sample,
            generation_kwargs=generation_kwargs,
        )
        return [Generated(*fields) for fields in zip(texts, spans, norms, vision_norms)]
