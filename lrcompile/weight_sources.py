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

import hashlib
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

    def signature(self) -> str:
        """A digest of the weights that tells this model from another of the same config (a resumed run must
        continue the same weights), cheap enough for a 70B model: samples of the values, not all of them."""


SAMPLES = 16  # places sampled per tensor (in memory) or per file
SAMPLE_BYTES = 1 << 16  # bytes read at each place of a file


def _tensor_sample(tensor: torch.Tensor) -> bytes:
    if tensor.is_meta:
        return str(list(tensor.shape)).encode()
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // (SAMPLES * 64))
    return flat[::step][:SAMPLES * 64].to(device="cpu", dtype=torch.float64).numpy().tobytes()


def file_signature(paths: Iterable[Path]) -> str:
    """Each file's size and ``SAMPLES`` evenly spaced ``SAMPLE_BYTES`` reads of its content (not its name or
    time: a folder copied elsewhere is the same model)."""
    digest = hashlib.sha256()
    for path in paths:
        size = path.stat().st_size
        digest.update(size.to_bytes(8, "little"))
        with open(path, "rb") as handle:
            for i in range(SAMPLES):
                handle.seek(max(0, size - SAMPLE_BYTES) * i // max(1, SAMPLES - 1))
                digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]


class ModuleWeights:
    """The weights of a model in memory (its own tensors)."""

    def __init__(self, model: nn.Module):
        self.state = model.state_dict(keep_vars=True)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {name: _found(self.state, name, "the model").detach() for name in names}

    def signature(self) -> str:
        digest = hashlib.sha256()
        for name in sorted(self.state):
            digest.update(name.encode() + _tensor_sample(self.state[name]))
        return digest.hexdigest()[:16]


def _found(table, name: str, where: str):
    try:
        return table[name]
    except KeyError:
        raise WeightSourceError(f"{where} holds no tensor {name!r}") from None


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}
_TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


def safetensors_header(path: Path) -> tuple[int, dict[str, dict]]:
    """``(offset of the data, {name: {"dtype", "shape", "data_offsets"}})`` of a safetensors file, from its
    header alone."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


class SafetensorsWeights:
    """The ``*.safetensors`` files of a Hugging Face folder (one file, or a ``model.safetensors.index.json``).

    Each tensor is read with plain file reads straight into its own buffer: a memory-mapped read
    would also count the file's pages in the process's memory while the file is open."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise WeightSourceError(f"{str(self.folder)!r} holds neither model.safetensors nor "
                                    "model.safetensors.index.json")
        self.files = files
        self.entries: dict[str, tuple[str, int, dict]] = {}  # name -> (file, data start, header entry)
        for file in files:
            start, header = safetensors_header(self.folder / file)
            self.entries.update({name: (file, start, entry) for name, entry in header.items()})

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        tensors = {}
        for name in names:
            file, start, entry = _found(self.entries, name, str(self.folder))
            if entry["dtype"] not in _TORCH_DTYPES:
                raise WeightSourceError(f"{str(self.folder / file)!r}: tensor {name!r} has dtype {entry['dtype']}, "
                                        "which this reader does not handle")
            tensor = torch.empty(entry["shape"], dtype=_TORCH_DTYPES[entry["dtype"]])
            begin, end = entry["data_offsets"]
            with open(self.folder / file, "rb") as handle:
                handle.seek(start + begin)
                if handle.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy())) != end - begin:
                    raise WeightSourceError(f"{str(self.folder / file)!r} ends inside tensor {name!r}: truncated file")
            tensors[name] = tensor
        return tensors

    def signature(self) -> str:
        return file_signature(self.folder / file for file in self.files)


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
        reader = GGUFReader(self.path)
        config = skeleton.config
        architecture = config.model_type
        self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
        to_hf = get_gguf_hf_weights_map(skeleton, self.processor)
        tensors = {tensor.name: tensor for tensor in reader.tensors}
        self.tensors = {hf: (gguf_name, tensors[gguf_name]) for gguf_name, hf in to_hf.items() if gguf_name in tensors}
        # Only the tensors (views of the file's map) are kept: the reader's parsed metadata (the tokenizer's
        # vocabulary as ~100k small arrays) held 84 MB of SmolLM2's 138 MB reading cost.
        self._map = reader.data._mmap

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
            weights = np.ascontiguousarray(weights)
            out[name] = torch.from_numpy(weights if weights.flags.writeable else weights.copy())  # not a file view
        self._map.madvise(mmap.MADV_DONTNEED)  # the file's pages leave this process's memory
        return out

    def signature(self) -> str:
        return file_signature([self.path])


def open_weights(folder: str | Path, gguf_file: str | None, skeleton: nn.Module) -> WeightSource:
    """The weight source of a model folder (safetensors) or of a GGUF file in it."""
    if gguf_file is not None:
        return GGUFWeights(Path(folder) / gguf_file, skeleton)
    return SafetensorsWeights(folder)
