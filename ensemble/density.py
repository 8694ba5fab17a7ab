"""Distance of an input's base-model representation from the training inputs' (Mahalanobis).

A density score on the frozen base model's hidden states: fit a Gaussian to the pooled
hidden states of the training prompts, then score a new prompt by its squared Mahalanobis
distance from it (Lee et al., NeurIPS 2018; for language models Podolskiy et al., AAAI
2021, and Ren et al., ICLR 2023). "Higher = further from the training data".

With reference vectors x_1..x_n ∈ R^d (one pooled hidden state per training prompt),
mean μ and sample covariance S = (1/(n−1)) Σ (x_i − μ)(x_i − μ)ᵀ, the covariance is
shrunk toward a multiple of the identity so that it is invertible when n < d:

    Σ_s  = (1 − s) S + s (tr S / d) I,      s ∈ (0, 1]
    D(x) = (x − μ)ᵀ Σ_s⁻¹ (x − μ)

s = 1 gives the squared Euclidean distance divided by the mean per-coordinate variance.
Solved through the eigendecomposition of the symmetric Σ_s (no explicit inverse).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "REFERENCE_FILE",
    "GaussianReference",
    "fit_gaussian",
    "load_reference",
    "pool_user_span",
    "reference_bytes",
]


@dataclass(frozen=True)
class GaussianReference:
    """μ and the whitening map W (WᵀW = Σ_s⁻¹) of a fitted reference."""

    mean: NDArray[np.float64]
    whiten: NDArray[np.float64]  # (d, d): D(x) = ‖W (x − μ)‖²
    shrinkage: float
    n: int

    def distance(self, x: ArrayLike) -> NDArray[np.float64]:
        """Squared Mahalanobis distance of each row of ``x`` (or of one vector)."""
        a = np.asarray(x, dtype=np.float64)
        if a.shape[-1] != self.mean.shape[0]:
            raise ValueError(
                f"vectors of dimension {a.shape[-1]}, the reference has {self.mean.shape[0]}"
            )
        z = (a - self.mean) @ self.whiten.T
        return np.asarray(np.einsum("...i,...i->...", z, z))


def fit_gaussian(reference: ArrayLike, shrinkage: float = 0.1) -> GaussianReference:
    """Fit μ and Σ_s (module docstring) to the rows of ``reference`` (n × d, n ≥ 2)."""
    x = np.asarray(reference, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need an (n, d) array with n >= 2 reference rows, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("the reference vectors contain NaN or infinity")
    if not 0.0 < shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in (0, 1], got {shrinkage}")
    n, d = x.shape
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / (n - 1)
    scale = float(np.trace(cov)) / d
    if scale <= 0.0:
        raise ValueError(
            "the reference vectors are all identical: nothing to measure a distance by"
        )
    shrunk = (1.0 - shrinkage) * cov + shrinkage * scale * np.eye(d)
    values, vectors = np.linalg.eigh(shrunk)  # all ≥ shrinkage · scale > 0
    whiten = (vectors / np.sqrt(values)).T
    return GaussianReference(mean=mean, whiten=whiten, shrinkage=shrinkage, n=n)


# --------------------------------------------------------------------------- persistence

REFERENCE_FILE = "reference.npz"


def pool_user_span(hidden: ArrayLike, span: tuple[int, int]) -> NDArray[np.float64]:
    """Mean of the per-token hidden states (T × d) over ``span`` = [start, end) of the prompt."""
    h = np.asarray(hidden, dtype=np.float64)
    start, end = span
    if h.ndim != 2 or not 0 <= start < end <= h.shape[0]:
        raise ValueError(f"cannot pool span {span} of hidden states shaped {h.shape}")
    return np.asarray(h[start:end].mean(0))


def reference_bytes(ref: GaussianReference) -> bytes:
    """The reference as an ``.npz`` archive (no pickles): mean, whiten, shrinkage, n."""
    import io

    buf = io.BytesIO()
    np.savez(
        buf,
        mean=ref.mean,
        whiten=ref.whiten,
        shrinkage=np.float64(ref.shrinkage),
        n=np.int64(ref.n),
    )
    return buf.getvalue()


def load_reference(path: str | Path) -> GaussianReference:
    """Read a reference written from :func:`reference_bytes`; ``ValueError`` if malformed."""
    try:
        with np.load(path, allow_pickle=False) as z:
            mean = np.asarray(z["mean"], dtype=np.float64)
            whiten = np.asarray(z["whiten"], dtype=np.float64)
            shrinkage, n = float(z["shrinkage"]), int(z["n"])
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path} is not a prompt-distance reference ({exc})") from exc
    d = mean.shape[0] if mean.ndim == 1 else -1
    if whiten.shape != (d, d) or not (np.isfinite(mean).all() and np.isfinite(whiten).all()):
        raise ValueError(f"{path}: mean {mean.shape} and whiten {whiten.shape} do not match")
    return GaussianReference(mean=mean, whiten=whiten, shrinkage=shrinkage, n=n)
