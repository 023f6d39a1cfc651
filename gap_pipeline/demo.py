"""``gap demo`` (``make demo``): the whole GAP pipeline on CPU, on a task where latents can carry the evidence.

Every stage runs the project's own command, exactly as a GPU user would (logs under ``OUTPUT/logs``):

1. ``gap tiny-model``: a tiny random Qwen2.5-VL base model and tokenizer, built locally;
2. ``gap demo-data``, ``gap targets``, ``gap fit-pca``: the grid-counting task, its latent targets (frozen
   vision tower, K = 16, one latent per auxiliary-image cell) and the PCA basis;
3. ``train_sft.py``: the no-latent control: the same rows with every span stripped (each row is marked as
   solved, so difficulty-aware loading with tau = 0 strips it: the paper's dense-caption SFT baseline);
4. ``gap difficulty``: N sampled answers per training row from the control, and how many rows tau = 0 would
   keep as latent;
5. ``train_sft.py``: GAP itself, converted from the base with the PCA (``--launcher deepspeed`` runs it under
   the ``deepspeed`` launcher, 2 processes, ZeRO-2);
6. a fresh process loads the saved folder with ``trust_remote_code`` and generates with latents;
7. ``gap evaluate`` on the held-out rows for every intervention and the control, and ``gap norm-profile``:
   one table (accuracy, fraction of answers that opened a span, latent norms vs the vision-embedding and
   final-state norms), ``OUTPUT/demo_table.json`` and the norm plot.

``--full`` runs 3 seeds, adds the difficulty-aware GAP variant (LH+PCA+DA) and the full-head ablation (LH, no
PCA), and prints mean +- std.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HELP = "Run the whole pipeline on CPU on the demo task and print the intervention table (make demo)."

REPO = Path(__file__).resolve().parents[1]
INTERVENTIONS = ("pca", "suppress", "noise", "hidden", "hidden_ema")
K = 16
CHANCE = 0.2


class StageError(RuntimeError):
    """A stage's command failed; the message names the stage and its log."""


class Demo:
    """Runs the stages of one demo, each as a subprocess with its own log, and keeps their results."""

    def __init__(self, output_dir: Path, args: argparse.Namespace):
        self.out = output_dir
        self.args = args
        self.logs = output_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}

    def command(self, name: str, argv: list, cwd: Path = REPO) -> str:
        """Run `argv`, logging to logs/<name>.log; return its stdout; raise StageError on failure."""
        started = time.perf_counter()
        log = self.logs / f"{name}.log"
        with open(log, "w", encoding="utf-8") as f:
            f.write("$ " + " ".join(map(str, argv)) + "\n")
            f.flush()
            result = subprocess.run([str(a) for a in argv], cwd=cwd, stdout=subprocess.PIPE, stderr=f, text=True)
            f.write(result.stdout)
        self.timings[name] = time.perf_counter() - started
        if result.returncode != 0:
            tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
            raise StageError(f"stage {name!r} failed (exit {result.returncode}); see {log}:\n" + "\n".join(tail))
        return result.stdout

    def gap(self, name: str, *argv) -> str:
        return self.command(name, [sys.executable, "-m", "gap_pipeline", *argv])

    def train(self, name: str, model: Path, dataset: Path, output: Path, *extra, deepspeed=False) -> dict:
        script = [REPO / "train_sft.py", "--config", REPO / "configs" / "tiny_cpu.yaml", "--model_name_or_path", model,
                  "--dataset_path", dataset, "--output_dir", output, "--pca_path", self.out / "pca" / "pca.safetensors",
                  "--num_train_epochs", self.args.epochs, "--seed", self.args.seed,
                  "--learning_rate", self.args.learning_rate, "--latent_head_learning_rate", self.args.learning_rate,
                  "--latent_loss_reduction", "sum", "--latent_loss_weight", self.args.latent_loss_weight, *extra]
        if deepspeed:  # two processes share the global batch
            launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                        "--master_port", str(_free_port())]
            stdout = self.command(name, launcher + script + ["--deepspeed", REPO / "ds_configs" / "zero2.json",
                                                             "--per_device_train_batch_size",
                                                             max(1, self.args.batch_size // 2)])
        else:
            stdout = self.command(name, [sys.executable] + script + ["--per_device_train_batch_size",
                                                                     self.args.batch_size])
        return _last_train_log(self.logs / f"{name}.log", stdout)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _last_train_log(log: Path, stdout: str) -> dict:
    """The last logged training metrics (the Trainer prints dicts of strings)."""
    import ast

    last = {}
    for line in (log.read_text(encoding="utf-8", errors="replace") + stdout).splitlines():
        start = line.rfind("{'loss'")
        if start >= 0:
            try:
                last = ast.literal_eval(line[start:line.index("}", start) + 1])
            except (ValueError, SyntaxError):
                continue
    return last


def _summary(path: Path) -> dict:
    return {(row["intervention"], row["budget"]): row for row in json.loads((path / "summary.json").read_text())}


def mark_all_solved(train_dir: Path, output: Path):
    """The control's data: every row marked solved (accuracy 1), so tau = 0 strips every latent span."""
    import datasets

    dataset = datasets.load_from_disk(str(train_dir))
    dataset = dataset.map(lambda row: {"accuracy": 1.0}, desc="control data")
    dataset.save_to_disk(str(output))


def with_accuracy(train_dir: Path, difficulty_dataset: Path, output: Path):
    """The training rows (with targets) plus the `accuracy` column estimated by `gap difficulty`."""
    import datasets

    targets = datasets.load_from_disk(str(train_dir))
    estimated = datasets.load_from_disk(str(difficulty_dataset))
    by_id = dict(zip(estimated["id"], estimated["accuracy"]))
    dataset = targets.map(lambda row: {"accuracy": by_id.get(row["id"])}, desc="difficulty-aware data")
    dataset.save_to_disk(str(output))


def run_seed(demo: Demo, seed: int, full: bool, say) -> dict:
    """All stages for one seed; returns the measured numbers."""
    args = demo.args
    out = demo.out
    base, data, pca = out / "base", out / "data", out / "pca"
    results: dict = {"seed": seed}

    demo.gap("tiny-model", "tiny-model", "--output-dir", base, "--seed", seed)
    say("1 base", f"tiny Qwen2.5-VL (d=64, 2 layers, random frozen vision tower) -> {base}")

    demo.gap("demo-data", "demo-data", "--output-dir", data, "--train", args.train_rows, "--test", args.test_rows,
             "--seed", seed)
    demo.gap("targets", "targets", "--data", data / "train.jsonl", "--model", base, "--latent-tokens-per-span", K,
             "--output-dir", out / "train_targets", "--overwrite", "--no-progress")
    demo.gap("fit-pca", "fit-pca", "--targets", out / "train_targets", "--output-dir", pca,
                      "--variance", args.pca_variance, "--no-progress")
    pca_report = json.loads((pca / "pca_report.json").read_text())
    results["pca_k"] = pca_report["k"]
    say("2 data", f"{args.train_rows} train / {args.test_rows} held-out rows, K={K} targets, PCA k={pca_report['k']} "
                  f"(RelMSE {pca_report['relmse']:.4f})")

    mark_all_solved(out / "train_targets", out / "control_data")
    control = demo.train("train-control", base, out / "control_data", out / "control")
    say("3 control", f"trained without latents: lm_loss {control.get('lm_loss', '?')}")

    difficulty_rows = data / "train.jsonl"
    if not full and args.difficulty_rows < args.train_rows:  # a sample of the rows keeps `make demo` short
        difficulty_rows = data / "difficulty_sample.jsonl"
        lines = (data / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        difficulty_rows.write_text("".join(lines[: args.difficulty_rows]), encoding="utf-8")
    demo.gap("difficulty", "difficulty", "--dataset", difficulty_rows, "--model", out / "control",
             "--output-dir", out / "difficulty", "--num-samples", args.difficulty_samples, "--rows-per-batch", 16,
             "--max-new-tokens", 80, "--seed", seed, "--no-progress")
    difficulty = json.loads((out / "difficulty" / "summary.json").read_text())
    results["difficulty"] = difficulty
    say("4 difficulty", f"control's mean pass rate {difficulty['mean_accuracy']:.3f} ({args.difficulty_samples} "
                        f"samples per row); tau=0 keeps {difficulty['latent_rows']} of {difficulty['rows']} rows as latent")

    launcher = "deepspeed (2 processes, ZeRO-2)" if args.launcher == "deepspeed" else "python (1 process)"
    gap_log = demo.train("train-gap", base, out / "train_targets", out / "gap", deepspeed=args.launcher == "deepspeed")
    say("5 GAP", f"trained via {launcher}: lm_loss {gap_log.get('lm_loss', '?')}, latent_loss "
                 f"{gap_log.get('latent_loss', '?')}, latent norm ratio {gap_log.get('latent_norm_ratio', '?')}")

    reload_script = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        "from PIL import Image\n"
        f"path, data = {str(out / 'gap')!r}, {str(data)!r}\n"
        "model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()\n"
        "processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)\n"
        "row = json.loads(open(data + '/test.jsonl').readline())\n"
        "messages = [m for m in row['messages'] if m['role'] == 'user']\n"
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)\n"
        "inputs = processor(text=[prompt], images=[Image.open(data + '/' + row['images'][0])], return_tensors='pt')\n"
        "out = model.generate(**inputs, max_new_tokens=100, return_dict_in_generate=True)\n"
        "text = processor.decode(out.sequences[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)\n"
        "print(json.dumps({'module': type(model).__module__, 'spans': int(out.num_latent_spans[0]), 'text': text}))\n"
    )
    reloaded = json.loads(demo.command("reload", [sys.executable, "-c", reload_script], cwd=out).strip().splitlines()[-1])
    results["reload"] = reloaded
    say("6 reload", f"fresh process, trust_remote_code ({reloaded['module'].split('.')[0]}): "
                    f"{reloaded['spans']} span(s) opened: {reloaded['text'][:70]!r}")

    common = ["--data", data / "test.jsonl", "--batch-size", 50, "--max-new-tokens", 100, "--seed", seed, "--no-progress"]
    demo.gap("evaluate-gap", "evaluate", "--model", out / "gap", "--output-dir", out / "eval_gap",
             "--interventions", ",".join(INTERVENTIONS), *common)
    demo.gap("evaluate-control", "evaluate", "--model", out / "control", "--output-dir", out / "eval_control",
             "--interventions", "suppress", *common)
    demo.gap("norm-profile", "norm-profile", "--model", out / "gap", "--dataset", data / "test.jsonl",
             "--output-dir", out / "norms", "--max-samples", 16, "--batch-size", 8, "--no-progress")
    results["gap"] = {key[0]: row for key, row in _summary(out / "eval_gap").items()}
    results["control"] = next(iter(_summary(out / "eval_control").values()))
    results["norms"] = json.loads((out / "norms" / "norm_profile.json").read_text())
    say("7 evaluate", f"GAP pca {results['gap']['pca']['accuracy']:.3f} vs control "
                      f"{results['control']['accuracy']:.3f} on {args.test_rows} held-out rows")

    if full:
        with_accuracy(out / "train_targets", out / "difficulty" / "dataset", out / "da_data")
        demo.train("train-gap-da", base, out / "da_data", out / "gap_da")
        demo.gap("evaluate-gap-da", "evaluate", "--model", out / "gap_da", "--output-dir", out / "eval_gap_da",
                 "--interventions", "pca", *common)
        demo.train("train-gap-full-head", base, out / "train_targets", out / "gap_full",
                   "--latent_head_type", "full")
        demo.gap("evaluate-gap-full-head", "evaluate", "--model", out / "gap_full", "--output-dir",
                 out / "eval_gap_full", "--interventions", "pca", *common)
        results["gap_da"] = next(iter(_summary(out / "eval_gap_da").values()))
        results["gap_full_head"] = next(iter(_summary(out / "eval_gap_full").values()))
        say("8 ablations", f"LH+PCA+DA {results['gap_da']['accuracy']:.3f}, LH (full head) "
                           f"{results['gap_full_head']['accuracy']:.3f}")
    return results


def _norm_summary(results: dict) -> dict:
    """Vision-embedding, final-norm state and pre-norm last-layer norms, and the GAP latents' norm."""
    latents = results["norms"]["latents"]  # at the latent steps of forced spans (norm profile, pca)
    return {
        "vision_embedding": latents["query_vision_input"]["norm_mean"],
        "gap_latent": latents["latent"]["norm_mean"],
        "final_norm_state": latents["final_norm_state"]["norm_mean"],
        "pre_norm_last_layer": latents["pre_norm_state"]["norm_mean"],
    }


def format_table(runs: list[dict], args) -> tuple[str, dict]:
    """The printed table and its JSON, mean (+- std over seeds when there are several)."""

    def agg(values):
        values = [v for v in values if v is not None]
        if not values:
            return None, None
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)

    def cell(mean, std, spec=".3f"):
        if mean is None:
            return "–"
        return format(mean, spec) + (f" ± {std:{spec}}" if std is not None else "")

    rows, table = [], {"seeds": [r["seed"] for r in runs], "test_rows": args.test_rows, "chance": CHANCE, "rows": []}
    for intervention in INTERVENTIONS:
        acc = agg([r["gap"][intervention]["accuracy"] for r in runs])
        span = agg([r["gap"][intervention]["span_rate"] for r in runs])
        norm = agg([r["gap"][intervention]["mean_latent_norm"] for r in runs])
        rows.append((f"GAP, {intervention}", acc, span, norm))
    rows.append(("control (no latents)", agg([r["control"]["accuracy"] for r in runs]),
                 agg([r["control"]["span_rate"] for r in runs]), (None, None)))
    if "gap_da" in runs[0]:
        rows.append(("LH+PCA+DA, pca", agg([r["gap_da"]["accuracy"] for r in runs]),
                     agg([r["gap_da"]["span_rate"] for r in runs]), agg([r["gap_da"]["mean_latent_norm"] for r in runs])))
        rows.append(("LH (full head), pca", agg([r["gap_full_head"]["accuracy"] for r in runs]),
                     agg([r["gap_full_head"]["span_rate"] for r in runs]),
                     agg([r["gap_full_head"]["mean_latent_norm"] for r in runs])))
    lines = [f"GAP demo: held-out accuracy on {args.test_rows} rows (chance {CHANCE:.2f})"
             + (f", mean ± std over seeds {table['seeds']}" if len(runs) > 1 else f", seed {runs[0]['seed']}"),
             f"{'model, intervention':<24} {'accuracy':>15} {'opened a span':>15} {'mean latent norm':>18}"]
    for name, acc, span, norm in rows:
        lines.append(f"{name:<24} {cell(*acc):>15} {cell(*span, '.2f'):>15} {cell(*norm):>18}")
        table["rows"].append({"name": name, "accuracy": acc[0], "accuracy_std": acc[1], "span_rate": span[0],
                              "mean_latent_norm": norm[0]})
    norms = [_norm_summary(r) for r in runs]
    summary = {key: agg([n[key] for n in norms])[0] for key in norms[0]}
    table["norms"] = summary
    lines.append(
        "norms: vision embeddings {} | GAP latents {} | final-norm state h̄ {} | pre-norm last-layer state {}".format(
            *(cell(summary[key], None) for key in ("vision_embedding", "gap_latent", "final_norm_state",
                                                   "pre_norm_last_layer"))))
    return "\n".join(lines), table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="runs/demo", help="where everything goes (default runs/demo)")
    parser.add_argument("--full", action="store_true",
                        help="3 seeds, plus the LH+PCA+DA and full-head (LH) variants; prints mean ± std")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0; --full: 0 1 2)")
    parser.add_argument("--train-rows", type=int, default=3000)
    parser.add_argument("--test-rows", type=int, default=200)
    parser.add_argument("--epochs", type=float, default=6, help="training epochs of the control and of GAP (default 6)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per optimiser step (default 32)")
    parser.add_argument("--learning-rate", type=float, default=5e-3,
                        help="peak learning rate of the model and of the latent head (default 5e-3)")
    parser.add_argument("--latent-loss-weight", type=float, default=5.0,
                        help="lambda with the 'sum' reduction (default 5): the tiny tower's embeddings have norm ~0.2, "
                             "so the 7B default (mean, 1) leaves the latent term ~1000x below the LM loss, while "
                             "lambda 20-50 makes its gradient dominate and clipping starves the LM")
    parser.add_argument("--pca-variance", type=float, default=0.99)
    parser.add_argument("--difficulty-samples", type=int, default=4, help="sampled answers per row (default 4)")
    parser.add_argument("--difficulty-rows", type=int, default=200,
                        help="training rows whose difficulty is estimated (default 200; --full: all, for LH+PCA+DA)")
    parser.add_argument("--launcher", choices=("python", "deepspeed"), default="python",
                        help="how GAP is trained: one python process, or the deepspeed launcher (2 processes, ZeRO-2)")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    seeds = args.seeds or ([0, 1, 2] if args.full else [0])
    root = Path(args.output_dir).resolve()
    started = time.perf_counter()
    runs = []
    stages_per_seed = 8 if args.full else 7
    bar = tqdm(total=stages_per_seed * len(seeds), desc="gap demo", unit="stage")

    for seed in seeds:
        args.seed = seed
        demo = Demo(root / f"seed{seed}" if len(seeds) > 1 else root, args)

        def say(stage, message, seed=seed):
            bar.update(1)
            tqdm.write(f"[seed {seed}] {stage:<13} {message}")

        try:
            runs.append(run_seed(demo, seed, args.full, say))
        except StageError as error:
            bar.close()
            print(f"gap demo: {error}", file=sys.stderr)
            return 1
    bar.close()
    text, table = format_table(runs, args)
    table["seconds"] = time.perf_counter() - started
    (root / "demo_table.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    print("\n" + text)
    first = root / f"seed{seeds[0]}" if len(seeds) > 1 else root
    print(f"\nnorm profile plot: {first / 'norms' / 'norm_profile.png'}; table: {root / 'demo_table.json'}; "
          f"{table['seconds'] / 60:.1f} min")
    return 0
