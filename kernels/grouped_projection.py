"""``lowrank::grouped_up_projection``: the up-projection of a group-head low-rank K or V projection.

Palu (arXiv 2407.21118, Sec. 3.2) factors each group ``g`` of KV heads as
``W_g ~ U_g D_g``. With the latents of all groups side by side,
``z = [D_1 x, ..., D_G x]`` (``[..., G * r]``), the projection is
``[U_1 z_1, ..., U_G z_G] + b`` (``[..., G * w]``). The same op applies V's
up-projection per query head after latent attention (``G`` = query heads).

An op rather than an einsum so that graph passes recognise a restructured
projection by its target; Inductor compiles it from its decomposition.
"""

from __future__ import annotations

import torch
from torch import Tensor


def grouped_up_projection_reference(latent: Tensor, up: Tensor, bias: Tensor | None) -> Tensor:
    """``[..., G * r]`` latents times ``up [G, w, r]`` per group, plus ``bias [G * w]``."""
    groups, _, rank = up.shape
    out = torch.einsum("...gr,gwr->...gw", latent.unflatten(-1, (groups, rank)), up).flatten(-2)
    return out if bias is None else out + bias


@torch.library.custom_op("lowrank::grouped_up_projection", mutates_args=())
def grouped_up_projection(latent: Tensor, up: Tensor, bias: Tensor | None) -> Tensor:
    """See the module docstring."""
    return grouped_up_projection_reference(latent, up, bias)


@grouped_up_projection.register_fake
def _(latent, up, bias):
    groups, width, rank = up.shape
    if latent.shape[-1] != groups * rank:
        raise ValueError(f"grouped_up_projection: latent {tuple(latent.shape)} does not hold {groups} groups of rank {rank}")
    return latent.new_empty(*latent.shape[:-1], groups * width)


def _setup_context(ctx, inputs, output) -> None:
    latent, up, bias = inputs
    ctx.save_for_backward(latent, up)
    ctx.has_bias = bias is not None


def _backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of ``out_g = U_g z_g + b_g``: ``z_g -> U_g^T grad_g``, ``U_g -> sum grad_g z_g^T``, ``b -> sum grad``."""
    latent, up = ctx.saved_tensors
    groups, width, rank = up.shape
    grad_g = grad.unflatten(-1, (groups, width))
    latent_g = latent.unflatten(-1, (groups, rank))
    grad_latent = torch.einsum("...gw,gwr->...gr", grad_g, up).flatten(-2)
    grad_up = torch.einsum("...gw,...gr->gwr", grad_g, latent_g)
    grad_bias = grad.reshape(-1, groups * width).sum(0) if ctx.has_bias else None
    return grad_latent, grad_up, grad_bias


grouped_up_projection.register_autograd(_backward, setup_context=_setup_context)


def _register_decomposition() -> None:
    """Inductor compiles the op from the reference's aten ops (any device)."""
    from torch._inductor.decomposition import register_decomposition

    register_decomposition(torch.ops.lowrank.grouped_up_projection.default)(grouped_up_projection_reference)


_register_decomposition()
