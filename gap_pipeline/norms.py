"""Norm profile of a Qwen2.5-VL / GAP model (paper §3.1, Fig. 2; App. C).

For a set of questions (images + prompts) this measures, per decoder layer, the L2 norms of the
hidden states at text positions and at vision (``<|image_pad|>``) positions, as the mean and
standard deviation of their natural log (the paper plots ``log(||.||_2)`` with std bands in log
space), and, for a GAP model, the norms of the latents it generates against the norms of the
decoder states they were produced from.

What the layer index means (transformers 5, Qwen2.5-VL; checked by the tests)
------------------------------------------------------------------------------
``output_hidden_states=True`` returns L + 1 tensors for L decoder layers: index 0 is the decoder's input
embeddings (token embeddings at text positions, the vision tower's merged tokens v at ``<|image_pad|>`` positions),
index l (1 <= l < L) the residual stream after decoder layer l, but index L is *not* the output of layer L:
transformers replaces it with ``last_hidden_state``, the output of the backbone's final RMSNorm (h_bar, what the LM
head and GAP's latent head read). Layer L here is therefore the *pre-norm* h^(L), read by a forward hook on the final
norm's input, and h_bar is reported separately (``final_norm``).

Latents (GAP models)
--------------------
A latent span is forced open by appending ``<|latent_start|>`` to each prompt; ``generate`` then runs exactly K latent
steps with the chosen intervention (``pca`` = GAP). The fed latents' norms come from ``generate(...).latent_norms``;
the states they were decoded from (h_bar and h^(L) at the last position of each latent step's forward) from the same
hook on the final norm, so they are exactly the states ``generate`` used.

Output JSON (``norm_profile.json``)
-----------------------------------
Every *stats* object has ``count`` (number of vectors), ``log_norm_mean``, ``log_norm_std``
(natural log of the L2 norm), ``norm_mean``, ``norm_std`` (raw L2 norm) and ``norm_geomean``
(exp of ``log_norm_mean``: the raw norm the paper quotes for a log-norm value).

* ``format`` ("gap-norm-profile"), ``version``, ``model``, ``model_type``, ``is_gap``,
  ``num_samples``, ``num_layers`` (L), ``hidden_size`` (d), ``log`` ("natural"), ``settings``;
* ``layer_index``: the meaning of indices 0 .. L (see above), as text;
* ``layers``: ``{"text": [stats] * (L + 1), "vision": [stats] * (L + 1)}`` (index 0 = input
  embeddings, L = pre-norm output of the last layer);
* ``input_embeddings``: ``{"text": stats, "vision": stats}`` (= layer 0);
* ``final_norm``: ``{"text": stats, "vision": stats}``: h_bar, the final RMSNorm output;
* ``peak``: per modality, ``layer`` (1 .. L, pre-norm), ``log_norm_mean``, ``norm_geomean`` and
  ``ratio_to_input`` (geometric-mean norm at the peak over that at the input embeddings);
* ``latents``: null for a base model or with ``--no-latents``; otherwise ``intervention``,
  ``latent_tokens_per_span`` (K), ``num_spans``, and stats ``latent`` (the fed latents),
  ``final_norm_state`` (h_bar at the latent steps), ``pre_norm_state`` (h^(L) at the latent
  steps), ``query_vision_input`` (= ``input_embeddings.vision``), and ``ratios``:
  ``final_norm_over_latent``, ``pre_norm_over_latent``, ``latent_over_query_vision`` (ratios of
  geometric-mean norms).

The plot (``norm_profile.png``) follows Fig. 2: (a) mean +/- std log-norm per layer for text and
vision states, the final-norm states as separate markers and the input-embedding levels as dashed
lines; (b), for GAP models, the log norms of the query vision input, the generated latents and the
final-norm / pre-norm decoder states at the latent steps.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Iterator, Sequence

import torch

from modeling_gap import LATENT_INTERVENTIONS

from . import GapError
from .data import add_allow_outside_image_dir_argument, add_max_image_pixels_argument
from .datasets_io import check_apart_from_inputs
from .inference import GAP_MODEL_TYPE, QWEN_MODEL_TYPE, check_model_folder, encode_prompts

FORMAT_NAME = "gap-norm-profile"
FORMAT_VERSION = 1
PROFILE_FILENAME = "norm_profile.json"
PLOT_FILENAME = "norm_profile.png"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
DEFAULT_PROMPT = "Describe the image in detail."
MODALITIES = ("text", "vision")

LAYER_INDEX_DOC = (
    "index 0 = decoder input embeddings (token embeddings at text positions, merged vision-tower outputs at "
    "<|image_pad|> positions); index l in 1..L = residual stream after decoder layer l, before the final RMSNorm "
    "(index L read from the final norm's input, because transformers' hidden_states[L] is the final-norm output); "
    "the final-norm output h_bar is reported under 'final_norm'"
)

__all__ = [
    "LogNormStats",
    "NormProfiler",
    "folder_samples",
    "dataset_samples",
    "plot_profile",
    "profile_norms",
    "write_profile",
]


class LogNormStats:
    """Running mean/std of log L2 norms (and raw norms) over any number of vectors, in float64."""

    def __init__(self):
        self.count = 0
        self.sum_log = 0.0
        self.sumsq_log = 0.0
        self.sum_raw = 0.0
        self.sumsq_raw = 0.0

    def update(self, norms: torch.Tensor) -> None:
        """Add L2 norms (any shape); zero norms are clamped to 1e-30 before the log."""
        norms = norms.detach().reshape(-1).to(torch.float64)
        logs = norms.clamp_min(1e-30).log()
        self.count += int(norms.numel())
        self.sum_log += float(logs.sum())
        self.sumsq_log += float((logs * logs).sum())
        self.sum_raw += float(norms.sum())
        self.sumsq_raw += float((norms * norms).sum())

    @staticmethod
    def _std(total: float, total_sq: float, n: int) -> float:
        if n < 2:
            return 0.0
        mean = total / n
        return math.sqrt(max(total_sq / n - mean * mean, 0.0) * n / (n - 1))

    def to_dict(self) -> dict[str, Any]:
        n = self.count
        if n == 0:
            return {"count": 0, "log_norm_mean": None, "log_norm_std": None, "norm_mean": None, "norm_std": None,
                    "norm_geomean": None}
        log_mean = self.sum_log / n
        return {
            "count": n,
            "log_norm_mean": log_mean,
            "log_norm_std": self._std(self.sum_log, self.sumsq_log, n),
            "norm_mean": self.sum_raw / n,
            "norm_std": self._std(self.sum_raw, self.sumsq_raw, n),
            "norm_geomean": math.exp(log_mean),
        }


class NormProfileError(GapError):
    """Bad arguments or inputs of ``gap norm-profile``."""


def _final_norm_module(model):
    """The backbone's final RMSNorm (Qwen2.5-VL: ``model.model.language_model.norm``)."""
    try:
        return model.model.language_model.norm
    except AttributeError:
        raise GapError(
            f"{type(model).__name__} has no `model.language_model.norm`; norm profiling needs a Qwen2.5-VL or GAP model"
        ) from None


@contextmanager
def _final_norm_tap(model, last_position_only: bool) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """A forward hook on the final norm for the block: yields the list of its (input = pre-norm h^(L), output = h_bar)
    per call, or of their norms at the last position when `last_position_only`."""
    calls = []

    def hook(module, args, output):
        pre, post = args[0], output
        if last_position_only:
            calls.append((pre[:, -1].float().norm(dim=-1).cpu(), post[:, -1].float().norm(dim=-1).cpu()))
        else:
            calls.append((pre.detach(), post.detach()))

    handle = _final_norm_module(model).register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


class NormProfiler:
    """Accumulates a norm profile over batches of prompts; see the module docstring for the quantities."""

    def __init__(
        self,
        model,
        processor,
        *,
        is_gap: bool,
        latents: bool = True,
        latent_intervention: str = "pca",
        latent_tokens_per_span: int | None = None,
        exclude_first_token: bool = False,
    ):
        self.model = model
        self.processor = processor
        self.is_gap = is_gap
        self.with_latents = bool(latents and is_gap)
        self.latent_intervention = latent_intervention
        self.exclude_first_token = exclude_first_token
        config = model.config
        self.num_layers = int(config.text_config.num_hidden_layers)
        self.hidden_size = int(config.text_config.hidden_size)
        self.image_token_id = config.image_token_id
        self.video_token_id = getattr(config, "video_token_id", None)
        self.latent_pad_id = getattr(config, "latent_pad_token_id", None)
        self.latent_start_id = getattr(config, "latent_start_token_id", None)
        K = latent_tokens_per_span or getattr(config, "latent_tokens_per_span", None)
        self.latent_tokens_per_span = int(K) if self.with_latents else None
        self.layers = {m: [LogNormStats() for _ in range(self.num_layers + 1)] for m in MODALITIES}
        self.final = {m: LogNormStats() for m in MODALITIES}
        self.latent = LogNormStats()
        self.latent_final = LogNormStats()
        self.latent_pre = LogNormStats()
        self.num_samples = 0
        self.num_spans = 0
        self.tokenizer = getattr(processor, "tokenizer", processor)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _masks(self, input_ids, attention_mask):
        valid = attention_mask.bool()
        if self.exclude_first_token:
            first = valid.int().argmax(dim=1)
            valid = valid.clone()
            valid[torch.arange(valid.shape[0], device=valid.device), first] = False
        vision = valid & (input_ids == self.image_token_id)
        text = valid & ~(input_ids == self.image_token_id)
        for other in (self.video_token_id, self.latent_pad_id):
            if other is not None:
                text &= input_ids != other
        return {"text": text, "vision": vision}

    @torch.no_grad()
    def add_batch(self, batch: Sequence[tuple[list[dict], list]]) -> None:
        """Profile one batch of ``(messages, images)`` prompts."""
        inputs = encode_prompts(self.processor, batch, self.device)
        masks = self._masks(inputs["input_ids"], inputs["attention_mask"])
        with _final_norm_tap(self.model, last_position_only=False) as calls:
            outputs = self.model(**inputs, output_hidden_states=True, use_cache=False)
        hidden = outputs.hidden_states
        if len(hidden) != self.num_layers + 1 or len(calls) != 1:
            raise RuntimeError(
                f"expected {self.num_layers + 1} hidden states and one final-norm call, got {len(hidden)} and "
                f"{len(calls)}; this transformers version returns hidden states differently"
            )
        pre_norm, final = calls[0]
        for layer in range(self.num_layers + 1):
            state = pre_norm if layer == self.num_layers else hidden[layer]
            norms = state.float().norm(dim=-1)
            for modality, mask in masks.items():
                self.layers[modality][layer].update(norms[mask])
        final_norms = final.float().norm(dim=-1)
        for modality, mask in masks.items():
            self.final[modality].update(final_norms[mask])
        del outputs, hidden, pre_norm, final
        if self.with_latents:
            self._add_latents(inputs)
        self.num_samples += len(batch)

    def _add_latents(self, inputs) -> None:
        """Force one span per row (``<|latent_start|>`` appended) and record latents and their source states."""
        K = self.latent_tokens_per_span
        batch = inputs["input_ids"].shape[0]
        start = torch.full((batch, 1), self.latent_start_id, dtype=inputs["input_ids"].dtype, device=self.device)
        forced = dict(inputs)
        forced["input_ids"] = torch.cat([inputs["input_ids"], start], dim=1)
        forced["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(start)], dim=1)
        if "mm_token_type_ids" in inputs:
            forced["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(start)], dim=1)
        with _final_norm_tap(self.model, last_position_only=True) as calls:
            output = self.model.generate(
                **forced,
                do_sample=False,
                max_new_tokens=K + 1,
                min_new_tokens=K + 1,
                latent_intervention=self.latent_intervention,
                latent_tokens_per_span=K,
                return_dict_in_generate=True,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        generated = output.sequences[:, forced["input_ids"].shape[1] :].cpu()
        is_pad = generated == self.latent_pad_id
        for row in range(batch):
            if int(is_pad[row].sum()) != K or output.latent_norms[row].shape[0] != 1:
                raise RuntimeError(
                    f"row {row} did not generate one full latent span after <|latent_start|> "
                    f"({int(is_pad[row].sum())} pads of K={K}); check the model's latent token ids"
                )
            self.latent.update(output.latent_norms[row])
        steps = [step for step in range(generated.shape[1]) if bool(is_pad[:, step].any())]
        for step in steps:  # the forward of call `step` decoded the latent fed at generated column `step`
            pre, post = calls[step]
            rows = is_pad[:, step]
            self.latent_pre.update(pre[rows])
            self.latent_final.update(post[rows])
        self.num_spans += batch

    def result(self) -> dict[str, Any]:
        """The profile as a JSON-ready dict (keys documented in the module docstring)."""
        layers = {m: [s.to_dict() for s in self.layers[m]] for m in MODALITIES}
        inputs = {m: layers[m][0] for m in MODALITIES}
        peak = {}
        for m in MODALITIES:
            candidates = [(l, s) for l, s in enumerate(layers[m]) if l >= 1 and s["count"]]
            if not candidates or not inputs[m]["count"]:
                peak[m] = None
                continue
            layer, stats = max(candidates, key=lambda item: item[1]["log_norm_mean"])
            peak[m] = {"layer": layer, "log_norm_mean": stats["log_norm_mean"], "norm_geomean": stats["norm_geomean"],
                       "ratio_to_input": _ratio(stats, inputs[m])}
        latents = None
        if self.with_latents:
            latent, final, pre = self.latent.to_dict(), self.latent_final.to_dict(), self.latent_pre.to_dict()
            latents = {
                "intervention": self.latent_intervention,
                "latent_tokens_per_span": self.latent_tokens_per_span,
                "num_spans": self.num_spans,
                "latent": latent,
                "final_norm_state": final,
                "pre_norm_state": pre,
                "query_vision_input": inputs["vision"],
                "ratios": {
                    "final_norm_over_latent": _ratio(final, latent),
                    "pre_norm_over_latent": _ratio(pre, latent),
                    "latent_over_query_vision": _ratio(latent, inputs["vision"]),
                },
            }
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "model_type": GAP_MODEL_TYPE if self.is_gap else QWEN_MODEL_TYPE,
            "is_gap": self.is_gap,
            "num_samples": self.num_samples,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "log": "natural",
            "layer_index": LAYER_INDEX_DOC,
            "layers": layers,
            "input_embeddings": inputs,
            "final_norm": {m: self.final[m].to_dict() for m in MODALITIES},
            "peak": peak,
            "latents": latents,
        }


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """The ratio of the geometric-mean norms of two stats objects; None when either is empty."""
    return math.exp(a["log_norm_mean"] - b["log_norm_mean"]) if a["count"] and b["count"] else None


def profile_norms(
    model,
    processor,
    samples: Iterable[tuple[list[dict], list]],
    *,
    is_gap: bool | None = None,
    batch_size: int = 1,
    latents: bool = True,
    latent_intervention: str = "pca",
    latent_tokens_per_span: int | None = None,
    exclude_first_token: bool = False,
    total: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Norm profile of `model` over `samples` (``(messages, images)`` prompts); returns the JSON-ready dict.

    `is_gap` defaults to whether the model has latent token ids. `latents=False` skips latent generation.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise NormProfileError(f"batch size must be >= 1, got {batch_size}")
    if is_gap is None:
        is_gap = getattr(model.config, "latent_token_ids", None) is not None
    profiler = NormProfiler(
        model,
        processor,
        is_gap=is_gap,
        latents=latents,
        latent_intervention=latent_intervention,
        latent_tokens_per_span=latent_tokens_per_span,
        exclude_first_token=exclude_first_token,
    )
    samples = iter(samples)
    with tqdm(total=total, unit="sample", desc="norm-profile", disable=not progress, dynamic_ncols=True) as bar:
        while batch := list(itertools.islice(samples, batch_size)):
            profiler.add_batch(batch)
            bar.update(len(batch))
    if profiler.num_samples == 0:
        raise NormProfileError("no samples to profile")
    return profiler.result()


# ------------------------------------------------------------------------------------------------------------- Inputs


def folder_samples(folder: str | os.PathLike, prompt: str, limit: int | None = None):
    """``(samples, n)``: one ``(messages, [image])`` per image file of `folder` (sorted by name), asking `prompt`."""
    from .inference import open_image

    folder = Path(folder)
    if not folder.is_dir():
        raise NormProfileError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise NormProfileError(f"{folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    if limit is not None:
        files = files[:limit]

    def generate():
        for path in files:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            yield messages, [open_image(path, where=str(path))]

    return generate(), len(files)


def dataset_samples(
    path: str | os.PathLike,
    *,
    split: str | None = None,
    limit: int | None = None,
    messages_column: str = "messages",
    images_column: str = "images",
    allow_outside_image_dir: bool = False,
):
    """``(samples, n)``: the question (turns before the first assistant turn, and its images) of each row; image
    paths stay inside the data's folder unless `allow_outside_image_dir` (see `load_rows`)."""
    from .data import undecoded_images
    from .inference import dataset_base_dir, load_rows, prompt_of_row

    dataset = load_rows(path, split=split, image_columns=(images_column,),
                        allow_outside_image_dir=allow_outside_image_dir)
    if messages_column not in dataset.column_names:
        raise NormProfileError(f"{path} has no '{messages_column}' column (its columns: {dataset.column_names}); "
                         "name the conversation column with --messages-column")
    # Only the question's columns: aux images and latent targets are large and never needed here.
    dataset = dataset.select_columns([c for c in (messages_column, images_column) if c in dataset.column_names])
    dataset = undecoded_images(dataset, [images_column])  # opened by prompt_of_row, so a bad image names its row
    n = len(dataset) if limit is None else min(limit, len(dataset))
    base_dir = dataset_base_dir(path)

    def generate():
        for index in range(n):
            yield prompt_of_row(
                dataset[index], index, messages_column=messages_column, images_column=images_column, base_dir=base_dir
            )

    return generate(), n


# ------------------------------------------------------------------------------------------------------------ Outputs


def write_profile(profile: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the profile JSON (a folder gets ``norm_profile.json``)."""
    from .datasets_io import write_json_file

    return write_json_file(path, profile, PROFILE_FILENAME)


def plot_profile(profile: dict[str, Any], path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw the Fig. 2-style plot of a profile into a PNG (Agg backend, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    p = Path(path)
    if p.suffix.lower() != ".png":
        p = p / PLOT_FILENAME
    p.parent.mkdir(parents=True, exist_ok=True)
    latents = profile.get("latents")
    n_panels = 2 if latents else 1
    fig = Figure(figsize=(6.4 * n_panels, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    colours = {"text": "tab:blue", "vision": "tab:orange"}
    ax = fig.add_subplot(1, n_panels, 1)
    L = profile["num_layers"]
    for modality in MODALITIES:
        stats = profile["layers"][modality]
        xs = [l for l, s in enumerate(stats) if s["count"]]
        if not xs:
            continue
        mean = [stats[l]["log_norm_mean"] for l in xs]
        std = [stats[l]["log_norm_std"] for l in xs]
        colour = colours[modality]
        ax.plot(xs, mean, marker="o", markersize=3, color=colour, label=f"{modality} hidden (pre-norm)")
        ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=colour,
                        alpha=0.2)
        ax.axhline(stats[0]["log_norm_mean"], color=colour, linestyle="--", linewidth=1,
                   label=f"input {modality} embedding")
        final = profile["final_norm"][modality]
        if final["count"]:
            ax.errorbar([L + 1], [final["log_norm_mean"]], yerr=[final["log_norm_std"]], color=colour, marker="x",
                        markersize=8, capsize=3, linestyle="none", label=f"{modality} after final norm")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"layer (0 = input embeddings, {L} = last layer pre-norm, {L + 1} = final norm)")
    ax.set_ylabel("log ||h||_2  (mean ± std)")
    ax.set_title("(a) hidden-state norms by layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")

    if latents:
        bx = fig.add_subplot(1, n_panels, 2)
        entries = [
            ("query vision\ninput", latents["query_vision_input"], "tab:orange"),
            (f"latents\n({latents['intervention']})", latents["latent"], "tab:green"),
            ("final-norm\nh̄ (latent steps)", latents["final_norm_state"], "tab:purple"),
            ("pre-norm\nh(L) (latent steps)", latents["pre_norm_state"], "tab:red"),
        ]
        entries = [entry for entry in entries if entry[1]["count"]]
        positions = list(range(len(entries)))
        bx.bar(positions, [e[1]["log_norm_mean"] for e in entries], yerr=[e[1]["log_norm_std"] for e in entries],
               color=[e[2] for e in entries], capsize=4, alpha=0.8)
        bx.set_xticks(positions)
        bx.set_xticklabels([e[0] for e in entries], fontsize=8)
        for x, entry in zip(positions, entries):
            bx.annotate(f"{entry[1]['norm_geomean']:.3g}", (x, entry[1]["log_norm_mean"]), textcoords="offset points",
                        xytext=(0, 4), ha="center", fontsize=7)
        bx.set_ylabel("log ||.||_2  (mean ± std; label: raw norm)")
        bx.set_title(f"(b) latents vs decoder states (K={latents['latent_tokens_per_span']})")
        bx.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(str(p))
    return p


def format_summary(profile: dict[str, Any]) -> str:
    """A one-screen text summary of a profile."""
    lines = [
        f"norm profile of {profile.get('model', '?')} ({profile['model_type']}): {profile['num_samples']} samples, "
        f"L={profile['num_layers']} layers, d={profile['hidden_size']} (natural log of L2 norms)",
    ]
    for modality in MODALITIES:
        inp = profile["input_embeddings"][modality]
        if not inp["count"]:
            lines.append(f"  {modality:6s}: no positions")
            continue
        peak = profile["peak"][modality]
        last = profile["layers"][modality][-1]
        final = profile["final_norm"][modality]
        lines.append(
            f"  {modality:6s}: {inp['count']} tokens; input {inp['log_norm_mean']:.2f}±{inp['log_norm_std']:.2f} "
            f"(norm {inp['norm_geomean']:.3g}); peak layer {peak['layer']} {peak['log_norm_mean']:.2f} "
            f"(norm {peak['norm_geomean']:.3g}, {peak['ratio_to_input']:.1f}x input); last pre-norm "
            f"{last['log_norm_mean']:.2f}; final norm {final['log_norm_mean']:.2f}"
        )
    latents = profile.get("latents")
    if latents:
        lat, fin, pre = latents["latent"], latents["final_norm_state"], latents["pre_norm_state"]
        ratios = latents["ratios"]
        lines.append(
            f"  latents ({latents['intervention']}, K={latents['latent_tokens_per_span']}, {latents['num_spans']} spans): "
            f"log norm {lat['log_norm_mean']:.2f}±{lat['log_norm_std']:.2f} (norm {lat['norm_geomean']:.3g})"
        )
        ratio_text = ", ".join(
            f"{name.replace('_', ' ')} {value:.2f}x" for name, value in ratios.items() if value is not None
        )
        lines.append(
            f"  at latent steps: final-norm h̄ {fin['log_norm_mean']:.2f}, pre-norm h(L) {pre['log_norm_mean']:.2f}; "
            f"{ratio_text}"
        )
    elif profile["is_gap"]:
        lines.append("  latents: skipped (--no-latents)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- Command line

HELP = "Profile layer-wise log L2 norms of text/vision hidden states and of generated latents (paper Fig. 2)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gap norm-profile``."""
    parser.add_argument("--model", required=True, help="a Qwen2.5-VL or GAP checkpoint folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--dataset",
        help="a dataset in the project schema (save_to_disk folder, .jsonl, .json or .parquet); each row's question "
        "(turns before the first assistant turn, with its images) is a prompt",
    )
    source.add_argument("--images", help="a folder of image files; each is asked --prompt")
    parser.add_argument("--prompt", default=None, help=f"the question asked of each --images file (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--split", default=None, help="split to use when --dataset is a DatasetDict")
    parser.add_argument("--messages-column", default="messages", help="dataset column of the conversation (default: messages)")
    parser.add_argument("--images-column", default="images", help="dataset column of the images (default: images)")
    add_max_image_pixels_argument(parser)
    add_allow_outside_image_dir_argument(parser)
    parser.add_argument("--max-samples", type=int, default=64, help="profile at most this many prompts (default: 64)")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per forward, left-padded (default: 1)")
    parser.add_argument("--output-dir", required=True, help=f"where {PROFILE_FILENAME} and {PLOT_FILENAME} go")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weights dtype (default: auto = the checkpoint's)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--no-latents", action="store_true", help="GAP models: skip latent generation")
    parser.add_argument("--latent-intervention", default="pca",
                        choices=[name for name in LATENT_INTERVENTIONS if name not in ("suppress", "oracle")],
                        help="what latent steps feed (default: pca = GAP; hidden = output-as-input baseline)")
    parser.add_argument("--latent-tokens-per-span", type=int, default=None, help="override K for the forced span")
    parser.add_argument("--exclude-first-token", action="store_true",
                        help="leave each prompt's first token out of the text statistics (its state is often an "
                        "outlier, an attention sink)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run ``gap norm-profile``."""
    from configuration_gap import check_latent_budget

    from .inference import load_model_and_processor

    if args.max_samples is not None and args.max_samples < 1:
        raise NormProfileError(f"--max-samples must be >= 1, got {args.max_samples}")
    if args.batch_size < 1:
        raise NormProfileError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.prompt is not None and args.images is None:
        raise NormProfileError("--prompt applies to --images; a --dataset brings its own questions")
    if args.latent_tokens_per_span is not None:
        try:
            check_latent_budget(args.latent_tokens_per_span, "--latent-tokens-per-span")
        except ValueError as exc:
            raise NormProfileError(str(exc)) from None
    check_model_folder(args.model, "--model", NormProfileError)
    check_apart_from_inputs(args.output_dir, {"--model folder": args.model, "--dataset": args.dataset,
                                              "--images folder": args.images}, NormProfileError)
    started = time.time()
    if args.images is not None:
        samples, total = folder_samples(args.images, args.prompt or DEFAULT_PROMPT, limit=args.max_samples)
    else:
        samples, total = dataset_samples(
            args.dataset,
            split=args.split,
            limit=args.max_samples,
            messages_column=args.messages_column,
            images_column=args.images_column,
            allow_outside_image_dir=args.allow_outside_image_dir,
        )
    model, processor, is_gap = load_model_and_processor(args.model, dtype=args.dtype, device=args.device)
    if args.latent_tokens_per_span is not None and not is_gap:
        raise NormProfileError("--latent-tokens-per-span applies to GAP models; this is a base Qwen2.5-VL checkpoint")
    profile = profile_norms(
        model,
        processor,
        samples,
        is_gap=is_gap,
        batch_size=args.batch_size,
        latents=not args.no_latents,
        latent_intervention=args.latent_intervention,
        latent_tokens_per_span=args.latent_tokens_per_span,
        exclude_first_token=args.exclude_first_token,
        total=total,
        progress=not args.no_progress,
    )
    profile["model"] = str(args.model)
    profile["settings"] = {
        "source": str(args.dataset or args.images),
        "prompt": (args.prompt or DEFAULT_PROMPT) if args.images else None,
        "max_samples": args.max_samples,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "device": str(next(model.parameters()).device),
        "latents": not args.no_latents,
        "latent_intervention": args.latent_intervention,
        "exclude_first_token": args.exclude_first_token,
    }
    json_path = write_profile(profile, Path(args.output_dir) / PROFILE_FILENAME)
    png_path = plot_profile(profile, Path(args.output_dir) / PLOT_FILENAME, title=str(args.model))
    print(format_summary(profile))
    print(f"  wrote {json_path} and {png_path} ({time.time() - started:.1f}s)")
    return 0
