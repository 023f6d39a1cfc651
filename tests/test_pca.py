"""Streaming PCA fit (gap_pipeline/pca.py): paper App. C Eq. 5-7, App. D Table 7."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gap_pipeline.pca import (
    PcaBasis,
    PcaError,
    StreamingPCA,
    fit_pca,
    iter_target_vectors,
    load_pca,
    save_basis,
    save_pca,
    write_report,
)

REPO = Path(__file__).resolve().parents[1]


def synthetic(n=600, d=24, offset=1000.0, seed=0):
    """Vectors with a known spectrum: random orthogonal basis x chosen std devs + a large mean."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    stds = np.geomspace(8.0, 0.02, d)
    mean = offset + rng.standard_normal(d)
    x = (rng.standard_normal((n, d)) * stds) @ q.T + mean
    return x


def reference(x):
    """Two-pass mean and population covariance (Eq. 5), numpy eigh, descending."""
    mu = x.mean(axis=0)
    xc = x - mu
    cov = xc.T @ xc / x.shape[0]
    w, v = np.linalg.eigh(cov)
    return mu, w[::-1], v[:, ::-1].T


def test_matches_numpy_eigh_of_explicit_covariance():
    x = synthetic()
    fit = fit_pca([x], chunk_size=64)
    mu, w, v = reference(x)
    assert fit.n == x.shape[0] and fit.d == x.shape[1]
    np.testing.assert_allclose(fit.mean.numpy(), mu, rtol=0, atol=1e-10)
    np.testing.assert_allclose(fit.eigenvalues.numpy(), w, rtol=1e-9, atol=1e-12)
    comps = fit.components.numpy()
    # Same directions up to sign (the spectrum is non-degenerate).
    np.testing.assert_allclose(np.abs(np.sum(comps * v, axis=1)), 1.0, atol=1e-8)
    # Orthonormal rows, eigenvalues descending and non-negative.
    np.testing.assert_allclose(comps @ comps.T, np.eye(x.shape[1]), atol=1e-10)
    assert np.all(np.diff(fit.eigenvalues.numpy()) <= 0) and fit.eigenvalues.min() >= 0
    # Sign convention: the largest-magnitude entry of every component is positive.
    pivots = comps[np.arange(comps.shape[0]), np.abs(comps).argmax(axis=1)]
    assert np.all(pivots > 0)
    assert math.isclose(fit.total_variance, w.sum(), rel_tol=1e-10)


def test_relmse_equals_measured_reconstruction_error():
    x = synthetic(seed=1)
    fit = fit_pca([x], chunk_size=50)
    mu = fit.mean.numpy()
    for k in (1, 3, 7, 12, 23, 24):
        p = fit.components[:k].numpy()  # (k, d)
        recon = (x - mu) @ p.T @ p + mu  # Eq. 6
        measured = np.mean(np.sum((x - recon) ** 2, axis=1)) / np.mean(np.sum((x - mu) ** 2, axis=1))
        assert abs(measured - fit.relmse(k)) < 1e-6, (k, measured, fit.relmse(k))
    assert abs(fit.relmse(x.shape[1])) < 1e-12


def test_relmse_with_saved_fp32_basis(tmp_path):
    """The fp32 basis that is saved reconstructs with the reported RelMSE (fp32 tolerance)."""
    x = synthetic(seed=2, offset=50.0)
    fit = fit_pca([x], chunk_size=100)
    k = fit.choose_k(0.9)
    basis = load_pca(save_basis(tmp_path, fit.basis(k)))
    xt = torch.from_numpy(x).float()
    recon = basis.reconstruct(basis.project(xt)).double()
    mu = torch.from_numpy(x.mean(0))
    measured = float(((torch.from_numpy(x) - recon) ** 2).sum(1).mean() / ((torch.from_numpy(x) - mu) ** 2).sum(1).mean())
    assert abs(measured - float(basis.metadata["relmse"])) < 1e-4


def test_choose_k_is_smallest_reaching_target():
    x = synthetic(seed=3)
    fit = fit_pca([x])
    _, w, _ = reference(x)
    ratio = np.cumsum(w) / w.sum()
    for target in (0.5, 0.85, 0.9, 0.95, 0.99):
        k = fit.choose_k(target)
        assert ratio[k - 1] >= target - 1e-12
        assert k == 1 or ratio[k - 2] < target
        assert 1 - fit.relmse(k) >= target
        assert k == 1 or 1 - fit.relmse(k - 1) < target
    assert fit.choose_k(1.0) <= x.shape[1]
    assert fit.resolve_k() == (fit.choose_k(0.95), 0.95)
    assert fit.resolve_k(num_components=5) == (5, None)
    rows = fit.table()
    assert [r["variance"] for r in rows] == [0.85, 0.90, 0.95]
    assert [r["k"] for r in rows] == [fit.choose_k(t) for t in (0.85, 0.90, 0.95)]
    assert all(r["relmse"] <= 1 - r["variance"] + 1e-12 for r in rows)


@pytest.mark.parametrize("variance", [0.0, -0.1, 1.5, float("nan")])
def test_variance_target_outside_unit_interval_is_an_error(variance):
    fit = fit_pca([synthetic(n=50, d=6)])
    with pytest.raises(PcaError, match=r"\(0, 1\]"):
        fit.choose_k(variance)
    with pytest.raises(PcaError, match=r"\(0, 1\]"):
        fit.resolve_k(variance=variance)


def test_bad_fixed_k_is_an_error():
    fit = fit_pca([synthetic(n=50, d=6)])
    for k in (0, 7, -1):
        with pytest.raises(PcaError, match="number of components"):
            fit.resolve_k(num_components=k)
    with pytest.raises(PcaError, match="either"):
        fit.resolve_k(variance=0.9, num_components=3)


def test_results_independent_of_chunk_size():
    x = synthetic(n=203, d=10, seed=4)
    fits = [fit_pca([x], chunk_size=c) for c in (1, 7, x.shape[0])]
    # Also ragged input blocks fed straight to the accumulator without regrouping, in torch.
    acc = StreamingPCA()
    for a, b in ((0, 5), (5, 5), (5, 90), (90, 203)):
        acc.update(torch.from_numpy(x[a:b]))
    fits.append(acc.fit())
    base = fits[0]
    for f in fits[1:]:
        assert f.n == base.n
        np.testing.assert_allclose(f.mean.numpy(), base.mean.numpy(), rtol=0, atol=1e-9)
        np.testing.assert_allclose(f.eigenvalues.numpy(), base.eigenvalues.numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(f.components.numpy(), base.components.numpy(), atol=1e-7)


def test_large_mean_offset_keeps_small_variances():
    """|mu| = 1e6 with a 1e-4 variance direction: the naive E[vv^T] - mu mu^T loses it."""
    x = synthetic(n=400, d=8, offset=1e6, seed=5)
    _, w, _ = reference(x)
    fit = fit_pca([x], chunk_size=33)
    np.testing.assert_allclose(fit.eigenvalues.numpy(), w, rtol=1e-6)
    # The textbook one-pass formula for comparison: visibly wrong on the small eigenvalues.
    naive = (x.T @ x) / x.shape[0] - np.outer(x.mean(0), x.mean(0))
    wn = np.linalg.eigvalsh(naive)[::-1]
    assert np.max(np.abs(wn[-3:] - w[-3:]) / w[-3:]) > 1e-3


def test_low_precision_and_mixed_inputs():
    x = synthetic(n=120, d=8, offset=3.0, seed=6).astype(np.float32)
    ref = fit_pca([x.astype(np.float64)])
    mixed = fit_pca([x[:40], torch.from_numpy(x[40:80]), torch.from_numpy(x[80:]).to(torch.float64)], chunk_size=16)
    np.testing.assert_allclose(mixed.eigenvalues.numpy(), ref.eigenvalues.numpy(), rtol=1e-9)
    half = fit_pca([torch.from_numpy(x).to(torch.bfloat16), x.astype(np.float16)])
    assert half.n == 240 and half.d == 8


def test_width_mismatch_between_chunks_is_an_error():
    acc = StreamingPCA()
    acc.update(np.zeros((3, 4)))
    with pytest.raises(PcaError, match=r"d=5.*d=4"):
        acc.update(np.zeros((3, 5)))
    with pytest.raises(PcaError, match=r"d=5.*d=4"):
        fit_pca([np.ones((3, 4)), np.ones((2, 5))], chunk_size=2)
    with pytest.raises(PcaError, match="d=4"):
        StreamingPCA(dim=6).update(np.zeros((2, 4)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_an_error(bad):
    x = synthetic(n=20, d=4)
    x[13, 2] = bad
    acc = StreamingPCA()
    acc.update(x[:10])
    with pytest.raises(PcaError, match="non-finite.*vector index 13"):
        acc.update(x[10:])


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_vectors_is_an_error(n):
    acc = StreamingPCA()
    if n:
        acc.update(np.ones((n, 4)))
    with pytest.raises(PcaError, match="at least 2 vectors"):
        acc.fit()


def test_identical_vectors_are_an_error():
    with pytest.raises(PcaError, match="total variance 0"):
        fit_pca([np.ones((5, 3))])


def test_explicit_cuda_without_cuda_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(PcaError, match="CUDA is not available"):
        StreamingPCA(device="cuda")
    assert StreamingPCA(device="auto").device.type == "cpu"


def test_save_load_round_trip(tmp_path):
    x = synthetic(n=200, d=12, seed=8)
    fit = fit_pca([x])
    k = fit.choose_k(0.95)
    path = save_pca(
        tmp_path / "out",
        fit.mean,
        fit.components[:k],
        fit.eigenvalues[:k],
        {"N": fit.n, "target": 0.95, "relmse": fit.relmse(k)},
    )
    assert path == tmp_path / "out" / "pca.safetensors" and path.is_file()
    basis = load_pca(tmp_path / "out")
    assert isinstance(basis, PcaBasis)
    assert basis.d == 12 and basis.k == k
    for t in (basis.mean, basis.components, basis.eigenvalues):
        assert t.dtype == torch.float32
    assert torch.equal(basis.mean, fit.mean.float())
    assert torch.equal(basis.components, fit.components[:k].float())
    assert torch.equal(basis.eigenvalues, fit.eigenvalues[:k].float())
    assert basis.metadata["N"] == "200" and basis.metadata["d"] == "12" and basis.metadata["k"] == str(k)
    assert float(basis.metadata["target"]) == 0.95
    assert float(basis.metadata["relmse"]) == fit.relmse(k)
    torch.testing.assert_close(basis.components @ basis.components.T, torch.eye(k), atol=1e-5, rtol=0)
    # Loading the file path itself works too.
    assert load_pca(path).k == k


def test_save_rejects_bad_basis(tmp_path):
    with pytest.raises(PcaError, match="orthonormal"):
        save_pca(tmp_path, np.zeros(3), np.ones((2, 3)), np.ones(2))
    with pytest.raises(PcaError, match=r"\(k, d=3\)"):
        save_pca(tmp_path, np.zeros(3), np.eye(4)[:2], np.ones(2))
    with pytest.raises(PcaError, match="fit-pca"):
        load_pca(tmp_path / "nothing")


def _ragged_rows(d=6, k=4, seed=9):
    rng = np.random.default_rng(seed)
    spans = [2, 0, 1, 3, 0, 1, 2]
    rows = [rng.standard_normal((s * k, d)).astype(np.float32) * 3 + 7 for s in spans]
    return rows, spans, k


def test_ragged_dataset_with_zero_span_rows(tmp_path):
    import datasets

    rows, spans, k = _ragged_rows()
    d = rows[0].shape[1]
    expected = fit_pca([np.concatenate(rows).astype(np.float64)])
    # (n_spans*K, d) rows in a nested list column; empty rows stored as []
    flat = datasets.Dataset.from_dict(
        {"latent_targets": [r.tolist() if len(r) else [] for r in rows], "id": list(range(len(rows)))}
    )
    flat.save_to_disk(str(tmp_path / "flat"))
    # (n_spans, K, d) rows in an Array3D column with a dynamic first axis; one None row
    feats = datasets.Features({"targets": datasets.Array3D(shape=(None, k, d), dtype="float16")})
    cube = datasets.Dataset.from_dict(
        {"targets": [r.reshape(-1, k, d).astype(np.float16) for r in rows]}, features=feats
    )
    cube.save_to_disk(str(tmp_path / "cube"))
    fits = {}
    for name, col in (("flat", "latent_targets"), ("cube", "targets")):
        for rpb in (1, 3):
            fits[name, rpb] = fit_pca(
                iter_target_vectors(tmp_path / name, column=col, rows_per_batch=rpb), chunk_size=5
            )
    assert all(f.n == sum(spans) * k for f in fits.values())
    for key in (("flat", 1), ("flat", 3)):
        np.testing.assert_allclose(fits[key].eigenvalues.numpy(), expected.eigenvalues.numpy(), rtol=1e-9)
    f16 = fit_pca([np.concatenate(rows).astype(np.float16).astype(np.float64)])
    for key in (("cube", 1), ("cube", 3)):
        np.testing.assert_allclose(fits[key].eigenvalues.numpy(), f16.eigenvalues.numpy(), rtol=1e-9)


def test_dataset_errors_name_the_row(tmp_path):
    import datasets

    rows, _, _ = _ragged_rows()
    bad = [r.tolist() for r in rows]
    bad[3] = np.ones((4, 5)).tolist()
    datasets.Dataset.from_dict({"latent_targets": bad}).save_to_disk(str(tmp_path / "width"))
    with pytest.raises(PcaError, match=r"row 3 .* d=5, but row 0 has d=6"):
        fit_pca(iter_target_vectors(tmp_path / "width"))
    nan = [r.tolist() for r in rows]
    nan[5][1][0] = float("nan")
    datasets.Dataset.from_dict({"latent_targets": nan}).save_to_disk(str(tmp_path / "nan"))
    with pytest.raises(PcaError, match="row 5 .* non-finite"):
        fit_pca(iter_target_vectors(tmp_path / "nan"))
    with pytest.raises(PcaError, match="no column 'nope'.*latent_targets"):
        fit_pca(iter_target_vectors(tmp_path / "nan", column="nope"))
    datasets.Dataset.from_dict({"latent_targets": [[], []]}).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(PcaError, match="N=0"):
        fit_pca(iter_target_vectors(tmp_path / "empty"))


def _cli(*argv, cwd):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "gap_pipeline", "fit-pca", *argv]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_end_to_end_dataset(tmp_path):
    import datasets

    rows, spans, k = _ragged_rows(d=8)
    datasets.Dataset.from_dict({"latent_targets": [r.tolist() for r in rows]}).save_to_disk(str(tmp_path / "ds"))
    res = _cli("--targets", str(tmp_path / "ds"), "--output-dir", str(tmp_path / "out"), "--chunk-size", "3",
               "--device", "cpu", "--no-progress", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    basis = load_pca(tmp_path / "out")
    report = json.loads((tmp_path / "out" / "pca_report.json").read_text())
    n = sum(spans) * k
    assert report["N"] == n and report["d"] == 8 and report["k"] == basis.k
    assert report["target"] == 0.95 and basis.metadata["N"] == str(n)
    assert [r["variance"] for r in report["table"]] == [0.85, 0.90, 0.95]
    assert report["relmse"] <= 0.05 and len(report["eigenvalues"]) == 8
    assert "N=" in res.stdout and "RelMSE" in res.stdout and "pca.safetensors" in res.stdout


def test_cli_npy_fixed_k_and_errors(tmp_path):
    x = synthetic(n=300, d=10, seed=10).astype(np.float32)
    np.save(tmp_path / "t.npy", x)
    res = _cli("--targets", str(tmp_path / "t.npy"), "--output-dir", str(tmp_path / "o"), "--num-components", "4",
               "--no-progress", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    basis = load_pca(tmp_path / "o")
    assert basis.k == 4 and basis.metadata["target"] == "none"
    expected = fit_pca([x.astype(np.float64)])
    np.testing.assert_allclose(basis.eigenvalues.numpy(), expected.eigenvalues[:4].numpy(), rtol=1e-6)
    report = json.loads((tmp_path / "o" / "pca_report.json").read_text())
    assert report["selection"] == "num_components" and report["k"] == 4
    bad = _cli("--targets", str(tmp_path / "t.npy"), "--output-dir", str(tmp_path / "p"), "--variance", "1.5",
               "--no-progress", cwd=tmp_path)
    assert bad.returncode == 2 and "(0, 1]" in bad.stderr
    assert not (tmp_path / "p").exists()


def test_npy_targets_are_read_whole_in_any_layout(tmp_path):
    """A .npy is read in blocks (not memory-mapped); every vector arrives once, in order, in C or Fortran order
    and with leading axes flattened."""
    rng = np.random.default_rng(11)
    cases = {"c": rng.standard_normal((9000, 7)).astype(np.float32),
             "fortran": np.asfortranarray(rng.standard_normal((5000, 6))),
             "spans": rng.standard_normal((30, 300, 5)).astype(np.float16)}
    for name, x in cases.items():
        np.save(tmp_path / f"{name}.npy", x)
        blocks = list(iter_target_vectors(tmp_path / f"{name}.npy"))
        assert max(len(b) for b in blocks) == 4096
        np.testing.assert_array_equal(np.concatenate(blocks), x.reshape(-1, x.shape[-1]))


def test_write_report(tmp_path):
    fit = fit_pca([synthetic(n=50, d=5)])
    p = write_report(tmp_path, fit.report(3))
    assert p.name == "pca_report.json"
    assert json.loads(p.read_text())["k"] == 3
