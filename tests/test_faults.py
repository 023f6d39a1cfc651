"""Nothing lost, nothing silently wrong (issue 14): each case injects the fault a user meets and asserts the run
ends in a correct result or in one error naming the problem, with earlier outputs intact."""

import json

import datasets
import pytest

from gap_pipeline.cli import main as gap_main
from gap_pipeline.targets import targets_metadata

K = 4


@pytest.fixture()
def rows_jsonl(tmp_path, tiny_image):
    """Two rows with one latent span each; images beside the JSONL."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name, seed in (("q.png", 0), ("a0.png", 1), ("a1.png", 2)):
        tiny_image(seed=seed, size=(112, 112)).save(folder / name)
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
                                          {"role": "assistant", "content": "A <latent> B"}],
             "images": ["q.png"], "aux_images": [f"a{i}.png"]} for i in range(2)]
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _targets_args(data, model, out, *extra):
    return ["targets", "--data", str(data), "--model", str(model), "--output-dir", str(out), "--no-progress", *extra]


def test_targets_overwrite_keeps_the_old_output_when_the_new_write_fails(tmp_path, rows_jsonl, tiny_base_dir,
                                                                         monkeypatch):
    out = tmp_path / "targets"
    assert gap_main(_targets_args(rows_jsonl, tiny_base_dir, out, "--latent-tokens-per-span", str(K))) == 0
    before = sorted(p.name for p in out.iterdir())
    real_save = datasets.Dataset.save_to_disk

    def disk_full(self, path, *args, **kwargs):
        real_save(self, path, *args, **kwargs)  # half the files are there when the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", disk_full)
    with pytest.raises(OSError, match="No space left"):
        gap_main(_targets_args(rows_jsonl, tiny_base_dir, out, "--latent-tokens-per-span", "1", "--overwrite"))
    assert sorted(p.name for p in out.iterdir()) == before
    assert targets_metadata(out)["latent_tokens_per_span"] == K  # the old targets, readable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "targets"]  # no temporary folder left


def test_targets_temporary_folders_of_a_killed_run_are_removed_by_the_next_run(tmp_path, rows_jsonl, tiny_base_dir,
                                                                                capsys):
    out = tmp_path / "targets"
    (tmp_path / ".targets.cache").mkdir()  # what `kill -9` during encoding leaves
    (tmp_path / ".targets.tmp-x1").mkdir()  # ... and during the final write
    assert gap_main(_targets_args(rows_jsonl, tiny_base_dir, out, "--latent-tokens-per-span", str(K))) == 0
    assert "left by an unfinished earlier run" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "targets"]


def test_targets_k_zero_is_an_error_not_the_default(tmp_path, rows_jsonl, tiny_base_dir, capsys):
    out = tmp_path / "targets"
    assert gap_main(_targets_args(rows_jsonl, tiny_base_dir, out, "--latent-tokens-per-span", "0")) == 2
    assert "--latent-tokens-per-span" in capsys.readouterr().err and not out.exists()


# gap evaluate ---------------------------------------------------------------------------------------------------


def _png_base64(image):
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _tsv(path, tiny_image, indices, golds="ABCD"):
    header = ["index", "image", "question", "A", "B", "C", "D", "answer"]
    lines = ["\t".join(header)]
    for n, index in enumerate(indices):
        lines.append("\t".join([str(index), _png_base64(tiny_image(seed=n)), f"Question {n}?", "1", "2", "3", "4",
                                golds[n % len(golds)]]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def two_gap_dirs(tmp_path_factory):
    from gap_pipeline.tiny import build_tiny_gap_model

    dirs = []
    for seed in (0, 1):
        model, processor = build_tiny_gap_model(None, seed=seed, latent_tokens_per_span=4)
        path = tmp_path_factory.mktemp(f"gap_seed{seed}")
        model.save_pretrained(path)
        processor.save_pretrained(path)
        dirs.append(path)
    return dirs


def _evaluate_args(model, data, out, *extra):
    return ["evaluate", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--interventions",
            "suppress", "--max-new-tokens", "2", "--no-progress", *extra]


def _predictions(out):
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_evaluate_never_reports_another_runs_predictions_as_this_runs(tmp_path, tiny_image, two_gap_dirs, capsys):
    first, second = two_gap_dirs
    data = _tsv(tmp_path / "bench.tsv", tiny_image, [1, 2, 3])
    other_data = _tsv(tmp_path / "other.tsv", tiny_image, [7, 8])
    out = tmp_path / "eval"
    assert gap_main(_evaluate_args(first, data, out)) == 0
    kept = (out / "predictions.jsonl").read_text()
    capsys.readouterr()
    for args, differs in ((_evaluate_args(second, data, out), "model.sha256"),
                          (_evaluate_args(first, other_data, out), "data.sha256"),
                          (_evaluate_args(first, data, out, "--max-new-tokens", "5"), "settings.max_new_tokens")):
        assert gap_main(args) == 2
        err = capsys.readouterr().err
        assert differs in err and "--overwrite" in err
        assert (out / "predictions.jsonl").read_text() == kept  # nothing lost, nothing mixed in
    assert gap_main(_evaluate_args(first, other_data, out, "--overwrite")) == 0
    assert [r["id"] for r in _predictions(out)] == ["7", "8"]  # only the new data's rows
    assert gap_main(_evaluate_args(first, other_data, out)) == 0  # the same run resumes


def test_evaluate_refuses_predictions_of_unknown_origin(tmp_path, tiny_image, two_gap_dirs, capsys):
    data = _tsv(tmp_path / "bench.tsv", tiny_image, [1, 2])
    out = tmp_path / "eval"
    out.mkdir()
    (out / "predictions.jsonl").write_text(json.dumps({"id": "1", "intervention": "suppress", "budget": 4}) + "\n")
    assert gap_main(_evaluate_args(two_gap_dirs[0], data, out)) == 2
    assert "but no run.json, the record of what produced them" in capsys.readouterr().err


def test_evaluate_duplicate_ids_are_an_error_naming_both_rows(tmp_path, tiny_image, two_gap_dirs, capsys):
    from gap_pipeline.evaluate import EvaluationError, load_items

    data = _tsv(tmp_path / "bench.tsv", tiny_image, [1, 2, 1])
    assert gap_main(_evaluate_args(two_gap_dirs[0], data, tmp_path / "eval")) == 2
    assert "id '1' is used by the row on line 2 and by the row on line 4" in capsys.readouterr().err
    rows = [{"id": rid, "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
             "answer": "A"} for rid in ("a", "b", "b")]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(EvaluationError, match="id 'b' is used by row 1 and by row 2"):
        load_items(jsonl)


# training -------------------------------------------------------------------------------------------------------

from test_train_extras import _cli_argv, _parse  # noqa: E402
from test_train_sft import work  # noqa: E402,F401 (a fixture)


def test_resume_last_continues_only_a_complete_checkpoint_of_the_same_run(work, tmp_path, caplog):  # noqa: F811
    import shutil

    import train_sft
    from gap_pipeline.trainer import RUN_RECORD, TrainingError

    out = tmp_path / "out"
    first = _cli_argv(work, out, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2")
    train_sft.main(*_parse(first), argv=first)
    half = out / "checkpoint-3"  # killed while writing a newer checkpoint: some files, no trainer state
    shutil.copytree(out / "checkpoint-2", half)
    for name in (RUN_RECORD, "trainer_state.json"):
        (half / name).unlink()
    other = _cli_argv(work, out, "--max_steps", "3", "--learning_rate", "1e-3", "--resume_from_checkpoint", "last")
    with pytest.raises(TrainingError, match=r"checkpoint-2 belongs to another run \(settings.learning_rate was 0.002, "
                                            r"now 0.001\)"):
        train_sft.main(*_parse(other), argv=other)
    again = _cli_argv(work, out, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1",
                      "--resume_from_checkpoint", "last")
    assert train_sft.main(*_parse(again), argv=again).state.global_step == 3  # resumed checkpoint-2
    assert "skipping checkpoint-3 is incomplete" in caplog.text
    assert (out / "checkpoint-3" / RUN_RECORD).is_file()  # rewritten whole by the resumed run


def test_a_reused_gap_init_must_come_from_the_same_base_pca_and_options(work, tmp_path):  # noqa: F811
    from gap_pipeline.convert import ensure_gap_checkpoint
    from gap_pipeline.provenance import ProvenanceError

    target = tmp_path / "_gap-init"
    options = {"latent_tokens_per_span": 4, "latent_adapter_size": 32, "dtype": "float32"}
    assert ensure_gap_checkpoint(work.base, target, work.pca, **options) == target
    assert ensure_gap_checkpoint(work.base, target, work.pca, **options) == target  # the same: reused
    with pytest.raises(ProvenanceError, match="options.latent_adapter_size was 32, now 16"):
        ensure_gap_checkpoint(work.base, target, work.pca, **{**options, "latent_adapter_size": 16})
    other_pca = tmp_path / "other.safetensors"
    other_pca.write_bytes(work.pca.read_bytes() + b" ")
    with pytest.raises(ProvenanceError, match="pca.sha256 was"):
        ensure_gap_checkpoint(work.base, target, other_pca, **options)


def test_pca_path_with_a_gap_checkpoint_is_an_error_not_ignored(work, tmp_path):  # noqa: F811
    import train_sft
    from gap_pipeline.trainer import TrainingError

    argv = _cli_argv(work, tmp_path / "out", "--pca_path", str(work.pca), "--max_steps", "1")
    with pytest.raises(TrainingError, match="already a GAP checkpoint"):
        train_sft.main(*_parse(argv), argv=argv)


# data ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("escape", ["../secret.png", "ABSOLUTE"])
def test_image_paths_stay_inside_the_data_folder_unless_allowed(tmp_path, rows_jsonl, tiny_base_dir, tiny_image,
                                                                 capsys, escape):
    tiny_image(seed=9).save(tmp_path / "secret.png")  # a file outside the data folder
    path = str(tmp_path / "secret.png") if escape == "ABSOLUTE" else escape
    rows = [json.loads(line) for line in rows_jsonl.read_text().splitlines()]
    rows[1]["aux_images"] = [path]
    rows_jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "targets"
    base = _targets_args(rows_jsonl, tiny_base_dir, out, "--latent-tokens-per-span", str(K), "--no-check-images")
    assert gap_main(base) == 2
    err = capsys.readouterr().err
    assert f"row 1 (id='r1'), field 'aux_images': entry 0 path {path!r} leaves the image folder" in err
    assert not out.exists()
    assert gap_main(base + ["--allow-outside-image-dir"]) == 0  # the user vouches for the paths


_ECHO_SAMPLER = """
class Echo:  # answers every question with its gold answer
    def __init__(self, settings):
        pass

    def sample(self, questions, n):
        return [[q.answer] * n for q in questions]
"""


@pytest.mark.parametrize("escape", ["../secret.png", "ABSOLUTE"])
@pytest.mark.parametrize("command", ["evaluate", "difficulty"])
def test_evaluate_and_difficulty_read_images_only_inside_the_data_folder_unless_allowed(
        tmp_path, tiny_image, two_gap_dirs, capsys, command, escape):
    folder = tmp_path / "data"
    folder.mkdir()
    tiny_image(seed=0).save(folder / "q.png")
    tiny_image(seed=9).save(tmp_path / "secret.png")  # a file outside the data folder
    path = str(tmp_path / "secret.png") if escape == "ABSOLUTE" else escape
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
                                         {"role": "assistant", "content": "A"}], "images": [image], "answer": "A"}
            for i, image in enumerate(["q.png", path])]
    data = folder / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    if command == "evaluate":
        args = _evaluate_args(two_gap_dirs[0], data, out)
    else:
        (tmp_path / "echo.py").write_text(_ECHO_SAMPLER)
        args = ["difficulty", "--dataset", str(data), "--output-dir", str(out), "--num-samples", "2", "--sampler",
                f"{tmp_path / 'echo.py'}:Echo", "--no-progress"]
    assert gap_main(args) == 2
    err = capsys.readouterr().err
    assert f"row 1 (id='r1'), field 'images': entry 0 path {path!r} leaves the image folder" in err
    assert "--allow-outside-image-dir" in err and not out.exists()  # refused before anything is read or written
    assert gap_main(args + ["--allow-outside-image-dir"]) == 0  # the user vouches for the paths


def test_tsv_rows_that_do_not_line_up_with_the_header_are_named_not_shifted(tmp_path, tiny_image):
    from gap_pipeline.evaluate import load_tsv_items

    path = _tsv(tmp_path / "bench.tsv", tiny_image, [1, 2, 3, 4])
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2].replace("Question 1?", "Question\t1?")  # an extra field: the gold would shift to 'D'
    lines[3] = lines[3].replace("Question 2?", '"Question 2?')  # a stray quote swallows the next line
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    items, problems = load_tsv_items(path)
    assert [item.id for item in items] == ["1"]
    assert problems[0].startswith(f"{path} row index=2 (line 3): 9 fields but the header has 8")
    assert problems[1].startswith(f"{path} row index=3 (lines 4-5): a field spans tabs and line breaks: a stray")


def test_non_utf8_input_is_an_error_naming_the_file_and_line(tmp_path, tiny_image, rows_jsonl):
    from gap_pipeline.data import GapDataError, load_jsonl
    from gap_pipeline.evaluate import EvaluationError, load_tsv_items

    tsv = _tsv(tmp_path / "bench.tsv", tiny_image, [1, 2])
    tsv.write_bytes(tsv.read_bytes().replace(b"Question 1?", b"Question \xff?"))
    with pytest.raises(EvaluationError, match=r"bench.tsv, line 3, column \d+: byte b'\\xff' is not UTF-8"):
        load_tsv_items(tsv)
    rows_jsonl.write_bytes(rows_jsonl.read_bytes().replace(b'"text": "Q"', b'"text": "Q\xe9"', 1))
    with pytest.raises(GapDataError, match=r"train.jsonl, line 1, column \d+: byte b'\\xe9' is not UTF-8"):
        load_jsonl(rows_jsonl)


def test_fit_pca_into_a_folder_holding_a_basis_needs_overwrite(tmp_path, capsys):
    import numpy as np

    from gap_pipeline.pca import load_pca

    vectors = tmp_path / "t.npy"
    np.save(vectors, np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32))
    out = tmp_path / "pca"
    args = ["fit-pca", "--targets", str(vectors), "--output-dir", str(out), "--device", "cpu", "--no-progress"]
    assert gap_main(args + ["--num-components", "4"]) == 0
    before = (out / "pca.safetensors").read_bytes()
    assert gap_main(args + ["--num-components", "2"]) == 2
    assert "already holds pca.safetensors and pca_report.json" in capsys.readouterr().err
    assert (out / "pca.safetensors").read_bytes() == before
    assert gap_main(args + ["--num-components", "2", "--overwrite"]) == 0
    assert load_pca(out).k == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["pca", "t.npy"]


@pytest.mark.parametrize("content", ["", "   ", [{"type": "text", "text": ""}], [{"type": "image"}]])
def test_an_empty_assistant_message_is_refused(content):
    from gap_pipeline.data import validate_rows

    row = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": content}]}
    (error,) = validate_rows([row], check_images=False)
    assert "message 1 (assistant) is empty" in str(error)


def test_a_decompression_bomb_image_is_named_by_row(tmp_path, tiny_image, monkeypatch):
    from PIL import Image

    from gap_pipeline.data import GapDataError, load_jsonl

    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("1", (200, 200)).save(folder / "bomb.png")  # 40000 pixels: a bomb under a 15000-pixel limit
    tiny_image(seed=0).save(folder / "q.png")
    rows = [{"id": i, "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
                                   {"role": "assistant", "content": "A"}], "images": [image]}
            for i, image in enumerate(["q.png", "bomb.png"])]
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 15000)
    with pytest.raises(GapDataError, match=r"row 1 \(id=1\), field 'images': entry 0 is too large to decode safely "
                                           r"\(Image size \(40000 pixels\) exceeds limit"):
        load_jsonl(folder / "rows.jsonl")


def test_nan_targets_are_found_before_training_starts(work, tmp_path):  # noqa: F811
    import math

    import train_sft
    from gap_pipeline.targets import TargetsError

    data = datasets.load_from_disk(str(work.data))
    poisoned = data.map(lambda row, i: {"latent_targets": [[math.nan] * len(v) for v in row["latent_targets"]]
                                        if i == 3 else row["latent_targets"]}, with_indices=True, features=data.features)
    poisoned.save_to_disk(str(tmp_path / "data"))
    argv = _cli_argv(work, tmp_path / "out", "--max_steps", "1")
    argv[argv.index("--dataset_path") + 1] = str(tmp_path / "data")
    with pytest.raises(TargetsError, match=r"row 3 \(id='row3'\) hold non-finite \(NaN or inf\) latent targets"):
        train_sft.main(*_parse(argv), argv=argv)


def test_a_missing_local_model_folder_is_one_clear_error(work, tmp_path):  # noqa: F811
    import train_sft
    from gap_pipeline.trainer import TrainingError

    argv = _cli_argv(work, tmp_path / "out", model=tmp_path / "no-such-model")
    with pytest.raises(TrainingError, match="no-such-model: no such folder"):
        train_sft.main(*_parse(argv), argv=argv)


@pytest.mark.parametrize("model", ["ABSOLUTE", "Org/no-such-model", "EMPTY"])
@pytest.mark.parametrize("command", ["targets", "evaluate", "difficulty"])
def test_a_missing_model_folder_is_one_error_before_anything_is_read_or_written(tmp_path, rows_jsonl, capsys,
                                                                                monkeypatch, command, model):
    monkeypatch.chdir(tmp_path)  # a relative name is looked up here, never on the Hub
    if model == "EMPTY":
        model = str(tmp_path / "empty")
        (tmp_path / "empty").mkdir()
    elif model == "ABSOLUTE":
        model = str(tmp_path / "no-such-model")
    out = tmp_path / "out"
    data = {"difficulty": "--dataset"}.get(command, "--data")
    assert gap_main([command, data, str(rows_jsonl), "--model", model, "--output-dir", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    fix = ("the folder has no config.json; pass the checkpoint folder itself" if model.endswith("empty") else
           "no such folder; pass the folder of a GAP or Qwen2.5-VL checkpoint.")
    assert len(err) == 1 and err[0].startswith(f"error: --model {model}: {fix}")
    assert not out.exists()  # a corrected rerun starts clean (difficulty's run.json never records the typo)
