"""Analysis pass: output KL of each K or V projection truncated to candidate latent ratios.

The K/V counterpart of :mod:`lrcompile.passes.sensitivity` (ASVD, arXiv
2312.05821, Sec. 3.3): each projection in turn is replaced by its group-head
truncation at ``ratio * width`` per group, all else dense, and the KL of the
graph output to the dense output is measured on the sensitivity batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .calibration_runner import CalibrationRunner
from .decomposition import LinearDecomposition
from .find_linears import LinearNode
from .kv_rank_allocation import round_rank
from .sensitivity import output_kl, sensitivity_output

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
    """``{projection name: {ratio: mean KL}}`` for every K/V projection."""
    dense = [torch.utils._pytree.tree_leaves(runner.run(b, i)) for i, b in enumerate(batches)]
    index = sensitivity_output(runner.gm, projections, dense[0])
    references = [F.log_softmax(leaves[index].double(), dim=-1) for leaves in dense]
    curves: dict[str, dict[float, float]] = {}
    progress = tqdm(total=len(projections) * len(ratios), desc="lowrank: KV sensitivity", unit="trial", leave=False)
    for view in projections:
        groups = decompose_groups(view)
        width = view.meta.out_features // len(groups)
        curve = curves.setdefault(view.meta.name, {})
        for ratio in ratios:
            rank = round_rank(ratio * width, width, rank_multiple)
            weight = torch.cat([d.reconstruct(rank, view.meta.weight_dtype) for d in groups])
            kls = [
                output_kl(ref, torch.utils._pytree.tree_leaves(runner.run(b, i, overrides={view: weight}))[index],
                          runner.token_mask(b))
                for i, (b, ref) in enumerate(zip(batches, references))
            ]
            curve[ratio] = sum(kls) / len(kls)
            progress.update()
        log.debug("KV sensitivity %s: %s", view.meta.name, curve)
    progress.close()
    return curves
