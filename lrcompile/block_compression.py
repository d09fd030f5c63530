"""Block-by-block compression of a decoder-only model, from its files to a compressed folder.

SVD-LLM, Palu, AQLM and GPTQ all compress one decoder block at a time; this is
how a model larger than memory is compressed here. The model is a *skeleton*
on the meta device; a :class:`~lrcompile.weight_sources.WeightSource` hands
over one block's weights when it is needed, and the block leaves memory once
its compressed tensors are written. Only one block's weights, its calibration
activations and one step's statistics are alive at a time:

1. The calibration batches run through the embedding (the only non-block
   weights held, briefly); the inputs that reach block 0 are caught (its hidden
   states and the keyword arguments the model passes every block: RoPE
   cos/sin, mask, positions), so any architecture that calls its blocks in a
   ``ModuleList`` works without knowing its forward.
2. ``allocation="closed_form"``: a planning pass streams the dense blocks and
   keeps only each linear's spectrum (singular values of ``W L``, SVD-LLM's
   whitened weight), then ranks are allocated over all layers at once
   (:func:`~lrcompile.passes.rank_allocation.allocate_closed_form`).
3. Each block is factored in *steps*, one per distinct input in execution order
   (q/k/v share one, gate/up another), as in
   :mod:`lrcompile.passes.sequential_calibration`: a step's statistics come
   from the compressed stream (``sequential``, ``error_feedback``: the model
   whose earlier layers are already factored, so later layers see and correct
   for earlier error) or the dense stream (``independent``); ``error_feedback``
   also takes the cross Gram ``B = X^T X^`` with the dense stream and refits
   each linear to the dense layer's output.
4. After each block: its tensors go to ``blocks/block_NNNNN.safetensors`` in
   the output folder, the activations that enter the next block and the
   progress record are written atomically, so a killed run restarts at the next
   unfinished block. The end writes the non-block weights, the safetensors
   index, ``config.json`` with the ``lowrank`` ``quantization_config`` (one entry
   per linear) and the tokenizer: a folder ``from_pretrained`` loads.
5. Optionally (``distill_epochs``), before that end, the whole compressed model
   is distilled towards the dense one, on the calibration batches or on a set
   of its own (``distill_batches``, usually larger: training needs more tokens
   than statistics do), whose dense stream the block loop carries alongside.

Under ``torch.distributed`` every rank runs its share of the calibration
batches; statistics are summed across ranks before each decision, so every rank
makes the same plan and factors; rank 0 writes the model.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from lrcompile.passes.decomposition import Whitening, decompose, shared_whitening
from lrcompile.passes.quantize_linears import AQSettings, aq_would_not_save, quantize_dense, quantize_factors
from lrcompile.passes.rank_allocation import allocate_closed_form, allocate_uniform, build_plan

from .config import LowRankConfig
from .errors import CalibrationError, LowRankConfigError, LowRankError
from .hf_quantizer import LowRankQuantizationConfig, build_compressed_modules
from .modules import RECORD, LowRankLinear
from .runtime.compiled_forward import check_calibration_batches, forward_kwargs, warn_thin_calibration
from .types import ActivationStats, CompressionPlan, CompressedLayer, LayerPlan, LayerStatus, LinearMeta, WeightLayout
from .weight_sources import SAFETENSORS_DTYPES, WeightSource, safetensors_header

log = logging.getLogger(__name__)

PROGRESS_FILE = "lowrank_progress.json"
BLOCKS_DIR = "blocks"
REST_FILE = "model-rest.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DISTILLED_FILE = "lowrank_distilled.safetensors"


class ResumeError(LowRankError):
    """The output folder holds an unfinished run of another model, other options or other calibration data."""


def _difference(key: str, saved: Any, current: Any) -> str:
    """What differs between an unfinished run's recorded ``key`` and this run's: the option names for options."""
    if key == "fingerprint":
        return f"another model or other calibration data ({saved!r} there, {current!r} here)"
    if key == "world":
        return f"{saved} there, {current} here (torchrun --nproc-per-node)"
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(k for k in saved.keys() | current.keys() if saved.get(k, "unset") != current.get(k, "unset"))
        return ", ".join(f"{k} = {saved.get(k, 'unset')!r} there, {current.get(k, 'unset')!r} here" for k in keys)
    return f"{saved!r} there, {current!r} here"


@dataclass(frozen=True)
class BlockCompressionResult:
    """What a block-by-block run wrote: the folder, the plan, per-phase seconds and the blocks resumed from disk."""

    out: Path
    plan: CompressionPlan | None
    timings: dict[str, float]
    blocks_resumed: int
    bytes_before: int
    bytes_after: int


@dataclass
class _Streams:
    """Calibration activations entering the current block, one tensor per local batch.

    ``dense``: through the dense model (planning, ``independent`` and ``error_feedback``);
    ``compressed``: through the already-compressed blocks (``sequential`` and ``error_feedback``)."""

    dense: list[torch.Tensor] | None
    compressed: list[torch.Tensor] | None
    kwargs: list[dict[str, Any]]  # what the model passes every block, per batch
    masks: list[torch.Tensor | None]  # token mask per batch (padding rows are left out of statistics)


class _Caught(Exception):
    pass


class _Replay(nn.Module):
    """Stands in for a decoder block: returns ``hidden`` when it is set (the dense stream leaving the last block,
    so the model's forward maps it to the dense model's logits), else its input."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden if self.hidden is None else self.hidden


class _Catcher(nn.Module):
    """Stands in for block 0: records the hidden states and keyword arguments it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise LowRankError(f"block compression: the model passes {len(args)} positional arguments besides the "
                               "hidden states to its decoder blocks; only keyword arguments are supported")
        self.calls.append((hidden.detach(), {k: v for k, v in kwargs.items() if v is not None}))
        raise _Caught


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, blocks)`` of the model's decoder blocks: the ``ModuleList`` of ``num_hidden_layers`` modules."""
    count = getattr(model.config, "num_hidden_layers", None)
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and count:
            return path, module
    raise LowRankError(f"{type(model).__name__}: no ModuleList of its {count} decoder blocks was found; block "
                       "compression needs a decoder-only model that calls its blocks in turn")


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _reduce_stats(stats: ActivationStats, cross: torch.Tensor | None) -> None:
    """Sum (max for ``abs_max``) a step's statistics over the ranks, so every rank decides on all the data."""
    if _distributed()[1] == 1:
        return
    for tensor in (stats.abs_sum, stats.gram, cross):
        if tensor is not None:
            dist.all_reduce(tensor)
    dist.all_reduce(stats.abs_max, op=dist.ReduceOp.MAX)
    rows = torch.tensor([stats.rows], dtype=torch.int64, device=stats.abs_sum.device)
    dist.all_reduce(rows)
    stats.rows = int(rows)


def _reduce_gradients(params: list[nn.Parameter]) -> None:
    """Average gradients over the ranks (each holds its share of the calibration batches)."""
    world = _distributed()[1]
    if world == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def _fit(params: Iterable[nn.Parameter], batches: Sequence[tuple[Any, ...]], loss: Callable[..., torch.Tensor],
         epochs: int, lr: float, what: str) -> tuple[float, float]:
    """Adam on the floating-point ``params`` for ``epochs`` passes over ``batches`` (``loss(*batch)``), in float32
    whatever their dtype (restored after, as is ``requires_grad``); gradients are averaged over the ranks, so
    every rank keeps the same parameters. The learning rate decays from ``lr`` to 0 along a half cosine over all
    steps (Loshchilov & Hutter, arXiv 1608.03983, without restarts): the last steps only refine. ``what``: the
    stage, for the progress bar (one tick a step) and the log.

    The loss over ``batches`` is measured before and after training; when training raised it (a learning rate too
    high for these parameters, or too few batches), the parameters from before are kept and a warning says so.
    Returns the loss before training and the loss of the parameters kept."""
    params = [p for p in params if p.is_floating_point()]
    dtypes, flags = [p.dtype for p in params], [p.requires_grad for p in params]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs * len(batches), 1))
    bar = tqdm(total=epochs * len(batches), desc=f"lowrank: {what}", unit="step", leave=False)
    try:
        before = _mean_loss(loss, batches)
        initial = [p.detach().clone() for p in params]
        for _ in range(epochs):
            for batch in batches:
                value = loss(*batch)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                _reduce_gradients(params)
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{value.item():.4g}")
        after = _mean_loss(loss, batches)
        if after > before:
            log.warning("%s raised its loss from %.4g to %.4g over %d epoch(s) at learning rate %g: the parameters "
                        "from before it are kept (lower the learning rate, or give more batches)",
                        what, before, after, epochs, lr)
            for p, value in zip(params, initial):
                p.data.copy_(value)
            after = before
    finally:
        bar.close()
        for p, dtype, flag in zip(params, dtypes, flags):
            p.requires_grad_(flag)
            p.grad = None
            p.data = p.data.to(dtype)
    return before, after


def _mean_loss(loss: Callable[..., torch.Tensor], batches: Sequence[tuple[Any, ...]]) -> float:
    """``loss`` averaged over ``batches`` and over the ranks (so that every rank decides alike)."""
    with torch.no_grad():
        values = [loss(*batch).detach().double() for batch in batches]
    device = values[0].device if values else "cpu"
    total = torch.tensor([sum(v.item() for v in values), len(values)], dtype=torch.float64, device=device)
    if _distributed()[1] > 1:
        dist.all_reduce(total)
    return float(total[0] / total[1].clamp_min(1))


def distill_model(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]],
                  teacher: nn.Module | Callable[[int], torch.Tensor], epochs: int, lr: float) -> tuple[float, float]:
    """End-to-end distillation of a compressed causal LM: Adam (:func:`_fit`) trains its decoder blocks'
    floating-point parameters (factors, latent K/V factors, AQ codebooks and scales, norms, biases, linears left
    dense; the embeddings, final norm and head stay) so that its next-token distribution matches the dense
    model's: KL(p_dense || p_compressed) averaged over the tokens of ``batches`` (knowledge distillation,
    Hinton et al., arXiv 1503.02531, at temperature 1). Per-block objectives cannot see how errors compound
    through the later blocks; this one can. ``teacher``: the dense model itself, or ``teacher(i)`` giving its
    logits on ``batches[i]`` (a replayed stream). Returns the mean divergence before and after (:func:`_fit`)."""
    params = [p for block in decoder_blocks(model)[1] for p in block.parameters()]
    logits = (lambda i: teacher(**batches[i], use_cache=False).logits) if isinstance(teacher, nn.Module) else teacher

    def loss(index: int) -> torch.Tensor:
        batch = batches[index]
        with torch.no_grad():
            dense = logits(index).float().log_softmax(-1)
        student = model(**batch, use_cache=False).logits.float().log_softmax(-1)
        divergence = (dense.exp() * (dense - student)).sum(-1)
        mask = batch.get("attention_mask")
        return divergence.mean() if mask is None else divergence[mask.to(divergence.device).bool()].mean()

    trained = {id(p) for p in params}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in trained]  # no gradient for them
    for p in frozen:
        p.requires_grad_(False)
    try:
        before, after = _fit(params, [(i,) for i in range(len(batches))], loss, epochs, lr, "distillation")
    finally:
        for p in frozen:
            p.requires_grad_(True)
    log.info("distilled: KL to the dense model %.4g (before) -> %.4g (after)", before, after)
    return before, after


def _fewest_over_ranks(count: int, device: torch.device) -> int:
    """The smallest ``count`` of any rank."""
    if _distributed()[1] == 1:
        return count
    value = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value)


def barrier() -> None:
    if _distributed()[1] > 1:
        dist.barrier()


def interrupted_run(out: Path) -> str | None:
    """What a stopped run left in ``out`` for the next one, in words (None: no unfinished run there)."""
    path = out / PROGRESS_FILE
    if not path.is_file():
        return None
    progress = json.loads(path.read_text())
    done = progress.get("blocks_done", 0)
    if done:
        return f"{done} block(s) done are kept in {str(out)!r}; run the same command again to resume at the next"
    if "plan" in progress:
        return f"the plan is kept in {str(out)!r}; run the same command again to resume at block 0"
    return (f"stopped while planning, before any block: running the same command again (--out {str(out)!r}) plans "
            "from the start")


def _atomic_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def write_safetensors(path: Path, tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Write ``(name, tensor)`` pairs as a safetensors file, one tensor in memory at a time (the pairs may be
    produced lazily), atomically (a ``.tmp`` file renamed into place); returns the bytes of tensor data.

    ``safetensors.torch.save_file`` serialises the whole file in memory first, which would double the largest
    unit a block-by-block run holds."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    data = path.with_name(path.name + ".data.tmp")
    with open(data, "wb") as out:
        for name, tensor in tensors:
            raw = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
            out.write(memoryview(raw))
            header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                            "data_offsets": [offset, offset + raw.nbytes]}
            offset += raw.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out, open(data, "rb") as body:
        out.write(len(encoded).to_bytes(8, "little") + encoded)
        shutil.copyfileobj(body, out, 1 << 24)
    data.unlink()
    os.replace(tmp, path)
    return offset


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc's ``malloc_trim``) between blocks.

    The float64 statistics and SVD buffers of a block are freed when it is done, but glibc keeps
    freed chunks below its mmap threshold in the heap: measured on SmolLM2-width blocks, the
    resident set grew by ~150 MB over four blocks without this, and stays flat with it."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


@contextlib.contextmanager
def large_allocations_mapped() -> Iterator[None]:
    """Under ``--max-memory``: allocations above 128 KiB get their own mapping, returned to the OS when freed.

    glibc raises its mmap threshold to the size of each large buffer freed (up to 32 MiB); buffers below it then
    come from the heap, where freed pages stay resident. SmolLM2 at a third of its weights
    (docs/results/block_compression.md) held 223-269 MB above the runtime floor that way and 172 MB with the
    threshold fixed, for 20% more wall time (page faults on fresh mappings). glibc cannot go back to its adaptive
    threshold, so on exit it is fixed at that threshold's ceiling, 32 MiB."""
    if _LIBC is None:
        yield
        return
    _LIBC.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    try:
        yield
    finally:
        _LIBC.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)


def _glibc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018  (absent outside glibc)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()
M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)


def _block_output(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def _modules_set(block: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    """Run ``block`` with the submodules at the given paths swapped in (the dense originals, for the dense stream)."""
    previous = {}
    for path, module in modules.items():
        parent, _, name = path.rpartition(".")
        owner = block.get_submodule(parent) if parent else block
        previous[path] = getattr(owner, name)
        setattr(owner, name, module)
    try:
        yield
    finally:
        for path, module in previous.items():
            parent, _, name = path.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, name, module)


@dataclass(frozen=True)
class WorkingSet:
    """What one unit of block-by-block compression holds at once, in bytes (estimated before any work)."""

    unit: str  # "block 3", or the non-block weights
    weights: int  # dense weights, and the factors beside them
    statistics: int = 0  # float64 buffers of the widest linear's step
    activations: int = 0  # the calibration activation streams
    finetuning: int = 0  # float32 copies of the block for Adam

    @property
    def total(self) -> int:
        return self.weights + self.statistics + self.activations + self.finetuning

    def describe(self) -> str:
        parts = (("weights and factors", self.weights), ("float64 statistics", self.statistics),
                 ("calibration activations", self.activations), ("fine-tuning copies", self.finetuning))
        return ", ".join(f"{name} {value / 1e6:,.1f} MB" for name, value in parts if value)


class BlockCompressor:
    """One block-by-block run (see the module docstring); :meth:`run` does it all."""

    def __init__(self, skeleton: nn.Module, source: WeightSource, batches: Sequence[dict[str, torch.Tensor]],
                 config: LowRankConfig | Mapping[str, Any], out: str | Path, tokenizer: Any = None,
                 max_memory: int | None = None,
                 device: str | torch.device = "cpu",
                 distill_batches: Sequence[dict[str, torch.Tensor]] | None = None):
        config = LowRankConfig.from_options(config)  # a dict of options, as torch.compile takes them, or the config
        if config.kv_ratio is not None:
            raise LowRankConfigError("block-by-block compression factors and quantises linears; option kv_ratio (latent KV "
                                     "attention) needs the in-memory compile (drop --max-memory, or kv_ratio)")
        if config.allocation == "sensitivity":
            raise LowRankConfigError("block-by-block compression allocates ranks with 'closed_form' or 'uniform'; "
                                     "allocation='sensitivity' runs the whole model per trial (use the in-memory compile)")
        if not batches:
            raise CalibrationError("block compression needs at least one calibration batch")
        if distill_batches is not None and not config.distill_epochs:
            raise LowRankConfigError("distillation batches were given but distill_epochs is 0: set distill_epochs (CLI "
                                     "--distill-epochs N), or leave the distillation batches out")
        self.skeleton, self.source, self.config = skeleton, source, config
        self.out, self.tokenizer, self.max_memory = Path(out), tokenizer, max_memory
        self.device = torch.device(device)
        self.rank, self.world = _distributed()
        batches = [forward_kwargs(b) for b in batches]  # tensors, tuples or dicts, as LowRankConfig.calibration
        distill_batches = None if distill_batches is None else [forward_kwargs(b) for b in distill_batches]
        check_calibration_batches([*batches, *(distill_batches or ())], skeleton.config.vocab_size)
        self.batches = batches[self.rank::self.world]
        # distillation's own batches (None: it trains on the calibration batches)
        self.distill_batches = None if distill_batches is None else distill_batches[self.rank::self.world]
        for kind, local in (("calibration", self.batches), ("distillation", self.distill_batches)):
            if local is not None and not local:
                raise CalibrationError(f"rank {self.rank} of {self.world} has no {kind} batch: give at least "
                                       f"{self.world} batches")
        self.prefix, self.blocks = decoder_blocks(skeleton)
        if config.method == "whiten" or config.quantize is not None:
            name, widest = max(((f"{self.prefix}.{n}", m) for n, m in skeleton.get_submodule(self.prefix).named_modules()
                                if isinstance(m, nn.Linear)), key=lambda item: item[1].in_features)
            warn_thin_calibration(batches, widest.in_features, name)
        # the non-block weights, named before any is loaded (loading unties tied embeddings on the skeleton)
        self.rest_names = [name for name, _ in skeleton.named_parameters() if not name.startswith(self.prefix + ".")]
        self.dense_bytes = sum(_meta_bytes(p) for p in skeleton.parameters())  # before blocks are swapped
        self.fingerprint = self._fingerprint((batches, distill_batches or ()))
        self.options = _jsonable(config.deciding_options())  # recorded on each layer and in the progress file
        self.timings: dict[str, float] = {}
        self.entries: dict[str, dict[str, Any]] = {}

    # ---------------------------------------------------------------- bookkeeping

    def _fingerprint(self, batch_lists: Sequence[Sequence[dict[str, torch.Tensor]]]) -> str:
        """The model (its config and a sample of its weights, wherever they are read from) and the data."""
        digest = hashlib.sha256(self.source.signature().encode())
        digest.update(json.dumps(self.skeleton.config.to_dict(), sort_keys=True, default=str).encode())
        for batches in batch_lists:
            digest.update(b"|")
            for batch in batches:
                for key in sorted(batch):
                    digest.update(key.encode() + batch[key].contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def _progress(self) -> dict[str, Any]:
        path = self.out / PROGRESS_FILE
        if not path.is_file():
            return {}
        progress = json.loads(path.read_text())
        expected = {"fingerprint": self.fingerprint, "options": self.options,
                    "world": self.world}
        for key, value in expected.items():
            if progress.get(key) != value:
                raise ResumeError(f"{str(self.out)!r} holds an unfinished run with other "
                                  f"{'process count' if key == 'world' else key}: "
                                  f"{_difference(key, progress.get(key), value)}; give another --out or remove the folder")
        return progress

    def _save_progress(self, progress: dict[str, Any]) -> None:
        if self.rank == 0:
            _atomic_json(self.out / PROGRESS_FILE, progress)
        barrier()

    def _activation_file(self) -> Path:
        return self.out / f"lowrank_activations.rank{self.rank}.safetensors"

    def _save_streams(self, streams: _Streams, teacher: _Streams | None) -> None:
        tensors = {}
        for prefix, kept in (("", streams), ("teacher.", teacher)):
            for kind in ("dense", "compressed"):
                for i, tensor in enumerate(getattr(kept, kind, None) or ()):
                    tensors[f"{prefix}{kind}.{i}"] = tensor
        write_safetensors(self._activation_file(), tensors.items())

    def _load_streams(self, streams: _Streams, teacher: _Streams | None) -> None:
        tensors = load_file(self._activation_file())
        for prefix, kept in (("", streams), ("teacher.", teacher)):
            for kind in ("dense", "compressed"):
                if kept is not None and getattr(kept, kind) is not None:
                    setattr(kept, kind, [tensors[f"{prefix}{kind}.{i}"].to(self.device) for i in range(len(kept.kwargs))])

    # ---------------------------------------------------------------- weights

    def _block_names(self, index: int) -> list[str]:
        prefix = f"{self.prefix}.{index}."
        return [prefix + name for name, _ in self.blocks[index].named_parameters()] + \
               [prefix + name for name, _ in self.blocks[index].named_buffers() if _persistent(self.blocks[index], name)]

    def _load_block(self, index: int) -> nn.Module:
        prefix = f"{self.prefix}.{index}."
        tensors = self.source.read(self._block_names(index))
        block = self.blocks[index]
        block.load_state_dict({name[len(prefix):]: t.to(self.device) for name, t in tensors.items()}, assign=True)
        return block

    def working_set(self) -> WorkingSet:
        """The largest unit held at once (an estimate): one block's dense weights, factors and statistics with
        the calibration activations, or the non-block weights.

        Counted at the widest linear's step, where it peaks: three float64 ``[in, in]`` buffers (C, B or the refit
        map solved in its place, and one Cholesky factor: :meth:`Whitening.of`); float64 ``[out, in]`` W, W G, the
        whitened target, ``vt`` and ``vt L^-1``; each activation stream three times (the block's inputs, its
        outputs, and the list being replaced); with fine-tuning, four float32 copies of the block (weights,
        gradients, Adam's moments)."""
        rest = sum(_meta_bytes(self.skeleton.get_parameter(name)) for name in self.rest_names)
        units = [WorkingSet("the set of non-block weights (embeddings, final norm, head)", rest)]
        rows = sum(self._kept_streams()) * _tokens(self.batches) + _tokens(self.distill_batches or ())
        itemsize = next(self.skeleton.parameters()).element_size()
        activations = 3 * rows * self.skeleton.config.hidden_size * itemsize
        for index, block in enumerate(self.blocks):
            dense = sum(_meta_bytes(p) for p in block.parameters())
            linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
            widest = max(linears, key=lambda m: m.in_features, default=None)
            solve = 0 if widest is None else 8 * widest.in_features * (3 * widest.in_features + 5 * widest.out_features)
            tuning = 4 * dense * 4 // itemsize if self.config.finetune_epochs else 0  # float32 copy, grads, Adam
            units.append(WorkingSet(f"block {index}", 2 * dense, solve, activations, tuning))
        if self.config.distill_epochs:
            units.append(self._distillation_set(itemsize))
        return max(units, key=lambda unit: unit.total)

    def _distillation_set(self, itemsize: int) -> WorkingSet:
        """Distillation holds the whole model in float32 (counted dense: an upper bound), the blocks' gradients and
        Adam's two moments, the dense stream leaving the last block, and one batch's autograd activations: per
        block about 12 hidden-wide and 3 intermediate-wide float32 rows per token plus two attention maps, and
        four vocabulary-wide rows per token for the two models' logits and the divergence."""
        config = self.skeleton.config
        hidden, vocab = config.hidden_size, config.vocab_size
        intermediate = getattr(config, "intermediate_size", 4 * hidden)
        heads = getattr(config, "num_attention_heads", 1)
        model = 4 * sum(p.numel() for p in self.skeleton.parameters())
        blocks = 4 * sum(p.numel() for block in self.blocks for p in block.parameters())
        batches = self.distill_batches or self.batches
        batch = max(batches, key=lambda b: b["input_ids"].numel())["input_ids"]
        tokens, length = batch.numel(), batch.shape[-1]
        autograd = 4 * tokens * (len(self.blocks) * (12 * hidden + 3 * intermediate + 2 * heads * length) + 4 * vocab)
        return WorkingSet("distillation (the whole model)", model, 0, _tokens(batches) * hidden * itemsize + autograd,
                          3 * blocks)

    def _check_budget(self) -> None:
        """Fail before any work when the largest unit held at once exceeds ``max_memory``."""
        if self.max_memory is None:
            return
        need = self.working_set()
        if need.total > self.max_memory:
            raise LowRankConfigError(
                f"--max-memory {self.max_memory:,} bytes is below the {need.total:,} bytes that {need.unit} needs at "
                f"once ({need.describe()}); raise it" + (", or calibrate on fewer or shorter batches (--max-batches, "
                                                        "--seq-len)" if need.activations else ""))

    # ---------------------------------------------------------------- calibration

    def _catch_inputs(self) -> tuple[_Streams, _Streams | None]:
        """Run the calibration batches (and distillation's own, if given) up to block 0 with only the non-block
        weights loaded; free them after. Returns the calibration streams and distillation's dense stream."""
        start = time.perf_counter()
        _materialise_buffers(self.skeleton)
        self.skeleton.load_state_dict(self.source.read(self.rest_names), strict=False, assign=True)
        catcher = _Catcher()
        first = self.blocks[0]
        self.blocks[0] = catcher
        caught = []
        try:
            with torch.no_grad():
                for batches in (self.batches, self.distill_batches or ()):
                    catcher.calls = []
                    for batch in batches:
                        try:
                            self.skeleton(**batch, use_cache=False)
                        except _Caught:
                            pass
                    if len(catcher.calls) != len(batches):
                        raise LowRankError("block compression: a calibration batch never reached the first decoder block")
                    caught.append(_Streams(dense=[h.to(self.device) for h, _ in catcher.calls], compressed=None,
                                           kwargs=[_map_tensors(kw, lambda t: t.to(self.device))
                                                   for _, kw in catcher.calls],
                                           masks=[batch.get("attention_mask") for batch in batches]))
        finally:
            self.blocks[0] = first
            self.skeleton.to_empty(device="meta")  # the non-block weights leave memory
        streams, hidden = caught[0], caught[0].dense
        dense, compressed = self._kept_streams()
        streams.dense, streams.compressed = (hidden if dense else None), (hidden if compressed else None)
        self.timings["catch_inputs"] = time.perf_counter() - start
        return streams, (caught[1] if self.distill_batches is not None else None)

    def _kept_streams(self) -> tuple[bool, bool]:
        """Which activation streams the run carries through the blocks: ``(dense, compressed)``. The dense one feeds
        ``independent`` statistics, error feedback's refit targets, fine-tuning's targets and distillation's
        logits (unless distillation has batches of its own); the compressed one every order but ``independent``,
        and fine-tuning's inputs."""
        order, tune = self.config.calibration_order, self.config.finetune_epochs > 0
        distill = self.config.distill_epochs > 0 and self.distill_batches is None
        dense = order in ("independent", "error_feedback") or tune or distill
        return dense, order != "independent" or tune

    def _steps(self, block: nn.Module, streams: _Streams) -> list[list[str]]:
        """The block's compressible linears grouped by the input they read, in execution order."""
        wanted = {path for path, module in block.named_modules() if isinstance(module, nn.Linear)}
        order: list[tuple[torch.Tensor, str]] = []  # the inputs are kept alive, so no id is reused
        handles = [module.register_forward_pre_hook(lambda m, args, path=path: order.append((args[0], path)))
                   for path, module in block.named_modules() if path in wanted]
        try:
            with torch.no_grad():
                stream = streams.dense if streams.dense is not None else streams.compressed
                _block_output(block, stream[0][:1], _map_tensors(streams.kwargs[0], _first_row))
        finally:
            for handle in handles:
                handle.remove()
        steps: dict[int, list[str]] = {}
        for tensor, path in order:
            steps.setdefault(id(tensor), []).append(path)
        return list(steps.values())

    def _step_stats(self, block: nn.Module, first: str, streams: _Streams, dense_modules: dict[str, nn.Module],
                    cross: bool, use_dense: bool) -> tuple[ActivationStats, torch.Tensor | None]:
        """Statistics of the input of linear ``first`` over the local batches (then summed over ranks)."""
        module = block.get_submodule(first)
        stats = ActivationStats.empty(module.in_features, gram=self.config.method == "whiten")
        captured: list[torch.Tensor] = []

        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            captured.append(args[0])
            raise _Caught

        cross_gram = None
        with torch.no_grad():
            for i in range(len(streams.kwargs)):
                pairs = []
                runs = [(streams.dense, dense_modules)] if use_dense else [(streams.compressed, {})]
                if cross:
                    runs.append((streams.dense, dense_modules))
                for stream, modules in runs:
                    with _modules_set(block, modules):
                        handle = block.get_submodule(first).register_forward_pre_hook(hook)
                        try:
                            _block_output(block, stream[i], streams.kwargs[i])
                        except _Caught:
                            pass
                        finally:
                            handle.remove()
                    pairs.append(ActivationStats.rows_of(captured.pop(), streams.masks[i]))
                stats.add_rows(pairs[0])
                if cross:  # B = X^T X^ (dense rows with the compressed rows), accumulated in place
                    if cross_gram is None:
                        cross_gram = torch.zeros_like(stats.gram)
                    cross_gram.addmm_(pairs[1].T, pairs[0])
        _reduce_stats(stats, cross_gram)
        stats.check(f"{self.prefix}.*.{first}")
        return stats, cross_gram

    # ---------------------------------------------------------------- planning

    def _metas(self) -> list[LinearMeta]:
        metas = []
        for index, block in enumerate(self.blocks):
            for path, module in block.named_modules():
                name = f"{self.prefix}.{index}.{path}"
                if isinstance(module, nn.Linear) and self._selected(name):
                    metas.append(LinearMeta(name, WeightLayout.LINEAR, module.out_features, module.in_features,
                                            module.bias is not None, module.weight.dtype))
        return metas

    def _selected(self, name: str) -> bool:
        from fnmatch import fnmatchcase

        config = self.config
        return any(fnmatchcase(name, p) for p in config.include) and not any(fnmatchcase(name, p) for p in config.exclude)

    def _plan(self, streams: _Streams, progress: dict[str, Any]) -> CompressionPlan:
        metas = self._metas()
        config = self.config
        if "plan" in progress:
            ranks = progress["plan"]
            layers = [LayerPlan(m.name, m.out_features, m.in_features, ranks[m.name]["rank"], ranks[m.name]["reason"],
                                truncation_loss=ranks[m.name]["truncation_loss"]) for m in metas]
        elif config.allocation == "uniform" or config.param_ratio >= 1.0:
            layers = allocate_uniform(metas, config.param_ratio, config.weight_rank_multiple)
        else:
            layers = allocate_closed_form(metas, self._spectra(streams), config.param_ratio,
                                               config.weight_rank_multiple)
        return build_plan(config.method, config.allocation, config.param_ratio, layers, config.weight_rank_multiple)

    def _spectra(self, streams: _Streams) -> dict[str, torch.Tensor]:
        """Each selected linear's singular values on the dense stream (a planning pass over all blocks)."""
        start = time.perf_counter()
        spectra = {}
        dense = list(streams.dense if streams.dense is not None else streams.compressed)
        plan_streams = dataclasses.replace(streams, dense=dense, compressed=None)
        for index in tqdm(range(len(self.blocks)), desc="lowrank: planning", unit="block", leave=False):
            block = self._load_block(index)
            for step in self._steps(block, plan_streams):
                selected = [path for path in step if self._selected(f"{self.prefix}.{index}.{path}")]
                if not selected or self.config.method == "svd":
                    for path in selected:
                        spectra[f"{self.prefix}.{index}.{path}"] = torch.linalg.svdvals(
                            block.get_submodule(path).weight.detach().double())
                    continue
                stats, _ = self._step_stats(block, step[0], plan_streams, {}, cross=False, use_dense=True)
                whitening = shared_whitening(self.config.method, stats, f"{self.prefix}.{index}.{step[0]}")
                for path in selected:
                    name = f"{self.prefix}.{index}.{path}"
                    spectra[name] = decompose(block.get_submodule(path).weight, self.config.method, stats,
                                              self.config.alpha, name, whitening).s
                del stats, whitening
                release_freed_memory()
            with torch.no_grad():
                plan_streams.dense = [_block_output(block, h, kw) for h, kw in zip(plan_streams.dense, streams.kwargs)]
            block.to_empty(device="meta")
            release_freed_memory()
        self.timings["planning"] = time.perf_counter() - start
        return spectra

    # ---------------------------------------------------------------- factoring

    def _compress_block(self, index: int, block: nn.Module, streams: _Streams, plans: dict[str, LayerPlan],
                        teacher: _Streams | None) -> None:
        order, spec = self.config.calibration_order, self.config.aq_spec
        settings = None if spec is None else AQSettings(spec, self.config.aq_beam_size, self.config.aq_tolerance)
        dense_modules: dict[str, nn.Module] = {}
        for step in self._steps(block, streams):
            selected = [path for path in step if f"{self.prefix}.{index}.{path}" in plans]
            changed = [path for path in selected
                       if plans[f"{self.prefix}.{index}.{path}"].rank is not None or settings is not None]
            stats = whitening = None
            if changed and (self.config.method != "svd" or settings is not None):
                stats, cross = self._step_stats(block, step[0], streams, dense_modules,
                                                cross=order == "error_feedback", use_dense=order == "independent")
                factored = any(plans[f"{self.prefix}.{index}.{path}"].rank is not None for path in selected)
                if factored:
                    whitening = shared_whitening(self.config.method, stats, f"{self.prefix}.{index}.{step[0]}", cross)
                del cross
            for path in selected:
                name = f"{self.prefix}.{index}.{path}"
                module = block.get_submodule(path)
                new = self._compressed_linear(module, name, plans[name], stats, whitening, settings)
                if new is None:
                    continue
                dense_modules[path] = module
                parent, _, attr = path.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, attr, new)
            del stats, whitening
            release_freed_memory()
        inputs = streams.compressed
        with torch.no_grad(), _modules_set(block, dense_modules):
            for dense in (streams, teacher):
                if dense is not None and dense.dense is not None:
                    dense.dense = [_block_output(block, h, kw) for h, kw in zip(dense.dense, dense.kwargs)]
        if self.config.finetune_epochs:
            self._finetune(index, block, inputs, streams)
        with torch.no_grad():
            if inputs is not None:
                streams.compressed = [_block_output(block, h, kw) for h, kw in zip(inputs, streams.kwargs)]
        self.entries.update({f"{self.prefix}.{index}.{path}": entry for path, entry in
                             LowRankQuantizationConfig.of_model(block).linears.items()})

    def _compressed_linear(self, module: nn.Linear, name: str, plan: LayerPlan, stats: ActivationStats | None,
                           whitening: Whitening | None, settings: AQSettings | None) -> nn.Module | None:
        """The module replacing ``module`` (factors, AQ codes, or both), or None when it stays dense (its record set)."""
        record = CompressedLayer(plan, self.config.method, LayerStatus.DENSE, module.weight.dtype,
                                 dense_bytes=module.weight.untyped_storage().nbytes(), options=self.options)
        gram = None if stats is None else stats.gram
        why = "" if settings is None else aq_would_not_save(settings.spec, plan, module.weight.dtype)
        if why:
            log.info("%s is not quantised: %s", name, why)
            settings, record.plan = None, dataclasses.replace(plan, reason=why)
        if plan.rank is None:
            if settings is None:
                setattr(module, RECORD, record)
                return None
            return quantize_dense(module.weight, gram, module.bias, record, settings)
        decomposition = decompose(module.weight, self.config.method, stats, self.config.alpha, name, whitening)
        down, up = decomposition.factors(plan.rank, module.weight.dtype)
        record.plan = dataclasses.replace(record.plan, truncation_loss=decomposition.truncation_loss(plan.rank))
        record.status = LayerStatus.FACTORED
        if settings is not None:
            return quantize_factors(module.weight, down, up, gram, module.bias, record, settings)
        return LowRankLinear.from_factors(down, up, module.bias, record)

    def _finetune(self, index: int, block: nn.Module, inputs: list[torch.Tensor], streams: _Streams) -> None:
        """Block fine-tuning (``finetune_epochs``): Adam on the block's floating-point parameters (AQ codes are
        integers and stay) so that ``block(inputs)`` matches the dense outputs ``streams.dense``.

        The loss is the per-token squared error over the squared norm of the dense output: the residual stream of
        a few tokens (attention sinks) is orders of magnitude larger than the rest and would otherwise decide it."""
        steps = _fewest_over_ranks(len(inputs), self.device)  # every rank takes as many steps (each one all-reduces)

        def loss(h: torch.Tensor, kwargs: dict[str, Any], target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            out = _block_output(block, h.float(), _map_tensors(kwargs, _float32))
            error = (out - target.float()).square().sum(-1) / target.float().square().sum(-1).clamp_min(1e-12)
            return error.mean() if mask is None else error[mask.to(error.device).bool()].mean()

        batches = list(zip(inputs, streams.kwargs, streams.dense, streams.masks))[:steps]
        before, after = _fit(list(block.parameters()), batches, loss, self.config.finetune_epochs,
                             self.config.finetune_lr, f"fine-tuning block {index}")
        log.info("block %d fine-tuned: relative error %.4g (before) -> %.4g (after)", index, before, after)

    def _distill(self, batches: list[dict[str, torch.Tensor]], streams: _Streams, progress: dict[str, Any]) -> None:
        """End-to-end distillation (``distill_epochs``, :func:`distill_model`) once every block is compressed.

        The dense model is not held: its logits are the head applied to the dense stream leaving the last block
        (``streams``, carried by the block loop), replayed through the model's own forward with the blocks stood
        in for. The trained blocks go to one file first (``lowrank_distilled.safetensors``), so a run killed while
        they are copied into the block files resumes without training again. Under torchrun every rank reads the blocks
        rank 0 wrote, so the output folder must be one all ranks see (as on one node)."""
        distilled = self.out / DISTILLED_FILE
        if not progress.get("distilled"):
            start = time.perf_counter()
            model, dtypes = self._whole_compressed_model()
            replays = {f"{self.prefix}.{i}": _Replay() for i in range(len(self.blocks))}
            blocks = [(f"{self.prefix}.{i}", model.get_submodule(f"{self.prefix}.{i}")) for i in range(len(self.blocks))]
            steps = _fewest_over_ranks(len(batches), self.device)
            local = [{k: v.to(self.device) for k, v in batch.items()} for batch in batches[:steps]]

            def teacher(index: int) -> torch.Tensor:
                with _modules_set(model, replays):
                    replays[f"{self.prefix}.0"].hidden = streams.dense[index].float()
                    return model(**local[index], use_cache=False).logits

            distill_model(model, local, teacher, self.config.distill_epochs, self.config.distill_lr)
            if self.rank == 0:
                write_safetensors(distilled, ((f"{path}.{k}", v.to(dtypes[f"{path}.{k}"]))
                                              for path, block in blocks for k, v in block.state_dict().items()))
            progress["distilled"] = True
            self._save_progress(progress)
            self.timings["distillation"] = time.perf_counter() - start
            del model, blocks
            self.skeleton.to_empty(device="meta")
            release_freed_memory()
        if self.rank == 0:  # idempotent: a run killed here copies the same tensors again
            tensors = load_file(distilled)
            for index in range(len(self.blocks)):
                file = self.out / BLOCKS_DIR / f"block_{index:05d}.safetensors"
                write_safetensors(file, ((name, tensors[name]) for name in safetensors_header(file)[1]))
        barrier()

    def _whole_compressed_model(self) -> tuple[nn.Module, dict[str, torch.dtype]]:
        """The skeleton with every compressed block and the non-block weights loaded, in float32 (for training),
        and the dtype each block tensor was written in. Blocks an earlier run compressed are still dense on the
        skeleton: their compressed modules are built from the saved entries first."""
        _materialise_buffers(self.skeleton)
        resumed = {name: entry for name, entry in self.entries.items()
                   if type(self.skeleton.get_submodule(name)) is nn.Linear}
        build_compressed_modules(self.skeleton, LowRankQuantizationConfig(resumed))
        dtypes = {}
        for index in range(len(self.blocks)):
            prefix = f"{self.prefix}.{index}."
            tensors = load_file(self.out / BLOCKS_DIR / f"block_{index:05d}.safetensors")
            dtypes.update({name: t.dtype for name, t in tensors.items()})
            self.blocks[index].load_state_dict({name[len(prefix):]: t.to(self.device) for name, t in tensors.items()},
                                               assign=True)
        self.skeleton.load_state_dict({k: v.to(self.device) for k, v in self.source.read(self.rest_names).items()},
                                      strict=False, assign=True)
        self.skeleton.tie_weights()
        return self.skeleton.float(), dtypes

    def run(self) -> BlockCompressionResult:
        """Compress every block not done yet, then write the folder's remaining files."""
        self._check_budget()
        with large_allocations_mapped() if self.max_memory is not None else contextlib.nullcontext():
            return self._run()

    def _run(self) -> BlockCompressionResult:
        start = time.perf_counter()
        if self.rank == 0:
            (self.out / BLOCKS_DIR).mkdir(parents=True, exist_ok=True)
        barrier()
        progress = self._progress()
        barrier()  # every rank has read the folder before rank 0 writes to it
        if not progress:  # written at once: a run stopped before its plan is written is resumed, not refused
            self._save_progress({"fingerprint": self.fingerprint, "options": self.options, "world": self.world,
                                 "blocks_done": 0})
        streams, teacher = self._catch_inputs()
        plan = self._plan(streams, progress)
        plans = {layer.name: layer for layer in plan.layers}
        done = progress.get("blocks_done", 0)
        self.entries = dict(progress.get("entries", {}))
        if done:
            self._load_streams(streams, teacher)
            log.info("resuming in %s after block %d of %d", self.out, done - 1, len(self.blocks))
        progress = {"fingerprint": self.fingerprint, "options": self.options,
                    "world": self.world, "plan": {layer.name: {"rank": layer.rank, "reason": layer.reason,
                                                               "truncation_loss": layer.truncation_loss}
                                                  for layer in plan.layers},
                    "blocks_done": done, "entries": self.entries, "distilled": progress.get("distilled", False)}
        self._save_progress(progress)
        factoring = time.perf_counter()
        bar = tqdm(range(done, len(self.blocks)), desc="lowrank: blocks", unit="block", initial=done,
                   total=len(self.blocks), leave=False)
        for index in bar:
            block = self._load_block(index)
            self._compress_block(index, block, streams, plans, teacher)
            prefix = f"{self.prefix}.{index}."
            if self.rank == 0:
                write_safetensors(self.out / BLOCKS_DIR / f"block_{index:05d}.safetensors",
                                  ((prefix + k, v) for k, v in block.state_dict().items()))
            self._save_streams(streams, teacher)
            self.blocks[index] = block.to_empty(device="meta")
            release_freed_memory()
            progress.update(blocks_done=index + 1, entries=self.entries)
            self._save_progress(progress)
            log.info("block %d of %d compressed", index + 1, len(self.blocks))
        self.timings["factoring"] = time.perf_counter() - factoring
        if self.config.distill_epochs:
            batches, dense = (self.batches, streams) if teacher is None else (self.distill_batches, teacher)
            self._distill(batches, dense, progress)
        before, after = self._finish()
        self.timings["total"] = time.perf_counter() - start
        return BlockCompressionResult(self.out, plan, self.timings, done, before, after)

    def _finish(self) -> tuple[int, int]:
        """Write the non-block weights, the index, the config and the tokenizer; drop the progress files."""
        before = self.dense_bytes
        weight_map = {}
        after = 0
        if self.rank == 0:
            rest = ((name, self.source.read([name])[name]) for name in self.rest_names)  # one at a time
            after += write_safetensors(self.out / REST_FILE, rest)
            weight_map.update({name: REST_FILE for name in self.rest_names})
            for file in sorted((self.out / BLOCKS_DIR).glob("block_*.safetensors")):  # blocks resumed included
                for name, entry in safetensors_header(file)[1].items():
                    weight_map[name] = f"{BLOCKS_DIR}/{file.name}"
                    after += entry["data_offsets"][1] - entry["data_offsets"][0]
            _atomic_json(self.out / INDEX_FILE, {"metadata": {"total_size": after}, "weight_map": weight_map})
            config = self.skeleton.config
            config.quantization_config = LowRankQuantizationConfig(self.entries)
            config.save_pretrained(self.out)
            if self.skeleton.can_generate():  # as save_pretrained writes it: generate's defaults (eos, sampling)
                self.skeleton.generation_config.save_pretrained(self.out)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(self.out)
        barrier()
        self._activation_file().unlink(missing_ok=True)
        barrier()
        if self.rank == 0:
            (self.out / DISTILLED_FILE).unlink(missing_ok=True)
            (self.out / PROGRESS_FILE).unlink(missing_ok=True)
        return before, after


def _persistent(module: nn.Module, name: str) -> bool:
    owner_path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    return leaf not in owner._non_persistent_buffers_set


def _tokens(batches: Iterable[dict[str, torch.Tensor]]) -> int:
    return sum(batch["input_ids"].numel() for batch in batches)


def _meta_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _map_tensors(kwargs: dict[str, Any], fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
    """A block's keyword arguments with ``fn`` applied to every tensor (also inside tuples: RoPE's cos/sin)."""
    def apply(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return fn(value)
        if isinstance(value, tuple):
            return tuple(apply(v) for v in value)
        return value
    return {k: apply(v) for k, v in kwargs.items()}


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor


def _first_row(tensor: torch.Tensor) -> torch.Tensor:
    """A batch's tensor cut to its first sequence (for the cheap probe of execution order)."""
    return tensor[:1] if tensor.dim() > 1 and tensor.shape[0] > 1 else tensor


def _materialise_buffers(model: nn.Module) -> None:
    """Compute the non-persistent buffers a meta skeleton lacks (RoPE's ``inv_freq``, Gemma's ``embed_scale``) on
    the CPU, by the model's own ``_init_weights`` as ``from_pretrained`` does; call it before any weight is loaded
    (parameters are marked initialised, so the init leaves them alone, and they are still on the meta device)."""
    for module in model.modules():
        missing = [name for name in module._non_persistent_buffers_set
                   if module._buffers.get(name) is not None and module._buffers[name].is_meta]
        if not missing:
            continue
        if any(not p.is_meta for p in module.parameters(recurse=False)):
            raise LowRankError(f"{type(module).__name__}: its buffers must be computed before its weights load")
        for name in missing:
            module._buffers[name] = torch.empty_like(module._buffers[name], device="cpu")
        marked = [p for p in module.parameters(recurse=False) if not getattr(p, "_is_hf_initialized", False)]
        for p in marked:
            p._is_hf_initialized = True
        model._init_weights(module)
        for p in marked:
            del p._is_hf_initialized


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(options, default=str))


def skeleton_of(config: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of ``config`` on the meta device: structure and names, no memory. Its class is the one the
    config's ``architectures`` names (an encoder saved from ``AutoModel`` is a ``BertModel``, whose layer names a
    causal-LM head class would not have), else the causal LM of the config."""
    import transformers

    names = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, names[0], None) if names else None
    with torch.device("meta"):
        model = (transformers.AutoModelForCausalLM.from_config(config, dtype=dtype) if model_class is None else
                 model_class._from_config(config, dtype=dtype))
    return model.eval()


def compress_model_blocks(model: nn.Module, batches: Sequence[Any], config: LowRankConfig | Mapping[str, Any],
                          out: str | Path, tokenizer: Any = None, **kwargs: Any) -> BlockCompressionResult:
    """Block-by-block compression of a model already in memory (its own tensors are read, not copied); ``batches``
    in any form ``LowRankConfig.calibration`` takes (token-id tensors, tuples or dicts of forward arguments)."""
    from .weight_sources import ModuleWeights

    skeleton = skeleton_of(model.config, next(model.parameters()).dtype)
    if getattr(model, "generation_config", None) is not None:
        skeleton.generation_config = copy.deepcopy(model.generation_config)
    return BlockCompressor(skeleton, ModuleWeights(model), batches, config, out, tokenizer, **kwargs).run()
