"""Read a model's weights a few tensors at a time, by their ``state_dict`` names.

Block-by-block compression (:mod:`lrcompile.block_compression`) holds one
decoder block's weights at a time; these sources hand them over on request:

* :class:`ModuleWeights`: a model already in memory (its own tensors, no copy);
* :class:`SafetensorsWeights`: a Hugging Face folder (``model.safetensors`` or a
  sharded index), each file opened only while tensors are read from it;
* :class:`GGUFWeights`: a GGUF file, each tensor dequantised on request, with
  transformers' own name map and tensor processing (Llama's Q/K head
  permutation undone), and the file's pages dropped from memory after each read.
"""

from __future__ import annotations

import json
import logging
import mmap
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .errors import LowRankError

log = logging.getLogger(__name__)

GGUF_ROWS = 4096  # rows dequantised at a time


class WeightSourceError(LowRankError):
    """A weight the model needs is missing from its files, or the files cannot be read."""


class WeightSource(Protocol):
    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors called ``names`` (``state_dict`` keys), in the source's dtype, on the CPU."""


class ModuleWeights:
    """The weights of a model in memory (its own tensors)."""

    def __init__(self, model: nn.Module):
        self.state = model.state_dict(keep_vars=True)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {name: _found(self.state, name, "the model").detach() for name in names}


def _found(table, name: str, where: str):
    try:
        return table[name]
    except KeyError:
        raise WeightSourceError(f"{where} holds no tensor {name!r}") from None


class SafetensorsWeights:
    """The ``*.safetensors`` files of a Hugging Face folder (one file, or a ``model.safetensors.index.json``)."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = dict(json.loads(index.read_text())["weight_map"])
        elif (self.folder / "model.safetensors").is_file():
            with safe_open(self.folder / "model.safetensors", framework="pt") as handle:
                self.files = {name: "model.safetensors" for name in handle.keys()}
        else:
            raise WeightSourceError(f"{str(self.folder)!r} holds neither model.safetensors nor "
                                    "model.safetensors.index.json")

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(_found(self.files, name, str(self.folder)), []).append(name)
        tensors = {}
        for file, wanted in by_file.items():
            with safe_open(self.folder / file, framework="pt") as handle:  # unmapped again on exit
                tensors.update({name: handle.get_tensor(name) for name in wanted})
        return tensors


class GGUFWeights:
    """A GGUF file read lazily: ``skeleton`` (the model built from the file's config, on the meta device)
    gives the names, transformers' tensor processor the layout, ``gguf`` the dequantisation."""

    def __init__(self, path: str | Path, skeleton: nn.Module):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        self.path = Path(path)
        self.reader = GGUFReader(self.path)
        config = skeleton.config
        architecture = config.model_type
        self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
        to_hf = get_gguf_hf_weights_map(skeleton, self.processor)
        tensors = {tensor.name: tensor for tensor in self.reader.tensors}
        self.tensors = {hf: (gguf_name, tensors[gguf_name]) for gguf_name, hf in to_hf.items() if gguf_name in tensors}

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        import numpy as np  # with gguf
        from gguf import dequantize

        out = {}
        for name in names:
            gguf_name, tensor = _found(self.tensors, name, str(self.path))
            data = tensor.data
            if data.ndim == 1:
                weights = dequantize(data, tensor.tensor_type)
            else:  # row chunks into one buffer: a large matrix is never held twice
                weights = np.empty((data.shape[0], *dequantize(data[:1], tensor.tensor_type).shape[1:]), np.float32)
                for start in range(0, data.shape[0], GGUF_ROWS):
                    weights[start:start + GGUF_ROWS] = dequantize(data[start:start + GGUF_ROWS], tensor.tensor_type)
            weights = self.processor.process(weights=weights, name=gguf_name).weights
            out[name] = torch.from_numpy(np.ascontiguousarray(weights))
        self.reader.data._mmap.madvise(mmap.MADV_DONTNEED)  # the file's pages leave this process's memory
        return out


def open_weights(folder: str | Path, gguf_file: str | None, skeleton: nn.Module) -> WeightSource:
    """The weight source of a model folder (safetensors) or of a GGUF file in it."""
    if gguf_file is not None:
        return GGUFWeights(Path(folder) / gguf_file, skeleton)
    return SafetensorsWeights(folder)
