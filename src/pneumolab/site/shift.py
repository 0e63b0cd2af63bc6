"""The statistics a site check and the drift watch share: two-sample tests and label-shift estimates.

* `ks_test`: Kolmogorov-Smirnov (scipy) on one score per film (the gate score, P(PNEUMONIA)).
* `mmd_test`: maximum mean discrepancy with a Gaussian kernel (median-heuristic bandwidth) on the gate's pooled
  features, standardised on the reference; its p-value by permutation (the kernel matrix is computed once and every
  permutation is one matrix-vector product, so 500 permutations of ~900 films take a fraction of a second).
* `em_prevalence`: Saerens, Latinne & Decaestecker (2002): re-weight the model's posteriors by the ratio of new to
  reference priors until the mean posterior is the new prior. Trusts the probabilities' calibration.
* `bbse_prevalence`: black-box shift estimation (Lipton, Wang & Smola 2018): the confusion matrix of the thresholded
  decisions on the reference, inverted against the local share of each decision. Trusts only the hard decisions'
  error rates, so when the films differ (not only their prevalence) the two estimates part, which is itself a sign.

Both estimates assume label shift (P(x | y) unchanged); `prevalence_estimates` gives them with bootstrap intervals
(scipy.stats.bootstrap over the local films) and says whether they agree.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "bbse_prevalence",
    "em_prevalence",
    "ks_test",
    "mmd_test",
    "prevalence_estimates",
]

AGREE_POINTS = 0.05  # EM and BBSE within 5 points of each other, or their intervals overlap: they agree


def ks_test(local: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Two-sample KS statistic and p-value of one score per film."""
    result = stats.ks_2samp(np.asarray(local, float), np.asarray(reference, float))
    return {"statistic": float(result.statistic), "p_value": float(result.pvalue)}


def mmd_test(local: np.ndarray, reference: np.ndarray, *, permutations: int = 500, seed: int = 0) -> dict[str, float]:
    """Gaussian-kernel MMD^2 (biased V-statistic) between two feature sets, with a permutation p-value."""
    x, y = np.asarray(local, np.float64), np.asarray(reference, np.float64)
    loc, scale = y.mean(axis=0), y.std(axis=0) + 1e-6  # standardise on the reference
    pooled = (np.concatenate([x, y]) - loc) / scale
    squared = np.sum(pooled**2, axis=1)
    distances = np.maximum(squared[:, None] + squared[None, :] - 2 * pooled @ pooled.T, 0.0)
    bandwidth = np.median(distances[np.triu_indices(len(pooled), 1)]) or 1.0
    kernel = np.exp(-distances / bandwidth)
    n, m = len(x), len(y)

    def weights(is_local: np.ndarray) -> np.ndarray:
        return np.where(is_local, 1.0 / n, -1.0 / m)

    observed = np.r_[np.ones(n, bool), np.zeros(m, bool)]
    rng = np.random.default_rng(seed)
    columns = np.stack([weights(observed)] + [weights(rng.permutation(observed)) for _ in range(permutations)], 1)
    values = np.einsum("ij,ij->j", columns, kernel @ columns)
    statistic = float(values[0])
    p_value = float((1 + np.sum(values[1:] >= statistic)) / (1 + permutations))
    return {"statistic": statistic, "p_value": p_value}


def em_prevalence(probabilities: np.ndarray, reference_prevalence: float, *, steps: int = 200) -> float:
    """P(PNEUMONIA) among the local films by EM on the model's posteriors (Saerens et al. 2002)."""
    p = np.clip(np.asarray(probabilities, float), 1e-9, 1 - 1e-9)
    prior = float(reference_prevalence)
    estimate = prior
    for _ in range(steps):
        w1, w0 = estimate / prior, (1 - estimate) / (1 - prior)
        adjusted = w1 * p / (w1 * p + w0 * (1 - p))
        new = float(adjusted.mean())
        if abs(new - estimate) < 1e-7:
            return new
        estimate = new
    return estimate


def bbse_prevalence(decisions: np.ndarray, confusion: np.ndarray) -> float:
    """P(PNEUMONIA) among the local films by black-box shift estimation (Lipton et al. 2018).

    Args:
        decisions: 0/1 decisions (the model's threshold) of the local films.
        confusion: 2 x 2 ``P(decision = i | label = j)`` on the reference films.
    """
    shares = np.array([1 - np.mean(decisions), np.mean(decisions)])
    try:
        q = np.linalg.solve(confusion, shares)
    except np.linalg.LinAlgError:
        return float("nan")
    q = np.clip(q, 0, None)
    return float(q[1] / q.sum()) if q.sum() > 0 else float("nan")


def reference_confusion(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """``P(decision = i | label = j)`` of the reference films at the model's threshold (2 x 2)."""
    labels, decided = np.asarray(labels), np.asarray(probabilities) >= threshold
    return np.array([[np.mean(~decided[labels == j]) for j in (0, 1)], [np.mean(decided[labels == j]) for j in (0, 1)]])


def prevalence_estimates(
    probabilities: np.ndarray,
    *,
    reference_labels: np.ndarray,
    reference_probabilities: np.ndarray,
    threshold: float,
    prior: float | None = None,
    resamples: int = 300,
    seed: int = 0,
) -> dict[str, Any]:
    """EM and BBSE estimates of the local P(PNEUMONIA), each with a 95 % percentile bootstrap interval over the local
    films, the reference's own prevalence, and whether the two agree (within `AGREE_POINTS` or overlapping).
    `prior` is the share of pneumonia the probabilities are calibrated to (default: the reference films' share;
    a model `site calibrate` moved to its site's prevalence says so in its card)."""
    p = np.asarray(probabilities, float)
    prior = float(np.mean(reference_labels)) if prior is None else float(prior)
    confusion = reference_confusion(reference_labels, reference_probabilities, threshold)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"reference": prior}
    statistics = {
        "em": lambda x: em_prevalence(x, prior),
        "bbse": lambda x: bbse_prevalence(x >= threshold, confusion),
    }
    for name, statistic in statistics.items():
        point = statistic(p)
        interval: list[float] | None = None  # JSON has no NaN: no interval is None
        if resamples and len(p) > 1 and np.ptp(p) > 0:
            boot = stats.bootstrap(
                (p,), statistic, n_resamples=resamples, method="percentile", vectorized=False, random_state=rng
            )
            interval = [float(boot.confidence_interval.low), float(boot.confidence_interval.high)]
        out[name] = {"estimate": point, "ci95": interval}
    em, bbse = out["em"], out["bbse"]
    overlap = bool(em["ci95"] and bbse["ci95"]) and (
        em["ci95"][0] <= bbse["ci95"][1] and bbse["ci95"][0] <= em["ci95"][1]
    )
    out["agree"] = bool(abs(em["estimate"] - bbse["estimate"]) <= AGREE_POINTS or overlap)
    return out
