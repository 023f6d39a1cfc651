"""Streaming PCA of latent targets (paper App. C, Eq. 5-7; App. D, Table 7): ``gap fit-pca``.

The PCA basis (mean mu, top-k components P_k, eigenvalues) defines the subspace in which the GAP latent head
predicts coefficients. It is fitted once, offline, from the latent targets that `gap targets` writes. The fit
streams: it keeps the count, the mean and the centred sum of outer products in float64 (memory O(d^2), about
100 MB at d = 3584) and never holds the N x d matrix.

Command line::

    gap fit-pca --targets data/train_targets --output-dir pca/ --variance 0.95

writes ``pca.safetensors`` (tensors ``mean`` (d), ``components`` (k x d, orthonormal rows), ``eigenvalues`` (k),
all fp32, plus string metadata) and ``pca_report.json``.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from . import GapError
from .datasets_io import atomic_files_into, check_apart_from_inputs, check_safetensors, claimed_output
from .inference import resolve_device
from .targets import TARGETS_COLUMN as DEFAULT_COLUMN
from .targets import TargetsError, check_vision_tower, load_targets_dataset, targets_metadata

PCA_FILENAME = "pca.safetensors"
REPORT_FILENAME = "pca_report.json"
DEFAULT_VARIANCE = 0.95
REPORT_TARGETS = (0.85, 0.90, 0.95)
FORMAT_NAME = "gap-pca"
FORMAT_VERSION = "1"

ArrayLike = np.ndarray | torch.Tensor


class PcaError(GapError):
    """Bad input to the PCA fit (shape, dtype, non-finite values, too few vectors, ...)."""


# ----------------------------------------------------------------------------------------- Chunk conversion and x^T x


def _gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x of an (n, d) float64 matrix.

    On the CPU through NumPy: its matmul computes the product of one buffer with its own transpose as a BLAS
    symmetric rank-k update (syrk, one triangle: half the multiply-adds of a general product), which torch does
    not expose. Elsewhere (a GPU) torch's general product.
    """
    if x.device.type != "cpu":
        return x.T @ x
    a = x.numpy()
    return torch.from_numpy(a.T @ a)


def _as_float64_matrix(chunk: Any, device: torch.device) -> torch.Tensor:
    """A chunk (numpy or torch, any real dtype, shape (n, d) or (d,)) as float64 (n, d)."""
    if isinstance(chunk, torch.Tensor):
        t = chunk.detach()
        if t.is_complex() or t.dtype == torch.bool:
            raise PcaError(f"chunk has dtype {t.dtype}; expected a real floating-point dtype")
        # Move first in the source dtype (half the bytes for fp32, a quarter for bf16/fp16),
        # then widen on the device.
        t = t.to(device=device).to(torch.float64)
    else:
        arr = np.asarray(chunk)
        if arr.dtype == object:
            raise PcaError(
                "chunk is a ragged/object array; pass one (n, d) matrix per chunk "
                "(use iter_dataset_vectors for ragged dataset columns)"
            )
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise PcaError(f"chunk has dtype {arr.dtype}; expected a real floating-point dtype")
        # One copy, widened on the way (a memory-mapped slice is read-only: torch.from_numpy would warn).
        t = torch.from_numpy(np.array(arr, dtype=np.float64, copy=True)).to(device=device)
    return _matrix(t)


def _matrix(x: ArrayLike) -> ArrayLike:
    """`x` (numpy or torch) of shape (n, d), or of shape (d,) as one row; any other shape is an error."""
    x = x.reshape(1, -1) if x.ndim == 1 else x
    if x.ndim != 2:
        raise PcaError(f"chunk must have shape (n, d) or (d,), got {tuple(x.shape)}")
    return x


# ---------------------------------------------------------------------------------------------------- The accumulator


class StreamingPCA:
    """Accumulates count, mean and centred sum of outer products (float64) over chunks.

    Numerics: each chunk is centred by *its own* mean before its outer products are formed,
    and chunk statistics are merged with the pairwise update of Chan, Golub & LeVeque
    (1979)::

        n = n_a + n_b,  delta = mean_b - mean_a
        mean = mean_a + delta * n_b / n
        M2   = M2_a + M2_b + delta delta^T * n_a n_b / n

    The textbook one-pass formula Sigma = (1/N) sum v v^T - mu mu^T subtracts two numbers
    of size |mu|^2 to get one of size lambda; for vision embeddings (|mu| large compared
    with the spread along many directions) it loses about log10(|mu|^2 / lambda) of the 16
    float64 digits and can even give negative variances. In the merged form every term is
    already of the size of the spread (delta is the difference of two means, small once the
    running mean has settled), so nothing cancels; the result equals the two-pass
    covariance of Eq. 5 up to float64 rounding, and does not depend on the chunking.
    """

    def __init__(self, dim: int | None = None, device: str | torch.device | None = "cpu"):
        try:
            self.device = resolve_device(device)
        except GapError as exc:
            raise PcaError(str(exc)) from None
        self.dim: int | None = int(dim) if dim is not None else None
        if self.dim is not None and self.dim < 1:
            raise PcaError(f"dim must be >= 1, got {dim}")
        self.count = 0
        self.num_chunks = 0
        self._mean: torch.Tensor | None = None  # mu, (d,)
        self._m2: torch.Tensor | None = None  # M2 = sum (v - mu)(v - mu)^T, (d, d)

    def update(self, chunk: ArrayLike) -> StreamingPCA:
        """Adds a chunk of vectors, shape (n, d) (or (d,) for one vector); returns self."""
        x = _as_float64_matrix(chunk, self.device)
        n_b, d = x.shape
        if self.dim is None:
            if d < 1:
                raise PcaError("vectors must have at least one dimension")
            self.dim = d
        elif d != self.dim:
            raise PcaError(
                f"chunk {self.num_chunks} has vectors of width d={d}, but earlier chunks "
                f"(or the requested dim) have d={self.dim}; every latent target must have the "
                "same width (the LLM hidden size)"
            )
        if n_b == 0:
            return self
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            bad_rows = (~finite).any(dim=1).nonzero().flatten()
            first = int(bad_rows[0])
            raise PcaError(
                f"chunk {self.num_chunks} contains non-finite values (NaN/Inf) in "
                f"{bad_rows.numel()} of its {n_b} vectors; the first is vector index "
                f"{self.count + first} of the stream. Regenerate those latent targets "
                "(they usually come from an overflow in half precision)"
            )
        mean_b = x.mean(dim=0)
        m2_b = _gram(x - mean_b)
        if self.count == 0:
            self._mean, self._m2 = mean_b, m2_b
        else:  # the pairwise update above
            n_a, n = self.count, self.count + n_b
            delta = mean_b - self._mean
            self._mean += delta * (n_b / n)
            self._m2 += m2_b
            self._m2 += torch.outer(delta, delta) * (n_a * n_b / n)
        self.count += n_b
        self.num_chunks += 1
        return self

    def fit(self) -> PcaFit:
        """Eigen-decomposition of the covariance (Eq. 5) with ``torch.linalg.eigh``."""
        if self.count < 2:
            raise PcaError(
                f"need at least 2 vectors to fit a PCA, got N={self.count}; check that the "
                "targets column is the right one and that rows with latent spans exist"
            )
        cov = self._m2 / self.count  # population covariance (1/N) sum (v - mu)(v - mu)^T (Eq. 5), symmetrised
        cov = 0.5 * (cov + cov.T)
        evals, evecs = torch.linalg.eigh(cov)  # ascending; columns are eigenvectors
        evals = evals.flip(0)
        comps = evecs.flip(1).T.contiguous()  # rows = components, descending eigenvalue
        # The covariance is PSD; eigh can still return values like -1e-17 for directions the
        # data do not span. Clamp them so that variance ratios and RelMSE stay in [0, 1].
        evals = evals.clamp_min(0.0)
        comps = _canonical_signs(comps)
        total = float(evals.sum())
        if not total > 0.0:
            raise PcaError(
                f"the {self.count} vectors are all identical (total variance 0); a PCA basis "
                "cannot be fitted from them"
            )
        return PcaFit(
            mean=self._mean.detach().to("cpu", torch.float64).clone(),
            eigenvalues=evals.to("cpu"),
            components=comps.to("cpu"),
            n=self.count,
        )


def _canonical_signs(components: torch.Tensor) -> torch.Tensor:
    """Flips each row so that its largest-magnitude entry is positive (first one on ties)."""
    idx = components.abs().argmax(dim=1)
    pivots = components.gather(1, idx.unsqueeze(1)).squeeze(1)
    signs = torch.where(pivots < 0, -1.0, 1.0).to(components.dtype)
    return components * signs.unsqueeze(1)


# ------------------------------------------------------------------------------------- Fit result, choosing k, RelMSE


def _check_variance(variance: float) -> float:
    v = float(variance)
    if not (0.0 < v <= 1.0) or math.isnan(v):
        raise PcaError(
            f"explained-variance target must be in (0, 1], got {variance!r} "
            "(e.g. 0.95 keeps 95 % of the variance)"
        )
    return v


@dataclass
class PcaFit:
    """Full-spectrum PCA result (all float64, CPU).

    ``components`` holds all d eigenvectors as *rows*, sorted by descending eigenvalue,
    each with its largest-magnitude entry positive.
    """

    mean: torch.Tensor
    eigenvalues: torch.Tensor
    components: torch.Tensor
    n: int

    @property
    def d(self) -> int:
        return int(self.mean.numel())

    @property
    def total_variance(self) -> float:
        return float(self.eigenvalues.sum())

    def cumulative_ratio(self) -> torch.Tensor:
        """r_k = sum_{j<=k} lambda_j / sum_j lambda_j for k = 1..d (r_d == 1 exactly)."""
        cum = torch.cumsum(self.eigenvalues, 0)
        return cum / cum[-1]

    def relmse(self, k: int) -> float:
        """RelMSE(k) = 1 - sum_{j<=k} lambda_j / sum_j lambda_j (Eq. 7)."""
        k = self._check_k(k)
        return float(1.0 - self.cumulative_ratio()[k - 1])

    def choose_k(self, variance: float = DEFAULT_VARIANCE) -> int:
        """The smallest k whose explained-variance ratio is >= ``variance`` (no tolerance)."""
        # r_k never decreases and r_d is exactly 1.0, so a target in (0, 1] is always reached.
        return int(torch.searchsorted(self.cumulative_ratio(), _check_variance(variance))) + 1

    def _check_k(self, k: int) -> int:
        if isinstance(k, bool) or int(k) != k:
            raise PcaError(f"number of components must be an integer, got {k!r}")
        k = int(k)
        if not 1 <= k <= self.d:
            raise PcaError(f"number of components must be in [1, d={self.d}], got {k}")
        return k

    def table(self, targets: Sequence[float] = REPORT_TARGETS) -> list[dict[str, float]]:
        """Rows shaped like the paper's Table 7: variance target, k, k/d, RelMSE(k)."""
        ks = [self.choose_k(t) for t in targets]
        return [{"variance": float(t), "k": k, "ratio": k / self.d, "relmse": self.relmse(k)}
                for t, k in zip(targets, ks)]

    def resolve_k(
        self, variance: float | None = None, num_components: int | None = None
    ) -> tuple[int, float | None]:
        """(k, target): a fixed ``num_components`` wins, else the variance target (0.95)."""
        if variance is not None and num_components is not None:
            raise PcaError("give either a variance target or a number of components, not both")
        if num_components is not None:
            return self._check_k(num_components), None
        target = _check_variance(DEFAULT_VARIANCE if variance is None else variance)
        return self.choose_k(target), target

    def basis(self, k: int, metadata: Mapping[str, Any] | None = None) -> PcaBasis:
        """The fp32 top-k basis that ``save_pca`` writes."""
        k = self._check_k(k)
        meta = {"N": self.n, "d": self.d, "k": k, "relmse": self.relmse(k), **(metadata or {})}
        return PcaBasis(
            mean=self.mean.to(torch.float32).contiguous(),
            components=self.components[:k].to(torch.float32).contiguous(),
            eigenvalues=self.eigenvalues[:k].to(torch.float32).contiguous(),
            metadata={str(a): _meta_str(b) for a, b in meta.items()},
        )

    def report(
        self,
        k: int,
        target: float | None = None,
        targets: Sequence[float] = REPORT_TARGETS,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A JSON-ready report: N, d, chosen k, RelMSE, total variance, table, spectrum."""
        k = self._check_k(k)
        tgts = list(targets)
        if target is not None and all(abs(target - t) > 1e-12 for t in tgts):
            tgts = sorted(tgts + [target])
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "N": self.n,
            "d": self.d,
            "k": k,
            "target": target,
            "selection": "variance" if target is not None else "num_components",
            "relmse": self.relmse(k),
            "explained_variance": 1.0 - self.relmse(k),
            "component_ratio": k / self.d,
            "total_variance": self.total_variance,
            "rank_limited": k > self.n - 1,
            "table": self.table(tgts),
            "eigenvalues": [float(x) for x in self.eigenvalues],
            **(extra or {}),
        }


def _meta_str(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return repr(value)
    return str(value)


# -------------------------------------------------------------------------------------------------------- Saved basis


@dataclass
class PcaBasis:
    """A saved PCA basis: ``mean`` (d), ``components`` (k x d), ``eigenvalues`` (k), fp32."""

    mean: torch.Tensor
    components: torch.Tensor
    eigenvalues: torch.Tensor
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def d(self) -> int:
        return int(self.mean.numel())

    @property
    def k(self) -> int:
        return int(self.components.shape[0])

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """c = P_k (v - mu) (Eq. 6), over the last axis."""
        v = v.to(self.mean.dtype)
        return (v - self.mean) @ self.components.T

    def reconstruct(self, c: torch.Tensor) -> torch.Tensor:
        """v_hat = P_k^T c + mu (Eq. 6), over the last axis."""
        return c.to(self.components.dtype) @ self.components + self.mean


def _pca_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p if p.suffix == ".safetensors" else p / PCA_FILENAME


def _validate_basis(mean: torch.Tensor, components: torch.Tensor, eigenvalues: torch.Tensor, where: str,
                    fix: str = "") -> None:
    """One `PcaError` starting with `where` (and ending with `fix`) unless the tensors make a PCA basis: shapes
    (d,), (k, d), (k,), finite values, and orthonormal component rows (to 1e-4)."""
    if mean.dim() != 1:
        raise PcaError(f"{where}: mean must be 1-D (d,), got shape {tuple(mean.shape)}{fix}")
    d = mean.numel()
    if components.dim() != 2 or components.shape[1] != d:
        raise PcaError(
            f"{where}: components must have shape (k, d={d}), got {tuple(components.shape)}{fix}"
        )
    k = components.shape[0]
    if k < 1:
        raise PcaError(f"{where}: components has no rows (k = 0){fix}")
    if eigenvalues.shape != (k,):
        raise PcaError(
            f"{where}: eigenvalues must have shape (k={k},), got {tuple(eigenvalues.shape)}{fix}"
        )
    for name, t in (("mean", mean), ("components", components), ("eigenvalues", eigenvalues)):
        if not bool(torch.isfinite(t).all()):
            raise PcaError(f"{where}: {name} contains non-finite values{fix}")
    gram = components.double() @ components.double().T
    err = float((gram - torch.eye(k, dtype=gram.dtype)).abs().max())
    if err > 1e-4:
        raise PcaError(f"{where}: components rows are not orthonormal (max |P P^T - I| = {err:.3g}){fix}")


def save_pca(
    path: str | os.PathLike,
    mean: ArrayLike,
    components: ArrayLike,
    eigenvalues: ArrayLike,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Writes ``pca.safetensors`` (fp32 ``mean``, ``components``, ``eigenvalues``).

    ``path`` is a directory (the file is ``path/pca.safetensors``) or a ``.safetensors``
    file. Metadata values are stored as strings; ``d`` and ``k`` come from the tensors.
    The rows of ``components`` must be orthonormal (checked to 1e-4). Returns the file path.
    """
    from safetensors.torch import save_file

    def f32(x: ArrayLike) -> torch.Tensor:
        t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x))
        return t.to(torch.float32).contiguous()

    mean_t, comp_t, eig_t = f32(mean), f32(components), f32(eigenvalues)
    _validate_basis(mean_t, comp_t, eig_t, "save_pca")
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
            **{str(key): _meta_str(value) for key, value in (metadata or {}).items()},
            "d": str(mean_t.numel()), "k": str(comp_t.shape[0])}
    out = _pca_file(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"mean": mean_t, "components": comp_t, "eigenvalues": eig_t}, str(out), metadata=meta)
    return out


def save_basis(path: str | os.PathLike, basis: PcaBasis) -> Path:
    """``save_pca`` for a ``PcaBasis``."""
    return save_pca(path, basis.mean, basis.components, basis.eigenvalues, basis.metadata)


def load_pca(path: str | os.PathLike, device: str | torch.device = "cpu") -> PcaBasis:
    """Reads a ``pca.safetensors`` (or a directory holding one) into a ``PcaBasis``."""
    from safetensors import safe_open

    f = _pca_file(path)
    refit = f"run `gap fit-pca --targets ... --output-dir {f.parent}`"
    if not f.is_file():
        raise PcaError(f"no PCA basis at {f}; {refit} first")
    check_safetensors(f, PcaError, f"{refit} again")
    with safe_open(str(f), framework="pt", device=str(device)) as handle:
        metadata = dict(handle.metadata() or {})
        keys = set(handle.keys())
        missing = [k for k in ("mean", "components", "eigenvalues") if k not in keys]
        if missing:
            raise PcaError(f"{f} is not a PCA basis: missing tensors {missing} (has {sorted(keys)})")
        tensors = {name: handle.get_tensor(name).to(torch.float32) for name in ("mean", "components", "eigenvalues")}
    _validate_basis(tensors["mean"], tensors["components"], tensors["eigenvalues"], str(f), f"; {refit} again")
    return PcaBasis(metadata=metadata, **tensors)


def write_report(path: str | os.PathLike, report: Mapping[str, Any]) -> Path:
    """Writes the report as indented JSON (a directory gets ``pca_report.json``)."""
    from .datasets_io import write_json_file

    return write_json_file(path, report, REPORT_FILENAME)


def _fmt_target(v: float) -> str:
    return f"{v:.2f}" if abs(round(v, 2) - v) < 1e-12 else f"{v:.4g}"


def format_summary(report: Mapping[str, Any]) -> str:
    """A one-screen text summary of a report (N, d, total variance, Table-7-shaped rows)."""
    lines = [
        f"PCA fit over N={report['N']:,} vectors of width d={report['d']}",
        f"  total variance: {report['total_variance']:.6g}",
        "  variance      k   k/d      RelMSE",
    ]
    for row in report["table"]:
        lines.append(
            f"  {_fmt_target(row['variance']):>8}  {row['k']:>5d}  {100 * row['ratio']:5.1f}%  {row['relmse']:.4f}"
        )
    how = (
        f"variance target {_fmt_target(report['target'])}"
        if report.get("target") is not None
        else "fixed --num-components"
    )
    lines.append(
        f"  chosen: k={report['k']} ({how}), RelMSE={report['relmse']:.4f}, "
        f"explained={report['explained_variance']:.4f}"
    )
    if report.get("rank_limited"):
        lines.append(
            f"  warning: k={report['k']} > N-1={report['N'] - 1}: the data span at most N-1 "
            "directions, so the trailing components carry no variance; collect more targets"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ Input sources


def rechunk(matrices: Iterable[np.ndarray], chunk_size: int) -> Iterator[np.ndarray]:
    """Regroups a stream of (n_i, d) matrices into chunks of exactly ``chunk_size`` rows
    (the last may be shorter); memory is one chunk plus one input matrix."""
    if chunk_size < 1:
        raise PcaError(f"chunk size must be >= 1, got {chunk_size}")
    buf: list[np.ndarray] = []
    held = 0
    width: int | None = None
    for i, m in enumerate(matrices):
        if width is None:
            width = m.shape[1]
        elif m.shape[1] != width:
            raise PcaError(
                f"input block {i} has vectors of width d={m.shape[1]}, but earlier blocks have "
                f"d={width}; every latent target must have the same width (the LLM hidden size)"
            )
        while len(m):
            buf.append(m[: chunk_size - held])
            held += len(buf[-1])
            m = m[len(buf[-1]) :]
            if held == chunk_size:
                yield buf[0] if len(buf) == 1 else np.concatenate(buf, axis=0)
                buf, held = [], 0
    if held:
        yield buf[0] if len(buf) == 1 else np.concatenate(buf, axis=0)


def _progress(total: int | None, unit: str, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=not enabled, dynamic_ncols=True)


def iter_npy_vectors(path: str | os.PathLike, progress: bool = False) -> Iterator[np.ndarray]:
    """A ``.npy`` of shape (N, d) (leading axes flattened), in blocks of 4096 vectors.

    The blocks are read from the file rather than sliced from a memory map: the pages of a map stay in the process's
    resident memory after the fit has passed them (until the kernel reclaims them), so a mapped file shows up as
    O(N) memory, while read blocks keep it at one block. A Fortran-order file is sliced from its map.
    """
    arr = np.load(str(path), mmap_mode="r")  # the header: shape, dtype and where the data begin
    if arr.ndim < 2:
        raise PcaError(f"{path}: expected an array of shape (N, d), got {arr.shape}")
    d = arr.shape[-1]
    n = math.prod(arr.shape[:-1])
    step = 4096
    with _progress(n, "vec", progress, "fit-pca") as bar, open(path, "rb") as f:
        f.seek(arr.offset)
        for start in range(0, n, step):
            rows = min(step, n - start)
            if arr.flags.c_contiguous:
                block = np.fromfile(f, dtype=arr.dtype, count=rows * d).reshape(rows, d)
            else:
                block = arr.reshape(-1, d)[start : start + rows]
            yield block
            bar.update(rows)


def _row_matrix(value: Any, row_index: int, column: str) -> np.ndarray | None:
    """One dataset row -> (n, d), or None for a row without latent spans."""
    if value is None:
        return None
    arr = np.asarray(value) if not isinstance(value, np.ndarray) else value
    if arr.size == 0:
        return None
    if arr.dtype == object:
        # Nested lists that the numpy formatter could not stack (e.g. a list of (K, d)
        # span arrays): stack them here; a genuinely ragged row is an error below.
        try:
            arr = np.stack([_row_matrix(x, row_index, column) for x in arr])
        except (ValueError, TypeError) as exc:
            raise PcaError(
                f"row {row_index} of column '{column}' is ragged inside the row ({exc}); "
                "each row must be (n_spans*K, d) or (n_spans, K, d)"
            ) from None
    if arr.ndim < 2:
        raise PcaError(
            f"row {row_index} of column '{column}' has shape {arr.shape}; expected "
            "(n_spans*K, d) or (n_spans, K, d)"
        )
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise PcaError(f"row {row_index} of column '{column}' has dtype {arr.dtype}; expected floats")
    return arr.reshape(-1, arr.shape[-1])


def iter_dataset_vectors(
    dataset,
    column: str = DEFAULT_COLUMN,
    rows_per_batch: int = 16,
    progress: bool = False,
) -> Iterator[np.ndarray]:
    """Yields one (n, d) matrix per non-empty row of ``column`` (leading axes flattened).

    Reads ``dataset.with_format("numpy").iter(batch_size=rows_per_batch)`` over the one
    column, so the Arrow data stay memory-mapped. Rows that are None or empty (no latent
    spans) are skipped. Widths and finiteness are checked per row so that errors name it.
    """
    if column not in dataset.column_names:
        raise PcaError(
            f"the dataset has no column {column!r}; its columns are {dataset.column_names} "
            "(pick one with --column)"
        )
    if rows_per_batch < 1:
        raise PcaError(f"rows per batch must be >= 1, got {rows_per_batch}")
    view = dataset.select_columns([column]).with_format("numpy")
    width: int | None = None
    width_row = -1
    row = 0
    with _progress(len(dataset), "row", progress, "fit-pca") as bar:
        for batch in view.iter(batch_size=rows_per_batch):
            values = batch[column]
            for value in values:
                mat = _row_matrix(value, row, column)
                if mat is not None:
                    if width is None:
                        width, width_row = mat.shape[1], row
                    elif mat.shape[1] != width:
                        raise PcaError(
                            f"row {row} of column '{column}' has vectors of width d={mat.shape[1]}, "
                            f"but row {width_row} has d={width}; every latent target must have "
                            "the LLM hidden size as width (regenerate the targets with one model)"
                        )
                    if np.issubdtype(mat.dtype, np.floating) and not np.isfinite(mat).all():
                        raise PcaError(
                            f"row {row} of column '{column}' contains non-finite values (NaN/Inf); "
                            "regenerate its latent targets (fp16 overflow is the usual cause)"
                        )
                    yield mat
                row += 1
            bar.update(len(values))


def iter_target_vectors(
    path: str | os.PathLike,
    column: str = DEFAULT_COLUMN,
    split: str | None = None,
    rows_per_batch: int = 16,
    progress: bool = False,
) -> Iterator[np.ndarray]:
    """Vectors from a ``.npy`` file or a ``save_to_disk`` dataset directory."""
    p = Path(path)
    if not p.exists():
        raise PcaError(f"targets not found: {p}")
    if p.is_file():
        if p.suffix != ".npy":
            raise PcaError(f"{p}: expected a dataset directory or a .npy file")
        return iter_npy_vectors(p, progress=progress)
    ds = load_targets_dataset(p, split=split)
    return iter_dataset_vectors(ds, column=column, rows_per_batch=rows_per_batch, progress=progress)


def targets_encoder(path: str | os.PathLike, split: str | None = None) -> dict[str, str]:
    """``{"encoder", "encoder_sha256"}``: the vision tower that made the `gap targets` folder `path`, recorded in the
    basis fitted on it ({} for a ``.npy`` file or targets that record none)."""
    if not Path(path).is_dir():
        return {}
    try:
        metadata = targets_metadata(load_targets_dataset(path, split=split))
    except TargetsError:
        return {}
    return {key: str(metadata[key]) for key in ("encoder", "encoder_sha256") if metadata.get(key) is not None}


def check_pca_encoder(basis: PcaBasis, model_path: str | os.PathLike, where: str) -> None:
    """Refuse a basis fitted on latent targets of another vision tower than the checkpoint folder `model_path`'s
    (`targets.check_vision_tower`); one that records no tower gets a warning."""
    check_vision_tower(
        basis.metadata.get("encoder_sha256"), basis.metadata.get("encoder"), model_path,
        what="the PCA basis was fitted on latent targets", where=where,
        fix=f"fit it on targets of this model's tower (`gap targets --model {model_path}`, then `gap fit-pca`)",
        unrecorded="it records no vision tower (fitted from a .npy file, or by an older `gap fit-pca`)")


def _to_numpy_matrix(v: ArrayLike) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        v = (v.float() if v.dtype == torch.bfloat16 else v).numpy()  # numpy has no bfloat16; float32 holds it exactly
    return _matrix(np.asarray(v))


def fit_pca(
    vectors: Iterable[ArrayLike],
    chunk_size: int | None = 4096,
    device: str | torch.device | None = "cpu",
    dim: int | None = None,
) -> PcaFit:
    """Fits a PCA from an iterable of (n_i, d) matrices (regrouped to ``chunk_size`` rows
    when it is not None)."""
    acc = StreamingPCA(dim=dim, device=device)
    if chunk_size is not None:
        vectors = rechunk((_to_numpy_matrix(v) for v in vectors), chunk_size)
    for chunk in vectors:
        acc.update(chunk)
    return acc.fit()


# ------------------------------------------------------------------------------------------------------- Command line

HELP = "Fit the PCA basis (mean, top-k components) of the latent targets, streaming."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--targets",
        required=True,
        help="a dataset directory written by Dataset.save_to_disk, or a .npy file of shape (N, d)",
    )
    parser.add_argument(
        "--column",
        default=DEFAULT_COLUMN,
        help=f"dataset column holding the latent targets (default: {DEFAULT_COLUMN})",
    )
    parser.add_argument("--split", default=None, help="split to use when --targets is a DatasetDict")
    parser.add_argument("--output-dir", required=True, help="where pca.safetensors and pca_report.json go")
    sel = parser.add_mutually_exclusive_group()
    sel.add_argument(
        "--variance",
        type=float,
        default=None,
        help=f"explained-variance target in (0, 1]; k is the smallest reaching it (default {DEFAULT_VARIANCE})",
    )
    sel.add_argument("--num-components", type=int, default=None, help="a fixed k instead of --variance")
    parser.add_argument("--chunk-size", type=int, default=4096, help="vectors per accumulator update (default 4096)")
    parser.add_argument("--rows-per-batch", type=int, default=16, help="dataset rows read per batch (default 16)")
    parser.add_argument(
        "--device",
        default="auto",
        help="where to accumulate in float64: auto (CUDA if available), cpu, cuda, cuda:N (default auto)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true", help="replace a PCA basis already in --output-dir")


def run(args: argparse.Namespace) -> int:
    check_apart_from_inputs(args.output_dir, {"--targets": args.targets}, PcaError)
    earlier = [name for name in (PCA_FILENAME, REPORT_FILENAME) if (Path(args.output_dir) / name).exists()]
    if earlier and not args.overwrite:
        raise PcaError(f"--output-dir {args.output_dir} already holds {' and '.join(earlier)} of an earlier fit; "
                       "pass --overwrite to replace them, or choose another --output-dir")
    if args.variance is not None:
        _check_variance(args.variance)
    if args.chunk_size < 1:
        raise PcaError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    device = resolve_device(args.device)
    out_dir = Path(args.output_dir)
    with claimed_output(out_dir, PcaError, "gap fit-pca"):
        vectors = iter_target_vectors(
            args.targets,
            column=args.column,
            split=args.split,
            rows_per_batch=args.rows_per_batch,
            progress=not args.no_progress,
        )
        fit = fit_pca(vectors, chunk_size=args.chunk_size, device=device)
        k, target = fit.resolve_k(variance=args.variance, num_components=args.num_components)
        source = {"source": str(args.targets), "column": args.column if Path(args.targets).is_dir() else None}
        report = fit.report(k, target=target, extra=source)
        basis = fit.basis(k, metadata={"target": target, "source": str(args.targets),
                                       **targets_encoder(args.targets, args.split)})
        with atomic_files_into(out_dir) as staging:  # an earlier basis stays whole until the new one is complete
            save_basis(staging, basis)
            write_report(staging / REPORT_FILENAME, report)
    print(format_summary(report))
    print(f"  wrote {out_dir / PCA_FILENAME} and {out_dir / REPORT_FILENAME}")
    return 0
