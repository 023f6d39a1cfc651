"""The lmms-eval model ``gap``: a GAP (or plain Qwen2.5-VL) checkpoint inside lmms-eval.

Installed with ``pip install -e ".[lmms-eval]"`` then ``pip install --no-deps lmms-eval==0.7.3`` (``make
install-harness``), it is found through the ``lmms_eval.models`` entry point, so ``lmms-eval eval --model gap
--model_args pretrained=DIR,...`` works with no copy of lmms-eval. Generation and decoding are `gap evaluate`'s (:func:`gap_pipeline.evaluate.
generate_batch`), so a task written by ``gap lmms-task`` scores the same rows the same way.

Model args: ``pretrained`` (checkpoint folder), ``latent_intervention`` (pca, suppress, noise, hidden,
hidden_ema), ``latent_tokens_per_span`` (K; default the checkpoint's), ``seed`` (noise intervention and
sampling), ``dtype``, ``device``, ``batch_size``, ``latent_log`` (a ``.jsonl`` file that gets one line per
sample: task, doc id, latent spans opened, per-span mean latent norms, vision-token norm). The task's
generation kwargs pass through to ``generate``; ``until`` strings cut the text after generation.
"""

from __future__ import annotations

import json
from itertools import groupby
from pathlib import Path

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from .harness import HarnessModel

MODEL_ID = "gap"
DEFAULT_MAX_NEW_TOKENS = 256


def manifest() -> ModelManifest:
    """The ``lmms_eval.models`` entry point: model id ``gap`` -> :class:`GapLmms`."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.GapLmms")


def cut_at_stop_strings(text: str, until: list[str] | str | None) -> str:
    """`text` up to the first of the `until` strings (lmms-eval's stop sequences)."""
    if isinstance(until, str):
        until = [until]
    for stop in until or []:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class GapLmms(lmms):
    """lmms-eval "simple" model: the question text after the doc's images, in one user turn, batched."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        latent_intervention: str = "pca",
        latent_tokens_per_span: int | None = None,
        seed: int = 0,
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int | str = 1,
        latent_log: str | None = None,
        **unused,
    ) -> None:
        super().__init__()
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        self._rank, self._world_size = state.process_index, state.num_processes
        self.gap = HarnessModel(pretrained, latent_intervention=latent_intervention,
                                latent_tokens_per_span=latent_tokens_per_span, seed=int(seed) + self._rank,
                                dtype=dtype, device=state.device if device == "auto" else device)
        self.batch_size = int(batch_size)
        self.latent_log = Path(latent_log) if latent_log else None

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Texts for `requests` in their order, in batches of ``batch_size`` that share a task and kwargs."""
        from tqdm.auto import tqdm

        texts: list[str] = []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="gap generate")
        keyed = [(request.args[4], request.args[5], json.dumps(request.args[1], sort_keys=True, default=str), request)
                 for request in requests]
        for (task, split, _), group in groupby(keyed, key=lambda entry: entry[:3]):
            group = [entry[3] for entry in group]
            for start in range(0, len(group), self.batch_size):
                batch = group[start : start + self.batch_size]
                texts.extend(self._generate(task, split, batch))
                bar.update(len(batch))
        bar.close()
        return texts

    def _generate(self, task: str, split: str, batch: list[Instance]) -> list[str]:
        gen_kwargs = dict(batch[0].args[1])
        until = gen_kwargs.pop("until", None)
        max_new_tokens = int(gen_kwargs.pop("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        do_sample = bool(gen_kwargs.pop("do_sample", False))
        if not do_sample:  # greedy: sampling knobs would only warn
            for knob in ("temperature", "top_p", "top_k", "num_beams"):
                gen_kwargs.pop(knob, None)
        questions = []
        for request in batch:
            context, _, doc_to_visual, doc_id = request.args[:4]
            questions.append((list(doc_to_visual(self.task_dict[task][split][doc_id]) or []), context))
        answers = self.gap.generate(questions, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                    generation_kwargs=gen_kwargs)
        if self.latent_log is not None:
            self.latent_log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.latent_log, "a", encoding="utf-8") as log:
                for request, answer in zip(batch, answers):
                    log.write(json.dumps({"task": task, "doc_id": request.args[3], "intervention": self.gap.intervention,
                                          "budget": self.gap.budget, "latent_spans": answer.latent_spans,
                                          "latent_span_norms": answer.latent_span_norms,
                                          "vision_norm": answer.vision_norm}) + "\n")
        return [cut_at_stop_strings(answer.text, until) for answer in answers]

    def loglikelihood(self, requests):
        raise NotImplementedError("the gap model answers generate_until tasks only (GAP decodes latent spans); "
                                  "pick a task with output_type: generate_until")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the gap model answers single-round generate_until tasks only")
