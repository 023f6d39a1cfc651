"""GapDataCollator: labels, difficulty-aware stripping, mixed batches, precomputed pixels, model loss, errors."""

import numpy as np
import pytest
import torch

from gap_pipeline import GapError
from gap_pipeline.collator import GapDataCollator, ImageFeatureCache
from gap_pipeline.data import GapDataError
from modeling_gap import IGNORE_INDEX
from processing_gap import LATENT_PLACEHOLDER, GapProcessor


K = 4
D = 64  # the tiny model's hidden size


@pytest.fixture(scope="module")
def processor(tiny_gap_and_processor):
    return tiny_gap_and_processor[1]


@pytest.fixture(scope="module")
def collator(processor):
    return GapDataCollator(processor)


def _targets(n_spans, seed=0):
    return np.random.default_rng(seed).normal(size=(n_spans * K, D)).astype(np.float32)


def _text_row(answer, accuracy=None, targets=None, question="Hi", **extra):
    row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    if accuracy is not None:
        row["accuracy"] = accuracy
    if targets is not None:
        row["latent_targets"] = targets
    row.update(extra)
    return row


def _image_row(image, answer, targets=None, accuracy=None, **extra):
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": [image],
        "aux_images": [image] * answer.count("<latent>"),
        "accuracy": accuracy,
    }
    if targets is not None:
        row["latent_targets"] = targets
    row.update(extra)
    return row


def _expected_labels(processor, messages, answer_text):
    """Labels built from pieces: -100 on the prompt, the answer's ids (pads -100), <|im_end|>, then -100 on '\\n'."""
    prompt = processor.apply_chat_template(messages[:1], add_generation_prompt=True)
    tokenizer = processor.tokenizer
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(answer_text.replace(LATENT_PLACEHOLDER, processor.latent_span_text()) + "<|im_end|>")["input_ids"]
    tail = tokenizer("\n")["input_ids"]
    ids = prompt_ids + answer_ids + tail
    labels = [IGNORE_INDEX] * len(prompt_ids)
    labels += [IGNORE_INDEX if t == processor.latent_pad_token_id else t for t in answer_ids]
    labels += [IGNORE_INDEX] * len(tail)
    return ids, labels


# 2. labels ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", ["Look <latent> so 3.", "First <latent> then <latent> so 3."])
def test_labels_mask_prompt_padding_and_latent_pads_exactly(collator, processor, answer):
    n_spans = answer.count("<latent>")
    row = _text_row(answer, targets=_targets(n_spans), aux_images=["x"] * n_spans)
    short = _text_row("ok")
    batch = collator([row, short])
    ids, labels = _expected_labels(processor, row["messages"], answer)
    n = len(ids)
    assert batch["input_ids"][0, :n].tolist() == ids
    assert batch["labels"][0, :n].tolist() == labels
    start, pad, end = processor.latent_token_ids
    # where the spans are, by position: start/end supervised, the K pads not
    starts = [i for i, t in enumerate(ids) if t == start]
    assert len(starts) == n_spans
    for s in starts:
        assert labels[s] == start and labels[s + K + 1] == end
        assert labels[s + 1 : s + K + 1] == [IGNORE_INDEX] * K
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert labels[-2] == im_end and labels[-1] == IGNORE_INDEX  # turn-closing <|im_end|> supervised, '\n' not
    # the short row is right-padded: pad ids, mask 0, labels -100
    m = int(batch["attention_mask"][1].sum())
    assert batch["attention_mask"][1, :m].all() and not batch["attention_mask"][1, m:].any()
    assert (batch["input_ids"][1, m:] == processor.tokenizer.pad_token_id).all()
    assert (batch["labels"][1, m:] == IGNORE_INDEX).all()
    assert torch.equal(batch["latent_embeds"], torch.from_numpy(row["latent_targets"]))
    assert batch["latent_embeds"].shape[0] == n_spans * K == int((batch["input_ids"] == pad).sum())


def test_collator_ids_and_labels_match_the_processors_assistant_mask(collator, processor, tiny_image):
    image = tiny_image(seed=4)
    row = _image_row(image, "See <latent> then 2.", targets=_targets(1))
    batch = collator([row])
    messages = [dict(m) for m in row["messages"]]
    messages[0] = {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "How many?"}]}
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                        return_tensors="pt")
    assert torch.equal(batch["input_ids"], out["input_ids"])
    expected = torch.where(out["assistant_masks"].bool() & (out["input_ids"] != processor.latent_pad_token_id),
                           out["input_ids"], IGNORE_INDEX)
    assert torch.equal(batch["labels"], expected)
    assert torch.equal(batch["pixel_values"], out["pixel_values"])
    assert torch.equal(batch["image_grid_thw"], out["image_grid_thw"])
    assert torch.equal(batch["mm_token_type_ids"], out["mm_token_type_ids"])


# 3. difficulty-aware stripping ------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.0, 0.375])
def test_accuracy_at_tau_keeps_spans_and_just_above_strips_them_and_their_targets(processor, tau):
    collator = GapDataCollator(processor, difficulty_threshold=tau)
    above = float(np.nextafter(tau, 1.0))
    answer = "Look <latent> so 3."
    kept = collator([_text_row(answer, accuracy=tau, targets=_targets(1), aux_images=["x"])])
    stripped = collator([_text_row(answer, accuracy=above, targets=_targets(1), aux_images=["x"])])
    missing = collator([_text_row(answer, targets=_targets(1))])
    start, pad, end = processor.latent_token_ids
    assert int((kept["input_ids"] == pad).sum()) == K and kept["latent_embeds"].shape == (K, D)
    assert torch.equal(missing["input_ids"], kept["input_ids"]) and "latent_embeds" in missing
    assert "latent_embeds" not in stripped
    assert not torch.isin(stripped["input_ids"], torch.tensor([start, pad, end])).any()
    plain = collator([_text_row("Look so 3.")])
    assert torch.equal(stripped["input_ids"], plain["input_ids"])
    assert torch.equal(stripped["labels"], plain["labels"])


def test_a_stripped_row_needs_no_targets(collator):
    batch = collator([_text_row("Look <latent> so 3.", accuracy=0.5, aux_images=["x"])])
    assert "latent_embeds" not in batch


# mixed batches -------------------------------------------------------------------------------------------------


def test_mixed_batch_of_latent_text_only_and_imageless_rows(collator, processor, tiny_image):
    rows = [
        _image_row(tiny_image(seed=0), "A <latent> B <latent> C.", targets=_targets(2, seed=1)),
        _text_row("Plain answer.", accuracy=1.0),
        _image_row(tiny_image(seed=2, size=(150, 90)), "Easy <latent> one.", targets=_targets(1, seed=2), accuracy=0.9),
        _text_row("No image <latent> here.", targets=_targets(1, seed=3), id="r3"),
    ]
    batch = collator(rows)
    pad = processor.latent_pad_token_id
    assert batch["input_ids"].shape[0] == 4
    per_row = (batch["input_ids"] == pad).sum(1).tolist()
    assert per_row == [2 * K, 0, 0, K]
    # targets in the row-major order of the pads: row 0's two spans, then row 3's
    assert torch.equal(batch["latent_embeds"], torch.cat([torch.from_numpy(rows[0]["latent_targets"]),
                                                          torch.from_numpy(rows[3]["latent_targets"])]))
    # pixels of the two image rows, in order; their image tokens typed 1
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 6, 10]]
    assert batch["pixel_values"].shape[0] == 64 + 60
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == processor.image_token_id).long())
    assert batch["mm_token_type_ids"].sum(1).tolist() == [16, 0, 15, 0]
    assert set(batch) == {"input_ids", "attention_mask", "labels", "mm_token_type_ids", "pixel_values",
                          "image_grid_thw", "latent_embeds"}


def test_text_only_batch_has_no_pixel_or_latent_tensors(collator):
    batch = collator([_text_row("a"), _text_row("b c d", accuracy=0.2)])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "mm_token_type_ids"}
    assert batch["input_ids"].dtype == torch.long and not batch["mm_token_type_ids"].any()


def test_targets_may_come_as_lists_tensors_or_span_arrays(collator):
    targets = _targets(2)
    forms = [targets.tolist(), torch.from_numpy(targets).half(), targets.reshape(2, K, D)]
    base = collator([_text_row("a <latent> b <latent>", targets=targets)])["latent_embeds"]
    for form in forms:
        got = collator([_text_row("a <latent> b <latent>", targets=form)])["latent_embeds"]
        assert got.dtype == torch.float32 and got.shape == (2 * K, D)
        assert torch.allclose(got, base, atol=1e-2)


# precomputed pixels ------------------------------------------------------------------------------------------


def test_rows_with_precomputed_pixels_give_the_same_batch_without_image_processing(collator, processor, tiny_image):
    images = [tiny_image(seed=0, size=(112, 112)), tiny_image(seed=1, size=(150, 90))]
    rows = [
        _image_row(images[0], "A <latent> B.", targets=_targets(1, seed=5)),
        _text_row("text only <latent>", targets=_targets(1, seed=6)),
        _image_row(images[1], "C.", accuracy=0.0),
    ]
    precomputed_rows = []
    for row in rows:
        row = dict(row)
        if row.get("images"):  # the image processor's output for the row's images, as numpy columns
            out = processor.image_processor(images=row.pop("images"), return_tensors="np")
            row["pixel_values"], row["image_grid_thw"] = out["pixel_values"], out["image_grid_thw"]
        precomputed_rows.append(row)

    on_the_fly = collator(rows)
    calls = []
    original = processor.image_processor.__class__.__call__
    try:
        processor.image_processor.__class__.__call__ = lambda *a, **k: calls.append(1) or original(*a, **k)
        precomputed = collator(precomputed_rows)
    finally:
        processor.image_processor.__class__.__call__ = original
    assert calls == []  # no PIL / image-processor work in the step
    assert on_the_fly.keys() == precomputed.keys()
    for key in on_the_fly:
        assert torch.equal(on_the_fly[key], precomputed[key]), key


# token cache ---------------------------------------------------------------------------------------------------


def test_a_cached_collation_equals_an_uncached_one_also_for_stripped_rows_and_other_image_sizes(
    processor, tiny_image, monkeypatch
):
    answer = "Look <latent> so 3."
    rows = [
        _image_row(tiny_image(seed=0), answer, targets=_targets(1, seed=1), accuracy=0.0),
        _image_row(tiny_image(seed=0), answer, targets=_targets(1, seed=1), accuracy=1.0),  # stripped: text only
        _image_row(tiny_image(seed=2, size=(150, 90)), answer, targets=_targets(1, seed=2)),  # same text, other grid
        _text_row(answer, targets=_targets(1, seed=3), id="t"),
        _text_row(answer, accuracy=0.5, id="t-easy"),
    ]
    uncached = GapDataCollator(processor, cache_tokens=0)
    cached = GapDataCollator(processor)
    expected = uncached(rows)
    tokenized = []
    encode = processor.encode_conversation
    monkeypatch.setattr(processor, "encode_conversation", lambda *a, **k: tokenized.append(1) or encode(*a, **k))
    first = cached(rows)
    assert len(tokenized) == len(rows)
    for order in (rows, rows[::-1]):  # from the cache, in either order
        tokenized.clear()
        again = cached(order)
        assert tokenized == []
        reference = expected if order is rows else uncached(order)
        assert again.keys() == reference.keys() == first.keys()
        for key in reference:
            assert torch.equal(again[key], reference[key]), key
    assert (expected["input_ids"][1] != processor.latent_pad_token_id).all()  # the stripped row has no span
    # a tiny budget keeps what fits and tokenizes the rest every time, with the same result
    small = GapDataCollator(processor, cache_tokens=int(expected["attention_mask"][3].sum()))
    for _ in range(2):
        batch = small(rows)
        for key in expected:
            assert torch.equal(batch[key], expected[key]), key


# image feature cache ------------------------------------------------------------------------------------------


def test_an_image_whose_features_are_cached_gets_its_grid_and_no_pixels(processor, tiny_image, tmp_path):
    path = tmp_path / "a.png"
    tiny_image(seed=0).save(path)
    wide = tiny_image(seed=1, size=(150, 90))
    encoded = tmp_path / "c.png"
    tiny_image(seed=2).save(encoded)
    rows = [
        _image_row(str(path), "A <latent> B.", targets=_targets(1, seed=5)),
        _image_row(wide, "C."),  # a PIL image
        _text_row("text only."),
        _image_row({"bytes": encoded.read_bytes(), "path": None}, "D."),
    ]
    expected = GapDataCollator(processor)(rows)
    collator = GapDataCollator(processor)
    collator.feature_cache = cache = ImageFeatureCache(2**20)
    first = collator(rows)
    keys = first.pop("image_keys")
    assert len(set(keys)) == 3 and None not in keys and first.pop("cached_images").tolist() == [False] * 3
    assert first.keys() == expected.keys() and all(torch.equal(first[k], expected[k]) for k in expected)

    grids = expected["image_grid_thw"]
    tokens = (grids.prod(-1) // processor.image_processor.merge_size**2).tolist()
    for i in (0, 2):  # the trainer would store the tower's features of the first and the third image
        cache.add(keys[i], torch.zeros(tokens[i], D), grids[i])
    again = collator(rows)
    assert again.pop("image_keys") == keys and again.pop("cached_images").tolist() == [True, False, True]
    patches = grids.prod(-1).tolist()
    assert torch.equal(again.pop("pixel_values"), expected["pixel_values"][patches[0] : patches[0] + patches[1]])
    assert all(torch.equal(again[k], expected[k]) for k in again) and again.keys() == expected.keys() - {"pixel_values"}

    cache.add(keys[1], torch.zeros(tokens[1], D), grids[1])
    assert "pixel_values" not in collator(rows)  # every image known: no image processing at all
    tiny_image(seed=3).save(path)  # the file changes: its content key changes, the stale features are not used
    changed = collator(rows)
    assert changed["image_keys"][0] != keys[0] and changed["cached_images"].tolist() == [False, True, True]
    assert len(cache) == 3 and cache.nbytes == sum(tokens) * D * 4


def test_the_image_feature_cache_stops_adding_when_full(tiny_image):
    cache = ImageFeatureCache(2 * 16 * D * 4)
    for key in "abc":
        cache.add(key, torch.ones(16, D), torch.tensor([1, 8, 8]))
    assert len(cache) == 2 and cache.get("c") is None and cache.get("a")[1].tolist() == [1, 8, 8]
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


# 5. the model's loss on a collated batch equals the loss on hand-built inputs ----------------------------------


def test_model_loss_on_collated_batch_equals_loss_on_hand_built_inputs(tiny_gap_and_processor, tiny_image):
    model, processor = tiny_gap_and_processor
    collator = GapDataCollator(processor)
    image = tiny_image(seed=7)
    targets0 = _targets(2, seed=11) * 3.0
    targets1 = _targets(1, seed=12) * 3.0
    rows = [
        _image_row(image, "Look <latent> and <latent> so 5.", targets=targets0),
        _text_row("Text <latent> done.", targets=targets1),
    ]
    batch = collator(rows)

    # by hand: the processor's __call__ path for ids, labels from the prompt length, targets in pad order
    start, pad, end = processor.latent_token_ids
    span = "<|latent_start|>" + "<|latent_pad|>" * K + "<|latent_end|>"
    full0 = (processor.apply_chat_template(rows[0]["messages"][:1], add_generation_prompt=True)
             + f"Look {span} and {span} so 5.<|im_end|>\n")
    prompt0 = processor.apply_chat_template(rows[0]["messages"][:1], add_generation_prompt=True)
    enc0 = processor(text=[full0], images=[image], return_tensors="pt")
    n_prompt0 = processor(text=[prompt0], images=[image], return_tensors="pt")["input_ids"].shape[1]
    full1 = processor.apply_chat_template(rows[1]["messages"][:1], add_generation_prompt=True) + (
        f"Text {span} done.<|im_end|>\n")
    prompt1 = processor.apply_chat_template(rows[1]["messages"][:1], add_generation_prompt=True)
    ids1 = processor.tokenizer(full1, return_tensors="pt")["input_ids"][0]
    n_prompt1 = len(processor.tokenizer(prompt1)["input_ids"])
    ids0 = enc0["input_ids"][0]
    length = max(len(ids0), len(ids1))
    input_ids = torch.full((2, length), processor.tokenizer.pad_token_id)
    attention_mask = torch.zeros(2, length, dtype=torch.long)
    labels = torch.full((2, length), IGNORE_INDEX)
    for i, (ids, n_prompt) in enumerate(((ids0, n_prompt0), (ids1, n_prompt1))):
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
        lab = ids.clone()
        lab[:n_prompt] = IGNORE_INDEX
        lab[-1] = IGNORE_INDEX  # the '\n' after <|im_end|>
        lab[lab == pad] = IGNORE_INDEX
        labels[i, : len(ids)] = lab
    hand = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "mm_token_type_ids": (input_ids == processor.image_token_id).long(),
        "pixel_values": enc0["pixel_values"],
        "image_grid_thw": enc0["image_grid_thw"],
        "latent_embeds": torch.from_numpy(np.concatenate([targets0, targets1])),
    }
    for key in hand:
        assert torch.equal(batch[key], hand[key]), key

    with torch.no_grad():
        out_batch = model(**batch)
        out_hand = model(**hand)
        swapped = dict(hand, latent_embeds=torch.from_numpy(np.concatenate([targets0[K:], targets0[:K], targets1])))
        out_swapped = model(**swapped)
    assert out_batch.latent_loss > 0
    torch.testing.assert_close(out_batch.loss, out_hand.loss, rtol=0, atol=0)
    torch.testing.assert_close(out_batch.latent_loss, out_hand.latent_loss, rtol=0, atol=0)
    # the check can fail: the same targets on the wrong pads give another loss
    assert not torch.isclose(out_swapped.latent_loss, out_hand.latent_loss)


# 7. errors ---------------------------------------------------------------------------------------------------------

ERRORS = {
    "aux images without targets": (_text_row("a <latent>", aux_images=["x"], id="q1"), "run `gap targets`"),
    "placeholder without aux images or targets": (_text_row("a <latent>"), "neither 'aux_images' nor"),
    "too few targets": (_text_row("a <latent> <latent>", targets=_targets(1), aux_images=["x", "y"]),
                        r"shape \(4, 64\) but 2 placeholder\(s\) x K=4"),
    "targets without placeholders": (_text_row("plain", targets=_targets(1)), "no <latent> placeholder"),
    "non-finite targets": (_text_row("a <latent>", targets=np.full((K, D), np.nan)), "NaN or inf"),
    "aux image count": (_text_row("a <latent> <latent>", targets=_targets(2), aux_images=["x"]),
                        r"2 <latent> placeholder\(s\) but 'aux_images' holds 1"),
    "no assistant turn": ({"messages": [{"role": "user", "content": "Q"}]}, "no assistant turn"),
    "no messages": ({"messages": []}, "non-empty list"),
    "placeholder in user turn": (_text_row("a", question="Q <latent>"), "outside assistant turns"),
    "accuracy out of range": (_text_row("a", accuracy=1.5), r"field 'accuracy': is 1.5"),
    "image entries != images": (
        {"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "a"}],
         "images": []},
        r"1 \{'type': 'image'\} entries but 'images' holds 0",
    ),
    "half of the precomputed pixels": (_text_row("a", pixel_values=np.zeros((4, 1176))), "only one of"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_collator_errors_name_the_row_and_the_fix(collator, case):
    row, pattern = ERRORS[case]
    good = _text_row("fine")
    with pytest.raises(GapDataError, match=pattern) as info:
        collator([good, row])
    assert "batch row 1" in str(info.value)


def test_error_names_the_row_id(collator):
    with pytest.raises(GapDataError, match=r"batch row 0 \(id='q1'\)"):
        collator([ERRORS["aux images without targets"][0]])


def test_a_row_longer_than_max_length_is_an_error_never_truncated(processor):
    row = _text_row("Look <latent> so 3.", targets=_targets(1), id="long")
    length = GapDataCollator(processor)([row])["input_ids"].shape[1]
    assert GapDataCollator(processor, max_length=length)([row])["input_ids"].shape[1] == length
    with pytest.raises(GapDataError, match=rf"batch row 0 \(id='long'\): is {length} tokens long, more than "
                                           rf"max_length={length - 1}"):
        GapDataCollator(processor, max_length=length - 1)([row])


def test_bad_collator_arguments_are_refused_with_the_one_gap_error(processor, tiny_processor):
    with pytest.raises(GapError, match="difficulty_threshold"):
        GapDataCollator(processor, difficulty_threshold=float("nan"))
    with pytest.raises(GapError, match="max_length"):
        GapDataCollator(processor, max_length=0)
    with pytest.raises(GapError, match="cache_tokens"):
        GapDataCollator(processor, cache_tokens=-1)
    with pytest.raises(GapDataError, match="empty batch"):
        GapDataCollator(processor)([])
    with pytest.raises(GapError, match="latent_tokens_per_span"):  # a plain processor does not know K
        GapDataCollator(tiny_processor)
    # ... and its tokenizer has no latent tokens: the remote code's own check (configuration_gap.py, which a Hub user
    # loads without this package), so a ValueError as transformers raises
    with pytest.raises(ValueError, match="lacks the latent tokens"):
        GapDataCollator(tiny_processor, latent_tokens_per_span=4)


def test_k_can_be_overridden_and_a_plain_processor_with_latent_tokens_is_wrapped(processor):
    from gap_pipeline.qwen_processor import ImageOnlyQwen2_5_VLProcessor

    collator = GapDataCollator(processor, latent_tokens_per_span=9)
    batch = collator([_text_row("a <latent>", targets=np.zeros((9, D), np.float32))])
    assert int((batch["input_ids"] == processor.latent_pad_token_id).sum()) == 9
    assert processor.latent_tokens_per_span == K  # the given processor is not changed
    plain = ImageOnlyQwen2_5_VLProcessor(processor.image_processor, processor.tokenizer)
    wrapped = GapDataCollator(plain, latent_tokens_per_span=K)
    assert isinstance(wrapped.processor, GapProcessor)
    row = _text_row("a <latent>", targets=_targets(1))
    assert torch.equal(wrapped([row])["input_ids"], GapDataCollator(processor)([row])["input_ids"])


def test_a_processor_loaded_with_auto_processor_trust_remote_code_is_accepted(processor, tmp_path):
    from transformers import AutoProcessor

    processor.save_pretrained(tmp_path / "saved")
    remote = AutoProcessor.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    assert type(remote) is not GapProcessor  # the checkpoint's own copy of processing_gap.py
    row = _text_row("a <latent>", targets=_targets(1))
    expected = GapDataCollator(processor)([row])["input_ids"]
    assert torch.equal(GapDataCollator(remote)([row])["input_ids"], expected)
    resized = GapDataCollator(remote, latent_tokens_per_span=9)
    assert type(resized.processor) is type(remote) and resized.processor.latent_tokens_per_span == 9
