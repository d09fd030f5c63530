"""Tiny Hugging Face models of the five supported families, built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    Qwen2Config,
)

VOCAB = 128

CONFIGS = {
    "llama": lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2),
    "qwen2": lambda: Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2),
    "opt": lambda: OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                             word_embed_proj_dim=64, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                               eos_token_id=1),
    "bert": lambda: BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=64),
}
FAMILIES = tuple(CONFIGS)


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    cls = AutoModel if family == "bert" else AutoModelForCausalLM
    return cls.from_config(config).eval()


def token_batches(count: int, batch: int = 2, seq: int = 16, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=generator) for _ in range(count)]


def first_output(output) -> torch.Tensor:
    """Logits of a causal LM, last_hidden_state of an encoder."""
    return output[0]
