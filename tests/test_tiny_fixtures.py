"""The tiny Qwen2.5-VL fixtures, the `gap` CLI and its subcommand contract."""

import importlib
import json
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch
from conftest import TINY_SPARE_VOCAB
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

from gap_pipeline import cli
from gap_pipeline.qwen_processor import ImageOnlyQwen2_5_VLProcessor, load_qwen2_5_vl_processor
from gap_pipeline.tiny import (
    QWEN2_5_VL_SPECIAL_TOKENS,
    build_tiny_base_model,
    build_tiny_tokenizer,
    tiny_qwen2_5_vl_config,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
LATENT_TOKENS = ("<|latent_start|>", "<|latent_pad|>", "<|latent_end|>")


def _messages(question="How many red cells are in the first row?"):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def _encode(processor, image, question="How many red cells are in the first row?"):
    text = processor.apply_chat_template(_messages(question), add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[image], return_tensors="pt")


def _load(path, **kwargs):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, **kwargs).eval()


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


# ------------------------------------------------------------------ tokenizer


def _random_text(rng: random.Random, length: int) -> str:
    pools = [
        (0x20, 0x7E),  # ASCII
        (0x00A0, 0x024F),  # Latin-1 and Latin Extended
        (0x0370, 0x03FF),  # Greek
        (0x0400, 0x04FF),  # Cyrillic
        (0x4E00, 0x9FFF),  # CJK
        (0x1F300, 0x1FAFF),  # emoji
    ]
    chars = []
    for _ in range(length):
        lo, hi = rng.choice(pools)
        chars.append(chr(rng.randint(lo, hi)))
        if rng.random() < 0.1:
            chars.append(rng.choice(["\n", "\t", "  ", "\r\n", " "]))
    return "".join(chars)


def test_tokenizer_round_trips_any_text(tiny_tokenizer):
    fixed = [
        "",
        " ",
        "How many red cells are in the first row?",
        "Line one\n\nLine two\twith a tab   and spaces  ",
        "naïve café, Zürich — 漢字かな交じり, Привет, 🙂🚀",
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n",
        "\x00\x01 control \x7f bytes",
    ]
    rng = random.Random(1234)
    texts = fixed + [_random_text(rng, rng.randint(1, 60)) for _ in range(200)]
    for text in texts:
        ids = tiny_tokenizer.encode(text, add_special_tokens=False)
        # Like Qwen2.5's tokenizer this one normalizes to NFC, so NFC text is what comes back.
        assert tiny_tokenizer.decode(ids) == unicodedata.normalize("NFC", text), repr(text)
        assert all(0 <= i < len(tiny_tokenizer) for i in ids)


def test_tokenizer_is_compact_on_english(tiny_tokenizer):
    sentence = "The small dog counted three green birds near the river, then walked to the town."
    ids = tiny_tokenizer.encode(sentence, add_special_tokens=False)
    assert len(ids) <= len(sentence.split()) * 2
    assert 300 <= len(tiny_tokenizer) <= 1024


def test_tokenizer_special_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in QWEN2_5_VL_SPECIAL_TOKENS]
    # one id each, contiguous after the BPE vocabulary, in Qwen's order
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert ids[-1] == len(tok) - 1
    for token, token_id in zip(QWEN2_5_VL_SPECIAL_TOKENS, ids):
        assert tok.encode(token, add_special_tokens=False) == [token_id], token
        assert token in tok.all_special_tokens, token
        assert tok.decode([token_id], skip_special_tokens=True) == ""
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.unk_token is None and tok.bos_token is None
    vocab = tok.get_vocab()
    for token in LATENT_TOKENS:
        assert token not in vocab
        assert len(tok.encode(token, add_special_tokens=False)) > 1


def test_tokenizer_is_deterministic_and_fresh():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a is not b
    assert a.get_vocab() == b.get_vocab()
    assert json.loads(a.backend_tokenizer.to_str())["model"] == json.loads(b.backend_tokenizer.to_str())["model"]
    a.add_special_tokens({"additional_special_tokens": ["<|latent_pad|>"]})
    assert "<|latent_pad|>" not in build_tiny_tokenizer().get_vocab()


def test_chat_template(tiny_tokenizer, tiny_processor):
    messages = _messages("How many?") + [{"role": "assistant", "content": [{"type": "text", "text": "2"}]}]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many?<|im_end|>\n"
        "<|im_start|>assistant\n2<|im_end|>\n"
    )
    assert tiny_processor.apply_chat_template(messages, tokenize=False) == expected
    assert tiny_tokenizer.apply_chat_template(messages, tokenize=False) == expected
    prompt = tiny_processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("How many?<|im_end|>\n<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tiny_tokenizer.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
    labelled = tiny_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}], tokenize=False, add_vision_id=True
    )
    assert "Picture 1: <|vision_start|>" in labelled and "Picture 2: <|vision_start|>" in labelled


def test_tiny_image_is_deterministic(tiny_image):
    a, b, c = tiny_image(seed=0), tiny_image(seed=0), tiny_image(seed=1)
    assert a.mode == "RGB" and a.size == (112, 112)
    assert a.tobytes() == b.tobytes() != c.tobytes()
    assert tiny_image(size=(150, 90)).size == (150, 90)


# --------------------------------------------------------------------- config


def test_config_ids_come_from_the_tokenizer(tiny_tokenizer):
    tok = tiny_tokenizer
    config = tiny_qwen2_5_vl_config(tokenizer=tok)
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    text = config.text_config
    assert text.bos_token_id == text.pad_token_id == tok.pad_token_id
    assert text.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert text.vocab_size == len(tok)
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert config.vision_config.out_hidden_size == text.hidden_size
    assert tiny_qwen2_5_vl_config(tokenizer=tok, spare_vocab=3).text_config.vocab_size == len(tok) + 3
    assert tiny_qwen2_5_vl_config(tokenizer=tok, text_config={"num_hidden_layers": 3}).text_config.num_hidden_layers == 3
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        tiny_qwen2_5_vl_config(len(tok) - 1, tokenizer=tok)


# ---------------------------------------------------------- model and processor


def test_processor_gives_16_image_tokens(tiny_processor, tiny_image):
    assert isinstance(tiny_processor, Qwen2_5_VLProcessor)
    enc = _encode(tiny_processor, tiny_image())
    assert enc["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert enc["pixel_values"].shape == (64, 3 * 2 * 14 * 14)
    image_id = tiny_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((enc["input_ids"] == image_id).sum()) == 16
    assert torch.equal(enc["mm_token_type_ids"] == 1, enc["input_ids"] == image_id)
    # a larger image is scaled down to at most 16 tokens, a smaller one up to at least 4
    big = tiny_processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[tiny_image(size=(448, 448))])
    small = tiny_processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[tiny_image(size=(30, 30))])
    assert big["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert small["image_grid_thw"].tolist() == [[1, 4, 4]]


def test_forward_and_generate(tiny_image):
    model, processor = build_tiny_base_model(seed=0)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    enc = _encode(processor, tiny_image())
    with torch.no_grad():
        out = model(**enc)
    assert out.logits.shape == (1, enc["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()
    first = model.generate(**enc, max_new_tokens=4, min_new_tokens=4)
    second = model.generate(**enc, max_new_tokens=4, min_new_tokens=4)
    assert first.shape == (1, enc["input_ids"].shape[1] + 4)
    assert torch.equal(first, second)
    assert torch.equal(first[:, : enc["input_ids"].shape[1]], enc["input_ids"])
    # a different image changes the prediction
    with torch.no_grad():
        other = model(**_encode(processor, tiny_image(seed=1)))
    assert not torch.allclose(out.logits[0, -1], other.logits[0, -1])


def test_eager_and_sdpa_attention_agree(tiny_base_dir, tiny_processor, tiny_image):
    enc = _encode(tiny_processor, tiny_image(seed=3))
    logits = {}
    for impl in ("eager", "sdpa"):
        model = _load(tiny_base_dir, attn_implementation=impl)
        with torch.no_grad():
            logits[impl] = model(**enc).logits
    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=1e-4, atol=1e-5)


def test_seed_controls_weights_without_touching_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, _ = build_tiny_base_model(seed=0)
    assert torch.equal(torch.rand(3), expected_next)
    b, _ = build_tiny_base_model(seed=0)
    c, _ = build_tiny_base_model(seed=1)
    _assert_same_state(a, b)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


# ---------------------------------------------------------------- saved folder


def test_saved_folder_reloads_bit_exact(tiny_base_dir):
    files = {p.name for p in Path(tiny_base_dir).iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "chat_template.jinja",
    } <= files
    reference, _ = build_tiny_base_model(seed=0)
    loaded = _load(tiny_base_dir)
    _assert_same_state(reference, loaded)
    for part in ("text_config", "vision_config"):
        saved, built = loaded.config.to_dict()[part], reference.config.to_dict()[part]
        assert saved.pop("dtype") == "float32"  # save_pretrained records the dtype; in memory it is None
        built.pop("dtype")
        assert saved == built, part
    gen = loaded.generation_config
    tok = build_tiny_tokenizer()
    assert gen.eos_token_id == [tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id]
    assert gen.pad_token_id == tok.pad_token_id and gen.do_sample is False


def test_saved_processor_reloads_identically(tiny_base_dir, tiny_processor, tiny_tokenizer, tiny_image):
    loaded = load_qwen2_5_vl_processor(tiny_base_dir)
    assert isinstance(loaded, Qwen2_5_VLProcessor)
    assert loaded.chat_template == tiny_processor.chat_template
    for image in (tiny_image(seed=5), tiny_image(seed=6, size=(150, 90))):
        a, b = _encode(tiny_processor, image), _encode(loaded, image)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    assert tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
    assert tokenizer.all_special_tokens == tiny_tokenizer.all_special_tokens
    assert tokenizer.chat_template == tiny_tokenizer.chat_template
    text = "Count the pink cells: 漢字 🙂 <|im_end|>"
    assert tokenizer.encode(text) == tiny_tokenizer.encode(text)


def test_saved_processor_config_is_standard_qwen2_5_vl(tiny_base_dir):
    processor_config = json.loads((Path(tiny_base_dir) / "processor_config.json").read_text())
    tokenizer_config = json.loads((Path(tiny_base_dir) / "tokenizer_config.json").read_text())
    assert processor_config["processor_class"] == "Qwen2_5_VLProcessor"
    assert tokenizer_config["processor_class"] == "Qwen2_5_VLProcessor"
    assert tokenizer_config["tokenizer_class"] == "Qwen2Tokenizer"
    image, video = processor_config["image_processor"], processor_config["video_processor"]
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert image["size"] == video["size"] == {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
    for key in ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std"):
        assert image[key] == video[key], key


def test_image_only_processor_refuses_to_push(tiny_processor, tmp_path):
    assert isinstance(tiny_processor, ImageOnlyQwen2_5_VLProcessor)
    with pytest.raises(ValueError, match="does not push"):
        tiny_processor.save_pretrained(tmp_path, push_to_hub=True)


def test_tied_variant_ties(tiny_base_dir_tied, tiny_base_dir):
    tied = _load(tiny_base_dir_tied)
    assert tied.config.tie_word_embeddings is True
    embed = tied.model.language_model.embed_tokens.weight
    assert tied.lm_head.weight is embed or tied.lm_head.weight.data_ptr() == embed.data_ptr()
    untied = _load(tiny_base_dir)
    assert untied.config.tie_word_embeddings is False
    assert untied.lm_head.weight.data_ptr() != untied.model.language_model.embed_tokens.weight.data_ptr()
    assert not torch.equal(untied.lm_head.weight, untied.model.language_model.embed_tokens.weight)


def test_spare_variant_has_unused_rows(tiny_base_dir_spare, tiny_tokenizer):
    model = _load(tiny_base_dir_spare)
    vocab_size = model.config.text_config.vocab_size
    assert vocab_size == len(tiny_tokenizer) + TINY_SPARE_VOCAB
    assert vocab_size - len(tiny_tokenizer) >= 3
    assert model.model.language_model.embed_tokens.weight.shape[0] == vocab_size
    assert model.lm_head.weight.shape[0] == vocab_size
    assert len(load_qwen2_5_vl_processor(tiny_base_dir_spare).tokenizer) == len(tiny_tokenizer)


# ------------------------------------------------------------------------ CLI


def test_cli_tiny_model_writes_a_loadable_folder(tmp_path, tiny_base_dir):
    out = tmp_path / "cli_tiny"
    result = subprocess.run(
        [sys.executable, "-m", "gap_pipeline", "tiny-model", "--output-dir", str(out), "--seed", "0"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote tiny Qwen2.5-VL base checkpoint" in result.stdout
    # another process, same seed: the same weights and the same BPE
    _assert_same_state(_load(out), _load(tiny_base_dir))
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads((Path(tiny_base_dir) / "tokenizer.json").read_text())
    assert isinstance(load_qwen2_5_vl_processor(out), Qwen2_5_VLProcessor)


def test_cli_help_is_fast_and_lazy():
    code = (
        "import sys\n"
        "from gap_pipeline import cli\n"
        "try:\n"
        "    cli.main(['--help'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
    for name in cli.COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_cli_subcommand_contract(name):
    module = importlib.import_module(cli.COMMANDS[name])
    assert isinstance(module.HELP, str) and module.HELP.strip()
    assert cli.read_help(cli.COMMANDS[name]) == module.HELP
    assert callable(module.add_arguments) and callable(module.run)
    parser = cli.build_parser([name])
    with pytest.raises(SystemExit) as exit:
        parser.parse_args([name, "--help"])
    assert exit.value.code == 0


def test_cli_rejects_unknown_and_missing_commands(capsys):
    for argv in ([], ["no-such-command"]):
        with pytest.raises(SystemExit) as exit:
            cli.main(argv)
        assert exit.value.code == 2
    assert "tiny-model" in capsys.readouterr().err


def test_tiny_model_bad_spare_vocab_is_one_error_line(tmp_path, capsys):
    status = cli.main(["tiny-model", "--output-dir", str(tmp_path / "tiny"), "--spare-vocab", "-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err == ["error: --spare-vocab must be >= 0 (extra embedding rows), got -1"]
    assert not (tmp_path / "tiny").exists()


@pytest.mark.parametrize("name", ["targets", "filter", "audit", "evaluate", "difficulty", "norm-profile", "lmms-task"])
def test_every_command_that_opens_images_has_the_image_guards(name, capsys):
    """The decompression-bomb limit and the image-folder rule are one flag each, the same on every such command."""
    with pytest.raises(SystemExit):
        cli.build_parser([name]).parse_args([name, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-image-pixels N decompression-bomb guard" in text
    assert "--allow-outside-image-dir accept image paths that leave the image folder" in text
