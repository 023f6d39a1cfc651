"""Plain helpers shared by several test files (their shared fixtures live in conftest.py).

Test files import from here or from conftest, never from one another.
"""

import base64
import contextlib
import io
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
K = 4  # latent tokens per span of the `work` checkpoint (conftest)
GOLDS = ["C", "A", "C", "B", "D", "C"]  # the answers of the `benchmark_tsv` rows (conftest)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env() -> dict[str, str]:
    """This process's environment for a subprocess, less PYTHONPATH, with one thread (two ranks share two cores)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return env


# -- training on the `work` checkpoint ---------------------------------------------------------------------------


def sft_config(output_dir, **overrides):
    """A GapSFTConfig for fast, deterministic CPU runs; `overrides` are its fields."""
    from gap_pipeline.trainer import GapSFTConfig

    values = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        bf16=False,
        activation_checkpointing=False,
        max_length=None,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        logging_steps=1,
        disable_tqdm=True,
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        seed=0,
    )
    values.update(overrides)
    return GapSFTConfig(**values)


def build_trainer(work, output_dir, rows=None, trainer_kwargs=None, **args):
    """A GapSFTTrainer on the `work` checkpoint and data; `args` are GapSFTConfig fields."""
    import datasets

    from gap_pipeline.collator import GapDataCollator
    from gap_pipeline.trainer import GapSFTTrainer
    from modeling_gap import GapForConditionalGeneration
    from processing_gap import GapProcessor

    model = GapForConditionalGeneration.from_pretrained(work.gap).train()
    processor = GapProcessor.from_pretrained(work.gap, trust_remote_code=False)
    dataset = datasets.load_from_disk(str(work.data))
    if rows is not None:
        dataset = dataset.select(rows)
    return GapSFTTrainer(
        model,
        args=sft_config(output_dir, **args),
        data_collator=GapDataCollator(processor),
        train_dataset=dataset,
        processing_class=processor,
        **(trainer_kwargs or {}),
    )


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def train_argv(work, out, *extra, model=None):
    """train_sft.py's argv for a short tiny_cpu.yaml run on the `work` data and checkpoint (with the checkpoint's own
    latent loss, `mean` with lambda 1, rather than the preset's)."""
    return ["train_sft.py", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--dataset_path", str(work.data),
            "--model_name_or_path", str(model or work.gap), "--output_dir", str(out), "--latent_tokens_per_span", str(K),
            "--latent_loss_reduction", "mean", "--latent_loss_weight", "1.0",
            "--per_device_train_batch_size", "4", "--logging_steps", "1", *extra]


def parse_train_argv(argv):
    import train_sft

    return train_sft.make_parser().parse_args_and_config(argv[1:])


# -- evaluation ------------------------------------------------------------------------------------------------


def engineered_gap():
    """A tiny GAP model whose final-norm state is the same vector u at every position.

    The last layer's value projection is a huge constant (zero weight, large bias), so attention adds the same
    vector everywhere and h_bar ~ u. The LM head scores u: `<|latent_start|>` 2, the letter "C" 1, every other
    token ~0. So every intervention that allows spans opens one at once, and `suppress` answers "C".
    """
    from gap_pipeline.tiny import build_tiny_gap_model

    model, processor = build_tiny_gap_model(None, seed=0, latent_tokens_per_span=4)
    attention = model.model.language_model.layers[-1].self_attn
    tokenizer = processor.tokenizer
    (letter_c,) = tokenizer.encode("C", add_special_tokens=False)
    start, _, _ = model.config.latent_token_ids
    with torch.no_grad():
        attention.v_proj.weight.zero_()
        attention.v_proj.bias.copy_(torch.linspace(-1, 1, attention.v_proj.bias.shape[0]) * 1e4)
        probe = tokenizer(["x"], return_tensors="pt")
        captured = []
        handle = model.model.language_model.norm.register_forward_hook(lambda m, i, o: captured.append(o[0, -1]))
        model(**probe)
        handle.remove()
        u = captured[0] / captured[0].norm() ** 2
        model.lm_head.weight.mul_(1e-4)
        model.lm_head.weight[start] = 2 * u
        model.lm_head.weight[letter_c] = u
    return model, processor


def png_base64(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path, rows):
    """A benchmark TSV (VLMEvalKit's columns) of `rows` (dicts; missing columns are empty) at `path`."""
    header = ["index", "image", "question", "A", "B", "C", "D", "answer", "category"]
    lines = ["\t".join(header)]
    for row in rows:
        lines.append("\t".join(str(row.get(column, "")) for column in header))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@contextlib.contextmanager
def paused_then_killed(command: list[str], reached: Path, timeout: float = 600, **popen):
    """Runs `command` until it creates `reached` (its hook touches the file, then sleeps), yields the paused child,
    then kills it with SIGKILL: a kill at a named point. The child's stderr is shown if it ends before the point."""
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)
    try:
        deadline = time.monotonic() + timeout
        while not reached.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reached.exists(), child.stderr.read().decode()[-3000:] if child.poll() is not None else "timed out"
        yield child
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stderr.close()
