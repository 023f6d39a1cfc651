"""Tiny, random Qwen2.5-VL checkpoints built entirely in code.

Tests, CI and the CPU demo need a real ``Qwen2_5_VLForConditionalGeneration`` with a
real tokenizer, processor and chat template, but nothing may be downloaded.  This
module makes one from scratch, deterministically:

* :func:`build_tiny_tokenizer` trains a small byte-level BPE (the Qwen2 pre-tokenizer,
  a few hundred merges) on a built-in English corpus and adds the Qwen2.5-VL special
  tokens and a Qwen2.5-VL-style chat template.  Any text round-trips.
* :func:`tiny_qwen2_5_vl_config` gives a two-layer, 64-wide text model and a two-block
  vision tower, with every special-token id read from the tokenizer.
* :func:`build_tiny_processor` pairs the tokenizer with the PIL image processor so that a
  112 x 112 image becomes an 8 x 8 patch grid, i.e. 16 merged vision tokens.
* :func:`build_tiny_base_model` and :func:`save_tiny_base_checkpoint` give the model in
  memory or as a checkpoint folder loadable with ``from_pretrained``.

The latent tokens of GAP are *not* part of this tokenizer: converting a base checkpoint
to GAP adds them, exactly as it would for the real Qwen2.5-VL.

Command line: ``gap tiny-model --output-dir DIR`` (see :func:`add_arguments`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from . import GapError
from .qwen_processor import ImageOnlyQwen2_5_VLProcessor, load_qwen2_5_vl_processor

__all__ = [
    "QWEN2_5_VL_SPECIAL_TOKENS",
    "TINY_CHAT_TEMPLATE",
    "TINY_IMAGE_SIZE",
    "build_tiny_base_model",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "save_tiny_base_checkpoint",
    "tiny_qwen2_5_vl_config",
]

# Qwen2.5-VL's special tokens, in the order (and so with the relative ids) of the real
# tokenizer, where they follow the BPE vocabulary.
QWEN2_5_VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Side of the square test image whose patch grid is 8 x 8 (16 tokens after the 2 x 2 merge).
TINY_IMAGE_SIZE = 112
_PATCH_SIZE = 14
_MERGE_SIZE = 2
_TEMPORAL_PATCH_SIZE = 2
# Images are resized to between 2 x 2 and 4 x 4 merged tokens (area bounds, in pixels).
_MIN_PIXELS = (2 * _PATCH_SIZE * _MERGE_SIZE) ** 2  # 56 x 56
_MAX_PIXELS = TINY_IMAGE_SIZE**2  # 112 x 112
# Requested BPE vocabulary (byte alphabet + merges); the built-in corpus may stop earlier.
_BPE_VOCAB_SIZE = 768
_MODEL_MAX_LENGTH = 32768

# ChatML as Qwen2.5-VL uses it: a default system turn, one vision block per image or
# video item, optional "Picture n: " labels (add_vision_id=True), and the assistant
# header when add_generation_prompt=True.
TINY_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}"
    "{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] }}"
    "{%- else %}"
    "{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}{{- 'Picture ' ~ image_count.value ~ ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'video' or 'video' in item %}"
    "{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}{{- 'Video ' ~ video_count.value ~ ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in item %}"
    "{{- item['text'] }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# A small English corpus for the BPE merges: chat boilerplate, the vocabulary of the
# grid-counting demo (colours, rows, columns, numbers) and ordinary prose.
_CORPUS = """
You are a helpful assistant. The user asks a question about an image and the assistant answers it.
Look at the image carefully. Think step by step, then give the final answer.
How many red cells are there in the first row? There are two red cells in the first row.
How many blue cells are in row three? The answer is 3.
Count the green squares in the second column. I count four green squares, so the answer is 4.
Which colour appears most often in the grid? Yellow appears most often.
The black marked cell is in row two. In that row there is one white cell and two orange cells.
Each image shows a grid of coloured cells with four rows and four columns.
The rows are numbered from top to bottom and the columns from left to right.
Red, green, blue, yellow, orange, purple, black, white, grey and pink are the colours used here.
Zero, one, two, three, four, five, six, seven, eight, nine and ten are small numbers.
0 1 2 3 4 5 6 7 8 9 10 11 12 16 25 36 64 100 112 224 1000
What is shown in this picture? A small square picture with a pattern of colours.
Where is the object? The object is at the top left of the picture, next to the border.
Answer with a single number. Answer with one word. Explain your reasoning briefly.
The model first looks at the relevant region, imagines the missing detail, and then reasons in text.
Visual reasoning means using what the image shows, not only what the words say.
A question can be easy or hard. If the model already answers it correctly, it needs no extra hint.
The weather was cold in the morning, but the afternoon was warm and sunny.
She opened the window, looked at the garden and counted the birds on the fence.
They walked along the river to the old bridge and then turned back toward the town.
This is a test sentence, and it should be split into a small number of tokens.
Please describe the image. The image contains several shapes of different sizes and colours.
Is the left cell the same colour as the right cell? No, the left cell is red and the right cell is blue.
What number is written on the card? The card shows the number seven.
The training data has questions, images, answers and an accuracy for each question.
""".strip().splitlines()


@functools.lru_cache(maxsize=1)
def _trained_bpe() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Train the byte-level BPE once per process; return (vocab, merges) (never mutated)."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    # Repeating the corpus only scales the pair counts; it makes the merges less tied.
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = tuple(tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"])
    return dict(model["vocab"]), merges


def build_tiny_tokenizer() -> Qwen2Tokenizer:
    """Build the tiny Qwen2.5-VL-style tokenizer (a fresh object on every call).

    A ``Qwen2Tokenizer`` (tokenizers backend; ``Qwen2TokenizerFast`` is the same class in
    transformers 5) with a byte-level BPE of a few hundred entries trained deterministically
    on a built-in corpus, so ordinary English tokenizes compactly and any Unicode text
    round-trips through bytes.  The 14 Qwen2.5-VL special tokens follow the BPE vocabulary
    in Qwen's order; as in Qwen2.5-VL-Instruct, ``<|im_end|>`` is the eos token (a chat turn's end, so
    trainers that append eos and generation that stops on it agree with the template) and
    ``<|endoftext|>`` the pad token; there is no unk or bos token.  The chat template is :data:`TINY_CHAT_TEMPLATE`.  The GAP latent tokens are not
    included.
    """
    vocab, merges = _trained_bpe()
    tokenizer = Qwen2Tokenizer(
        vocab=dict(vocab),
        merges=[tuple(m) for m in merges],
        unk_token=None,
        bos_token=None,
        eos_token=QWEN2_5_VL_SPECIAL_TOKENS[0],
        pad_token=QWEN2_5_VL_SPECIAL_TOKENS[0],
        model_max_length=_MODEL_MAX_LENGTH,
        chat_template=TINY_CHAT_TEMPLATE,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN2_5_VL_SPECIAL_TOKENS[1:])})
    ids = tokenizer.convert_tokens_to_ids(list(QWEN2_5_VL_SPECIAL_TOKENS))
    expected = list(range(len(vocab), len(vocab) + len(QWEN2_5_VL_SPECIAL_TOKENS)))
    if ids != expected:  # a transformers change in how added tokens are numbered
        raise RuntimeError(f"special token ids {ids} are not the expected {expected}")
    tokenizer.eos_token = "<|im_end|>"  # set after numbering: it is already one of the special tokens
    return tokenizer


def _token_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(token_id) != token:
        raise GapError(f"the tokenizer has no {token} token: build it with build_tiny_tokenizer()")
    return token_id


def tiny_qwen2_5_vl_config(
    vocab_size: int | None = None,
    tie_word_embeddings: bool = False,
    spare_vocab: int = 0,
    *,
    tokenizer=None,
    **overrides,
) -> Qwen2_5_VLConfig:
    """Return the tiny ``Qwen2_5_VLConfig`` (nested ``text_config`` / ``vision_config``).

    Text model: hidden 64, 2 layers, 4 heads (head_dim 16), 2 KV heads, intermediate 128,
    M-RoPE sections ``[2, 3, 3]`` (sum 8 = head_dim / 2).  Vision tower: depth 2, hidden 32,
    2 heads, intermediate 64, output 64 (= text hidden), patch 14, spatial merge 2,
    temporal patch 2, window 56 px (2 x 2 merged tokens per window, so a 112 x 112 image has
    4 windows), block 0 windowed and block 1 full attention.

    Args:
        vocab_size: rows for the tokenizer's tokens; defaults to ``len(tokenizer)`` and may not
            be smaller.
        tie_word_embeddings: share the LM head with the input embedding.
        spare_vocab: extra embedding rows beyond ``vocab_size`` (as the real 7B has 152,064
            rows for 151,665 tokens).
        tokenizer: the tokenizer whose special-token ids go into the config; defaults to
            :func:`build_tiny_tokenizer`.
        **overrides: ``text_config={...}`` / ``vision_config={...}`` update the nested
            defaults; any other key is passed to ``Qwen2_5_VLConfig``.
    """
    if tokenizer is None:
        tokenizer = build_tiny_tokenizer()
    if vocab_size is None:
        vocab_size = len(tokenizer)
    if vocab_size < len(tokenizer):
        raise GapError(f"vocab_size={vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens): pass at least that")
    if spare_vocab < 0:
        raise GapError(f"spare_vocab must be >= 0, got {spare_vocab}")

    endoftext = _token_id(tokenizer, "<|endoftext|>")
    text_config = {
        "vocab_size": vocab_size + spare_vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": endoftext,
        "eos_token_id": _token_id(tokenizer, "<|im_end|>"),
        "pad_token_id": endoftext,
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 32,
        "num_heads": 2,
        "intermediate_size": 64,
        "out_hidden_size": 64,
        "patch_size": _PATCH_SIZE,
        "spatial_merge_size": _MERGE_SIZE,
        "temporal_patch_size": _TEMPORAL_PATCH_SIZE,
        "window_size": 2 * _MERGE_SIZE * _PATCH_SIZE,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
    }
    text_config.update(overrides.pop("text_config", None) or {})
    vision_config.update(overrides.pop("vision_config", None) or {})
    kwargs = {
        "image_token_id": _token_id(tokenizer, "<|image_pad|>"),
        "video_token_id": _token_id(tokenizer, "<|video_pad|>"),
        "vision_start_token_id": _token_id(tokenizer, "<|vision_start|>"),
        "vision_end_token_id": _token_id(tokenizer, "<|vision_end|>"),
        "tie_word_embeddings": tie_word_embeddings,
    }
    kwargs.update(overrides)
    return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, **kwargs)


def build_tiny_processor(
    tokenizer=None, *, min_pixels: int = _MIN_PIXELS, max_pixels: int = _MAX_PIXELS
) -> ImageOnlyQwen2_5_VLProcessor:
    """Return a Qwen2.5-VL processor for the tiny model (image-only, no torchvision needed).

    Uses ``Qwen2VLImageProcessorPil`` with patch 14, merge 2, temporal patch 2; images are
    resized so their area lies in ``[min_pixels, max_pixels]`` (default 56² .. 112²), so a
    112 x 112 image gives an 8 x 8 patch grid = 16 ``<|image_pad|>`` tokens and larger ones
    are scaled down to at most that.  See :mod:`gap_pipeline.qwen_processor` for why it is
    the image-only subclass of ``Qwen2_5_VLProcessor``.
    """
    if tokenizer is None:
        tokenizer = build_tiny_tokenizer()
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=_PATCH_SIZE,
        merge_size=_MERGE_SIZE,
        temporal_patch_size=_TEMPORAL_PATCH_SIZE,
    )
    chat_template = tokenizer.chat_template or TINY_CHAT_TEMPLATE
    return ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def _generation_config(config: Qwen2_5_VLConfig) -> GenerationConfig:
    # As Qwen2.5-VL-Instruct: stop on <|im_end|> or <|endoftext|>, pad with <|endoftext|>;
    # greedy by default so tests are deterministic.
    text = config.text_config
    return GenerationConfig(
        bos_token_id=text.bos_token_id,
        eos_token_id=[text.eos_token_id, text.pad_token_id],
        pad_token_id=text.pad_token_id,
        do_sample=False,
    )


def build_tiny_base_model(
    seed: int = 0, tie_word_embeddings: bool = False, spare_vocab: int = 0
) -> tuple[Qwen2_5_VLForConditionalGeneration, ImageOnlyQwen2_5_VLProcessor]:
    """Return ``(model, processor)``: a random-init fp32 tiny Qwen2.5-VL in eval mode.

    The weights depend only on ``seed`` (the global torch RNG is re-seeded with it, then
    restored).  The model's generation config stops on ``<|im_end|>`` / ``<|endoftext|>``
    and decodes greedily.
    """
    tokenizer = build_tiny_tokenizer()
    processor = build_tiny_processor(tokenizer)
    config = tiny_qwen2_5_vl_config(
        tie_word_embeddings=tie_word_embeddings, spare_vocab=spare_vocab, tokenizer=tokenizer
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model = model.to(torch.float32).eval()
    model.generation_config = _generation_config(config)
    return model, processor


def save_tiny_base_checkpoint(
    output_dir: str | os.PathLike, seed: int = 0, tie_word_embeddings: bool = False, spare_vocab: int = 0
) -> Path:
    """Write a tiny base Qwen2.5-VL checkpoint folder and return its path.

    The folder holds ``model.safetensors``, ``config.json``, ``generation_config.json``, the
    tokenizer (``tokenizer.json``, ``tokenizer_config.json``), ``processor_config.json``
    (image processor, processor class ``Qwen2_5_VLProcessor``) and ``chat_template.jinja``.
    Load it with ``Qwen2_5_VLForConditionalGeneration.from_pretrained(path)`` and
    :func:`gap_pipeline.qwen_processor.load_qwen2_5_vl_processor` (or
    ``AutoProcessor.from_pretrained(path)`` where torchvision is installed).
    """
    output_dir = Path(output_dir)
    model, processor = build_tiny_base_model(seed=seed, tie_word_embeddings=tie_word_embeddings, spare_vocab=spare_vocab)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir



def synthetic_pca(d: int, k: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A random PCA basis for tests: ``{"mean": (d,), "components": (k, d) orthonormal rows, "eigenvalues": (k,)}``.

    Eigenvalues decrease from 1 to 0.1; the mean has norm about sqrt(d).
    """
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return {
        "mean": torch.randn(d, generator=generator, dtype=torch.float64).to(dtype),
        "components": q[:, :k].T.contiguous().to(dtype),
        "eigenvalues": torch.linspace(1.0, 0.1, k, dtype=torch.float64).to(dtype),
    }


def build_tiny_gap_model(
    base: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    latent_tokens_per_span: int = 4,
    pca_num_components: int = 8,
    latent_head_type: str = "pca",
    latent_adapter_size: int = 32,
    tie_word_embeddings: bool = False,
    spare_vocab: int = 0,
):
    """Return ``(model, processor)``: a tiny GAP model converted from a tiny base with a synthetic PCA.

    ``base`` is a tiny base checkpoint folder; without it a base is built in memory from ``seed``. The returned
    processor is a ``GapProcessor`` (K, latent-aware tokenizer, GAP chat template) around the base's image
    processor, so ``model.save_pretrained(d); processor.save_pretrained(d)`` writes a complete GAP folder.
    """
    from modeling_gap import GapForConditionalGeneration
    from processing_gap import GapProcessor

    if base is None:
        base_model, processor = build_tiny_base_model(seed, tie_word_embeddings, spare_vocab)
    else:
        base_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base).eval()
        processor = load_qwen2_5_vl_processor(base)
    d = base_model.config.text_config.hidden_size
    pca = synthetic_pca(d, pca_num_components, seed=seed) if latent_head_type == "pca" else None
    model, tokenizer = GapForConditionalGeneration.from_qwen2_5_vl(
        base_model,
        processor.tokenizer,
        pca,
        latent_tokens_per_span=latent_tokens_per_span,
        latent_head_type=latent_head_type,
        latent_adapter_size=latent_adapter_size,
    )
    processor = GapProcessor.from_qwen2_5_vl_processor(processor, tokenizer, latent_tokens_per_span)
    return model.eval(), processor

# --------------------------------------------------------------------------- CLI

HELP = "Write a tiny random Qwen2.5-VL base checkpoint (for tests and the CPU demo)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gap tiny-model``."""
    parser.add_argument("--output-dir", required=True, help="folder to write the checkpoint into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    parser.add_argument(
        "--tie-word-embeddings", action="store_true", help="share the LM head with the input embedding"
    )
    parser.add_argument(
        "--spare-vocab",
        type=int,
        default=0,
        metavar="N",
        help="extra embedding rows beyond the tokenizer's tokens (default: 0)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``gap tiny-model``: write the folder and print a summary."""
    if args.spare_vocab < 0:
        raise GapError(f"--spare-vocab must be >= 0 (extra embedding rows), got {args.spare_vocab}")
    path = save_tiny_base_checkpoint(
        args.output_dir, seed=args.seed, tie_word_embeddings=args.tie_word_embeddings, spare_vocab=args.spare_vocab
    )
    with open(path / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    text = config["text_config"]
    n_tokens = len(build_tiny_tokenizer())
    print(f"wrote tiny Qwen2.5-VL base checkpoint to {path}")
    print(
        f"  tokenizer: {n_tokens} tokens; embedding rows: {text['vocab_size']} "
        f"({text['vocab_size'] - n_tokens} spare); tied: {config['tie_word_embeddings']}"
    )
    print(
        f"  text: hidden {text['hidden_size']}, {text['num_hidden_layers']} layers; "
        f"vision: depth {config['vision_config']['depth']}; seed {args.seed}"
    )
    print(f"  image {TINY_IMAGE_SIZE}x{TINY_IMAGE_SIZE} -> 16 image tokens")
    return 0
