"""``lowrank::aq_linear``: a linear whose weight is stored as additive multi-codebook codes (AQLM).

AQLM (arXiv 2401.06118, Eq. 2) splits each output row of ``W [out, in]`` into
groups of ``g`` consecutive input weights and approximates each group by the
sum of ``M`` codewords, one from each codebook of ``2^B`` vectors, times the
row's scale::

    W[o, j*g:(j+1)*g] ~ scales[o] * sum_m codebooks[m, codes[o, j, m], :]

Storage (the model's state, see ``lrcompile.modules``):

* ``codes [out, in // g, M]``: ``uint8`` when ``B <= 8``; ``int16`` when ``B <= 16``, holding the code's
  low 16 bits (a code ``c >= 2^15`` is stored as ``c - 2^16``; :func:`code_indices` undoes it);
* ``codebooks [M, 2^B, g]`` and ``scales [out]`` in the model's dtype.

This file holds the op's contract: the reference (dequantise, then a dense
matmul) and the fake implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def code_indices(codes: Tensor) -> Tensor:
    """``codes`` as non-negative ``int64`` codeword indices (``int16`` storage holds the low 16 bits)."""
    indices = codes.to(torch.int64)
    return indices & 0xFFFF if codes.dtype == torch.int16 else indices


def dequantize(codes: Tensor, codebooks: Tensor, scales: Tensor) -> Tensor:
    """The dense weight ``[out, in]`` the codes stand for (the AQLM sum of codewords times the row scale)."""
    out_features, groups, books = codes.shape
    group_size = codebooks.shape[2]
    indices = code_indices(codes)
    words = torch.stack([codebooks[m][indices[..., m]] for m in range(books)]).sum(0)  # [out, groups, g]
    return (words * scales[:, None, None]).reshape(out_features, groups * group_size)


def aq_linear_reference(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """``x W^T + bias`` with ``W`` dequantised from the codes."""
    return F.linear(x, dequantize(codes, codebooks, scales).to(x.dtype), bias)


@torch.library.custom_op("lowrank::aq_linear", mutates_args=())
def aq_linear(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """See the module docstring."""
    return aq_linear_reference(x, codes, codebooks, scales, bias)


@aq_linear.register_fake
def _(x, codes, codebooks, scales, bias):
    out_features, groups, books = codes.shape
    if codebooks.shape[0] != books or x.shape[-1] != groups * codebooks.shape[2]:
        raise ValueError(f"aq_linear: input {tuple(x.shape)}, codes {tuple(codes.shape)} and codebooks "
                         f"{tuple(codebooks.shape)} do not agree (in_features = groups * group_size)")
    return x.new_empty(*x.shape[:-1], out_features)
