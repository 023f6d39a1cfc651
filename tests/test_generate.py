"""Latent-aware generation: KV-cached interleaved text/latent decoding, batching, interventions.

Exactness tests run in float64 (the latent head stays fp32 by design) on a tiny GAP model whose
``<|latent_start|>`` LM row is engineered to open spans at different steps in different rows; each test
also checks that greedy choices had a margin far above rounding, so agreement is not luck.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import LogitsProcessor, TextStreamer

from gap_pipeline.tiny import build_tiny_gap_model
from modeling_gap import LATENT_INTERVENTIONS, GapGenerateOutput


K = 4
PROMPTS = ["count the red cells", "how many blue squares are in the second row of the grid", "hi"]
MIN_MARGIN = 1e-9  # float64 rounding is ~1e-15; greedy picks must win by far more than that


def _encode(tokenizer, prompts):
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True)


def _first_span_steps(model, sequences, prompt_length):
    start, _, _ = model.config.latent_token_ids
    return [(row == start).nonzero().flatten().tolist() for row in sequences[:, prompt_length:]]


@pytest.fixture(scope="module")
def engineered():
    """(model, tokenizer): float64 tiny GAP whose start row copies a text token's row, scaled by 1.5.

    The start token then wins wherever that text token would have won (with a margin of half its logit),
    which makes the three prompts open spans at three different steps.
    """
    model, processor = build_tiny_gap_model(None, seed=0, latent_tokens_per_span=K)
    model = model.double().eval()
    tokenizer = processor.tokenizer
    start, _, _ = model.config.latent_token_ids
    inputs = _encode(tokenizer, PROMPTS)
    plain = model.generate(**inputs, max_new_tokens=30, do_sample=False, latent_intervention="suppress")
    candidates = plain[:, inputs.input_ids.shape[1]:].flatten().tolist()
    original = model.lm_head.weight[start].clone()
    for trigger in dict.fromkeys(candidates):
        with torch.no_grad():
            model.lm_head.weight[start] = 1.5 * model.lm_head.weight[trigger]
        out = model.generate(**inputs, max_new_tokens=30, do_sample=False)
        steps = _first_span_steps(model, out, inputs.input_ids.shape[1])
        firsts = [row[0] for row in steps if row]
        if len(firsts) == len(PROMPTS) and len(set(firsts)) == len(PROMPTS):
            return model, tokenizer
    with torch.no_grad():
        model.lm_head.weight[start] = original
    pytest.fail("no trigger token made every prompt open a span at a different step")


def _generate(model, inputs, **kwargs):
    kwargs.setdefault("max_new_tokens", 30)
    kwargs.setdefault("do_sample", False)
    return model.generate(**inputs, return_dict_in_generate=True, output_scores=True, **kwargs)


def _min_greedy_margin(output):
    scores = torch.stack(output.scores, dim=1)
    top2 = scores.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    return margin[torch.isfinite(margin)].min().item()  # forced steps have an infinite margin


# 1. KV cache vs recomputation ---------------------------------------------------------------------------


def test_kv_cached_generation_equals_recomputing_the_whole_sequence(engineered):
    model, tokenizer = engineered
    inputs = _encode(tokenizer, PROMPTS)
    cached = _generate(model, inputs)
    recomputed = _generate(model, inputs, use_cache=False)
    assert isinstance(cached, GapGenerateOutput)
    assert _min_greedy_margin(cached) > MIN_MARGIN
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert cached.num_latent_spans.tolist() == recomputed.num_latent_spans.tolist()
    assert all(n >= 1 for n in cached.num_latent_spans.tolist())
    for a, b in zip(cached.latents, recomputed.latents):
        assert a.shape == b.shape and a.shape[1:] == (K, model.config.text_config.hidden_size)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# 2. Batch vs alone --------------------------------------------------------------------------------------


def test_each_row_of_a_left_padded_batch_equals_generating_it_alone(engineered):
    model, tokenizer = engineered
    inputs = _encode(tokenizer, PROMPTS)
    batch = _generate(model, inputs, max_new_tokens=30)
    prompt_length = inputs.input_ids.shape[1]
    steps = _first_span_steps(model, batch.sequences, prompt_length)
    assert len({row[0] for row in steps}) == len(PROMPTS), "rows must open spans at different steps"
    for i, prompt in enumerate(PROMPTS):
        alone_inputs = _encode(tokenizer, [prompt])
        alone = _generate(model, alone_inputs, max_new_tokens=30)
        assert _min_greedy_margin(alone) > MIN_MARGIN
        n_new = alone.sequences.shape[1] - alone_inputs.input_ids.shape[1]
        batch_row = batch.sequences[i, prompt_length : prompt_length + n_new]
        assert torch.equal(batch_row, alone.sequences[0, alone_inputs.input_ids.shape[1]:])
        torch.testing.assert_close(batch.latents[i], alone.latents[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(batch.latent_norms[i], alone.latent_norms[0], rtol=0, atol=1e-6)


# 3. Interventions ---------------------------------------------------------------------------------------


class _StepRecorder:
    """Records, per forward, the last position's h_bar, the decoder's input embedding and the head's inputs."""

    def __init__(self, model):
        self.h_bar, self.head_inputs, self.input_embeds = [], [], []
        language_model = model.model.language_model
        self.handles = [
            language_model.norm.register_forward_hook(lambda m, i, o: self.h_bar.append(o[:, -1].detach().clone())),
            model.latent_head.register_forward_hook(lambda m, i, o: self.head_inputs.append(i[0].shape[0])),
            language_model.register_forward_pre_hook(
                lambda m, args, kwargs: self.input_embeds.append(kwargs["inputs_embeds"][:, -1].detach().clone()),
                with_kwargs=True,
            ),
        ]

    def close(self):
        for handle in self.handles:
            handle.remove()


def _record(model, inputs, **kwargs):
    recorder = _StepRecorder(model)
    try:
        output = _generate(model, inputs, **kwargs)
    finally:
        recorder.close()
    return output, recorder


def _pad_steps(model, output, prompt_length):
    """Indices of the forward calls whose (single) new input token is a pad, per row.

    Forward call s (s >= 1) reads the token generated at step s - 1; the last generated token is never read.
    """
    _, pad, _ = model.config.latent_token_ids
    generated = output.sequences[:, prompt_length:-1]
    return [(row == pad).nonzero().flatten() + 1 for row in generated]


def test_pca_intervention_feeds_the_decoded_head_output_of_the_previous_step(engineered):
    model, tokenizer = engineered
    inputs = _encode(tokenizer, PROMPTS)
    output, rec = _record(model, inputs)
    prompt_length = inputs.input_ids.shape[1]
    pad_steps = _pad_steps(model, output, prompt_length)
    # the head runs only for rows that feed a latent: text steps do not pay for it
    assert sum(rec.head_inputs) == sum(len(steps) for steps in pad_steps)
    for row, steps in enumerate(pad_steps):
        assert len(steps) > 0
        for s in steps.tolist():
            # v_hat decoded from the last state of call s - 1 is fed at call s
            expected = model.latent_head(rec.h_bar[s - 1][row])
            torch.testing.assert_close(rec.input_embeds[s][row], expected.to(torch.float64), rtol=0, atol=1e-6)


def test_suppress_never_opens_a_span(engineered):
    model, tokenizer = engineered
    start, pad, end = model.config.latent_token_ids
    inputs = _encode(tokenizer, PROMPTS)
    assert (_generate(model, inputs).num_latent_spans > 0).all()
    output = _generate(model, inputs, latent_intervention="suppress", max_new_tokens=40)
    generated = output.sequences[:, inputs.input_ids.shape[1]:]
    assert not torch.isin(generated, torch.tensor([start, pad, end])).any()
    assert output.num_latent_spans.tolist() == [0, 0, 0]


def test_hidden_intervention_feeds_the_final_norm_state(engineered):
    model, tokenizer = engineered
    inputs = _encode(tokenizer, PROMPTS)
    output, rec = _record(model, inputs, latent_intervention="hidden")
    prompt_length = inputs.input_ids.shape[1]
    n_checked = 0
    for row, steps in enumerate(_pad_steps(model, output, prompt_length)):
        for s in steps.tolist():
            torch.testing.assert_close(rec.input_embeds[s][row], rec.h_bar[s - 1][row], rtol=0, atol=1e-12)
            n_checked += 1
    assert n_checked >= K


def test_oracle_feeds_each_rows_targets_in_order_and_reports_what_the_head_would_have_fed(engineered):
    model, tokenizer = engineered
    inputs = _encode(tokenizer, PROMPTS)
    d = model.config.text_config.hidden_size
    targets = [torch.randn(1, K, d, generator=torch.Generator().manual_seed(row)) for row in range(len(PROMPTS))]
    output, rec = _record(model, inputs, latent_intervention="oracle", latent_oracle=targets)
    prompt_length = inputs.input_ids.shape[1]
    for row, steps in enumerate(_pad_steps(model, output, prompt_length)):
        assert output.num_latent_spans[row] >= 1
        for i, s in enumerate(steps.tolist()):
            span, slot = divmod(i, K)
            head = model.latent_head(rec.h_bar[s - 1][row]).to(torch.float64)
            if span == 0:  # the row's one target span, in order
                torch.testing.assert_close(rec.input_embeds[s][row], targets[row][0, slot].double(), rtol=0, atol=1e-6)
                torch.testing.assert_close(output.head_latents[row][0, slot].double(), head, rtol=0, atol=1e-6)
            else:  # past its targets a row feeds the head's own latent
                torch.testing.assert_close(rec.input_embeds[s][row], head, rtol=0, atol=1e-6)
        torch.testing.assert_close(output.latents[row][0], targets[row][0])
    assert _generate(model, inputs).head_latents is None  # pca: the head's latents are `latents`


def test_oracle_without_or_with_misshapen_targets_is_refused(engineered):
    model, tokenizer = engineered
    inputs = _encode(tokenizer, PROMPTS[:2])
    d = model.config.text_config.hidden_size
    with pytest.raises(ValueError, match="pass `latent_oracle`"):
        model.generate(**inputs, latent_intervention="oracle")
    with pytest.raises(ValueError, match=r"one \(n_spans, 4, 64\) tensor per batch row \(2 rows\)"):
        model.generate(**inputs, latent_intervention="oracle", latent_oracle=[torch.zeros(1, K, d)])
    with pytest.raises(ValueError, match="only read by latent_intervention='oracle'"):
        model.generate(**inputs, latent_oracle=[torch.zeros(K, d)] * 2)


def test_hidden_ema_feeds_h_bar_rescaled_to_the_ema_of_the_image_token_norms(tiny_gap_and_processor, tiny_image):
    model, processor = tiny_gap_and_processor
    start, _, _ = model.config.latent_token_ids
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "count the cells"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    images = [tiny_image(seed=1), tiny_image(seed=2)]
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=[prompt, prompt + "the"], images=images, return_tensors="pt", padding=True)

    class OpenSpanFirst(LogitsProcessor):  # open a span at the first step so every row feeds latents
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == inputs.input_ids.shape[1]:
                scores[:, start] = scores.max() + 10
            return scores

    beta = 0.8
    output, rec = _record(model, inputs, latent_intervention="hidden_ema", hidden_ema_beta=beta, max_new_tokens=K + 2,
                          logits_processor=[OpenSpanFirst()])
    with torch.no_grad():
        features = model.get_image_features(inputs.pixel_values, inputs.image_grid_thw).pooler_output
    for row, vision_tokens in enumerate(features):
        ema = None
        for norm in vision_tokens.float().norm(dim=-1).tolist():  # sequence order, n_1 = x_1
            ema = norm if ema is None else beta * ema + (1 - beta) * norm
        latents = output.latents[row]
        assert latents.shape == (1, K, model.config.text_config.hidden_size)
        torch.testing.assert_close(latents.norm(dim=-1), torch.full((1, K), ema), rtol=1e-5, atol=1e-5)
        # direction: the final-norm state of the previous step
        for j, s in enumerate(_pad_steps(model, output, inputs.input_ids.shape[1])[row].tolist()):
            h = rec.h_bar[s - 1][row].float()
            torch.testing.assert_close(latents[0, j], h * ema / h.norm(), rtol=1e-5, atol=1e-5)


def test_hidden_ema_without_an_image_is_refused(engineered):
    model, tokenizer = engineered
    with pytest.raises(ValueError, match="hidden_ema"):
        model.generate(**_encode(tokenizer, PROMPTS[:1]), max_new_tokens=3, latent_intervention="hidden_ema")


def test_noise_latents_have_the_clean_norm_differ_from_pca_and_repeat_under_a_seed(engineered):
    model, tokenizer = engineered
    inputs = _encode(tokenizer, PROMPTS)
    clean = _generate(model, inputs)

    def noisy_run(seed):
        return _record(model, inputs, latent_intervention="noise", latent_generator=torch.Generator().manual_seed(seed))

    first, rec = noisy_run(7)
    again, _ = noisy_run(7)
    other, _ = noisy_run(8)
    prompt_length = inputs.input_ids.shape[1]
    n_checked = 0
    for row, steps in enumerate(_pad_steps(model, first, prompt_length)):
        for j, s in enumerate(steps.tolist()):
            clean_latent = model.latent_head(rec.h_bar[s - 1][row])  # the PCA latent it would have fed here
            fed = rec.input_embeds[s][row]
            torch.testing.assert_close(fed.norm().float(), clean_latent.norm(), rtol=1e-5, atol=1e-5)
            assert (fed.float() - clean_latent).abs().max() > 1e-3
            n_checked += 1
    assert n_checked >= K
    assert torch.equal(first.sequences, again.sequences)
    for a, b in zip(first.latents, again.latents):
        assert torch.equal(a, b)
    assert any(
        a.shape != b.shape or not torch.equal(a, b) for a, b in zip(first.latents, other.latents)
    ), "a different seed must give different noise"
    assert any(
        a.shape != b.shape or not torch.allclose(a, b) for a, b in zip(first.latents, clean.latents)
    ), "noise latents must differ from pca latents"


# 4. Budget override and truncation -------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [1, 9])
def test_latent_budget_override_yields_spans_of_that_length(engineered, budget):
    model, tokenizer = engineered
    start, pad, end = model.config.latent_token_ids
    inputs = _encode(tokenizer, PROMPTS)
    output = _generate(model, inputs, latent_tokens_per_span=budget, max_new_tokens=40)
    for row, generated in enumerate(output.sequences[:, inputs.input_ids.shape[1]:].tolist()):
        for i, token in enumerate(generated):
            if token == start and i + budget + 1 < len(generated):
                assert generated[i + 1 : i + 1 + budget] == [pad] * budget
                assert generated[i + 1 + budget] == end
        assert output.latents[row].shape[1] == budget


def test_running_out_of_tokens_inside_a_span_is_reported_per_row(engineered):
    model, tokenizer = engineered
    inputs = _encode(tokenizer, PROMPTS)
    full = _generate(model, inputs)
    steps = _first_span_steps(model, full.sequences, inputs.input_ids.shape[1])
    # stop two tokens after row 1 opens its first span: row 1 is inside it, the others are not mid-span
    budget = steps[1][0] + 3
    cut = _generate(model, inputs, max_new_tokens=budget)
    expected = []
    for row in range(len(PROMPTS)):
        opened = [s for s in steps[row] if s < budget]
        expected.append(bool(opened) and opened[-1] + K + 1 >= budget)
    assert cut.span_truncated.tolist() == expected
    assert expected[1] is True


def test_bad_generate_arguments_raise_clear_errors(engineered):
    model, tokenizer = engineered
    inputs = _encode(tokenizer, PROMPTS[:1])
    with pytest.raises(ValueError, match="latent_intervention"):
        model.generate(**inputs, latent_intervention="zero")
    with pytest.raises(ValueError, match="perfect square"):
        model.generate(**inputs, latent_tokens_per_span=5)
    with pytest.raises(ValueError, match="assisted_generation.*latent_intervention='suppress'"):
        model.generate(**inputs, prompt_lookup_num_tokens=3)


# 5. Sampling keeps spans well formed; streamers ----------------------------------------------------------------


def test_sampled_spans_are_always_well_formed(engineered):
    model, tokenizer = engineered
    start, pad, end = model.config.latent_token_ids
    inputs = _encode(tokenizer, PROMPTS)

    class FavourStart(LogitsProcessor):  # make spans frequent; the span processor still has the last word
        def __call__(self, input_ids, scores):
            scores[:, start] += 20.0
            return scores

    n_spans = 0
    for seed in range(12):
        torch.manual_seed(seed)
        sequences = model.generate(**inputs, do_sample=True, temperature=5.0, top_k=0, max_new_tokens=30,
                                   logits_processor=[FavourStart()])
        for generated in sequences[:, inputs.input_ids.shape[1]:].tolist():
            i = 0
            while i < len(generated):
                token = generated[i]
                assert token not in (pad, end), f"seed {seed}: {token} outside a span"
                if token == start:
                    span = generated[i + 1 : i + 2 + K]
                    expected = ([pad] * K + [end])[: len(span)]
                    assert span == expected, f"seed {seed}: malformed span {span}"
                    n_spans += 1
                    i += K + 2
                else:
                    i += 1
    assert n_spans >= 10


def test_streamer_receives_the_generated_text_tokens(engineered, capsys):
    model, tokenizer = engineered
    inputs = _encode(tokenizer, PROMPTS[:1])
    streamed = []

    class Collect(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            streamed.append(text)

    output = model.generate(**inputs, max_new_tokens=25, streamer=Collect(tokenizer, skip_prompt=True))
    expected = tokenizer.decode(output[0, inputs.input_ids.shape[1]:])
    assert "".join(streamed) == expected
    assert "<|latent_start|>" in expected


# 6. Remote code ---------------------------------------------------------------------------------------------------


def test_reloaded_remote_code_model_generates_identically(tmp_path, engineered):
    model, tokenizer = engineered
    inputs = _encode(tokenizer, PROMPTS)
    expected = _generate(model, inputs)
    model.save_pretrained(tmp_path)
    torch.save({"inputs": dict(inputs), "sequences": expected.sequences, "latents": expected.latents},
               tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForImageTextToText
        path = {str(tmp_path)!r}
        model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype=torch.float64).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        expected = torch.load(path + "/expected.pt")
        out = model.generate(**expected["inputs"], max_new_tokens=30, do_sample=False, return_dict_in_generate=True)
        assert torch.equal(out.sequences, expected["sequences"])
        for a, b in zip(out.latents, expected["latents"]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        print("identical", [tuple(x.shape) for x in out.latents])
    """)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path.parent, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "identical" in run.stdout


def test_every_documented_intervention_is_accepted(engineered):
    model, tokenizer = engineered
    inputs = _encode(tokenizer, PROMPTS[:1])
    for intervention in LATENT_INTERVENTIONS:
        if intervention in ("hidden_ema", "oracle"):
            continue  # need an image / targets: covered above
        out = model.generate(**inputs, max_new_tokens=12, latent_intervention=intervention,
                             latent_generator=torch.Generator().manual_seed(0))
        assert out.shape[1] > inputs.input_ids.shape[1]


# 7. Other decoding modes: text in every mode stock supports, spans where the mode can carry them ----------------


def _stock_twin(model):
    """A stock Qwen2.5-VL with the GAP model's weights (no latent head), in the same precision."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    fields = {k: v for k, v in model.config.to_dict().items() if not k.startswith(("latent_", "pca_"))}
    fields.pop("model_type", None), fields.pop("architectures", None)
    stock = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**fields)).to(model.dtype).eval()
    stock.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("latent_head.")})
    stock.generation_config = model.generation_config
    return stock


def test_beam_search_decodes_text_like_stock_and_refuses_a_span_with_one_error(engineered):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from modeling_gap import GapLatentLogitsProcessor

    model, tokenizer = engineered
    inputs = _encode(tokenizer, PROMPTS)
    with pytest.raises(ValueError, match="A latent span opened under beam search"):
        model.generate(**inputs, max_new_tokens=30, num_beams=3)
    beams = model.generate(**inputs, max_new_tokens=30, num_beams=3, latent_intervention="suppress")
    start, pad, end = model.config.latent_token_ids
    ban = GapLatentLogitsProcessor(start, pad, end, K, ban_start=True)
    stock = Qwen2_5_VLForConditionalGeneration.generate(model, **inputs, max_new_tokens=30, num_beams=3,
                                                        logits_processor=[ban])
    assert torch.equal(beams, stock)
    assert not bool(torch.isin(beams, torch.tensor([start, pad, end])).any())


def test_prompt_lookup_and_assisted_decoding_give_greedy_text_and_refuse_spans(engineered):
    import copy

    model, tokenizer = engineered
    inputs = _encode(tokenizer, PROMPTS[:1])  # assisted decoding takes one row
    greedy = model.generate(**inputs, max_new_tokens=20, do_sample=False, latent_intervention="suppress")
    text_modes = {
        "prompt lookup": {"prompt_lookup_num_tokens": 3},
        "GAP assistant": {"assistant_model": copy.deepcopy(model)},
        "stock assistant": {"assistant_model": _stock_twin(model)},
    }
    for name, mode in text_modes.items():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False, latent_intervention="suppress", **mode)
        assert torch.equal(out, greedy), name
        # With spans possible, these modes would verify several pads in one forward: one error naming the mode.
        with pytest.raises(ValueError, match="cannot be decoded with assisted_generation"):
            model.generate(**inputs, max_new_tokens=20, do_sample=False, **mode)
    with pytest.raises(ValueError, match="cannot be decoded with contrastive_search"):
        model.generate(**inputs, max_new_tokens=5, penalty_alpha=0.6, top_k=4)


def test_a_prompt_ending_with_latent_start_counts_the_span_it_opened(engineered):
    model, tokenizer = engineered
    start, _, _ = model.config.latent_token_ids
    inputs = _encode(tokenizer, PROMPTS[:1])
    ids = torch.cat([inputs.input_ids, torch.tensor([[start]])], dim=1)
    mask = torch.cat([inputs.attention_mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=K + 2, do_sample=False,
                         return_dict_in_generate=True)
    assert out.latents[0].shape[0] == 1
    assert out.num_latent_spans.tolist() == [1]
