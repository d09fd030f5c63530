"""Latent KV cache (Palu): attention recognition, restructure, runtime cache and generation on tiny HF decoders."""

from __future__ import annotations

import logging
import re

import pytest
import torch
import torch.nn.functional as F
from tiny_models import ROPE_FAMILIES, VOCAB, left_padded_prompts, tiny_model, tiny_rope_model, token_batches

import lrcompile
from lrcompile.errors import LatentCacheError, LowRankConfigError
from lrcompile.kernels.grouped_projection import grouped_up_projection
from lrcompile.kernels.latent_attention import latent_attention_reference, rope_cos_sin, rotate_half
from lrcompile.modules import GroupedLowRankProjection, LowRankLinear, model_latent_attention
from lrcompile.passes import find_linears
from lrcompile.passes.attention_blocks import find_attention_blocks
from lrcompile.passes.kv_rank_allocation import (
    KVProjection,
    allocate_kv_closed_form,
    allocate_kv_fisher,
    allocate_kv_uniform,
)
from lrcompile.passes.latent_kv import factor_kv_groups


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _config(**kw) -> lrcompile.LowRankConfig:
    base = dict(param_ratio=1.0, kv_ratio=1.0, kv_allocation="uniform", method="svd", compiler="eager")
    return lrcompile.LowRankConfig(**{**base, **kw})


# --------------------------------------------------------------------------- the op


def test_latent_attention_at_full_rank_is_dense_gqa_attention():
    torch.manual_seed(0)
    batch, q_heads, kv_heads, head_dim, length, group = 2, 4, 2, 16, 5, 2
    groups = kv_heads // group
    x = torch.randn(batch, length, 32)
    w_k, w_v = torch.randn(kv_heads * head_dim, 32), torch.randn(kv_heads * head_dim, 32)
    k_down, k_up, _ = factor_kv_groups(w_k, groups, group * head_dim, "svd", None, 0.5, "k")
    v_down, v_up, _ = factor_kv_groups(w_v, groups, group * head_dim, "svd", None, 0.5, "v")
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    positions = torch.arange(length)[None] + torch.tensor([[0], [3]])
    query = torch.randn(batch, q_heads, length, head_dim)
    mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    out = latent_attention_reference(query, x @ k_down.T, x @ v_down.T, positions, k_up, None, inv_freq, 1.0, mask,
                                     0.3, False)
    # dense: K with RoPE at the same positions, V, GQA repeat, SDPA; then V's up-projection per head
    keys = (x @ w_k.T).view(batch, length, kv_heads, head_dim).transpose(1, 2)
    cos, sin = rope_cos_sin(positions, inv_freq, 1.0, keys.dtype)
    keys = keys * cos[:, None] + rotate_half(keys) * sin[:, None]
    values = (x @ w_v.T).view(batch, length, kv_heads, head_dim).transpose(1, 2)
    rep = q_heads // kv_heads
    dense = F.scaled_dot_product_attention(query, keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1),
                                           attn_mask=mask, scale=0.3)
    per_head = v_up.reshape(kv_heads, head_dim, -1).repeat_interleave(rep, 0)  # U^v_{j(h)} for each query head
    merged = grouped_up_projection(out, per_head, None)
    assert torch.allclose(merged, dense.transpose(1, 2).reshape(batch, length, -1), atol=1e-4)


def test_fake_latent_attention_gives_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.ops.lowrank.latent_attention(
            torch.empty(2, 8, 3, 16), torch.empty(2, 7, 2 * 8), torch.empty(2, 7, 2 * 4), torch.empty(1, 7, dtype=torch.long),
            torch.empty(2, 32, 8), None, torch.empty(8), 1.0, None, 0.25, True,
        )
    assert out.shape == (2, 3, 8 * 4)


@pytest.mark.parametrize("k_bias", [False, True])
def test_latent_attention_gradients_match_finite_differences(k_bias):
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    query = torch.randn(1, 4, 3, 8, **f64, requires_grad=True)
    k_latent = torch.randn(1, 3, 2 * 4, **f64, requires_grad=True)
    v_latent = torch.randn(1, 3, 2 * 3, **f64, requires_grad=True)
    k_up = torch.randn(2, 8, 4, **f64, requires_grad=True)
    bias = torch.randn(16, **f64, requires_grad=True) if k_bias else None
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2, **f64) / 8)

    def attend(q, kl, vl, ku, *kb):
        return torch.ops.lowrank.latent_attention(q, kl, vl, torch.arange(3)[None], ku, kb[0] if kb else None, inv_freq,
                                                  1.0, None, 0.35, True)

    assert torch.autograd.gradcheck(attend, (query, k_latent, v_latent, k_up) + ((bias,) if k_bias else ()))


def test_latent_kv_compiles_with_grad_enabled():
    """A model whose parameters require grad, called outside no_grad: aot_autograd traces the op's backward."""
    model = tiny_rope_model("llama")
    calibration = token_batches(2, seq=8)
    compiled = torch.compile(model, backend="lowrank", options=_config(kv_ratio=0.5, compiler="aot_eager"))
    out = compiled(calibration[0], use_cache=False).logits
    out.float().logsumexp(-1).sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


# --------------------------------------------------------------------------- recognition


def _blocks(model, **kwargs):
    found = {}

    def backend(gm, example_inputs):
        blocks, unmatched = find_attention_blocks(gm, find_linears(gm, example_inputs))
        found["result"] = blocks, unmatched
        found["inv_freq"] = [b.inv_freq.meta["grapharg"].source.name for b in blocks]
        return gm

    torch.compile(model, backend=backend)(token_batches(1)[0], use_cache=False, **kwargs)
    return (*found["result"], found["inv_freq"])


@pytest.mark.parametrize("family", ROPE_FAMILIES)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_attention_blocks_are_recognised(family, impl):
    blocks, unmatched, inv_freq = _blocks(tiny_rope_model(family, attn_implementation=impl))
    assert unmatched == []
    assert [b.name for b in blocks] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    block = blocks[0]
    assert (block.num_heads, block.num_kv_heads, block.head_dim, block.scale, block.rope_scale) == (4, 2, 16, 0.25, 1.0)
    assert block.k_linear.meta.name.endswith("k_proj") and block.o_linear.meta.name.endswith("o_proj")
    assert all(source.endswith("_buffers['inv_freq']") for source in inv_freq)


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_attention_without_rope_is_left_alone_with_a_reason(family):
    blocks, unmatched, _ = _blocks(tiny_model(family))
    assert blocks == []
    assert len(unmatched) == 2 and all("no RoPE" in u.reason for u in unmatched)
    assert not any("q/k norm" in u.reason or "interleaved" in u.reason for u in unmatched)


def test_partial_rotary_attention_is_left_alone_with_that_reason():
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPTNeoXConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                                           num_hidden_layers=2, num_attention_heads=4)).eval()
    blocks, unmatched, _ = _blocks(model)
    assert blocks == [] and len(unmatched) == 2
    assert all("applies RoPE as cat(rotated part, pass-through part)" in u.reason for u in unmatched)


def test_unsupported_attention_forms_are_named_in_the_reason():
    """A q/k norm after the projections (Qwen3) and interleaved-pair RoPE (GPT-J) are named, so the user learns
    the architecture, not the graph node, is why the block stays dense."""
    from transformers import AutoModelForCausalLM, GPTJConfig, Qwen3Config

    torch.manual_seed(0)
    qwen3 = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    gptj = GPTJConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=8)
    for config, form in ((qwen3, "q/k norm"), (gptj, "interleaved pairs")):
        _, unmatched, _ = _blocks(AutoModelForCausalLM.from_config(config).eval())
        assert len(unmatched) == 2 and all(form in u.reason for u in unmatched), [u.reason for u in unmatched]


def test_fused_qkv_projections_are_named_as_such_even_at_full_rotary():
    """Phi-3 at partial_rotary_factor 1 (cat with an empty pass-through is full RoPE) and Falcon cut K and V from one
    fused projection: that, not partial rotary nor a graph node, is the reason given."""
    from transformers import AutoModelForCausalLM, FalconConfig, Phi3Config

    torch.manual_seed(0)
    phi3 = Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    assert phi3.rope_parameters["partial_rotary_factor"] == 1.0
    falcon = FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          new_decoder_architecture=True, num_kv_heads=2)
    for config in (phi3, falcon):
        _, unmatched, _ = _blocks(AutoModelForCausalLM.from_config(config).eval())
        assert len(unmatched) == 2 and all("cut from one fused projection" in u.reason and "partial" not in u.reason
                                           for u in unmatched), [u.reason for u in unmatched]


def test_olmo_rope_cast_back_to_the_projection_dtype_is_restructured_exactly():
    """OLMo applies RoPE then ``.to(q.dtype)``: recognised (the cast keeps the dtype), exact at kv_ratio 1."""
    from transformers import AutoModelForCausalLM, OlmoConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(OlmoConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                        num_hidden_layers=2, num_attention_heads=4,
                                                        pad_token_id=0)).eval()
    ids = token_batches(1)[0]
    with torch.no_grad():
        dense = model(ids, use_cache=False).logits
        out = torch.compile(model, backend="lowrank", options=_config(kv_ratio=1.0))(ids, use_cache=False).logits
    assert len(lrcompile.model_report(model).attention) == 2
    assert (out - dense).abs().max().item() < 1e-4


def test_a_latent_model_also_runs_compiled_with_transformers_own_cache():
    """Once restructured, calls with a dense KV cache (``use_cache=True``, the default) recompile without a
    ``kv_ratio`` error: the restructured blocks run as eager calls do, K/V rebuilt from the latents."""
    model = tiny_rope_model("llama")
    ids, mask = left_padded_prompts([6, 4])
    config = lrcompile.LowRankConfig(calibration=token_batches(2), kv_ratio=0.5, compiler="eager")
    latent = lrcompile.generate(model, ids, mask, options=config, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        compiled, eager = model(ids).logits, model.forward._torchdynamo_orig_callable(ids).logits
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False), latent)


@pytest.mark.parametrize("use_cache", [False, True])
def test_kv_ratio_on_unrecognisable_attention_is_an_error_naming_each_block(use_cache):
    """The reason is the missing RoPE, with or without a dense KV cache (which alone would also refuse)."""
    model = tiny_model("gpt2")
    with torch.no_grad(), pytest.raises(Exception, match=r"transformer\.h\.0\.attn: .*no RoPE.*transformer\.h\.1\.attn") as info:
        torch.compile(model, backend="lowrank", options=_config())(token_batches(1)[0], use_cache=use_cache)
    assert isinstance(info.value.inner_exception, LatentCacheError)
    assert list(model_latent_attention(model)) == []


def test_kv_unmatched_warn_leaves_those_blocks_dense_and_says_why(caplog):
    model = tiny_model("gpt2")
    ids = token_batches(1)[0]
    with torch.no_grad():
        dense = model(ids, use_cache=False).logits
        out = torch.compile(model, backend="lowrank", options=_config(kv_unmatched="warn"))(ids, use_cache=False).logits
    assert torch.equal(out, dense)
    assert "cannot be restructured" in caplog.text and "transformer.h.0.attn" in caplog.text
    assert list(model_latent_attention(model)) == []
    left = lrcompile.model_report(model).attention_left_dense  # on the model: in every report of it
    assert [name for name, _ in left] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert "- left dense: transformer.h.0.attn: " in lrcompile.model_report(model).to_markdown()
    caplog.clear()
    torch._dynamo.reset()  # a recompile over the same model does not warn again
    with torch.no_grad():
        torch.compile(model, backend="lowrank", options=_config(kv_unmatched="warn"))(ids, use_cache=False)
    assert "cannot be restructured" not in caplog.text


def test_generate_names_what_it_cannot_do_before_touching_the_model():
    """Float token ids, and a model whose weights are compressed without a latent cache, are refused by name
    before any compile; kv_unmatched='warn' leaving every block dense says the weights are compressed now."""
    ids, mask = left_padded_prompts([6, 4])
    with pytest.raises(lrcompile.LowRankConfigError, match=r"input_ids is a tensor of dtype torch.float32; token ids"):
        lrcompile.generate(tiny_rope_model("llama"), ids.float(), mask, options=_config(kv_ratio=0.5))
    weights_only = tiny_rope_model("llama")
    with torch.no_grad():
        torch.compile(weights_only, backend="lowrank", options=_config(param_ratio=0.5, allocation="uniform",
                                                                       kv_ratio=None))(ids, use_cache=False)
    for options in (None, _config(kv_ratio=0.5)):
        with pytest.raises(LatentCacheError, match=r"has compressed weights \(model.layers.0.self_attn.q_proj, \.\.\.\) "
                                                   r"but no latent KV cache: generate with model.generate"):
            lrcompile.generate(weights_only, ids, mask, options=options, max_new_tokens=2)
    gpt2 = tiny_model("gpt2")
    with pytest.raises(LatentCacheError, match=r"kv_unmatched='warn' left them all dense.*weights are compressed now"):
        lrcompile.generate(gpt2, ids, mask, options=_config(kv_ratio=0.5, param_ratio=0.8, allocation="uniform",
                                                            kv_unmatched="warn"), max_new_tokens=2)


def test_kv_ratio_on_a_graph_without_attention_is_a_warning(caplog):
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)).eval()
    with torch.no_grad():
        torch.compile(mlp, backend="lowrank", options=_config(kv_ratio=0.5, calibration=[torch.randn(8, 64)]))(
            torch.randn(8, 64))
    assert "kv_ratio=0.5: the captured graph has linears but no attention block" in caplog.text


def test_calls_of_a_latent_model_do_not_warn_about_its_own_latent_projections(caplog):
    """The latent K/V up-projections are lrcompile's own ops (not weights it failed to factor), and a compiled call
    without a latent cache attends over K/V rebuilt from them (not a graph without attention)."""
    model = tiny_rope_model("llama")
    ids, mask = left_padded_prompts([6, 4])
    options = _config(kv_ratio=0.5, param_ratio=0.9, calibration=token_batches(2, seq=12))
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="lrcompile"):
        lrcompile.generate(model, ids, mask, options=options, max_new_tokens=3)
        model(ids, attention_mask=mask, use_cache=False)  # the compiled forward, without a cache
    assert "read by ops lrcompile does not factor" not in caplog.text
    assert "no attention block" not in caplog.text


def test_attention_kernel_the_matcher_does_not_know_is_named():
    """flex attention (or any attention op other than SDPA / eager softmax) is not silently weight-factored;
    transformers' flex masks also break the graph before the decoder layers, which is named first."""
    model = tiny_rope_model("llama", attn_implementation="flex_attention")
    with torch.no_grad(), pytest.raises(Exception, match=r"GraphBreakError: .*\(this model runs "
                                        r"attn_implementation='flex_attention', whose masks break the graph: load it "
                                        r"with attn_implementation='sdpa'"):
        torch.compile(model, backend="lowrank", options=_config(kv_ratio=0.5))(token_batches(1)[0], use_cache=False)


# --------------------------------------------------------------------------- restructure


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])  # dynamic: the RoPE and SDPA scales
@pytest.mark.parametrize("family", ROPE_FAMILIES)                           # are symbolic floats in the graph
def test_kv_ratio_one_is_exact_without_cache(family, dynamic):
    model = tiny_rope_model(family)
    ids, other = token_batches(1, seq=12)[0], token_batches(1, batch=3, seq=7, seed=5)[0]
    with torch.no_grad():
        dense, dense_other = model(ids, use_cache=False).logits, model(other, use_cache=False).logits
        compiled = torch.compile(model, backend="lowrank", dynamic=dynamic, options=_config())
        out = compiled(ids, use_cache=False).logits
        assert (compiled(other, use_cache=False).logits - dense_other).abs().max() < 1e-5
    assert (out - dense).abs().max() < 1e-5
    latent = dict(model_latent_attention(model))
    assert len(latent) == 2 and all(layer.latent_width == layer.dense_width for layer in latent.values())
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.k_proj, GroupedLowRankProjection) and isinstance(attention.v_proj, GroupedLowRankProjection)
    assert isinstance(attention.o_proj, torch.nn.Linear)  # stays the model's own output projection


def test_kv_ratio_half_halves_the_latent_and_fisher_changes_the_split():
    uniform = tiny_rope_model("llama")
    calibration = token_batches(4, seq=12)
    torch.compile(uniform, backend="lowrank", options=_config(kv_ratio=0.5, method="asvd", calibration=calibration))(
        calibration[0], use_cache=False)
    layers = [layer for _, layer in model_latent_attention(uniform)]
    assert all(layer.k_rank == layer.v_rank == 8 and layer.latent_width * 2 == layer.dense_width for layer in layers)
    torch._dynamo.reset()
    split = tiny_rope_model("llama")  # rank multiple 2: the default K : V = 3 : 5 of each head's 16 latent values
    torch.compile(split, backend="lowrank", options=_config(kv_ratio=0.5, method="asvd", rank_multiple=2,
                                                            calibration=calibration))(calibration[0], use_cache=False)
    layers = [layer for _, layer in model_latent_attention(split)]
    assert all((layer.k_rank, layer.v_rank) == (6, 10) and layer.latent_width * 2 == layer.dense_width
               for layer in layers)
    torch._dynamo.reset()
    fisher = tiny_rope_model("llama")
    torch.compile(fisher, backend="lowrank", options=_config(kv_ratio=0.5, kv_allocation="fisher", method="asvd",
                                                             kv_group_size="all", calibration=calibration))(
        calibration[0], use_cache=False)
    joint = [layer for _, layer in model_latent_attention(fisher)]
    assert all(layer.groups == 1 for layer in joint)
    assert [(layer.k_rank, layer.v_rank) for layer in joint] != [(16, 16), (16, 16)]  # uniform's split
    assert sum(layer.latent_width for layer in joint) == sum(layer.dense_width for layer in joint) // 2


def test_closed_form_kv_allocation_keeps_energy_within_budget():
    steep = tuple(0.9 * 0.1 ** i for i in range(32))  # nearly all energy in the first values: cheap to truncate
    flat = (1 / 32,) * 32  # every value matters
    projections = [KVProjection("k", 2, 32, energy=steep), KVProjection("v", 2, 32, energy=flat)]
    ranks = allocate_kv_closed_form(projections, 0.5, 8)
    assert ranks == {"k": 8, "v": 24}  # the budget (0.5 of 128 values) goes where dropping costs most energy
    assert sum(2 * r for r in ranks.values()) <= 0.5 * 128
    assert allocate_kv_closed_form(projections, 1.0, 8) == {"k": 32, "v": 32}
    even = allocate_kv_closed_form([KVProjection("a", 1, 64, energy=flat * 2), KVProjection("b", 1, 64, energy=flat * 2)],
                                   0.25, 8)
    assert even == {"a": 16, "b": 16}


def test_closed_form_kv_allocation_through_the_backend():
    model = tiny_rope_model("llama")
    k_proj = model.model.layers[0].self_attn.k_proj
    with torch.no_grad():  # layer 0's K of rank 4: its spectrum ends early, so its latent can be narrow
        k_proj.weight.copy_(k_proj.weight[:, :4] @ torch.randn(4, k_proj.in_features))
    calibration = token_batches(4, seq=12)
    torch.compile(model, backend="lowrank", options=_config(kv_ratio=0.5, kv_allocation="closed_form", method="whiten",
                                                            kv_group_size="all", calibration=calibration))(
        calibration[0], use_cache=False)
    blocks = lrcompile.model_report(model).attention
    assert len(blocks) == 2
    assert sum(b.latent_width for b in blocks) <= sum(b.dense_width for b in blocks) // 2
    assert blocks[0].k_rank == 8 and blocks[0].k_truncation_loss < 1e-9  # rank 4 rounded up to one multiple: exact


@pytest.mark.parametrize("group", [1, "all"])
def test_whitened_kv_factors_weigh_key_errors_by_the_scores_and_value_errors_by_o_proj(monkeypatch, caplog, group):
    """With method ``whiten`` the backend factors K in the metric of the attention scores and V in that of the
    output projection (``passes.kv_metrics``): on the calibration tokens, the latent K changes the RoPE'd scores
    ``q_m^T R_(n-m) k_n`` (causal pairs, every query head) less, and the latent V the heads' ``o_proj`` output
    less, than factors of plain whitening at the same ranks (the same compile with the metric switched off)."""
    import lrcompile.pipeline as pipeline

    calibration = token_batches(4, seq=12)
    dense = tiny_rope_model("llama")
    attention = dense.model.layers[0].self_attn
    heads, kv_heads, head_dim = 4, 2, attention.head_dim
    inputs = []
    handle = attention.k_proj.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
    with torch.no_grad():
        for ids in calibration:
            dense(ids, use_cache=False)
    handle.remove()
    x = torch.cat(inputs)  # [B, T, hidden], what q, k and v of block 0 read
    positions = torch.arange(x.shape[1])[None]
    cos, sin = rope_cos_sin(positions, dense.model.rotary_emb.inv_freq, 1.0, x.dtype)

    def rope(t: torch.Tensor) -> torch.Tensor:  # [B, T, H, D]
        return t * cos[:, :, None] + rotate_half(t) * sin[:, :, None]

    with torch.no_grad():
        q = rope(attention.q_proj(x).unflatten(-1, (heads, head_dim)))
        k = attention.k_proj(x).unflatten(-1, (kv_heads, head_dim)).repeat_interleave(heads // kv_heads, 2)
        v = attention.v_proj(x).unflatten(-1, (kv_heads, head_dim)).repeat_interleave(heads // kv_heads, 2)
    causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()

    def errors(metric_on: bool) -> tuple[float, float]:
        torch._dynamo.reset()
        if not metric_on:
            monkeypatch.setattr(pipeline, "kv_metric", lambda *args: None)
        model = tiny_rope_model("llama")
        torch.compile(model, backend="lowrank", options=_config(kv_ratio=0.5, kv_group_size=group, method="whiten",
                                                                calibration=calibration))(calibration[0], use_cache=False)
        monkeypatch.undo()
        latent = model.model.layers[0].self_attn
        assert isinstance(latent.k_proj, GroupedLowRankProjection)
        with torch.no_grad():
            dk = latent.k_proj(x).unflatten(-1, (kv_heads, head_dim)).repeat_interleave(heads // kv_heads, 2) - k
            dv = latent.v_proj(x).unflatten(-1, (kv_heads, head_dim)).repeat_interleave(heads // kv_heads, 2) - v
            scores = torch.einsum("bmhd,bnhd->bhmn", q, rope(dk))[..., causal]
            outputs = torch.einsum("bthd,ohd->btho", dv, attention.o_proj.weight.unflatten(1, (heads, head_dim)))
        return float(scores.square().mean()), float(outputs.square().mean())

    with caplog.at_level("INFO", logger="lrcompile.pipeline"):
        score, output = errors(True)
    assert "K/V errors weighed by the attention scores and o_proj in 2 of 2 blocks" in caplog.text
    plain_score, plain_output = errors(False)
    assert score < 0.9 * plain_score and output < 0.95 * plain_output


def test_fisher_allocation_follows_fisher_and_caps_at_width():
    projections = [KVProjection("a", 2, 32, 100.0), KVProjection("b", 2, 32, 1.0), KVProjection("c", 2, 32, 1.0)]
    ranks = allocate_kv_fisher(projections, 0.5, 8)
    assert ranks["a"] == 32 and ranks["b"] == ranks["c"] == 8  # a capped at its width, b and c keep the minimum
    spread = allocate_kv_fisher([KVProjection("a", 1, 64, 3.0), KVProjection("b", 1, 64, 1.0)], 0.5, 8)
    assert spread == {"a": 48, "b": 16}  # 8 each, then 48 split 3:1 (36 + 12), rounded to 32 + 8 and one more 8
    assert allocate_kv_uniform(projections, 0.25, 8) == {"a": 8, "b": 8, "c": 8}
    assert allocate_kv_fisher(projections, 1.0, 8) == {"a": 32, "b": 32, "c": 32}


@pytest.mark.parametrize("kv_ratio, key_share, key_rank, value_rank", [
    (0.5, 0.5, 32, 32), (0.5, 0.375, 24, 40), (0.75, 0.375, 32, 64), (0.25, 0.375, 16, 16), (1.0, 0.375, 64, 64),
    (0.75, 0.125, 32, 64),  # V is capped at its width, K takes the rest
])
def test_uniform_ranks_split_each_groups_budget_between_k_and_v(kv_ratio, key_share, key_rank, value_rank):
    projections = [KVProjection("k", 2, 64, key=True), KVProjection("v", 2, 64)]
    ranks = allocate_kv_uniform(projections, kv_ratio, 8, key_share)
    assert ranks == {"k": key_rank, "v": value_rank}
    assert key_rank + value_rank == 2 * kv_ratio * 64  # the budget holds


# --------------------------------------------------------------------------- generation


def _generate_pair(family, lengths, new_tokens, **options):
    model = tiny_rope_model(family)
    ids, mask = left_padded_prompts(lengths)
    dense = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                           return_dict_in_generate=True, min_new_tokens=new_tokens)
    out = lrcompile.generate(model, ids, mask, options=_config(**options), max_new_tokens=new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, min_new_tokens=new_tokens)
    return model, dense, out


@pytest.mark.parametrize("family", ROPE_FAMILIES)
@pytest.mark.parametrize("lengths", [[7], [9, 4, 6, 1]], ids=["batch1", "batch4_padded"])
def test_kv_ratio_one_generation_matches_dense_hf(family, lengths):
    _, dense, out = _generate_pair(family, lengths, 64)
    assert torch.equal(out.sequences, dense.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, dense.logits)) < 1e-4


def test_half_kv_cache_allocates_half_and_does_not_recompile_per_token():
    from torch._dynamo.utils import counters

    model = tiny_rope_model("llama")
    ids, mask = left_padded_prompts([9, 4])
    lrcompile.generate(model, ids, mask, options=_config(kv_ratio=0.5), max_new_tokens=2)  # compress
    cache = lrcompile.LatentKVCache(model, batch_size=2, max_cache_len=9 + 256)
    lrcompile.generate(model, ids, mask, max_new_tokens=3, cache=cache)  # prefill and decode graphs for this cache
    graphs = counters["stats"]["unique_graphs"]
    out = lrcompile.generate(model, ids, mask, max_new_tokens=256, cache=cache, min_new_tokens=256)  # reused
    assert out.shape == (2, 9 + 256)
    assert counters["stats"]["unique_graphs"] == graphs
    latent_values = sum(layer.k_latent.untyped_storage().nbytes() + layer.v_latent.untyped_storage().nbytes()
                        for layer in cache.layers)
    assert latent_values == cache.dense_bytes() // 2
    positions, lengths = 2 * (9 + 256) * 8, 2 * 8  # int64 position per token (shared), fill level per layer
    assert cache.latent_bytes == cache.dense_bytes() // 2 + positions + lengths
    assert all(layer.keys is None for layer in cache.layers)  # no dense K/V was ever allocated


def test_sampling_and_weight_compression_together():
    model = tiny_rope_model("qwen2")
    calibration = token_batches(2, seq=12)
    ids, mask = left_padded_prompts([5, 3])
    dense_bytes = lrcompile.weight_bytes(model)
    torch.manual_seed(0)
    out = lrcompile.generate(model, ids, mask, options=_config(param_ratio=0.8, kv_ratio=0.5, method="asvd",
                                                               allocation="uniform", calibration=calibration),
                             max_new_tokens=16, do_sample=True, top_k=20)
    assert out.shape == (2, 5 + 16)
    assert lrcompile.weight_bytes(model) < dense_bytes
    factored = [name for name, module in model.named_modules() if isinstance(module, LowRankLinear)]
    assert any("mlp" in name for name in factored) and not any("k_proj" in name for name in factored)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("ratio", [0.0, 1.5])
def test_kv_ratio_outside_unit_interval(ratio):
    with pytest.raises(LowRankConfigError, match=rf"option 'kv_ratio'={ratio!r} is outside \(0, 1\]"):
        _config(kv_ratio=ratio)


def test_group_size_must_divide_kv_heads(monkeypatch):
    """Refused as soon as the attention blocks are found, before any calibration."""
    def calibrate(*args, **kwargs):
        raise AssertionError("calibrated before refusing the group size")

    monkeypatch.setattr("lrcompile.pipeline.calibrate", calibrate)
    model = tiny_rope_model("llama")
    with pytest.raises(Exception, match="option 'kv_group_size'=3 does not divide the 2 KV heads of model.layers.0.self_attn"):
        torch.compile(model, backend="lowrank", options=_config(kv_group_size=3))(token_batches(1)[0], use_cache=False)


def test_rank_above_group_width_is_refused():
    with pytest.raises(LowRankConfigError, match=r"rank 40 per group is outside \[1, 32\]"):
        factor_kv_groups(torch.randn(64, 16), 2, 40, "svd", None, 0.5, "model.layers.0.self_attn K")


def test_generation_past_capacity_is_refused():
    model = tiny_rope_model("llama")
    ids, mask = left_padded_prompts([6])
    lrcompile.generate(model, ids, mask, options=_config(), max_new_tokens=2)
    cache = lrcompile.LatentKVCache(model, batch_size=1, max_cache_len=10)
    with pytest.raises(LatentCacheError, match="exceed the cache's capacity of 10"):
        lrcompile.generate(model, ids, mask, max_new_tokens=8, cache=cache)
    with pytest.raises(Exception, match=r"latent KV cache overflow: 10 cached \+ 1 new tokens exceed its capacity of 10"):
        model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=8, min_new_tokens=8)


def test_cache_needs_a_compressed_model():
    with pytest.raises(LatentCacheError, match="model.layers.0.self_attn has no latent-KV plan"):
        lrcompile.LatentKVCache(tiny_rope_model("llama"), batch_size=1, max_cache_len=8)


def test_kv_ranks_stop_at_the_projections_full_rank_when_heads_are_wider_than_the_hidden_state():
    """Gemma-style head_dim 256 on a 64-wide model: kv_ratio 0.5 plans K rank 96 of a [256, 64] group weight; the
    rank stops at 64 (exact) instead of failing the factoring."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=256, vocab_size=VOCAB,
                                  pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config).eval()
    batches = token_batches(2, seq=16)
    with torch.no_grad():
        dense = model(input_ids=batches[0], use_cache=False).logits
        compiled = torch.compile(model, backend="lowrank", options=_config(kv_ratio=0.5, method="whiten",
                                                                           calibration=batches))
        out = compiled(input_ids=batches[0], use_cache=False).logits
    [block] = lrcompile.model_report(model).attention
    assert (block.k_rank, block.v_rank) == (64, 64)
    assert (out - dense).abs().max().item() < 1e-4


def test_the_report_says_a_full_rank_latent_cache_is_exact_whatever_the_method():
    model = tiny_rope_model("llama")
    ids, mask = left_padded_prompts([5])
    lrcompile.generate(model, ids, mask, options=_config(method="whiten"), max_new_tokens=1)
    text = lrcompile.model_report(model).to_markdown()
    assert text.count("| svd (full rank: exact) | ") == 2, text


def test_report_shows_kv_ranks_formulas_and_measured_bytes(tmp_path):
    model = tiny_rope_model("llama")
    ids, mask = left_padded_prompts([5])
    lrcompile.generate(model, ids, mask, options=_config(kv_ratio=0.5, dump_dir=str(tmp_path)), max_new_tokens=2)
    cache = lrcompile.LatentKVCache(model, batch_size=1, max_cache_len=16)
    report = lrcompile.model_report(model, cache)
    assert [(a.k_rank, a.v_rank, a.latent_width, a.dense_width) for a in report.attention] == [(8, 8, 32, 64)] * 2
    formulas = report.formulas()
    assert formulas["kv_cache_bytes_dense(B, T)"] == "512*B*T"  # 2 layers x 64 values x 4 bytes
    assert formulas["kv_cache_bytes_latent(B, T)"] == "264*B*T"  # 2 x 32 x 4 + 8 position bytes
    assert report.kv_bytes_measured == (cache.latent_bytes, 512 * 16)
    assert "## Latent KV cache" in report.to_markdown()
    # the totals, the attention section and the dense output projections add up to every projection's bytes
    linears = [m for name, m in model.named_modules() if name.startswith("model.layers.") and not list(m.children())
               and any(p.dim() >= 2 for p in m.parameters(recurse=False))]
    held = sum(p.numel() * p.element_size() for m in linears for p in m.parameters(recurse=False) if p.dim() >= 2)
    kept = sum(a.weight_bytes_after for a in report.attention)
    note = re.search(r"Not in these totals: .* \((\d[\d,]*) -> ([\d,]+) bytes, .* 2 output projection\(s\), kept dense "
                     r"\(([\d,]+) bytes\)", report.to_markdown())
    assert note and int(note[2].replace(",", "")) == kept
    assert report.bytes_after + kept + int(note[3].replace(",", "")) == held
    later = sorted(tmp_path.glob("graph_*"))[1:]  # recompiles over the compressed model (prefill, decode)
    assert later and not any((g / "plan.json").exists() for g in later)  # they plan nothing: no empty plan
    first = next(tmp_path.glob("graph_*/01_find_attention_after.py")).read_text()  # what the pass found is shown
    assert "# lowrank model.layers.1.self_attn.v_proj: linear out=32 in=64 float32; compressible; V projection of " \
           "model.layers.1.self_attn, to restructure for a latent KV cache" in first
    assert "latent K of model.layers.0.self_attn, restructured already" in \
           next(later[0].glob("*_find_attention_after.py")).read_text()
    found = next(later[0].glob("*_find_linears_after.py")).read_text()
    assert "self_attn.o_proj: linear out=64 in=64 float32; compressible; plan: dense (output projection of latent " \
           "attention model.layers.0.self_attn)" in found, found  # the earlier compile's decision, read back
    graph_dir = next(tmp_path.glob("graph_*"))  # the first (stateless) graph compressed the model
    dumps = sorted(p.name for p in graph_dir.glob("*restructure_attention*"))
    assert [name[3:] for name in dumps] == ["restructure_attention_after.py", "restructure_attention_before.py"]
    assert "lowrank.latent_attention" in (graph_dir / dumps[0]).read_text()


def test_kv_sensitivity_allocation_meets_the_budget_and_follows_kl():
    model = tiny_rope_model("llama")
    calibration = token_batches(2, seq=12)
    config = _config(kv_ratio=0.5, kv_allocation="sensitivity", kv_group_size="all", method="asvd",
                     calibration=calibration, sensitivity_batches=1)
    torch.compile(model, backend="lowrank", options=config)(calibration[0], use_cache=False)
    layers = [layer for _, layer in model_latent_attention(model)]
    assert sum(layer.latent_width for layer in layers) <= sum(layer.dense_width for layer in layers) // 2
    curves = {"a": {0.25: 0.5, 0.5: 0.1, 0.75: 0.0}, "b": {0.25: 0.01, 0.5: 0.0, 0.75: 0.0}}
    projections = [KVProjection(name, 1, 64, sensitivity=curve) for name, curve in curves.items()]
    from lrcompile.passes.kv_rank_allocation import allocate_kv_sensitivity

    assert allocate_kv_sensitivity(projections, 0.5, 8) == {"a": 48, "b": 16}  # the sensitive one keeps more


def test_dense_kv_cache_graph_is_an_error_with_the_fix_named():
    model = tiny_rope_model("llama")
    ids = token_batches(1, seq=12)[0]
    with torch.no_grad(), pytest.raises(Exception, match=r"dense KV cache \(use_cache=True without lrcompile.LatentKVCache\)"):
        torch.compile(model, backend="lowrank", options=_config(kv_ratio=0.5))(ids)  # use_cache=True
    assert list(model_latent_attention(model)) == []


@pytest.mark.inductor
def test_generation_with_inductor_matches_dense_and_writes_the_cache_in_place():
    model = tiny_rope_model("llama")
    ids, mask = left_padded_prompts([7, 3])
    dense = model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    out = lrcompile.generate(model, ids, mask, options=_config(compiler="inductor"), max_new_tokens=8, min_new_tokens=8,
                             do_sample=False)
    assert torch.equal(out, dense)
    cache = lrcompile.LatentKVCache(model, batch_size=2, max_cache_len=7 + 8)
    lrcompile.generate(model, ids, mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, cache=cache)
    assert all(int(layer.length) == 7 + 8 - 1 for layer in cache.layers)  # the last token is sampled, not cached
    positions = cache.layers[0].positions  # RoPE positions of real tokens count from each prompt's first token
    assert positions[0, :9].tolist() == list(range(9)) and positions[1, 4:9].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.inductor
def test_compiled_model_output_code_calls_the_triton_kernels():
    from torch._inductor.utils import run_and_get_code

    model = tiny_rope_model("llama").cuda()
    ids, mask = (t.cuda() for t in left_padded_prompts([7, 3]))
    dense = model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    out, codes = run_and_get_code(lrcompile.generate, model, ids, mask, options=_config(compiler="inductor"),
                                  max_new_tokens=4, min_new_tokens=4, do_sample=False)
    code = "\n".join(codes)
    assert "_latent_prefill_kernel" in code and "_latent_decode_split_kernel" in code
    assert torch.equal(out, dense)


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32, "rope_theta": 10000.0},
], ids=["yarn", "llama3"])
def test_scaled_rope_variants_are_exact_at_full_rank(rope):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_parameters=rope, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = token_batches(1, seq=12)[0]
    with torch.no_grad():
        dense = model(ids, use_cache=False).logits
        out = torch.compile(model, backend="lowrank", options=_config())(ids, use_cache=False).logits
    assert len(list(model_latent_attention(model))) == 2
    assert (out - dense).abs().max() < 1e-5
    if rope["rope_type"] == "yarn":
        assert model.model.rotary_emb.attention_scaling != 1.0  # the scaling reaches the op from the graph


@pytest.mark.parametrize(("family", "group"), [("llama", 1), ("qwen2", "all"), ("qwen2", 1)])
def test_eager_call_after_kv_restructure_matches_the_compiled_latent_attention(family, group):
    """Eager calls rebuild K and V from the latent factors (V bias included) and run the model's own attention."""
    model = tiny_rope_model(family)
    if family == "qwen2":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.v_proj.bias.normal_()
    ids = token_batches(1, seq=12)[0]
    options = _config(kv_ratio=0.5, kv_group_size=group, method="asvd", calibration=token_batches(2, seq=12))
    with torch.no_grad():
        compiled = torch.compile(model, backend="lowrank", options=options)(ids, use_cache=False).logits
        torch._dynamo.reset()
        eager = model(ids, use_cache=False).logits
        cached = model(ids, use_cache=True).logits  # eager with transformers' dense cache
    assert (eager - compiled).abs().max().item() <= 1e-4
    assert (cached - compiled).abs().max().item() <= 1e-4


def test_model_generate_with_a_latent_cache_needs_no_extra_step():
    """Compile the forward, build the cache (it compresses the model), call transformers' generate."""
    model = tiny_rope_model("llama")
    reference = tiny_rope_model("llama")  # same seed, same weights
    options = _config(kv_ratio=1.0, calibration=token_batches(2, seq=12))
    model.forward = torch.compile(model.forward, backend="lowrank", options=options)
    ids, mask = left_padded_prompts([5, 7])
    with torch.no_grad():
        cache = lrcompile.LatentKVCache(model, 2, 16)
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=6, do_sample=False)
        dense = reference.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert len(list(model_latent_attention(model))) == 2
    assert torch.equal(out, dense)


def test_generate_sizes_its_cache_for_beams():
    model = tiny_rope_model("llama")
    reference = tiny_rope_model("llama")
    ids, mask = left_padded_prompts([5, 7])
    with torch.no_grad():
        out = lrcompile.generate(model, ids, mask, options=_config(calibration=token_batches(2, seq=12)),
                                 max_new_tokens=4, num_beams=2, do_sample=False)
        dense = reference.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False)
    assert torch.equal(out, dense)


def test_distill_model_trains_the_latent_kv_factors_towards_the_dense_model(caplog):
    """A model compiled with ``kv_ratio`` is distilled after the compile (``lrcompile.distill_model``, the dense
    model itself as teacher): the KL falls, the logits move towards the dense model's, and what trains is
    the blocks' tensors (the latent K/V factors among them), not the embeddings or the head. (The logits' own
    distance is not the measure: the divergence ignores a shift of all of a token's logits.)"""
    import logging

    dense, model = tiny_rope_model("llama"), tiny_rope_model("llama")
    calibration = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in token_batches(6, seq=12)]
    torch.compile(model, backend="lowrank", options=_config(kv_ratio=0.5, kv_group_size="all", method="whiten",
                                                            calibration=[b["input_ids"] for b in calibration]))(
        calibration[0]["input_ids"], use_cache=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]

    def error() -> float:  # KL(p_dense || p_model) per token
        with torch.no_grad():
            got = torch.cat([model(**b, use_cache=False).logits for b in calibration]).log_softmax(-1)
            want = torch.cat([dense(**b, use_cache=False).logits for b in calibration]).log_softmax(-1)
        return float((want.exp() * (want - got)).sum(-1).mean())

    start = error()
    with caplog.at_level(logging.INFO, logger="lrcompile.block_compression"):
        first, last = lrcompile.distill_model(model, calibration, dense, 4, 3e-4)
    assert last < first and error() < 0.7 * start
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {k for k in changed if k.endswith(("k_proj.down", "k_proj.up", "v_proj.down", "v_proj.up"))}
    assert all(k.startswith("model.layers.") for k in changed)
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())
    assert any("distilled: KL to the dense model" in r.getMessage() for r in caplog.records)
