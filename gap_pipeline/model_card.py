"""The model card (README.md) of a GAP checkpoint or LoRA adapter folder, and the remote code next to a Hub push.

What the card holds, and that it publishes no local absolute path (`published_run`), is in the README ("Push to the
Hub with a model card"). Its front matter carries the same facts under ``gap:`` (the run under ``gap.training``), so a
later step (``gap merge-lora``) writes the card of a folder derived from another one (`read_training_run`). Pushing is
the Trainer's own; `RemoteCodeOnPush` adds the remote code to the folder it uploads.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub.repocard import metadata_load
from transformers import TrainerCallback
from transformers.dynamic_module_utils import custom_object_save

from configuration_gap import TRANSFORMERS_REQUIREMENT
from modeling_gap import LATENT_INTERVENTIONS

from .provenance import command_without_secrets, is_secret_name

__all__ = [
    "PAPER_TITLE",
    "RemoteCodeOnPush",
    "TrainingRun",
    "command_line",
    "lora_settings",
    "public_command",
    "public_name",
    "published_run",
    "read_training_run",
    "render_model_card",
    "write_model_card",
]

PAPER_TITLE = (
    "Fill the GAP: A Granular Alignment Paradigm for Visual Reasoning in Multimodal Large Language Models"
)
# The sections of the paper a GAP checkpoint implements, in the order the card lists them.
PAPER_SECTIONS = (
    ("§4.1 Data-Level Alignment: Controllable Latent Data Construction",
     "each latent span is supervised by the frozen vision tower's embeddings of an auxiliary image, pooled to a "
     "sqrt(K) x sqrt(K) grid; the auxiliary image is never an input."),
    ("§4.2 Feature-Level Alignment: PCA-Aligned Latent Head",
     "the latent head reads the final-RMSNorm state and predicts k PCA coefficients c; the latent fed back at the "
     "next position is P_k^T c + mu, in the vision-embedding subspace (Eq. 1). The loss is "
     "L = L_LM + lambda * L_latent (Eq. 2-3)."),
    ("§4.3 Model-Level Alignment: Difficulty-Aware Latent Supervision",
     "rows the base model already solves (accuracy > tau over N samples) train on text only (Eq. 4)."),
    ("Appendix F: Implementation Details",
     "the training recipe, the projector initialisation and the scheduled-sampling ablation."),
)
# What each of modeling_gap.LATENT_INTERVENTIONS feeds at a latent step (the card's table, in that order).
INTERVENTION_DESCRIPTIONS = {
    "pca": "GAP (default): v_hat = P_k^T F(h_bar) + mu",
    "suppress": "`<|latent_start|>` is banned: no latent span opens",
    "noise": "c ~ N(0, diag(eigenvalues)), reconstructed, rescaled to the clean latent's norm",
    "hidden": "the final-norm state h_bar itself (output-as-input baseline)",
    "hidden_ema": "h_bar rescaled to an EMA of the query image's vision-token norms",
    "oracle": "the row's true latent targets (`latent_oracle=`): the upper bound of reading latents",
}
CARD_NAME = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class TrainingRun:
    """What a model card says about the run that produced a checkpoint (every field optional); a card publishes it
    without local absolute paths (`published_run`)."""

    base_model: str | None = None  # what training started from, as given (`--model_name_or_path`: Hub id or folder)
    base_model_id: str | None = None  # the base's Hub id for the card's metadata, when `base_model` is a folder
    datasets: list[str] = field(default_factory=list)  # the training (and evaluation) data, as given
    command: str | None = None  # the exact command line of the run
    world_size: int | None = None  # the number of training processes
    difficulty_threshold: float | None = None  # tau of Eq. 4
    scheduled_sampling_prob: float | None = None  # the chance a span's teacher-forced latents are replaced (0 = off)
    hyperparameters: dict[str, Any] = field(default_factory=dict)  # name -> value, listed as given
    lora: dict[str, Any] | None = None  # the LoRA settings (r, alpha, dropout, targets, ...) of an adapter run
    merged: bool = False  # the LoRA adapter has been merged into the weights of this folder


def _hub_id(value: str | None) -> str | None:
    """`value` if it reads as a Hub repository id (owner/name) and is not a local folder."""
    return value if value and _HUB_ID.match(value) and not os.path.exists(value) else None


def public_name(value: str) -> str:
    """How a card names a model or dataset given as `value`: a Hub id as is, a local folder by its name only."""
    return _hub_id(value) or os.path.basename(os.path.normpath(os.path.abspath(value)))


def _relative(path: str) -> str:
    """`path` relative to the working directory when it is absolute; anything else unchanged."""
    return os.path.relpath(path) if os.path.isabs(path) else path


def public_command(command: str) -> str:
    """`command` (one shell line) with every absolute path, also in ``--name=/path``, relative to the working
    directory, so it still runs from there, and without secrets (`command_without_secrets`)."""
    words = []
    for word in command_without_secrets(shlex.split(command)):
        name, equals, value = word.partition("=")
        words.append(f"{name}={_relative(value)}" if equals and name.startswith("-") else _relative(word))
    return shlex.join(words)


def published_run(run: TrainingRun) -> TrainingRun:
    """`run` as a card publishes it: the base model and the datasets by Hub id or folder name (`public_name`),
    absolute paths in the command (`public_command`) and in the hyperparameters relative to the working directory;
    no secret (`public_command`, and no hyperparameter named like one)."""
    return dataclasses.replace(
        run,
        base_model=None if run.base_model is None else public_name(run.base_model),
        datasets=[public_name(name) for name in run.datasets],
        command=None if run.command is None else public_command(run.command),
        hyperparameters={name: _relative(v) if isinstance(v, str) else v for name, v in run.hyperparameters.items()
                         if not is_secret_name(name)},
    )


def _settings(config) -> dict[str, Any]:
    """The GAP fields of a `GapConfig`, by the names the card uses."""
    return {
        "latent_tokens_per_span": config.latent_tokens_per_span,
        "pca_num_components": config.pca_num_components,
        "hidden_size": config.text_config.hidden_size,
        "latent_loss_weight": config.latent_loss_weight,
        "latent_loss_reduction": config.latent_loss_reduction,
        "latent_head_type": config.latent_head_type,
        "latent_adapter_size": config.latent_adapter_size,
        "latent_token_ids": list(config.latent_token_ids) if config.latent_token_ids is not None else None,
    }


def _plain(value):
    """`value` with tuples and sets as lists (YAML-safe)."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(item) for item in value]
        return sorted(items, key=str) if isinstance(value, (set, frozenset)) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _front_matter(settings, training, model_id, tags, adapter):
    metadata: dict[str, Any] = {
        "library_name": "peft" if adapter else "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": sorted({"gap", "visual-latent-reasoning", "qwen2_5_vl", "custom_code", *(tags or [])}),
    }
    gap = dict(settings, **({} if model_id is None else {"model_id": model_id}))
    if training is not None:
        base_id = training.base_model_id or _hub_id(training.base_model)
        if base_id is not None:
            metadata["base_model"] = base_id
        hub_datasets = [name for name in training.datasets if _hub_id(name)]
        if hub_datasets:
            metadata["datasets"] = hub_datasets
        gap["training"] = dataclasses.asdict(training)
    metadata["gap"] = gap
    return "---\n" + yaml.safe_dump(_plain(metadata), sort_keys=False, allow_unicode=True) + "---\n"


def _table(header, rows):
    """A two-column Markdown table; pipes inside cells (`<|latent_pad|>`) are escaped so they do not split them."""

    def cell(value):
        return str(value).replace("|", "\\|")

    lines = [f"| {cell(header[0])} | {cell(header[1])} |", "|---|---|"]
    lines += [f"| {cell(name)} | {cell(value)} |" for name, value in rows]
    return "\n".join(lines)


def _code(value) -> str:
    return f"`{value}`"


def _settings_section(settings: dict[str, Any], training: TrainingRun | None) -> list[str]:
    """The card's "GAP settings" table: K, k, d, lambda, the reduction, the head, the token ids (and tau, p)."""
    K, k = settings["latent_tokens_per_span"], settings["pca_num_components"]
    head = settings["latent_head_type"]
    if head == "pca":
        head_text = f"`pca`: PCA-aligned head (k = {k} coefficients, SwiGLU adapter of width {settings['latent_adapter_size']})"
    else:
        head_text = "`full`: an R^d -> R^d head with no PCA (the paper's LH ablation)"
    reduction = settings["latent_loss_reduction"]
    reduction_text = {"mean": "`mean` (squared error averaged over d)", "sum": "`sum` (squared L2 over d, Eq. 2)"}.get(
        reduction, _code(reduction)
    )
    ids = settings["latent_token_ids"]
    rows = [
        ("K (latent tokens per span)", K),
        ("k (PCA components)", k if head == "pca" else "— (full head)"),
        ("d (hidden size)", settings["hidden_size"]),
        ("λ (latent loss weight)", settings["latent_loss_weight"]),
        ("latent loss reduction", reduction_text + ", averaged over the latent positions of the global batch"),
        ("latent head", head_text),
        ("latent token ids", "not set" if ids is None else
         f"`<|latent_start|>` {ids[0]}, `<|latent_pad|>` {ids[1]}, `<|latent_end|>` {ids[2]}"),
    ]
    if training is not None:
        tau = training.difficulty_threshold
        rows.append(("τ (difficulty threshold)", "not recorded" if tau is None else
                     f"{tau} (rows with accuracy > τ train on text only)"))
        p = training.scheduled_sampling_prob
        rows.append(("scheduled sampling", "not recorded" if p is None else
                     ("off (teacher forcing)" if p == 0 else f"p = {p} per span (App. F ablation)")))
    return ["## GAP settings\n", _table(("setting", "value"), rows) + "\n"]


def _training_section(training: TrainingRun) -> list[str]:
    """The card's "Training" section: base model, datasets, processes, LoRA, hyperparameters, the command."""
    parts = ["## Training\n"]
    lines = []
    if training.base_model:
        lines.append(f"- base model: `{training.base_model}`"
                     + (f" (Hub: `{training.base_model_id}`)" if training.base_model_id else ""))
    if training.datasets:
        lines.append("- datasets: " + ", ".join(f"`{name}`" for name in training.datasets))
    if training.world_size:
        lines.append(f"- processes: {training.world_size}")
    if training.lora:
        lora = ", ".join(f"{name} = {_code(value)}" for name, value in training.lora.items())
        lines.append(f"- LoRA on the language model ({lora}); latent head and latent-token rows fully trained"
                     + ("; merged into these weights with `gap merge-lora`" if training.merged else ""))
    if lines:
        parts.append("\n".join(lines) + "\n")
    if training.hyperparameters:
        rows = ((name, _code(value)) for name, value in training.hyperparameters.items())
        parts.append(_table(("hyperparameter", "value"), rows) + "\n")
    if training.command:
        launched = ""
        if training.world_size and training.world_size > 1:
            launched = (f"Run by each of the {training.world_size} processes (started with `deepspeed --num_gpus"
                        f" N` or `torchrun --nproc_per_node N`):\n\n")
        parts.append(f"{launched}```bash\n{training.command}\n```\n")
    return parts


def _usage_section(where: str, adapter: bool) -> list[str]:
    """The card's "Usage" section: loading with remote code, generating with latents, the interventions."""
    parts = ["## Usage\n"]
    if adapter:
        parts.append(
            "This folder holds a PEFT LoRA adapter. Merge it into its GAP base to get a full checkpoint:\n\n"
            "```bash\ngap merge-lora --adapter path/to/this/adapter --output-dir merged [--base path/to/gap-base]\n```\n\n"
            "or load it onto the base in Python:\n\n"
            "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForImageTextToText\n\n"
            "base = AutoModelForImageTextToText.from_pretrained(\"path/to/gap-base\", trust_remote_code=True)\n"
            f"model = PeftModel.from_pretrained(base, \"{where}\").merge_and_unload()\n```\n\n"
            "The merged model then generates as below.\n"
        )
    parts.append(
        "The model, its configuration and its processor load with `trust_remote_code=True` "
        "(the code files `configuration_gap.py`, `modeling_gap.py`, `processing_gap.py` lie next to the weights). "
        f"They support `{TRANSFORMERS_REQUIREMENT}` (the range they are tested with; with another release, loading "
        "stops with an error naming it) and need torch 2.6 or newer, accelerate and pillow:\n\n"
        f"```bash\npip install \"{TRANSFORMERS_REQUIREMENT}\" accelerate pillow\n```\n\n"
        "```python\n"
        "from PIL import Image\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n\n"
        f"repo = \"{where}\"\n"
        "model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True, dtype=\"auto\")\n"
        "processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)\n\n"
        "image = Image.open(\"question.png\").convert(\"RGB\")\n"
        "messages = [{\"role\": \"user\", \"content\": [{\"type\": \"image\"}, {\"type\": \"text\", \"text\": \"How many red "
        "cells are in row 2?\"}]}]\n"
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)\n"
        "inputs = processor(text=[prompt], images=[image], return_tensors=\"pt\").to(model.device)\n"
        "out = model.generate(**inputs, max_new_tokens=64, return_dict_in_generate=True,\n"
        "                     latent_intervention=\"pca\")  # or suppress / noise / hidden / hidden_ema\n"
        "answer = out.sequences[:, inputs[\"input_ids\"].shape[1]:]\n"
        "print(processor.batch_decode(answer, skip_special_tokens=True)[0])\n"
        "print(out.num_latent_spans[0], \"latent spans\")  # out.latents[0]: (spans, K, d), the latents fed back\n"
        "```\n\n"
        "`generate` forces exactly K `<|latent_pad|>` steps after each `<|latent_start|>` (each fed the latent decoded "
        "from the previous step, through the KV cache), then `<|latent_end|>`; `latent_tokens_per_span=` overrides K "
        "(a perfect square). `latent_intervention=` chooses what a latent step feeds (the paper's Tables 1 and 6):\n"
    )
    parts.append(_table(("`latent_intervention`", "what a latent step feeds"),
                        ((f"`{name}`", INTERVENTION_DESCRIPTIONS[name]) for name in LATENT_INTERVENTIONS)) + "\n")
    return parts


def render_model_card(
    config,
    *,
    model_name: str | None = None,
    model_id: str | None = None,
    training: TrainingRun | None = None,
    adapter: bool = False,
    tags: list[str] | None = None,
) -> str:
    """The README.md of a GAP checkpoint folder (or of a LoRA adapter folder when `adapter`).

    Args:
        config: the checkpoint's `GapConfig` (of the base model, for an adapter).
        model_name: the card's title (default: the last part of `model_id`, else "GAP model").
        model_id: where the folder is published (a Hub id), used in the loading code.
        training: the run that produced the folder (published as `published_run` gives it); None for a converted,
            untrained checkpoint.
        adapter: the folder holds a PEFT LoRA adapter, not full weights.
        tags: extra metadata tags.
    """
    settings = _settings(config)
    if training is not None:
        training = published_run(training)
    title = model_name or (model_id.split("/")[-1] if model_id else "GAP model")
    where = model_id or "path/to/this/folder"
    K = settings["latent_tokens_per_span"]
    parts = [_front_matter(settings, training, model_id, tags, adapter), f"# {title}\n"]

    base = None if training is None else (training.base_model_id or training.base_model)
    kind = "A LoRA adapter for a GAP model" if adapter else "A GAP model"
    origin = f" trained from `{base}`" if base else ""
    parts.append(
        f"{kind}{origin}: Qwen2.5-VL that writes *visual latent tokens* inside its own decoding. After "
        f"`<|latent_start|>` the model produces K = {K} continuous vectors, each predicted by a latent head and fed "
        "back as the next input embedding, then `<|latent_end|>` and ordinary text again.\n"
    )

    parts.append("## Method\n")
    parts.append(f"GAP (Granular Alignment Paradigm), from *{PAPER_TITLE}*:\n")
    parts.append("\n".join(f"- **{name}** — {what}" for name, what in PAPER_SECTIONS) + "\n")

    parts += _settings_section(settings, training)
    if training is not None:
        parts += _training_section(training)
    parts += _usage_section(where, adapter)
    return "\n".join(parts)


def write_model_card(folder, config, **kwargs) -> Path:
    """Write `render_model_card(config, **kwargs)` to `folder`/README.md; returns the path."""
    path = Path(folder) / CARD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_model_card(config, **kwargs), encoding="utf-8")
    return path


def read_training_run(folder) -> TrainingRun | None:
    """The `TrainingRun` recorded in `folder`/README.md's front matter (None without a GAP card)."""
    path = Path(folder) / CARD_NAME
    try:
        metadata = metadata_load(path) if path.is_file() else None
    except ValueError:  # front matter that is not a mapping: not a card this project wrote
        return None
    gap = metadata.get("gap") if isinstance(metadata, dict) else None
    recorded = gap.get("training") if isinstance(gap, dict) else None
    if not isinstance(recorded, dict):
        return None
    names = {f.name for f in dataclasses.fields(TrainingRun)}
    return TrainingRun(**{key: value for key, value in recorded.items() if key in names})


def lora_settings(model: Any) -> dict[str, Any] | None:
    """The active LoRA config's main fields of a PEFT `model`, for the card; None for a plain model."""
    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        return None
    config = peft_config[model.active_adapter]
    fields = ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "trainable_token_indices")
    return {name: getattr(config, name, None) for name in fields}


class RemoteCodeOnPush(TrainerCallback):
    """Before each Hub push of the Trainer, write the GAP model's code files (``modeling_gap.py`` and the
    ``configuration_gap.py`` it imports) into `output_dir`, the folder the Trainer uploads, next to the
    ``config.json`` whose ``auto_map`` names them. The Trainer copies the weights and config there from the
    checkpoint and saves the processor (``processing_gap.py``) there itself; the card is already there."""

    def on_push_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return
        gap = model.get_base_model() if hasattr(model, "get_base_model") else model
        os.makedirs(args.output_dir, exist_ok=True)
        custom_object_save(gap, args.output_dir)


def command_line(argv: list[str], environ: Mapping[str, str] | None = None) -> str:
    """The command that started this process, as one shell line: its launcher (`launcher_words`), the script and its
    arguments, without the `--local_rank` a launcher adds and without secrets (`command_without_secrets`:
    ``--hub_token``...)."""
    args, skip = [], False
    for arg in argv[1:]:
        if skip or arg == "--local_rank":
            skip = not skip
            continue
        if not arg.startswith("--local_rank="):
            args.append(arg)
    script = os.path.basename(argv[0]) if argv else "train_sft.py"
    launcher = launcher_words(os.environ if environ is None else environ)
    return shlex.join([*launcher, script, *command_without_secrets(args)])


def launcher_words(environ: Mapping[str, str]) -> list[str]:
    """What launched this process, read from the environment variables each launcher sets in the processes it starts:
    ``accelerate launch`` (``ACCELERATE_MIXED_PRECISION``; it may start torchrun itself, so it is looked for first),
    ``deepspeed`` (``CROSS_SIZE`` nodes of ``LOCAL_SIZE`` processes), ``torchrun`` (``TORCHELASTIC_RUN_ID``;
    ``LOCAL_WORLD_SIZE`` per node), else ``python``. The process counts are the run's; other launcher options
    (hosts, ports) are not visible to the process and are left out."""
    def count(key: str) -> int:
        value = environ.get(key, "")
        return int(value) if value.isdigit() else 1

    world = count("WORLD_SIZE")
    if "ACCELERATE_MIXED_PRECISION" in environ:
        per_node = count("LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else world
        return ["accelerate", "launch", *(["--num_machines", str(world // per_node)] if world > per_node else []),
                *(["--num_processes", str(world)] if world > 1 else [])]
    if "CROSS_SIZE" in environ and "LOCAL_SIZE" in environ:
        nodes = count("CROSS_SIZE")
        return ["deepspeed", *(["--num_nodes", str(nodes)] if nodes > 1 else []), "--num_gpus", str(count("LOCAL_SIZE"))]
    if "TORCHELASTIC_RUN_ID" in environ:
        per_node = count("LOCAL_WORLD_SIZE")
        return ["torchrun", *(["--nnodes", str(world // per_node)] if world > per_node else []),
                "--nproc_per_node", str(per_node)]
    return ["python"]
