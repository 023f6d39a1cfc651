"""A saved GAP checkpoint loads and generates for a Hub user who has only torch and transformers (issue 18).

transformers scans remote-code files for imports before running them (`dynamic_module_utils.get_imports`) and
refuses a file whose imports are not installed, so the code files a checkpoint carries may import nothing a Hub
user lacks. The end-to-end tests run in `hub_user_python` (conftest): torch, transformers, accelerate, pillow and
their requirements, without the training stack or this repository.
"""

import sys
import textwrap

import pytest
import torch
from transformers.dynamic_module_utils import get_imports

from conftest import TRAINING_STACK
from gap_pipeline.model_card import render_model_card

CODE_FILES = {"configuration_gap.py", "modeling_gap.py", "processing_gap.py"}
ALLOWED_IMPORTS = {"torch", "transformers", "safetensors"} | set(sys.stdlib_module_names)

# Run first in every Hub-user script: the training stack and this repository must really be absent.
ABSENT_CHECK = textwrap.dedent(f"""
    import importlib.util
    from transformers.integrations import is_deepspeed_available
    from transformers.utils import is_datasets_available, is_peft_available
    for name in {(*TRAINING_STACK, "gap_pipeline", "configuration_gap", "modeling_gap")!r}:
        try:
            __import__(name)
        except ModuleNotFoundError:
            pass
        else:
            raise AssertionError(name + " is importable in the Hub-user environment")
        assert importlib.util.find_spec(name) is None, name
    assert not any((is_deepspeed_available(), is_peft_available(), is_datasets_available()))
""")


@pytest.fixture(scope="module")
def saved_gap(tiny_gap_and_processor, tmp_path_factory):
    """A GAP folder as `save_pretrained` (model and processor) writes it."""
    model, processor = tiny_gap_and_processor
    folder = tmp_path_factory.mktemp("saved_gap") / "tiny-gap"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_saved_code_files_import_only_torch_transformers_safetensors_and_the_standard_library(saved_gap):
    written = {path.name for path in saved_gap.glob("*.py")}
    assert written == CODE_FILES
    for name in sorted(written):
        required = set(get_imports(saved_gap / name))
        assert required <= ALLOWED_IMPORTS, f"{name} requires {sorted(required - ALLOWED_IMPORTS)} of a Hub user"


def test_hub_user_without_the_training_stack_loads_and_generates_a_latent_span(
    hub_user_python, saved_gap, tiny_gap_and_processor, tiny_image, tmp_path
):
    model, processor = tiny_gap_and_processor
    image_path = tmp_path / "question.png"
    tiny_image(seed=3).save(image_path)
    K, d = model.config.latent_tokens_per_span, model.config.text_config.hidden_size
    start_id = model.config.latent_token_ids[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "count the red cells"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[tiny_image(seed=3)], return_tensors="pt")
    # A strong bias on <|latent_start|> makes the random tiny model open a span at once; K + 2 tokens hold one.
    settings = {"max_new_tokens": K + 2, "do_sample": False, "sequence_bias": [[[start_id], 100.0]]}
    with torch.no_grad():
        expected = model.generate(**inputs, return_dict_in_generate=True, **settings)
    assert expected.num_latent_spans.tolist() == [1]
    torch.save({"input_ids": inputs["input_ids"], "sequences": expected.sequences, "latents": expected.latents},
               tmp_path / "expected.pt")

    script = ABSENT_CHECK + textwrap.dedent(f"""
        import torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor
        repo = {str(saved_gap)!r}
        model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        assert type(processor).__module__.startswith("transformers_modules."), type(processor).__module__
        prompt = processor.apply_chat_template({messages!r}, add_generation_prompt=True)
        inputs = processor(text=[prompt], images=[Image.open({str(image_path)!r}).convert("RGB")], return_tensors="pt")
        out = model.generate(**inputs, return_dict_in_generate=True, **{settings!r})
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        assert torch.equal(inputs["input_ids"], expected["input_ids"])
        assert torch.equal(out.sequences, expected["sequences"])
        assert out.num_latent_spans.tolist() == [1] and tuple(out.latents[0].shape) == (1, {K}, {d})
        torch.testing.assert_close(out.latents[0], expected["latents"][0], rtol=0, atol=1e-6)
        print("generated a latent span", tuple(out.latents[0].shape))
    """)
    run = hub_user_python(script, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    assert f"generated a latent span (1, {K}, {d})" in run.stdout


def test_model_card_code_runs_as_written_for_a_hub_user(hub_user_python, saved_gap, tiny_gap, tiny_image, tmp_path):
    card = render_model_card(tiny_gap.config, model_id="me/tiny-gap")
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    # A user runs it next to their question.png with the repo id changed to where the checkpoint lies.
    assert 'repo = "me/tiny-gap"' in code and 'Image.open("question.png")' in code
    tiny_image(seed=3).save(tmp_path / "question.png")
    run = hub_user_python(ABSENT_CHECK + code.replace('repo = "me/tiny-gap"', f"repo = {str(saved_gap)!r}"),
                          cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.strip().endswith("latent spans")


# -- the Hub user's checks, in every Hub-user environment: this one and, with --hub-user-python, the plain ones at
# both ends of the remote code's transformers range (make test-remote-code-range) -----------------------------------


def test_hub_user_loads_every_saved_weight_as_saved(hub_user_python, saved_gap, tmp_path):
    """No key renamed, converted, missing, unexpected or re-initialised: the loaded state is the saved file."""
    script = ABSENT_CHECK + textwrap.dedent(f"""
        import torch, transformers
        from safetensors.torch import load_file
        from transformers import AutoModelForImageTextToText
        repo = {str(saved_gap)!r}
        model, info = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True,
                                                                  output_loading_info=True)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        reported = {{key: value for key, value in info.items() if value}}
        assert not reported, reported
        saved, state = load_file(repo + "/model.safetensors"), model.state_dict()
        assert sorted(saved) == sorted(state), sorted(set(saved) ^ set(state))
        changed = [key for key in saved if saved[key].dtype != state[key].dtype or not torch.equal(saved[key], state[key])]
        assert not changed, changed
        print("loaded", len(saved), "tensors as saved with transformers", transformers.__version__)
    """)
    run = hub_user_python(script, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "tensors as saved with transformers" in run.stdout


def _two_image_prompts(processor_name: str, tiny_image, folder) -> str:
    """Code that defines `texts` and `images`: two questions of different lengths, each with its own image."""
    paths = []
    for seed in (3, 4):
        paths.append(str(folder / f"q{seed}.png"))
        tiny_image(seed=seed).save(paths[-1])
    questions = ["count the red cells", "how many blue squares are in the second row of the grid"]
    return textwrap.dedent(f"""
        texts = [{processor_name}.apply_chat_template(
                     [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": q}}]}}],
                     add_generation_prompt=True)
                 for q in {questions!r}]
        images = [Image.open(path).convert("RGB") for path in {paths!r}]
    """)


def test_hub_user_decodes_the_same_spans_cached_or_not_and_batched_or_alone(
    hub_user_python, saved_gap, tiny_gap, tiny_image, tmp_path
):
    K, start_id = tiny_gap.config.latent_tokens_per_span, tiny_gap.config.latent_token_ids[0]
    # float64 (the head stays fp32), so the comparisons' tolerance is far above rounding; the bias on
    # <|latent_start|> opens a span at once and again right after it: the second span decodes from a cache that
    # holds the first
    script = ABSENT_CHECK + textwrap.dedent(f"""
        import torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor
        repo = {str(saved_gap)!r}
        model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True).double().eval()
        processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
        processor.tokenizer.padding_side = "left"
    """) + _two_image_prompts("processor", tiny_image, tmp_path) + textwrap.dedent(f"""
        settings = dict(max_new_tokens=2 * ({K} + 2), do_sample=False, sequence_bias=[[[{start_id}], 100.0]],
                        return_dict_in_generate=True)

        def generate(rows, **kwargs):
            inputs = processor(text=[texts[i] for i in rows], images=[images[i] for i in rows], return_tensors="pt",
                               padding=True)
            inputs["pixel_values"] = inputs["pixel_values"].double()
            return inputs["input_ids"].shape[1], model.generate(**inputs, **settings, **kwargs)

        length, batch = generate([0, 1])
        assert batch.num_latent_spans.tolist() == [2, 2], batch.num_latent_spans
        _, uncached = generate([0, 1], use_cache=False)
        assert torch.equal(batch.sequences, uncached.sequences)
        for cached_row, uncached_row in zip(batch.latents, uncached.latents):
            torch.testing.assert_close(cached_row, uncached_row, rtol=0, atol=1e-6)
        for i in (0, 1):
            alone_length, alone = generate([i])
            assert torch.equal(batch.sequences[i, length:], alone.sequences[0, alone_length:])
            assert batch.latents[i].shape == alone.latents[0].shape == (2, {K}, {tiny_gap.config.text_config.hidden_size})
            torch.testing.assert_close(batch.latents[i], alone.latents[0], rtol=0, atol=1e-6)
        print("cached = uncached, batch = alone")
    """)
    run = hub_user_python(script, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "cached = uncached, batch = alone" in run.stdout


def test_hub_user_gets_stock_qwen2_5_vl_logits_without_latents(hub_user_python, saved_gap, tiny_image, tmp_path):
    script = ABSENT_CHECK + textwrap.dedent(f"""
        import torch
        from PIL import Image
        from transformers import (AutoModelForImageTextToText, AutoProcessor, Qwen2_5_VLConfig,
                                  Qwen2_5_VLForConditionalGeneration)
        repo = {str(saved_gap)!r}
        model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
        fields = {{k: v for k, v in model.config.to_dict().items() if not k.startswith(("latent_", "pca_"))}}
        for key in ("model_type", "architectures", "auto_map"):
            fields.pop(key, None)
        stock = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**fields)).eval()
        stock.load_state_dict({{k: v for k, v in model.state_dict().items() if not k.startswith("latent_head.")}})
    """) + _two_image_prompts("processor", tiny_image, tmp_path) + textwrap.dedent("""
        inputs = processor(text=texts[:1], images=images[:1], return_tensors="pt")
        assert not set(inputs["input_ids"].flatten().tolist()) & set(model.config.latent_token_ids)
        with torch.no_grad():
            ours, theirs = model(**inputs).logits, stock(**inputs).logits
        assert ours.shape == theirs.shape and torch.equal(ours, theirs), (ours - theirs).abs().max()
        print("logits equal to stock Qwen2.5-VL", tuple(ours.shape))
    """)
    run = hub_user_python(script, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "logits equal to stock Qwen2.5-VL" in run.stdout
