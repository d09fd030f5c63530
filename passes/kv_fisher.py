"""Analysis pass: Fisher information of the K and V projections on calibration data.

Palu (arXiv 2407.21118, Sec. 3.3) allocates latent ranks in proportion to the
Fisher information of each projection's weight, estimated by the empirical
Fisher ``sum_batches sum_ij (dL/dW_ij)^2`` with ``L`` the next-token
cross-entropy of the calibration text under the dense model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lrcompile.errors import CalibrationError
from lrcompile.types import accumulation_dtype

from .calibration_runner import CalibrationRunner
from .find_linears import LinearNode
from .sensitivity import sensitivity_output

log = logging.getLogger(__name__)


def _input_ids(batch: Any) -> torch.Tensor:
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
        raise CalibrationError("kv_allocation='fisher' needs token ids in each calibration batch (a tensor or 'input_ids')")
    return ids


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy of ``ids[:, 1:]`` under ``logits[:, :-1]``, over real (unpadded) targets."""
    if logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise CalibrationError(
            f"kv_allocation='fisher' needs causal-LM logits [batch, seq, vocab] for token ids {tuple(ids.shape)}; "
            f"the graph's output is {tuple(logits.shape)}"
        )
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    if token_mask is not None and token_mask.shape == ids.shape:
        keep = token_mask[:, 1:].flatten().to(losses.dtype)
        return (losses * keep).sum() / keep.sum().clamp_min(1)
    return losses.mean()


def measure_kv_fisher(
    runner: CalibrationRunner,
    projections: Sequence[LinearNode],
    weights: Sequence[torch.Tensor],
    batches: Sequence[Any],
) -> dict[str, float]:
    """Empirical Fisher information ``sum (dL/dW)^2`` of each projection's weight, by layer name."""
    fisher = {view.meta.name: 0.0 for view in projections}
    frozen = [w for w in weights if not w.requires_grad]
    for w in frozen:
        w.requires_grad_(True)
    try:
        output_index = None
        for index, batch in enumerate(tqdm(batches, desc="lowrank fisher", leave=False)):
            args = runner.bind(batch, index)
            with torch.enable_grad():
                outputs = torch.utils._pytree.tree_leaves(runner.call(args))
                if output_index is None:
                    output_index = sensitivity_output(runner.gm, projections, outputs)
                loss = next_token_loss(outputs[output_index], _input_ids(batch), runner.token_mask(batch))
                grads = torch.autograd.grad(loss, list(weights), allow_unused=True)
            for view, grad in zip(projections, grads):
                if grad is not None:
                    fisher[view.meta.name] += float(grad.to(accumulation_dtype(grad.device)).square().sum())
    finally:
        for w in frozen:
            w.requires_grad_(False)
    log.info("fisher information: %s", ", ".join(f"{k}={v:.3g}" for k, v in fisher.items()))
    return fisher
