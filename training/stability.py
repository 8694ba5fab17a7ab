"""The paper's stability criterion as a number: α* = 1 / λ_max(V^{-1/2} J V^{-1/2}).

Around a single model θ* (K = 1), spreading the ensemble over members lowers the α-Rényi
objective exactly when V − α·J is not positive definite, where

    V = −Σ_i ∇²ℓ_i(θ*)        observed information (Hessian of the summed NLL)
    J =  Σ_i g_i g_iᵀ,  g_i = ∇ℓ_i(θ*)   empirical Fisher (per-example score outer products)

and ℓ_i is example i's log-likelihood. The critical value is α* = 1/λ_max, λ_max the
largest generalised eigenvalue of the pencil (J, V): spread (specialists) is favoured for
α > α*.

Nothing here forms a P × P matrix. J is held as its n per-example gradients G (n × P,
``J = GᵀG``), V only through Hessian-vector products (``torch.func``: forward-over-reverse,
``jvp(grad(F))``). The pencil is solved by Rayleigh–Ritz in a growing subspace S
(generalised Davidson):

1. S₀ = the top ``rank`` principal directions of the per-example gradients (the top
   eigenvectors of J, from the n × n Gram matrix G Gᵀ);
2. V_S = Sᵀ V S (one HVP per direction), J_S = (G S)ᵀ(G S); the largest eigenvalue of the
   small pencil (J_S, V_S) is a Ritz value λ_S ≤ λ_max (Courant–Fischer: a lower bound, so
   α*_S ≥ α*);
3. the residual r = J u − λ_S V u of the top Ritz vector u is orthogonalised and added to S
   (one more HVP); repeat until the relative residual is below ``tol`` or ``iterations``
   are spent. On an invariant subspace (e.g. when S spans the whole space) the answer is
   exact.

With u normalised so that uᵀ V u = 1, λ_S = Σ_i (g_iᵀu)², so example i's share of the
unstable direction is (g_iᵀu)²/λ_S: the examples that load most are the contradictory ones.

:func:`cross_fit` estimates the population λ_max instead: with more parameters than
examples the in-sample one is at least the largest single-example leverage g_iᵀV⁻¹g_i.
Directions are found on one fold of the examples, chosen on a second and measured on a
third.

Errors (all :class:`~ensemble.errors.ConfigError`, one line, what to change): too few
examples, V not positive definite in the subspace (θ* is not a minimum there), a diverging
or non-finite iteration. Never a silent NaN.
"""

from __future__ import annotations

import copy
import math
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ensemble.errors import ConfigError

__all__ = [
    "MIN_EXAMPLES",
    "AdapterObjective",
    "FunctionalObjective",
    "Objective",
    "StabilityResult",
    "center_rows",
    "cross_fit",
    "estimate",
    "explicit_pencil",
    "fold_of_rows",
    "lora_parameter_names",
    "per_token_weights",
    "recommend",
    "solve_pencil",
]

MIN_EXAMPLES = 8  # fewer per-example gradients than this: J is too noisy to say anything
PD_TOL = 1e-8  # V_S counts as positive definite when λ_min(V_S) > PD_TOL · λ_max(V_S)
SINGLE_EXAMPLE_SHARE = 0.5  # above this share of λ_max one example, not the data, sets α*
DIVERGED = 1e8  # λ_max above this (α* < 1e-8): V is numerically singular along the direction

LogLik = Callable[[torch.Tensor, Any], torch.Tensor]


def _hvp(
    nll: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """V v = ∇²(nll)(θ) v, forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``)."""
    with warnings.catch_warnings():  # torch's first jvp scripts its decompositions (deprecated jit)
        warnings.simplefilter("ignore", DeprecationWarning)
        out = torch.func.jvp(torch.func.grad(nll), (theta,), (v.to(theta),))
    return out[1].detach()


class Objective:
    """The per-example log-likelihoods ℓ_i(θ) of n examples, θ a flat vector.

    Subclasses provide :meth:`example_grads` (G, n × P) and :meth:`hvp` (V v).
    """

    n: int
    theta: torch.Tensor  # (P,) the point θ*

    def example_grads(self) -> torch.Tensor:
        raise NotImplementedError

    def hvp_batches(self, v: torch.Tensor) -> torch.Tensor:
        """(n_batches, P): H_b v for each batch b, H_b the Hessian of the batch's summed NLL."""
        raise NotImplementedError

    def batch_sizes(self) -> list[int]:
        """Examples per batch, in order (rows of G are the batches' examples, concatenated)."""
        raise NotImplementedError

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """V v = Σ_b H_b v."""
        return self.hvp_batches(v).sum(0)


class FunctionalObjective(Objective):
    """ℓ_i from a pure function ``loglik(theta, batch) -> (B,)`` over fixed batches.

    Per-example gradients are ``torch.func.jacrev`` of each batch's (B,) log-likelihoods
    (a vmapped backward pass: one row per example); ``hvp`` is ``jvp(grad(−Σℓ))`` summed
    over the batches.
    """

    def __init__(self, loglik: LogLik, theta: torch.Tensor, batches: Sequence[Any]) -> None:
        self.loglik = loglik
        self.theta = theta.detach()
        self.batches = list(batches)
        self._sizes: list[int] = []
        self.n = 0

    def example_grads(self) -> torch.Tensor:
        rows = []
        for batch in self.batches:
            jac = torch.func.jacrev(lambda t, b=batch: self.loglik(t, b))(self.theta)
            rows.append(jac.detach().reshape(-1, self.theta.numel()))
        g = torch.cat(rows)
        self.n = g.shape[0]
        return g

    def batch_sizes(self) -> list[int]:
        if not self._sizes:
            with torch.no_grad():
                self._sizes = [int(self.loglik(self.theta, b).shape[0]) for b in self.batches]
        return self._sizes

    def hvp_batches(self, v: torch.Tensor) -> torch.Tensor:
        out = []
        for batch in self.batches:

            def nll(t: torch.Tensor, b: Any = batch) -> torch.Tensor:
                return -self.loglik(t, b).sum()

            out.append(_hvp(nll, self.theta, v))
        return torch.stack(out)


@dataclass
class StabilityResult:
    """What :func:`estimate` measured; ``alpha_star`` = 1 / ``lambda_max``."""

    lambda_max: float
    alpha_star: float
    eigenvalues: list[float]  # top Ritz values of (J, V), descending
    loadings: np.ndarray  # (n,) g_iᵀu for the top direction u (uᵀVu = 1); Σ loadings² = λ
    n_examples: int
    n_params: int
    subspace_dim: int
    hvps: int
    iterations: int
    converged: bool
    residual: float  # ‖J u − λ V u‖ / (‖J u‖ + λ‖V u‖) of the top Ritz pair
    stop_reason: str = ""
    history: list[float] = field(default_factory=list)  # λ_max after each step
    v_eigen_range: tuple[float, float] = (0.0, 0.0)  # λ_min, λ_max of V_S (the curvature seen)
    j_trace: float = 0.0  # tr J = Σ‖g_i‖²
    seconds: dict[str, float] = field(default_factory=dict)
    estimator: str = "in-sample"  # or "cross-fitted" (:func:`cross_fit`)
    cross_fit: dict[str, Any] | None = None  # folds, per-fold runs, held-out values

    @property
    def shares(self) -> np.ndarray:
        """(n,) each example's share of λ_max (sums to 1)."""
        sq = self.loadings**2
        total = sq.sum()
        return sq / total if total > 0 else sq

    @property
    def mean_gradient_share(self) -> float:
        """Share of λ_max due to the mean gradient ḡ: (Σ_i g_iᵀu)² / (n Σ_i (g_iᵀu)²).

        J = J_c + n ḡḡᵀ with J_c the centred scatter; at an exact optimum ḡ = 0. A share
        near 1 means the top direction is mostly θ*'s remaining descent direction (an
        unfinished fit), not a split between examples; near 0 means the examples pull
        against each other along it.
        """
        total = float((self.loadings**2).sum())
        n = len(self.loadings)
        return float(self.loadings.sum()) ** 2 / (n * total) if total > 0 and n else 0.0

    @property
    def effective_examples(self) -> float:
        """1 / Σ share²: how many examples carry the top direction (n when all load
        equally, 1 when one example carries it). A split between groups of the data is
        carried by many; one poorly fitted example by about one."""
        sq = float((self.shares**2).sum())
        return 1.0 / sq if sq > 0 else 0.0

    def top_examples(self, k: int = 10) -> list[tuple[int, float, float]]:
        """(index, share, signed loading) of the k examples that load most on u."""
        order = np.argsort(-self.shares, kind="stable")[:k]
        return [(int(i), float(self.shares[i]), float(self.loadings[i])) for i in order]

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha_star": self.alpha_star,
            "lambda_max": self.lambda_max,
            "eigenvalues": self.eigenvalues,
            "n_examples": self.n_examples,
            "n_params": self.n_params,
            "subspace_dim": self.subspace_dim,
            "hvps": self.hvps,
            "iterations": self.iterations,
            "converged": self.converged,
            "relative_residual": self.residual,
            "stop_reason": self.stop_reason,
            "lambda_history": self.history,
            "v_subspace_eigen_range": list(self.v_eigen_range),
            "j_trace": self.j_trace,
            "mean_gradient_share": self.mean_gradient_share,
            "effective_examples": self.effective_examples,
            "estimator": self.estimator,
            "cross_fit": self.cross_fit,
            "seconds": self.seconds,
        }


# ----------------------------------------------------------------------- small pencils


def solve_pencil(j_s: np.ndarray, v_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Generalised eigenpairs of the small pencil (J_S, V_S), descending.

    Returns (λ, X) with J_S X = V_S X diag(λ) and Xᵀ V_S X = I. Raises ConfigError when
    V_S is not positive definite or anything is not finite.
    """
    j_s = 0.5 * (j_s + j_s.T)
    v_s = 0.5 * (v_s + v_s.T)
    if not (np.all(np.isfinite(j_s)) and np.all(np.isfinite(v_s))):
        raise ConfigError(
            "the curvature estimate is not finite (NaN/inf in V or J): the model overflows at "
            "θ*; fit the adapter with a lower learning rate or check the data"
        )
    v_eig = np.linalg.eigvalsh(v_s)
    if v_eig[0] <= PD_TOL * max(abs(v_eig[-1]), 1e-300):
        raise ConfigError(
            f"V (the Hessian of the summed NLL) is not positive definite in the subspace "
            f"(eigenvalues {v_eig[0]:.3g} … {v_eig[-1]:.3g}): θ* is not a minimum there; "
            "fit the single adapter longer (--fit-steps) or use fewer directions (--rank)"
        )
    chol = np.linalg.cholesky(v_s)
    inv = np.linalg.inv(chol)
    m = inv @ j_s @ inv.T
    lam, y = np.linalg.eigh(0.5 * (m + m.T))
    order = np.argsort(-lam)
    return lam[order], inv.T @ y[:, order]


def explicit_pencil(j: np.ndarray, v: np.ndarray) -> np.ndarray:
    """All generalised eigenvalues of (J, V) from full matrices, descending (for tests)."""
    lam, _ = solve_pencil(j, v)
    return lam


# ----------------------------------------------------------------------- the estimator


def _orthonormalise(x: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor | None:
    """x with the span of ``basis`` rows removed (twice, CGS2), normalised; None if ~0."""
    norm0 = float(x.norm())
    if norm0 == 0.0 or not math.isfinite(norm0):
        return None
    for _ in range(2):
        if basis is not None and basis.shape[0]:
            x = x - basis.T @ (basis @ x)
    norm = float(x.norm())
    if norm <= 1e-6 * norm0:
        return None
    return x / norm


@dataclass
class _Ritz:
    """The state of one Davidson run on rows ``g`` (see :func:`_davidson`)."""

    basis: torch.Tensor  # (m, P) orthonormal directions S
    v_cols: torch.Tensor  # (m, P) V S
    c: np.ndarray  # (n, m) g_iᵀ s_j
    v_s: np.ndarray  # (m, m) Sᵀ V S
    lam: np.ndarray  # Ritz values, descending
    x: np.ndarray  # (m, m) Ritz vectors in S's coordinates, xᵀ V_S x = I
    history: list[float]
    hvps: int
    iterations: int
    converged: bool
    residual: float
    stop_reason: str


def _check_rows(
    g: torch.Tensor,
    weights: Sequence[float] | np.ndarray | torch.Tensor | None,
    min_examples: int,
    rank: int,
    iterations: int,
    center: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """G with rows scaled by √c_i, after the checks every estimator shares; with ``center``
    (groups of rows), each group first loses its mean (:func:`center_rows`)."""
    n = g.shape[0]
    if weights is not None:
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        if w.shape != (n,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ConfigError(
                f"per-example weights must be {n} finite values >= 0, got shape {tuple(w.shape)}"
            )
    if center:
        g = center_rows(g, center, weights)
    if weights is not None:
        g = g * w.sqrt().to(g)[:, None]
    if n < min_examples:
        raise ConfigError(
            f"only {n} examples: the stability estimate needs at least {min_examples} "
            "(pass more data or a larger --examples)"
        )
    if not bool(torch.isfinite(g).all()):
        raise ConfigError(
            "a per-example gradient is not finite (NaN/inf) at θ*: the adapter diverged; "
            "refit it with a lower learning rate or pass another --adapter"
        )
    if rank < 1 or iterations < 0:
        raise ConfigError(f"--rank must be >= 1 and --iterations >= 0, got {rank}, {iterations}")
    return g


def center_rows(
    g: torch.Tensor,
    groups: Sequence[torch.Tensor],
    weights: Sequence[float] | np.ndarray | torch.Tensor | None = None,
) -> torch.Tensor:
    """G with each group's (c-weighted) mean gradient subtracted from its rows.

    J_c = Σ_i c_i (g_i − ḡ)(g_i − ḡ)ᵀ with ḡ = Σ c_i g_i / Σ c_i: the scatter of the scores
    about their mean. The expansion behind the criterion is taken at an optimum, where ḡ = 0;
    at a θ* that is not one (fitted on other rows, so ḡ is the held-out descent direction),
    moving the single adapter along −V⁻¹ḡ removes ḡ to first order, and J_c is what is left
    for spread to explain.
    """
    w = torch.ones(g.shape[0], dtype=g.dtype)
    if weights is not None:
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64)).to(g)
    out = g.clone()
    for rows in groups:
        wr = w[rows]
        total = float(wr.sum())
        if total > 0:
            out[rows] = g[rows] - (wr[:, None] * g[rows]).sum(0) / total
    return out


def _davidson(
    g: torch.Tensor,
    apply_v: Callable[[torch.Tensor], torch.Tensor],
    rank: int,
    iterations: int,
    tol: float,
    say: Callable[[str], None],
    label: str = "",
) -> _Ritz:
    """Rayleigh–Ritz + Davidson on the pencil (GᵀG, V), V applied by ``apply_v``."""
    gram = (g.double() @ g.double().T).cpu().numpy()
    ev, evec = np.linalg.eigh(0.5 * (gram + gram.T))
    order = np.argsort(-ev)
    ev, evec = ev[order], evec[:, order]
    if not ev[0] > 0:
        raise ConfigError(
            "every per-example gradient is zero at θ*: nothing to estimate "
            "(the data are fitted exactly, or no parameter is trainable)"
        )
    keep = [k for k in range(min(rank, g.shape[0])) if ev[k] > 1e-10 * ev[0]]
    basis: torch.Tensor | None = None
    for k in keep:
        col = torch.as_tensor(evec[:, k], dtype=g.dtype, device=g.device)
        s = _orthonormalise(g.T @ col, basis)
        if s is not None:
            basis = s[None] if basis is None else torch.cat([basis, s[None]])
    assert basis is not None

    t1 = time.monotonic()
    v_cols = torch.stack([apply_v(s) for s in basis])  # (m, P): V s
    hvps = basis.shape[0]
    say(f"{label}start subspace: {hvps} directions, {hvps} HVPs in {time.monotonic() - t1:.1f}s")
    history: list[float] = []
    stop_reason = ""
    hvps_wasted = 0
    converged = False
    residual = math.inf
    it = 0
    while True:
        c_new = (g @ basis.T).double().cpu().numpy()  # (n, m): g_iᵀ s_j
        v_new = (basis.double() @ v_cols.double().T).cpu().numpy()
        try:
            lam_new, x_new = solve_pencil(c_new.T @ c_new, v_new)
        except ConfigError:
            if it == 0:
                raise
            # V is not positive definite along the newest direction: keep the last subspace
            basis, v_cols = basis[:-1], v_cols[:-1]
            hvps_wasted = 1
            stop_reason = "V not positive definite along the next Davidson direction"
            say(
                f"{label}step {it}: {stop_reason}; keeping the previous {basis.shape[0]} directions"
            )
            break
        c, v_s, lam, x = c_new, v_new, lam_new, x_new
        lam_max = float(lam[0])
        if not math.isfinite(lam_max):
            raise ConfigError("the iteration produced a non-finite eigenvalue; refit θ*")
        if lam_max > DIVERGED:
            raise ConfigError(
                f"the iteration diverges (λ_max = {lam_max:.3g}): V is numerically singular "
                "along the top direction; fit the adapter longer (--fit-steps) or lower --rank"
            )
        history.append(lam_max)
        x0 = torch.as_tensor(x[:, 0], dtype=basis.dtype, device=basis.device)
        vu = v_cols.T @ x0
        ju = g.T @ (g @ (basis.T @ x0))
        r = ju - lam_max * vu
        denom = float(ju.norm()) + abs(lam_max) * float(vu.norm())
        residual = float(r.norm()) / denom if denom > 0 else 0.0
        say(
            f"{label}step {it}: λ_max {lam_max:.6g} (α* {1 / lam_max:.4g}), residual {residual:.2e}"
        )
        if residual <= tol:
            converged = True
            stop_reason = "converged"
            break
        if it >= iterations:
            stop_reason = "iterations spent"
            break
        new = _orthonormalise(r, basis)
        if new is None:  # the subspace is invariant: the Ritz value is exact
            converged = True
            stop_reason = "invariant subspace"
            break
        basis = torch.cat([basis, new[None]])
        v_cols = torch.cat([v_cols, apply_v(new)[None]])
        hvps += 1
        it += 1
    return _Ritz(
        basis=basis,
        v_cols=v_cols,
        c=c,
        v_s=v_s,
        lam=lam,
        x=x,
        history=history,
        hvps=hvps,
        iterations=it - hvps_wasted,
        converged=converged,
        residual=residual,
        stop_reason=stop_reason,
    )


def estimate(
    objective: Objective,
    rank: int = 8,
    iterations: int = 8,
    tol: float = 1e-3,
    top: int = 10,
    min_examples: int = MIN_EXAMPLES,
    grads: torch.Tensor | None = None,
    weights: Sequence[float] | np.ndarray | torch.Tensor | None = None,
    progress: Callable[[str], None] | None = None,
    center: bool = False,
) -> StabilityResult:
    """λ_max of (J, V) at ``objective.theta`` by Rayleigh–Ritz + Davidson (module docstring).

    Args:
        rank: directions in the starting subspace (top principal directions of G).
        iterations: Davidson expansions (one HVP each) after the start.
        tol: stop when the top Ritz pair's relative residual is below this.
        top: how many generalised eigenvalues to report.
        grads: per-example gradients if already computed (n × P).
        weights: per-example weights c_i ≥ 0, so that J = Σ_i c_i g_i g_iᵀ: ``1 / T_i`` (T_i
            the example's completion tokens) gives the criterion of the per-token-normalised
            objective (``--normalize-by-length``; see :func:`per_token_weights`). Loadings
            and shares are then those of √c_i g_i.
        center: J from the gradients' scatter about their mean (:func:`center_rows`).
    """
    say = progress or (lambda _msg: None)
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    g = objective.example_grads() if grads is None else grads
    seconds["example_grads"] = round(time.monotonic() - t0, 2)
    n, p = g.shape
    groups = [torch.arange(n)] if center else []
    g = _check_rows(g, weights, min_examples, rank, iterations, center=groups)
    say(f"per-example gradients: {n} × {p} in {seconds['example_grads']:.1f}s")
    t1 = time.monotonic()
    ritz = _davidson(g, objective.hvp, rank, iterations, tol, say)
    seconds["hvps_and_solve"] = round(time.monotonic() - t1, 2)
    lam_max = float(ritz.lam[0])
    loadings = (ritz.c @ ritz.x[:, 0]).astype(np.float64)  # g_iᵀ u with uᵀVu = 1
    if loadings.sum() < 0:  # a fixed sign: reproducible reports
        loadings = -loadings
    v_eig = np.linalg.eigvalsh(0.5 * (ritz.v_s + ritz.v_s.T))
    return StabilityResult(
        lambda_max=lam_max,
        alpha_star=1.0 / lam_max if lam_max > 0 else math.inf,
        eigenvalues=[float(v) for v in ritz.lam[:top]],
        loadings=loadings,
        n_examples=n,
        n_params=p,
        subspace_dim=int(ritz.basis.shape[0]),
        hvps=ritz.hvps,
        iterations=ritz.iterations,
        stop_reason=ritz.stop_reason,
        converged=ritz.converged,
        residual=ritz.residual,
        history=ritz.history,
        v_eigen_range=(float(v_eig[0]), float(v_eig[-1])),
        j_trace=float((g.double() ** 2).sum()),
        seconds=seconds,
    )


def fold_of_rows(sizes: Sequence[int], folds: int, min_examples: int = MIN_EXAMPLES) -> np.ndarray:
    """(n,) the fold of each example when batch b (of ``sizes[b]`` examples) is fold b % folds.

    Raises ConfigError (what to change) for fewer than 3 folds, fewer batches than folds, or
    a fold with fewer than ``min_examples`` examples.
    """
    if folds < 3:
        raise ConfigError(
            f"--folds must be >= 3 (one fold finds directions, one chooses, one measures), "
            f"got {folds}"
        )
    if len(sizes) < folds:
        raise ConfigError(
            f"cross-fitting splits by batch and needs at least {folds} batches, got "
            f"{len(sizes)}: lower --batch-size or pass more --examples"
        )
    row_fold = np.repeat(np.arange(len(sizes)) % folds, sizes)
    counts = np.bincount(row_fold, minlength=folds)
    if counts.min() < min_examples:
        raise ConfigError(
            f"a fold has only {int(counts.min())} examples: cross-fitting needs at least "
            f"{min_examples} per fold; pass more --examples or fewer --folds"
        )
    return row_fold


def cross_fit(
    objective: Objective,
    folds: int = 3,
    rank: int = 8,
    iterations: int = 0,
    tol: float = 1e-3,
    top: int = 10,
    min_examples: int = MIN_EXAMPLES,
    grads: torch.Tensor | None = None,
    weights: Sequence[float] | np.ndarray | torch.Tensor | None = None,
    progress: Callable[[str], None] | None = None,
    center: bool = False,
) -> StabilityResult:
    """λ_max of the *population* pencil, cross-fitted: found, chosen and measured apart.

    With P parameters ≫ n examples the in-sample λ_max(J, V) is at least the largest
    single-example leverage g_iᵀV⁻¹g_i: it rewards a direction for fitting one example,
    and a well-specified model's in-sample λ_max grows with P/n (logistic, in a
    simulation: 1.2 at P/n = 6/300, 2.1 at 40/600, 6.7 at 40/200). Here the
    examples are split into ``folds`` folds by batch (so one HVP pass gives every fold's
    curvature); for each ordered triple of distinct folds (f, s, e):

    1. the Davidson iteration on fold f alone gives candidate directions (its Ritz vectors);
    2. fold s chooses the candidate with the largest Rayleigh quotient uᵀJ_s u / uᵀV_s u;
    3. fold e measures the chosen candidate's quotient uᵀJ_e u / uᵀV_e u.

    The reported λ_max is the mean of step 3 over the triples. Each value is the quotient
    of a direction fixed without fold e, so it estimates that direction's population
    quotient without selection bias, which is at most the population λ_max (1 for a
    well-specified model, whatever P/n). It is therefore approximately a lower bound; the
    tests check it against a known population value and a well-specified model. (θ* itself
    is fitted on all folds.) ``eigenvalues``
    are the held-out quotients of fold f's Ritz directions by rank (on the other folds
    together, averaged over f), sorted; ``cross_fit["held_out_by_rank"]`` keeps them per f,
    unsorted (rank 1 of fold f is a direction fixed without the other folds too). Loadings are those of each example on the chosen
    direction of its measuring fold (the triple with the larger quotient), uᵀV_e u = 1.
    ``center``: J from each fold's scatter about its own mean gradient (:func:`center_rows`).
    """
    say = progress or (lambda _msg: None)
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    g = objective.example_grads() if grads is None else grads
    seconds["example_grads"] = round(time.monotonic() - t0, 2)
    n, p = g.shape
    sizes = objective.batch_sizes()
    if sum(sizes) != n:
        raise ConfigError(f"the batches hold {sum(sizes)} examples but G has {n} rows")
    row_fold = fold_of_rows(sizes, folds, min_examples)
    groups = [torch.as_tensor(np.flatnonzero(row_fold == f)) for f in range(folds)]
    # with ``center`` each fold about its own mean: no fold's mean is seen by another
    g = _check_rows(g, weights, min_examples, rank, iterations, center=groups if center else [])
    batch_fold = np.arange(len(sizes)) % folds
    counts = np.bincount(row_fold, minlength=folds)
    say(
        f"per-example gradients: {n} × {p} in {seconds['example_grads']:.1f}s; "
        f"{folds} folds of {', '.join(str(int(c)) for c in counts)} examples"
    )
    onehot = torch.zeros((folds, len(sizes)), dtype=g.dtype)
    onehot[torch.as_tensor(batch_fold), torch.arange(len(sizes))] = 1.0
    rows = groups

    t1 = time.monotonic()
    fold_runs: list[dict[str, Any]] = []
    held: list[dict[str, Any]] = []
    spectra: list[np.ndarray] = []
    best_for: dict[int, tuple[float, np.ndarray]] = {}
    hvps = 0
    for f in range(folds):
        per_fold: list[torch.Tensor] = []  # (folds, P) per V application: Σ_{b ∈ fold} H_b v

        def apply_v(
            v: torch.Tensor, f: int = f, store: list[torch.Tensor] = per_fold
        ) -> torch.Tensor:
            sums = onehot @ objective.hvp_batches(v).to(onehot)
            store.append(sums)
            return sums[f]

        ritz = _davidson(g[rows[f]], apply_v, rank, iterations, tol, say, label=f"fold {f}: ")
        hvps += len(per_fold)
        m = ritz.basis.shape[0]
        vf = torch.stack(per_fold[:m])  # (m, folds, P); a wasted last direction is dropped
        x = ritz.x[:, : min(top, m)]  # candidates in S's coordinates
        quotients: dict[int, np.ndarray] = {}
        c_parts: dict[int, np.ndarray] = {}
        j_parts: dict[int, np.ndarray] = {}
        v_parts: dict[int, np.ndarray] = {}
        for e in range(folds):
            if e == f:
                continue
            c_parts[e] = (g[rows[e]] @ ritz.basis.T).double().cpu().numpy()  # (n_e, m)
            v_e = (ritz.basis.double() @ vf[:, e, :].double().T).cpu().numpy()  # Sᵀ V_e S
            v_e = 0.5 * (v_e + v_e.T)
            j_parts[e] = ((c_parts[e] @ x) ** 2).sum(0)
            v_parts[e] = np.einsum("mk,mn,nk->k", x, v_e, x)
            with np.errstate(divide="ignore", invalid="ignore"):
                quotients[e] = np.where(v_parts[e] > 0, j_parts[e] / v_parts[e], np.nan)
        j_all = sum(j_parts.values())
        v_all = sum(v_parts.values())
        with np.errstate(divide="ignore", invalid="ignore"):
            spectra.append(np.where(v_all > 0, j_all / v_all, np.nan))
        for s in quotients:
            if not np.isfinite(quotients[s]).any():
                raise ConfigError(
                    f"V is not positive definite on fold {s} along any direction found on fold "
                    f"{f}: θ* is not a minimum there; fit the adapter longer (--fit-steps)"
                )
            k = int(np.nanargmax(quotients[s]))
            for e in quotients:
                if e == s:
                    continue
                value = float(quotients[e][k])
                if not math.isfinite(value):
                    raise ConfigError(
                        f"V is not positive definite on fold {e} along the direction chosen on "
                        f"fold {s}: θ* is not a minimum there; fit the adapter longer (--fit-steps)"
                    )
                held.append(
                    {
                        "directions_from": f,
                        "chosen_on": s,
                        "measured_on": e,
                        "rank": k,
                        "lambda": value,
                    }
                )
                if e not in best_for or value > best_for[e][0]:
                    load = c_parts[e] @ x[:, k] / math.sqrt(float(v_parts[e][k]))
                    best_for[e] = (value, load)
        fold_runs.append(
            {
                "fold": f,
                "examples": int(counts[f]),
                "in_sample_lambda": float(ritz.lam[0]),
                "converged": ritz.converged,
                "relative_residual": ritz.residual,
                "subspace_dim": m,
                "history": ritz.history,
            }
        )
        say(
            f"fold {f}: in-sample λ_max {float(ritz.lam[0]):.4g}; held out: "
            + ", ".join(f"{h['lambda']:.4g}" for h in held if h["directions_from"] == f)
        )
    seconds["hvps_and_solve"] = round(time.monotonic() - t1, 2)
    values = np.array([h["lambda"] for h in held])
    lam_max = float(values.mean())
    loadings = np.zeros(n)
    for e, (_, load) in best_for.items():
        loadings[rows[e].numpy()] = load if load.sum() >= 0 else -load
    width = max(len(q) for q in spectra)  # folds may keep different numbers of directions
    padded = np.full((len(spectra), width), np.nan)
    for f, q in enumerate(spectra):
        padded[f, : len(q)] = q
    seen = np.isfinite(padded)
    spectrum = np.where(seen, padded, 0.0).sum(0)[seen.any(0)] / seen.sum(0)[seen.any(0)]
    spectrum = np.sort(spectrum)[::-1]
    return StabilityResult(
        lambda_max=lam_max,
        alpha_star=1.0 / lam_max if lam_max > 0 else math.inf,
        eigenvalues=[float(v) for v in spectrum[:top]],
        loadings=loadings,
        n_examples=n,
        n_params=p,
        subspace_dim=max(r["subspace_dim"] for r in fold_runs),
        hvps=hvps,
        iterations=sum(len(r["history"]) - 1 for r in fold_runs),
        converged=all(r["converged"] for r in fold_runs),
        residual=max(r["relative_residual"] for r in fold_runs),
        stop_reason=f"cross-fitted over {len(held)} (find, choose, measure) fold triples",
        history=[float(v) for v in values],
        j_trace=float((g.double() ** 2).sum()),
        seconds=seconds,
        estimator="cross-fitted",
        cross_fit={
            "folds": folds,
            "fold_examples": [int(c) for c in counts],
            "lambda_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "in_sample_lambda_max": max(r["in_sample_lambda"] for r in fold_runs),
            # fold f's Ritz directions in f's order, each measured on the other folds together
            "held_out_by_rank": [[float(v) for v in q] for q in spectra],
            "fold_runs": fold_runs,
            "held_out": held,
        },
    )


def per_token_weights(token_counts: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    """c_i = 1 / T_i: J's weights for the per-token-normalised objective.

    Training with ``--normalize-by-length`` routes with w_k = softmax(log π_k + α log p_k / T)
    and descends −Σ_k w_k log p_k, the exact gradient of T · ℓ_{α/T}: example i gets its own
    α_i = α / T_i. Expanding that objective around θ* (ℓ_a ≈ E[−log p] − (a/2) Var[log p])
    gives ½ tr(Σ (V − α Σ_i g_i g_iᵀ / T_i)), so the pencil is (Σ_i g_i g_iᵀ / T_i, V).
    """
    t = np.asarray(token_counts, dtype=np.float64)
    if t.ndim != 1 or not np.all(np.isfinite(t)) or np.any(t < 1):
        raise ConfigError("every example needs at least one completion token to normalise by")
    return 1.0 / t


def recommend(
    result: StabilityResult, margin: float = 1.5, max_alpha: float = 1.0, max_members: int = 8
) -> dict[str, Any]:
    """A recommended α and K from the spectrum.

    α: ``margin`` × α* (clearly past the threshold, given the estimate's error), capped at
    ``max_alpha`` (α = 1: complementary specialists). K: 1 + the number of generalised
    eigenvalues above 1/α (each unstable direction is one more way to split the data),
    capped at ``max_members``; K = 1 when no direction is unstable at that α.
    """
    a_star = result.alpha_star
    alpha = min(max_alpha, margin * a_star) if math.isfinite(a_star) else max_alpha
    unstable = sum(1 for lam in result.eigenvalues if lam * alpha > 1.0)
    if a_star >= max_alpha:  # a cross-fitted spectrum can hold one value above λ_max
        unstable = 0
    members = max(1, min(max_members, 1 + unstable))
    if a_star >= max_alpha:
        reason = (
            f"α* = {a_star:.3g} ≥ {max_alpha:g}: no direction is unstable for α ≤ {max_alpha:g}; "
            "the data look well specified for one adapter (members would not specialise)"
        )
    else:
        reason = (
            f"α* = {a_star:.3g}: spread is favoured for α > α*; α = {alpha:.3g} leaves "
            f"{unstable} unstable direction(s)"
        )
    top_share = float(result.shares.max()) if len(result.loadings) else 0.0
    caution = None
    if top_share > SINGLE_EXAMPLE_SHARE:
        caution = (
            f"one example carries {top_share:.0%} of λ_max: α* measures that example (a poorly "
            "fitted one), not a split between groups of the data; look at top_examples"
        )
    return {
        "alpha": round(alpha, 4),
        "members": members,
        "unstable_directions": unstable,
        "reason": reason,
        "caution": caution,
    }


# ----------------------------------------------------------------------- LoRA adapters

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def lora_parameter_names(module: torch.nn.Module, adapter: str) -> list[str]:
    """Names (relative to ``module``) of one adapter's LoRA tensors, in module order."""
    return [n for n, _ in module.named_parameters() if "lora_" in n and f".{adapter}." in n]


class AdapterObjective(Objective):
    """ℓ_i = Σ_t log p(y_t | …) over completion tokens, as a function of one LoRA adapter.

    θ is the flat vector of the adapter's LoRA tensors in the last ``layers`` decoder layers
    (``None``: all layers). The other adapter tensors stay at their values (part of θ*'s
    fixed context). With ``layers`` set, the hidden states entering the first selected
    layer are computed once (no grad) and the decoder is cut to the selected layers for
    every gradient and HVP: the cost of a pass no longer grows with the model's depth.
    The objective owns ``peft_model`` afterwards (its decoder may be truncated).

    Dropout is off (eval mode) and attention is the eager implementation, which supports
    forward-mode AD (the HVPs are ``jvp(grad)``).
    """

    def __init__(
        self,
        peft_model: Any,
        examples: Sequence[Any],
        adapter: str,
        layers: int | None = None,
        batch_size: int = 8,
        pad_id: int = 0,
    ) -> None:
        lm = peft_model.get_base_model()
        lm.eval()
        if hasattr(lm, "set_attn_implementation"):
            lm.set_attn_implementation("eager")
        else:  # pragma: no cover - older transformers
            lm.config._attn_implementation = "eager"
        peft_model.base_model.set_adapter(adapter)
        self.lm = lm
        self.decoder = lm.get_decoder()
        self.head = lm.get_output_embeddings()
        n_layers = len(self.decoder.layers)
        if layers is not None and not 1 <= layers <= n_layers:
            raise ConfigError(f"--layers must be in 1..{n_layers} (0 = all), got {layers}")
        first = 0 if layers is None else n_layers - layers
        self.first_layer = first
        self.examples = list(examples)
        self.n = len(self.examples)
        self.batch_size = batch_size
        self.pad_id = pad_id
        names = [
            n
            for n in lora_parameter_names(self.decoder, adapter)
            if (m := _LAYER.search("." + n)) is not None and int(m.group(1)) >= first
        ]
        if not names:
            raise ConfigError(f"adapter {adapter!r} has no LoRA tensors in the selected layers")
        self.n_layers = n_layers
        self.cache: list[torch.Tensor] | None = None
        if first > 0:
            self._cache_inputs(first)
            # cut the decoder to the selected layers; parameter names shift by ``first``
            self.decoder.layers = torch.nn.ModuleList(list(self.decoder.layers)[first:])
            names = [_shift_layer(n, -first) for n in names]
        params = dict(self.decoder.named_parameters())
        self.names = names
        self.shapes = [params[n].shape for n in names]
        self.theta = torch.cat([params[n].detach().reshape(-1) for n in names]).float()
        self.original_names = [_shift_layer(n, first) for n in names]
        self.batches = [
            self.batch_of(list(range(s, min(s + batch_size, self.n))))
            for s in range(0, self.n, batch_size)
        ]

    def subset(self, idx: Sequence[int]) -> AdapterObjective:
        """The objective of examples ``idx`` only, at the same θ, sharing the (cut) decoder
        and the cached layer inputs: one model serves a fit sample and a measured sample."""
        part = copy.copy(self)
        part.examples = [self.examples[i] for i in idx]
        part.n = len(part.examples)
        part.cache = None if self.cache is None else [self.cache[i] for i in idx]
        part.theta = self.theta.clone()
        part.batches = [
            part.batch_of(list(range(s, min(s + self.batch_size, part.n))))
            for s in range(0, part.n, self.batch_size)
        ]
        return part

    # ------------------------------------------------------------------ batches

    def batch_of(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        """Right-padded tensors of examples ``idx`` (cached layer inputs when cut)."""
        rows = [self.examples[i] for i in idx]
        width = max(len(e.input_ids) for e in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        b_idx, t_idx, target = [], [], []
        for b, e in enumerate(rows):
            ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
            att[b, : len(e.input_ids)] = 1
            for t in range(len(e.labels) - 1):
                if e.labels[t + 1] != -100:  # token t+1 is predicted at position t
                    b_idx.append(b)
                    t_idx.append(t)
                    target.append(e.labels[t + 1])
        batch = {
            "input_ids": ids,
            "attention_mask": att,
            "b": torch.tensor(b_idx, dtype=torch.long),
            "t": torch.tensor(t_idx, dtype=torch.long),
            "target": torch.tensor(target, dtype=torch.long),
            "size": torch.tensor(len(rows)),
        }
        if self.cache is not None:
            h = torch.zeros((len(rows), width, self.cache[0].shape[-1]), dtype=self.cache[0].dtype)
            for b, i in enumerate(idx):
                h[b, : self.cache[i].shape[0]] = self.cache[i]
            batch["inputs_embeds"] = h
        return batch

    @torch.no_grad()
    def _cache_inputs(self, first: int) -> None:
        """Hidden states entering layer ``first``, per example (unpadded), under θ*'s context."""
        cache: list[torch.Tensor] = []
        for start in range(0, self.n, self.batch_size):
            idx = list(range(start, min(start + self.batch_size, self.n)))
            batch = self.batch_of(idx)
            out = self.decoder(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                output_hidden_states=True,
                use_cache=False,
            )
            hidden = out.hidden_states[first]
            cache += [
                hidden[b, : len(self.examples[i].input_ids)].clone() for b, i in enumerate(idx)
            ]
        self.cache = cache

    # ------------------------------------------------------------------ ℓ_i(θ)

    def _params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            k = shape.numel()
            out[name] = theta[offset : offset + k].view(shape)
            offset += k
        return out

    def loglik(self, theta: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) completion log-likelihoods of one batch at adapter parameters ``theta``."""
        kwargs: dict[str, Any] = {"attention_mask": batch["attention_mask"], "use_cache": False}
        if "inputs_embeds" in batch:
            kwargs["inputs_embeds"] = batch["inputs_embeds"]
        else:
            kwargs["input_ids"] = batch["input_ids"]
        hidden = torch.func.functional_call(self.decoder, self._params(theta), (), kwargs)
        h = hidden.last_hidden_state[batch["b"], batch["t"]]  # (N, H) completion positions
        logp = torch.log_softmax(self.head(h).float(), dim=-1)
        picked = logp.gather(-1, batch["target"][:, None]).squeeze(-1)  # (N,)
        size = int(batch["size"])
        return torch.zeros(size, dtype=picked.dtype).index_add(0, batch["b"], picked)

    def example_grads(self) -> torch.Tensor:
        rows = []
        for batch in self.batches:
            jac = torch.func.jacrev(lambda t, b=batch: self.loglik(t, b))(self.theta)
            rows.append(jac.detach())
        return torch.cat(rows)

    def token_counts(self) -> np.ndarray:
        """(n,) completion tokens each example's ℓ_i sums over (T_i of the per-token criterion)."""
        counts = []
        for batch in self.batches:
            counts.append(np.bincount(batch["b"].numpy(), minlength=int(batch["size"])))
        return np.concatenate(counts)

    def batch_sizes(self) -> list[int]:
        return [int(b["size"]) for b in self.batches]

    def hvp_batches(self, v: torch.Tensor) -> torch.Tensor:
        out = []
        for batch in self.batches:

            def nll(t: torch.Tensor, b: dict[str, torch.Tensor] = batch) -> torch.Tensor:
                return -self.loglik(t, b).sum()

            out.append(_hvp(nll, self.theta, v))
        return torch.stack(out)

    def total_loglik(self, theta: torch.Tensor | None = None) -> float:
        t = self.theta if theta is None else theta
        with torch.no_grad():
            return float(sum(float(self.loglik(t, b).sum()) for b in self.batches))


def _shift_layer(name: str, delta: int) -> str:
    return _LAYER.sub(lambda m: f".layers.{int(m.group(1)) + delta}.", "." + name, count=1)[1:]
