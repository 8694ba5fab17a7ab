"""ensemble/density.py against the explicit formula, limits and a distributional check."""

from __future__ import annotations

import numpy as np
import pytest

from ensemble.density import fit_gaussian


def _explicit(ref: np.ndarray, x: np.ndarray, s: float) -> np.ndarray:
    mu = ref.mean(0)
    cov = np.cov(ref.T)
    sig = (1 - s) * cov + s * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    inv = np.linalg.inv(sig)
    return np.array([(v - mu) @ inv @ (v - mu) for v in x])


@pytest.mark.parametrize(("n", "d", "s"), [(50, 5, 0.1), (8, 20, 0.5), (200, 3, 1e-6)])
def test_matches_the_explicit_inverse(n: int, d: int, s: float) -> None:
    rng = np.random.default_rng(n + d)
    ref = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))  # correlated coordinates
    x = rng.normal(size=(7, d)) * 2
    got = fit_gaussian(ref, s).distance(x)
    np.testing.assert_allclose(got, _explicit(ref, x, s), rtol=1e-8)
    assert fit_gaussian(ref, s).distance(x[0]) == pytest.approx(got[0], rel=1e-12)  # one vector


def test_full_shrinkage_is_scaled_euclidean() -> None:
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(30, 4)) * np.array([1.0, 2.0, 3.0, 4.0])
    x = rng.normal(size=(5, 4))
    scale = np.trace(np.cov(ref.T)) / 4
    want = ((x - ref.mean(0)) ** 2).sum(1) / scale
    np.testing.assert_allclose(fit_gaussian(ref, 1.0).distance(x), want, rtol=1e-10)


def test_in_distribution_distances_follow_chi_square() -> None:
    """Fresh draws from the reference's own Gaussian: D ~ χ²_d (mean d, variance 2d)."""
    rng = np.random.default_rng(2)
    d = 6
    a = rng.normal(size=(d, d))
    ref = rng.normal(size=(20000, d)) @ a
    fresh = rng.normal(size=(20000, d)) @ a
    dist = fit_gaussian(ref, 1e-9).distance(fresh)
    assert dist.mean() == pytest.approx(d, rel=0.03)
    assert dist.var() == pytest.approx(2 * d, rel=0.08)
    # shifting z by 3 e_0 (x = z a) adds 3² = 9 to every expected distance
    shifted = fit_gaussian(ref, 1e-9).distance(fresh + 3 * a[0])
    assert shifted.mean() == pytest.approx(d + 9, rel=0.03)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="n >= 2"):
        fit_gaussian(np.ones((1, 3)))
    with pytest.raises(ValueError, match="shrinkage"):
        fit_gaussian(np.random.default_rng(0).normal(size=(5, 3)), 0.0)
    with pytest.raises(ValueError, match="identical"):
        fit_gaussian(np.ones((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        fit_gaussian(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="dimension"):
        fit_gaussian(np.random.default_rng(0).normal(size=(5, 3))).distance(np.ones(4))


def test_reference_survives_a_round_trip_through_its_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ensemble.density import load_reference, reference_bytes

    x = np.random.default_rng(3).normal(size=(30, 5))
    ref = fit_gaussian(x, 0.2)
    path = tmp_path / "r.npz"
    path.write_bytes(reference_bytes(ref))
    back = load_reference(path)
    assert (back.shrinkage, back.n) == (0.2, 30)
    probe = np.random.default_rng(4).normal(size=(7, 5))
    np.testing.assert_array_equal(back.distance(probe), ref.distance(probe))


def test_a_malformed_reference_file_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ensemble.density import load_reference

    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="is not a prompt-distance reference"):
        load_reference(bad)
    np.savez(tmp_path / "shape.npz", mean=np.zeros(3), whiten=np.eye(2), shrinkage=0.1, n=4)
    with pytest.raises(ValueError, match="do not match"):
        load_reference(tmp_path / "shape.npz")


def test_user_span_pooling_is_the_mean_of_those_rows() -> None:
    from ensemble.density import pool_user_span

    h = np.arange(20.0).reshape(5, 4)
    np.testing.assert_array_equal(pool_user_span(h, (1, 4)), h[1:4].sum(0) / 3)
    for bad in [(3, 3), (0, 6), (-1, 2)]:
        with pytest.raises(ValueError, match="cannot pool span"):
            pool_user_span(h, bad)
