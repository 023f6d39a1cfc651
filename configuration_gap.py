"""Configuration of GAP (Granular Alignment Paradigm) models on top of Qwen2.5-VL.

`GapConfig` is a `Qwen2_5_VLConfig` plus the fields of the visual latent channel:

* ``latent_tokens_per_span`` (K): how many ``<|latent_pad|>`` tokens one latent span holds. The
  latents of a span are the auxiliary image's vision embeddings pooled to a sqrt(K) x sqrt(K)
  grid, so K must be a perfect square (paper App. H).
* ``latent_head_type``: ``"pca"`` (GAP: predict k PCA coefficients, decode with the fixed basis)
  or ``"full"`` (the paper's LH ablation: an R^d -> R^d head with no PCA).
* ``pca_num_components`` (k; None, the default of a bare config, means d until conversion sets k from the
  fitted PCA), ``latent_adapter_size`` (width of the SwiGLU adapter).
* ``latent_loss_weight`` (lambda in Eq. 3) and ``latent_loss_reduction``: ``"mean"`` (per element,
  the default) or ``"sum"`` (squared L2 over d, Eq. 2 literally).
* the three latent token ids, read from the tokenizer at conversion time.

This file imports only `transformers` so it ships as remote code next to the weights.
"""

import math

from transformers import Qwen2_5_VLConfig
from transformers.utils.versions import require_version


#: The transformers releases these three code files (configuration_gap.py, modeling_gap.py, processing_gap.py)
#: support: CI loads a saved checkpoint and decodes latent spans with the oldest and the newest, each in a plain
#: environment (`make test-remote-code-range`). 5.23 and older lack what the forward uses (the `cache` argument,
#: `MultimodalCausalLMOutputWithPast`), so importing the files there fails; a newer release is untested.
TRANSFORMERS_REQUIREMENT = "transformers>=5.24,<5.26"
require_version(
    TRANSFORMERS_REQUIREMENT,
    f"The GAP code files are tested with {TRANSFORMERS_REQUIREMENT}: pip install '{TRANSFORMERS_REQUIREMENT}'",
)


LATENT_START_TOKEN = "<|latent_start|>"
LATENT_PAD_TOKEN = "<|latent_pad|>"
LATENT_END_TOKEN = "<|latent_end|>"
LATENT_TOKENS = (LATENT_START_TOKEN, LATENT_PAD_TOKEN, LATENT_END_TOKEN)

LATENT_HEAD_TYPES = ("pca", "full")
LATENT_LOSS_REDUCTIONS = ("mean", "sum")


def check_latent_budget(num_tokens, name="latent_tokens_per_span"):
    """Raise a clear error unless `num_tokens` is a positive perfect square (K = sqrt(K)^2)."""
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens <= 0:
        raise ValueError(f"`{name}` must be a positive integer perfect square (e.g. 16, 36), got {num_tokens!r}.")
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        below, above = side * side, (side + 1) * (side + 1)
        raise ValueError(
            f"`{name}`={num_tokens} is not a perfect square: latents form a sqrt(K) x sqrt(K) grid. "
            f"Use {below} or {above}."
        )
    return side


def check_latent_tokens(tokenizer, config=None):
    """Return the (start, pad, end) ids of `tokenizer`; raise if it lacks a latent token or disagrees with `config`.

    The conversion adds the tokens to the tokenizer and the model together; a tokenizer that lacks them (the
    base model's, say) would put ids out of step with the model's embedding rows.
    """
    vocab = tokenizer.get_vocab()
    missing = [token for token in LATENT_TOKENS if token not in vocab]
    if missing:
        raise ValueError(
            f"The tokenizer lacks the latent tokens {missing}. Use the tokenizer saved with the GAP checkpoint "
            f"(conversion adds {list(LATENT_TOKENS)} to tokenizer and model together), not the base model's."
        )
    ids = tuple(vocab[token] for token in LATENT_TOKENS)
    if config is not None and config.latent_token_ids is not None and ids != tuple(config.latent_token_ids):
        raise ValueError(
            f"The tokenizer maps the latent tokens to ids {ids} but the model expects {tuple(config.latent_token_ids)}; "
            f"load the tokenizer saved with this checkpoint."
        )
    return ids


class GapConfig(Qwen2_5_VLConfig):
    r"""Qwen2.5-VL configuration with a visual latent channel (GAP).

    Adds to `Qwen2_5_VLConfig`: the latent span length K, the latent head (PCA-aligned or full),
    the latent loss weight and reduction, and the ids of ``<|latent_start|>``, ``<|latent_pad|>``
    and ``<|latent_end|>``. Invalid values raise a `ValueError` naming the field and the fix.
    """

    model_type = "gap_qwen2_5_vl"

    latent_tokens_per_span: int = 36
    latent_head_type: str = "pca"
    pca_num_components: int | None = None
    latent_adapter_size: int = 1024
    latent_loss_weight: float = 1.0
    latent_loss_reduction: str = "mean"
    latent_start_token_id: int | None = None
    latent_pad_token_id: int | None = None
    latent_end_token_id: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_gap()

    @property
    def latent_grid_side(self):
        """sqrt(K): the side of the pooled latent grid."""
        return math.isqrt(self.latent_tokens_per_span)

    @property
    def latent_token_ids(self):
        """(start, pad, end) ids, or None while conversion has not set them."""
        ids = (self.latent_start_token_id, self.latent_pad_token_id, self.latent_end_token_id)
        return None if any(i is None for i in ids) else ids

    def validate_gap(self):
        """Check the GAP fields; called at construction and before saving."""
        check_latent_budget(self.latent_tokens_per_span)
        if self.latent_head_type not in LATENT_HEAD_TYPES:
            raise ValueError(
                f"`latent_head_type` must be one of {LATENT_HEAD_TYPES} ('pca' = GAP, 'full' = the paper's "
                f"LH ablation), got {self.latent_head_type!r}."
            )
        if self.latent_loss_reduction not in LATENT_LOSS_REDUCTIONS:
            raise ValueError(
                f"`latent_loss_reduction` must be one of {LATENT_LOSS_REDUCTIONS} ('mean' per element, 'sum' "
                f"over d as Eq. 2), got {self.latent_loss_reduction!r}."
            )
        if not isinstance(self.latent_loss_weight, (int, float)) or not math.isfinite(self.latent_loss_weight) or (
            self.latent_loss_weight < 0
        ):
            raise ValueError(f"`latent_loss_weight` must be a finite number >= 0, got {self.latent_loss_weight!r}.")
        if not isinstance(self.latent_adapter_size, int) or self.latent_adapter_size <= 0:
            raise ValueError(f"`latent_adapter_size` must be a positive integer, got {self.latent_adapter_size!r}.")
        hidden_size = self.text_config.hidden_size
        k = self.pca_num_components
        if self.latent_head_type == "pca" and k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= hidden_size:
                raise ValueError(
                    f"`pca_num_components` must be an integer in [1, d={hidden_size}], got {k!r}."
                )
        ids = {
            "latent_start_token_id": self.latent_start_token_id,
            "latent_pad_token_id": self.latent_pad_token_id,
            "latent_end_token_id": self.latent_end_token_id,
        }
        set_ids = {name: value for name, value in ids.items() if value is not None}
        if set_ids and len(set_ids) != 3:
            missing = sorted(set(ids) - set(set_ids))
            raise ValueError(f"Set all three latent token ids or none; missing {missing}.")
        vocab_size = self.text_config.vocab_size
        for name, value in set_ids.items():
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
                raise ValueError(f"`{name}`={value!r} is not a valid id for a vocabulary of {vocab_size} rows.")
        if set_ids and len(set(set_ids.values())) != 3:
            raise ValueError(f"The three latent token ids must differ, got {ids}.")
        reserved = {self.image_token_id, self.video_token_id, self.vision_start_token_id, self.vision_end_token_id}
        clash = {name: value for name, value in set_ids.items() if value in reserved}
        if clash:
            raise ValueError(f"Latent token ids {clash} collide with Qwen2.5-VL's vision token ids.")

    def validate(self):
        super().validate()
        self.validate_gap()


__all__ = ["GapConfig", "LATENT_TOKENS", "check_latent_budget", "check_latent_tokens"]
