"""Truncated SVD of a weight in a space chosen by its input activations.

Every method factors ``W T = U diag(s) V^T`` for an input transform ``T`` and
maps back, ``W ~ U_k diag(s_k) V_k^T T^-1``:

* ``svd``: ``T = I`` (Eckart-Young on the weight alone).
* ``asvd``: ``T = diag(mean|x|^alpha)`` (ASVD, arXiv 2312.05821, Eq. 3-4), so
  channels with large activations (outliers) are kept by the truncation.
* ``whiten``: ``T = L`` with ``L L^T = X^T X`` (SVD-LLM, arXiv 2403.07378,
  Eq. 5-6). Then ``||(W - W_k) X^T||_F^2 = sum_{i>k} s_i^2``: the truncation
  loss is exactly the dropped squared singular values (Theorem 3.2).

All arithmetic is float64 whatever the weight dtype; factors come back in the
weight's dtype with ``sqrt(s)`` folded into each side.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lrcompile.errors import CalibrationError
from lrcompile.types import ActivationStats

log = logging.getLogger(__name__)

ASVD_MIN_SCALE = 1e-6  # relative floor for dead input channels (mean|x| = 0)


@dataclass
class LinearDecomposition:
    """``W = u diag(s) vt`` exactly at full rank; ``vt`` already carries ``T^-1``."""

    u: torch.Tensor  # [out, r] float64
    s: torch.Tensor  # [r] float64, descending
    vt: torch.Tensor  # [r, in] float64

    @property
    def full_rank(self) -> int:
        return self.s.numel()

    def factors(self, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down [rank, in], up [out, rank])`` with ``up @ down ~ W``."""
        root = self.s[:rank].sqrt()
        down = root[:, None] * self.vt[:rank]
        up = self.u[:, :rank] * root[None, :]
        return down.to(dtype).contiguous(), up.to(dtype).contiguous()

    def reconstruct(self, rank: int, dtype: torch.dtype) -> torch.Tensor:
        return ((self.u[:, :rank] * self.s[:rank]) @ self.vt[:rank]).to(dtype)

    def truncation_loss(self, rank: int) -> float:
        """Dropped energy over total energy of ``W T``: ``sum_{i>k} s_i^2 / sum_i s_i^2``."""
        energy = self.s.square()
        return float(energy[rank:].sum() / energy.sum().clamp_min(1e-300))


def regularized_cholesky(gram: torch.Tensor, layer: str) -> torch.Tensor:
    """Lower Cholesky factor of ``X^T X``, adding ``eps * mean(diag) * I`` while it is not positive definite."""
    scale = float(gram.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for eps in (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2):
        chol, info = torch.linalg.cholesky_ex(gram + eps * scale * eye)
        if int(info) == 0:
            if eps:
                log.info("layer %s: Gram matrix regularised with %.0e * mean(diag)", layer, eps)
            return chol
    raise CalibrationError(f"layer {layer!r}: the Gram matrix X^T X is not positive definite even after damping")


def decompose(
    weight: torch.Tensor,
    method: str,
    stats: ActivationStats | None = None,
    alpha: float = 0.5,
    layer: str = "",
) -> LinearDecomposition:
    """Decompose ``weight`` ``[out, in]`` with ``method`` (``svd`` | ``asvd`` | ``whiten``)."""
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    if method != "svd" and stats is None:
        raise CalibrationError(f"layer {layer!r}: method {method!r} needs activation statistics")
    if method == "svd":
        u, s, vt = torch.linalg.svd(w, full_matrices=False)
    elif method == "asvd":
        scale = stats.mean_abs.pow(alpha)
        scale = scale.clamp_min(ASVD_MIN_SCALE * float(scale.max().clamp_min(1e-300)))
        u, s, vt = torch.linalg.svd(w * scale[None, :], full_matrices=False)
        vt = vt / scale[None, :]
    elif method == "whiten":
        if stats.gram is None:
            raise CalibrationError(f"layer {layer!r}: method 'whiten' needs the Gram matrix X^T X (observe with gram=True)")
        chol = regularized_cholesky(stats.gram, layer)
        u, s, vt = torch.linalg.svd(w @ chol, full_matrices=False)
        vt = torch.linalg.solve_triangular(chol, vt, upper=False, left=False)  # vt @ L^-1
    else:
        raise ValueError(f"unknown factoring method {method!r}")
    return LinearDecomposition(u, s, vt)
