"""Triton kernels of ``lowrank::aq_linear`` for CUDA: codebook gather fused with the matrix-vector product.

Decode (at most :data:`MAX_MATVEC_ROWS` rows): each program owns ``BLOCK_O``
output features of every row and walks the input groups ``BLOCK_J`` at a
time; per codebook it loads the codes ``[BLOCK_O, BLOCK_J]``, gathers their
codewords ``[BLOCK_O, BLOCK_J, g]`` (the codebooks stay in L1/L2: 2x8 at g = 8
is 16 KB in float32) and sums them, then one ``tl.dot`` multiplies the tile
with the slices of all rows (a single row: multiply and reduce), accumulating
in float32. Gathering is the cost, so it is done once for all rows (on an
H200, one program a row made 16 rows cost 12x one row). The dense weight
never exists; each weight costs ``M*B/g`` bits of memory traffic instead of
16 or 32 (AQLM Sec. 4.3).

Prefill: a second kernel writes the dense weight (the AQLM sum of codewords
times the scale) in ``x``'s dtype and a cuBLAS matmul follows, the weight's
materialisation amortised over many rows.

``int16`` codes hold the low 16 bits of the code (``& 0xFFFF`` in the kernel);
``uint8`` codes load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

MAX_MATVEC_ROWS = 16  # rows handled by the fused kernel; more dequantise and run one matmul
INTERPRETED = triton.knobs.runtime.interpret
# Matrix-vector tiles: BLOCK_O output features a program, BLOCK_J input groups a step, a [BLOCK_O, BLOCK_J, g]
# float32 tile of codewords. Autotuned on CUDA per layer shape and row regime (one row, or up to 16); one small
# tile under the interpreter, so tests cover several programs and steps.
if INTERPRETED:
    _MATVEC_CONFIGS = [triton.Config({"BLOCK_O": 16, "BLOCK_J": 8}, num_warps=1)]
else:
    _MATVEC_CONFIGS = [
        triton.Config({"BLOCK_O": o, "BLOCK_J": j}, num_warps=w)
        for o, j, w in ((16, 32, 4), (16, 16, 2), (32, 16, 4), (32, 32, 4), (32, 8, 2), (64, 16, 4), (64, 32, 8),
                        (128, 16, 8))
    ]
# dequantisation tiles (prefill: written once, then one cuBLAS matmul over many rows)
DEQUANT_BLOCK_O = 16
DEQUANT_BLOCK_J = 8 if INTERPRETED else 32


@triton.jit
def _codewords(codes_ptr, codebooks_ptr, offs_o, offs_j, offs_t, mask_oj, mask_t,
               stride_co, stride_cj, stride_cm, stride_bm, stride_bk, stride_bt,
               BOOKS: tl.constexpr, WIDE_CODES: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr,
               BLOCK_G: tl.constexpr):
    """``sum_m codebooks[m, codes[o, j, m], t]`` for a tile ``[BLOCK_O, BLOCK_J, BLOCK_G]`` (float32)."""
    words = tl.zeros((BLOCK_O, BLOCK_J, BLOCK_G), dtype=tl.float32)
    mask = mask_oj[:, :, None] & mask_t[None, None, :]
    for m in tl.static_range(BOOKS):
        code = tl.load(codes_ptr + offs_o[:, None] * stride_co + offs_j[None, :] * stride_cj + m * stride_cm,
                       mask=mask_oj, other=0).to(tl.int32)
        if WIDE_CODES:
            code = code & 0xFFFF
        word_ptr = codebooks_ptr + m * stride_bm + code[:, :, None] * stride_bk + offs_t[None, None, :] * stride_bt
        words += tl.load(word_ptr, mask=mask, other=0.0).to(tl.float32)
    return words


@triton.autotune(configs=_MATVEC_CONFIGS, key=["out_features", "groups", "BLOCK_R"])
@triton.jit
def _aq_matvec_kernel(x_ptr, codes_ptr, codebooks_ptr, scales_ptr, bias_ptr, y_ptr,
                      rows, out_features, groups, stride_xr, stride_xi, stride_yr, stride_yo,
                      stride_co, stride_cj, stride_cm, stride_bm, stride_bk, stride_bt,
                      G: tl.constexpr, BLOCK_G: tl.constexpr, BOOKS: tl.constexpr, WIDE_CODES: tl.constexpr,
                      HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
                      BLOCK_J: tl.constexpr):
    """``y[r, o] = scales[o] * <sum_m codewords, x[r]> + bias[o]`` for ``BLOCK_O`` outputs of all (at most
    ``BLOCK_R``) rows. Several rows: one ``tl.dot`` a tile, in float32 at ``PRECISION`` (``tf32`` for 16-bit
    inputs, whose own rounding is coarser; ``ieee`` for float32)."""
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = offs_o < out_features
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rows
    offs_t = tl.arange(0, BLOCK_G)
    mask_t = offs_t < G
    acc = tl.zeros((BLOCK_O, BLOCK_R), dtype=tl.float32)
    for j0 in range(0, groups, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < groups
        words = _codewords(codes_ptr, codebooks_ptr, offs_o, offs_j, offs_t, mask_o[:, None] & mask_j[None, :],
                           mask_t, stride_co, stride_cj, stride_cm, stride_bm, stride_bk, stride_bt, BOOKS, WIDE_CODES,
                           BLOCK_O, BLOCK_J, BLOCK_G)
        x_offsets = offs_r[:, None, None] * stride_xr + (offs_j[None, :, None] * G + offs_t[None, None, :]) * stride_xi
        x_mask = mask_r[:, None, None] & mask_j[None, :, None] & mask_t[None, None, :]
        xs = tl.reshape(tl.load(x_ptr + x_offsets, mask=x_mask, other=0.0).to(tl.float32),
                        (BLOCK_R, BLOCK_J * BLOCK_G))
        words = tl.reshape(words, (BLOCK_O, BLOCK_J * BLOCK_G))
        if BLOCK_R == 1:  # one row: multiply and reduce (a padded tl.dot made a row 1.5-2x slower on an H200)
            acc += tl.sum(words * xs, axis=1)[:, None]
        else:
            acc = tl.dot(words, tl.trans(xs), acc, input_precision=PRECISION)
    acc *= tl.load(scales_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + offs_r[None, :] * stride_yr + offs_o[:, None] * stride_yo, acc.to(y_ptr.dtype.element_ty),
             mask=mask_o[:, None] & mask_r[None, :])


@triton.jit
def _aq_dequantize_kernel(codes_ptr, codebooks_ptr, scales_ptr, w_ptr, out_features, groups,
                          stride_wo, stride_wi, stride_co, stride_cj, stride_cm, stride_bm, stride_bk, stride_bt,
                          G: tl.constexpr, BLOCK_G: tl.constexpr, BOOKS: tl.constexpr, WIDE_CODES: tl.constexpr,
                          BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr):
    """The dense weight tile ``[BLOCK_O, BLOCK_J * g]`` (codewords summed, times the row scale) in ``w``'s dtype."""
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_t = tl.arange(0, BLOCK_G)
    mask_oj = (offs_o < out_features)[:, None] & (offs_j < groups)[None, :]
    mask_t = offs_t < G
    words = _codewords(codes_ptr, codebooks_ptr, offs_o, offs_j, offs_t, mask_oj, mask_t,
                       stride_co, stride_cj, stride_cm, stride_bm, stride_bk, stride_bt, BOOKS, WIDE_CODES,
                       BLOCK_O, BLOCK_J, BLOCK_G)
    words *= tl.load(scales_ptr + offs_o, mask=offs_o < out_features, other=0.0).to(tl.float32)[:, None, None]
    w_offsets = offs_o[:, None, None] * stride_wo + (offs_j[None, :, None] * G + offs_t[None, None, :]) * stride_wi
    tl.store(w_ptr + w_offsets, words.to(w_ptr.dtype.element_ty), mask=mask_oj[:, :, None] & mask_t[None, None, :])


def _code_strides(codes: Tensor, codebooks: Tensor) -> dict:
    return dict(stride_co=codes.stride(0), stride_cj=codes.stride(1), stride_cm=codes.stride(2),
                stride_bm=codebooks.stride(0), stride_bk=codebooks.stride(1), stride_bt=codebooks.stride(2))


def _code_constants(codes: Tensor, codebooks: Tensor) -> dict:
    g = codebooks.shape[2]
    return dict(G=g, BLOCK_G=triton.next_power_of_2(g), BOOKS=codes.shape[2], WIDE_CODES=codes.dtype == torch.int16)


def dequantize_triton(codes: Tensor, codebooks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """The dense weight ``[out, in]`` in ``dtype``, written by :func:`_aq_dequantize_kernel`."""
    out_features, groups, _ = codes.shape
    weight = torch.empty(out_features, groups * codebooks.shape[2], dtype=dtype, device=codes.device)
    grid = (triton.cdiv(out_features, DEQUANT_BLOCK_O), triton.cdiv(groups, DEQUANT_BLOCK_J))
    _aq_dequantize_kernel[grid](codes, codebooks, scales, weight, out_features, groups,
                                weight.stride(0), weight.stride(1), **_code_strides(codes, codebooks),
                                **_code_constants(codes, codebooks), BLOCK_O=DEQUANT_BLOCK_O,
                                BLOCK_J=DEQUANT_BLOCK_J)
    return weight


def aq_linear_triton(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """``lowrank::aq_linear`` through the Triton kernels (fused matrix-vector product for few rows)."""
    out_features, groups, _ = codes.shape
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > MAX_MATVEC_ROWS:
        return F.linear(x, dequantize_triton(codes, codebooks, scales, x.dtype), bias)
    y = torch.empty(rows.shape[0], out_features, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(out_features, meta["BLOCK_O"]),)  # noqa: E731
    _aq_matvec_kernel[grid](rows, codes, codebooks, scales, bias if bias is not None else scales, y,
                            rows.shape[0], out_features, groups, rows.stride(0), rows.stride(1), y.stride(0),
                            y.stride(1), **_code_strides(codes, codebooks), **_code_constants(codes, codebooks),
                            HAS_BIAS=bias is not None, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                            BLOCK_R=1 if rows.shape[0] == 1 else MAX_MATVEC_ROWS)
    return y.reshape(*x.shape[:-1], out_features)
