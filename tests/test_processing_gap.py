"""GapProcessor: K, <latent> expansion, the chat template, assistant masks, compact decoding, remote-code reload."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from configuration_gap import LATENT_TOKENS
from gap_pipeline.tiny import build_tiny_tokenizer
from processing_gap import GAP_CHAT_TEMPLATE, LATENT_PLACEHOLDER, GapProcessor


K = 4
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
VISION = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def latent_tokenizer():
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(list(LATENT_TOKENS), special_tokens=True)
    return tokenizer


@pytest.fixture(scope="module")
def processor(latent_tokenizer, tiny_processor):
    return GapProcessor(
        image_processor=tiny_processor.image_processor, tokenizer=latent_tokenizer, latent_tokens_per_span=K
    )


def _conversation(answer, image=None):
    user = [{"type": "image"} if image is None else {"type": "image", "image": image}, {"type": "text", "text": "How many?"}]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


# 1. expansion and the chat template ----------------------------------------------------------------------


@pytest.mark.parametrize("n_spans", [0, 1, 3])
@pytest.mark.parametrize("k", [1, 4, 9])
def test_each_placeholder_becomes_one_span_of_exactly_k_pads(latent_tokenizer, tiny_processor, n_spans, k):
    processor = GapProcessor(tiny_processor.image_processor, latent_tokenizer, latent_tokens_per_span=k)
    text = "Start" + "".join(f" step {i} {LATENT_PLACEHOLDER}" for i in range(n_spans)) + " end."
    ids = processor(text=[text])["input_ids"][0]
    start, pad, end = processor.latent_token_ids
    starts = [i for i, t in enumerate(ids) if t == start]
    ends = [i for i, t in enumerate(ids) if t == end]
    assert len(starts) == len(ends) == n_spans
    assert sum(t == pad for t in ids) == n_spans * k
    for s, e in zip(starts, ends):
        assert e - s == k + 1 and all(t == pad for t in ids[s + 1 : e])
    assert LATENT_PLACEHOLDER not in processor.decode(ids, show_latent_tokens=True)


def test_chat_template_renders_a_training_row_exactly(processor):
    rendered = processor.apply_chat_template(_conversation("Look <latent> then 3."))
    assert rendered == (
        SYSTEM + "<|im_start|>user\n" + VISION + "How many?<|im_end|>\n"
        "<|im_start|>assistant\nLook <latent> then 3.<|im_end|>\n"
    )


def test_chat_template_renders_an_inference_prompt_exactly(processor):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
    ]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n" + VISION + VISION + "Same?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert processor.apply_chat_template(messages, add_generation_prompt=True, add_vision_id=True).count("Picture 2: ") == 1


def test_chat_template_renders_items_by_type_and_refuses_video(processor):
    # Arrow unifies content structs, so text items can carry "image": None
    unified = [{"role": "user", "content": [{"type": "text", "text": "hi", "image": None}, {"type": "image", "text": None}]}]
    assert processor.apply_chat_template(unified, add_generation_prompt=True) == (
        SYSTEM + "<|im_start|>user\nhi" + VISION + "<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(Exception, match="image-only"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}])


def test_assistant_mask_covers_content_with_spans_and_the_closing_im_end(processor, tiny_image):
    messages = _conversation("Look <latent> then <latent> 3.", image=tiny_image(seed=1))
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"][0]), list(out["assistant_masks"][0])
    tokens = processor.tokenizer.convert_ids_to_tokens(ids)
    prompt = processor.apply_chat_template(messages[:1], add_generation_prompt=True)
    first = len(processor(text=[prompt], images=[tiny_image(seed=1)])["input_ids"][0])  # first answer token
    assert ids[:first] == list(processor(text=[prompt], images=[tiny_image(seed=1)])["input_ids"][0])
    assert processor.tokenizer.decode(ids[first - 5 : first]) == "<|im_start|>assistant\n"
    assert mask == [0] * first + [1] * (len(ids) - 1 - first) + [0]
    assert tokens[-2:] == ["<|im_end|>", "Ċ"]
    assert sum(t == processor.latent_pad_token_id for t in ids) == 2 * K
    assert sum(t == processor.image_token_id for t in ids) == 16
    # the collator's path (image grids, no image processing) gives the same ids and mask
    encoded = processor.encode_conversation(_conversation("Look <latent> then <latent> 3."), out["image_grid_thw"])
    assert encoded == {"input_ids": ids, "assistant_masks": mask}


def test_encode_conversation_refuses_grids_that_do_not_match_the_images(processor):
    with pytest.raises(ValueError, match="1 image"):
        processor.encode_conversation(_conversation("3"), image_grid_thw=[[1, 8, 8], [1, 8, 8]])


def test_processor_call_expands_latents_and_images_with_text_positions_for_latents(processor, tiny_image):
    prompt = processor.apply_chat_template(_conversation("See <latent> 3."))
    out = processor(text=[prompt], images=[tiny_image(seed=2)], return_tensors="pt")
    ids, types = out["input_ids"][0], out["mm_token_type_ids"][0]
    assert int((ids == processor.latent_pad_token_id).sum()) == K
    assert torch.equal(types, (ids == processor.image_token_id).long())


# decoding --------------------------------------------------------------------------------------------------


def test_decode_shows_each_span_compactly_unless_asked(processor):
    ids = processor(text=["a <latent> b <latent>"])["input_ids"][0]
    assert processor.decode(ids) == "a <latent×4> b <latent×4>"
    assert processor.decode(ids, show_latent_tokens=True) == "a " + processor.latent_span_text() + " b " + (
        processor.latent_span_text()
    )
    assert processor.decode(ids[:-3]) == "a <latent×4> b <latent×2…>"  # a span cut short
    prompt_ids = processor(text=["<|im_start|>assistant\nx <latent><|im_end|>"])["input_ids"][0]
    assert processor.decode(prompt_ids, skip_special_tokens=True) == "assistant\nx <latent×4>"
    assert processor.batch_decode(torch.tensor([ids, ids])) == ["a <latent×4> b <latent×4>"] * 2
    assert processor.post_process_image_text_to_text([ids]) == ["a <latent×4> b <latent×4>"]


# construction errors ---------------------------------------------------------------------------------------


def test_a_tokenizer_without_latent_tokens_is_refused(tiny_processor):
    with pytest.raises(ValueError, match="lacks the latent tokens"):
        GapProcessor(tiny_processor.image_processor, build_tiny_tokenizer(), latent_tokens_per_span=K)
    with pytest.raises(ValueError, match="lacks the latent tokens"):
        GapProcessor.from_qwen2_5_vl_processor(tiny_processor, latent_tokens_per_span=K)


@pytest.mark.parametrize("k", [0, 5, -4, 2.0])
def test_k_must_be_a_positive_perfect_square(latent_tokenizer, tiny_processor, k):
    with pytest.raises(ValueError, match="latent_tokens_per_span"):
        GapProcessor(tiny_processor.image_processor, latent_tokenizer, latent_tokens_per_span=k)


def test_from_qwen2_5_vl_processor_takes_the_base_image_processor_and_sets_the_template(tiny_processor):
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(list(LATENT_TOKENS), special_tokens=True)
    processor = GapProcessor.from_qwen2_5_vl_processor(tiny_processor, tokenizer, latent_tokens_per_span=9)
    assert isinstance(processor, Qwen2_5_VLProcessor) and not hasattr(processor, "video_processor")
    assert processor.image_processor is tiny_processor.image_processor
    assert processor.latent_tokens_per_span == 9
    assert processor.chat_template == tokenizer.chat_template == GAP_CHAT_TEMPLATE
    with pytest.raises(ValueError, match="no image processor"):
        GapProcessor.from_qwen2_5_vl_processor(tokenizer, tokenizer)


# 6. save / reload --------------------------------------------------------------------------------------------


def test_save_then_auto_processor_in_a_fresh_process_gives_identical_encodings(tmp_path, processor, tiny_image):
    folder = tmp_path / "gap_processor"
    processor.save_pretrained(folder)
    assert {"processing_gap.py", "configuration_gap.py", "processor_config.json", "chat_template.jinja"} <= set(
        os.listdir(folder)
    )
    config = json.loads((folder / "processor_config.json").read_text())
    assert config["auto_map"] == {"AutoProcessor": "processing_gap.GapProcessor"}
    assert config["latent_tokens_per_span"] == K and config["processor_class"] == "GapProcessor"

    reloaded = GapProcessor.from_pretrained(folder)
    assert reloaded.latent_tokens_per_span == K and reloaded.chat_template == processor.chat_template

    image = tiny_image(seed=3, size=(150, 90))
    image.save(folder / "probe.png")
    messages = _conversation("Look <latent> then <latent> 3.")
    prompt = processor.apply_chat_template(messages)
    expected = processor(text=[prompt], images=[image], return_tensors="pt")
    torch.save(dict(expected), folder / "expected.pt")
    script = textwrap.dedent(f"""
        import json, sys, torch
        from PIL import Image
        assert not any("processing_gap" in m or "configuration_gap" in m for m in sys.modules)
        from transformers import AutoProcessor
        folder = {str(folder)!r}
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        messages = {messages!r}
        prompt = processor.apply_chat_template(messages)
        out = processor(text=[prompt], images=[Image.open(folder + "/probe.png")], return_tensors="pt")
        expected = torch.load(folder + "/expected.pt")
        assert sorted(out.keys()) == sorted(expected.keys()), (out.keys(), expected.keys())
        for key in expected:
            assert torch.equal(out[key], expected[key]), key
        print(type(processor).__module__, type(processor).__name__, processor.latent_tokens_per_span,
              processor.decode(out["input_ids"][0]).count("<latent×{K}>"))
    """)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    module, name, k, n_compact = run.stdout.split()[-4:]
    assert module.startswith("transformers_modules.") and module.endswith("processing_gap"), module
    assert name == "GapProcessor" and int(k) == K and int(n_compact) == 2


def test_the_image_processor_stays_the_pil_one_without_torchvision(processor):
    assert isinstance(processor.image_processor, Qwen2VLImageProcessorPil)
