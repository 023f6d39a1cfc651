"""train_sft.py and GapSFTTrainer extras (issue #7): push with GAP's model card, resuming, LoRA + merge, scheduled sampling.

The data, PCA and converted GAP checkpoint are conftest's `work` fixture (8 rows through the real pipeline).
Nothing reaches the network: the Hub calls the Trainer makes (`HfApi.create_repo`, `HfApi.upload_folder`) go to
`FakeHub`, which records each commit's files and keeps a copy of them.
"""

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file
from transformers import TrainerCallback

import train_sft
from gap_pipeline import cli
from gap_pipeline.lora import configure_lora
from gap_pipeline.model_card import read_training_run
from modeling_gap import GapForConditionalGeneration
from tests.support import REPO, K, build_trainer, clean_env, first_batch, free_port, parse_train_argv, train_argv

# what a checkpoint holds to resume, and never pushes (gap_run.json: the run's record, with local paths)
TRAINING_STATE = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "gap_run.json"}


def _files(folder):
    folder = Path(folder)
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _top_level_files(folder):
    return {p.name for p in Path(folder).iterdir() if p.is_file()}


class FakeHub:
    """Stands in for the Hub: `create_repo` answers with the repo id, `upload_folder` records and copies the files
    it would upload (filtered with huggingface_hub's own pattern rules)."""

    def __init__(self, root):
        self.root = Path(root)
        self.repos = []
        self.commits = []

    def install(self, monkeypatch):
        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda api, repo_id, **kw: self.create_repo(repo_id, **kw))
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda api, **kw: self.upload_folder(**kw))

    def create_repo(self, repo_id, token=None, private=None, exist_ok=False, **kwargs):
        self.repos.append(repo_id)
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, commit_message=None, run_as_future=False,
                      allow_patterns=None, ignore_patterns=None, **kwargs):
        files = sorted(filter_repo_objects(sorted(_files(folder_path)), allow_patterns=allow_patterns,
                                           ignore_patterns=ignore_patterns))
        target = self.root / repo_id / (path_in_repo or "")
        for name in files:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(folder_path) / name, target / name)
        commit = SimpleNamespace(repo_id=repo_id, files=set(files), message=commit_message, path_in_repo=path_in_repo,
                                 folder=str(folder_path))
        self.commits.append(commit)
        if run_as_future:
            future = Future()
            future.set_result(commit)
            return future
        return commit


# -- push to the Hub with GAP's model card ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pushed(work, tmp_path_factory):
    """A CLI run from the plain base checkpoint (converted into <output_dir>/_gap-init) with --push_to_hub, saving and
    pushing at every step, against a FakeHub."""
    root = tmp_path_factory.mktemp("push")
    hub = FakeHub(root / "hub")
    out = root / "out"
    argv = train_argv(work, out, "--pca_path", str(work.pca), "--max_steps", "2", "--save_strategy", "steps",
                      "--save_steps", "1", "--difficulty_threshold", "0.5", "--push_to_hub", "--hub_model_id",
                      "me/tiny-gap", "--base_model_id", "Qwen/Qwen2.5-VL-7B-Instruct", model=work.base)
    with pytest.MonkeyPatch.context() as monkeypatch:
        hub.install(monkeypatch)
        trainer = train_sft.main(*parse_train_argv(argv), argv=argv)
    return SimpleNamespace(hub=hub, out=out, trainer=trainer, argv=argv, repo=hub.root / "me" / "tiny-gap")


def test_push_uploads_exactly_the_saved_folder_with_its_card(pushed):
    out, hub = pushed.out, pushed.hub
    assert hub.repos == ["me/tiny-gap"]
    final = hub.commits[-1]
    assert final.message == "End of training" and final.path_in_repo is None
    # output_dir also holds _gap-init/ and checkpoint-*/; what was pushed is the final folder: its files, card included
    assert (out / "_gap-init" / "config.json").is_file() and (out / "checkpoint-2").is_dir()
    assert final.files == _top_level_files(out)
    assert {"README.md", "model.safetensors", "config.json", "modeling_gap.py", "configuration_gap.py",
            "processing_gap.py", "processor_config.json", "chat_template.jinja", "tokenizer.json"} <= final.files
    for name in final.files:
        assert (pushed.repo / name).read_bytes() == (out / name).read_bytes(), name
    # during training each checkpoint pushed its model files (not what only resuming needs)
    checkpoint_commits = hub.commits[:-1]
    assert [c.message for c in checkpoint_commits] == ["Training in progress, step 1", "Training in progress, step 2"]
    for step, commit in enumerate(checkpoint_commits, start=1):
        folder = out / f"checkpoint-{step}"
        assert commit.files == _files(folder) - TRAINING_STATE
        assert TRAINING_STATE <= _files(folder)
        assert {"README.md", "modeling_gap.py", "model.safetensors"} <= commit.files


def test_model_card_holds_the_documented_fields(pushed, work):
    card = (pushed.repo / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "library_name: transformers" in front and "base_model: Qwen/Qwen2.5-VL-7B-Instruct" in front
    assert "pipeline_tag: image-text-to-text" in front
    for text in ("§4.1 Data-Level Alignment", "§4.2 Feature-Level Alignment: PCA-Aligned Latent Head",
                 "§4.3 Model-Level Alignment: Difficulty-Aware Latent Supervision", "Appendix F"):
        assert text in card
    for row in ("| K (latent tokens per span) | 4 |", "| k (PCA components) | 16 |", "| d (hidden size) | 64 |",
                "| λ (latent loss weight) | 1.0 |", "| τ (difficulty threshold) | 0.5"):
        assert row in card, row
    assert "`mean` (squared error averaged over d)" in card and "`pca`: PCA-aligned head (k = 16" in card
    assert "scheduled sampling | off" in card
    # local folders by name, the command's paths relative to the working directory: no absolute path is published
    assert f"- base model: `{work.base.name}` (Hub: `Qwen/Qwen2.5-VL-7B-Instruct`)" in card
    assert f"- datasets: `{work.data.name}`" in card
    command = re.search(r"```bash\n(.*?)\n```", card).group(1)
    words, given = shlex.split(command), pushed.argv[1:]
    assert words[:2] == ["python", "train_sft.py"] and len(words) == 2 + len(given)
    for word, arg in zip(words[2:], given):
        assert not os.path.isabs(word) and os.path.abspath(word) == os.path.abspath(arg), (word, arg)
    assert "trust_remote_code=True" in card and "AutoModelForImageTextToText" in card and "AutoProcessor" in card
    assert "latent_intervention=" in card
    for name in ("pca", "suppress", "noise", "hidden", "hidden_ema"):
        assert f"| `{name}` |" in card
    run = read_training_run(pushed.repo)
    assert run.command == command and run.difficulty_threshold == 0.5 and run.scheduled_sampling_prob == 0.0
    assert run.hyperparameters["steps_trained"] == 2 and run.datasets == [work.data.name]
    assert run.base_model == work.base.name and run.base_model_id == "Qwen/Qwen2.5-VL-7B-Instruct"


def test_model_card_code_runs_on_the_pushed_folder_for_a_hub_user(pushed, tiny_image, tmp_path, hub_user_python):
    card = (pushed.repo / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, flags=re.DOTALL).group(1)
    assert 'repo = "me/tiny-gap"' in code and 'Image.open("question.png")' in code
    image = tmp_path / "question.png"
    tiny_image(seed=3).save(image)
    code = code.replace('repo = "me/tiny-gap"', f"repo = {str(pushed.repo)!r}")
    code = code.replace('Image.open("question.png")', f"Image.open({str(image)!r})")
    run = hub_user_python(code, cwd=tmp_path)  # torch + transformers + accelerate + pillow only
    assert run.returncode == 0, run.stderr[-4000:]
    assert "latent spans" in run.stdout


# -- resuming --------------------------------------------------------------------------------------------------------


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def _resumable(work, out, lora):
    # 8 rows at 4 per step: 2 steps per epoch, so step 3 is inside the second epoch; random order, cosine schedule,
    # scheduled sampling (its coin flips must repeat too); LoRA with dropout (its random state too)
    kwargs = {}
    if lora:
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.1)
    return build_trainer(work, out, trainer_kwargs=kwargs, scheduled_sampling_prob=0.5, per_device_train_batch_size=4,
                         max_steps=5,
                         save_strategy="steps", save_steps=3, lr_scheduler_type="cosine", warmup_steps=1,
                         train_sampling_strategy="random", seed=7)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resumed_run_equals_an_uninterrupted_one(work, tmp_path, lora):
    full = _resumable(work, tmp_path / "full", lora)
    full.train()

    interrupted = _resumable(work, tmp_path / "run", lora)
    interrupted.add_callback(_StopAt(3))
    interrupted.train()
    assert interrupted.state.global_step == 3
    checkpoint = tmp_path / "run" / "checkpoint-3"
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", weights,
            "processor_config.json", "README.md"} <= _top_level_files(checkpoint)
    # the token count (`num_tokens`) resumes from the Trainer's own state
    assert json.loads((checkpoint / "trainer_state.json").read_text())["num_input_tokens_seen"] > 0

    resumed = _resumable(work, tmp_path / "run", lora)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == full.state.global_step == 5

    def steps(trainer):
        return {e["step"]: e for e in trainer.state.log_history if "lm_loss" in e and "train_runtime" not in e}

    after, reference = steps(resumed), steps(full)
    assert sorted(after) == [1, 2, 3, 4, 5]  # the checkpoint's history, then the resumed steps
    for step in (4, 5):
        for key in ("loss", "lm_loss", "latent_loss", "grad_norm", "learning_rate", "scheduled_sampling_fraction",
                    "num_tokens"):
            assert after[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-8), (step, key)
    trained, expected = resumed.model.state_dict(), full.model.state_dict()
    initial = GapForConditionalGeneration.from_pretrained(work.gap).state_dict()
    head = "latent_head.modules_to_save.default.proj.weight" if lora else "latent_head.proj.weight"
    assert not torch.allclose(next(v for k, v in expected.items() if k.endswith(head)), initial["latent_head.proj.weight"])
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_cli_resumes_from_the_last_checkpoint(work, tmp_path):
    out = tmp_path / "out"
    first = train_argv(work, out, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1")
    before = train_sft.main(*parse_train_argv(first), argv=first).state.log_history
    again = train_argv(work, out, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1",
                       "--resume_from_checkpoint", "last")
    trainer = train_sft.main(*parse_train_argv(again), argv=again)
    assert trainer.state.global_step == 3
    logs = [e for e in trainer.state.log_history if "lm_loss" in e and "train_runtime" not in e]
    assert [e["step"] for e in logs] == [1, 2, 3]
    # steps 1-2 are checkpoint-2's history; step 3 ran on its restored scheduler, whose 2-step cosine had ended (a
    # fresh 3-step run would log 1e-3 there: warmup to 2e-3 at step 2, half of it at step 3)
    assert logs[:2] == [e for e in before if "lm_loss" in e and "train_runtime" not in e]
    assert [e["learning_rate"] for e in logs] == [0.0, 2e-3, 0.0]
    assert "--resume_from_checkpoint last" in (out / "README.md").read_text()


def test_resuming_a_checkpoint_without_optimizer_state_is_an_error_unless_accepted(work, tmp_path, caplog):
    from gap_pipeline.trainer import TrainingError

    out = tmp_path / "out"
    first = train_argv(work, out, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1")
    train_sft.main(*parse_train_argv(first), argv=first)
    (out / "checkpoint-2" / "optimizer.pt").unlink()  # as --save_only_model writes it, or a removed file
    weights = (out / "checkpoint-2" / "model.safetensors").read_bytes()
    again = train_argv(work, out, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1",
                       "--resume_from_checkpoint", "last")
    with pytest.raises(TrainingError, match=r"checkpoint-2 lacks the optimizer state \(optimizer.pt\) .* other "
                                            r"weights than an uninterrupted run.*--resume_without_optimizer_state"):
        train_sft.main(*parse_train_argv(again), argv=again)
    assert not (out / "checkpoint-3").exists()
    assert (out / "checkpoint-2" / "model.safetensors").read_bytes() == weights  # nothing trained, nothing written
    accepted = again + ["--resume_without_optimizer_state"]
    assert train_sft.main(*parse_train_argv(accepted), argv=accepted).state.global_step == 3
    assert "continuing from its weights and step with a fresh optimizer" in caplog.text


# -- LoRA ------------------------------------------------------------------------------------------------------------


def test_configure_lora_targets_the_language_model_and_the_latent_rows(work):
    from peft import LoraConfig

    config = GapForConditionalGeneration.config_class.from_pretrained(work.gap)
    ids = sorted(config.latent_token_ids)
    lora = configure_lora(LoraConfig(r=4, target_modules=["q_proj", "down_proj"]), config)
    assert lora.modules_to_save == ["latent_head"]
    assert lora.trainable_token_indices == {"embed_tokens": ids, "lm_head": ids}  # the tiny base is untied
    pattern = re.compile(lora.target_modules)
    assert pattern.fullmatch("model.language_model.layers.1.mlp.down_proj")
    assert pattern.fullmatch("model.language_model.layers.0.self_attn.q_proj")
    for name in ("model.visual.blocks.0.mlp.down_proj", "latent_head.down", "lm_head",
                 "model.language_model.layers.0.self_attn.v_proj"):
        assert not pattern.fullmatch(name), name
    config.tie_word_embeddings = True
    tied = configure_lora(LoraConfig(r=4, modules_to_save=["latent_head"]), config)
    assert tied.trainable_token_indices == {"embed_tokens": ids} and tied.modules_to_save == ["latent_head"]
    assert re.compile(tied.target_modules).fullmatch("model.language_model.layers.0.mlp.gate_proj")


MERGED_SCRIPT = """
import json, sys
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, LogitsProcessor

folder, start, pad, end, K = sys.argv[1], *map(int, sys.argv[2:])
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
messages = [{"role": "user", "content": [{"type": "text", "text": "Say hello to row 1."}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=[prompt], return_tensors="pt")
prompt_length = inputs["input_ids"].shape[1]

class OpenSpan(LogitsProcessor):  # make <|latent_start|> the first token
    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == prompt_length:
            scores[:, start] += 1e4
        return scores

out = model.generate(**inputs, max_new_tokens=K + 4, do_sample=False, logits_processor=[OpenSpan()],
                     return_dict_in_generate=True)
new = out.sequences[0, prompt_length:].tolist()
print(json.dumps({"new": new, "spans": int(out.num_latent_spans[0]), "latents": list(out.latents[0].shape)}))
"""


def test_lora_trains_head_and_latent_rows_and_merges_into_a_gap_checkpoint(work, tmp_path):
    out = tmp_path / "lora"
    argv = train_argv(work, out, "--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "3",
                      "--learning_rate", "1e-2")
    trainer = train_sft.main(*parse_train_argv(argv), argv=argv)
    assert trainer.state.global_step == 3
    # the adapter folder: adapter weights, processor and our card (PEFT's own README replaced)
    assert {"adapter_config.json", "adapter_model.safetensors", "processor_config.json", "README.md"} <= _files(out)
    assert "model.safetensors" not in _files(out)
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "gap merge-lora" in card and "LoRA on the language model" in card
    config = json.loads((out / "adapter_config.json").read_text())
    gap_config = GapForConditionalGeneration.config_class.from_pretrained(work.gap)
    start, pad, end = ids = gap_config.latent_token_ids
    assert config["modules_to_save"] == ["latent_head"]
    assert config["trainable_token_indices"] == {"embed_tokens": sorted(ids), "lm_head": sorted(ids)}

    adapter = load_file(out / "adapter_model.safetensors")
    base = load_file(work.gap / "model.safetensors")
    head = {k.split("latent_head.")[1]: v for k, v in adapter.items() if "latent_head." in k}
    assert {"proj.weight", "proj.bias", "gate.weight", "up.weight", "down.weight"} <= set(head)
    assert not torch.equal(head["proj.weight"], base["latent_head.proj.weight"])  # the head trained
    deltas = {k: v for k, v in adapter.items() if "trainable_tokens_delta" in k}
    assert len(deltas) == 2 and all(v.shape[0] == 3 and v.abs().sum() > 0 for v in deltas.values())
    assert any("lora_A" in k and "language_model" in k for k in adapter)
    assert not any("lora_" in k and ("visual" in k or "latent_head" in k) for k in adapter)

    merged = tmp_path / "merged"
    assert cli.main(["merge-lora", "--adapter", str(out), "--output-dir", str(merged)]) == 0
    model = GapForConditionalGeneration.from_pretrained(merged)
    state = model.state_dict()
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        rows = torch.tensor(sorted(ids))
        assert not torch.allclose(state[key][rows], base[key][rows]), key  # the latent rows trained
        others = torch.ones(state[key].shape[0], dtype=torch.bool)
        others[rows] = False
        assert torch.equal(state[key][others], base[key][others]), key  # no other row did
    for name, value in head.items():
        assert torch.equal(state[f"latent_head.{name}"], value), name
    q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(state[q_proj], base[q_proj])  # LoRA merged
    assert all(torch.equal(state[k], v) for k, v in base.items() if k.startswith("model.visual."))
    merged_card = (merged / "README.md").read_text()
    assert "library_name: transformers" in merged_card and "merged into these weights" in merged_card

    run = subprocess.run([sys.executable, "-c", MERGED_SCRIPT, str(merged), str(start), str(pad), str(end), str(K)],
                         cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["new"][: K + 2] == [start] + [pad] * K + [end]
    assert result["spans"] == 1 and result["latents"] == [1, K, 64]


def test_merge_lora_refuses_a_base_other_than_the_adapters(work, tmp_path, tiny_base_dir, capsys):
    import shutil

    from gap_pipeline.convert import convert_checkpoint

    out = tmp_path / "lora"
    argv = train_argv(work, out, "--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "1")
    train_sft.main(*parse_train_argv(argv), argv=argv)
    other = tmp_path / "other-gap"  # another GAP model: the same base converted with another head
    convert_checkpoint(tiny_base_dir, other, work.pca, latent_tokens_per_span=K, latent_adapter_size=16,
                       dtype="float32")
    merge = ["merge-lora", "--adapter", str(out), "--output-dir", str(tmp_path / "merged")]
    assert cli.main(merge + ["--base", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"error: --base {other} is another model than the GAP folder {out} was trained on" in err
    assert not (tmp_path / "merged").exists()
    (out / "gap_lora_base.json").unlink()  # an adapter saved before the record: judged by the folder it names
    assert cli.main(merge + ["--base", str(other)]) == 2
    assert f"recorded in {work.gap}" in capsys.readouterr().err
    shutil.copytree(work.gap, tmp_path / "moved-gap")  # the base moved: a copy of it is the same base
    assert cli.main(merge + ["--base", str(tmp_path / "moved-gap")]) == 0


# -- scheduled sampling ----------------------------------------------------------------------------------------------


def _count_forwards(trainer):
    calls = []
    handle = trainer.model.model.language_model.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def test_scheduled_sampling_off_is_the_teacher_forced_loss(work, tmp_path):
    trainer = build_trainer(work, tmp_path, rows=[0, 1, 2, 3], scheduled_sampling_prob=0.0)
    batch = first_batch(trainer)
    calls, handle = _count_forwards(trainer)
    try:
        loss = trainer.compute_loss(trainer.model, dict(batch))
    finally:
        handle.remove()
    assert len(calls) == 1
    with torch.no_grad():
        reference = trainer.model(**batch)
    assert loss.item() == pytest.approx(reference.loss.item(), rel=1e-6)


def test_scheduled_sampling_all_spans_is_the_second_pass_loss_against_the_targets(work, tmp_path):
    trainer = build_trainer(work, tmp_path, rows=[0, 1, 2, 3], scheduled_sampling_prob=1.0)
    batch = first_batch(trainer)
    targets = batch["latent_embeds"]
    calls, handle = _count_forwards(trainer)
    try:
        loss = trainer.compute_loss(trainer.model, dict(batch))
    finally:
        handle.remove()
    assert len(calls) == 2
    spans = int((batch["input_ids"] == trainer.model.config.latent_start_token_id).sum())
    assert trainer._replaced_spans.tolist() == [spans, spans] and spans == targets.shape[0] // K
    with torch.no_grad():
        first = trainer.model(**batch)
        second = trainer.model(**{**batch, "latent_embeds": first.latent_predictions})
    latent_loss = (second.latent_predictions - targets).pow(2).mean(-1).mean()
    assert not torch.allclose(second.latent_predictions, first.latent_predictions)  # the inputs changed
    assert loss.item() == pytest.approx((second.lm_loss + latent_loss).item(), rel=1e-5)
    assert trainer._metrics["train"]["latent_loss"][-1] == pytest.approx(latent_loss.item(), rel=1e-5)


def test_scheduled_sampling_runs_two_passes_every_step_and_logs_the_replaced_fraction(work, tmp_path):
    def run(out):
        # rows 1 and 5 have no latent: the second pass still runs on their micro-batches
        trainer = build_trainer(work, out, rows=[1, 5, 0, 2, 3, 4, 6, 7], per_device_train_batch_size=2, max_steps=4,
                                scheduled_sampling_prob=0.5)
        calls, handle = _count_forwards(trainer)
        try:
            trainer.train()
        finally:
            handle.remove()
        return trainer, len(calls)

    trainer, forwards = run(tmp_path / "a")
    assert forwards == 2 * 4
    logs = [e for e in trainer.state.log_history if "lm_loss" in e and "train_runtime" not in e]
    assert len(logs) == 4 and all(math.isfinite(e["loss"]) for e in logs)
    assert "scheduled_sampling_fraction" not in logs[0]  # the first micro-batch has no span
    fractions = [e["scheduled_sampling_fraction"] for e in logs[1:]]
    assert all(0.0 <= f <= 1.0 for f in fractions)
    again, _ = run(tmp_path / "b")  # seeded: the same spans are replaced, the same losses follow
    repeated = [e for e in again.state.log_history if "lm_loss" in e and "train_runtime" not in e]
    for first, second in zip(logs, repeated):
        assert first == pytest.approx(second, rel=1e-6)


def test_span_coin_flips_depend_on_seed_step_micro_batch_and_rank(work, tmp_path):
    trainer = build_trainer(work, tmp_path, rows=[0], scheduled_sampling_prob=0.5)
    flips = [trainer._span_coin_flips(64) for _ in range(2)]  # two micro-batches of step 0
    assert not torch.equal(flips[0], flips[1])
    assert 10 < int(flips[0].sum()) < 54
    trainer._sampling_micro_step = (None, 0)
    assert torch.equal(trainer._span_coin_flips(64), flips[0])  # the same step and micro-batch: the same coins
    trainer.state.global_step = 1
    assert not torch.equal(trainer._span_coin_flips(64), flips[0])
    with pytest.raises(ValueError, match=r"scheduled_sampling_prob"):
        build_trainer(work, tmp_path, rows=[0], scheduled_sampling_prob=1.5)


DS_SCRIPT = """
import json, sys
sys.path.insert(0, {repo!r})
import train_sft
from gap_pipeline.trainer import GapSFTTrainer

script_args, training_args, model_args = train_sft.make_parser().parse_args_and_config()
calls = []
original = GapSFTTrainer.__init__


def counting_init(self, *args, **kwargs):
    original(self, *args, **kwargs)
    self.gap_model.model.language_model.register_forward_hook(lambda *a: calls.append(1))


GapSFTTrainer.__init__ = counting_init
trainer = train_sft.main(script_args, training_args, model_args)
print("rank", trainer.args.process_index, "forwards", len(calls), flush=True)
if trainer.args.process_index == 0:
    with open(training_args.output_dir + "/log_history.json", "w") as f:
        json.dump(trainer.state.log_history, f)
trainer.end()
"""


def test_scheduled_sampling_under_zero3_with_two_processes(work, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(DS_SCRIPT.format(repo=str(REPO)))
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    # rank 1 trains row 1 (no image, no latent) in the first step: both passes must still run there
    command = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port",
               str(free_port()), str(script), "--config", str(REPO / "configs" / "tiny_cpu.yaml"),
               "--deepspeed", str(tmp_path / "zero3.json"), "--model_name_or_path", str(work.gap),
               "--dataset_path", str(work.data), "--output_dir", str(out), "--bf16", "true", "--dtype", "bfloat16",
               "--per_device_train_batch_size", "1", "--max_steps", "2", "--logging_steps", "1",
               "--save_strategy", "no", "--train_sampling_strategy", "sequential", "--latent_tokens_per_span", str(K),
               "--scheduled_sampling_prob", "0.5"]
    process = subprocess.Popen(command, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)  # the launcher and its ranks share this session
        log, _ = process.communicate()
        pytest.fail(f"ZeRO-3 with scheduled sampling did not finish in 300 s:\n{log[-6000:]}")
    assert process.returncode == 0, log[-6000:]
    assert "rank 0 forwards 4" in log and "rank 1 forwards 4" in log  # 2 steps x 2 passes on each rank
    logs = json.loads((out / "log_history.json").read_text())
    steps = [e for e in logs if "lm_loss" in e and "train_runtime" not in e]
    assert [e["step"] for e in steps] == [1, 2]
    assert all(math.isfinite(e["loss"]) and 0.0 <= e["scheduled_sampling_fraction"] <= 1.0 for e in steps)
