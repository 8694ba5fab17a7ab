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

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["GaussianReference", "fit_gaussian"]


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
