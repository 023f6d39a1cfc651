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
