"""``gap lmms-task``: an lmms-eval task folder for a project dataset or a VLMEvalKit TSV.

The folder holds ``NAME.yaml`` (``dataset_path: json`` over ``docs.jsonl``, ``reasoning_tags: none`` so
lmms-eval keeps the latent span in the response, greedy decoding with no stop string), ``NAME_utils.py``
(images, question text and a scorer that calls the project's answer checker) and ``images/`` (PNG, lossless).
Rows are read by `gap evaluate`'s readers, so lmms-eval with ``--model gap`` scores the same rows with the same
prompt and checker as `gap evaluate`. Run it with ``lmms-eval eval --include_path DIR --tasks NAME ...``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from . import GapError
from .data import add_allow_outside_image_dir_argument, add_max_image_pixels_argument
from .datasets_io import check_apart_from_inputs

HELP = "Write an lmms-eval task folder (YAML + scorer with the project's answer checker) for a dataset or TSV."

TASK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LmmsTaskError(GapError):
    """Rows or arguments ``gap lmms-task`` cannot turn into a task; the message names the row or argument."""


UTILS_TEMPLATE = '''"""lmms-eval task functions written by `gap lmms-task` for {data}."""

import json
from pathlib import Path

from gap_pipeline.answers import load_checker
from gap_pipeline.inference import open_image

HERE = Path(__file__).resolve().parent
CHECKER = load_checker({checker!r})


def doc_to_visual(doc):
    return [open_image(path, HERE, where=f"doc {{doc['id']}}") for path in doc["images"]]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {{"accuracy": float(bool(CHECKER(results[0], doc["answer"], json.loads(doc["checker_row"]))))}}
'''

YAML_TEMPLATE = """# lmms-eval task written by `gap lmms-task` for {data}
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: generate_until
doc_to_visual: !function {name}_utils.doc_to_visual
doc_to_text: !function {name}_utils.doc_to_text
doc_to_target: answer
process_results: !function {name}_utils.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  do_sample: false
  until: []
# lmms-eval strips <think>-style spans by default; GAP's answer follows its latent span, keep the text whole
reasoning_tags: none
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def question_text(item) -> str:
    """The text of an item whose question is one user turn of images followed by one text part."""
    if len(item.messages) == 1 and item.messages[0].get("role") == "user":
        content = item.messages[0].get("content")
        if isinstance(content, str) and not item.images:
            return content
        if isinstance(content, list) and content and content[-1].get("type") == "text" and all(
                part.get("type") == "image" for part in content[:-1]):
            return content[-1]["text"]
    raise LmmsTaskError(f"row {item.id}: an lmms-eval task gives the model the doc's images then one text, but this "
                     "row's question is not a single user turn of images followed by a text; restructure the row")


def write_task(items, output_dir: str | Path, name: str, *, data: str, max_new_tokens: int = 256,
               checker: str | None = None) -> Path:
    """Write the task folder for `items` (from :func:`gap_pipeline.evaluate.load_items`); returns the YAML path."""
    if not TASK_NAME.match(name):
        raise LmmsTaskError(f"task name {name!r}: use letters, digits and underscores (it names a Python module)")
    output_dir = Path(output_dir).resolve()
    image_dir = output_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    docs = output_dir / "docs.jsonl"
    tmp = docs.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for k, item in enumerate(items):
            text = question_text(item)
            paths = []
            for j, image in enumerate(item.images):
                path = f"images/{k:06d}_{j}.png"
                image.save(output_dir / path)
                paths.append(path)
            f.write(json.dumps({"id": item.id, "question": text, "images": paths, "answer": item.gold,
                                "checker_row": json.dumps(item.checker_row())}) + "\n")
    tmp.replace(docs)
    (output_dir / f"{name}_utils.py").write_text(UTILS_TEMPLATE.format(data=data, checker=checker), encoding="utf-8")
    yaml_path = output_dir / f"{name}.yaml"
    yaml_path.write_text(YAML_TEMPLATE.format(data=data, name=name, docs=json.dumps(str(docs)),
                                              max_new_tokens=max_new_tokens), encoding="utf-8")
    return yaml_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="a dataset (save_to_disk folder, .jsonl, .json, .parquet) or a VLMEvalKit .tsv file")
    parser.add_argument("--split", default=None, help="split of a DatasetDict folder")
    parser.add_argument("--output-dir", required=True, help="the task folder (pass it as lmms-eval's --include_path)")
    parser.add_argument("--name", required=True, help="the task name (lmms-eval's --tasks)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--checker", default=None, help="answer checker as module:callable (default: built-in)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N usable rows")
    add_max_image_pixels_argument(parser)
    add_allow_outside_image_dir_argument(parser)


def run(args: argparse.Namespace) -> int:
    from .evaluate import load_items

    check_apart_from_inputs(args.output_dir, {"--data": args.data}, LmmsTaskError)
    items, problems = load_items(args.data, args.split, allow_outside_image_dir=args.allow_outside_image_dir)
    for problem in problems:
        print(f"gap lmms-task: bad row skipped: {problem}", file=sys.stderr)
    items = items[: args.limit] if args.limit is not None else items
    if not items:
        raise LmmsTaskError(f"{args.data} has no usable rows")
    yaml_path = write_task(items, args.output_dir, args.name, data=str(args.data),
                           max_new_tokens=args.max_new_tokens, checker=args.checker)
    print(f"{len(items)} rows -> {yaml_path}\nrun: lmms-eval eval --model gap --model_args pretrained=MODEL "
          f"--include_path {Path(args.output_dir).resolve()} --tasks {args.name} --output_path OUT --log_samples")
    return 0
