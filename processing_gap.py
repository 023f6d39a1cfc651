"""Processor of GAP (Granular Alignment Paradigm) models on top of Qwen2.5-VL.

`GapProcessor` is an image-only `Qwen2_5_VLProcessor` that also knows the latent channel:

* ``latent_tokens_per_span`` (K) is saved in ``processor_config.json`` and read back;
* every ``<latent>`` placeholder in the text it is given becomes one latent span,
  ``<|latent_start|>`` + K x ``<|latent_pad|>`` + ``<|latent_end|>`` (paper App. I), next to the usual
  expansion of ``<|image_pad|>`` into one token per merged vision token;
* it ships a ChatML chat template (`GAP_CHAT_TEMPLATE`) that wraps assistant turns in
  ``{% generation %}`` so ``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks the tokens a
  model is trained on, latent spans included;
* `encode_conversation` turns one conversation into token ids and an assistant mask from precomputed
  image grids (no image processing), which is what the training collator uses;
* `decode` / `batch_decode` show each latent span compactly as ``<latent×K>`` unless
  ``show_latent_tokens=True``.

The tokenizer must already hold the three latent tokens (conversion adds them to tokenizer and model
together); the processor never adds them. There is no video processor: Qwen2.5-VL video processors need
torchvision and GAP never feeds videos.

This file imports only `torch`, `transformers` and its sibling files, so it ships as remote code.
"""

import re

# configuration_gap first: it checks the transformers version before the imports below need it.
try:  # flat files next to the weights (transformers_modules) or inside a package
    from .configuration_gap import LATENT_TOKENS, check_latent_budget, check_latent_tokens
except ImportError:  # imported as a top-level module (tests, `pip install -e .`)
    if __package__:  # the sibling is there but refused to load (transformers outside its range)
        raise
    from configuration_gap import LATENT_TOKENS, check_latent_budget, check_latent_tokens

from transformers import Qwen2_5_VLProcessor
from transformers.utils.chat_template_utils import render_jinja_template


#: What marks a latent span in assistant text before expansion.
LATENT_PLACEHOLDER = "<latent>"

#: ChatML as Qwen2.5-VL renders it (default system turn, one vision block per image, optional
#: "Picture n: " labels with ``add_vision_id=True``), with the assistant content and its closing
#: ``<|im_end|>`` inside ``{% generation %}`` so they are what training supervises. An item's ``type`` decides
#: how it renders (so an Arrow-unified text item with an ``"image": None`` key stays text); items of other
#: types (video, audio) are refused.
GAP_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}"
    "{{- content -}}"
    "{%- else -%}"
    "{%- for item in content -%}"
    "{%- if item['type'] -%}{%- set kind = item['type'] -%}"
    "{%- elif 'image' in item or 'image_url' in item -%}{%- set kind = 'image' -%}"
    "{%- elif 'video' in item -%}{%- set kind = 'video' -%}"
    "{%- else -%}{%- set kind = 'text' -%}{%- endif -%}"
    "{%- if kind == 'image' or kind == 'image_url' -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' ~ image_count.value ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif kind == 'text' -%}"
    "{{- item['text'] or '' -}}"
    "{%- else -%}"
    "{{- raise_exception('GAP processors are image-only and render text and images; got a ' ~ kind ~ ' item.') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}"
    "{{- render_content(message['content']) -}}"
    "{{- '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- render_content(message['content']) -}}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

_COMPACT_SPAN = "<latent×{}>"
_COMPACT_UNFINISHED_SPAN = "<latent×{}…>"


class GapProcessor(Qwen2_5_VLProcessor):
    r"""Image-only Qwen2.5-VL processor with GAP's latent spans.

    Args:
        image_processor: a Qwen2-VL image processor (the PIL one works without torchvision).
        tokenizer: a Qwen2.5-VL tokenizer that holds ``<|latent_start|>``, ``<|latent_pad|>`` and
            ``<|latent_end|>`` (a `ValueError` otherwise: use the tokenizer saved by the conversion).
        chat_template: defaults to `GAP_CHAT_TEMPLATE`.
        latent_tokens_per_span: K, a positive perfect square (36 in the paper).

    Text given to the processor (directly or through `apply_chat_template`) has each ``<latent>`` replaced by
    ``<|latent_start|>`` + K x ``<|latent_pad|>`` + ``<|latent_end|>``; latent tokens are text for M-RoPE
    (``mm_token_type_ids`` 0).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, latent_tokens_per_span=36, **kwargs):
        if tokenizer is None:
            raise ValueError("GapProcessor needs a tokenizer that holds the GAP latent tokens.")
        check_latent_budget(latent_tokens_per_span)
        start_id, pad_id, end_id = check_latent_tokens(tokenizer)
        if chat_template is None:
            chat_template = GAP_CHAT_TEMPLATE
        # The sub-processors are read from this signature (ProcessorMixin.get_attributes); leaving
        # `video_processor` out of it is what makes the processor image-only.
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
        self.latent_tokens_per_span = latent_tokens_per_span
        self.latent_start_token_id = start_id
        self.latent_pad_token_id = pad_id
        self.latent_end_token_id = end_id

    # -- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_qwen2_5_vl_processor(cls, base_processor, tokenizer=None, latent_tokens_per_span=36, chat_template=None):
        """A GapProcessor with `base_processor`'s image processor and `tokenizer` (default: the base's).

        `tokenizer` must already hold the latent tokens (`GapForConditionalGeneration.from_qwen2_5_vl` returns
        such a tokenizer). The chat template defaults to `GAP_CHAT_TEMPLATE` and is also set on the tokenizer,
        so tokenizer-only code renders conversations the same way.
        """
        image_processor = getattr(base_processor, "image_processor", None)
        if image_processor is None:
            raise ValueError(
                f"`base_processor` ({type(base_processor).__name__}) has no image processor; pass a Qwen2.5-VL "
                "processor (e.g. gap_pipeline.qwen_processor.load_qwen2_5_vl_processor(path))."
            )
        if tokenizer is None:
            tokenizer = base_processor.tokenizer
        template = GAP_CHAT_TEMPLATE if chat_template is None else chat_template
        processor = cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=template,
            latent_tokens_per_span=latent_tokens_per_span,
        )
        tokenizer.chat_template = template
        return processor

    # -- latent spans --------------------------------------------------------------------------------------
    @property
    def latent_token_ids(self):
        """(start, pad, end) ids of the latent tokens."""
        return self.latent_start_token_id, self.latent_pad_token_id, self.latent_end_token_id

    def latent_span_text(self, num_tokens=None):
        """The text of one latent span: ``<|latent_start|>`` + K x ``<|latent_pad|>`` + ``<|latent_end|>``."""
        k = self.latent_tokens_per_span if num_tokens is None else num_tokens
        start, pad, end = LATENT_TOKENS
        return start + pad * k + end

    def _expand_latents_with_offsets(self, text):
        span = self.latent_span_text()
        expanded, offsets = [], []
        for sample in text:
            pieces, sample_offsets, last, gained = [], [], 0, 0
            for match in re.finditer(re.escape(LATENT_PLACEHOLDER), sample):
                start, end = match.span()
                pieces.append(sample[last:start])
                pieces.append(span)
                new_start = start + gained
                sample_offsets.append(
                    {
                        "type": "latent",
                        "span": (start, end),
                        "new_span": (new_start, new_start + len(span)),
                        "text": LATENT_PLACEHOLDER,
                        "replacement": span,
                    }
                )
                gained += len(span) - (end - start)
                last = end
            pieces.append(sample[last:])
            expanded.append("".join(pieces))
            offsets.append(sample_offsets)
        return expanded, offsets

    def get_text_with_replacements(self, text, images_replacements=(), videos_replacements=(), audio_replacements=()):
        """Expand ``<latent>`` placeholders, then image (and video) placeholders as Qwen2.5-VL does.

        The returned offsets cover both expansions, in text order, with ``span`` in the original text and
        ``new_span`` in the expanded one, so assistant masks stay aligned (`apply_chat_template`).
        """
        text, latent_offsets = self._expand_latents_with_offsets(list(text))
        text, mm_offsets = super().get_text_with_replacements(
            text, list(images_replacements), list(videos_replacements), list(audio_replacements)
        )
        if not mm_offsets:
            mm_offsets = [[] for _ in text]
        return text, [_compose_offsets(latent, mm) for latent, mm in zip(latent_offsets, mm_offsets)]

    # -- training encodings --------------------------------------------------------------------------------
    def image_token_counts(self, image_grid_thw):
        """Number of ``<|image_pad|>`` tokens of each image, from its (t, h, w) patch grid."""
        merge = self.image_processor.merge_size**2
        return [int(t) * int(h) * int(w) // merge for t, h, w in (tuple(row) for row in _as_rows(image_grid_thw))]

    def encode_conversation(self, messages, image_grid_thw=None, add_generation_prompt=False):
        """Token ids and assistant mask of one conversation, with image pads sized from `image_grid_thw`.

        Renders `messages` with the chat template, expands latent placeholders and each image's pads (one per
        merged vision token of the matching row of `image_grid_thw`), and tokenizes. Equal to
        ``apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)``
        with the images themselves, without running the image processor.

        Returns ``{"input_ids": list[int], "assistant_masks": list[int]}``; the mask is 1 on every token of an
        assistant turn's content and its closing ``<|im_end|>``.
        """
        template = self._resolve_chat_template(None)
        rendered, generation_indices = render_jinja_template(
            conversations=[messages],
            chat_template=template,
            return_assistant_tokens_mask=True,
            add_generation_prompt=add_generation_prompt,
            **self.tokenizer.special_tokens_map,
        )
        counts = self.image_token_counts(image_grid_thw) if image_grid_thw is not None else []
        n_image_blocks = rendered[0].count(self.image_token)
        if n_image_blocks != len(counts):
            raise ValueError(
                f"The conversation has {n_image_blocks} image(s) but `image_grid_thw` describes {len(counts)}; "
                "give one grid row per {'type': 'image'} entry, in order."
            )
        replacements = [self.image_token * n for n in counts]
        text, offsets = self.get_text_with_replacements(rendered, replacements)
        bos = self.tokenizer.bos_token
        encoded = self.tokenizer(
            text,
            return_offsets_mapping=True,
            add_special_tokens=not (bos is not None and text[0].startswith(bos)),
        )
        processed = {
            "input_ids": encoded["input_ids"],
            "offset_mapping": encoded["offset_mapping"],
            "text_replacement_offsets": offsets,
        }
        processed = self._adjust_assistant_masks_indices(processed, generation_indices)
        return {"input_ids": processed["input_ids"][0], "assistant_masks": processed["assistant_masks"][0]}

    # -- decoding ------------------------------------------------------------------------------------------
    def decode(self, token_ids, *args, show_latent_tokens=False, **kwargs):
        """Decode like the tokenizer, with each latent span shown as ``<latent×K>``.

        A span cut off before ``<|latent_end|>`` shows as ``<latent×n…>``. ``show_latent_tokens=True`` decodes
        every latent token as the tokenizer does (``skip_special_tokens=True`` then drops them).
        """
        if show_latent_tokens:
            return self.tokenizer.decode(token_ids, *args, **kwargs)
        ids = _as_id_list(token_ids)
        start_id, pad_id, end_id = self.latent_token_ids
        pieces, segment, i = [], [], 0
        while i < len(ids):
            if ids[i] != start_id:
                segment.append(ids[i])
                i += 1
                continue
            j = i + 1
            while j < len(ids) and ids[j] == pad_id:
                j += 1
            finished = j < len(ids) and ids[j] == end_id
            if segment:
                pieces.append(self.tokenizer.decode(segment, *args, **kwargs))
                segment = []
            pieces.append((_COMPACT_SPAN if finished else _COMPACT_UNFINISHED_SPAN).format(j - i - 1))
            i = j + 1 if finished else j
        if segment or not pieces:
            pieces.append(self.tokenizer.decode(segment, *args, **kwargs))
        return "".join(pieces)

    def batch_decode(self, sequences, *args, show_latent_tokens=False, **kwargs):
        """`decode` for each sequence of a batch."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(seq, *args, show_latent_tokens=show_latent_tokens, **kwargs) for seq in sequences]

    def post_process_image_text_to_text(
        self, generated_outputs, skip_special_tokens=True, clean_up_tokenization_spaces=False, **kwargs
    ):
        """Decoded generations (latent spans shown as ``<latent×K>``, see `decode`)."""
        return self.batch_decode(
            generated_outputs,
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )


def _as_id_list(token_ids):
    if hasattr(token_ids, "tolist"):
        token_ids = token_ids.tolist()
    if isinstance(token_ids, int):
        return [token_ids]
    return list(token_ids)


def _as_rows(grid):
    if hasattr(grid, "tolist"):
        grid = grid.tolist()
    rows = list(grid)
    for row in rows:
        if len(row) != 3:
            raise ValueError(f"`image_grid_thw` rows must be (t, h, w), got {row!r}.")
    return rows


def _compose_offsets(first, second):
    """Offsets of two successive expansions, re-expressed from the original text to the final one.

    `first` maps original -> intermediate text, `second` intermediate -> final. Placeholders of the two
    passes never overlap.
    """
    merged = []
    for entry in first:  # shift its new span by what `second` gained before it
        gained = _cumulative_gain(second, entry["new_span"][0])
        merged.append({**entry, "new_span": (entry["new_span"][0] + gained, entry["new_span"][1] + gained)})
    for entry in second:  # move its old span back by what `first` gained before it
        lost = _cumulative_gain(first, entry["span"][0], in_new_text=True)
        merged.append({**entry, "span": (entry["span"][0] - lost, entry["span"][1] - lost)})
    merged.sort(key=lambda r: r["span"][0])
    return merged


def _cumulative_gain(offsets, position, in_new_text=False):
    """Characters gained by the replacements of `offsets` that end at or before `position`."""
    gained = 0
    for r in offsets:
        end = r["new_span"][1] if in_new_text else r["span"][1]
        if end <= position:
            gained += (r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0])
    return gained


GapProcessor.register_for_auto_class()

__all__ = ["GAP_CHAT_TEMPLATE", "LATENT_PLACEHOLDER", "GapProcessor"]
