"""The stability estimator (training/stability.py) against closed forms and explicit matrices."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble.errors import ConfigError
from training.stability import (
    AdapterObjective,
    FunctionalObjective,
    StabilityResult,
    center_rows,
    cross_fit,
    estimate,
    explicit_pencil,
    per_token_weights,
    recommend,
    solve_pencil,
)

# ----------------------------------------------------------------------- toys


def gaussian(c: float, n: int = 10, sigma: float = 1.0) -> FunctionalObjective:
    """ℓ_i(θ) = −(x_i − θ)²/(2σ²) with data ±c, at the MLE θ* = 0."""
    x = torch.tensor([c if i % 2 else -c for i in range(n)], dtype=torch.float64)

    def loglik(theta: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        return -((xs - theta[0]) ** 2) / (2 * sigma**2)

    return FunctionalObjective(loglik, torch.zeros(1, dtype=torch.float64), [x[:4], x[4:]])


@pytest.mark.parametrize("c", [0.5, 1.0, 3.0])
def test_gaussian_closed_form(c: float) -> None:
    """V − αJ = n(1 − αc²): α* = 1/c² exactly, every example loads equally."""
    result = estimate(gaussian(c))
    assert result.alpha_star == pytest.approx(1 / c**2, rel=1e-12)
    assert result.lambda_max == pytest.approx(c**2, rel=1e-12)
    assert result.converged and result.n_params == 1 and result.hvps == 1
    assert np.allclose(result.shares, 1 / 10)
    assert sum(result.loadings**2) == pytest.approx(result.lambda_max)


def test_mean_gradient_share_separates_an_unfinished_fit_from_a_split() -> None:
    """Data ±c: at the MLE the examples pull against each other (share 0); at θ = t ≠ 0
    each g_i = x_i − t, so (Σ g_i)²/(n Σ g_i²) = n²t² / (n (n c² + n t²)) = t²/(c² + t²)."""
    c, t = 1.0, 2.0
    at_optimum = estimate(gaussian(c))
    assert at_optimum.mean_gradient_share == pytest.approx(0.0, abs=1e-12)
    shifted = gaussian(c)
    shifted.theta = torch.full((1,), t, dtype=torch.float64)
    result = estimate(shifted)
    assert result.mean_gradient_share == pytest.approx(t**2 / (c**2 + t**2), rel=1e-12)
    assert result.to_dict()["mean_gradient_share"] == result.mean_gradient_share


def logistic_problem(d: int = 6, n: int = 300, seed: int = 0):  # type: ignore[no-untyped-def]
    """A misspecified logistic regression (labels depend on x²), fitted by Newton.

    Returns the objective at θ* and the explicit V, J (numpy)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = ((x[:, 0] ** 2 + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)) > 1).double()

    def loglik(theta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        z = x[idx] @ theta
        return y[idx] * z - torch.nn.functional.softplus(z)

    theta = torch.zeros(d, dtype=torch.float64)
    for _ in range(50):  # Newton on the concave log-likelihood
        p = torch.sigmoid(x @ theta)
        grad = x.T @ (y - p)
        hess = (x * (p * (1 - p))[:, None]).T @ x
        theta = theta + torch.linalg.solve(hess, grad)
    p = torch.sigmoid(x @ theta)
    v = ((x * (p * (1 - p))[:, None]).T @ x).numpy()
    g = x * (y - p)[:, None]
    j = (g.T @ g).numpy()
    batches = [torch.arange(s, min(s + 64, n)) for s in range(0, n, 64)]
    return FunctionalObjective(loglik, theta, batches), v, j, g.numpy()


def linear_problem(d: int = 8, n: int = 400, seed: int = 0):  # type: ignore[no-untyped-def]
    """Least squares with a unit-variance Gaussian model, heteroscedastic noise (σ grows with
    |x₀|): θ* = OLS, V = XᵀX and J = Σ r_i² x_i x_iᵀ in closed form."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    noise = (0.5 + 2 * x[:, 0].abs()) * torch.randn(n, generator=gen, dtype=torch.float64)
    y = x @ torch.linspace(-1, 1, d, dtype=torch.float64) + noise

    def loglik(theta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return -0.5 * (y[idx] - x[idx] @ theta) ** 2

    theta = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
    r = y - x @ theta
    v = (x.T @ x).numpy()
    g = x * r[:, None]
    batches = [torch.arange(s, min(s + 100, n)) for s in range(0, n, 100)]
    return FunctionalObjective(loglik, theta, batches), v, (g.T @ g).numpy(), g.numpy()


def test_linear_model_matches_closed_form() -> None:
    """Started from one direction, the Davidson iteration reaches the exact λ_max."""
    objective, v, j, g = linear_problem()
    exact = explicit_pencil(j, v)
    assert exact[0] > 3  # misspecified: J exceeds V along x₀
    result = estimate(objective, rank=1, iterations=10, tol=1e-10)
    assert result.converged
    assert result.lambda_max == pytest.approx(exact[0], rel=1e-9)
    assert result.alpha_star == pytest.approx(1 / exact[0], rel=1e-9)
    assert all(b >= a - 1e-9 for a, b in zip(result.history, result.history[1:], strict=False))
    assert np.allclose(objective.example_grads().numpy(), g)


def test_logistic_matches_explicit_matrices() -> None:
    """Started from one direction, the Davidson iteration reaches the exact λ_max."""
    objective, v, j, g = logistic_problem()
    exact = explicit_pencil(j, v)
    result = estimate(objective, rank=1, iterations=10, tol=1e-10)
    assert result.converged
    assert result.lambda_max == pytest.approx(exact[0], rel=1e-9)
    assert result.alpha_star == pytest.approx(1 / exact[0], rel=1e-9)
    # the history of Ritz values rises to λ_max (each is a lower bound)
    assert all(b >= a - 1e-12 for a, b in zip(result.history, result.history[1:], strict=False))
    # the per-example gradients are the explicit ones
    assert np.allclose(objective.example_grads().numpy(), g)


def test_full_subspace_gives_the_whole_spectrum() -> None:
    objective, v, j, _ = logistic_problem(d=5, seed=1)
    result = estimate(objective, rank=5, iterations=0, top=5)
    assert np.allclose(result.eigenvalues, explicit_pencil(j, v), rtol=1e-9)


def test_ritz_value_is_a_lower_bound_of_lambda() -> None:
    objective, v, j, _ = linear_problem(seed=2)
    one = estimate(objective, rank=1, iterations=0)
    assert not one.converged
    assert one.lambda_max < explicit_pencil(j, v)[0]


def test_well_specified_logistic_is_stable() -> None:
    """Labels drawn from the model itself: V ≈ J, λ_max near 1, α* near 1."""
    gen = torch.Generator().manual_seed(3)
    n, d = 4000, 3
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    true = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
    y = (torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(x @ true)).double()

    def loglik(theta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        z = x[idx] @ theta
        return y[idx] * z - torch.nn.functional.softplus(z)

    theta = torch.zeros(d, dtype=torch.float64)
    for _ in range(30):
        p = torch.sigmoid(x @ theta)
        theta = theta + torch.linalg.solve((x * (p * (1 - p))[:, None]).T @ x, x.T @ (y - p))
    result = estimate(FunctionalObjective(loglik, theta, [torch.arange(n)]), rank=3)
    assert 0.8 < result.alpha_star < 1.25


def test_estimate_is_deterministic() -> None:
    objective, _, _, _ = logistic_problem(seed=4)
    a = estimate(objective, rank=2, iterations=3)
    b = estimate(objective, rank=2, iterations=3)
    a_dict, b_dict = a.to_dict(), b.to_dict()
    a_dict.pop("seconds"), b_dict.pop("seconds")
    assert a_dict == b_dict
    assert np.array_equal(a.loadings, b.loadings)


# ----------------------------------------------------------------------- bad input


def test_too_few_examples() -> None:
    with pytest.raises(ConfigError, match="only 4 examples.*at least 8"):
        estimate(gaussian(1.0, n=4))


def test_non_positive_definite_v() -> None:
    """θ at a maximum of the likelihood's negative (a saddle for the NLL): V < 0."""
    x = torch.tensor([1.0, -1.0] * 5, dtype=torch.float64)
    obj = FunctionalObjective(
        lambda t, xs: (xs - t[0]) ** 2 / 2, torch.zeros(1, dtype=torch.float64), [x]
    )
    with pytest.raises(ConfigError, match="not positive definite.*--fit-steps"):
        estimate(obj)


def test_diverging_iteration() -> None:
    """λ = c²/σ² = 1e10: V is numerically singular relative to J."""
    with pytest.raises(ConfigError, match="diverges"):
        estimate(gaussian(1e5))


def test_non_finite_gradients() -> None:
    x = torch.tensor([1.0, -1.0] * 5, dtype=torch.float64)
    obj = FunctionalObjective(
        lambda t, xs: -((xs - t[0]) ** 2) * float("nan"), torch.zeros(1, dtype=torch.float64), [x]
    )
    with pytest.raises(ConfigError, match="not finite"):
        estimate(obj)


def test_solve_pencil_rejects_nan() -> None:
    with pytest.raises(ConfigError, match="not finite"):
        solve_pencil(np.array([[math.nan]]), np.eye(1))


def test_recommendation() -> None:
    result = estimate(gaussian(2.0))  # α* = 0.25, one unstable direction
    rec = recommend(result)
    assert rec["alpha"] == pytest.approx(0.375) and rec["members"] == 2
    stable = recommend(estimate(gaussian(0.5)))  # α* = 4
    assert stable["alpha"] == 1.0 and stable["members"] == 1
    assert rec["caution"] is None  # ten examples load equally on the direction


def test_one_heavy_example_is_flagged() -> None:
    """One example far out (x = 20 among ±1) carries most of λ_max: the report says so."""
    even = estimate(gaussian(1.0, n=12))
    assert even.effective_examples == pytest.approx(12.0)
    x = torch.tensor([1.0, -1.0] * 5 + [20.0], dtype=torch.float64)

    def loglik(theta: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        return -((xs - theta[0]) ** 2) / 2

    mle = x.mean().reshape(1)
    heavy = estimate(FunctionalObjective(loglik, mle, [x]))
    r2 = ((x - mle) ** 2).numpy()
    shares = r2 / r2.sum()
    assert heavy.effective_examples == pytest.approx(1 / float((shares**2).sum()))
    assert heavy.effective_examples < 1.5
    rec = recommend(heavy)
    assert rec["caution"] is not None
    assert rec["caution"].startswith(f"one example carries {max(shares):.0%} of λ_max")


# ----------------------------------------------------------------------- a tiny LLM


def tiny_adapter(tiny_llama_dir: Path, rows_path: Path, r: int = 2, seed: int = 0):  # type: ignore[no-untyped-def]
    from peft import LoraConfig, get_peft_model

    from training.data import load_sft
    from training.model import load_base

    model, tok = load_base(tiny_llama_dir)
    torch.manual_seed(seed)
    lora = LoraConfig(r=r, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(model, lora, adapter_name="m0")
    with torch.no_grad():  # a non-trivial point: B ≠ 0
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    examples = load_sft(rows_path, tok, 64)[:8]
    return peft_model, examples, tok


def _explicit(objective: AdapterObjective) -> tuple[np.ndarray, np.ndarray]:
    """V (full Hessian of the summed NLL) and G (rows: per-example gradients), by autograd."""
    theta = objective.theta.clone()

    def nll(t: torch.Tensor) -> torch.Tensor:
        return -sum(objective.loglik(t, b).sum() for b in objective.batches)  # type: ignore[return-value]

    with warnings.catch_warnings():  # torch's first jvp scripts decompositions (deprecated jit)
        warnings.simplefilter("ignore", DeprecationWarning)
        hess = torch.func.jacfwd(torch.func.grad(nll))(theta).detach().numpy()  # P × P
    rows = []
    for b in objective.batches:
        for i in range(int(b["size"])):
            t = theta.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(objective.loglik(t, b)[i], t)
            rows.append(grad.numpy())
    return hess, np.stack(rows)


@pytest.mark.parametrize("layers", [1, None])
def test_adapter_objective_matches_explicit_matrices(
    tiny_llama_dir: Path, two_cluster_data: Path, layers: int | None
) -> None:
    peft_model, examples, _ = tiny_adapter(tiny_llama_dir, two_cluster_data)
    obj = AdapterObjective(peft_model, examples, "m0", layers=layers, batch_size=4)
    assert obj.n == 8
    hess, g_explicit = _explicit(obj)
    g = obj.example_grads()
    assert np.allclose(g.numpy(), g_explicit, atol=1e-5, rtol=1e-4)
    # T_i: the completion tokens ℓ_i sums over (token t+1 predicted at t)
    labelled = [sum(1 for t in e.labels[1:] if t != -100) for e in examples]
    assert obj.token_counts().tolist() == labelled and min(labelled) >= 1
    v = torch.randn(obj.theta.shape, generator=torch.Generator().manual_seed(0))
    assert np.allclose(obj.hvp(v).numpy(), hess @ v.numpy(), atol=1e-4, rtol=1e-3)
    # the estimate on the whole span of G equals the dense pencil restricted to that span
    q, _ = np.linalg.qr(g_explicit.T.astype(np.float64))
    v_q = q.T @ hess.astype(np.float64) @ q
    j_q = q.T @ (g_explicit.T @ g_explicit).astype(np.float64) @ q
    if np.linalg.eigvalsh(v_q)[0] <= 0:
        with pytest.raises(ConfigError, match="not positive definite"):
            estimate(obj, rank=8, iterations=0)
        return
    exact = explicit_pencil(j_q, v_q)
    result = estimate(obj, rank=8, iterations=0, top=8)
    assert result.lambda_max == pytest.approx(exact[0], rel=1e-3)


def test_subset_is_the_objective_of_those_examples(
    tiny_llama_dir: Path, two_cluster_data: Path
) -> None:
    """A subset shares the cut decoder and the cached inputs; its ℓ_i, gradients and HVPs are
    those of an objective built on its examples alone, and it owns its own θ."""
    peft_model, examples, _ = tiny_adapter(tiny_llama_dir, two_cluster_data)
    whole = AdapterObjective(peft_model, examples, "m0", layers=1, batch_size=3)
    idx = [6, 1, 4, 7]
    part = whole.subset(idx)
    assert part.n == 4 and part.batch_sizes() == [3, 1]
    assert torch.allclose(part.example_grads(), whole.example_grads()[idx], atol=1e-5)
    v = torch.randn(whole.theta.shape, generator=torch.Generator().manual_seed(1))
    hv_whole = whole.hvp_batches(v)  # batches (0,1,2) (3,4,5) (6,7): no batch equals part's
    assert not torch.allclose(part.hvp(v), hv_whole.sum(0), atol=1e-3)
    alone = tiny_adapter(tiny_llama_dir, two_cluster_data)[0]
    reference = AdapterObjective(alone, [examples[i] for i in idx], "m0", layers=1, batch_size=3)
    assert torch.allclose(part.hvp(v), reference.hvp(v), atol=1e-4, rtol=1e-3)
    assert part.total_loglik() == pytest.approx(reference.total_loglik(), rel=1e-5)
    part.theta += 1.0
    assert not torch.equal(part.theta, whole.theta)


def test_truncated_decoder_gives_the_full_models_loglik(
    tiny_llama_dir: Path, two_cluster_data: Path
) -> None:
    """ℓ_i from cached layer inputs + the last layer = EnsembleLM's sequence log-likelihood."""
    from training.model import EnsembleLM

    peft_model, examples, _ = tiny_adapter(tiny_llama_dir, two_cluster_data)
    full = AdapterObjective(peft_model, examples[:4], "m0", layers=None, batch_size=4)
    batch = full.batches[0]
    labels = torch.full_like(batch["input_ids"], -100)
    for b, e in enumerate(examples[:4]):
        labels[b, : len(e.labels)] = torch.tensor(e.labels)
    ens = EnsembleLM(peft_model, ["m0"], torch.zeros(1), trainable=False)
    with torch.no_grad():
        reference = ens(batch["input_ids"], batch["attention_mask"], labels).logp[0]
        mine = full.loglik(full.theta, batch)
    cut = AdapterObjective(peft_model, examples[:4], "m0", layers=1, batch_size=4)
    assert cut.first_layer == 1 and len(cut.decoder.layers) == 1
    assert cut.theta.numel() * 2 == full.theta.numel()  # q/v LoRA of one of two layers
    with torch.no_grad():
        truncated = cut.loglik(cut.theta, cut.batches[0])
    assert torch.allclose(mine, reference, atol=1e-4)
    assert torch.allclose(truncated, reference, atol=1e-4)


def test_indefinite_direction_stops_the_expansion_not_the_estimate() -> None:
    """V = [[n, a], [a, −b]]: positive on span(G) = e₀, indefinite once the residual adds e₁."""
    x = torch.tensor([2.0, -2.0] * 5, dtype=torch.float64)
    n, a, b = 10, 3.0, 1.0

    def loglik(t: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        return -((xs - t[0]) ** 2) / 2 - a * t[0] * t[1] / n + b * t[1] ** 2 / (2 * n)

    obj = FunctionalObjective(loglik, torch.zeros(2, dtype=torch.float64), [x])
    result = estimate(obj, rank=1, iterations=3)
    assert result.lambda_max == pytest.approx(4.0)  # c² on the positive-definite subspace
    assert not result.converged and result.subspace_dim == 1
    assert result.stop_reason == "V not positive definite along the next Davidson direction"


def contradiction(tokens: int, tied: bool, n: int = 20) -> FunctionalObjective:
    """Half the examples answer with `tokens` copies of token 1, half with token 0; one
    parameter, the log-odds θ of token 1. ``tied``: the model decides at the first token
    and copies it (an autoregressive model can represent the 50/50 mixture of answers);
    otherwise every token is drawn on its own (it cannot). MLE θ* = 0 either way."""
    y = torch.tensor([i % 2 for i in range(n)], dtype=torch.float64)

    def loglik(theta: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        per_token = ys * theta[0] - torch.nn.functional.softplus(theta[0])
        return per_token if tied else tokens * per_token

    return FunctionalObjective(loglik, torch.zeros(1, dtype=torch.float64), [y[:8], y[8:]])


@pytest.mark.parametrize("tokens", [1, 4, 16])
def test_a_contradiction_the_model_can_represent_is_stable(tokens: int) -> None:
    """Contradictory answers alone do not move α*: with the choice tied to the first token,
    V = J = n/4 and λ = 1 whatever the answer length. A model that cannot tie the tokens
    gets V = nT/4, J = nT²/4: λ = T, growing with the answer's length — which is why long
    examples dominate λ_max on real data (docs/stability.md)."""
    assert estimate(contradiction(tokens, tied=True)).lambda_max == pytest.approx(1.0, rel=1e-9)
    untied = estimate(contradiction(tokens, tied=False))
    assert untied.lambda_max == pytest.approx(float(tokens), rel=1e-9)


@pytest.mark.parametrize("tokens", [1, 4, 16])
def test_the_per_token_criterion_removes_the_length_factor(tokens: int) -> None:
    """With J = Σ g_i g_iᵀ / T_i (the objective of --normalize-by-length) the toy above gives
    λ = 1/T for the tied model and λ = 1 for the untied one: T no longer multiplies λ."""
    weights = per_token_weights([tokens] * 20)
    tied = estimate(contradiction(tokens, tied=True), weights=weights)
    untied = estimate(contradiction(tokens, tied=False), weights=weights)
    assert tied.lambda_max == pytest.approx(1.0 / tokens, rel=1e-9)
    assert untied.lambda_max == pytest.approx(1.0, rel=1e-9)


def test_weighted_pencil_matches_explicit_matrices() -> None:
    """estimate(weights=c) = the dense pencil (Gᵀ diag(c) G, V); loadings are those of √c_i g_i."""
    objective, v, _, g = logistic_problem()
    c = np.random.default_rng(3).uniform(0.05, 2.0, size=g.shape[0])
    exact = explicit_pencil(g.T @ (c[:, None] * g), v)
    result = estimate(objective, rank=1, iterations=10, tol=1e-10, weights=c)
    assert result.converged
    assert result.lambda_max == pytest.approx(exact[0], rel=1e-9)
    assert float((result.loadings**2).sum()) == pytest.approx(result.lambda_max, rel=1e-9)
    unweighted = estimate(objective, rank=1, iterations=10, tol=1e-10)
    assert result.lambda_max != pytest.approx(unweighted.lambda_max, rel=1e-3)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (np.ones(5), "must be 20 finite values"),
        (np.r_[np.ones(19), -1.0], "must be 20 finite values"),
        (np.r_[np.ones(19), np.nan], "must be 20 finite values"),
    ],
)
def test_bad_weights_are_refused(weights: np.ndarray, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        estimate(contradiction(4, tied=True), weights=weights)


def test_per_token_weights_need_a_token() -> None:
    assert per_token_weights([1, 4]).tolist() == [1.0, 0.25]
    with pytest.raises(ConfigError, match="at least one completion token"):
        per_token_weights([3, 0])


# ----------------------------------------------------------------------- cross-fitting


def well_specified_logistic(d: int, n: int, seed: int = 0, batch: int = 20):  # type: ignore[no-untyped-def]
    """Labels drawn from a logistic model, fitted by Newton: the population λ_max is 1."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = 0.5 * torch.randn(d, generator=gen, dtype=torch.float64)
    y = (torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(x @ w)).double()

    def loglik(theta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        z = x[idx] @ theta
        return y[idx] * z - torch.nn.functional.softplus(z)

    theta = torch.zeros(d, dtype=torch.float64)
    for _ in range(50):
        p = torch.sigmoid(x @ theta)
        hess = (x * (p * (1 - p))[:, None]).T @ x
        theta = theta + torch.linalg.solve(hess, x.T @ (y - p))
    p = torch.sigmoid(x @ theta)
    h = (p * (1 - p)).numpy()
    g = (x * (y - p)[:, None]).numpy()
    batches = [torch.arange(s, min(s + batch, n)) for s in range(0, n, batch)]
    return FunctionalObjective(loglik, theta, batches), x.numpy(), h, g


def _brute_force_cross_fit(x: np.ndarray, h: np.ndarray, g: np.ndarray, batch: int, top: int):  # type: ignore[no-untyped-def]
    """The (find, choose, measure) procedure with dense fold pencils: fold of batch b = b % 3."""
    n = len(g)
    fold = (np.arange(n) // batch) % 3
    jm = [g[fold == f].T @ g[fold == f] for f in range(3)]
    vm = [(x[fold == f] * h[fold == f][:, None]).T @ x[fold == f] for f in range(3)]
    values, best, by_rank = [], {}, []
    for f in range(3):
        _, vec = solve_pencil(jm[f], vm[f])
        cand = vec[:, :top]
        q = {
            e: np.diag(cand.T @ jm[e] @ cand) / np.diag(cand.T @ vm[e] @ cand)
            for e in range(3)
            if e != f
        }
        others = [e for e in range(3) if e != f]
        j_rest, v_rest = sum(jm[e] for e in others), sum(vm[e] for e in others)
        by_rank.append(np.diag(cand.T @ j_rest @ cand) / np.diag(cand.T @ v_rest @ cand))
        for s in q:
            k = int(np.argmax(q[s]))
            for e in q:
                if e != s:
                    values.append(q[e][k])
                    best[e] = max(best.get(e, 0.0), q[e][k])
    return float(np.mean(values)), best, fold, by_rank


def test_cross_fit_against_brute_force() -> None:
    """With the full fold subspace (rank = d) every step is the dense computation."""
    objective, x, h, g = well_specified_logistic(d=10, n=300, batch=20)
    result = cross_fit(objective, rank=10, iterations=0, top=10)
    expected, best, fold, by_rank = _brute_force_cross_fit(x, h, g, batch=20, top=10)
    assert result.lambda_max == pytest.approx(expected, rel=1e-8)
    assert result.alpha_star == pytest.approx(1 / expected, rel=1e-8)
    assert len(result.history) == 6  # 3 folds: 3 · 2 · 1 ordered triples
    assert result.cross_fit is not None and result.cross_fit["fold_examples"] == [100, 100, 100]
    # each fold's loadings are those of its best measured direction (uᵀ V_e u = 1)
    for e in range(3):
        assert float((result.loadings[fold == e] ** 2).sum()) == pytest.approx(best[e], rel=1e-8)
    assert result.to_dict()["estimator"] == "cross-fitted"
    # fold f's directions in f's order, each on the other two folds together
    for f in range(3):
        assert result.cross_fit["held_out_by_rank"][f] == pytest.approx(by_rank[f], rel=1e-8)


def test_cross_fit_is_near_one_where_the_in_sample_estimate_is_inflated() -> None:
    """Well specified with P/n = 40/600: the in-sample λ_max (≈ 2.1) measures how well 40
    parameters fit 600 examples, not misspecification; the cross-fitted one is ≈ 1."""
    objective, x, h, g = well_specified_logistic(d=40, n=600)
    v = (x * h[:, None]).T @ x
    in_sample = explicit_pencil(g.T @ g, v)[0]
    assert in_sample > 1.8
    result = cross_fit(objective, rank=40, iterations=0)
    assert 0.8 < result.lambda_max < 1.3
    assert result.cross_fit is not None
    assert result.cross_fit["in_sample_lambda_max"] > 1.8  # each fold alone: more inflated


def test_cross_fit_estimates_the_population_lambda() -> None:
    """Heteroscedastic linear model (σ = 0.5 + 2|x₀|): the population pencil (E[σ²xxᵀ], E[xxᵀ])
    is diagonal with λ_max = E[σ²x₀²] = 0.25 + 4√(2/π) + 12 ≈ 15.44."""
    objective, _, _, _ = linear_problem(d=8, n=3000)
    population = 0.25 + 4 * math.sqrt(2 / math.pi) + 12
    result = cross_fit(objective, rank=8, iterations=0)
    assert result.lambda_max == pytest.approx(population, rel=0.1)
    assert result.alpha_star < 0.1  # clearly misspecified


def shifted_linear_problem(
    d: int = 8, n: int = 3000, shift: float = 1.0, seed: int = 0
) -> tuple[FunctionalObjective, np.ndarray]:
    """Well-specified least squares (x ~ N(0, I), unit noise) at θ = β + δ, |δ| = ``shift``:
    not the optimum. g_i = x_i(ε_i − x_iᵀδ), V = XᵀX ≈ nI; per example E[g gᵀ] =
    (1 + |δ|²)I + 2δδᵀ and E[g] = −δ, so λ_max is 1 + 3|δ|² uncentred, 1 + 2|δ|² centred."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    beta = torch.linspace(-1, 1, d, dtype=torch.float64)
    y = x @ beta + torch.randn(n, generator=gen, dtype=torch.float64)
    delta = torch.zeros(d, dtype=torch.float64)
    delta[1] = shift

    def loglik(theta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return -0.5 * (y[idx] - x[idx] @ theta) ** 2

    batches = [torch.arange(s, min(s + 100, n)) for s in range(0, n, 100)]
    return FunctionalObjective(loglik, beta + delta, batches), x.numpy()


@pytest.mark.parametrize("shift", [0.0, 1.0])
def test_centering_leaves_out_the_mean_descent_direction(shift: float) -> None:
    objective, x = shifted_linear_problem(shift=shift)
    plain = cross_fit(objective, rank=8, iterations=0)
    centred = cross_fit(objective, rank=8, iterations=0, center=True)
    assert plain.lambda_max == pytest.approx(1 + 3 * shift**2, rel=0.1)
    # 4th moments of x: n = 3000 leaves ±7 % of sampling noise (2.67–2.92 over 3 seeds)
    assert centred.lambda_max == pytest.approx(1 + 2 * shift**2, rel=0.15)
    assert centred.mean_gradient_share < 0.01 < plain.mean_gradient_share or shift == 0
    in_sample = estimate(objective, rank=8, iterations=0, center=True)
    g = objective.example_grads().numpy()
    g_c = g - g.mean(0)
    v = x.T @ x  # the Hessian of the summed NLL
    assert in_sample.lambda_max == pytest.approx(explicit_pencil(g_c.T @ g_c, v)[0], rel=1e-9)


def test_center_rows_uses_each_groups_weighted_mean() -> None:
    g = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [-1.0, 1.0]], dtype=torch.float64)
    w = np.array([1.0, 3.0, 1.0, 2.0])
    out = center_rows(g, [torch.tensor([0, 1]), torch.tensor([2, 3])], w)
    # group 1: mean (1·[1,0] + 3·[3,2]) / 4 = [2.5, 1.5]; group 2: ([5,4] + 2·[-1,1]) / 3 = [1, 2]
    expected = [[-1.5, -1.5], [0.5, 0.5], [4.0, 2.0], [-2.0, -1.0]]
    assert torch.allclose(out, torch.tensor(expected, dtype=torch.float64))


def test_cross_fit_is_deterministic_and_uses_one_pass_per_direction() -> None:
    objective, _, _, _ = well_specified_logistic(d=6, n=240)
    a = cross_fit(objective, rank=3, iterations=2)
    b = cross_fit(objective, rank=3, iterations=2)
    assert a.lambda_max == b.lambda_max and a.history == b.history
    assert np.array_equal(a.loadings, b.loadings)
    assert a.hvps == sum(r["subspace_dim"] for r in a.cross_fit["fold_runs"])  # type: ignore[index]


def test_hvp_batches_sum_to_the_hvp() -> None:
    objective, _, _, _ = linear_problem()
    v = torch.linspace(-1, 1, 8, dtype=torch.float64)
    per_batch = objective.hvp_batches(v)
    assert per_batch.shape == (4, 8) and objective.batch_sizes() == [100] * 4
    assert torch.allclose(per_batch.sum(0), objective.hvp(v))


@pytest.mark.parametrize(
    ("kwargs", "batch", "message"),
    [
        ({"folds": 2}, 20, "--folds must be >= 3"),
        ({}, 100, "needs at least 3 batches, got 2: lower --batch-size"),
        ({"min_examples": 30}, 20, "a fold has only 20 examples"),
    ],
)
def test_cross_fit_bad_input(kwargs: dict, batch: int, message: str) -> None:
    objective, _, _, _ = well_specified_logistic(d=4, n=60 if batch == 20 else 200, batch=batch)
    with pytest.raises(ConfigError, match=re.escape(message)):
        cross_fit(objective, **kwargs)


def test_recommend_is_one_member_when_alpha_star_is_at_least_one() -> None:
    """A cross-fitted spectrum lists held-out quotients by rank; one can exceed the chosen
    λ_max (0.71 with a 1.22 in the list on sft_conflict): no spread is recommended then."""
    result = StabilityResult(
        lambda_max=0.71,
        alpha_star=1 / 0.71,
        eigenvalues=[1.22, 0.91],
        loadings=np.ones(10),
        n_examples=10,
        n_params=4,
        subspace_dim=2,
        hvps=2,
        iterations=0,
        converged=True,
        residual=0.0,
        estimator="cross-fitted",
    )
    rec = recommend(result)
    assert rec["members"] == 1 and rec["unstable_directions"] == 0 and rec["alpha"] == 1.0
