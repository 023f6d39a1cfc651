"""GAP: visual latent reasoning for Qwen2.5-VL (paper §4.2, App. C/F).

What this file adds to `Qwen2_5_VLForConditionalGeneration`:

* `GapLatentHead` — F_theta: R^d -> R^k, a projector initialised to c = P_k (h_bar - mu) refined by a
  SwiGLU adapter whose output projection starts at zero, and the fixed PCA decoder
  v_hat = P_k^T c + mu (Eq. 1, 6, 16). Its parameters and PCA buffers stay fp32 on every path.
* `GapForConditionalGeneration` — one forward path for training and decoding: the input embedding of
  every ``<|latent_pad|>`` is taken, in order, from `latent_embeds`; the latent for the pad at position
  p is predicted from the final-norm state h_bar at p - 1; the loss is L_LM + lambda * L_latent (Eq. 2-3).

This file imports only `torch`, `transformers` and its sibling files, so it ships as remote code.
"""

import copy
import math
from dataclasses import dataclass

# configuration_gap first: it checks the transformers version before the imports below need it.
try:  # flat files next to the weights (transformers_modules) or inside a package
    from .configuration_gap import LATENT_TOKENS, GapConfig, check_latent_budget
except ImportError:  # imported as a top-level module (tests, `pip install -e .`)
    if __package__:  # the sibling is there but refused to load (transformers outside its range)
        raise
    from configuration_gap import LATENT_TOKENS, GapConfig, check_latent_budget

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.configuration_utils import PreTrainedConfig
from transformers.generation import GenerateDecoderOnlyOutput, LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import MultimodalCausalLMOutputWithPast
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, is_torchdynamo_compiling, logging
from transformers.utils.deprecation import deprecate_kwarg


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100

#: What a latent span feeds back at each pad step (paper Tables 1 and 6):
#: pca (GAP), suppress (no span opens), noise (PCA-Gaussian, norm-matched), hidden (h_bar itself, the
#: output-as-input baseline), hidden_ema (h_bar rescaled to an EMA of the query image's vision-token norms),
#: oracle (the row's true latent targets: the upper bound of reading latents).
LATENT_INTERVENTIONS = ("pca", "suppress", "noise", "hidden", "hidden_ema", "oracle")

#: `GenerationMixin`'s decoding modes that step one token per row per forward, so a span can feed each pad the
#: latent of the step before. Beams reorder rows between steps: they decode text, and refuse a span when one opens.
_BEAM_MODES = ("beam_search", "beam_sample")
_LATENT_DECODING_MODES = ("greedy_search", "sample", *_BEAM_MODES)


@dataclass
class GapCausalLMOutputWithPast(MultimodalCausalLMOutputWithPast):
    r"""Qwen2.5-VL output plus the two loss terms and the latent channel.

    loss: L_LM + lambda * L_latent (only when `labels` are given).
    lm_loss / latent_loss: the two terms, reported separately.
    logits: the usual (batch, seq, vocab) logits; with `supervised_logits_only=True` (and labels), only the
        supervised positions' logits, (n_supervised, vocab), in row-major order (the full tensor is the memory peak).
    supervised_labels: with `supervised_logits_only=True`, the target ids of `logits`' rows, (n_supervised,).
    supervised_mask: with `supervised_logits_only=True`, where those rows sit: (batch, seq), True at position t
        where the (shifted) label t supervises the logits of t (pads and IGNORE_INDEX excluded).
    latent_predictions: v_hat at every ``<|latent_pad|>`` of the input, (n_latent, d), fp32, teacher-forced.
    next_latent: v_hat decoded from the last position's state, (batch, d), fp32: what decoding feeds next.
    next_hidden: h_bar at the last position, (batch, d): the output-as-input baseline's latent.
    """

    lm_loss: torch.FloatTensor | None = None
    latent_loss: torch.FloatTensor | None = None
    supervised_labels: torch.LongTensor | None = None
    supervised_mask: torch.BoolTensor | None = None
    latent_predictions: torch.FloatTensor | None = None
    next_latent: torch.FloatTensor | None = None
    next_hidden: torch.FloatTensor | None = None


class _Fp32Linear(nn.Linear):
    """`nn.Linear` that computes in fp32 even when its weights are stored in a lower precision.

    DeepSpeed ZeRO-3 with bf16 partitions every parameter, the head's included, in bf16 (its optimizer keeps the
    fp32 master copy); the head then still computes in fp32. Called as a module, so ZeRO-3 gathers its weights.
    """

    def forward(self, x):
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


class GapLatentHead(nn.Module):
    r"""F_theta and the PCA decoder of paper Eq. 1 and 16.

    ``latent_head_type="pca"`` (GAP): ``c = proj(h_bar) + down(silu(gate(h_bar)) * up(h_bar))`` with `proj`
    initialised to weight alpha P_k and bias -alpha P_k mu (alpha matches the targets' spread: `set_pca`), `down`
    initialised to zero, and ``v_hat = P_k^T c + mu`` with
    the fixed buffers `pca_mean` (d), `pca_components` (k x d, orthonormal rows) and `pca_eigenvalues` (k).

    ``latent_head_type="full"`` (the LH ablation): the same layout with a d -> d projector and no PCA; the
    output is v_hat itself.

    The head computes in fp32 and refuses dtype casts of its tensors (see `_apply`).
    """

    def __init__(self, config: GapConfig):
        super().__init__()
        d = config.text_config.hidden_size
        self.head_type = config.latent_head_type
        self.hidden_size = d
        # k defaults to d (no truncation) until conversion sets it from the fitted PCA
        out = (config.pca_num_components or d) if self.head_type == "pca" else d
        self.out_features = out
        fp32 = torch.float32  # explicit: the model may be built under another default dtype
        self.proj = _Fp32Linear(d, out, bias=True, dtype=fp32)
        self.gate = _Fp32Linear(d, config.latent_adapter_size, bias=False, dtype=fp32)
        self.up = _Fp32Linear(d, config.latent_adapter_size, bias=False, dtype=fp32)
        self.down = _Fp32Linear(config.latent_adapter_size, out, bias=False, dtype=fp32)
        if self.head_type == "pca":
            self.register_buffer("pca_mean", torch.zeros(d, dtype=torch.float32))
            self.register_buffer("pca_components", torch.zeros(out, d, dtype=torch.float32))
            self.register_buffer("pca_eigenvalues", torch.zeros(out, dtype=torch.float32))
        self.initializer_range = getattr(config.text_config, "initializer_range", 0.02)
        #: checkpoint keys of this head that loading did not find (`from_pretrained`); decoding a span refuses then
        self.missing_keys: list[str] = []

    # -- dtype policy -------------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """Follow device moves but keep floating tensors fp32 (`.to(bf16)`, `.half()`, `.bfloat16()`)."""

        def keep_fp32(tensor):
            moved = fn(tensor)
            if not moved.is_floating_point() or moved.dtype == torch.float32:
                return moved
            if tensor.is_meta or moved.is_meta:
                return moved.float()
            return tensor.to(device=moved.device, dtype=torch.float32)  # from the fp32 source: no rounding

        return super()._apply(keep_fp32, recurse)

    # -- initialisation -----------------------------------------------------------------------------------
    def init_weights(self):
        """Initialise so that, at init, the head *is* the PCA projection (or a random d->d map for `full`).

        Uses `transformers.initialization`, which skips tensors already loaded from a checkpoint. The PCA buffers
        are zero until a basis is installed (also after `to_empty()` from the meta device); conversion installs it
        with `set_pca`, which also scales the projector to the targets' spread (this unscaled copy only serves a
        checkpoint that lacks the projector).
        """
        if self.head_type == "pca":
            for buffer in (self.pca_mean, self.pca_components, self.pca_eigenvalues):
                init.zeros_(buffer)
            init.copy_(self.proj.weight, self.pca_components)
            init.copy_(self.proj.bias, -(self.pca_components @ self.pca_mean))
        else:
            init.normal_(self.proj.weight, mean=0.0, std=self.initializer_range)
            init.zeros_(self.proj.bias)
        init.normal_(self.gate.weight, mean=0.0, std=self.initializer_range)
        init.normal_(self.up.weight, mean=0.0, std=self.initializer_range)
        init.zeros_(self.down.weight)

    @torch.no_grad()
    def set_pca(self, mean, components, eigenvalues, *, reset_projector=True, h_bar_norm=None, atol=1e-4):
        """Install a fitted PCA basis (paper Eq. 5-6) and, by default, re-initialise the head from it.

        mean: (d,), components: (k, d) with orthonormal rows, eigenvalues: (k,) >= 0, descending.
        Works under DeepSpeed ZeRO-3 (partitioned parameters are gathered, written on rank 0, re-scattered).

        The projector starts as ``alpha * P_k`` (App. F: initialised from the PCA basis), bias ``-alpha * P_k mu``.
        `h_bar_norm` is the expected norm of the head's input h_bar (for a final RMSNorm with weight gamma,
        ||gamma||); with it, ``alpha = sqrt(sum(eigenvalues) * d / k) / h_bar_norm``, so that at init the
        coefficients c have the spread of the targets' PCA coefficients (E||c||^2 = sum of the eigenvalues) rather
        than of h_bar. Unscaled (alpha = 1, `h_bar_norm=None`), the first latents are P_k h_bar: as far from the
        vision embeddings' norm as h_bar is (the norm mismatch of paper Sec. 3; 35x in the tiny demo model),
        and the first steps' latent loss and gradients are dominated by shrinking them.
        """
        if self.head_type != "pca":
            raise ValueError("set_pca() applies to `latent_head_type='pca'` only; this head is 'full' (no PCA).")
        mean = torch.as_tensor(mean).detach().to(torch.float64).cpu()
        components = torch.as_tensor(components).detach().to(torch.float64).cpu()
        eigenvalues = torch.as_tensor(eigenvalues).detach().to(torch.float64).cpu()
        d, k = self.hidden_size, self.out_features
        if mean.shape != (d,):
            raise ValueError(f"PCA mean has shape {tuple(mean.shape)}; the model's hidden size is d={d}: expected ({d},).")
        if components.ndim != 2 or components.shape[1] != d:
            raise ValueError(
                f"PCA components have shape {tuple(components.shape)}; expected (k, d={d}). The PCA was fitted on "
                f"vectors of width {components.shape[-1]} but this model's hidden size is {d}: refit it on this "
                f"model's vision embeddings."
            )
        if components.shape[0] != k:
            raise ValueError(
                f"PCA has k={components.shape[0]} components but the config says pca_num_components={k}; build the "
                f"model with pca_num_components={components.shape[0]}."
            )
        if eigenvalues.shape != (k,):
            raise ValueError(f"PCA eigenvalues have shape {tuple(eigenvalues.shape)}; expected ({k},).")
        for name, tensor in (("mean", mean), ("components", components), ("eigenvalues", eigenvalues)):
            if not torch.isfinite(tensor).all():
                raise ValueError(f"PCA {name} contain non-finite values.")
        if (eigenvalues < -atol).any():
            raise ValueError("PCA eigenvalues must be >= 0 (they are variances).")
        gram_error = (components @ components.T - torch.eye(k, dtype=torch.float64)).abs().max().item()
        if gram_error > atol:
            raise ValueError(
                f"PCA components are not orthonormal rows (max |P P^T - I| = {gram_error:.2e} > {atol}); pass the "
                f"eigenvectors as rows (k x d), not columns, and do not scale them."
            )
        if self.pca_components.is_meta:  # a skeleton on the meta device holds no values: nothing to write
            return
        with _gathered(list(self.parameters()), modify=True):
            self.pca_mean.copy_(mean.to(self.pca_mean.device, torch.float32))
            self.pca_components.copy_(components.to(self.pca_components.device, torch.float32))
            self.pca_eigenvalues.copy_(eigenvalues.clamp_min(0).to(self.pca_eigenvalues.device, torch.float32))
            if reset_projector:
                alpha = 1.0
                if h_bar_norm is not None:
                    alpha = math.sqrt(float(self.pca_eigenvalues.sum()) * d / k) / float(h_bar_norm)
                self.proj.weight.copy_(alpha * self.pca_components)
                self.proj.bias.copy_(-alpha * (self.pca_components @ self.pca_mean))
                self.down.weight.zero_()
                self.missing_keys = []  # a fresh head from the basis: no longer a random one

    # -- math ---------------------------------------------------------------------------------------------
    def coefficients(self, h_bar):
        """c = F_theta(h_bar): PCA coefficients (k) for `pca`, the latent itself (d) for `full`. fp32."""
        with torch.autocast(device_type=h_bar.device.type, enabled=False):
            h_bar = h_bar.float()
            return self.proj(h_bar) + self.down(F.silu(self.gate(h_bar)) * self.up(h_bar))

    def decode(self, coeffs):
        """v_hat = P_k^T c + mu (identity for the `full` head). fp32."""
        if self.head_type != "pca":
            return coeffs
        with torch.autocast(device_type=coeffs.device.type, enabled=False):
            return coeffs.float() @ self.pca_components + self.pca_mean

    def forward(self, h_bar):
        """v_hat = decode(F_theta(h_bar)) for final-norm states h_bar (..., d)."""
        return self.decode(self.coefficients(h_bar))


class _gathered:
    """Gather ZeRO-3 partitioned parameters for a write (no-op for ordinary tensors)."""

    def __init__(self, params, modify=False):
        self.params = [p for p in params if hasattr(p, "ds_id")]
        self.modify = modify
        self.context = None

    def __enter__(self):
        if self.params:
            # Only DeepSpeed gives parameters a `ds_id`, so it is installed here. The import sits in `try` because
            # transformers' remote-code check (`dynamic_module_utils.check_imports`) requires every module imported
            # outside a `try` block from whoever loads this file, and loading and generating need no DeepSpeed.
            try:
                import deepspeed
            except ImportError as error:
                raise ImportError(
                    f"{len(self.params)} parameters are partitioned by DeepSpeed ZeRO-3 (they carry `ds_id`) but "
                    f"deepspeed cannot be imported ({error}); run in the environment that partitioned them."
                ) from error
            self.context = deepspeed.zero.GatheredParameters(self.params, modifier_rank=0 if self.modify else None)
            self.context.__enter__()
        return self

    def __exit__(self, *exc):
        if self.context is not None:
            return self.context.__exit__(*exc)
        return False


@dataclass
class GapGenerateOutput(GenerateDecoderOnlyOutput):
    r"""`generate` output (with `return_dict_in_generate=True`) plus the latent channel, per row.

    latents: one tensor per row, (n_spans, K, d): the vectors fed at each ``<|latent_pad|>`` (after the
        intervention), complete spans only; a span cut short by `max_new_tokens` is flagged in `span_truncated`.
    latent_norms: one tensor per row, (n_spans, K): their L2 norms.
    num_latent_spans: (batch,) how many spans each row opened.
    span_truncated: (batch,) True where generation stopped inside a span (`max_new_tokens` ran out).
    head_latents: with the ``oracle`` intervention, one tensor per row laid out like `latents`: what the latent
        head predicted at each pad step from the true latents before it (its teacher-forced output); None
        otherwise (with ``pca`` the head's latents are `latents` themselves).
    """

    latents: list | None = None
    head_latents: list | None = None
    latent_norms: list | None = None
    num_latent_spans: torch.LongTensor | None = None
    span_truncated: torch.BoolTensor | None = None


class GapLatentLogitsProcessor(LogitsProcessor):
    r"""Keeps latent spans well formed, per row and vectorised over the batch.

    After ``<|latent_start|>`` a row is forced through exactly K ``<|latent_pad|>`` tokens and then
    ``<|latent_end|>``; outside a span the pad and end tokens (whose LM rows are untrained) are banned, and so
    is the start token when `ban_start` is set (the `suppress` intervention). Everything is read from the
    last K + 1 tokens of `input_ids`, so no state is kept between steps.
    """

    def __init__(self, start_id, pad_id, end_id, latent_tokens_per_span, ban_start=False):
        self.start_id, self.pad_id, self.end_id = start_id, pad_id, end_id
        self.latent_tokens_per_span = latent_tokens_per_span
        self.ban_start = ban_start

    def span_progress(self, input_ids):
        """(in_span, pads_so_far) per row: whether the row is inside a span and how many pads it has emitted."""
        window = input_ids[:, -(self.latent_tokens_per_span + 1) :]
        is_start = window == self.start_id
        in_span = is_start.any(dim=1)
        last_start = window.shape[1] - 1 - is_start.flip(1).int().argmax(dim=1)
        pads_so_far = window.shape[1] - 1 - last_start
        return in_span, pads_so_far

    def __call__(self, input_ids, scores):
        in_span, pads_so_far = self.span_progress(input_ids)
        force_pad = in_span & (pads_so_far < self.latent_tokens_per_span)
        scores = scores.clone()
        # outside a span: ban pad and end (and start under `suppress`); touches only those columns
        banned = [self.pad_id, self.end_id] + ([self.start_id] if self.ban_start else [])
        scores[:, banned] = scores[:, banned].masked_fill(~in_span[:, None], float("-inf"))
        # inside a span: everything -inf but the forced token (pad or end, both already -inf in free rows)
        scores.masked_fill_(in_span[:, None], float("-inf"))
        forced = torch.where(force_pad, self.pad_id, self.end_id)
        forced_score = torch.where(in_span, 0.0, float("-inf")).to(scores.dtype)
        return scores.scatter_(1, forced[:, None], forced_score[:, None])


class GapLatentState:
    r"""Per-call bookkeeping of latent decoding, carried through `generate`'s model kwargs.

    After every forward it keeps the last position's final-norm state h_bar (`observe`). When the next model
    input holds pads, `latent_embeds_for` decodes the latents of exactly those rows (the head never runs on a
    text step) and returns them as `latent_embeds`, with or without a KV cache (without one, every earlier
    latent is fed again in order).
    """

    def __init__(self, model, intervention, generator=None, ema_beta=0.9, oracle=None, latent_tokens_per_span=None,
                 beam_search=False):
        self.model = model
        self.beam_search = beam_search  # beams reorder rows between steps: text only, a span is refused
        self.intervention = intervention
        self.oracle = oracle  # per row (n_spans, K, d) true latents, for the `oracle` intervention
        self.K = latent_tokens_per_span
        self.pads_fed = None  # per row: pads fed so far (span = n // K, slot = n % K)
        self.head_history = []  # `oracle` only: per generated column, what the head predicted (like `history`)
        self.last_head_latents = None
        self.generator = generator
        self.ema_beta = ema_beta
        self.prompt_length = None
        self.next_hidden = None
        self.history = []  # per generated column: (batch, d) latents fed there (zeros where no pad), or None
        self.ema_norm = None
        self.image_tokens_per_row = None

    def start(self, input_ids, image_token_id):
        self.prompt_length = input_ids.shape[1]
        self.image_tokens_per_row = (input_ids == image_token_id).sum(dim=1)

    def observe(self, outputs):
        if self.intervention == "hidden_ema" and self.ema_norm is None:
            self.ema_norm = self._vision_norm_ema(outputs)
        self.next_hidden = outputs.next_hidden

    def feed(self, h_bar, rows):
        """The latent each of `rows` feeds, from its final-norm state `h_bar` (n, d), per the intervention."""
        head = self.model.latent_head
        if head.missing_keys and self.intervention not in ("hidden", "hidden_ema"):
            raise ValueError(
                f"A latent span opened, but the latent head is random: the checkpoint lacked {head.missing_keys[:4]}. "
                f"Load a GAP checkpoint that carries the head (convert the base with `gap convert`), or pass "
                f"latent_intervention='suppress' to decode text only."
            )
        if self.intervention == "hidden":
            return h_bar.float()
        if self.intervention == "hidden_ema":
            h = h_bar.float()
            return h * (self.ema_norm[rows, None] / h.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        clean = head(h_bar)
        if self.intervention == "oracle":
            self.last_head_latents = clean
            return self._oracle_latents(rows, clean)
        if self.intervention != "noise":
            return clean
        std = head.pca_eigenvalues.clamp_min(0).sqrt()
        noise = torch.randn(clean.shape[0], std.shape[0], generator=self.generator, device=std.device, dtype=torch.float32)
        noisy = head.decode(noise * std)
        return noisy * (clean.norm(dim=-1, keepdim=True) / noisy.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    def _oracle_latents(self, rows, clean):
        """The true latent of each row's current (span, slot); the head's own where a row has no more targets."""
        fed = clean.clone()
        for i, row in enumerate(rows.tolist()):
            span, slot = divmod(int(self.pads_fed[row]), self.K)
            if span < self.oracle[row].shape[0]:
                fed[i] = self.oracle[row][span, slot].to(device=fed.device, dtype=fed.dtype)
        return fed

    def _vision_norm_ema(self, outputs):
        """n_bar per row: EMA (beta) of the prompt's vision-token L2 norms in sequence order (paper §3.1, App. F)."""
        image_outputs = getattr(outputs, "image_outputs", None)
        counts = self.image_tokens_per_row
        if image_outputs is None or counts is None or bool((counts == 0).any()):
            rows = [] if counts is None else (counts == 0).nonzero().flatten().tolist()
            raise ValueError(
                "latent_intervention='hidden_ema' rescales to the query image's vision-token norms, but "
                + (f"rows {rows} of the batch have no image." if rows else "the prompt has no image (pass pixel_values).")
            )
        norms = torch.cat(list(image_outputs.pooler_output), dim=0).float().norm(dim=-1)
        beta = self.ema_beta
        counts = counts.to(norms.device)
        row = torch.repeat_interleave(torch.arange(counts.shape[0], device=norms.device), counts)
        offsets = torch.cumsum(counts, 0) - counts
        index = torch.arange(norms.shape[0], device=norms.device) - offsets[row]  # i within its row
        n_row = counts[row]
        # n_1 = x_1, n_i = beta n_{i-1} + (1 - beta) x_i  =>  n_N = sum_i w_i x_i with the weights below.
        weights = (1 - beta) * beta ** (n_row - 1 - index).double()
        weights = torch.where(index == 0, beta ** (n_row - 1).double(), weights)
        ema = torch.zeros(counts.shape[0], dtype=torch.float64, device=norms.device)
        return ema.index_add_(0, row, weights * norms.double()).float()

    def latent_embeds_for(self, full_input_ids, model_input_ids, pad_id):
        """The `latent_embeds` for `model_input_ids` (the tail of `full_input_ids` the model reads this step)."""
        generated = full_input_ids.shape[1] - self.prompt_length
        if generated > len(self.history):  # a new column: decode the latents of the rows that just emitted a pad
            is_pad = full_input_ids[:, -1] == pad_id
            fed = head_fed = None
            if self.pads_fed is None:
                self.pads_fed = torch.zeros(is_pad.shape[0], dtype=torch.long)
            if bool(is_pad.any()):
                if self.beam_search:
                    raise ValueError(
                        "A latent span opened under beam search: beams reorder rows between steps, which the latents "
                        "fed so far do not follow. Decode latent spans with num_beams=1 (greedy or sampling), or pass "
                        "latent_intervention='suppress' for text-only beam search."
                    )
                rows = is_pad.nonzero().flatten()
                h_bar = self.next_hidden[rows.to(self.next_hidden.device)]
                fed = torch.zeros(is_pad.shape[0], h_bar.shape[-1], dtype=torch.float32, device=h_bar.device)
                fed[rows.to(fed.device)] = self.feed(h_bar, rows.to(fed.device)).float()
                if self.intervention == "oracle":
                    head_fed = torch.zeros_like(fed)
                    head_fed[rows.to(fed.device)] = self.last_head_latents.float()
                self.pads_fed[is_pad.cpu()] += 1
            self.history.append(fed)
            if self.intervention == "oracle":
                self.head_history.append(head_fed)
        pad_mask = model_input_ids == pad_id
        n_generated = min(model_input_ids.shape[1], generated)
        prompt_part = pad_mask[:, : pad_mask.shape[1] - n_generated]
        if bool(prompt_part.any()):
            raise ValueError("The prompt holds <|latent_pad|> tokens; end the prompt before a span, not inside one.")
        gen_mask = pad_mask[:, pad_mask.shape[1] - n_generated :]
        if n_generated == 0 or not bool(gen_mask.any()):
            return None
        feeds = self._stacked(len(self.history) - n_generated, len(self.history))
        return feeds[gen_mask.to(feeds.device)]

    def _stacked(self, begin, end, history=None):
        """History columns [begin, end) as (batch, n, d), zeros where no row fed a latent."""
        columns = (self.history if history is None else history)[begin:end]
        template = next((c for c in columns if c is not None), None)
        if template is None:
            d = self.model.config.text_config.hidden_size
            return torch.zeros(self.next_hidden.shape[0], len(columns), d, device=self.next_hidden.device)
        return torch.stack([torch.zeros_like(template) if c is None else c for c in columns], dim=1)

    def collect(self, sequences, pad_id, processor):
        """Per-row latents (n_spans, K, d), their norms, span counts, whether a row stopped inside a span, and
        (``oracle`` only) the head's own latents laid out the same way."""
        generated = sequences[:, self.prompt_length :]
        # spans opened in the generated part, and one the prompt itself opened (it ends with <|latent_start|>)
        opened_by_prompt = (sequences[:, self.prompt_length - 1] == processor.start_id).long()
        num_spans = (generated == processor.start_id).sum(dim=1) + opened_by_prompt
        in_span, _ = processor.span_progress(sequences)
        ends_with_end = sequences[:, -1] == processor.end_id
        truncated = in_span & ~ends_with_end
        latents = self._spans_per_row(generated, pad_id, processor.latent_tokens_per_span, self.history)
        head_latents = None
        if self.intervention == "oracle":
            head_latents = self._spans_per_row(generated, pad_id, processor.latent_tokens_per_span, self.head_history)
        return latents, [spans.norm(dim=-1) for spans in latents], num_spans, truncated, head_latents

    def _spans_per_row(self, generated, pad_id, K, history):
        """`history`'s vectors at each row's pads, as (n_full_spans, K, d) per row (a span cut short is left out)."""
        batch, d = generated.shape[0], self.model.config.text_config.hidden_size
        n_steps = min(generated.shape[1], len(history))
        feeds = self._stacked(0, n_steps, history) if n_steps else torch.zeros(batch, 0, d)
        is_pad = (generated[:, :n_steps] == pad_id).to(feeds.device)
        spans = []
        for row in range(batch):  # once per call, after decoding: packing per-row outputs
            row_latents = feeds[row][is_pad[row]].float()
            n_full = row_latents.shape[0] // K
            spans.append(row_latents[: n_full * K].reshape(n_full, K, d))
        return spans


def _continues(cache: Cache | None) -> bool:
    """Whether a forward continues a filled KV cache (a decoding step) rather than starting a sequence."""
    return cache is not None and cache.get_seq_length() > 0


class GapForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    r"""Qwen2.5-VL with GAP's visual latent channel.

    Adds `latent_head` (a `GapLatentHead`), the `latent_embeds` forward argument (the input embeddings of the
    ``<|latent_pad|>`` positions, in order), the masked latent loss, and `from_qwen2_5_vl` to convert a
    Qwen2.5-VL checkpoint. With no latent pads in the input it computes exactly what the parent computes.
    """

    config_class = GapConfig
    config: GapConfig
    _keep_in_fp32_modules_strict = ["latent_head"]
    # forward normalises the LM loss by `num_items_in_batch` (and L_latent by `num_latent_items_in_batch`), so the
    # Trainer may pass it (the Qwen2.5-VL parent says False).
    accepts_loss_kwargs = True

    def __init__(self, config: GapConfig):
        super().__init__(config)
        self.latent_head = GapLatentHead(config)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, GapLatentHead):
            module.init_weights()
        else:
            super()._init_weights(module)

    # -- forward (paper §4.2): inject the latents, run the backbone, predict the latents, the LM loss ---------------
    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        latent_embeds: torch.Tensor | None = None,
        latent_targets: torch.Tensor | None = None,
        num_latent_items_in_batch: int | torch.Tensor | None = None,
        return_next_latent: bool = True,
        supervised_logits_only: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | GapCausalLMOutputWithPast:
        r"""Everything `Qwen2_5_VLForConditionalGeneration.forward` takes, plus:

        latent_embeds (`torch.Tensor` of shape `(n_latent, d)`): the input embeddings of the ``<|latent_pad|>``
            positions of `input_ids`, in row-major order: the targets v in training (teacher forcing), the
            previous step's v_hat in decoding. Required whenever `input_ids` holds latent pads.
        latent_targets (`torch.Tensor` of shape `(n_latent, d)`): what L_latent compares the predictions with.
            Defaults to `latent_embeds` (teacher forcing); scheduled sampling feeds other inputs against the same v.
        num_latent_items_in_batch (`int` or `torch.Tensor`): the number of latent positions in the global batch
            (all ranks and accumulation steps); L_latent is the sum over this micro-batch divided by it. Defaults
            to this micro-batch's count.
        num_items_in_batch (in kwargs): the same for the LM loss's supervised tokens.
        shift_labels (in kwargs): labels already shifted, `(batch, seq)`, label t supervising position t's logits
            (the convention of sequence / context parallelism, where a rank cannot shift its shard itself); used
            instead of `labels` for L_LM. L_latent does not read labels.
        return_next_latent (`bool`, defaults to True): decode the latent of the last position into `next_latent`.
            `generate` turns it off (with it, the teacher-forced `latent_predictions` too) and runs the head only
            for the rows that feed a latent at the next step.
        supervised_logits_only (`bool`, defaults to False): with labels, compute and return the logits only at the
            supervised positions, `(n_supervised, vocab)` in row-major order, instead of `(batch, seq, vocab)`: the
            full logits tensor is the memory peak of training (`GapSFTTrainer` turns it on).

        With `supervised_logits_only`, `supervised_labels` holds the target ids of `logits`' rows and
        `supervised_mask` where they sit.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        decoding = labels is None and shift_labels is None and not return_next_latent
        latent_mask = self._latent_mask(input_ids, latent_embeds, cache)
        inputs_embeds = self._inject_latents(input_ids, inputs_embeds, latent_mask, latent_embeds)

        outputs = self.model(
            input_ids=input_ids, pixel_values=pixel_values, pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts,
            mm_token_type_ids=mm_token_type_ids, position_ids=position_ids, attention_mask=attention_mask,
            cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        h_bar = outputs.last_hidden_state  # final RMSNorm output: what the LM head reads (Eq. 15)

        with_labels = labels is not None or shift_labels is not None
        next_hidden = h_bar[:, -1]
        next_latent = self.latent_head(next_hidden) if return_next_latent or with_labels else None
        # Teacher-forced predictions need the state before every pad: not in a decoding step, whose pads' sources
        # sit in the cache (a step continuing a cache only returns `next_latent`).
        teacher_forced = latent_mask is not None and not decoding and not _continues(cache)
        latent_predictions, latent_loss = self._predict_latents(
            h_bar,
            latent_mask if teacher_forced else None,
            None if latent_embeds is None else latent_embeds.shape[0],
            latent_embeds if latent_targets is None else latent_targets,
            num_latent_items_in_batch,
            with_loss=with_labels,
        )

        loss = lm_loss = supervised_labels = supervised_mask = None
        if with_labels:
            if shift_labels is None:
                shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
            logits, supervised_labels, supervised_mask, lm_loss = self._lm_loss(
                h_bar, shift_labels, latent_mask, num_items_in_batch, supervised_logits_only
            )
            loss = lm_loss + self.config.latent_loss_weight * latent_loss.to(lm_loss.device)
        else:
            logits = self.lm_head(slice_logits_to_keep(h_bar, logits_to_keep))

        return GapCausalLMOutputWithPast(
            loss=loss, lm_loss=lm_loss, latent_loss=latent_loss, logits=logits, supervised_labels=supervised_labels,
            supervised_mask=supervised_mask, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions, image_outputs=outputs.image_outputs, video_outputs=outputs.video_outputs,
            latent_predictions=latent_predictions, next_latent=next_latent, next_hidden=next_hidden,
        )

    def _inject_latents(self, input_ids, inputs_embeds, latent_mask, latent_embeds):
        """The input embeddings with `latent_embeds` written at the ``<|latent_pad|>`` positions (Eq. 1's input)."""
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if latent_mask is None:
            return inputs_embeds
        return inputs_embeds.masked_scatter(
            latent_mask.unsqueeze(-1), latent_embeds.to(inputs_embeds.device, inputs_embeds.dtype)
        )

    def _predict_latents(self, h_bar, latent_mask, n_latent, latent_targets, num_latent_items_in_batch, with_loss):
        """(v_hat at every latent pad, L_latent): the pad at position p is predicted from h_bar[p - 1] (Eq. 1),
        and L_latent compares v_hat with `latent_targets` (Eq. 2). Without pads, v_hat is None and L_latent is 0
        (with labels) or None."""
        if latent_mask is not None:
            source_mask = F.pad(latent_mask[:, 1:], (0, 1), value=False)
            # The sources in row-major order; their count is the pads' (checked in `_latent_mask`): a static size,
            # so that the forward traces without a data-dependent shape.
            sources = torch.nonzero_static(source_mask.flatten(), size=n_latent).squeeze(-1)
            latent_predictions = self.latent_head(h_bar.flatten(0, 1)[sources])
            if latent_targets.shape != latent_predictions.shape:
                raise ValueError(
                    f"`latent_targets` has shape {tuple(latent_targets.shape)}; the input holds "
                    f"{latent_predictions.shape[0]} latent pads: pass {tuple(latent_predictions.shape)}."
                )
            return latent_predictions, self._latent_loss(latent_predictions, latent_targets, num_latent_items_in_batch)
        if not with_loss:
            return None, None
        # No latent position: L_latent = 0 (not NaN). The head still runs a second time, on zero rows, and only that
        # call feeds the loss, as when there are latents, so every ZeRO-3 rank gathers the head's parameters the
        # same number of times in forward and in backward.
        return None, self.latent_head(h_bar.new_zeros(0, h_bar.shape[-1])).sum() * 0.0

    def _lm_loss(self, h_bar, shift_labels, latent_mask, num_items_in_batch, supervised_logits_only):
        """(logits, the supervised target ids and where they sit (packed logits only), L_LM) for labels already
        shifted (label t supervises the logits of position t). A ``<|latent_pad|>`` is never an LM target. L_LM is
        the summed cross-entropy divided by `num_items_in_batch` (default: this micro-batch's supervised tokens).
        With `supervised_logits_only` the LM head runs only at the supervised positions (the full logits tensor is
        the memory peak); otherwise the logits are the usual (batch, seq, vocab)."""
        pad_id = self.config.latent_pad_token_id
        not_target = shift_labels == (IGNORE_INDEX if pad_id is None else pad_id)
        if latent_mask is not None:
            not_target = not_target | F.pad(latent_mask[:, 1:], (0, 1), value=False)
        shift_labels = shift_labels.masked_fill(not_target.to(shift_labels.device), IGNORE_INDEX)
        supervised = shift_labels != IGNORE_INDEX
        denominator = num_items_in_batch if num_items_in_batch is not None else supervised.sum().clamp_min(1)
        if supervised_logits_only:
            logits = self.lm_head(slice_logits_to_keep(h_bar, supervised))
            targets = shift_labels[supervised].to(logits.device)
            return logits, targets, supervised, F.cross_entropy(logits.float(), targets, reduction="sum") / denominator
        logits = self.lm_head(h_bar)
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), shift_labels.flatten().to(logits.device), ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return logits, None, None, loss / denominator

    def _latent_mask(self, input_ids, latent_embeds, cache=None):
        """Boolean mask of the ``<|latent_pad|>`` positions that `latent_embeds` fills; None without latents.

        The checks below read tensor values, so they run in eager mode only: under `torch.compile` the forward
        traces without a data-dependent branch (whether latents are given is a question of arguments, not values).
        """
        pad_id = self.config.latent_pad_token_id
        if input_ids is None or pad_id is None:
            if latent_embeds is not None:
                raise ValueError(
                    "`latent_embeds` was given but the latent pads cannot be located: pass `input_ids` "
                    + ("" if pad_id is None else "(not only `inputs_embeds`) ")
                    + ("" if pad_id is not None else "and convert the model so that `config.latent_pad_token_id` is set")
                )
            return None
        latent_mask = input_ids == pad_id
        if not is_torchdynamo_compiling():
            self._check_latent_inputs(latent_mask, latent_embeds, _continues(cache))
        if latent_embeds is None or latent_embeds.shape[0] == 0:
            return None
        return latent_mask

    def _check_latent_inputs(self, latent_mask, latent_embeds, continues_cache):
        """One pad per `latent_embeds` row, finite rows of width d, and no pad a span could not have predicted."""
        pad_id, d = self.config.latent_pad_token_id, self.config.text_config.hidden_size
        n_latent = int(latent_mask.sum())
        if n_latent == 0:
            if latent_embeds is not None and latent_embeds.shape[0] != 0:
                raise ValueError(
                    f"`latent_embeds` holds {latent_embeds.shape[0]} vectors but `input_ids` has no "
                    f"<|latent_pad|> token (id {pad_id}); expand each `<latent>` into a span with the processor."
                )
            return
        if latent_embeds is None:
            raise ValueError(
                f"`input_ids` holds {n_latent} <|latent_pad|> tokens but no `latent_embeds` were given: pass one "
                f"vector of width d={d} per pad (the targets in training, the predicted latents in decoding)."
            )
        if latent_embeds.ndim != 2 or latent_embeds.shape[0] != n_latent:
            raise ValueError(
                f"`latent_embeds` has shape {tuple(latent_embeds.shape)} but `input_ids` holds {n_latent} "
                f"<|latent_pad|> tokens: pass ({n_latent}, {d}), one row per pad in row-major order."
            )
        if latent_embeds.shape[1] != d:
            raise ValueError(
                f"`latent_embeds` rows have width {latent_embeds.shape[1]}, but the model's hidden size is d={d}: "
                f"the targets must come from this model's vision tower (after the patch merger)."
            )
        if not torch.isfinite(latent_embeds).all():
            bad = (~torch.isfinite(latent_embeds)).any(-1).nonzero().flatten().tolist()
            raise ValueError(f"`latent_embeds` rows {bad[:10]} contain NaN or inf; recompute those latent targets.")
        if not continues_cache and latent_mask[:, 0].any():
            raise ValueError(
                "A <|latent_pad|> sits at the first position of a row: no earlier state can predict it. A span "
                "must start with <|latent_start|>."
            )

    def _latent_loss(self, v_hat, v, num_latent_items_in_batch):
        """Eq. 2 in fp32: squared error per latent position ('mean' over d or 'sum' over d), summed over
        positions and divided by the number of latent positions of the (global) batch."""
        squared_error = (v_hat - v.to(v_hat.device, torch.float32)).pow(2)
        per_position = squared_error.sum(-1) if self.config.latent_loss_reduction == "sum" else squared_error.mean(-1)
        if num_latent_items_in_batch is None:
            num_latent_items_in_batch = per_position.shape[0]
        return per_position.sum() / num_latent_items_in_batch

    # -- generation ---------------------------------------------------------------------------------------
    def generate(
        self,
        inputs=None,
        generation_config=None,
        logits_processor=None,
        *,
        latent_intervention="pca",
        latent_tokens_per_span=None,
        latent_generator=None,
        hidden_ema_beta=0.9,
        latent_oracle=None,
        **kwargs,
    ):
        r"""`GenerationMixin.generate` with visual latent spans.

        When a row emits ``<|latent_start|>`` it is forced through exactly K ``<|latent_pad|>`` steps, each fed
        (through `forward`'s `latent_embeds`, reading the prefix from the KV cache) the latent decoded from the
        previous step's state, then ``<|latent_end|>``; rows enter and leave spans independently. Everything
        `GenerationMixin` offers for greedy and sampling decoding keeps working (batches with left padding,
        streamers, stopping criteria, `generation_config`, `max_new_tokens`, `use_cache=False`).

        Args:
            latent_intervention: what a pad step feeds (paper Tables 1 and 6): ``"pca"`` (default, GAP:
                v_hat = P_k^T F(h_bar) + mu), ``"suppress"`` (``<|latent_start|>`` banned: no span opens),
                ``"noise"`` (c ~ N(0, diag(eigenvalues)), reconstructed, rescaled to the clean latent's norm),
                ``"hidden"`` (h_bar itself, the output-as-input baseline), ``"hidden_ema"`` (h_bar rescaled to an
                EMA, `hidden_ema_beta`, of the query image's vision-token norms), ``"oracle"`` (the row's true
                latents from `latent_oracle`: the upper bound of reading latents; against ``"pca"`` it tells
                whether writing or reading latents limits a model).
            latent_tokens_per_span: override K for this call (a perfect square; the budget sweep of Table 10).
            latent_generator: a `torch.Generator` for the `noise` intervention (seed it to repeat a run).
            latent_oracle: for ``"oracle"``: per batch row, a tensor (n_spans, K, d) (or (K, d) for one span) of the
                row's latent targets, fed in order; past its last span a row feeds the head's own latents.

        With `return_dict_in_generate=True` the result is a `GapGenerateOutput` holding, per row, the fed
        latents, their norms, the number of spans and whether `max_new_tokens` ran out inside a span.
        """
        if self.config.latent_token_ids is None:
            raise ValueError("This model has no latent token ids; convert it with `from_qwen2_5_vl` first.")
        if latent_intervention not in LATENT_INTERVENTIONS:
            raise ValueError(f"`latent_intervention` must be one of {LATENT_INTERVENTIONS}, got {latent_intervention!r}.")
        if latent_intervention == "noise" and self.latent_head.head_type != "pca":
            raise ValueError("The `noise` intervention samples from the PCA eigenvalues; this model's head is 'full'.")
        if not 0.0 <= hidden_ema_beta < 1.0:
            raise ValueError(f"`hidden_ema_beta` must be in [0, 1), got {hidden_ema_beta}.")
        K = self.config.latent_tokens_per_span if latent_tokens_per_span is None else latent_tokens_per_span
        check_latent_budget(K, "latent_tokens_per_span")
        oracle = self._check_oracle(latent_intervention, latent_oracle, K, inputs, kwargs)
        mode = self._decoding_mode(generation_config, kwargs)

        start_id, pad_id, end_id = self.config.latent_token_ids
        span_processor = GapLatentLogitsProcessor(start_id, pad_id, end_id, K, ban_start=latent_intervention == "suppress")
        processors = LogitsProcessorList(list(logits_processor or []) + [span_processor])
        if mode not in _LATENT_DECODING_MODES:
            if latent_intervention != "suppress":
                raise ValueError(
                    f"Latent spans cannot be decoded with {mode}: it verifies or scores several tokens per forward "
                    f"(or runs a decoding loop from the Hub), while a span feeds each <|latent_pad|> the latent of "
                    f"the step before. Decode spans with greedy, sampling or beam search, or pass "
                    f"latent_intervention='suppress' to decode text only (no span opens) with {mode}."
                )
            return super().generate(inputs, generation_config=generation_config, logits_processor=processors, **kwargs)
        state = GapLatentState(self, latent_intervention, generator=latent_generator, ema_beta=hidden_ema_beta,
                               oracle=oracle, latent_tokens_per_span=K, beam_search=mode in _BEAM_MODES)
        output = super().generate(
            inputs, generation_config=generation_config, logits_processor=processors, gap_latent_state=state, **kwargs
        )
        if not isinstance(output, GenerateDecoderOnlyOutput):
            return output
        latents, norms, num_spans, truncated, head_latents = state.collect(output.sequences, pad_id, span_processor)
        return GapGenerateOutput(
            **{key: value for key, value in output.items()},
            latents=latents,
            head_latents=head_latents,
            latent_norms=norms,
            num_latent_spans=num_spans,
            span_truncated=truncated,
        )

    def _decoding_mode(self, generation_config, kwargs) -> str:
        """The decoding mode `GenerationMixin.generate` will run for these arguments (its own rule), or
        ``"custom_generate"`` for a decoding loop from the Hub."""
        if kwargs.get("custom_generate") is not None:
            return "custom_generate"
        config = copy.deepcopy(self.generation_config if generation_config is None else generation_config)
        config.update(**{key: value for key, value in kwargs.items() if hasattr(config, key)})
        return config.get_generation_mode(kwargs.get("assistant_model")).value

    def _check_oracle(self, intervention, latent_oracle, K, inputs, kwargs):
        """`latent_oracle` as a list of (n_spans, K, d) fp32 tensors, one per batch row (``oracle`` only)."""
        if intervention != "oracle":
            if latent_oracle is not None:
                raise ValueError(f"`latent_oracle` is only read by latent_intervention='oracle', not {intervention!r}.")
            return None
        if latent_oracle is None:
            raise ValueError("latent_intervention='oracle' feeds the rows' true latents: pass `latent_oracle`.")
        input_ids = kwargs.get("input_ids", inputs)
        batch = input_ids.shape[0] if input_ids is not None else len(latent_oracle)
        d = self.config.text_config.hidden_size
        rows = [torch.as_tensor(r, dtype=torch.float32) for r in latent_oracle]
        rows = [r[None] if r.dim() == 2 else r for r in rows]
        if len(rows) != batch or any(r.dim() != 3 or tuple(r.shape[1:]) != (K, d) for r in rows):
            shapes = [tuple(r.shape) for r in rows]
            raise ValueError(f"`latent_oracle` needs one (n_spans, {K}, {d}) tensor per batch row ({batch} rows); "
                             f"got shapes {shapes}.")
        return rows

    def prepare_inputs_for_generation(self, input_ids, gap_latent_state=None, **kwargs):
        """Adds `latent_embeds` for the pads among this step's input ids (latents come from `gap_latent_state`)."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        if gap_latent_state is not None:
            if gap_latent_state.prompt_length is None:
                gap_latent_state.start(input_ids, self.config.image_token_id)
            step_ids = model_inputs.get("input_ids")
            if step_ids is None:
                raise ValueError("Latent decoding needs `input_ids` (not only `inputs_embeds`) to locate the pads.")
            model_inputs["latent_embeds"] = gap_latent_state.latent_embeds_for(
                input_ids, step_ids, self.config.latent_pad_token_id
            )
            model_inputs["return_next_latent"] = False
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        """Also let the latent state see this step's output (the next latent to feed)."""
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if (state := model_kwargs.get("gap_latent_state")) is not None:
            state.observe(outputs)
        return model_kwargs

    # -- loading, saving, conversion ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained` that never leaves the latent head silently random.

        A plain Qwen2.5-VL checkpoint must be converted first (`from_qwen2_5_vl` / `gap convert`). A GAP
        checkpoint without latent-head weights loads as every transformers model does (the keys are reported in
        `missing_keys` with `output_loading_info=True`) with a warning naming them, and `generate` refuses to
        decode a latent span from that random head (`latent_intervention="suppress"` still decodes text).
        """
        if kwargs.get("config") is None and pretrained_model_name_or_path is not None:
            config_dict, _ = PreTrainedConfig.get_config_dict(
                pretrained_model_name_or_path, **{k: kwargs[k] for k in ("revision", "cache_dir", "token") if k in kwargs}
            )
            if config_dict.get("model_type") != GapConfig.model_type:
                raise ValueError(
                    f"{pretrained_model_name_or_path} holds a '{config_dict.get('model_type')}' checkpoint, not a GAP "
                    f"one. Convert it first: `GapForConditionalGeneration.from_qwen2_5_vl(path, tokenizer, pca)` or "
                    f"`gap convert`."
                )
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        missing = sorted(key for key in info["missing_keys"] if "latent_head." in key)
        if missing:
            model.latent_head.missing_keys = missing
            logger.warning(
                f"{pretrained_model_name_or_path} lacks latent-head weights {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''}: the latent head is random, and `generate` refuses to decode a "
                f"latent span with it. A GAP checkpoint carries them: convert the base model with "
                f"`GapForConditionalGeneration.from_qwen2_5_vl` (or `gap convert`), or install a PCA with "
                f"`model.latent_head.set_pca(...)` before training."
            )
        return (model, info) if want_info else model

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """`PreTrainedModel.resize_token_embeddings` that refuses a size dropping the latent tokens' rows."""
        ids = self.config.latent_token_ids
        if ids is not None and new_num_tokens is not None:
            size = new_num_tokens
            if pad_to_multiple_of is not None:
                size = math.ceil(new_num_tokens / pad_to_multiple_of) * pad_to_multiple_of
            if size <= max(ids):
                raise ValueError(
                    f"Resizing the token embeddings to {size} rows would drop the latent tokens (ids {ids}): keep at "
                    f"least {max(ids) + 1} rows (a GAP vocabulary can grow, not lose its latent tokens)."
                )
        return super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also map `AutoModel` to this class, so all three Auto classes resolve to GAP from the folder."""
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map["AutoModel"] = f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"
        self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_qwen2_5_vl(
        cls,
        base,
        tokenizer=None,
        pca=None,
        *,
        latent_tokens_per_span=36,
        latent_head_type="pca",
        latent_adapter_size=1024,
        latent_loss_weight=1.0,
        latent_loss_reduction="mean",
        **from_pretrained_kwargs,
    ):
        """Convert a Qwen2.5-VL model (instance or folder) into GAP; returns `(model, tokenizer)`.

        * adds ``<|latent_start|>``, ``<|latent_pad|>``, ``<|latent_end|>`` to the tokenizer if missing;
        * grows the embedding matrix only if the new ids do not fit (never shrinks: Qwen2.5-VL-7B keeps its
          152,064 rows), and sets the new ids' rows of `embed_tokens` (and of an untied `lm_head`) to the mean
          of the tokenizer's existing rows;
        * stores the ids, K, k, lambda and the loss reduction in a `GapConfig`;
        * builds the latent head from `pca` (an object with `mean`, `components`, `eigenvalues`, a mapping with
          those keys, or a path to a `pca.safetensors`); required for `latent_head_type="pca"`.
        The base weights are reused, not copied, when `base` is an instance.
        """
        if isinstance(base, (str, bytes)) or hasattr(base, "__fspath__"):
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(base)
            base = Qwen2_5_VLForConditionalGeneration.from_pretrained(base, **from_pretrained_kwargs)
        if tokenizer is None:
            raise ValueError("Pass the base model's tokenizer (or a folder path as `base`) so the latent tokens can be added.")
        if not isinstance(base, Qwen2_5_VLForConditionalGeneration):
            raise TypeError(f"`base` must be a Qwen2_5_VLForConditionalGeneration or a folder, got {type(base).__name__}.")
        pca = _as_pca(pca) if pca is not None else None
        if latent_head_type == "pca" and pca is None:
            raise ValueError("`latent_head_type='pca'` needs the fitted PCA (`gap fit-pca` writes pca.safetensors).")

        n_known_tokens = len(tokenizer)
        missing_tokens = [t for t in LATENT_TOKENS if t not in tokenizer.get_vocab()]
        if missing_tokens:
            tokenizer.add_tokens(missing_tokens, special_tokens=True)
        start_id, pad_id, end_id = tokenizer.convert_tokens_to_ids(list(LATENT_TOKENS))

        config_dict = base.config.to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version"):
            config_dict.pop(key, None)
        config_dict["text_config"]["vocab_size"] = max(base.config.text_config.vocab_size, max(start_id, pad_id, end_id) + 1)
        config = GapConfig(
            **config_dict,
            latent_tokens_per_span=latent_tokens_per_span,
            latent_head_type=latent_head_type,
            pca_num_components=None if pca is None else int(pca["components"].shape[0]),
            latent_adapter_size=latent_adapter_size,
            latent_loss_weight=latent_loss_weight,
            latent_loss_reduction=latent_loss_reduction,
            latent_start_token_id=start_id,
            latent_pad_token_id=pad_id,
            latent_end_token_id=end_id,
        )
        config.architectures = [cls.__name__]
        with init.no_init_weights():
            model = cls(config)
        _load_base_weights(model, base)

        with torch.no_grad():
            new_ids = torch.tensor([start_id, pad_id, end_id])
            heads = [model.get_input_embeddings().weight]
            if not config.tie_word_embeddings:
                heads.append(model.lm_head.weight)
            for weight in heads:
                mean_row = weight[:n_known_tokens].float().mean(0)
                weight[new_ids.to(weight.device)] = mean_row.to(weight.dtype)
            _init_head_from_scratch(model.latent_head, config)
            if pca is not None:  # ||h_bar|| = ||gamma|| of the final RMSNorm
                model.latent_head.set_pca(pca["mean"], pca["components"], pca["eigenvalues"],
                                          h_bar_norm=model.model.language_model.norm.weight.float().norm())
        model.generation_config = base.generation_config
        model.eval() if not base.training else model.train()
        return model, tokenizer


def _load_base_weights(model, base):
    """Put `base`'s weights into the GAP `model` (reused, not copied; the embedding and an untied LM head grown to
    the GAP vocabulary when the latent ids do not fit), then tie and move to the base's device."""
    base_state = base.state_dict()
    old_vocab, new_vocab = base.config.text_config.vocab_size, model.config.text_config.vocab_size
    if new_vocab > old_vocab:  # grow: copy the old rows into freshly allocated matrices
        for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            if key in base_state:
                grown = base_state[key].new_empty(new_vocab, base_state[key].shape[1])
                grown[:old_vocab] = base_state[key]
                base_state[key] = grown
    incompatible = model.load_state_dict(base_state, strict=False, assign=True)
    unexpected = list(incompatible.unexpected_keys)
    missing = [key for key in incompatible.missing_keys if not key.startswith("latent_head.")]
    if unexpected or missing:
        raise ValueError(f"Base weights do not fit Qwen2.5-VL's layout: missing {missing[:4]}, unexpected {unexpected[:4]}.")
    model.tie_weights()
    model.to(base.device)  # non-persistent buffers and the (fp32) latent head follow the base's device


def _init_head_from_scratch(head, config):
    """Random adapter weights (down = 0) for a head built under `no_init_weights`."""
    std = getattr(config.text_config, "initializer_range", 0.02)
    nn.init.normal_(head.gate.weight, std=std)
    nn.init.normal_(head.up.weight, std=std)
    nn.init.zeros_(head.down.weight)
    nn.init.normal_(head.proj.weight, std=std)
    nn.init.zeros_(head.proj.bias)


def _as_pca(pca):
    """Normalise a PCA given as a path, mapping or object to a dict of tensors."""
    if isinstance(pca, (str, bytes)) or hasattr(pca, "__fspath__"):
        from safetensors.torch import load_file  # a dependency of transformers itself

        pca = load_file(str(pca))
    get = pca.__getitem__ if isinstance(pca, dict) else lambda key: getattr(pca, key)
    try:
        return {key: torch.as_tensor(get(key)) for key in ("mean", "components", "eigenvalues")}
    except (KeyError, AttributeError) as error:
        raise ValueError(f"The PCA must provide `mean`, `components` and `eigenvalues`; missing {error}.") from None


GapConfig.register_for_auto_class()
GapForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")


__all__ = [
    "GapCausalLMOutputWithPast",
    "GapForConditionalGeneration",
    "GapGenerateOutput",
    "GapLatentHead",
    "GapLatentLogitsProcessor",
    "LATENT_INTERVENTIONS",
]
