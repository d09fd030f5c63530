"""Analysis pass: the metric in which the truncation error of a K or V projection is measured.

Whitening (SVD-LLM, arXiv 2403.07378) measures a projection's error in its own
output, ``||(W - W^) X^T||_F^2``. K and V are not read as they are: K reaches
the model only through the attention scores, V only through the output
projection. Weighting each output error by where it goes:

* **K** of KV head ``h``: a query ``q`` at position ``m`` scores a key at ``n``
  with ``q^T R_(n-m) k`` (HF's RoPE ``R``, a rotation of each pair of dims
  ``(i, i + D/2)`` by ``(n - m) * inv_freq_i``), so a key error ``dk`` costs
  ``E[(q^T R_(n-m) dk)^2] = dk^T G_K dk`` with
  ``G_K = E_t[R_t Q R_t^T]`` (``t = m - n``, ``R_(-t) = R_t^T``), ``Q = sum_j W_q,j C W_q,j^T`` over the query
  heads ``j`` reading head ``h`` and ``C = X^T X`` the Gram the whitening
  already holds (q reads the same input as k: no new statistics). ``t``
  runs over the distances of causal pairs within a calibration sequence,
  each weighted by how many pairs lie that far apart.
* **V** of KV head ``h``: the merged heads go through ``o_proj``, so a value
  error ``dv`` costs ``||W_o,j dv||^2`` summed over the query heads ``j`` that
  read it: ``G_V = sum_j W_o,j^T W_o,j`` (the attention weights average the
  rows; cross terms between heads are dropped).

With ``G = R R^T`` (per group, block diagonal over its heads) and ``C = L L^T``
the rank-``r`` minimiser of ``tr(dW C dW^T G)`` truncates the SVD of
``R^T W L`` (Eckart-Young in both metrics), which
:func:`~lrcompile.passes.decomposition.decompose` does given ``output_metric``.
Measured on SmolLM2 (docs/results/smollm2.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrcompile.types import accumulation_dtype


@dataclass
class KVMetric:
    """Per KV head, the ``[D, D]`` metric of its key (``k``) and value (``v``) errors, float64."""

    k: torch.Tensor  # [kv_heads, D, D]
    v: torch.Tensor  # [kv_heads, D, D]

    def group(self, part: str, groups: int) -> list[torch.Tensor]:
        """The block-diagonal ``[g * D, g * D]`` metric of each of ``groups`` groups of consecutive heads."""
        heads = getattr(self, part)
        size = heads.shape[0] // groups
        return [torch.block_diag(*heads[g * size : (g + 1) * size]) for g in range(groups)]


def rotary_average(gram: torch.Tensor, inv_freq: torch.Tensor, length: int) -> torch.Tensor:
    """``E_t[R_t gram R_t^T]`` for ``gram [..., D, D]`` over distances ``t = 0 .. length - 1``, each weighted
    ``length - t`` (the causal pairs of a ``length``-token sequence that lie ``t`` apart).

    ``R_t = diag(c) + diag(s) J`` with ``c, s = cos, sin(t * cat(inv_freq, inv_freq))`` and ``J x =
    rotate_half(x)``, so the mean is four elementwise products of ``gram`` (or ``J gram``, ...) with the
    weighted moments ``E[c c^T]``, ``E[c s^T]``, ``E[s c^T]``, ``E[s s^T]``: no ``[T, D, D]`` buffer."""
    dtype, device = gram.dtype, gram.device
    size = gram.shape[-1]
    t = torch.arange(length, dtype=dtype, device=device)
    angles = t[:, None] * inv_freq.to(device, dtype).repeat(2)[None, :size]  # [T, D]
    weights = ((length - t) / (length - t).sum())[:, None]
    c, s = angles.cos(), angles.sin()
    half = size // 2
    rotate = torch.zeros(size, size, dtype=dtype, device=device)  # J: rotate_half as a matrix
    rotate[torch.arange(half), torch.arange(half) + half] = -1.0
    rotate[torch.arange(half) + half, torch.arange(half)] = 1.0
    turned = rotate @ gram  # J gram
    return ((weights * c).T @ c * gram + (weights * c).T @ s * (gram @ rotate.T)
            + (weights * s).T @ c * turned + (weights * s).T @ s * (turned @ rotate.T))


def kv_metric(w_q: torch.Tensor, w_o: torch.Tensor, gram: torch.Tensor, num_heads: int, num_kv_heads: int,
              inv_freq: torch.Tensor, length: int) -> KVMetric:
    """The :class:`KVMetric` of one attention block from its dense ``w_q [Hq * D, in]``, ``w_o [out, Hq * D]``,
    the Gram ``C [in, in]`` of the input q and k read, and its RoPE ``inv_freq [D / 2]``; query heads
    ``h * n_rep .. (h + 1) * n_rep - 1`` read KV head ``h`` (HF's ``repeat_kv``)."""
    dtype = accumulation_dtype(gram.device)
    head_dim = w_q.shape[0] // num_heads
    n_rep = num_heads // num_kv_heads
    q = w_q.detach().to(gram.device, dtype).reshape(num_heads, head_dim, -1)
    query_gram = q @ gram.to(dtype) @ q.mT  # [Hq, D, D]
    o = w_o.detach().to(gram.device, dtype).reshape(w_o.shape[0], num_heads, head_dim).transpose(0, 1)
    value_gram = o.mT @ o  # [Hq, D, D]
    k = rotary_average(query_gram.reshape(num_kv_heads, n_rep, head_dim, head_dim).sum(1), inv_freq, length)
    return KVMetric(k, value_gram.reshape(num_kv_heads, n_rep, head_dim, head_dim).sum(1))
