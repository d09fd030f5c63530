"""Tiny Hugging Face models of the supported families, built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    FalconConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
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
    "falcon": lambda: FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   bias=True),  # FalconLinear: x @ W.T + b
    "bert": lambda: BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=64),
}
FAMILIES = tuple(CONFIGS)

# Decoders with RoPE and grouped-query attention, for the latent KV cache (Qwen2 has q/k/v biases).
ROPE_CONFIGS = {
    "llama": CONFIGS["llama"],
    "mistral": lambda: MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "qwen2": CONFIGS["qwen2"],
    # Gemma: a scaled embedding (a non-persistent buffer) and (1 + w) norms
    "gemma": lambda: GemmaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}
ROPE_FAMILIES = tuple(ROPE_CONFIGS)


def tiny_rope_model(family: str, seed: int = 0, attn_implementation: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(seed)
    config = ROPE_CONFIGS[family]()
    config._attn_implementation = attn_implementation
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.pad_token_id = 0
    return model


def left_padded_prompts(lengths: list[int], seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of prompts of the given lengths, left-padded with id 0."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(1, VOCAB, (length,), generator=generator)
        mask[row, width - length :] = 1
    return ids, mask


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
