"""`gap filter`: each quality filter removes the rows that trip it and keeps the rows that do not (paper App. I)."""

import json

import numpy as np
import pytest

from gap_pipeline.cli import main as gap_main
from gap_pipeline.data import load_jsonl
from gap_pipeline.filters import (
    FilterError,
    FilterThresholds,
    QueryEncoder,
    alpha_fraction,
    filter_rows,
    repeated_ngram_fraction,
    spans_without_parser,
)
from gap_pipeline.targets import TARGETS_COLUMN, compute_latent_targets, load_vision_tower, targets_metadata

K = 4
GOOD_PARSERS = [
    "six bricks are marked in yellow along the lower wall",
    "the red line joins point A to the centre of the circle",
    "three apples sit on the left side of the table",
    "the tallest bar belongs to the year two thousand and ten",
]
# id -> (assistant response, aux image: "own" = a fresh image, "query" = the query image itself)
ROWS = {
    "ok0": (f"<think>look <latent> <parser>{GOOD_PARSERS[0]}</parser></think><answer>6</answer>", "own"),
    "ok1": (f"<think>look <latent><parser>{GOOD_PARSERS[1]}</parser> so</think><answer>B</answer>", "own"),
    "ok2": (f"<think>look <latent> <parser>{GOOD_PARSERS[2]}</parser></think><answer>3</answer>", "own"),
    "ok3": (f"<think>look <latent> <parser>{GOOD_PARSERS[3]}</parser></think><answer>2010</answer>", "own"),
    "text_only": ("<think>no picture needed</think><answer>4</answer>", None),
    "nan": (f"<think>look <latent> <parser>{GOOD_PARSERS[0]} again</parser></think><answer>1</answer>", "own"),
    "flat": (f"<think>look <latent> <parser>{GOOD_PARSERS[1]} again</parser></think><answer>1</answer>", "own"),
    "quiet": (f"<think>look <latent> <parser>{GOOD_PARSERS[2]} again</parser></think><answer>1</answer>", "own"),
    "copy": (f"<think>look <latent> <parser>{GOOD_PARSERS[3]} again</parser></think><answer>1</answer>", "query"),
    "no_parser": ("<think>look <latent> then count</think><answer>5</answer>", "own"),
    "empty_parser": ("<think>look <latent> <parser>  </parser></think><answer>5</answer>", "own"),
    "short": ("<think>look <latent> <parser>ok</parser></think><answer>5</answer>", "own"),
    "long": ("<think>look <latent> <parser>" + " ".join(f"w{i}" for i in range(600)) + "</parser></think>", "own"),
    "loop": ("<think>look <latent> <parser>" + "the red brick " * 8 + "</parser></think><answer>5</answer>", "own"),
    "digits": ("<think>look <latent> <parser>12 34 56 78 90 = 11 + 7</parser></think><answer>5</answer>", "own"),
}
EXPECTED = {
    "nan": "degenerate_aux",
    "flat": "degenerate_aux",
    "copy": "degenerate_aux",
    "no_parser": "missing_parser",
    "empty_parser": "missing_parser",
    "short": "parser_length",
    "long": "parser_length",
    "loop": "parser_incoherent",
    "digits": "parser_incoherent",
}


def _write_rows(folder, tiny_image, rows):
    folder.mkdir(parents=True)
    (folder / "img").mkdir()
    records = []
    for n, (row_id, (response, aux)) in enumerate(rows.items()):
        tiny_image(seed=n).save(folder / "img" / f"{row_id}.png")
        record = {"id": row_id, "images": [f"img/{row_id}.png"],
                  "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Q{n}?"}]},
                               {"role": "assistant", "content": response}]}
        if aux == "own":
            tiny_image(seed=100 + n).save(folder / "img" / f"{row_id}_aux.png")
        record["aux_images"] = {"own": [f"img/{row_id}_aux.png"], "query": [f"img/{row_id}.png"], None: []}[aux]
        records.append(record)
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _edit_targets(targets):
    """NaN in row 'nan'; row 'flat' squeezed to 0.1x (variance 0.01x) and 'quiet' to 0.5x (0.25x) around their mean."""

    def edit(row):
        if row["id"] not in ("nan", "flat", "quiet"):
            return {}
        values = np.asarray(row[TARGETS_COLUMN], dtype=np.float32)
        mean = values.mean(axis=0, keepdims=True)
        if row["id"] == "nan":
            values = values.copy()
            values[1, 3] = np.nan
        elif row["id"] == "flat":
            values = mean + 0.1 * (values - mean)
        elif row["id"] == "quiet":
            values = mean + 0.5 * (values - mean)
        return {TARGETS_COLUMN: values.tolist()}

    return targets.map(edit, features=targets.features)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_image, tiny_base_dir, tiny_processor):
    """The JSONL of ROWS, its `gap targets` folder (K=4, float32, edited by `_edit_targets`), the vision tower."""
    folder = tmp_path_factory.mktemp("filter") / "data"
    path = _write_rows(folder, tiny_image, ROWS)
    tower = load_vision_tower(tiny_base_dir)
    targets, _ = compute_latent_targets(load_jsonl(path), tower, tiny_processor.image_processor,
                                        latent_tokens_per_span=K, storage_dtype="float32", progress=False)
    targets = _edit_targets(targets)
    targets_dir = folder.parent / "train_targets"
    targets.save_to_disk(str(targets_dir))
    return {"jsonl": path, "targets_dir": targets_dir, "tower": tower}


@pytest.fixture(scope="module")
def removed(data, tiny_tokenizer, tiny_processor):
    """id -> (reason, detail) of the rows `filter_rows` removes with the default thresholds."""
    import datasets

    rows = load_jsonl(data["jsonl"])
    targets = datasets.load_from_disk(str(data["targets_dir"]))
    result = filter_rows(rows, tiny_tokenizer, targets=targets,
                         query_encoder=QueryEncoder(data["tower"], tiny_processor.image_processor))
    assert result.num_rows == len(ROWS)
    return {r.id: (r.reason, r.detail) for r in result.removed}


def _reasons(removed, reason):
    return {row_id for row_id, (r, _) in removed.items() if r == reason}


def test_exactly_the_planted_rows_are_removed_each_for_its_reason(removed):
    assert {row_id: reason for row_id, (reason, _) in removed.items()} == EXPECTED


def test_degenerate_aux_non_finite_constant_and_query_copy_spans_trip_and_varied_spans_do_not(removed):
    assert _reasons(removed, "degenerate_aux") == {"nan", "flat", "copy"}
    assert "NaN" in removed["nan"][1]
    assert "nearly constant" in removed["flat"][1]  # variance 0.01x the median's < 0.05
    assert "query image" in removed["copy"][1]  # the aux image is the query image: distance ~0
    # 'quiet' spans (0.25x the variance, above the 0.05 ratio) and the other rows' own aux images stay
    assert not {"quiet", "ok0", "ok1", "ok2", "ok3"} & set(removed)


def test_the_query_check_compares_pooled_query_embeddings_with_the_span(data, tiny_tokenizer, tiny_processor):
    import datasets

    rows, targets = load_jsonl(data["jsonl"]), datasets.load_from_disk(str(data["targets_dir"]))
    encoder = QueryEncoder(data["tower"], tiny_processor.image_processor)
    off = filter_rows(rows, tiny_tokenizer, FilterThresholds(min_query_distance=0), targets=targets, query_encoder=encoder)
    assert "copy" not in {r.id for r in off.removed}  # check turned off
    loose = filter_rows(rows, tiny_tokenizer, FilterThresholds(min_query_distance=10), targets=targets,
                        query_encoder=encoder)
    # every row with a span is within 10x of its query image: all are removed, the text-only row is not
    assert {r.id for r in loose.removed} == set(ROWS) - {"text_only"}
    assert off.statistics["span_variance_ratio"]["count"] == len(ROWS) - 2  # spans: all but text_only; nan excluded


def test_missing_parser_trips_on_a_span_without_parser_text_only_where_the_data_uses_parsers(removed, tiny_tokenizer):
    assert _reasons(removed, "missing_parser") == {"no_parser", "empty_parser"}
    assert "text_only" not in removed  # no span, no parser needed
    assert spans_without_parser("a <latent> <parser>x</parser> b <latent> c") == [1]
    assert spans_without_parser("a <latent> b <parser>x</parser> <latent><parser>y</parser>") == []
    from datasets import Dataset

    no_parsers = Dataset.from_list([{"messages": [{"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": "a <latent> b"}]}])
    assert filter_rows(no_parsers, tiny_tokenizer).removed == []  # auto: data without parsers
    required = filter_rows(no_parsers, tiny_tokenizer, FilterThresholds(parser_required="yes"))
    assert [r.reason for r in required.removed] == ["missing_parser"]


def test_parser_length_trips_outside_the_token_range_of_the_models_tokenizer(removed, data, tiny_tokenizer):
    assert _reasons(removed, "parser_length") == {"short", "long"}

    def n_tokens(text):
        return len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])

    assert f"has {n_tokens('ok')} tokens, outside [3, 512]" in removed["short"][1]
    length = n_tokens(GOOD_PARSERS[0])
    rows = load_jsonl(data["jsonl"])
    tight = filter_rows(rows, tiny_tokenizer, FilterThresholds(parser_max_tokens=length - 1))
    assert "ok0" in {r.id for r in tight.removed if r.reason == "parser_length"}
    exact = filter_rows(rows, tiny_tokenizer, FilterThresholds(parser_max_tokens=length))
    assert "ok0" not in {r.id for r in exact.removed}


def test_parser_incoherent_trips_on_repeated_ngrams_or_little_alphabetic_text(removed):
    assert _reasons(removed, "parser_incoherent") == {"loop", "digits"}
    assert "3-grams are repeats" in removed["loop"][1] and "letters" in removed["digits"][1]
    assert repeated_ngram_fraction("the red brick " * 8, 3) > 0.5
    assert repeated_ngram_fraction(GOOD_PARSERS[0], 3) == 0.0
    assert repeated_ngram_fraction("too short", 3) is None
    assert alpha_fraction("12 34 56") == 0.0 and alpha_fraction("六块砖") == 1.0 and alpha_fraction("  ") == 0.0


def test_bad_thresholds_are_refused_naming_the_option():
    with pytest.raises(FilterError, match="--min-alpha"):
        FilterThresholds(min_alpha=1.5)
    with pytest.raises(FilterError, match="--parser-min-tokens"):
        FilterThresholds(parser_min_tokens=10, parser_max_tokens=5)


def test_gap_filter_writes_kept_jsonl_and_targets_and_the_report(tmp_path, data, tiny_base_dir, capsys):
    out = tmp_path / "filtered"
    args = ["filter", "--data", str(data["jsonl"]), "--targets", str(data["targets_dir"]), "--model",
            str(tiny_base_dir), "--output-dir", str(out)]
    assert gap_main(args) == 0
    line = capsys.readouterr().out.strip()
    kept_ids = [i for i in ROWS if i not in EXPECTED]
    assert line == (f"gap filter: kept {len(kept_ids)} of {len(ROWS)} rows; removed {len(EXPECTED)}: degenerate_aux 3, "
                    f"missing_parser 2, parser_length 2, parser_incoherent 2 -> {out}")
    report = json.loads((out / "filter_report.json").read_text())
    kept = load_jsonl(out / "train.jsonl", report["inputs"]["image_dir"])  # lines as they were: the input's images
    assert kept["id"] == kept_ids
    import datasets

    targets = datasets.load_from_disk(str(out / "train_targets"))
    assert targets["id"] == kept_ids and targets_metadata(targets)["latent_tokens_per_span"] == K
    assert report["counts"] == {"degenerate_aux": 3, "missing_parser": 2, "parser_length": 2, "parser_incoherent": 2}
    assert {r["id"]: r["reason"] for r in report["removed_rows"]} == EXPECTED
    assert report["thresholds"]["min_span_variance_ratio"] == 0.05 and report["kept"] == len(kept_ids)
    assert gap_main(args) == 2 and "--overwrite" in capsys.readouterr().err
    # a threshold from the command line changes the outcome
    assert gap_main(args + ["--overwrite", "--max-repeated-ngrams", "1", "--min-alpha", "0"]) == 0
    assert "parser_incoherent 0" in capsys.readouterr().out


def test_gap_filter_keeps_a_targets_folder_a_targets_folder(tmp_path, data, tiny_base_dir, capsys):
    out = tmp_path / "filtered"
    args = ["filter", "--data", str(data["targets_dir"]), "--model", str(tiny_base_dir), "--output-dir", str(out),
            "--min-query-distance", "0"]
    assert gap_main(args) == 0
    assert "degenerate_aux 2," in capsys.readouterr().out  # nan and flat; the query check is off
    import datasets

    folder = datasets.load_from_disk(str(out / "train_targets"))
    assert TARGETS_COLUMN in folder.column_names and "copy" in folder["id"] and "nan" not in folder["id"]


def test_gap_filter_takes_a_gap_checkpoint_folder_as_model(tmp_path, data, tiny_base_dir, tiny_gap_and_processor, capfd):
    gap_dir = tmp_path / "gap"
    model, processor = tiny_gap_and_processor
    model.save_pretrained(gap_dir)
    processor.save_pretrained(gap_dir)
    lines = []
    for model_dir in (tiny_base_dir, gap_dir):
        out = tmp_path / f"filtered-{model_dir.name}"
        args = ["filter", "--data", str(data["jsonl"]), "--targets", str(data["targets_dir"]), "--model", str(model_dir),
                "--output-dir", str(out)]
        assert gap_main(args) == 0
        captured = capfd.readouterr()
        assert "custom code" not in captured.out + captured.err  # no trust_remote_code question
        lines.append(captured.out.strip().rsplit(" -> ", 1)[0])
    assert lines[0] == lines[1]  # same tokenizer counts, same vision tower


def test_gap_filter_bad_model_folder_is_one_error_line(tmp_path, data, capsys):
    args = ["filter", "--data", str(data["jsonl"]), "--model", str(tmp_path / "missing"), "--output-dir",
            str(tmp_path / "out")]
    assert gap_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --model {tmp_path / 'missing'}: no such folder") and "Traceback" not in err


def test_flat_spans_trip_even_when_most_of_the_data_set_is_flat(data, tiny_tokenizer):
    """The scale is the data set's target variance, not a typical span's: when flat spans are the majority (the
    demo task's framed questions show four copies of one cell), a median span would be flat and pass them all."""
    import datasets

    flat_ids = {"ok0", "ok1", "ok2", "ok3", "quiet", "flat", "no_parser", "short", "long"}

    def flatten(row):
        if row["id"] not in flat_ids:
            return {}
        values = np.asarray(row[TARGETS_COLUMN], dtype=np.float32)
        return {TARGETS_COLUMN: np.repeat(values.mean(axis=0, keepdims=True), len(values), axis=0).tolist()}

    targets = datasets.load_from_disk(str(data["targets_dir"])).map(flatten)
    result = filter_rows(load_jsonl(data["jsonl"]), tiny_tokenizer, targets=targets)
    reasons = {r.id: r.reason for r in result.removed}
    assert {row_id for row_id, reason in reasons.items() if reason == "degenerate_aux"} == flat_ids | {"nan"}
