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
