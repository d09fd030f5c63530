"""LatentKVCache under what transformers' generate does to a cache: beam search, several sequences per prompt,
batch repeat/select, assisted decoding (crop), and eager calls; compared with a dense cache of the same model."""

from __future__ import annotations

import functools
import inspect
import traceback

import pytest
import torch
from tiny_models import left_padded_prompts, tiny_rope_model, token_batches
from transformers import DynamicCache

import lrcompile
from lrcompile import LatentKVCache
from lrcompile.errors import LatentCacheError


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compressed(**options) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny Llama and its twin (same weights) compressed at kv_ratio 1.0, exact up to round-off."""
    dense, model = tiny_rope_model("llama"), tiny_rope_model("llama")
    config = lrcompile.LowRankConfig(**{**dict(param_ratio=1.0, kv_ratio=1.0, kv_allocation="uniform", method="svd",
                                               compiler="aot_eager"), **options})
    ids, mask = left_padded_prompts([4])
    lrcompile.generate(model, ids, mask, options=config, max_new_tokens=1)
    return dense, model


def test_beam_search_reorders_the_latents_in_place_and_matches_the_dense_cache(monkeypatch):
    dense, model = _compressed()
    ids, mask = left_padded_prompts([7, 4])
    kw = dict(max_new_tokens=8, min_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False,
              output_scores=True, return_dict_in_generate=True)
    expected = dense.generate(ids, attention_mask=mask, **kw)
    cache = LatentKVCache(model, batch_size=2 * 3, max_cache_len=7 + 8)
    buffers = [(layer.k_latent, layer.v_latent) for layer in cache.layers]
    orders = []
    reorder = LatentKVCache.reorder_cache
    monkeypatch.setattr(LatentKVCache, "reorder_cache", lambda self, idx: (orders.append(idx.clone()), reorder(self, idx)))
    out = lrcompile.generate(model, ids, mask, cache=cache, **kw)
    assert any(not torch.equal(order, torch.arange(6)) for order in orders)  # beams did swap rows
    assert torch.equal(out.sequences, expected.sequences)
    assert torch.allclose(out.sequences_scores, expected.sequences_scores, atol=1e-5)
    assert all(layer.k_latent is k and layer.v_latent is v for layer, (k, v) in zip(cache.layers, buffers))


def test_several_sequences_per_prompt_need_a_cache_row_each():
    dense, model = _compressed()
    ids, mask = left_padded_prompts([5, 3])
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=True, top_k=20, num_return_sequences=3)
    with pytest.raises(Exception, match=r"latent KV cache built for batch 2, called with batch 6; generate runs "
                                        r"num_beams .* batch_size = prompts \* max\(num_beams, num_return_sequences\)"
                       ) as excinfo:
        model.generate(ids, attention_mask=mask, past_key_values=LatentKVCache(model, 2, 5 + 6), **kw)
    assert isinstance(excinfo.value.inner_exception, LatentCacheError)  # raised compiling the write, before it runs
    torch.manual_seed(0)
    expected = dense.generate(ids, attention_mask=mask, **kw)
    torch.manual_seed(0)
    out = model.generate(ids, attention_mask=mask, past_key_values=LatentKVCache(model, 2 * 3, 5 + 6), **kw)
    assert torch.equal(out, expected)


def test_batch_repeat_and_select_match_a_dense_cache():
    dense, model = _compressed()
    latent, dynamic = LatentKVCache(model, batch_size=2, max_cache_len=10), DynamicCache()
    prompt = token_batches(1, batch=2, seq=6)[0]
    with torch.no_grad():
        model(prompt, past_key_values=latent)
        dense(prompt, past_key_values=dynamic)
        for cache in (latent, dynamic):
            cache.batch_repeat_interleave(2)  # rows 0, 0, 1, 1
        step = torch.tensor([[5], [6], [7], [8]])
        assert latent.batch_size == 4 and all(int(layer.length) == 6 for layer in latent.layers)
        got, want = model(step, past_key_values=latent).logits, dense(step, past_key_values=dynamic).logits
        assert (got - want).abs().max() < 1e-5
        for cache in (latent, dynamic):
            cache.batch_select_indices(torch.tensor([3, 0]))  # rows 1 (then 8) and 0 (then 5)
        step = torch.tensor([[9], [10]])
        got, want = model(step, past_key_values=latent).logits, dense(step, past_key_values=dynamic).logits
    assert (got - want).abs().max() < 1e-5
    assert latent.batch_size == 2 and all(layer.positions is latent.layers[0].positions for layer in latent.layers)
    assert latent.layers[0].positions[:, :8].tolist() == [list(range(8))] * 2


def test_assisted_decoding_crops_the_latent_cache_and_matches_the_dense_cache(monkeypatch):
    dense, model = _compressed()
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])  # repeats, so prompt lookup proposes candidates
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3)
    expected = dense.generate(ids, **kw)
    crops = []
    crop = LatentKVCache.crop
    monkeypatch.setattr(LatentKVCache, "crop", lambda self, n: (crops.append(n), crop(self, n)))
    out = model.generate(ids, past_key_values=LatentKVCache(model, 1, 10 + 12 + 3), **kw)
    assert torch.equal(out, expected)
    assert any(n < 0 for n in crops)  # rejected candidates were dropped from the cache


def test_eager_calls_are_refused_and_leave_the_cache_untouched():
    dense, model = _compressed()  # an ordinary model: an eager forward reaches the cache
    ids, mask = left_padded_prompts([6, 3])
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    eager_use = (r"model.layers.0.self_attn ran eagerly with a LatentKVCache, which holds latents only compiled graphs "
                 r"can write; call the model through its forward compiled with backend='lowrank'.* or give eager calls "
                 r"a transformers DynamicCache")
    cache = LatentKVCache(model, 2, 6 + 5)
    with torch.compiler.set_stance("force_eager"), pytest.raises(LatentCacheError, match=eager_use):
        model.generate(ids, attention_mask=mask, past_key_values=cache, **kw)
    assert [int(layer.length) for layer in cache.layers] == [0, 0]  # nothing counted that was not written
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, **kw)  # compiled, after the eager attempt
    assert torch.equal(out, dense.generate(ids, attention_mask=mask, **kw))
    latents = [layer.k_latent.clone() for layer in cache.layers]
    with torch.compiler.set_stance("force_eager"), pytest.raises(LatentCacheError, match=eager_use):
        model(out[:, -1:], past_key_values=cache)
    assert [int(layer.length) for layer in cache.layers] == [6 + 5 - 1] * 2
    assert all(torch.equal(layer.k_latent, k) for layer, k in zip(cache.layers, latents))


def test_many_models_generate_in_one_process():
    """Every model ``lrcompile.generate`` compiles gets a Dynamo cache of its own: with one shared forward code
    object, the third model here hit ``recompile_limit`` and ran eagerly into its LatentKVCache."""
    ids, mask = left_padded_prompts([6, 4])
    config = lrcompile.LowRankConfig(calibration=token_batches(2), kv_ratio=0.5, compiler="eager")
    models = [tiny_rope_model("llama", seed=seed) for seed in range(3)]
    first = [lrcompile.generate(model, ids, mask, options=config, max_new_tokens=4, do_sample=False)
             for model in models]
    again = lrcompile.generate(models[0], ids, mask, max_new_tokens=4, do_sample=False)  # its graphs are kept
    assert torch.equal(again, first[0])


def test_crop_and_offload_name_what_to_do():
    _, model = _compressed()
    cache = LatentKVCache(model, 1, 8)
    with pytest.raises(LatentCacheError, match=r"crop\(2\): pass minus the number of tokens to remove"):
        cache.crop(2)
    with pytest.raises(LatentCacheError, match=r"crop\(-1\) on model.layers.0.self_attn, which holds 0 tokens"):
        cache.crop(-1)
    with pytest.raises(LatentCacheError, match="model.layers.0.self_attn: a LatentKVCache cannot be offloaded"):
        cache.offload(0)


HOST_READS = ("item", "tolist", "__int__", "__index__", "__bool__", "__float__")


def test_a_decode_step_reads_no_tensor_value_on_the_host(monkeypatch):
    """A decode step (one token through the compiled forward: latent cache write + attention) never copies a tensor
    value to the host: on CUDA each such read is a synchronisation, and it breaks CUDA-graph capture. Every
    Python-level read (``int(t)``, ``t.item()``, ``bool(t)``, ...) made while a warm forward runs one token is
    recorded."""
    _, model = _compressed()
    ids, mask = left_padded_prompts([5, 3])
    cache = LatentKVCache(model, 2, 5 + 4)
    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    kw = dict(attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, **{name: cache})
    expected = model.generate(ids, **kw)  # compiles the prefill and decode graphs
    reads, decoding = [], []
    for method in HOST_READS:
        original = getattr(torch.Tensor, method)

        def record(self, *args, _method=method, _original=original):
            if decoding:
                reads.append((_method, traceback.format_stack(limit=2)[0]))
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, method, record)
    compiled_forward = model.forward

    @functools.wraps(compiled_forward)  # generate passes the arguments the forward's signature names
    def forward(*args, **kwargs):
        decoding.extend([True] if kwargs["input_ids"].shape[1] == 1 else [])
        try:
            return compiled_forward(*args, **kwargs)
        finally:
            decoding.clear()

    monkeypatch.setattr(model, "forward", forward)
    cache.reset()
    out = model.generate(ids, **kw)
    monkeypatch.undo()
    assert torch.equal(out, expected) and [int(layer.length) for layer in cache.layers] == [5 + 4 - 1] * 2
    assert reads == [], f"host reads of tensor values during a decode step: {reads}"


def test_the_cache_buffers_are_static_inputs_of_the_compiled_graphs(monkeypatch):
    """CUDA-graph trees (``compiler_mode="reduce-overhead"``) skip a graph that mutates an input AOTAutograd does
    not know as static; the buffers the write op mutates must be marked, including after a batch change."""
    import lrcompile.backend as backend

    _, model = _compressed()
    graphs = []
    real_downstream = backend.compile_downstream
    monkeypatch.setattr(backend, "compile_downstream", lambda c, config: graphs.append(c.gm) or real_downstream(c, config))
    ids, mask = left_padded_prompts([5, 3])
    cache = LatentKVCache(model, 4, 5 + 2)
    cache.batch_select_indices(torch.tensor([0, 2]))  # new buffers of 2 rows
    lrcompile.generate(model, ids, mask, cache=cache, max_new_tokens=2)
    writes = [n for gm in graphs for n in gm.graph.nodes if n.target is torch.ops.lowrank.write_latent_cache.default]
    assert writes
    for node in writes:
        buffers = node.args[:4]  # k_cache, v_cache, pos_cache, length: graph inputs the op mutates
        assert all(b.op == "placeholder" and b.meta["tensor_dict"].get("_dynamo_static_input_type") for b in buffers)
