"""Analysis pass: how much each layer's truncation perturbs the graph's output.

ASVD (arXiv 2312.05821, Sec. 3.3) measures, for every layer and candidate
parameter ratio, the model's degradation when only that layer is truncated.
Here the measure is KL(P_dense || P_truncated) of the softmax over the last
dimension of the graph output that depends on the most compressible linears
(the logits of a causal LM, not its K/V cache), averaged over positions and
calibration batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from tqdm.auto import tqdm

from lrcompile.errors import CalibrationError

from .calibration_runner import CalibrationRunner
from .decomposition import LinearDecomposition
from .find_linears import LinearNode
from .rank_allocation import rank_for_ratio

log = logging.getLogger(__name__)


def sensitivity_output(gm: fx.GraphModule, linears: Sequence[LinearNode], values: Sequence[Any]) -> int:
    """Index (among the flattened graph outputs ``values`` of one run) of the floating output
    downstream of the most compressible linears; ties go to the larger output."""
    bit = {view.node: 1 << i for i, view in enumerate(linears)}
    reach: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        mask = bit.get(node, 0)
        for parent in node.all_input_nodes:
            mask |= reach.get(parent, 0)
        reach[node] = mask
    output = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = torch.utils._pytree.tree_leaves(output.args[0])
    best, best_key = None, (-1, -1)
    for i, (leaf, value) in enumerate(zip(leaves, values)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        key = (bin(reach.get(leaf, 0)).count("1"), value.numel())
        if key > best_key:
            best, best_key = i, key
    if best is None:
        raise CalibrationError("the captured graph returns no floating-point tensor to compare")
    return best


def output_kl(reference_logp: torch.Tensor, output: torch.Tensor, token_mask: torch.Tensor | None = None) -> float:
    """Mean over positions of KL(P || Q), P from log-probs ``reference_logp``, Q = softmax(output);
    positions where ``token_mask`` is 0 (padding) are left out when the mask matches the positions."""
    logq = F.log_softmax(output.double(), dim=-1)
    kl = (reference_logp.exp() * (reference_logp - logq)).sum(-1)
    if token_mask is not None and token_mask.shape == kl.shape and token_mask.any():
        return float(kl[token_mask.to(torch.bool)].mean())
    return float(kl.mean())


@torch.no_grad()
def measure_sensitivity(
    runner: CalibrationRunner,
    linears: Sequence[LinearNode],
    decompose_layer: Callable[[LinearNode], LinearDecomposition],
    ratios: Sequence[float],
    batches: Sequence[Any],
    rank_multiple: int,
) -> None:
    """Fill ``meta.sensitivity[ratio]`` for every compressible linear."""
    targets = [v for v in linears if v.meta.compressible]
    dense = [torch.utils._pytree.tree_leaves(runner.run(b, i)) for i, b in enumerate(batches)]
    index = sensitivity_output(runner.gm, targets, dense[0])

    def output(result: Any) -> torch.Tensor:
        return torch.utils._pytree.tree_leaves(result)[index]

    references = [F.log_softmax(leaves[index].double(), dim=-1) for leaves in dense]
    progress = tqdm(total=len(targets) * len(ratios), desc="lowrank: sensitivity", unit="trial", leave=False)
    for view in targets:
        meta = view.meta
        decomposition = decompose_layer(view)
        for ratio in ratios:
            rank = rank_for_ratio(meta, ratio, rank_multiple)
            if rank is None:  # this ratio keeps the layer dense: no degradation
                meta.sensitivity[ratio] = 0.0
            else:
                weight = decomposition.reconstruct(rank, meta.weight_dtype)
                kls = [
                    output_kl(ref, output(runner.run(b, i, overrides={view: weight})), runner.token_mask(b))
                    for i, (b, ref) in enumerate(zip(batches, references))
                ]
                meta.sensitivity[ratio] = sum(kls) / len(kls)
            progress.update()
        log.debug("sensitivity %s: %s", meta.name, meta.sensitivity)
    progress.close()
