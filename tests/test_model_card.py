"""The model card publishes no local absolute path (issue 18): the base model and datasets by Hub id or folder
name, the command and path hyperparameters relative to the working directory."""

import shlex

import pytest

from gap_pipeline.model_card import TrainingRun, command_line, read_training_run, render_model_card, write_model_card


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """Folders of a trainer's machine; the working directory is `tmp_path`/work."""
    base = tmp_path / "models" / "Qwen2.5-VL-7B-Instruct"
    data = tmp_path / "work" / "runs" / "gap-data"
    ds_config = tmp_path / "work" / "ds_configs" / "zero3.json"
    for folder in (base, data, ds_config.parent):
        folder.mkdir(parents=True)
    ds_config.write_text("{}")
    monkeypatch.chdir(tmp_path / "work")
    command = shlex.join(["python", "train_sft.py", "--model_name_or_path", str(base), f"--dataset_path={data}",
                          "--deepspeed", str(ds_config), "--output_dir", "runs/gap-7b"])
    run = TrainingRun(base_model=str(base), datasets=[str(data), "me/gap-latents"], command=command,
                      hyperparameters={"deepspeed": str(ds_config), "learning_rate": 1e-5})
    return tmp_path, run


def _front_matter(card):
    return card.split("---\n")[1]


def test_card_names_local_folders_and_relative_paths_never_absolute_ones(tiny_gap, machine, tmp_path):
    root, run = machine
    folder = write_model_card(tmp_path / "out", tiny_gap.config, training=run).parent
    card = (folder / "README.md").read_text()
    assert str(root) not in card
    assert "trained from `Qwen2.5-VL-7B-Instruct`" in card and "- base model: `Qwen2.5-VL-7B-Instruct`\n" in card
    assert "- datasets: `gap-data`, `me/gap-latents`" in card
    front = _front_matter(card)
    assert "\nbase_model:" not in "\n" + front.split("\ngap:")[0]  # no Hub id is known for a local folder
    assert "datasets:\n- me/gap-latents\n" in front
    published = read_training_run(folder)
    assert published.base_model == "Qwen2.5-VL-7B-Instruct"
    assert published.datasets == ["gap-data", "me/gap-latents"]
    assert published.command == ("python train_sft.py --model_name_or_path ../models/Qwen2.5-VL-7B-Instruct "
                                 "--dataset_path=runs/gap-data --deepspeed ds_configs/zero3.json --output_dir runs/gap-7b")
    assert f"```bash\n{published.command}\n```" in card
    assert published.hyperparameters == {"deepspeed": "ds_configs/zero3.json", "learning_rate": 1e-5}
    # what a card records is already public: rewriting a card from it (gap merge-lora) publishes the same card
    assert render_model_card(tiny_gap.config, training=published) == card


def test_base_model_id_is_the_base_model_the_card_publishes(tiny_gap, machine):
    _, run = machine
    run.base_model_id = "Qwen/Qwen2.5-VL-7B-Instruct"
    card = render_model_card(tiny_gap.config, training=run)
    assert "\nbase_model: Qwen/Qwen2.5-VL-7B-Instruct\n" in "\n" + _front_matter(card)
    assert "trained from `Qwen/Qwen2.5-VL-7B-Instruct`" in card
    assert "- base model: `Qwen2.5-VL-7B-Instruct` (Hub: `Qwen/Qwen2.5-VL-7B-Instruct`)" in card


def test_a_hub_id_given_as_the_base_model_is_published_as_is(tiny_gap, machine):
    _, run = machine
    run.base_model = "Qwen/Qwen2.5-VL-3B-Instruct"  # no such local folder: a Hub id
    card = render_model_card(tiny_gap.config, training=run)
    assert "\nbase_model: Qwen/Qwen2.5-VL-3B-Instruct\n" in "\n" + _front_matter(card)
    assert "- base model: `Qwen/Qwen2.5-VL-3B-Instruct`\n" in card


def test_a_folder_whose_card_is_not_ours_has_no_training_run(tmp_path):
    (tmp_path / "README.md").write_text("---\n- a list, not a mapping\n---\nSomeone else's card.\n", encoding="utf-8")
    assert read_training_run(tmp_path) is None
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\nA card without a gap block.\n", encoding="utf-8")
    assert read_training_run(tmp_path) is None


def test_no_secret_argument_reaches_a_published_card_or_a_run_record(tiny_gap, machine, tmp_path):
    import json

    from gap_pipeline.model_card import command_line
    from gap_pipeline.provenance import check_or_record

    _, run = machine
    secrets = ["hf_s1", "hf_s2", "k3", "pw4"]
    argv = ["train_sft.py", "--hub_token", secrets[0], f"--hub-token={secrets[1]}", "--wandb_api_key", secrets[2],
            "--db_password", secrets[3], "--latent_tokens_per_span", "4", "--pad_token", "<|endoftext|>"]
    kept = "python train_sft.py --latent_tokens_per_span 4 --pad_token '<|endoftext|>'"
    assert command_line(argv) == kept
    run.command = shlex.join(["python", *argv])  # recorded by an older version, before secrets were left out
    run.hyperparameters["hub_token"] = secrets[0]
    card = render_model_card(tiny_gap.config, training=run)
    assert not [secret for secret in secrets if secret in card] and f"```bash\n{kept}\n```" in card
    check_or_record(tmp_path / "out", "run.json", {"settings": {"api_key": secrets[2], "seed": 0}}, what="results",
                    has_results=False, fresh="start afresh")
    assert json.loads((tmp_path / "out" / "run.json").read_text()) == {"settings": {"seed": 0}}


@pytest.mark.parametrize("environ, launcher", [
    ({}, "python"),
    ({"WORLD_SIZE": "2", "LOCAL_SIZE": "2", "CROSS_SIZE": "1", "LOCAL_RANK": "0"}, "deepspeed --num_gpus 2"),
    ({"WORLD_SIZE": "16", "LOCAL_SIZE": "8", "CROSS_SIZE": "2"}, "deepspeed --num_nodes 2 --num_gpus 8"),
    ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8", "TORCHELASTIC_RUN_ID": "none"}, "torchrun --nproc_per_node 8"),
    ({"WORLD_SIZE": "32", "LOCAL_WORLD_SIZE": "8", "TORCHELASTIC_RUN_ID": "job"},
     "torchrun --nnodes 4 --nproc_per_node 8"),
    ({"ACCELERATE_MIXED_PRECISION": "bf16", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8", "TORCHELASTIC_RUN_ID": "x"},
     "accelerate launch --num_processes 8"),
    ({"ACCELERATE_MIXED_PRECISION": "no"}, "accelerate launch"),
])
def test_the_card_records_the_launcher_that_started_the_run(environ, launcher):
    argv = ["/abs/train_sft.py", "--local_rank=0", "--config", "configs/gap_7b.yaml"]
    assert command_line(argv, environ) == f"{launcher} train_sft.py --config configs/gap_7b.yaml"
