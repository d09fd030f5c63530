"""Held-out perplexity of a causal LM, eager or compiled."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


@torch.no_grad()
def perplexity(forward: Callable[[torch.Tensor], Any], chunks: Iterable[torch.Tensor]) -> float:
    """``exp(mean next-token NLL)`` over every position of every chunk, in float64.

    ``forward(input_ids)`` returns logits ``[batch, seq, vocab]`` (or a model output with ``.logits``),
    so a compiled model can be evaluated as well as an eager one.
    """
    total, count = 0.0, 0
    for ids in chunks:
        logits = _logits(forward(ids)).double()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -logprobs.gather(-1, ids[:, 1:, None].to(logprobs.device)).squeeze(-1)
        total += float(nll.sum())
        count += nll.numel()
    if not count:
        raise ValueError("perplexity: no chunks")
    return math.exp(total / count)
