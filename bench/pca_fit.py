"""PCA fit benchmark: the streaming fit (`gap fit-pca`) vs a NumPy `eigh` PCA on the same N x d vectors.

Each fit runs in a fresh process reading the same `.npy` file (NumPy memory-maps it, the streaming fit reads it in
blocks); we report wall time, CPU time and peak resident memory above the process's memory after its imports. Goals: the streaming fit is at least as fast,
and its memory does not grow with N (it holds O(d^2) statistics and one chunk), while the NumPy PCA holds the
N x d matrix in float64.

    python bench/pca_fit.py                       # d = 512, N = 50k and 200k
    python bench/pca_fit.py --dim 3584 --rows 100000 400000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO, current_rss_mb, peak_rss_mb, print_table, reset_peak_rss, spread, write_results


def baseline_mb() -> float:
    """Resident memory now, with the peak reset to it: the peak of what follows is measured above this (the peak
    of the imports before it, often higher, would otherwise hide it)."""
    reset_peak_rss()
    return current_rss_mb()


def cpu_seconds():
    return time.process_time()


def worker(method: str, path: str) -> dict:
    if method == "stream":
        import torch  # noqa: F401  (imported before the baseline, like numpy for the other side)

        from gap_pipeline.pca import fit_pca, iter_target_vectors

        base = baseline_mb()
        start, cpu_start = time.perf_counter(), cpu_seconds()
        fit = fit_pca(iter_target_vectors(path), chunk_size=4096)
        eigenvalues = fit.eigenvalues.numpy()
    else:
        base = baseline_mb()
        start, cpu_start = time.perf_counter(), cpu_seconds()
        x = np.load(path, mmap_mode="r").astype(np.float64)
        mean = x.mean(axis=0)
        x -= mean
        covariance = x.T @ x / x.shape[0]
        eigenvalues = np.linalg.eigh(covariance)[0][::-1]
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_mb": peak_rss_mb() - base, "top_eigenvalue": float(eigenvalues[0]),
            "trace": float(eigenvalues.sum())}


def run_worker(method, path, threads=None):
    env = dict(os.environ)
    if threads:  # the BLAS and OpenMP pools of both sides (read when numpy and torch load)
        env.update({name: str(threads) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    out = subprocess.run([sys.executable, __file__, "--worker", method, "--data", str(path)], capture_output=True,
                         text=True, cwd=REPO, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_data(path: Path, rows: int, dim: int, seed=0):
    """Vectors with a decaying spectrum and a large mean, written chunk by chunk into a .npy memmap."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    scales = (1.0 / np.arange(1, dim + 1) ** 0.7).astype(np.float32)
    mean = rng.standard_normal(dim).astype(np.float32) * 5
    data = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    for begin in range(0, rows, 8192):
        n = min(8192, rows - begin)
        data[begin:begin + n] = (rng.standard_normal((n, dim)).astype(np.float32) * scales) @ basis.T.astype(np.float32) + mean
    data.flush()
    del data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["stream", "numpy"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rows", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="BLAS/OpenMP threads of both sides (default: all)")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.data)))
        return None

    rows_out, raw = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.rows:
            path = Path(tmp) / f"vectors_{n}.npy"
            make_data(path, n, args.dim)
            results = {"stream": [], "numpy": []}
            for _ in range(args.repeats):  # interleaved
                for method in ("stream", "numpy"):
                    results[method].append(run_worker(method, path, args.threads))
            agree = abs(results["stream"][0]["trace"] - results["numpy"][0]["trace"]) / results["numpy"][0]["trace"]
            speed = statistics.median(r["seconds"] for r in results["numpy"]) / statistics.median(
                r["seconds"] for r in results["stream"])
            raw[n] = {m: {key: spread([r[key] for r in v]) for key in ("seconds", "cpu_seconds", "peak_mb")}
                      for m, v in results.items()}
            cpu_speed = raw[n]["numpy"]["cpu_seconds"]["median"] / raw[n]["stream"]["cpu_seconds"]["median"]
            rows_out.append({"metric": f"N={n}, d={args.dim}: numpy time / streaming time", "value": speed,
                             "goal": ">= 1", "met": speed >= 1,
                             "detail": f"{raw[n]['stream']['seconds']['median']:.2f} s vs {raw[n]['numpy']['seconds']['median']:.2f} s; "
                                       f"peak MB stream {raw[n]['stream']['peak_mb']['median']:.0f}, numpy "
                                       f"{raw[n]['numpy']['peak_mb']['median']:.0f}; CPU time ratio {cpu_speed:.2f}; "
                                       f"trace rel. diff {agree:.1e}"})
    if len(args.rows) >= 2:
        small, large = args.rows[0], args.rows[-1]
        growth = raw[large]["stream"]["peak_mb"]["median"] / max(raw[small]["stream"]["peak_mb"]["median"], 1.0)
        numpy_growth = raw[large]["numpy"]["peak_mb"]["median"] / max(raw[small]["numpy"]["peak_mb"]["median"], 1.0)
        rows_out.append({"metric": f"streaming peak memory N={large} / N={small}", "value": growth, "goal": "~1",
                         "met": growth < 1.25, "detail": f"numpy grows {numpy_growth:.2f}x for {large / small:.0f}x the rows"})
    print_table(f"PCA fit — streaming vs NumPy eigh, median of {args.repeats}", rows_out)
    path = write_results("pca_fit", {"args": vars(args), "rows": rows_out, "raw": raw})
    print(f"wrote {path}")
    return rows_out


if __name__ == "__main__":
    main()
