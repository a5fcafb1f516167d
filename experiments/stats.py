"""The statistics of an experiment's results: each variant against the control.

Fixed-horizon tests (read once, when the minimum sample is reached):
  * rates (error rate, positive-feedback rate): the two-proportion z-test with the pooled
    proportion under H0, two-sided; the confidence interval of the difference (variant − control)
    with the unpooled (Wald) standard error;
  * means (latency, cost per request): Welch's t-test (scipy.stats.ttest_ind, equal_var=False),
    two-sided, and its confidence interval of the difference of means (Welch–Satterthwaite df).

Always-valid p-value (operators look every day; a fixed-horizon p-value read repeatedly is
too optimistic): the mixture sequential probability ratio test (mSPRT) of Johari, Pekelis and
Walsh, "Always Valid Inference" (2017/2022), for the difference of two means with a normal
mixture N(0, τ²) over the effect:

    Λ = sqrt(V / (V + τ²)) · exp(τ² Δ² / (2 V (V + τ²))),   p = min(1, 1 / Λ)

where Δ is the observed difference and V = s₁²/n₁ + s₂²/n₂ its variance (for rates, the pooled
p(1−p)(1/n₁ + 1/n₂): the variance under H0).
By Ville's inequality, P(1/Λ ever ≤ α under H0) ≤ α: rejecting whenever p ≤ α, however often
the results are looked at, keeps the false-positive rate at α (σ² plugged in from the data:
approximate for small samples). τ² is set to V at the minimum sample (the variances over
min_sample per arm): the test is most powerful for effects about the size a fixed test of that
sample could detect.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

from scipy import stats as sps

CONFIDENCE = 0.95


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def msprt_p_value(diff: float, variance: float, tau2: float) -> float | None:
    """The always-valid p-value of H0: difference 0, given the difference, its variance and the
    mixture variance τ²."""
    if not (variance > 0 and tau2 > 0) or not math.isfinite(diff):
        return None
    log_lambda = 0.5 * math.log(variance / (variance + tau2)) + tau2 * diff * diff / (2 * variance * (variance + tau2))
    if log_lambda <= 0:
        return 1.0
    return float(min(1.0, math.exp(-log_lambda)))


def two_proportions(x_variant: int, n_variant: int, x_control: int, n_control: int, *,
                    min_sample: int, confidence: float = CONFIDENCE) -> dict:
    """Variant against control for a rate: difference, z, two-sided p, CI, always-valid p."""
    out = {"test": "two_proportion_z", "difference": None, "z": None, "p_value": None, "ci_low": None,
           "ci_high": None, "sequential_p_value": None}
    if n_variant < 1 or n_control < 1:
        return out
    p1, p2 = x_variant / n_variant, x_control / n_control
    diff = p1 - p2
    out["difference"] = diff
    pooled = (x_variant + x_control) / (n_variant + n_control)
    se0 = math.sqrt(pooled * (1 - pooled) * (1 / n_variant + 1 / n_control))
    if se0 > 0:
        z = diff / se0
        out["z"] = z
        out["p_value"] = float(2 * sps.norm.sf(abs(z)))
    elif n_variant and n_control:
        out["z"], out["p_value"] = 0.0, 1.0  # both rates 0 (or both 1): no difference to see
    # Sequential: the difference's variance under H0 (the pooled rate), so that a split as clear
    # as 100 % against 0 % still has one; τ² as for means, that variance at min_sample per arm.
    out["sequential_p_value"] = msprt_p_value(diff, se0 * se0, 2 * pooled * (1 - pooled) / min_sample)
    variance = p1 * (1 - p1) / n_variant + p2 * (1 - p2) / n_control
    if variance > 0:
        half = sps.norm.ppf(0.5 + confidence / 2) * math.sqrt(variance)
        out["ci_low"], out["ci_high"] = diff - half, diff + half
    return {k: _finite(v) if isinstance(v, float) else v for k, v in out.items()}


def welch(variant: Sequence[float], control: Sequence[float], *, min_sample: int,
          confidence: float = CONFIDENCE) -> dict:
    """Variant against control for a mean: Welch's t-test, CI of the difference, always-valid p."""
    out = {"test": "welch_t", "difference": None, "t": None, "df": None, "p_value": None, "ci_low": None,
           "ci_high": None, "sequential_p_value": None}
    n1, n2 = len(variant), len(control)
    if n1 < 1 or n2 < 1:
        return out
    m1, m2 = sum(variant) / n1, sum(control) / n2
    out["difference"] = m1 - m2
    if n1 < 2 or n2 < 2:
        return out
    v1 = sum((x - m1) ** 2 for x in variant) / (n1 - 1)
    v2 = sum((x - m2) ** 2 for x in control) / (n2 - 1)
    variance = v1 / n1 + v2 / n2
    if variance <= 0:
        out["t"], out["p_value"] = 0.0, (1.0 if m1 == m2 else 0.0)
        return out
    with warnings.catch_warnings():  # nearly equal samples: scipy warns of precision loss, the answer stands
        warnings.simplefilter("ignore", RuntimeWarning)
        result = sps.ttest_ind(variant, control, equal_var=False)
    df = variance ** 2 / ((v1 / n1) ** 2 / (n1 - 1) + (v2 / n2) ** 2 / (n2 - 1))
    half = sps.t.ppf(0.5 + confidence / 2, df) * math.sqrt(variance)
    out.update(t=float(result.statistic), df=float(df), p_value=float(result.pvalue),
               ci_low=out["difference"] - half, ci_high=out["difference"] + half,
               sequential_p_value=msprt_p_value(out["difference"], variance, (v1 + v2) / min_sample))
    return {k: _finite(v) if isinstance(v, float) else v for k, v in out.items()}


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0–100), linear interpolation (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))
