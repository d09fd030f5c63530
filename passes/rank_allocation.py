"""Plan pass: choose a rank per linear so the factored layers meet ``param_ratio``.

A layer of shape ``[m, n]`` at rank ``k`` holds ``k (m + n)`` parameters instead
of ``m n``; where that would not save parameters it stays dense. Ranks are
multiples of ``rank_multiple`` (rounded down, at least one multiple).

* ``uniform``: every layer keeps the same fraction of its parameters.
* ``sensitivity`` (ASVD, arXiv 2312.05821, Sec. 3.3): each (layer, ratio) has a
  measured KL divergence; for a threshold tau each layer takes its smallest
  ratio whose KL <= tau, and a binary search over the sorted KLs finds the
  smallest tau that meets the budget.
* ``closed_form`` (SVD-LLM, arXiv 2403.07378): singular value i of layer j
  costs ``m_j + n_j`` parameters and, with whitening, removing it costs
  ``s_ji^2`` of truncation loss (normalised by the layer's energy here so
  layers of different output scale compare). Keeping values in order of loss
  per parameter is the optimal greedy (fractional knapsack); a binary search on
  the length of the kept prefix meets the budget with no forward passes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import torch

from lrcompile.errors import LowRankConfigError
from lrcompile.types import (ALLOCATION_METHODS, FACTOR_METHODS, CompressionPlan, LayerPlan, LinearMeta,
                             accumulation_dtype)

log = logging.getLogger(__name__)

DENSE_REASON = "factoring would not save parameters"
FULL_BUDGET_REASON = "param_ratio=1.0 keeps every weight: none is factored"
RATIO_TOLERANCE = 0.1  # relative gap between achieved and target param_ratio beyond which the plan warns


def align_rank(rank: float, multiple: int, meta: LinearMeta) -> int:
    """Round down to a multiple of ``multiple``, at least one multiple, at most full rank."""
    full = min(meta.out_features, meta.in_features)
    aligned = max(multiple, int(rank) // multiple * multiple)
    return min(aligned, full)


def rank_for_ratio(meta: LinearMeta, ratio: float, multiple: int) -> int | None:
    """Rank keeping about ``ratio`` of the layer's parameters; None (dense) at ratio 1 or where it would not save any."""
    if ratio >= 1.0:
        return None
    rank = align_rank(ratio * meta.dense_params / (meta.out_features + meta.in_features), multiple, meta)
    return rank if rank <= meta.break_even_rank else None


def _layer_plan(meta: LinearMeta, rank: int | None, **scores: float | None) -> LayerPlan:
    return LayerPlan(
        meta.name, meta.out_features, meta.in_features, rank, "" if rank is not None else DENSE_REASON, **scores
    )


def _search(
    metas: Sequence[LinearMeta], thresholds: Sequence[float], plan_at: Callable[[float], list[LayerPlan]], budget: float
) -> list[LayerPlan]:
    """Binary search for the first threshold whose plan meets the budget (parameters fall as thresholds rise)."""
    lo, hi = 0, len(thresholds) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(p.params_after for p in plan_at(thresholds[mid])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return plan_at(thresholds[lo])  # over budget when no candidate meets it (build_plan warns when far off)


def check_budget(param_ratio: float, multiple: int) -> None:
    """Refuse a ``param_ratio`` outside ``(0, 1]`` or a ``rank_multiple`` below 1, as ``LowRankConfig`` does."""
    if isinstance(param_ratio, bool) or not isinstance(param_ratio, (int, float)) or not 0.0 < param_ratio <= 1.0:
        raise LowRankConfigError(f"param_ratio={param_ratio!r} is outside (0, 1]: it is the fraction of parameters kept")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise LowRankConfigError(f"rank multiple {multiple!r}: expected a positive integer")


def allocate_uniform(metas: Sequence[LinearMeta], param_ratio: float, multiple: int) -> list[LayerPlan]:
    check_budget(param_ratio, multiple)
    return [_layer_plan(m, rank_for_ratio(m, param_ratio, multiple)) for m in metas]


def monotone_sensitivity(curve: Mapping[float, float]) -> dict[float, float]:
    """``kl'(r) = max_{r' >= r} kl(r')``: non-increasing in the ratio kept."""
    out, running = {}, 0.0
    for ratio in sorted(curve, reverse=True):
        running = max(running, curve[ratio])
        out[ratio] = running
    return out


def allocate_by_sensitivity(metas: Sequence[LinearMeta], param_ratio: float, multiple: int) -> list[LayerPlan]:
    """Needs ``meta.sensitivity`` (ratio -> KL) on every layer.

    Each layer's curve is made monotone first (a ratio scores at least the KL of
    every larger ratio), so raising the threshold lowers a layer one candidate
    at a time instead of letting measurement noise jump it to the smallest ratio.
    """
    check_budget(param_ratio, multiple)
    unmeasured = [m.name for m in metas if not m.sensitivity]
    if unmeasured:
        raise ValueError(f"allocate_by_sensitivity: no sensitivity on {len(unmeasured)} layer(s) ({', '.join(unmeasured[:3])}"
                         f"{', ...' if len(unmeasured) > 3 else ''}): run measure_sensitivity on them first")
    budget = param_ratio * sum(m.dense_params for m in metas)
    curves = {m.name: monotone_sensitivity(m.sensitivity) for m in metas}

    def plan_at(tau: float) -> list[LayerPlan]:
        plans = []
        for meta in metas:
            ok = [r for r, kl in curves[meta.name].items() if kl <= tau]
            ratio = min(ok) if ok else 1.0
            rank = rank_for_ratio(meta, ratio, multiple)
            plans.append(_layer_plan(meta, rank, sensitivity=meta.sensitivity.get(ratio) if rank is not None else None))
        return plans

    thresholds = sorted({0.0, *(kl for curve in curves.values() for kl in curve.values())})
    return _search(metas, thresholds, plan_at, budget)


def allocate_closed_form(
    metas: Sequence[LinearMeta], spectra: Mapping[str, torch.Tensor], param_ratio: float, multiple: int
) -> list[LayerPlan]:
    """``spectra[name]``: singular values of the layer's (scaled) weight, descending.

    All singular values of all layers go into one list, best value per parameter
    first; a binary search finds the longest kept prefix that meets the budget.
    A layer's rank is its count in the prefix (aligned), so tied values split.
    """
    check_budget(param_ratio, multiple)
    missing = [m.name for m in metas if m.name not in spectra]
    if missing:
        raise ValueError(f"allocate_closed_form: no singular values for {len(missing)} layer(s) ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}): give spectra[name] = decompose(...).s for every layer")
    budget = param_ratio * sum(m.dense_params for m in metas)
    share = {m.name: energy_share(spectra[m.name]).cpu() for m in metas}  # a host list: no sync per value
    items = sorted(
        ((float(v) / (m.out_features + m.in_features), m.name) for m in metas for v in share[m.name].tolist()),
        key=lambda t: -t[0]
    )
    order = [name for _, name in items]

    def plan_at(dropped: int) -> list[LayerPlan]:
        kept = Counter(order[: len(order) - dropped])
        plans = []
        for meta in metas:
            rank = align_rank(kept[meta.name], multiple, meta)
            if kept[meta.name] >= min(meta.out_features, meta.in_features) or rank > meta.break_even_rank:
                plans.append(_layer_plan(meta, None, truncation_loss=0.0))
            else:
                plans.append(_layer_plan(meta, rank, truncation_loss=float(share[meta.name][rank:].sum())))
        return plans

    return _search(metas, range(len(order) + 1), plan_at, budget)


def energy_share(singular_values: torch.Tensor) -> torch.Tensor:
    """``s_i^2 / sum_j s_j^2`` in float64: each singular value's share of the (scaled) weight's energy."""
    energy = singular_values.to(accumulation_dtype(singular_values.device)).square()
    return energy / energy.sum().clamp_min(1e-300)


def build_plan(method: str, allocation: str, param_ratio: float, layers: list[LayerPlan], rank_multiple: int) -> CompressionPlan:
    """The plan of ``layers`` (ranks aligned to ``rank_multiple``); warns when its parameter ratio misses
    ``param_ratio`` by more than ``RATIO_TOLERANCE`` (relative), as rank alignment does on small layers."""
    for option, value, known in (("method", method, FACTOR_METHODS), ("allocation", allocation, ALLOCATION_METHODS)):
        if value not in known:
            raise ValueError(f"{option}={value!r}: expected one of {', '.join(known)}")
    if param_ratio >= 1.0:  # nothing was asked of the weights: say so, not that factoring would not pay
        layers = [dataclasses.replace(layer, reason=FULL_BUDGET_REASON) if layer.reason == DENSE_REASON else layer
                  for layer in layers]
    plan = CompressionPlan(method, allocation, param_ratio, tuple(layers))
    factored = sum(layer.rank is not None for layer in layers)
    achieved = plan.achieved_ratio
    if layers:  # none on a recompile over layers compressed already
        log.info("plan (%s, %s): %d of %d linears factored, parameters %.3f of dense (target %.3f)",
                 method, allocation, factored, len(layers), achieved, param_ratio)
    if layers and abs(achieved - param_ratio) > RATIO_TOLERANCE * param_ratio:
        cause = (
            f"a factored linear keeps at least rank_multiple={rank_multiple} ranks, and one whose factors would not "
            "save parameters stays dense" if achieved > param_ratio
            else f"ranks are rounded down to multiples of rank_multiple={rank_multiple}"
        )
        log.warning(
            "plan (%s, %s): achieved parameter ratio %.3f is far from the target param_ratio %g (%d linears, %d "
            "factored): %s%s",
            method, allocation, achieved, param_ratio, len(layers), factored, cause,
            "; a smaller rank_multiple gets closer" if rank_multiple > 1 else "",
        )
    return plan
