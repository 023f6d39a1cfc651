"""The contracts every transformers model keeps, held by GAP with latent spans in the input (issue 25).

return_dict, torch.compile (fullgraph), meta-device initialisation, default configs, loading reports,
pre-shifted labels, embedding resizes. Decoding modes are in test_generate.py.
"""

import pytest
import torch
from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

from configuration_gap import GapConfig
from gap_pipeline.tiny import synthetic_pca
from modeling_gap import GapForConditionalGeneration


K = 4


def _batch(model, with_span=True):
    """Two right-padded rows, the first with one latent span; labels on everything but the prompt and padding."""
    start, pad, end = model.config.latent_token_ids
    span = [start] + [pad] * K + [end] if with_span else []
    rows = [[11, 12, 13, *span, 14, 15], [21, 22, 23, 24, 25, 26, 27]]
    length = max(map(len, rows))
    input_ids = torch.zeros(2, length, dtype=torch.long)
    attention_mask = torch.zeros(2, length, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :2] = -100
    d = model.config.text_config.hidden_size
    latent_embeds = torch.randn(K, d, generator=torch.Generator().manual_seed(0)) if with_span else None
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "latent_embeds": latent_embeds}


def test_return_dict_false_returns_the_outputs_as_a_tuple(tiny_gap):
    model = tiny_gap.eval()
    batch = _batch(model)
    with torch.no_grad():
        as_dict = model(**batch)
        as_tuple = model(**batch, return_dict=False)
        text = batch["input_ids"][1:]
        text_only, text_dict = model(input_ids=text, return_dict=False), model(input_ids=text)
    assert isinstance(as_tuple, tuple) and isinstance(text_only, tuple)
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)
    assert torch.equal(text_only[0], text_dict.logits)


@pytest.mark.parametrize("case", ["text only", "text with labels", "latent span with labels"])
def test_forward_compiles_with_fullgraph_and_matches_eager(tiny_gap, case):
    """`torch.compile(fullgraph=True)` traces the forward without a graph break (Dynamo, the eager backend)."""
    model = tiny_gap.eval()
    batch = _batch(model, with_span=case == "latent span with labels")
    if case == "text only":
        batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        eager, traced = model(**batch), compiled(**batch)
    torch.testing.assert_close(traced.logits, eager.logits)
    if "labels" in batch:
        torch.testing.assert_close(traced.loss, eager.loss)
        torch.testing.assert_close(traced.latent_loss, eager.latent_loss)


def test_a_decoding_step_with_a_latent_compiles_with_fullgraph(tiny_gap):
    model = tiny_gap.eval()
    start, pad, _ = model.config.latent_token_ids
    prompt = torch.tensor([[11, 12, 13, start]])
    model.model.rope_deltas = None  # positions of a text prompt, not those a generate with images left behind
    with torch.no_grad():
        prefill = model(input_ids=prompt, use_cache=True)
        latent = prefill.next_latent
        step = {"input_ids": torch.tensor([[pad]]), "latent_embeds": latent, "return_next_latent": False}
        eager = model(**step, cache=prefill.cache).logits
        prefill = model(input_ids=prompt, use_cache=True)
        torch._dynamo.reset()
        traced = torch.compile(model, fullgraph=True, backend="eager")(**step, cache=prefill.cache).logits
    torch.testing.assert_close(traced, eager)


def test_meta_init_then_to_empty_and_init_weights_leaves_no_garbage_in_the_latent_head(tiny_gap):
    """The path of low-memory loading and DeepSpeed zero.Init: build on meta, materialise, initialise."""
    with torch.device("meta"):
        model = GapForConditionalGeneration(tiny_gap.config)
    model.to_empty(device="cpu")
    for tensor in (model.latent_head.pca_mean, model.latent_head.pca_components, model.latent_head.pca_eigenvalues):
        tensor.fill_(float("nan"))  # what uninitialised memory may hold
    model.init_weights()
    head = model.latent_head
    for name, tensor in [*head.named_buffers(), *head.named_parameters()]:
        assert torch.isfinite(tensor).all(), name
    assert not head.pca_components.any() and not head.proj.weight.any() and not head.down.weight.any()


def test_converting_a_base_model_on_the_meta_device_gives_a_meta_gap_skeleton(tiny_base_dir, tiny_processor):
    config = AutoConfig.from_pretrained(tiny_base_dir)
    with torch.device("meta"):
        base = Qwen2_5_VLForConditionalGeneration(config)
    pca = synthetic_pca(config.text_config.hidden_size, 8)
    tokenizer = tiny_processor.tokenizer.__class__.from_pretrained(tiny_base_dir)
    model, tokenizer = GapForConditionalGeneration.from_qwen2_5_vl(base, tokenizer, pca, latent_tokens_per_span=K)
    assert model.latent_head.pca_components.is_meta and model.latent_head.pca_components.shape[0] == 8
    assert model.config.latent_token_ids == tuple(tokenizer.convert_tokens_to_ids(["<|latent_start|>",
                                                                                   "<|latent_pad|>",
                                                                                   "<|latent_end|>"]))


def test_gap_config_builds_with_defaults_and_round_trips():
    config = GapConfig()
    assert config.pca_num_components is None and config.latent_token_ids is None
    AutoConfig.register(GapConfig.model_type, GapConfig, exist_ok=True)  # what a tool registering the class does
    by_type = AutoConfig.for_model(GapConfig.model_type)
    assert isinstance(by_type, GapConfig)
    again = GapConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()


def test_loading_a_folder_without_latent_head_weights_reports_them_and_refuses_spans(tmp_path, tiny_gap):
    from safetensors.torch import load_file, save_file

    tiny_gap.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("latent_head.")}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    model, info = GapForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    missing = sorted(key for key in info["missing_keys"] if key.startswith("latent_head."))
    assert missing and model.latent_head.missing_keys == missing
    start, _, _ = model.config.latent_token_ids
    prompt = torch.tensor([[11, 12, 13, start]])  # the prompt opens a span: the next step feeds a latent
    with pytest.raises(ValueError, match="the latent head is random"):
        model.generate(input_ids=prompt, max_new_tokens=3)
    text = model.generate(input_ids=prompt[:, :3], max_new_tokens=3, latent_intervention="suppress")
    assert text.shape == (1, 6)


def test_a_base_checkpoint_is_refused_with_the_conversion_to_run(tiny_base_dir):
    with pytest.raises(ValueError, match="not a GAP one. Convert it first"):
        GapForConditionalGeneration.from_pretrained(tiny_base_dir)


@pytest.mark.parametrize("packed", [False, True])
def test_shift_labels_are_honoured_for_sequence_parallel_training(tiny_gap, packed):
    """Context / sequence parallelism passes labels already shifted; the loss must use them, not recompute them."""
    model = tiny_gap.eval()
    batch = _batch(model)
    labels = batch.pop("labels")
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        reference = model(**batch, labels=labels, supervised_logits_only=packed)
        pre_shifted = model(**batch, shift_labels=shifted, supervised_logits_only=packed)
        other = shifted.clone()
        other[other != -100] = (other[other != -100] + 1) % 100 + 30  # other text targets
        different = model(**batch, shift_labels=other, supervised_logits_only=packed)
    torch.testing.assert_close(pre_shifted.loss, reference.loss)
    torch.testing.assert_close(pre_shifted.latent_loss, reference.latent_loss)
    assert not torch.allclose(different.lm_loss, reference.lm_loss)
    torch.testing.assert_close(different.latent_loss, reference.latent_loss)


def test_resizing_the_embeddings_below_the_latent_tokens_is_refused(tiny_gap):
    ids = tiny_gap.config.latent_token_ids
    with pytest.raises(ValueError, match="would drop the latent tokens"):
        tiny_gap.resize_token_embeddings(max(ids))
    size = tiny_gap.get_input_embeddings().weight.shape[0]
    assert tiny_gap.get_input_embeddings().weight.shape[0] == size  # nothing changed


def test_gradient_checkpointing_gives_the_same_loss_and_gradients_with_a_latent_span(tiny_base_dir):
    from gap_pipeline.tiny import build_tiny_gap_model

    model, _ = build_tiny_gap_model(tiny_base_dir, latent_tokens_per_span=K)
    model.train()
    batch = _batch(model)

    def loss_and_grads():
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = loss_and_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed_loss, checkpointed = loss_and_grads()
    model.gradient_checkpointing_disable()
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    assert checkpointed.keys() == plain.keys() and any(n.startswith("latent_head.") for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_eager_and_sdpa_attention_agree_with_a_latent_span(tiny_gap):
    model = tiny_gap.eval()
    batch = _batch(model)
    outputs, original = {}, model.config._attn_implementation
    try:
        for implementation in ("eager", "sdpa"):
            model.set_attn_implementation(implementation)
            with torch.no_grad():
                outputs[implementation] = model(**batch)
    finally:
        model.set_attn_implementation(original)
    torch.testing.assert_close(outputs["eager"].logits, outputs["sdpa"].logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs["eager"].latent_loss, outputs["sdpa"].latent_loss, rtol=1e-4, atol=1e-6)
