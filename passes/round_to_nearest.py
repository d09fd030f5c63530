"""Round-to-nearest per-group weight quantisation: the baseline AQLM is measured against.

Each row of ``W [out, in]`` is split into groups of ``group_size`` input weights;
the last group of a row is shorter when ``group_size`` does not divide ``in`` (SmolLM2's 576 with 128). A group is mapped asymmetrically (min-max) onto ``2^bits`` levels with its own
scale and zero point, ``q = clamp(round(w / s) + z, 0, 2^bits - 1)``,
``w^ = (q - z) s``. Storage: ``bits`` per weight plus a 16-bit scale and a
16-bit zero point per group (the common GPTQ/AWQ packing).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lrcompile.errors import LowRankConfigError

GROUP_PARAM_BITS = 32  # one float16 scale and one 16-bit zero point per group


def round_to_nearest(weight: Tensor, bits: int, group_size: int) -> Tensor:
    """The dequantised weight (same shape and dtype) after per-group asymmetric round-to-nearest."""
    out_features, in_features = weight.shape
    if not 1 <= bits <= 16 or group_size < 1:
        raise LowRankConfigError(f"RTN bits={bits}, group size {group_size}: expected 1..16 bits and a positive size")
    rows = weight.detach().to(torch.float32)
    pad = -in_features % group_size  # the short last group is padded with its own last weight: same min and max
    groups = F.pad(rows, (0, pad), mode="replicate").reshape(out_features, -1, group_size)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    levels = 2**bits - 1
    scale = ((high - low) / levels).clamp_min(1e-12)
    zero = torch.round(-low / scale)
    quantised = torch.clamp(torch.round(groups / scale) + zero, 0, levels)
    return ((quantised - zero) * scale).reshape(out_features, -1)[:, :in_features].to(weight.dtype)


def rtn_bits_per_weight(bits: int, group_size: int, in_features: int) -> float:
    """Storage bits per weight of a row of ``in_features``: the code plus each group's scale and zero point."""
    return bits + GROUP_PARAM_BITS * math.ceil(in_features / group_size) / in_features
