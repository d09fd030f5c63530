"""Analysis pass: output KL of each K or V projection truncated to candidate latent ratios.

The K/V counterpart of :mod:`lrcompile.passes.sensitivity` (ASVD, arXiv
2312.05821, Sec. 3.3): each projection in turn is replaced by its group-head
truncation at ``ratio * width`` per group, all else dense, and the KL of the
graph output to the dense output is measured on the sensitivity batches, by the
same :class:`~lrcompile.passes.sensitivity.OutputKL` as weight sensitivity.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .calibration_runner import CalibrationRunner
from .decomposition import LinearDecomposition
from .find_linears import LinearNode
from .kv_rank_allocation import round_rank
from .sensitivity import OutputKL

log = logging.getLogger(__name__)


@torch.no_grad()
def measure_kv_sensitivity(
    runner: CalibrationRunner,
    projections: Sequence[LinearNode],
    decompose_groups: Callable[[LinearNode], list[LinearDecomposition]],
    ratios: Sequence[float],
    batches: Sequence[Any],
    rank_multiple: int,
) -> dict[str, dict[float, float]]:
    """``{projection name: {ratio: mean KL}}`` for every K/V projection; a ratio whose rank keeps the
    whole group width is exact (0) without a trial."""
    trials = OutputKL(runner, projections, batches)
    curves: dict[str, dict[float, float]] = {}
    progress = tqdm(total=len(projections) * len(ratios), desc="lowrank: KV sensitivity", unit="trial", leave=False)
    for view in projections:
        groups = decompose_groups(view)
        width = view.meta.out_features // len(groups)
        ranks = {ratio: round_rank(ratio * width, width, rank_multiple) for ratio in ratios}
        ranks = {ratio: rank if rank < width else None for ratio, rank in ranks.items()}  # full width: exact
        curves[view.meta.name] = trials.curve(view, ranks, groups, progress)
        log.debug("KV sensitivity %s: %s", view.meta.name, curves[view.meta.name])
    progress.close()
    return curves
