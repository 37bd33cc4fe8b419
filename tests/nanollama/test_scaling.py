"""Scaling-law fits recover the parameters of synthetic power laws, and refuse input they cannot fit."""

from __future__ import annotations

import numpy as np
import pytest

from src.nanollama import scaling
from src.nanollama.scaling import bootstrap, fit_chinchilla, fit_power_law, holdout_error

E, A, ALPHA = 1.2, 5.0, 0.4
X = 2.0 ** np.arange(4, 16)  # 12 sizes over 3.6 decades


def law(x):
    return E + A * x**-ALPHA


def noisy(loss, seed: int, noise: float = 0.01):
    """Multiplicative noise: every run's loss off by about `noise` of itself."""
    return loss * np.exp(noise * np.random.default_rng(seed).standard_normal(np.shape(loss)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_power_law_recovers_known_parameters_with_E_free_and_fixed(seed):
    loss = noisy(law(X), seed)
    free = fit_power_law(X, loss)
    assert not free.E_fixed
    assert free.E == pytest.approx(E, abs=0.06)
    assert free.alpha == pytest.approx(ALPHA, abs=0.04)
    assert free.A == pytest.approx(A, rel=0.15)
    fixed = fit_power_law(X, loss, E=E)
    assert fixed.E_fixed and fixed.E == E
    # knowing the floor removes the E-alpha trade-off: the exponent and amplitude come out tighter
    assert fixed.alpha == pytest.approx(ALPHA, abs=0.015)
    assert fixed.A == pytest.approx(A, rel=0.05)
    np.testing.assert_allclose(fixed.predict(X), law(X), rtol=0.01)


def test_fixing_E_to_the_truth_tightens_the_exponent_and_amplitude():
    free, fixed = [], []
    for seed in range(16):
        loss = noisy(law(X), seed)
        free.append(fit_power_law(X, loss))
        fixed.append(fit_power_law(X, loss, E=E))

    def rms(fits, name, truth):
        return np.sqrt(np.mean([(getattr(f, name) - truth) ** 2 for f in fits]))

    assert rms(fixed, "alpha", ALPHA) < 0.7 * rms(free, "alpha", ALPHA)  # about half
    assert rms(fixed, "A", A) < rms(free, "A", A)


def test_power_law_is_exact_on_clean_data_and_E_stays_below_the_losses():
    fit = fit_power_law(X, law(X))
    assert (fit.E, fit.A, fit.alpha) == pytest.approx((E, A, ALPHA), rel=1e-3)
    # no floor in sight (a pure power law): E is pushed to 0 and never above the smallest loss
    pure = fit_power_law(X, 3.0 * X**-0.5)
    assert 0 <= pure.E < 1e-3 and pure.alpha == pytest.approx(0.5, abs=0.01)
    # a floor below the fixed-E fit's losses but far from the truth still fits (badly), without error
    assert fit_power_law(X, law(X), E=0.0).alpha < ALPHA


def test_huber_fit_ignores_an_outlier():
    loss = law(X)
    loss[5] *= 1.3  # one diverged run
    fit = fit_power_law(X, loss)
    assert (fit.E, fit.alpha) == pytest.approx((E, ALPHA), rel=0.01)


def test_chinchilla_recovers_E_and_both_exponents_on_a_noisy_grid():
    N, D = (v.ravel() for v in np.meshgrid(2.0 ** np.arange(4, 17, 2), 2.0 ** np.arange(4, 17, 2)))
    truth = dict(E=1.2, A=5.0, alpha=0.4, B=3.0, beta=0.3)
    clean = truth["E"] + truth["A"] * N ** -truth["alpha"] + truth["B"] * D ** -truth["beta"]
    fit = fit_chinchilla(N, D, noisy(clean, seed=0))
    assert fit.E == pytest.approx(1.2, abs=0.08)
    assert fit.alpha == pytest.approx(0.4, abs=0.03) and fit.beta == pytest.approx(0.3, abs=0.03)
    fixed = fit_chinchilla(N, D, noisy(clean, seed=0), E=1.2)
    assert fixed.alpha == pytest.approx(0.4, abs=0.02) and fixed.beta == pytest.approx(0.3, abs=0.02)
    np.testing.assert_allclose(fixed.predict(N, D), clean, rtol=0.01)


def test_holdout_predicts_the_largest_size_on_clean_data():
    for E_fixed in (None, E):
        out = holdout_error(X, law(X), E=E_fixed)
        assert out.x == X.max() and out.observed == pytest.approx(law(X.max()))
        assert abs(out.relative_error) < 1e-4
    # repeats at the largest size are all held out, and their mean is what is predicted
    x, loss = np.append(X, X.max()), np.append(law(X), law(X.max()) * 1.02)
    out = holdout_error(x, loss, E=E)
    assert out.observed == pytest.approx(law(X.max()) * 1.01)
    assert out.relative_error == pytest.approx(1 / 1.01 - 1, abs=1e-4)


def test_holdout_error_flags_a_wrong_law():
    # a loss that bends down at the largest size is not predicted by the smaller ones
    loss = law(X)
    loss[-1] *= 0.9
    assert holdout_error(X, loss).relative_error == pytest.approx(1 / 0.9 - 1, rel=0.05)


def test_bootstrap_interval_contains_the_true_exponent():
    loss = noisy(law(X), seed=0)
    free = bootstrap(X, loss, n=100)
    assert 50 < free.n_fits <= 100
    assert free.alpha[0] < ALPHA < free.alpha[1] and free.E[0] < E < free.E[1]
    assert free.alpha[1] - free.alpha[0] < 0.15
    fixed = bootstrap(X, loss, E=E, n=100)
    assert fixed.E == (E, E) and fixed.A[0] < A < fixed.A[1]
    assert fixed.alpha[0] < ALPHA < fixed.alpha[1]
    assert fixed.alpha[1] - fixed.alpha[0] < free.alpha[1] - free.alpha[0]
    assert bootstrap(X, loss, E=E, n=20, seed=3) == bootstrap(X, loss, E=E, n=20, seed=3)


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda: fit_power_law([1, 2], [2.0, 1.5]), "at least 3 distinct x"),
        (lambda: fit_power_law([4, 4, 4, 8], [2.0, 1.9, 2.1, 1.5]), "at least 3 distinct x"),
        (lambda: fit_power_law([0, 1, 2], [3.0, 2.0, 1.5]), "x must be finite and > 0"),
        (lambda: fit_power_law([-1, 1, 2], [3.0, 2.0, 1.5]), "x must be finite and > 0"),
        (lambda: fit_power_law([1, 2, 4], [3.0, 0.0, 1.5]), "loss must be finite and > 0"),
        (lambda: fit_power_law([1, 2, 4], [3.0, np.nan, 1.5]), "loss must be finite and > 0"),
        (lambda: fit_power_law([1, 2, 4], [3.0, 2.0]), "same length"),
        (lambda: fit_power_law([1, 2, 4], [3.0, 2.0, 1.5], E=1.5), "exceed the fixed E"),
        (lambda: fit_power_law([1, 2, 4], [3.0, 2.0, 1.5], E=-0.1), "exceed the fixed E"),
        (lambda: fit_chinchilla([1, 2, 4, 8], [5, 5, 5, 5], [3.0, 2.0, 1.5, 1.2]), "3 distinct D"),
        (lambda: holdout_error([1, 2, 4], [3.0, 2.0, 1.5]), "at least 4 distinct x"),
        (lambda: bootstrap([1, 2], [3.0, 2.0]), "at least 3 distinct x"),
        (lambda: bootstrap([1, 2, 4], [3.0, 2.0, 1.5], E=2.0), "exceed the fixed E"),
    ],
)
def test_bad_input_raises_a_value_error_naming_the_problem(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()


def test_importing_the_module_does_not_import_scipy():
    import subprocess
    import sys

    code = "import sys, src.nanollama.scaling; assert 'scipy' not in sys.modules"
    from tests.conftest import ROOT

    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_the_fit_converges_from_any_start_when_the_reducible_loss_is_small(monkeypatch):
    # a GSSM-like sweep: the loss moves by ~1e-2 nats over 200x in size, so log-loss residuals are ~1e-3,
    # the Huber's linear regime; the default L-BFGS tolerances stopped each start near where it began
    N = np.array([4e3, 1.4e4, 2.7e4, 8.3e4, 2.1e5, 8e5])
    loss = 1.404 + 0.0666 * N**-0.17 + np.array([3, -2, 1, -1, 2, -3]) * 1e-5
    fits = []
    for starts in [(0.01,), (0.1, 0.3, 0.6, 1.0, 2.0), (2.0,)]:
        monkeypatch.setattr(scaling, "ALPHA_STARTS", starts)
        fits.append(scaling.fit_power_law(N, loss, E=1.404))
    assert all(abs(f.alpha - 0.17) < 0.01 for f in fits), fits
