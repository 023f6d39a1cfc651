"""Model core: GapConfig, GapLatentHead, GapForConditionalGeneration forward/loss, conversion, save/load."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from configuration_gap import LATENT_TOKENS, GapConfig, check_latent_tokens
from gap_pipeline.tiny import build_tiny_gap_model, synthetic_pca
from modeling_gap import GapForConditionalGeneration, GapLatentHead


K = 4
REPO = Path(__file__).resolve().parents[1]


def _ids_with_spans(model, rows):
    """Build input ids from rows of ('text', n) / ('span',) items, right-padded with the pad token."""
    start, pad, end = model.config.latent_token_ids
    generator = torch.Generator().manual_seed(0)
    sequences = []
    for row in rows:
        ids = []
        for item in row:
            if item[0] == "text":
                ids += torch.randint(10, 200, (item[1],), generator=generator).tolist()
            else:
                ids += [start] + [pad] * model.config.latent_tokens_per_span + [end]
        sequences.append(ids)
    length = max(map(len, sequences))
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, ids in enumerate(sequences):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
    return input_ids, attention_mask


def _final_norm_states(model, **inputs):
    """h_bar (the final RMSNorm output) captured with a forward hook, and the model output."""
    captured = {}
    handle = model.model.language_model.norm.register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    try:
        output = model(**inputs)
    finally:
        handle.remove()
    return captured["h"], output


def _image_inputs(processor, image, text="Describe the image."):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=[prompt], images=[image], return_tensors="pt")


# 1. No latent tokens: identical to Qwen2.5-VL --------------------------------------------------------------


def test_without_latents_logits_equal_qwen2_5_vl_with_same_weights(tiny_base_dir, tiny_processor, tiny_image):
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_base_dir).eval()
    config = GapConfig(**{k: v for k, v in base.config.to_dict().items() if k not in ("model_type", "architectures")},
                       pca_num_components=8, latent_tokens_per_span=K)
    gap = GapForConditionalGeneration(config).eval()
    missing, unexpected = gap.load_state_dict(base.state_dict(), strict=False)
    assert unexpected == [] and all(key.startswith("latent_head.") for key in missing)

    text = tiny_processor.tokenizer(["a small red square", "two blue cells in a row"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(gap(**text).logits, base(**text).logits)
        inputs = _image_inputs(tiny_processor, tiny_image())
        assert torch.equal(gap(**inputs).logits, base(**inputs).logits)


@pytest.mark.parametrize("variant", ["grown", "spare_rows", "tied"])
def test_conversion_keeps_base_logits_without_latents(variant, tiny_base_dir, tiny_base_dir_spare, tiny_base_dir_tied,
                                                      tiny_image, tiny_processor):
    base_dir = {"grown": tiny_base_dir, "spare_rows": tiny_base_dir_spare, "tied": tiny_base_dir_tied}[variant]
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    n_base_tokens = len(tokenizer)
    old_rows = base.config.text_config.vocab_size
    reference_embeddings = base.get_input_embeddings().weight[:n_base_tokens].clone()
    inputs = _image_inputs(tiny_processor, tiny_image())
    with torch.no_grad():
        base_logits = base(**inputs).logits

    gap, tokenizer = GapForConditionalGeneration.from_qwen2_5_vl(
        base, tokenizer, synthetic_pca(base.config.text_config.hidden_size, 8), latent_tokens_per_span=K
    )
    new_rows = gap.config.text_config.vocab_size
    ids = check_latent_tokens(tokenizer, gap.config)
    if variant == "spare_rows":
        assert new_rows == old_rows  # the ids fit into the spare rows: never grow (and never shrink)
    else:
        assert new_rows == max(ids) + 1 > old_rows
    assert gap.get_input_embeddings().weight.shape[0] == gap.lm_head.weight.shape[0] == new_rows
    mean_row = reference_embeddings.mean(0)
    for token_id in ids:
        torch.testing.assert_close(gap.get_input_embeddings().weight[token_id], mean_row)
    if variant == "tied":
        assert gap.lm_head.weight.data_ptr() == gap.get_input_embeddings().weight.data_ptr()
    else:
        for token_id in ids:
            torch.testing.assert_close(gap.lm_head.weight[token_id], base.lm_head.weight[:n_base_tokens].mean(0))
    with torch.no_grad():
        gap_logits = gap(**inputs).logits
    # The base tokenizer's vocabulary keeps its logits exactly; only the three new rows changed.
    assert torch.equal(gap_logits[..., :n_base_tokens], base_logits[..., :n_base_tokens])


# 2. Head at init ------------------------------------------------------------------------------------------


def _small_head_config() -> GapConfig:
    """d = 64, k = 8: the head tests' model."""
    return GapConfig(pca_num_components=8, latent_adapter_size=16,
                     text_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=32, vocab_size=50))


def _coefficient_spread(head, h_bar) -> torch.Tensor:
    """E||c - E c||^2 of the head's coefficients over the rows of `h_bar`."""
    c = head.coefficients(h_bar)
    return (c - c.mean(0)).pow(2).sum(-1).mean()


def test_head_at_init_is_the_pca_projection():
    pca = synthetic_pca(64, 8, seed=3)
    head = GapLatentHead(_small_head_config())
    head.set_pca(pca["mean"], pca["components"], pca["eigenvalues"])
    head.gate.weight.data.normal_()  # the adapter's input side is random; its zero output projection silences it
    head.up.weight.data.normal_()
    h_bar = torch.randn(5, 64) * 3
    expected = (h_bar - pca["mean"]) @ pca["components"].T
    torch.testing.assert_close(head.coefficients(h_bar), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head(h_bar), expected @ pca["components"] + pca["mean"], rtol=1e-5, atol=1e-5)


def test_head_at_init_given_the_h_bar_norm_writes_latents_with_the_targets_spread_not_h_bars():
    pca = synthetic_pca(64, 8, seed=3)
    head = GapLatentHead(_small_head_config())
    h_bar = torch.nn.functional.rms_norm(torch.randn(4000, 64), (64,)) * 2.5  # a final RMSNorm with gamma = 2.5
    head.set_pca(pca["mean"], pca["components"], pca["eigenvalues"], h_bar_norm=2.5 * 8)
    spread = _coefficient_spread(head, h_bar)
    torch.testing.assert_close(spread, pca["eigenvalues"].sum(), rtol=0.1, atol=0.0)
    # still the PCA projection, scaled: the same directions
    alpha = head.proj.weight.norm() / pca["components"].norm()
    torch.testing.assert_close(head.proj.weight, alpha * pca["components"])
    head.set_pca(pca["mean"], pca["components"], pca["eigenvalues"])  # unscaled: h_bar's own spread
    unscaled = _coefficient_spread(head, h_bar)
    assert unscaled > 10 * pca["eigenvalues"].sum()


def test_converted_head_starts_near_the_targets_norm():
    from gap_pipeline.tiny import build_tiny_gap_model

    model, _ = build_tiny_gap_model(seed=0, latent_tokens_per_span=4, pca_num_components=16)
    head = model.latent_head
    gamma = model.model.language_model.norm.weight.float()
    h_bar = torch.nn.functional.rms_norm(torch.randn(2000, gamma.numel()), (gamma.numel(),)) * gamma
    with torch.no_grad():
        spread = (head(h_bar) - head.pca_mean).norm(dim=-1).mean()
    target = head.pca_eigenvalues.sum().sqrt()
    assert 0.5 * target < spread < 2 * target


# 3. Position alignment ------------------------------------------------------------------------------------


def test_set_pca_writes_through_zero3_partitioned_parameters(tmp_path):
    # A fresh process: DeepSpeed's process group must not leak into the other tests.
    script = textwrap.dedent("""
        import os, socket, torch
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        import deepspeed
        from configuration_gap import GapConfig
        from gap_pipeline.tiny import synthetic_pca
        from modeling_gap import GapLatentHead
        deepspeed.init_distributed(dist_backend="gloo")
        config = GapConfig(pca_num_components=8, latent_adapter_size=16,
                           text_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=32, vocab_size=50))
        zero3 = {"train_micro_batch_size_per_gpu": 1,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
        with deepspeed.zero.Init(config_dict_or_path=zero3):
            head = GapLatentHead(config)
        assert head.proj.weight.numel() == 0 and hasattr(head.proj.weight, "ds_id")  # partitioned
        pca = synthetic_pca(64, 8, seed=3)
        head.set_pca(pca["mean"], pca["components"], pca["eigenvalues"])
        with deepspeed.zero.GatheredParameters(list(head.parameters())):
            torch.testing.assert_close(head.proj.weight, pca["components"].float())
            torch.testing.assert_close(head.proj.bias, -(pca["components"] @ pca["mean"]).float())
        print("written through ZeRO-3")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "written through ZeRO-3" in run.stdout


def test_latent_at_pad_p_is_predicted_from_the_state_at_p_minus_1(tiny_gap):
    model = tiny_gap.eval()
    input_ids, mask = _ids_with_spans(model, [[("text", 5), ("span",), ("text", 3)]])
    start_position = 5
    pad_positions = list(range(6, 6 + K))
    last_pad = pad_positions[-1]
    latents = torch.randn(K, model.config.text_config.hidden_size)

    def predictions(perturb_at=None):
        def hook(module, args, output):
            if perturb_at is None:
                return output
            output = output.clone()
            output[:, perturb_at] += 5.0
            return output

        handle = model.model.language_model.norm.register_forward_hook(hook)
        try:
            with torch.no_grad():
                return model(input_ids=input_ids, attention_mask=mask, latent_embeds=latents).latent_predictions
        finally:
            handle.remove()

    clean = predictions()
    assert clean.shape == (K, model.config.text_config.hidden_size)
    # The first latent comes from the <|latent_start|> position.
    changed = (predictions(start_position) - clean).abs().amax(-1) > 1e-6
    assert changed.tolist() == [True] + [False] * (K - 1)
    # Changing h_bar only at p - 1 changes only the prediction for pad p.
    for j, p in enumerate(pad_positions[1:], start=1):
        changed = (predictions(p - 1) - clean).abs().amax(-1) > 1e-6
        assert changed.tolist() == [i == j for i in range(K)]
    # The last pad's state predicts no latent.
    assert torch.equal(predictions(last_pad), clean)


# 4. Loss -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_equals_hand_computed_lm_plus_lambda_latent(tiny_gap, reduction):
    model = tiny_gap.eval()
    model.config.latent_loss_reduction = reduction
    model.config.latent_loss_weight = 0.7
    try:
        input_ids, mask = _ids_with_spans(
            model, [[("text", 4), ("span",), ("text", 2), ("span",), ("text", 3)], [("text", 9)]]
        )
        d = model.config.text_config.hidden_size
        targets = torch.randn(2 * K, d) * 2
        labels = input_ids.masked_fill(mask == 0, -100)
        labels[:, :3] = -100  # a prompt
        h_bar, output = _final_norm_states(model, input_ids=input_ids, attention_mask=mask, labels=labels,
                                           latent_embeds=targets)
    finally:
        model.config.latent_loss_reduction = "mean"
        model.config.latent_loss_weight = 1.0

    _, pad_id, _ = model.config.latent_token_ids
    # LM term: next-token cross-entropy over supervised, non-pad labels, mean over those tokens.
    logits = model.lm_head(h_bar)
    shift_labels = labels[:, 1:].masked_fill(labels[:, 1:] == pad_id, -100)
    lm = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100)
    # Latent term: v_hat = P^T (proj h + down(silu(gate h) * up h)) + mu from the state before each pad.
    head = model.latent_head
    pad_positions = (input_ids == pad_id).nonzero().tolist()
    sources = torch.stack([h_bar[b, p - 1] for b, p in pad_positions])
    c = sources @ head.proj.weight.T + head.proj.bias + (F.silu(sources @ head.gate.weight.T) * (sources @ head.up.weight.T)) @ head.down.weight.T
    v_hat = c @ head.pca_components + head.pca_mean
    per_position = ((v_hat - targets) ** 2).mean(-1) if reduction == "mean" else ((v_hat - targets) ** 2).sum(-1)
    latent = per_position.mean()

    torch.testing.assert_close(output.lm_loss, lm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.latent_loss, latent, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.loss, lm + 0.7 * latent, rtol=1e-5, atol=1e-6)
    # The usual (batch, seq, vocab) logits by default, as every causal LM returns them with labels.
    torch.testing.assert_close(output.logits, logits)


def test_supervised_logits_only_returns_the_supervised_rows_and_the_same_loss(tiny_gap):
    model = tiny_gap.eval()
    input_ids, mask = _ids_with_spans(model, [[("text", 4), ("span",), ("text", 3)], [("text", 9)]])
    targets = torch.randn(K, model.config.text_config.hidden_size)
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=mask, labels=labels, latent_embeds=targets)
        packed = model(input_ids=input_ids, attention_mask=mask, labels=labels, latent_embeds=targets,
                       supervised_logits_only=True)
    _, pad_id, _ = model.config.latent_token_ids
    shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    shift_labels = shift_labels.masked_fill(shift_labels == pad_id, -100)
    supervised = shift_labels != -100
    assert full.logits.shape == (*input_ids.shape, model.config.text_config.vocab_size)
    assert packed.logits.shape == (int(supervised.sum()), model.config.text_config.vocab_size)
    assert torch.equal(packed.supervised_mask, supervised)
    assert torch.equal(packed.supervised_labels, shift_labels[supervised])
    torch.testing.assert_close(packed.logits, full.logits[supervised])
    torch.testing.assert_close(packed.loss, full.loss)


def test_latent_loss_compares_predictions_with_latent_targets_not_the_inputs_fed(tiny_gap):
    model = tiny_gap.eval()
    input_ids, mask = _ids_with_spans(model, [[("text", 4), ("span",), ("text", 3)]])
    d = model.config.text_config.hidden_size
    fed, targets = torch.randn(K, d), torch.randn(K, d)
    labels = input_ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        teacher_forced = model(input_ids=input_ids, attention_mask=mask, labels=labels, latent_embeds=fed)
        scheduled = model(input_ids=input_ids, attention_mask=mask, labels=labels, latent_embeds=fed,
                          latent_targets=targets)
    # the same inputs, so the same predictions; only what the loss compares them with differs
    torch.testing.assert_close(scheduled.latent_predictions, teacher_forced.latent_predictions)
    expected = (scheduled.latent_predictions - targets).pow(2).mean(-1).mean()
    torch.testing.assert_close(scheduled.latent_loss, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(scheduled.latent_loss, teacher_forced.latent_loss)
    with pytest.raises(ValueError, match="latent_targets"):
        model(input_ids=input_ids, attention_mask=mask, labels=labels, latent_embeds=fed, latent_targets=targets[:1])


def test_batch_without_latents_has_zero_latent_loss_and_finite_head_gradients(tiny_gap):
    model = tiny_gap.train()
    input_ids, mask = _ids_with_spans(model, [[("text", 8)], [("text", 6)]])
    output = model(input_ids=input_ids, attention_mask=mask, labels=input_ids.masked_fill(mask == 0, -100))
    assert output.latent_loss.item() == 0.0 and torch.isfinite(output.loss)
    model.zero_grad()
    output.loss.backward()
    for name, parameter in model.latent_head.named_parameters():
        assert parameter.grad is not None, f"latent_head.{name} did not take part in the step"
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() == 0
    model.zero_grad()
    model.eval()


# 5. fp32 head --------------------------------------------------------------------------------------------


def test_head_and_buffers_stay_fp32_after_bfloat16_cast_and_bf16_reload(tmp_path, tiny_base_dir):
    model, _ = build_tiny_gap_model(tiny_base_dir, latent_tokens_per_span=K)
    head_before = {k: v.clone() for k, v in model.latent_head.state_dict().items()}
    model = model.to(torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    for name, tensor in model.latent_head.state_dict().items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, head_before[name]), f"{name} was rounded through bf16"
    input_ids, mask = _ids_with_spans(model, [[("text", 4), ("span",), ("text", 2)]])
    targets = torch.randn(K, model.config.text_config.hidden_size)
    loss = model(input_ids=input_ids, attention_mask=mask, labels=input_ids, latent_embeds=targets).loss
    assert torch.isfinite(loss)

    model.save_pretrained(tmp_path)
    reloaded = GapForConditionalGeneration.from_pretrained(tmp_path, dtype="auto")
    assert reloaded.lm_head.weight.dtype == torch.bfloat16
    for name, tensor in reloaded.latent_head.state_dict().items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, head_before[name])
    loss = reloaded(input_ids=input_ids, attention_mask=mask, labels=input_ids, latent_embeds=targets).loss
    assert torch.isfinite(loss)


# 6. save / load ------------------------------------------------------------------------------------------


def test_save_load_is_bit_exact_and_loads_as_remote_code_in_a_fresh_process(tmp_path, tiny_gap):
    tiny_gap.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"configuration_gap.py", "modeling_gap.py", "config.json", "model.safetensors"} <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_gap.GapConfig",
        "AutoModel": "modeling_gap.GapForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_gap.GapForConditionalGeneration",
    }
    reloaded = GapForConditionalGeneration.from_pretrained(tmp_path)
    original, loaded = tiny_gap.state_dict(), reloaded.state_dict()
    assert original.keys() == loaded.keys()
    for key in original:
        assert torch.equal(original[key], loaded[key]), key

    input_ids, mask = _ids_with_spans(tiny_gap, [[("text", 4), ("span",), ("text", 2)]])
    torch.save({"input_ids": input_ids, "targets": torch.randn(K, tiny_gap.config.text_config.hidden_size)},
               tmp_path / "probe.pt")
    with torch.no_grad():
        probe = torch.load(tmp_path / "probe.pt")
        expected = tiny_gap(input_ids=probe["input_ids"], latent_embeds=probe["targets"]).logits
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        assert not any("configuration_gap" in m or "modeling_gap" in m for m in sys.modules)
        from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
        path = {str(tmp_path)!r}
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
        bare = AutoModel.from_pretrained(path, trust_remote_code=True)
        probe = torch.load(path + "/probe.pt")
        with torch.no_grad():
            logits = model(input_ids=probe["input_ids"], latent_embeds=probe["targets"]).logits
        assert torch.equal(logits, torch.load(path + "/expected.pt"))
        print(type(config).__name__, type(model).__module__, type(model).__name__, type(bare).__name__)
    """)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path.parent, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    config_name, module, name, bare_name = run.stdout.split()[-4:]
    assert config_name == "GapConfig" and name == bare_name == "GapForConditionalGeneration"
    assert module.startswith("transformers_modules."), module


# 7. Errors ----------------------------------------------------------------------------------------------


def test_bad_latent_embeds_raise_clear_errors(tiny_gap):
    model = tiny_gap
    d = model.config.text_config.hidden_size
    input_ids, mask = _ids_with_spans(model, [[("text", 4), ("span",), ("text", 2)]])
    with pytest.raises(ValueError, match=f"holds {K} <\\|latent_pad\\|> tokens but no `latent_embeds`"):
        model(input_ids=input_ids)
    with pytest.raises(ValueError, match=f"shape \\({K - 1}, {d}\\) but `input_ids` holds {K}"):
        model(input_ids=input_ids, latent_embeds=torch.randn(K - 1, d))
    with pytest.raises(ValueError, match=f"width {d + 1}, but the model's hidden size is d={d}"):
        model(input_ids=input_ids, latent_embeds=torch.randn(K, d + 1))
    bad = torch.randn(K, d)
    bad[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[2\] contain NaN or inf"):
        model(input_ids=input_ids, latent_embeds=bad)
    text_only, _ = _ids_with_spans(model, [[("text", 6)]])
    with pytest.raises(ValueError, match="has no <\\|latent_pad\\|> token"):
        model(input_ids=text_only, latent_embeds=torch.randn(2, d))


def test_bad_pca_raises_clear_errors(tiny_gap):
    head = tiny_gap.latent_head
    d, k = head.hidden_size, head.out_features
    pca = synthetic_pca(d, k)
    with pytest.raises(ValueError, match=f"expected \\(k, d={d}\\)"):
        head.set_pca(torch.zeros(d), torch.zeros(k, d + 2), pca["eigenvalues"])
    with pytest.raises(ValueError, match="mean has shape"):
        head.set_pca(torch.zeros(d + 2), pca["components"], pca["eigenvalues"])
    with pytest.raises(ValueError, match="not orthonormal rows"):
        head.set_pca(pca["mean"], pca["components"] * 2, pca["eigenvalues"])
    with pytest.raises(ValueError, match=f"k={k + 1} components but the config says pca_num_components={k}"):
        head.set_pca(pca["mean"], synthetic_pca(d, k + 1)["components"], pca["eigenvalues"])


@pytest.mark.parametrize("value", [35, 0, -4, 2.0])
def test_latent_budget_must_be_a_perfect_square(value):
    with pytest.raises(ValueError, match="latent_tokens_per_span"):
        GapConfig(pca_num_components=8, latent_tokens_per_span=value)


def test_invalid_config_fields_raise_at_construction():
    with pytest.raises(ValueError, match="latent_head_type"):
        GapConfig(pca_num_components=8, latent_head_type="mlp")
    with pytest.raises(ValueError, match="latent_loss_reduction"):
        GapConfig(pca_num_components=8, latent_loss_reduction="max")
    with pytest.raises(ValueError, match="pca_num_components"):
        GapConfig(latent_head_type="pca", pca_num_components=0)
    with pytest.raises(ValueError, match="all three latent token ids"):
        GapConfig(pca_num_components=8, latent_start_token_id=3)


def test_tokenizer_without_latent_tokens_is_refused(tiny_base_dir, tiny_gap):
    base_tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    with pytest.raises(ValueError, match="lacks the latent tokens"):
        check_latent_tokens(base_tokenizer, tiny_gap.config)
    base_tokenizer.add_tokens(list(reversed(LATENT_TOKENS)), special_tokens=True)
    with pytest.raises(ValueError, match="expects"):
        check_latent_tokens(base_tokenizer, tiny_gap.config)
