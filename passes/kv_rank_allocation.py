"""Planning pass: ranks of the K and V latents of each attention block under ``kv_ratio``.

``kv_ratio`` = cached latent values per token / dense K+V values per token,
over all restructured blocks. Ranks are per group and rounded to
``rank_multiple`` (the kernels tile the latent in such multiples).

* ``uniform``: every group of every block keeps ``2 * kv_ratio`` of its width
  for K and V together, ``key_share`` of it for K (the rest for V). Keys
  before RoPE are the more compressible: on SmolLM2 (docs/results/smollm2.md,
  2026-11-30), K : V = 3 : 5 (``key_share`` 0.375, the default) against 1 : 1
  lowers held-out perplexity at kv_ratio 0.5 from 49.6 to 45.6 with per-head
  latents and from 40.4 to 38.6 with joint ones, and at 0.75 (per head) from
  37.3 to 35.1; 0.25 gave 51.1, 0.625 61.9 (0.5, per head). On the small
  fixture (head dim 32, where rounding to multiples of 8 makes it 1 : 2 or
  1 : 1) it costs 0.04-0.6% (docs/results/kv_accuracy.md); 0.5 restores
  the even split.
* ``sensitivity``: ASVD's search (arXiv 2312.05821, Sec. 3.3) on K/V: each
  projection's output KL at candidate ratios; a binary search over a KL
  threshold finds the smallest latent per projection that meets the budget.
* ``closed_form``: the weights' closed form (SVD-LLM, arXiv 2403.07378) on
  K/V: with whitening, dropping singular value ``i`` of a group costs ``s_i^2``
  of its output error; each value's share of its projection's energy (mean
  over the projection's groups) is its loss, one latent value per group its
  price. Keeping values in order of loss per price (fractional knapsack) meets
  the budget with no forward pass, and hands rank to whichever of K or V
  loses more energy at equal width. The spectra are those the factors are cut
  from (with ``whiten``, in :mod:`.kv_metrics`' metrics). Measured on SmolLM2 at
  kv_ratio 0.5 (docs/results/smollm2.md): level with uniform with joint
  latents (group "all", 40.2 vs 40.4), worse with per-head latents (64.0 vs
  49.6). Two knapsacks, one over K and one over V (each ``kv_ratio`` of its
  width), measured 49.0 and 41.5 (a scratch variant, not an option).
* ``fisher``: Palu's allocation (arXiv 2407.21118, Sec. 3.3): each K or V
  projection gets a share of the total budget proportional to its Fisher
  information ``sum (dL/dW)^2`` on calibration data, capped at its dense width
  (the excess is handed on to the others).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .rank_allocation import monotone_sensitivity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVProjection:
    """One K or V projection to plan: ``groups`` groups of ``width`` rows each."""

    name: str  # e.g. "model.layers.0.self_attn.k_proj"
    groups: int
    width: int  # group_size * head_dim
    fisher: float = 0.0
    sensitivity: Mapping[float, float] = field(default_factory=dict)  # kept ratio -> output KL
    energy: tuple[float, ...] = ()  # share of the (whitened) energy per singular value, mean over groups, descending
    key: bool = False  # a K projection (else V)


def round_rank(value: float, width: int, multiple: int) -> int:
    """Nearest multiple of ``multiple`` in ``[min(multiple, width), width]``."""
    rank = int(round(value / multiple)) * multiple
    return max(min(multiple, width), min(width, rank))


def allocate_kv_uniform(projections: Sequence[KVProjection], kv_ratio: float, multiple: int,
                        key_share: float = 0.5) -> dict[str, int]:
    """Each group keeps ``2 * kv_ratio * width`` latent values for K and V together, ``key_share`` of them for
    K (rounded to ``multiple``) and the rest for V (what V cannot hold beyond its width goes back to K), so the
    budget holds whatever the rounding."""
    ranks = {}
    for p in projections:
        if kv_ratio >= 1.0:
            ranks[p.name] = p.width
            continue
        total = 2 * kv_ratio * p.width
        key = round_rank(key_share * total, p.width, multiple)
        value = round_rank(total - key, p.width, multiple)
        if value == p.width:
            key = round_rank(total - value, p.width, multiple)
        ranks[p.name] = key if p.key else value
    return ranks


def allocate_kv_fisher(projections: Sequence[KVProjection], kv_ratio: float, multiple: int) -> dict[str, int]:
    """Per-group ranks with ``groups * rank`` proportional to Fisher information, within the budget.

    Every projection first keeps the smallest rank (one ``multiple``); the rest of
    the budget is water-filled in proportion to Fisher information, capped at each
    projection's width, and rounded down to multiples; whole multiples left over
    go to the projections with the largest rounding remainders.
    """
    if kv_ratio >= 1.0:
        return allocate_kv_uniform(projections, kv_ratio, multiple)
    budget = kv_ratio * sum(p.groups * p.width for p in projections)
    ranks = {p.name: min(multiple, p.width) for p in projections}
    extra: dict[str, float] = {}
    open_ = list(projections)
    while open_:
        left = budget - sum(p.groups * ranks[p.name] for p in projections) - sum(extra.values())
        total = sum(max(p.fisher, 0.0) for p in open_)
        trial = {p.name: max(left, 0.0) * (max(p.fisher, 0.0) / total if total > 0 else 1 / len(open_)) for p in open_}
        capped = [p for p in open_ if trial[p.name] >= p.groups * (p.width - ranks[p.name])]
        if not capped:
            extra.update(trial)
            break
        for p in capped:
            extra[p.name] = p.groups * (p.width - ranks[p.name])
        open_ = [p for p in open_ if p not in capped]
    remainders = {}
    for p in projections:
        steps = extra.get(p.name, 0.0) / (p.groups * multiple)
        ranks[p.name] = min(p.width, ranks[p.name] + int(steps) * multiple)
        remainders[p.name] = steps - int(steps)
    for p in sorted(projections, key=lambda q: -remainders[q.name]):
        used = sum(q.groups * ranks[q.name] for q in projections)
        if ranks[p.name] + multiple <= p.width and used + p.groups * multiple <= budget + 1e-9:
            ranks[p.name] += multiple
    log.info("fisher KV ranks: %s", ", ".join(f"{k}={v}" for k, v in ranks.items()))
    return ranks


def allocate_kv_closed_form(projections: Sequence[KVProjection], kv_ratio: float, multiple: int) -> dict[str, int]:
    """Per-group ranks from ``energy`` (see the module docstring): the most energy per latent value kept, K and V
    of every block competing for one budget; ranks rounded down to multiples (at least one), and whole multiples
    the rounding freed go to the projections whose next multiple keeps the most energy."""
    if kv_ratio >= 1.0:
        return allocate_kv_uniform(projections, kv_ratio, multiple)
    budget = kv_ratio * sum(p.groups * p.width for p in projections)
    # at equal energy, value i of every projection before value i + 1 of any: ties split evenly
    items = sorted(((share / p.groups, -i, p.name) for p in projections for i, share in enumerate(p.energy)),
                   reverse=True)
    kept: dict[str, int] = dict.fromkeys((p.name for p in projections), 0)
    by_name = {p.name: p for p in projections}
    used = 0
    for _, _, name in items:
        if used + by_name[name].groups > budget + 1e-9:
            break
        kept[name] += 1
        used += by_name[name].groups
    ranks = {p.name: max(min(multiple, p.width), kept[p.name] // multiple * multiple) for p in projections}

    def gain(p: KVProjection) -> float:
        return sum(p.energy[ranks[p.name]: ranks[p.name] + multiple]) / p.groups

    while True:
        room = budget - sum(p.groups * ranks[p.name] for p in projections)
        open_ = [p for p in projections if ranks[p.name] + multiple <= p.width and p.groups * multiple <= room + 1e-9]
        if not open_:
            break
        best = max(open_, key=gain)
        ranks[best.name] += multiple
    log.info("closed-form KV ranks: %s", ", ".join(f"{k}={v}" for k, v in ranks.items()))
    return ranks


def allocate_kv_sensitivity(projections: Sequence[KVProjection], kv_ratio: float, multiple: int) -> dict[str, int]:
    """Lowest KL threshold whose per-projection choices (smallest ratio with KL <= threshold) fit the budget."""
    if kv_ratio >= 1.0:
        return allocate_kv_uniform(projections, kv_ratio, multiple)
    budget = kv_ratio * sum(p.groups * p.width for p in projections)
    curves = {p.name: monotone_sensitivity(p.sensitivity) for p in projections}

    def ranks_at(tau: float) -> dict[str, int]:
        ranks = {}
        for p in projections:
            ok = [r for r, kl in curves[p.name].items() if kl <= tau]
            ranks[p.name] = round_rank(min(ok) * p.width, p.width, multiple) if ok else p.width
        return ranks

    def cost(ranks: Mapping[str, int]) -> int:
        return sum(p.groups * ranks[p.name] for p in projections)

    thresholds = sorted({0.0, *(kl for curve in curves.values() for kl in curve.values())})
    low, high = 0, len(thresholds) - 1
    if cost(ranks_at(thresholds[high])) > budget:
        return ranks_at(thresholds[high])  # even the smallest candidates exceed it: the closest we can get
    while low < high:
        mid = (low + high) // 2
        if cost(ranks_at(thresholds[mid])) <= budget:
            high = mid
        else:
            low = mid + 1
    ranks = ranks_at(thresholds[low])
    log.info("sensitivity KV ranks: %s", ", ".join(f"{k}={v}" for k, v in ranks.items()))
    return ranks
