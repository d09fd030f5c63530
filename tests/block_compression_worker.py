"""A torchrun worker for tests/test_block_compression.py: block-compress the seeded tiny Llama on ``--batches``
calibration batches (each rank runs its share), writing the folder ``--out`` (rank 0) and its wall time."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lrcompile.block_compression import compress_model_blocks
from lrcompile.config import LowRankConfig


def tiny_llama(layers: int, hidden: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def calibration(count: int, seq: int) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 128, (count, 2, seq), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--finetune-epochs", type=int, default=0)
    parser.add_argument("--distill-epochs", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    distributed = "RANK" in __import__("os").environ
    if distributed:
        dist.init_process_group("gloo")
    start = time.perf_counter()
    compress_model_blocks(tiny_llama(args.layers, args.hidden), calibration(args.batches, args.seq),
                          LowRankConfig(param_ratio=0.6, calibration_order="error_feedback", rank_multiple=1,
                                        finetune_epochs=args.finetune_epochs, finetune_lr=1e-3,
                                        distill_epochs=args.distill_epochs, distill_lr=3e-4), args.out)
    seconds = time.perf_counter() - start
    if not distributed or dist.get_rank() == 0:
        (Path(args.out) / "wall_seconds.json").write_text(json.dumps({"seconds": seconds}))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
