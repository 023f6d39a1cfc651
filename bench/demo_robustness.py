"""The demo under every perturbation that changes rounding or sampling: torch's CPU kernel level, thread count, seed.

Each cell of the matrix is one `gap demo --seeds SEED` (or, with --control-only, its stages 1-3 and the control's
evaluation) in a fresh process whose environment holds ATEN_CPU_CAPABILITY=KERNEL (torch's CPU kernels: `default`,
`avx2`, `avx512`; a lower level reproduces on this machine the rounding of a machine that lacks the higher one) and
OMP_NUM_THREADS=THREADS; every stage the demo starts inherits both. The demo's own goal checks are the pass mark
(`gap_pipeline.demo.goal_checks`: the control answers >= 0.90 of the one-hop questions, GAP clean >= the control +
0.05 and >= every intervention + 0.10, spans on the two-hop questions only). Writes OUT/robustness.json (every
run's accuracies, checks and the spread) and OUT/robustness.md (the table the README shows), and prints the table.

    python bench/demo_robustness.py --kernels default avx2 avx512 --threads 1 --seeds 0
    python bench/demo_robustness.py --control-only --seeds 0 1 2 3 4
    python bench/demo_robustness.py --seeds 0 -- --train-rows 15000     # options after -- go to `gap demo`

A cell whose folder already holds a finished run with the same settings, kernel level and thread count is read,
not rerun (the table says "reused"); any other cell runs afresh. Runs one cell at a time: on a 2-core machine a
demo takes ~10-20 minutes, a --control-only run ~5-8.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gap_pipeline.datasets_io import write_json_file  # noqa: E402
from gap_pipeline.demo import CONTENT_CHECKS, machine  # noqa: E402
from gap_pipeline.demo_task import ONE_HOP, TWO_HOP  # noqa: E402

KERNELS = ("default", "avx2", "avx512")
RESERVED = ("--seeds", "--output-dir", "--full", "--control-only")  # set per cell by this script


def cell_name(kernel: str, threads: int, seed: int) -> str:
    return f"{kernel}-t{threads}-s{seed}"


def run_cell(out: Path, kernel: str, threads: int, seed: int, demo_args: list[str], control_only: bool) -> dict:
    """One demo run in a fresh process with the cell's kernel level and thread count; returns its table."""
    folder = out / cell_name(kernel, threads, seed)
    argv = ["--seeds", str(seed), "--output-dir", str(folder), *(["--control-only"] if control_only else []),
            *demo_args]
    table_file, stamp_file = folder / "demo_table.json", folder / "robustness_cell.json"
    stamp = {"argv": argv, "ATEN_CPU_CAPABILITY": kernel, "OMP_NUM_THREADS": threads}
    if table_file.is_file() and stamp_file.is_file() and json.loads(stamp_file.read_text(encoding="utf-8")) == stamp:
        return {**json.loads(table_file.read_text(encoding="utf-8")), "reused": True}
    stamp_file.unlink(missing_ok=True)
    env = {**os.environ, "ATEN_CPU_CAPABILITY": kernel, "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    folder.mkdir(parents=True, exist_ok=True)
    with open(out / f"{folder.name}.log", "w", encoding="utf-8") as log:
        done = subprocess.run([sys.executable, "-m", "gap_pipeline", "demo", *argv], cwd=REPO, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"error: the demo failed for {folder.name} (exit {done.returncode}); see {log.name}")
    table = json.loads(table_file.read_text(encoding="utf-8"))
    got = table["machine"]
    if got["cpu_capability"] != kernel.upper() or got["threads"] != threads:
        raise SystemExit(f"error: {folder.name} ran with kernels {got['cpu_capability']} and {got['threads']} "
                         f"thread(s): this CPU lacks --kernels {kernel}; leave it out")
    write_json_file(stamp_file, stamp)
    return {**table, "reused": False}


def summary_row(kernel: str, threads: int, seed: int, table: dict) -> dict:
    """The accuracies a reader compares across runs, and which of the demo's checks it met."""
    rows = {row["name"]: row for row in table["rows"]}
    control = rows["control (no latents)"]
    row = {"kernels": kernel, "threads": threads, "seed": seed, "reused": table["reused"],
           "minutes": round(table["seconds"] / 60, 1), "control_lm_loss": table.get("control_lm_loss"),
           "control": control["accuracy"], "control_one_hop": control["by_type"].get(ONE_HOP),
           "control_two_hop": control["by_type"].get(TWO_HOP)}
    if "GAP (LH+PCA+DA), pca" in rows:
        gap = rows["GAP (LH+PCA+DA), pca"]
        best = max(CONTENT_CHECKS, key=lambda iv: rows[f"GAP (LH+PCA+DA), {iv}"]["accuracy"])
        row.update({"gap": gap["accuracy"], "gap_two_hop": gap["by_type"].get(TWO_HOP),
                    "oracle": rows["GAP (LH+PCA+DA), oracle"]["accuracy"],
                    "interventions": {iv: rows[f"GAP (LH+PCA+DA), {iv}"]["accuracy"] for iv in CONTENT_CHECKS},
                    "best_intervention": best, "span_rate": gap["span_rate"], "span_by_type": gap["span_by_type"],
                    "two_hop_share": table["two_hop_share"]})
    row["checks"] = {check["name"]: check["met"] for check in table["checks"]}
    return row


def _f(value, spec=".3f") -> str:
    return "–" if value is None else format(value, spec)


def markdown(runs: list[dict]) -> str:
    """One line per run, then the spread (min-max) of each accuracy column."""
    full = any("gap" in r for r in runs)
    head = ["kernels", "threads", "seed", "control lm_loss", f"control, {ONE_HOP}", f"control, {TWO_HOP}", "control"]
    if full:
        head += ["GAP pca", "GAP oracle", "best intervention", "GAP spans (two-hop / one-hop)"]
    head += ["checks met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        cells = [r["kernels"], str(r["threads"]), str(r["seed"]), _f(r["control_lm_loss"], ".4f"),
                 _f(r["control_one_hop"]), _f(r["control_two_hop"]), _f(r["control"])]
        if full:
            cells += [_f(r.get("gap")), _f(r.get("oracle")),
                      f"{r['best_intervention']} {r['interventions'][r['best_intervention']]:.3f}" if "gap" in r else "–",
                      f"{r['span_by_type'].get(TWO_HOP, 0):.2f} / {r['span_by_type'].get(ONE_HOP, 0):.2f}"
                      if "gap" in r else "–"]
        met = sum(r["checks"].values())
        cells.append(f"{met} of {len(r['checks'])}" + ("" if met == len(r["checks"]) else " (" + ", ".join(
            name for name, ok in r["checks"].items() if not ok) + " not met)"))
        lines.append("| " + " | ".join(cells) + " |")
    spread = ["spread (min–max)", "", "", _range(runs, "control_lm_loss", ".4f"), _range(runs, "control_one_hop"),
              _range(runs, "control_two_hop"), _range(runs, "control")]
    if full:
        spread += [_range(runs, "gap"), _range(runs, "oracle"), "", ""]
    lines.append("| " + " | ".join(spread + [""]) + " |")
    return "\n".join(lines)


def _range(runs: list[dict], key: str, spec=".3f") -> str:
    values = [r[key] for r in runs if r.get(key) is not None]
    return f"{min(values):{spec}}–{max(values):{spec}}" if values else "–"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/demo-robustness")
    here = machine()["cpu_capability"].lower()
    parser.add_argument("--kernels", nargs="+", choices=KERNELS,
                        default=[k for k in KERNELS if k != "avx512" or here == "avx512"],
                        help="torch CPU kernel levels (default: default, avx2, and avx512 where the CPU has it)")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--control-only", action="store_true",
                        help="only stages 1-3 and the control's evaluation (`gap demo --control-only`)")
    args, demo_args = parser.parse_known_args(argv)
    demo_args = [a for a in demo_args if a != "--"]
    if reserved := [a for a in demo_args if a.split("=")[0] in RESERVED]:
        parser.error(f"{', '.join(reserved)}: set per run by this script; use --seeds / --output-dir / --control-only")
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started, runs = time.perf_counter(), []
    for seed in args.seeds:  # seed-major: the first seed's kernel levels come first
        for kernel in args.kernels:
            for threads in args.threads:
                table = run_cell(out, kernel, threads, seed, demo_args, args.control_only)
                runs.append(summary_row(kernel, threads, seed, table))
                print(f"{cell_name(kernel, threads, seed)}: " + ", ".join(
                    f"{name} {'met' if ok else 'NOT met'}" for name, ok in runs[-1]["checks"].items())
                    + (" (reused)" if runs[-1]["reused"] else f" ({runs[-1]['minutes']} min)"), flush=True)
    text = markdown(runs)
    all_met = all(all(r["checks"].values()) for r in runs)
    here = machine()  # this process's torch: the CPU's highest kernel level unless ATEN_CPU_CAPABILITY lowers it
    write_json_file(out / "robustness.json", {"machine": {"cpu": here["cpu"], "torch": here["torch"],
                                                          "highest_kernels": here["cpu_capability"]},
                                              "control_only": args.control_only, "demo_args": demo_args,
                                              "runs": runs, "all_met": all_met,
                                              "minutes": round((time.perf_counter() - started) / 60, 1)})
    (out / "robustness.md").write_text(text + "\n", encoding="utf-8")
    print("\n" + text + f"\n\nevery check met in every run: {'yes' if all_met else 'NO'}; {out / 'robustness.json'}")
    return 0 if all_met else 1


if __name__ == "__main__":
    sys.exit(main())
