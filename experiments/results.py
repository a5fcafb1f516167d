"""An experiment's results: figures per variant and each variant against the control.

Per variant, over the finished runs it served (agents.Run.experiment_id/variant): requests,
errors and error rate (failed or interrupted runs), latency p50/p95/mean, tokens and cost per
request (cost as billed: the runs' usage records), feedback count and positive rate. Then for
every other variant against the control (experiments.stats): error rate and positive-feedback
rate by the two-proportion z-test, latency and cost by Welch's t-test, each with its p-value,
95 % confidence interval of the difference (variant − control), its always-valid sequential
p-value, and whether both arms reached the experiment's minimum sample. Shadow runs are
summarised apart (they are not live traffic).
"""

from __future__ import annotations

from decimal import Decimal

from django.db.models import Count, Sum

from agents.models import Run
from agents.selectors import runs_with_usage

from . import stats
from .models import Experiment, ShadowRun

ALPHA = 0.05
ERROR_STATUSES = (Run.Status.FAILED, Run.Status.INTERRUPTED)
PEEKING_WARNING = ("Fixed-horizon p-values are valid once, at the planned sample: looking every day and stopping "
                   "when one dips under 0.05 finds false winners far more often than 5 % of the time. Decide "
                   "on `sequential_p_value` (always valid, however often you look), or read `p_value` only "
                   "once `min_sample_reached`.")


def _samples(experiment: Experiment) -> dict[str, dict]:
    rows = runs_with_usage(Run.objects.filter(experiment_id=experiment.id, status__in=Run.FINAL_STATUSES)) \
        .values_list("variant", "status", "latency_ms", "total_tokens", "feedback", "cost_usd")
    out: dict[str, dict] = {}
    for variant, status, latency, tokens, feedback, cost in rows:
        s = out.setdefault(variant, {"n": 0, "errors": 0, "latency": [], "tokens": [], "cost": [], "feedback": []})
        s["n"] += 1
        s["errors"] += status in ERROR_STATUSES
        if latency is not None:
            s["latency"].append(float(latency))
        s["tokens"].append(float(tokens or 0))
        s["cost"].append(float(cost or 0))
        if feedback is not None:
            s["feedback"].append(feedback)
    return out


def _empty() -> dict:
    return {"n": 0, "errors": 0, "latency": [], "tokens": [], "cost": [], "feedback": []}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _variant_figures(variant, s: dict, min_sample: int) -> dict:
    n = s["n"]
    positive = sum(1 for f in s["feedback"] if f > 0)
    cost_total = sum(s["cost"])
    return {
        "name": variant.name, "is_control": variant.is_control, "weight": variant.weight,
        "overrides": variant.overrides(),
        "requests": n, "errors": s["errors"], "error_rate": s["errors"] / n if n else None,
        "latency_p50_ms": stats.percentile(s["latency"], 50), "latency_p95_ms": stats.percentile(s["latency"], 95),
        "latency_mean_ms": _mean(s["latency"]),
        "tokens_per_request": _mean(s["tokens"]),
        "cost_per_request_usd": f"{Decimal(cost_total / n):.8f}" if n else None,
        "cost_usd": f"{Decimal(cost_total):.8f}",
        "feedback_count": len(s["feedback"]), "positive_feedback": positive,
        "positive_rate": positive / len(s["feedback"]) if s["feedback"] else None,
        "min_sample_reached": n >= min_sample,
    }


def _comparison(metric: str, result: dict, *, variant: str, control: str, reached: bool, n: tuple[int, int]) -> dict:
    p, seq = result.get("p_value"), result.get("sequential_p_value")
    return {"variant": variant, "control": control, "metric": metric, **result,
            "n_variant": n[0], "n_control": n[1], "min_sample_reached": reached,
            "significant": bool(reached and p is not None and p < ALPHA),
            "sequentially_significant": bool(seq is not None and seq < ALPHA)}


def experiment_results(experiment: Experiment) -> dict:
    variants = list(experiment.variants.all())
    samples = _samples(experiment)
    min_sample = experiment.min_sample
    figures = [_variant_figures(v, samples.get(v.name, _empty()), min_sample) for v in variants]
    control = next((v for v in variants if v.is_control), None)
    comparisons: list[dict] = []
    if control is not None:
        c = samples.get(control.name, _empty())
        for v in variants:
            if v.is_control:
                continue
            s = samples.get(v.name, _empty())
            reached = s["n"] >= min_sample and c["n"] >= min_sample
            common = {"variant": v.name, "control": control.name}
            positive_v = sum(1 for f in s["feedback"] if f > 0)
            positive_c = sum(1 for f in c["feedback"] if f > 0)
            feedback_reached = len(s["feedback"]) >= min_sample and len(c["feedback"]) >= min_sample
            comparisons += [
                _comparison("error_rate", stats.two_proportions(s["errors"], s["n"], c["errors"], c["n"],
                                                                min_sample=min_sample),
                            reached=reached, n=(s["n"], c["n"]), **common),
                _comparison("positive_feedback_rate",
                            stats.two_proportions(positive_v, len(s["feedback"]), positive_c, len(c["feedback"]),
                                                  min_sample=min_sample),
                            reached=feedback_reached, n=(len(s["feedback"]), len(c["feedback"])), **common),
                _comparison("latency_ms", stats.welch(s["latency"], c["latency"], min_sample=min_sample),
                            reached=reached, n=(len(s["latency"]), len(c["latency"])), **common),
                _comparison("cost_usd", stats.welch(s["cost"], c["cost"], min_sample=min_sample),
                            reached=reached, n=(s["n"], c["n"]), **common),
            ]
    shadow = [
        {"variant": row["variant"], "runs": row["runs"], "cost_usd": f"{row['cost'] or Decimal('0'):.8f}",
         "prompt_tokens": row["prompt"] or 0, "completion_tokens": row["completion"] or 0}
        for row in ShadowRun.objects.filter(experiment=experiment).values("variant")
        .annotate(runs=Count("id"), cost=Sum("cost_usd"), prompt=Sum("prompt_tokens"),
                  completion=Sum("completion_tokens")).order_by("variant")]
    return {
        "experiment": {"id": experiment.id, "name": experiment.name, "agent": experiment.agent.name,
                       "status": experiment.status, "mode": experiment.mode,
                       "started_at": experiment.started_at.isoformat() if experiment.started_at else None,
                       "ended_at": experiment.ended_at.isoformat() if experiment.ended_at else None},
        "min_sample": min_sample, "alpha": ALPHA, "confidence": stats.CONFIDENCE,
        "min_sample_reached": bool(figures) and all(f["min_sample_reached"] for f in figures),
        "peeking_warning": PEEKING_WARNING,
        "variants": figures, "comparisons": comparisons, "shadow": shadow,
    }
