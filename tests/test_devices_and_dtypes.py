"""Dtype and device propagation through every pass (issue 11, item 4), on CPU.

A float64, bfloat16 or float16 model compresses (weights and latent KV) and runs: every tensor the passes create
for the model is in the model's dtype and on its weights' device, statistics and SVDs are float64 on that device,
and the compiled, eager and latent-cache paths agree within the dtype's round-off.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_rope_model, token_batches

import lrcompile
from lrcompile.modules import compressed_modules
from lrcompile.passes.decomposition import decompose
from lrcompile.types import ActivationStats

DTYPES = (torch.float64, torch.bfloat16, torch.float16)
TOLERANCE = {torch.float64: 1e-9, torch.bfloat16: 0.1, torch.float16: 2e-2}  # logits of the same factors, two paths


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compressed(dtype: torch.dtype) -> torch.nn.Module:
    model = tiny_rope_model("llama").to(dtype)
    options = lrcompile.LowRankConfig(calibration=token_batches(4), param_ratio=0.5, kv_ratio=0.5,
                                      kv_group_size="all", kv_allocation="closed_form", compiler="aot_eager")
    model.forward = torch.compile(model.forward, backend="lowrank", options=options)
    with torch.no_grad():
        model(token_batches(1, seed=3)[0], use_cache=False)  # the first call compresses
    return model


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compressed_tensors_keep_the_models_dtype_and_device(dtype):
    model = _compressed(dtype)
    device = model.model.embed_tokens.weight.device
    modules = dict(compressed_modules(model))
    assert any(type(m).__name__ == "LowRankLinear" for m in modules.values())
    assert any(type(m).__name__ == "GroupedLowRankProjection" for m in modules.values())
    for name, module in modules.items():
        for part, tensor in module.named_parameters():
            assert (tensor.dtype, tensor.device) == (dtype, device), f"{name}.{part}"
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        compiled = model(ids, use_cache=False).logits
        eager = model.forward._torchdynamo_orig_callable(ids, use_cache=False).logits
    assert compiled.dtype == dtype and torch.isfinite(compiled).all()
    assert (compiled.double() - eager.double()).abs().max() <= TOLERANCE[dtype] * eager.double().abs().max()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_latent_cache_follows_the_models_dtype(dtype):
    model = _compressed(dtype)
    prompt = token_batches(1, batch=2, seq=6, seed=5)[0]
    cache = lrcompile.LatentKVCache(model, batch_size=2, max_cache_len=12)
    assert {layer.k_latent.dtype for layer in cache.layers} == {dtype}
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), cache=cache, max_new_tokens=4,
                             do_sample=False)
    assert out.shape == (2, 10)


def test_cache_follows_a_dtype_change_after_compression():
    model = _compressed(torch.float32).to(torch.float64)
    cache = lrcompile.LatentKVCache(model, batch_size=1, max_cache_len=8)
    assert {layer.k_latent.dtype for layer in cache.layers} == {torch.float64}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_statistics_and_factors_precision(dtype):
    """Statistics accumulate in float64 on the activations' device; factors come back in the weight's dtype there."""
    torch.manual_seed(0)
    x = torch.randn(64, 16, dtype=dtype)
    stats = ActivationStats.empty(16)
    stats.update(x)
    assert stats.gram.dtype == torch.float64 and stats.gram.device == x.device
    weight = torch.randn(8, 16, dtype=dtype)
    decomposition = decompose(weight, "whiten", stats, layer="w")
    assert decomposition.s.dtype == torch.float64 and decomposition.s.device == weight.device
    down, up = decomposition.factors(4, weight.dtype)
    assert (down.dtype, up.dtype, down.device) == (dtype, dtype, weight.device)
    exact = decomposition.reconstruct(8, torch.float64)
    assert torch.allclose(exact, weight.double(), atol=1e-9)


def test_statistics_move_to_the_activations_device():
    """Statistics start on the CPU and accumulate where the first activations live (here the meta device stands in
    for a GPU: no CPU copy of the activations is made)."""
    stats = ActivationStats.empty(16)
    stats.update(torch.empty(3, 5, 16, dtype=torch.bfloat16, device="meta"))
    assert {t.device.type for t in (stats.abs_sum, stats.abs_max, stats.gram)} == {"meta"}
    assert stats.gram.dtype == torch.float64 and stats.rows == 15
