"""Triton kernels for ``lowrank::latent_attention``: reconstruct K from its latent inside the attention loop.

Each program owns one KV head ``j`` (group ``g = j // gs``) and a block of
query rows; a row is one (query token, query head) pair, so the ``n_rep``
query heads that share ``j`` (GQA) share every reconstructed key tile. Per key
tile the program

1. loads the group's latent tile ``Z [BLOCK_N, r_k]`` and multiplies it by the
   two halves of head ``j``'s up-projection (``U_j [D, r_k]``, Palu Sec. 3),
   giving both halves of ``K`` in float32 (plus the bias),
2. rotates them at the keys' own positions (HF ``rotate_half`` RoPE, cos/sin
   from ``inv_freq`` and ``rope_scale`` computed in the kernel),
3. scores them against the queries, masks (causal, bool or additive), and
4. runs an online softmax (FlashAttention) whose value operand is the group's
   *value latent* ``Z^v [BLOCK_N, r_v]``: the output stays in latent space.

Decode (one query token) splits the key sequence across programs and merges
the partial softmax states in a second kernel (FlashDecoding, Dao et al.
2023): a single token's attention has too few rows to fill the GPU otherwise.
Prefill tiles the query rows and, when causal, stops at the block's last query.

The value latent is tiled: a program accumulates ``BLOCK_RV`` (at most
``MAX_VALUE_BLOCK``) of its ``r_v`` columns, a grid axis covers the rest, so the
fp32 accumulator per thread stays bounded whatever the rank (``kv_group_size``
"all" on Llama-3-8B at kv_ratio 0.5 has ``r_v`` 512). The tiles of one (rows,
key range) recompute the key reconstruction and scores, so a rank of more than
one tile trades that work for registers; the softmax statistics are the same
in every tile and written once.

Head halves, ranks and the GQA row block are padded to powers of two (at least
16, ``tl.dot``'s minimum) and masked, so any head dim, rank and group size
works. Dots use ``input_precision="ieee"``, which only matters for float32
operands (exact float32 instead of TF32; float16/bfloat16 use tensor cores
either way). Block sizes are autotuned on CUDA and fixed (small) under
``TRITON_INTERPRET=1``. The tuning key holds every block size, the GQA factor,
the mask kind, the causal and bias flags and a key-length bucket (next power of
two, capped; see :func:`key_length_bucket`), so a configuration tuned for short
caches or one mask regime is not reused for another. (Inductor tunes these
kernels once per compiled graph instead, ignoring the key.) Fully masked query
rows give zeros, like PyTorch's SDPA.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .latent_attention import check_latent_attention_args

LOG2E = math.log2(math.e)
MIN_DOT = 16  # tl.dot needs every dimension >= 16
MAX_RANK_BLOCK = 64  # latent columns per reconstruction step
INTERPRETED = triton.knobs.runtime.interpret
MAX_VALUE_BLOCK = 16 if INTERPRETED else 128  # value-latent columns per program (small in tests: several tiles)
MAX_KEYS_BUCKET = 1 << 16  # longer caches share the last tuning bucket

MERGE_BLOCK = 4 if INTERPRETED else 16  # decode splits merged per step (small in tests: several steps)
if INTERPRETED:
    _DECODE_CONFIGS = [triton.Config({"BLOCK_N": 16}, num_warps=1)]
    _PREFILL_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1)]
else:  # all compile for sm_90; with value tiles of 128 columns none spills at head dim 128 and ranks 512
    _DECODE_CONFIGS = [
        triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
        for n, w, s in ((16, 4, 2), (32, 4, 2), (16, 8, 2), (32, 8, 2), (64, 8, 2), (16, 8, 3), (32, 8, 3), (64, 8, 3))
    ]
    # no BLOCK_M 128 with BLOCK_N 64: on an H200 (triton 3.6) it gave NaN or wrong outputs for value tiles of
    # 16-32 columns, and illegal memory accesses while autotuning (docs/results/latent_attention_kernel.md)
    _PREFILL_CONFIGS = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in ((16, 32, 4, 2), (32, 32, 4, 2), (32, 32, 4, 3), (32, 32, 8, 2), (64, 32, 8, 2),
                           (64, 64, 8, 2), (128, 32, 8, 2))
    ]
# keys_bucket is an argument only the autotuner reads (Triton keys name kernel arguments)
_TUNE_KEY = ["BLOCK_HALF", "BLOCK_R", "BLOCK_RV", "n_rep", "MASK_KIND", "IS_CAUSAL", "HAS_BIAS", "keys_bucket"]


@triton.jit
def _rope_keys(kz_ptr, stride_kzs, stride_kzr, ku_ptr, stride_kud, stride_kur, bias_ptr, freq_ptr, pos_ptr, stride_ps,
               offs_n, n_valid, k_rank, rope_scale,
               HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_R: tl.constexpr,
               HAS_BIAS: tl.constexpr):
    """Both halves ``[BLOCK_N, BLOCK_HALF]`` (float32) of one head's keys: ``Z U^T (+ bias)``, then RoPE."""
    offs_d = tl.arange(0, BLOCK_HALF)
    d_valid = offs_d < HALF
    k1 = tl.zeros([BLOCK_N, BLOCK_HALF], dtype=tl.float32)
    k2 = tl.zeros([BLOCK_N, BLOCK_HALF], dtype=tl.float32)
    for r0 in range(0, k_rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_valid = offs_r < k_rank
        z = tl.load(kz_ptr + offs_n[:, None] * stride_kzs + offs_r[None, :] * stride_kzr,
                    mask=n_valid[:, None] & r_valid[None, :], other=0.0)
        u_offs = offs_r[:, None] * stride_kur + offs_d[None, :] * stride_kud
        u_mask = r_valid[:, None] & d_valid[None, :]
        u1 = tl.load(ku_ptr + u_offs, mask=u_mask, other=0.0)
        u2 = tl.load(ku_ptr + HALF * stride_kud + u_offs, mask=u_mask, other=0.0)
        k1 = tl.dot(z, u1, k1, input_precision="ieee")
        k2 = tl.dot(z, u2, k2, input_precision="ieee")
    if HAS_BIAS:
        k1 += tl.load(bias_ptr + offs_d, mask=d_valid, other=0.0).to(tl.float32)[None, :]
        k2 += tl.load(bias_ptr + HALF + offs_d, mask=d_valid, other=0.0).to(tl.float32)[None, :]
    pos = tl.load(pos_ptr + offs_n * stride_ps, mask=n_valid, other=0).to(tl.float32)
    freq = tl.load(freq_ptr + offs_d, mask=d_valid, other=0.0)
    angle = pos[:, None] * freq[None, :]
    cos = tl.cos(angle) * rope_scale
    sin = tl.sin(angle) * rope_scale
    return k1 * cos - k2 * sin, k2 * cos + k1 * sin


@triton.jit
def _attend(q1, q2, acc, m_i, l_i, rows_t, rows_valid, mask_rows, start, end,
            kz_ptr, stride_kzs, stride_kzr, vz_ptr, stride_vzs, stride_vzr, ku_ptr, stride_kud, stride_kur,
            bias_ptr, freq_ptr, pos_ptr, stride_ps, mask_ptr, stride_ms, k_rank, v_rank, offs_c, qk_scale, rope_scale,
            HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_R: tl.constexpr,
            HAS_BIAS: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Online-softmax state ``(acc, m, l)`` of the query rows after keys ``[start, end)`` (scores in log2 units);
    ``acc`` holds the value-latent columns ``offs_c``."""
    c_valid = offs_c < v_rank
    # Inductor's launchers declare Python floats as fp64 scalars: keep the softmax state float32 regardless
    qk_scale = tl.cast(qk_scale, tl.float32)
    rope_scale = tl.cast(rope_scale, tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < end
        k1, k2 = _rope_keys(kz_ptr, stride_kzs, stride_kzr, ku_ptr, stride_kud, stride_kur, bias_ptr, freq_ptr,
                            pos_ptr, stride_ps, offs_n, n_valid, k_rank, rope_scale,
                            HALF, BLOCK_N, BLOCK_HALF, BLOCK_R, HAS_BIAS)
        s = tl.dot(q1, tl.trans(k1.to(q1.dtype)), input_precision="ieee")
        s = tl.dot(q2, tl.trans(k2.to(q2.dtype)), s, input_precision="ieee") * qk_scale
        valid = rows_valid[:, None] & n_valid[None, :]
        if IS_CAUSAL:
            valid = valid & (offs_n[None, :] <= rows_t[:, None])
        if MASK_KIND == 1:
            keep = tl.load(mask_ptr + mask_rows[:, None] + offs_n[None, :] * stride_ms, mask=valid, other=0)
            valid = valid & (keep != 0)
        if MASK_KIND == 2:
            bias = tl.load(mask_ptr + mask_rows[:, None] + offs_n[None, :] * stride_ms, mask=valid, other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634  # log2(e): the additive mask is in natural-log units
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at p = 0
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vz = tl.load(vz_ptr + offs_n[:, None] * stride_vzs + offs_c[None, :] * stride_vzr,
                     mask=n_valid[:, None] & c_valid[None, :], other=0.0)
        acc = tl.dot(p.to(vz.dtype), vz, acc * alpha[:, None], input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _load_queries(q_ptr, row_offsets, rows_valid, stride_qd, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Both halves ``[rows, BLOCK_HALF]`` of the query rows at ``row_offsets``."""
    offs_d = tl.arange(0, BLOCK_HALF)
    q_mask = rows_valid[:, None] & (offs_d < HALF)[None, :]
    ptrs = q_ptr + row_offsets[:, None] + offs_d[None, :] * stride_qd
    return tl.load(ptrs, mask=q_mask, other=0.0), tl.load(ptrs + HALF * stride_qd, mask=q_mask, other=0.0)


@triton.autotune(configs=_DECODE_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _latent_decode_split_kernel(
    q_ptr, stride_qb, stride_qh, stride_qd,
    kz_ptr, stride_kzb, stride_kzs, stride_kzr,
    vz_ptr, stride_vzb, stride_vzs, stride_vzr,
    pos_ptr, stride_pb, stride_ps,
    ku_ptr, stride_kug, stride_kud, stride_kur,
    bias_ptr, freq_ptr,
    mask_ptr, stride_mb, stride_mh, stride_ms,
    part_acc_ptr, part_m_ptr, part_l_ptr,
    num_keys, split_len, num_splits, kv_heads, group_size, n_rep, k_rank, v_rank, qk_scale, rope_scale, keys_bucket,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_RV: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One query token: program ``(b * Hk + j, split, v)`` attends the ``n_rep`` heads of KV head ``j`` over one
    split of the keys and writes the unnormalised partial state of value tile ``v`` (FlashDecoding's first pass)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    v_tile = tl.program_id(2)
    offs_c = v_tile * BLOCK_RV + tl.arange(0, BLOCK_RV)
    b = (pid // kv_heads).to(tl.int64)
    j = pid % kv_heads
    g = j // group_size
    reps = tl.arange(0, BLOCK_H)
    rows_valid = reps < n_rep
    heads = (j * n_rep + reps).to(tl.int64)
    q1, q2 = _load_queries(q_ptr + b * stride_qb, heads * stride_qh, rows_valid, stride_qd, HALF, BLOCK_HALF)
    start = split * split_len
    end = tl.minimum(start + split_len, num_keys)
    acc, m_i, l_i = _attend(
        q1, q2, tl.zeros([BLOCK_H, BLOCK_RV], dtype=tl.float32), tl.full([BLOCK_H], float("-inf"), tl.float32),
        tl.zeros([BLOCK_H], dtype=tl.float32), tl.zeros([BLOCK_H], dtype=tl.int32), rows_valid,
        b * stride_mb + heads * stride_mh, start, end,
        kz_ptr + b * stride_kzb + g * k_rank * stride_kzr, stride_kzs, stride_kzr,
        vz_ptr + b * stride_vzb + g * v_rank * stride_vzr, stride_vzs, stride_vzr,
        ku_ptr + g.to(tl.int64) * stride_kug + (j % group_size) * (2 * HALF) * stride_kud, stride_kud, stride_kur,
        bias_ptr + j * (2 * HALF), freq_ptr, pos_ptr + b * stride_pb, stride_ps, mask_ptr, stride_ms,
        k_rank, v_rank, offs_c, qk_scale, rope_scale,
        HALF, BLOCK_N, BLOCK_HALF, BLOCK_R, HAS_BIAS, MASK_KIND, IS_CAUSAL,
    )
    parts = (b * (kv_heads * n_rep) + heads) * num_splits + split
    # every value tile has the same softmax statistics: the first writes them (a vector mask, as the interpreter needs)
    first_tile = rows_valid & (tl.zeros([BLOCK_H], dtype=tl.int32) + v_tile == 0)
    tl.store(part_m_ptr + parts, m_i, mask=first_tile)
    tl.store(part_l_ptr + parts, l_i, mask=first_tile)
    tl.store(part_acc_ptr + parts[:, None] * v_rank + offs_c[None, :], acc,
             mask=rows_valid[:, None] & (offs_c < v_rank)[None, :])


@triton.jit
def _latent_decode_merge_kernel(part_acc_ptr, part_m_ptr, part_l_ptr, out_ptr, stride_ob, num_splits, q_heads, v_rank,
                                BLOCK_S: tl.constexpr, BLOCK_RV: tl.constexpr):
    """Program ``(b * Hq + h, v)`` rescales the splits' partial states of value tile ``v`` to their common maximum
    and normalises (FlashDecoding's reduction)."""
    row = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_RV + tl.arange(0, BLOCK_RV)
    c_valid = offs_c < v_rank
    m_run = tl.full([1], float("-inf"), tl.float32)
    l_run = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_RV], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_valid = offs_s < num_splits
        parts = row * num_splits + offs_s
        m_s = tl.load(part_m_ptr + parts, mask=s_valid, other=float("-inf"))
        l_s = tl.load(part_l_ptr + parts, mask=s_valid, other=0.0)
        acc_s = tl.load(part_acc_ptr + parts[:, None] * v_rank + offs_c[None, :],
                        mask=s_valid[:, None] & c_valid[None, :], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m_s, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_run - m_ref)
        w = tl.exp2(m_s - m_ref)
        l_run = l_run * alpha + tl.sum(w * l_s, 0)
        acc = acc * alpha + tl.sum(w[:, None] * acc_s, 0)
        m_run = m_new
    out = acc / tl.where(l_run > 0, l_run, 1.0)
    b = row // q_heads
    h = row % q_heads
    tl.store(out_ptr + b * stride_ob + h * v_rank + offs_c, out.to(out_ptr.dtype.element_ty), mask=c_valid)


@triton.autotune(configs=_PREFILL_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _latent_prefill_kernel(
    q_ptr, stride_qb, stride_qh, stride_qt, stride_qd,
    kz_ptr, stride_kzb, stride_kzs, stride_kzr,
    vz_ptr, stride_vzb, stride_vzs, stride_vzr,
    pos_ptr, stride_pb, stride_ps,
    ku_ptr, stride_kug, stride_kud, stride_kur,
    bias_ptr, freq_ptr,
    mask_ptr, stride_mb, stride_mh, stride_mt, stride_ms,
    out_ptr, stride_ob, stride_ot,
    num_queries, num_keys, kv_heads, group_size, n_rep, k_rank, v_rank, qk_scale, rope_scale, keys_bucket,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_RV: tl.constexpr,
    HAS_BIAS: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program ``(m, b * Hk + j, v)`` attends rows ``m * BLOCK_M ...`` of KV head ``j``'s (query token, head) pairs
    and writes their value tile ``v``."""
    pid_m = tl.program_id(0)
    pid = tl.program_id(1)
    offs_c = tl.program_id(2) * BLOCK_RV + tl.arange(0, BLOCK_RV)
    b = (pid // kv_heads).to(tl.int64)
    j = pid % kv_heads
    g = j // group_size
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_t = rows // n_rep
    rows_valid = rows_t < num_queries
    heads = (j * n_rep + rows % n_rep).to(tl.int64)
    t64 = rows_t.to(tl.int64)
    q1, q2 = _load_queries(q_ptr + b * stride_qb, heads * stride_qh + t64 * stride_qt, rows_valid, stride_qd,
                           HALF, BLOCK_HALF)
    end = num_keys
    if IS_CAUSAL:
        last_t = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // n_rep, num_queries - 1)
        end = tl.minimum(end, last_t + 1)
    acc, m_i, l_i = _attend(
        q1, q2, tl.zeros([BLOCK_M, BLOCK_RV], dtype=tl.float32), tl.full([BLOCK_M], float("-inf"), tl.float32),
        tl.zeros([BLOCK_M], dtype=tl.float32), rows_t, rows_valid,
        b * stride_mb + heads * stride_mh + t64 * stride_mt, 0, end,
        kz_ptr + b * stride_kzb + g * k_rank * stride_kzr, stride_kzs, stride_kzr,
        vz_ptr + b * stride_vzb + g * v_rank * stride_vzr, stride_vzs, stride_vzr,
        ku_ptr + g.to(tl.int64) * stride_kug + (j % group_size) * (2 * HALF) * stride_kud, stride_kud, stride_kur,
        bias_ptr + j * (2 * HALF), freq_ptr, pos_ptr + b * stride_pb, stride_ps, mask_ptr, stride_ms,
        k_rank, v_rank, offs_c, qk_scale, rope_scale,
        HALF, BLOCK_N, BLOCK_HALF, BLOCK_R, HAS_BIAS, MASK_KIND, IS_CAUSAL,
    )
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_ptrs = out_ptr + b * stride_ob + t64[:, None] * stride_ot + heads[:, None] * v_rank + offs_c[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=rows_valid[:, None] & (offs_c < v_rank)[None, :])


def _block(n: int) -> int:
    """A ``tl.dot``-able block covering ``n`` (a power of two, at least 16)."""
    return max(MIN_DOT, triton.next_power_of_2(n))


def key_length_bucket(num_keys):
    """The tuning bucket of a key length: its next power of two, from 16 up to ``MAX_KEYS_BUCKET``.

    Written as a sum of ``min(1, n // (step + 1))`` terms (floor divisions and minima only), so a symbolic length
    traced for ``torch.compile`` adds no guard: the bucket is an expression of it, evaluated per call.
    """
    bucket, step = MIN_DOT, MIN_DOT
    while step < MAX_KEYS_BUCKET:
        bucket += step * torch.sym_min(1, num_keys // (step + 1))
        step *= 2
    return bucket


def _broadcast_strides(t: Tensor, dims: int) -> list[int]:
    """Strides of ``t`` broadcast (from the left) to ``dims`` dimensions: 0 along every size-1 dimension."""
    shape = [1] * (dims - t.dim()) + list(t.shape)
    strides = [0] * (dims - t.dim()) + list(t.stride())
    return [0 if size == 1 else stride for size, stride in zip(shape, strides)]


def _decode_split_len(num_keys: int, kv_programs: int, device: torch.device) -> int:
    """Keys per decode split: enough splits that ``kv_programs`` (``B * Hk``) times splits fills about two waves
    of the GPU's SMs; a multiple of 64 keys (on CPU, i.e. under the interpreter: 16 keys, 16 programs). Floor
    divisions only, so a symbolic sequence length adds no guard."""
    if device.type == "cuda":
        target, align = 2 * torch.cuda.get_device_properties(device).multi_processor_count, 64
    else:
        target, align = 16, 16
    splits = (target + kv_programs - 1) // kv_programs
    return ((num_keys + splits - 1) // splits + align - 1) // align * align


def latent_attention_triton(
    query: Tensor,
    k_latent: Tensor,
    v_latent: Tensor,
    key_positions: Tensor,
    k_up: Tensor,
    k_bias: Tensor | None,
    inv_freq: Tensor,
    rope_scale: float,
    mask: Tensor | None,
    scale: float,
    is_causal: bool,
) -> Tensor:
    """``lowrank::latent_attention`` with the Triton kernels (decode when there is one query token, else prefill).

    Kernels are launched through :func:`torch.library.wrap_triton`, so tracing this function (AOTAutograd under
    ``torch.compile``) records them as Triton kernel nodes that Inductor compiles into its output code.
    """
    check_latent_attention_args(query, k_latent, v_latent, key_positions, k_up, inv_freq)
    batch, q_heads, length, head_dim = query.shape
    num_keys = k_latent.shape[1]
    groups, width, k_rank = k_up.shape
    kv_heads = groups * width // head_dim
    n_rep = q_heads // kv_heads
    v_rank = v_latent.shape[-1] // groups
    out = query.new_empty(batch, length, q_heads * v_rank)
    if inv_freq.dtype != torch.float32:
        inv_freq = inv_freq.to(torch.float32)
    mask_kind = 0 if mask is None else 1 if mask.dtype == torch.bool else 2
    mask_strides = [0, 0, 0, 0] if mask is None else _broadcast_strides(mask, 4)
    pos_strides = _broadcast_strides(key_positions, 2)
    block_rv = min(MAX_VALUE_BLOCK, _block(v_rank))
    v_tiles = triton.cdiv(v_rank, block_rv)
    shared = dict(
        kz_ptr=k_latent, stride_kzb=k_latent.stride(0), stride_kzs=k_latent.stride(1), stride_kzr=k_latent.stride(2),
        vz_ptr=v_latent, stride_vzb=v_latent.stride(0), stride_vzs=v_latent.stride(1), stride_vzr=v_latent.stride(2),
        pos_ptr=key_positions, stride_pb=pos_strides[0], stride_ps=pos_strides[1],
        ku_ptr=k_up, stride_kug=k_up.stride(0), stride_kud=k_up.stride(1), stride_kur=k_up.stride(2),
        bias_ptr=inv_freq if k_bias is None else k_bias, freq_ptr=inv_freq,
        mask_ptr=inv_freq if mask is None else mask, stride_mb=mask_strides[0], stride_mh=mask_strides[1],
        stride_ms=mask_strides[3],
        kv_heads=kv_heads, group_size=kv_heads // groups, n_rep=n_rep, k_rank=k_rank, v_rank=v_rank,
        qk_scale=scale * LOG2E, rope_scale=rope_scale,
        keys_bucket=key_length_bucket(num_keys),
        HALF=head_dim // 2, BLOCK_HALF=_block(head_dim // 2), BLOCK_R=min(MAX_RANK_BLOCK, _block(k_rank)),
        BLOCK_RV=block_rv, HAS_BIAS=k_bias is not None, MASK_KIND=mask_kind,
        IS_CAUSAL=bool(is_causal) and mask is None,
    )
    if length == 1:
        split_len = _decode_split_len(num_keys, batch * kv_heads, query.device)
        num_splits = (num_keys + split_len - 1) // split_len
        part_m = torch.empty(batch * q_heads * num_splits, device=query.device, dtype=torch.float32)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(batch * q_heads * num_splits * v_rank, device=query.device, dtype=torch.float32)
        wrap_triton(_latent_decode_split_kernel)[(batch * kv_heads, num_splits, v_tiles)](
            q_ptr=query, stride_qb=query.stride(0), stride_qh=query.stride(1), stride_qd=query.stride(3),
            part_acc_ptr=part_acc, part_m_ptr=part_m, part_l_ptr=part_l,
            num_keys=num_keys, split_len=split_len, num_splits=num_splits, BLOCK_H=_block(n_rep), **shared,
        )
        wrap_triton(_latent_decode_merge_kernel)[(batch * q_heads, v_tiles)](
            part_acc, part_m, part_l, out, out.stride(0), num_splits, q_heads, v_rank,
            BLOCK_S=MERGE_BLOCK, BLOCK_RV=block_rv,
        )
        return out

    def grid(meta):
        return (triton.cdiv(length * n_rep, meta["BLOCK_M"]), batch * kv_heads, v_tiles)

    wrap_triton(_latent_prefill_kernel)[grid](
        q_ptr=query, stride_qb=query.stride(0), stride_qh=query.stride(1), stride_qt=query.stride(2),
        stride_qd=query.stride(3), stride_mt=mask_strides[2],
        out_ptr=out, stride_ob=out.stride(0), stride_ot=out.stride(1), num_queries=length, num_keys=num_keys,
        **shared,
    )
    return out
