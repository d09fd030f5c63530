"""``lowrank::aq_linear``: a linear whose weight is stored as additive multi-codebook codes (AQLM).

AQLM (arXiv 2401.06118, Eq. 2) splits each output row of ``W [out, in]`` into
groups of ``g`` consecutive input weights and approximates each group by the
sum of ``M`` codewords, one from each codebook of ``2^B`` vectors, times the
row's scale::

    W[o, j*g:(j+1)*g] ~ scales[o] * sum_m codebooks[m, codes[o, j, m], :]

Storage (the model's state, see ``lrcompile.modules``):

* ``codes [out, in // g, M]``: ``uint8`` when ``B <= 8``; ``int16`` when ``B <= 16``, holding the code's
  low 16 bits (a code ``c >= 2^15`` is stored as ``c - 2^16``; :func:`code_indices` undoes it);
* ``codebooks [M, 2^B, g]`` in a 16-bit float dtype whatever the model's (:func:`codebook_dtype`: bfloat16
  models keep bfloat16, every other model float16), as AQLM's checkpoints store them (the codebooks of a 576 x 576
  2x8 layer cost 0.40 bits a weight in float32, 0.20 in 16 bits, next to the codes' 2);
* ``scales [out]`` in the model's dtype.

Every path accepts codebooks of any float dtype, not necessarily ``x``'s: the
codewords are summed in float32 (or the scales' dtype, when wider) and the
gradient of the codebooks comes back in their own dtype.

This file holds the op's contract: the reference (dequantise, then a dense
matmul), the fake implementation and the gradient. The fast paths are
registered per device: CPU runs the C++ kernels of ``aq_linear_cpu`` (built on
first use), CUDA the Triton kernels of ``aq_linear_triton`` (imported on first
use, so Triton is needed only where a GPU is). Inductor keeps the op as an
extern call, so compiled graphs reach the same kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def code_indices(codes: Tensor) -> Tensor:
    """``codes`` as non-negative ``int64`` codeword indices (``int16`` storage holds the low 16 bits)."""
    indices = codes.to(torch.int64)
    return indices & 0xFFFF if codes.dtype == torch.int16 else indices


def codebook_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype codebooks are stored in for a model of ``dtype``: bfloat16 for bfloat16, else float16.

    Codewords approximate groups of rows scaled to unit RMS, well inside float16's range, whose 11-bit
    significand rounds them 8x more finely than bfloat16's. Measured on SmolLM2's layer-5 ``q_proj`` (2x8,
    relative error 0.0987 in float32): rounding to float16 moves the error by 8e-7 of itself, to bfloat16 by
    1.6e-5; both negligible, so a bfloat16 model keeps its own dtype.
    """
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def dequantize(codes: Tensor, codebooks: Tensor, scales: Tensor) -> Tensor:
    """The dense weight ``[out, in]`` the codes stand for (the AQLM sum of codewords times the row scale), in the
    wider of the codebooks' and scales' dtypes, the codewords summed in it."""
    out_features, groups, books = codes.shape
    group_size = codebooks.shape[2]
    codebooks = codebooks.to(torch.promote_types(codebooks.dtype, scales.dtype))
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


@aq_linear.register_kernel("cpu")
def _(x, codes, codebooks, scales, bias):
    if torch.float64 in (x.dtype, codebooks.dtype, scales.dtype):  # the C++ kernels compute in float32
        return aq_linear_reference(x, codes, codebooks, scales, bias)
    from .aq_linear_cpu import aq_linear_cpu

    return aq_linear_cpu(x, codes, codebooks, scales, bias)


@aq_linear.register_kernel("cuda")
def _(x, codes, codebooks, scales, bias):
    from .aq_linear_triton import aq_linear_triton

    return aq_linear_triton(x, codes, codebooks, scales, bias)


def _setup_context(ctx, inputs, output):
    x, codes, codebooks, scales, bias = inputs
    ctx.save_for_backward(x, codes, codebooks, scales)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    """Gradients of ``y = x (s * W0)^T + b`` with ``W0`` the unscaled sum of codewords (codes are discrete)::

        dx = dy W,   ds[o] = sum_rows dy[:, o] (x W0^T)[:, o],   db = sum_rows dy,
        dC[m, k] = sum over the groups (o, j) whose code m is k of s[o] dW[o, j],   dW = dy^T x
    """
    x, codes, codebooks, scales = ctx.saved_tensors
    need_x, _, need_books, need_scales, need_bias = ctx.needs_input_grad
    out_features, groups, books = codes.shape
    unscaled = dequantize(codes, codebooks, torch.ones_like(scales))  # W0 [out, in]
    rows, flat = grad.reshape(-1, out_features), x.reshape(-1, x.shape[-1])
    grad_x = (grad @ (unscaled * scales[:, None]).to(grad.dtype)) if need_x else None
    grad_scales = (rows * (flat @ unscaled.to(flat.dtype).T)).sum(0).to(scales.dtype) if need_scales else None
    grad_books = None
    if need_books:  # summed in the dequantised weight's dtype (16-bit codebooks would round every addition)
        size, group_size = codebooks.shape[1:]
        scaled = ((rows.T @ flat).to(unscaled.dtype) * scales[:, None]).reshape(out_features * groups, group_size)
        indices = code_indices(codes).reshape(-1, books) + torch.arange(books, device=codes.device) * size
        grad_books = unscaled.new_zeros(books * size, group_size)
        for m in range(books):
            grad_books.index_add_(0, indices[:, m], scaled)
        grad_books = grad_books.reshape(books, size, group_size).to(codebooks.dtype)
    grad_bias = rows.sum(0) if need_bias and ctx.has_bias else None
    return grad_x, None, grad_books, grad_scales, grad_bias


aq_linear.register_autograd(_backward, setup_context=_setup_context)
