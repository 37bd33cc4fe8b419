"""Scaling-law fits: L(x) = E + A / x^alpha in one size, and L(N, D) = E + A / N^alpha + B / D^beta.

The recipe is Hoffmann et al. 2022 (Chinchilla, arXiv 2203.15556), approach 3: minimise a Huber loss of
the log-loss residuals (robust to the odd diverged or under-trained run, and every size weighs the same
whatever its loss), with L-BFGS-B from a grid of starting points, keeping the best; E = exp(e) and
A = exp(a), so the prediction log L = logsumexp(a - alpha log x, e) is stable and E, A stay positive.
E may be fixed, e.g. to the Bayes-optimal loss that GSSM evaluations report, to compare with the fitted one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

HUBER_DELTA = 1e-3  # the paper's: small enough that the fit is nearly a least-absolute-deviation one
LBFGS = {"maxiter": 20_000, "ftol": 1e-15, "gtol": 1e-12}  # tight: log-loss residuals are ~1e-3 here
ALPHA_STARTS = (0.1, 0.3, 0.6, 1.0, 2.0)  # exponents tried as starting points
E_STARTS = np.array([0.0, 0.5, 0.9, 0.99])  # fractions of min(loss) tried as starting E when E is free


@dataclass(frozen=True)
class PowerLaw:
    E: float
    A: float
    alpha: float
    E_fixed: bool  # E was given (e.g. the Bayes loss), not fitted

    def predict(self, x) -> np.ndarray:
        return self.E + self.A * np.asarray(x, dtype=float) ** -self.alpha


@dataclass(frozen=True)
class Chinchilla:
    E: float
    A: float
    alpha: float
    B: float
    beta: float
    E_fixed: bool

    def predict(self, N, D) -> np.ndarray:
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A * N**-self.alpha + self.B * D**-self.beta


@dataclass(frozen=True)
class Holdout:
    x: float  # the held-out (largest) size
    predicted: float  # by the fit on the smaller sizes
    observed: float  # the mean loss at that size
    relative_error: float  # (predicted - observed) / observed


@dataclass(frozen=True)
class Bootstrap:
    """(low, high) percentiles of each parameter over `n_fits` refits on resampled points."""

    E: tuple[float, float]
    A: tuple[float, float]
    alpha: tuple[float, float]
    n_fits: int


def _check(sizes: list[np.ndarray], loss, E: float | None, names: list[str]) -> np.ndarray:
    loss = np.asarray(loss, dtype=float)
    for x, name in zip(sizes, names):
        if x.ndim != 1 or x.shape != loss.shape:
            raise ValueError(
                f"{name} and loss must be 1-D of the same length, got {x.shape} and {loss.shape}"
            )
        if not (np.isfinite(x).all() and (x > 0).all()):
            raise ValueError(f"every {name} must be finite and > 0 (sizes enter as log {name})")
        if len(np.unique(x)) < 3:
            raise ValueError(
                f"need at least 3 distinct {name} values to fit a power law, got {len(np.unique(x))}"
            )
    if not (np.isfinite(loss).all() and (loss > 0).all()):
        raise ValueError("every loss must be finite and > 0 (the fit is on log loss)")
    if E is not None and not (0 <= E < loss.min()):
        raise ValueError(f"every loss must exceed the fixed E = {E} (min loss {loss.min():.6g}), and E >= 0")
    return loss


def _grid(log_x: np.ndarray, loss: np.ndarray, E: float | None) -> list[np.ndarray]:
    """Starting points [a_1..a_k, alpha_1..alpha_k(, e)]: every exponent and E in the grid, and each a_j
    from a least-squares guess that gives the k terms equal shares of the reducible loss."""
    k, starts = len(log_x), []
    e_starts = [E] if E is not None else E_STARTS * loss.min()
    for E0, *alphas in itertools.product(e_starts, *[ALPHA_STARTS] * k):
        share = np.log((loss - E0) / k)
        a = [np.mean(share + alpha * row) for alpha, row in zip(alphas, log_x)]
        e = [] if E is not None else [np.log(max(E0, 1e-8 * loss.min()))]  # E0 < min(loss): within bounds
        starts.append(np.array([*a, *alphas, *e]))
    return starts


def _fit(log_x, loss, E: float | None, delta: float, extra=(), n_starts: int = 0) -> np.ndarray:
    """The best [a_1..a_k, alpha_1..alpha_k, e] for log L = logsumexp(a_j - alpha_j log x_j, e), x_j the
    k size variables (the rows of log_x), by L-BFGS-B from every start of the grid and `extra`, or only
    from the `n_starts` of them with the lowest objective (a bootstrap's refits: 20x cheaper)."""
    from .extras import require

    minimize = require("scipy.optimize", "scaling", "scaling-law fits").minimize

    k, log_loss = len(log_x), np.log(loss)
    fixed_e = None if E is None else (np.log(E) if E > 0 else -np.inf)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, alpha = theta[:k, None], theta[k : 2 * k, None]
        e = theta[-1] if fixed_e is None else fixed_e
        terms = np.vstack([a - alpha * log_x, np.full(log_x.shape[1], e)])
        top = terms.max(0)
        weights = np.exp(terms - top)
        total = weights.sum(0)
        r = top + np.log(total) - log_loss  # residuals of log L
        weights /= total  # d r / d term
        huber = np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
        g = np.clip(r, -delta, delta)  # huber'(r)
        grad = [weights[:k] @ g, -(weights[:k] * log_x) @ g, [weights[-1] @ g] if fixed_e is None else []]
        return huber.sum(), np.concatenate(grad)

    # exponents >= 0 (loss falls with size); E <= min(loss), the rest of the loss being A x^-alpha > 0
    bounds = [(None, None)] * k + [(0.0, None)] * k + ([(None, log_loss.min())] if fixed_e is None else [])
    starts = [*extra, *_grid(log_x, loss, E)]
    if n_starts:
        starts = sorted(starts, key=lambda x0: objective(x0)[0])[:n_starts]
    fit = dict(jac=True, method="L-BFGS-B", bounds=bounds, options=LBFGS)
    results = [minimize(objective, x0, **fit) for x0 in starts]
    best = min(results, key=lambda result: result.fun).x
    return best if fixed_e is None else np.append(best, fixed_e)


def fit_power_law(x, loss, E: float | None = None, delta: float = HUBER_DELTA) -> PowerLaw:
    """L(x) = E + A x^-alpha; E fitted (in [0, min(loss)]) when None, else fixed to it."""
    x = np.asarray(x, dtype=float)
    loss = _check([x], loss, E, ["x"])
    a, alpha, e = _fit(np.log(x)[None], loss, E, delta)
    return PowerLaw(
        E=float(np.exp(e)) if E is None else float(E),
        A=float(np.exp(a)),
        alpha=float(alpha),
        E_fixed=E is not None,
    )


def fit_chinchilla(N, D, loss, E: float | None = None, delta: float = HUBER_DELTA) -> Chinchilla:
    """L(N, D) = E + A N^-alpha + B D^-beta. Both N and D must take at least 3 values: with only one
    varying, E and the other term are one constant and cannot be told apart."""
    N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
    loss = _check([N, D], loss, E, ["N", "D"])
    a, b, alpha, beta, e = _fit(np.log(np.vstack([N, D])), loss, E, delta)
    E_value = float(np.exp(e)) if E is None else float(E)
    return Chinchilla(E_value, float(np.exp(a)), float(alpha), float(np.exp(b)), float(beta), E is not None)


def holdout_error(x, loss, E: float | None = None) -> Holdout:
    """Extrapolation check: fit on every size but the largest, predict the largest. A law that cannot
    predict one size ahead is not worth extrapolating further."""
    x, loss = np.asarray(x, dtype=float), np.asarray(loss, dtype=float)
    if x.shape != loss.shape or x.ndim != 1:
        raise ValueError(f"x and loss must be 1-D of the same length, got {x.shape} and {loss.shape}")
    if len(np.unique(x)) < 4:
        raise ValueError(
            f"need at least 4 distinct x values (3 to fit, 1 to predict), got {len(np.unique(x))}"
        )
    largest = x == x.max()
    fit = fit_power_law(x[~largest], loss[~largest], E)
    predicted, observed = float(fit.predict(x.max())), float(loss[largest].mean())
    return Holdout(float(x.max()), predicted, observed, (predicted - observed) / observed)


def bootstrap(
    x, loss, E: float | None = None, n: int = 200, seed: int = 0, q=(5, 95), delta: float = HUBER_DELTA
) -> Bootstrap:
    """Percentile intervals of E, A and alpha over refits on points resampled with replacement: how much
    the exponent owes to the particular runs. Resamples with fewer than 3 distinct sizes are skipped."""
    x = np.asarray(x, dtype=float)
    loss = _check([x], loss, E, ["x"])
    log_x = np.log(x)[None]
    full = _fit(log_x, loss, E, delta)
    rng = np.random.default_rng(seed)
    fits = []
    for _ in range(n):
        i = rng.integers(0, len(x), len(x))
        if len(np.unique(x[i])) >= 3:  # the full fit and the grid's 5 best starts, as good as all of them
            fits.append(
                _fit(log_x[:, i], loss[i], E, delta, extra=[full[: 3 if E is None else 2]], n_starts=6)
            )
    if not fits:
        raise ValueError("no resample had 3 distinct sizes: too few points to bootstrap")

    def interval(values) -> tuple[float, float]:
        lo, hi = np.percentile(values, q)
        return float(lo), float(hi)

    a, alpha, e = np.array(fits).T
    return Bootstrap(E=interval(np.exp(e)), A=interval(np.exp(a)), alpha=interval(alpha), n_fits=len(fits))
