"""Unit tests of passes/kv_metrics.py: the metrics that weigh latent K errors by the scores, V errors by o_proj."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lrcompile.passes.kv_metrics import KVMetric, kv_metric, rotary_average


def _rope(x: torch.Tensor, position: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """HF's ``x * cos + rotate_half(x) * sin`` at one position."""
    angles = position * torch.cat([inv_freq, inv_freq])
    half = x.shape[-1] // 2
    return x * angles.cos() + torch.cat([-x[..., half:], x[..., :half]], -1) * angles.sin()


@settings(max_examples=10, deadline=None)
@given(half=st.integers(1, 6), length=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_rotary_average_is_the_mean_over_causal_pairs(half, length, seed):
    """``dk^T G dk`` is the mean over causal pairs ``n <= m`` of the squared score error ``(R_m q)^T (R_n dk)``
    summed over the queries that built ``gram``."""
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(5, 2 * half, generator=g, dtype=torch.float64)
    inv_freq = torch.rand(half, generator=g, dtype=torch.float64) * 2
    dk = torch.randn(2 * half, generator=g, dtype=torch.float64)
    got = dk @ rotary_average(queries.T @ queries, inv_freq, length) @ dk
    pairs = [(m, n) for m in range(length) for n in range(m + 1)]
    want = sum(float((_rope(queries, m, inv_freq) @ _rope(dk, n, inv_freq)).square().sum()) for m, n in pairs)
    assert float(got) == pytest.approx(want / len(pairs), rel=1e-9)


def test_rotary_average_keeps_a_batch_of_heads_apart():
    g = torch.Generator().manual_seed(0)
    grams = torch.randn(3, 8, 8, generator=g, dtype=torch.float64)
    inv_freq = torch.rand(4, generator=g, dtype=torch.float64)
    together = rotary_average(grams, inv_freq, 9)
    assert all(torch.allclose(together[h], rotary_average(grams[h], inv_freq, 9)) for h in range(3))


def test_kv_metric_weighs_keys_by_their_queries_and_values_by_the_output_projection():
    """K: per KV head, the Gram of the pre-RoPE queries of the heads that read it (``repeat_kv``: query heads
    ``2h, 2h + 1`` of 4 read KV head ``h`` of 2), rotation-averaged; with length 1 (no distance), exactly that
    Gram. V: ``||W_o,j dv||^2`` summed over those heads. The Gram C of the input stands in for the data."""
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, head_dim, hidden = 4, 2, 6, 10
    x = torch.randn(40, hidden, generator=g, dtype=torch.float64)
    w_q = torch.randn(heads * head_dim, hidden, generator=g, dtype=torch.float64)
    w_o = torch.randn(hidden, heads * head_dim, generator=g, dtype=torch.float64)
    inv_freq = torch.rand(head_dim // 2, generator=g, dtype=torch.float64)
    metric = kv_metric(w_q, w_o, x.T @ x, heads, kv_heads, inv_freq, length=1)
    q = (x @ w_q.T).reshape(40, heads, head_dim)
    dv = torch.randn(head_dim, generator=g, dtype=torch.float64)
    for h in range(kv_heads):
        readers = (2 * h, 2 * h + 1)
        assert torch.allclose(metric.k[h], sum(q[:, j].T @ q[:, j] for j in readers))
        cost = sum(float((w_o[:, j * head_dim:(j + 1) * head_dim] @ dv).square().sum()) for j in readers)
        assert float(dv @ metric.v[h] @ dv) == pytest.approx(cost)
    longer = kv_metric(w_q, w_o, x.T @ x, heads, kv_heads, inv_freq, length=16)
    assert torch.allclose(longer.k, rotary_average(metric.k, inv_freq, 16)) and torch.equal(longer.v, metric.v)


def test_group_metric_is_block_diagonal_over_the_group_heads():
    heads = torch.arange(4 * 9, dtype=torch.float64).reshape(4, 3, 3)
    metric = KVMetric(heads, heads + 1)
    pairs = metric.group("k", 2)
    assert len(pairs) == 2 and pairs[1].shape == (6, 6)
    assert torch.equal(pairs[1][:3, :3], heads[2]) and torch.equal(pairs[1][3:, 3:], heads[3])
    assert not pairs[1][:3, 3:].any()
    assert torch.equal(metric.group("v", 4)[3], heads[3] + 1)
