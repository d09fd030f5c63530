"""CUDA end to end (issue 11, item 4): compress a bfloat16 model on the GPU, generate through the latent cache,
find the Triton kernels in Inductor's output code, save and load. Skips on a machine without CUDA."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_rope_model, token_batches

import lrcompile
from lrcompile.modules import compressed_modules

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compressed_on_cuda(dtype: torch.dtype, compiler: str) -> torch.nn.Module:
    model = tiny_rope_model("llama").to("cuda", dtype)
    calibration = [batch.cuda() for batch in token_batches(4)]
    options = lrcompile.LowRankConfig(calibration=calibration, param_ratio=0.5, kv_ratio=0.5, kv_group_size="all",
                                      compiler=compiler)
    model.forward = torch.compile(model.forward, backend="lowrank", options=options)
    with torch.no_grad():
        model(calibration[0], use_cache=False)  # the first call compresses
    return model


def test_compression_on_cuda_keeps_every_factor_on_the_gpu_in_the_models_dtype():
    model = _compressed_on_cuda(torch.bfloat16, "aot_eager")
    modules = dict(compressed_modules(model))
    assert modules
    for name, module in modules.items():
        for part, tensor in module.named_parameters():
            assert (tensor.device.type, tensor.dtype) == ("cuda", torch.bfloat16), f"{name}.{part}"


def test_latent_cache_generation_on_cuda_equals_the_eager_model():
    model = _compressed_on_cuda(torch.float32, "aot_eager")
    prompt = token_batches(1, batch=2, seq=6, seed=5)[0].cuda()
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        latent = lrcompile.generate(model, prompt, mask, max_new_tokens=8, do_sample=False)
        model.forward = model.forward._torchdynamo_orig_callable  # plain modules, transformers' own cache
        eager = model.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(latent, eager)


def test_inductor_output_code_launches_the_triton_kernels():
    from torch._inductor.utils import run_and_get_code

    model = _compressed_on_cuda(torch.float16, "inductor")
    prompt = token_batches(1, batch=1, seq=8, seed=5)[0].cuda()
    cache = lrcompile.LatentKVCache(model, batch_size=1, max_cache_len=16)
    with torch.no_grad():
        out, prefill = run_and_get_code(model, prompt, past_key_values=cache, use_cache=True)
        step = out.logits[:, -1:].argmax(-1)
        _, decode = run_and_get_code(model, step, past_key_values=cache, use_cache=True)
    assert "_latent_prefill_kernel" in "\n".join(prefill)
    assert "_latent_decode_split_kernel" in "\n".join(decode)


def test_save_pretrained_then_from_pretrained_on_cuda(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _compressed_on_cuda(torch.bfloat16, "aot_eager")
    ids = token_batches(1, seed=7)[0].cuda()
    with torch.no_grad():
        before = model.forward._torchdynamo_orig_callable(ids, use_cache=False).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cuda").eval()
    with torch.no_grad():
        after = loaded(ids, use_cache=False).logits
    assert after.device.type == "cuda"
    # not bit-equal: model.to(bfloat16) also cast RoPE's inv_freq buffer, which from_pretrained rebuilds in float32
    torch.testing.assert_close(after, before, rtol=0.05, atol=0.05)
