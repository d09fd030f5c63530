"""``lowrank::latent_attention``: softmax attention whose K and V live as low-rank latents.

Palu (arXiv 2407.21118, Sec. 3) factors each group of ``gs`` KV heads as
``K_g = Z_g U_g^T`` with a latent ``Z_g = X D_g^T`` of rank ``r`` per token.
Only ``Z`` is cached. Per query head ``h`` (KV head ``j = h // n_rep``, group
``g = j // gs``) the op

1. reconstructs the group's keys ``K = Z^k_g U^k_g^T (+ bias)`` for every head of the group,
2. applies RoPE at each key's own position from the model's ``inv_freq`` and
   attention scaling (the latent is pre-RoPE: RoPE does not commute with the
   low-rank factor),
3. runs softmax attention with ``query`` (RoPE already applied) under the
   mask, and
4. accumulates the *value latent* ``Z^v_g`` instead of ``V``. The caller folds
   each head's value up-projection into the output projection
   (``W_o[:, h] U^v_j``, Palu Eq. 6), so the output stays ``[B, T, Hq * r_v]``.

The reference below is plain PyTorch; the fake implementation serves tracing.
On CPU, Inductor compiles the reference's decomposition (see
:func:`register_cpu_decomposition`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, rope_scale: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """HF's rotary tables: ``cos/sin(cat(p * inv_freq, p * inv_freq)) * scale``, computed in float32."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * rope_scale).to(dtype), (emb.sin() * rope_scale).to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reconstruct_keys(
    k_latent: Tensor, key_positions: Tensor, k_up: Tensor, k_bias: Tensor | None, inv_freq: Tensor, rope_scale: float
) -> Tensor:
    """Keys ``[B, Hk, S, D]`` with RoPE, from latents ``[B, S, G * r]`` and up-projections ``[G, gs * D, r]``."""
    batch, length, _ = k_latent.shape
    groups, width, rank = k_up.shape
    head_dim = 2 * inv_freq.shape[-1]
    heads = groups * width // head_dim
    keys = torch.einsum("bsgr,gdr->bsgd", k_latent.reshape(batch, length, groups, rank), k_up)
    keys = keys.reshape(batch, length, heads, head_dim)
    if k_bias is not None:
        keys = keys + k_bias.reshape(heads, head_dim)
    keys = keys.transpose(1, 2)
    cos, sin = rope_cos_sin(key_positions, inv_freq, rope_scale, keys.dtype)
    cos, sin = cos[:, None], sin[:, None]
    return keys * cos + rotate_half(keys) * sin


def latent_attention_reference(
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
    """Plain-PyTorch latent attention; see the module docstring for the shapes."""
    batch, q_heads, length, _ = query.shape
    groups = k_up.shape[0]
    v_rank = v_latent.shape[-1] // groups
    keys = reconstruct_keys(k_latent, key_positions.expand(batch, -1), k_up, k_bias, inv_freq, rope_scale)
    kv_heads = keys.shape[1]
    keys = keys.repeat_interleave(q_heads // kv_heads, dim=1)
    values = v_latent.reshape(batch, -1, groups, v_rank).transpose(1, 2)
    values = values.repeat_interleave(q_heads // groups, dim=1)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, is_causal=is_causal, scale=scale)
    return out.transpose(1, 2).reshape(batch, length, q_heads * v_rank)


def check_latent_attention_args(query: Tensor, k_latent: Tensor, v_latent: Tensor, key_positions: Tensor, k_up: Tensor,
                                inv_freq: Tensor) -> None:
    """Shape contract of the op (raised at trace time, before any kernel runs)."""
    if query.dim() != 4 or k_latent.dim() != 3 or v_latent.dim() != 3 or k_up.dim() != 3:
        raise ValueError(
            f"latent_attention: expected query [B, Hq, T, D], latents [B, S, R] and k_up [G, gs*D, r]; got "
            f"{tuple(query.shape)}, {tuple(k_latent.shape)}, {tuple(v_latent.shape)}, {tuple(k_up.shape)}"
        )
    batch, q_heads, _, head_dim = query.shape
    groups, width, rank = k_up.shape
    if 2 * inv_freq.shape[-1] != head_dim or width % head_dim or k_latent.shape[-1] != groups * rank:
        raise ValueError(
            f"latent_attention: head_dim {head_dim}, inv_freq {tuple(inv_freq.shape)}, k_up {tuple(k_up.shape)} and "
            f"k_latent {tuple(k_latent.shape)} disagree"
        )
    kv_heads = groups * width // head_dim
    if q_heads % kv_heads or v_latent.shape[-1] % groups or v_latent.shape[:2] != k_latent.shape[:2]:
        raise ValueError(
            f"latent_attention: {q_heads} query heads, {kv_heads} KV heads in {groups} groups, v_latent "
            f"{tuple(v_latent.shape)}, k_latent {tuple(k_latent.shape)} disagree"
        )
    if key_positions.shape[-1] != k_latent.shape[1] or key_positions.shape[0] not in (1, batch):
        raise ValueError(f"latent_attention: key_positions {tuple(key_positions.shape)} do not match k_latent {tuple(k_latent.shape)}")


@torch.library.custom_op("lowrank::latent_attention", mutates_args=())
def latent_attention(
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
    """Attention over latent K/V; returns the value-latent output ``[B, T, Hq * r_v]``."""
    return latent_attention_reference(query, k_latent, v_latent, key_positions, k_up, k_bias, inv_freq, rope_scale,
                                      mask, scale, is_causal)


@latent_attention.register_fake
def _(query, k_latent, v_latent, key_positions, k_up, k_bias, inv_freq, rope_scale, mask, scale, is_causal):
    check_latent_attention_args(query, k_latent, v_latent, key_positions, k_up, inv_freq)
    batch, q_heads, length, _ = query.shape
    v_rank = v_latent.shape[-1] // k_up.shape[0]
    return query.new_empty(batch, length, q_heads * v_rank)


def _setup_context(ctx, inputs, output) -> None:
    query, k_latent, v_latent, key_positions, k_up, k_bias, inv_freq, rope_scale, mask, scale, is_causal = inputs
    ctx.save_for_backward(query, k_latent, v_latent, key_positions, k_up, k_bias, inv_freq, mask)
    ctx.rope_scale, ctx.scale, ctx.is_causal = rope_scale, scale, is_causal


def _backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
    """Gradients of the reference (``torch.func.vjp``) for query, latents, ``k_up`` and ``k_bias``: the op is
    differentiable like the attention it replaces, so a model that requires grad compiles (and can be tuned)."""
    query, k_latent, v_latent, key_positions, k_up, k_bias, inv_freq, mask = ctx.saved_tensors

    def attend(q: Tensor, kl: Tensor, vl: Tensor, ku: Tensor, *kb: Tensor) -> Tensor:
        return latent_attention_reference(q, kl, vl, key_positions, ku, kb[0] if kb else None, inv_freq, ctx.rope_scale,
                                          mask, ctx.scale, ctx.is_causal)

    primals = (query, k_latent, v_latent, k_up) + ((k_bias,) if k_bias is not None else ())
    _, vjp = torch.func.vjp(attend, *primals)
    grads = vjp(grad)
    return (grads[0], grads[1], grads[2], None, grads[3], grads[4] if k_bias is not None else None,
            None, None, None, None, None)


latent_attention.register_autograd(_backward, setup_context=_setup_context)


def register_cpu_decomposition() -> None:
    """Let Inductor compile the op on CPU from the reference's aten ops instead of calling it opaquely."""
    from torch._inductor.decomposition import register_decomposition

    @register_decomposition(torch.ops.lowrank.latent_attention.default)
    def _decompose(query, k_latent, v_latent, key_positions, k_up, k_bias, inv_freq, rope_scale, mask, scale, is_causal):
        if query.device.type != "cpu":
            return NotImplemented
        return latent_attention_reference(query, k_latent, v_latent, key_positions, k_up, k_bias, inv_freq, rope_scale,
                                          mask, scale, is_causal)


register_cpu_decomposition()

from . import latent_attention_cuda  # noqa: E402,F401  (CUDA: Triton kernels, eager and under Inductor; defined on first use)
