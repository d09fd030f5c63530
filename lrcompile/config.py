"""`LowRankConfig`: the validated, frozen options of the ``lowrank`` backend."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CalibrationError, LowRankConfigError
from .types import ALLOCATION_METHODS, FACTOR_METHODS, KV_ALLOCATION_METHODS, AQSpec

COMPILERS = ("inductor", "aot_eager", "eager")
CALIBRATION_ORDERS = ("independent", "sequential", "error_feedback")
QUANTIZE_METHODS = ("aqlm",)
_AQ_OPTIONS = ("aq_config", "aq_group_size", "aq_beam_size", "aq_tolerance")  # used only with quantize
MAX_AQ_BITS = 16  # codes are stored in 8 or 16 bits (lrcompile.kernels.aq_linear)
DUMP_ENV = "LRCOMPILE_DUMP"
_NOT_DECIDING = frozenset({"dump_dir", "compiler", "compiler_mode", "compiler_options"})
OUTPUT_HEADS = ("lm_head", "*.lm_head", "embed_out", "*.embed_out", "*pooler.dense")
MOE_ROUTERS = ("*.mlp.gate", "*.shared_expert_gate")  # a few outputs each, whose error reroutes tokens
DEFAULT_EXCLUDE = OUTPUT_HEADS + MOE_ROUTERS


def _ratio(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LowRankConfigError(f"option {key!r}={value!r}: expected a number in (0, 1]")
    if not 0.0 < float(value) <= 1.0:
        raise LowRankConfigError(f"option {key!r}={value!r} is outside (0, 1]: it is the fraction kept")
    return float(value)


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise LowRankConfigError(f"option {key!r}={value!r} is not one of {', '.join(map(repr, allowed))}")
    return value


def _patterns(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise LowRankConfigError(f"option {key!r}={value!r}: expected a glob pattern or a list of them")
    return tuple(value)


def _calibration(value: Any) -> tuple[Any, ...] | None:
    """Materialise the calibration iterable once: generators are single-use and
    the backend runs once per captured graph."""
    if value is None:
        return None
    if isinstance(value, (torch.Tensor, Mapping, str)) or not isinstance(value, Iterable):
        raise LowRankConfigError(
            f"option 'calibration' must be an iterable of model inputs (tensors or dicts of tensors), "
            f"got {type(value).__name__}; wrap a single batch in a list"
        )
    batches = tuple(value)
    if not batches:
        raise CalibrationError("option 'calibration' is empty: give at least one batch of model inputs")
    for i, batch in enumerate(batches):
        if not isinstance(batch, (torch.Tensor, Mapping, tuple, list)):
            raise CalibrationError(
                f"calibration batch {i} is a {type(batch).__name__}; expected a tensor, a tuple of tensors "
                "or a dict of model inputs"
            )
    return batches


def _aq_spec(config: Any, group_size: Any) -> AQSpec:
    """``aq_config`` ``"MxB"`` (M codebooks of 2^B codewords) and ``aq_group_size`` as an :class:`AQSpec`."""
    books, _, bits = str(config).partition("x") if isinstance(config, str) else ("", "", "")
    if not (books.isdigit() and bits.isdigit() and int(books) >= 1 and 1 <= int(bits) <= MAX_AQ_BITS):
        raise LowRankConfigError(f"option 'aq_config'={config!r}: expected 'MxB', M >= 1 codebooks of 2^B codewords "
                                 f"with 1 <= B <= {MAX_AQ_BITS}, e.g. '2x8' or '1x8'")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise LowRankConfigError(f"option 'aq_group_size'={group_size!r}: expected a positive integer (AQLM uses 8)")
    return AQSpec(int(books), int(bits), group_size)


def _inductor_config(mode: Any, options: Any) -> dict[str, Any]:
    """Inductor config patches of torch.compile's ``mode`` plus ``options``, validated as torch.compile does."""
    from torch._inductor import config as inductor_config
    from torch._inductor import list_mode_options

    modes = list_mode_options()
    if mode is not None and mode not in modes:
        raise LowRankConfigError(f"option 'compiler_mode'={mode!r} is not one of {', '.join(map(repr, modes))}")
    if options is not None and (not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options)):
        raise LowRankConfigError(f"option 'compiler_options'={options!r}: expected a dict of Inductor config names")
    patches = dict(modes.get(mode, {}))
    known = inductor_config.get_config_copy()
    for key, value in (options or {}).items():
        name = key.replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise LowRankConfigError(f"option 'compiler_options': {key!r} is not an Inductor config{hint} "
                                     "(see torch._inductor.list_options())")
        kind = inductor_config.get_type(name)
        if isinstance(kind, type) and not isinstance(value, kind):
            raise LowRankConfigError(f"option 'compiler_options': {key!r}={value!r} should be a {kind.__name__}")
        patches[name] = value
    return patches


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` itself or its nearest ancestor that exists: what decides whether it can become a folder."""
    return next(p for p in (Path(path), *Path(path).parents) if p.exists())  # a relative path ends at "."


@dataclass(frozen=True, eq=False)
class LowRankConfig:
    """Options of ``torch.compile(model, backend="lowrank", options=...)``.

    param_ratio: parameters of the compressible linears after factoring over dense.
    method: ``svd`` (plain), ``asvd`` (activation-scaled, ASVD) or ``whiten`` (SVD-LLM).
    allocation: ``uniform``, ``sensitivity`` (ASVD's KL search) or ``closed_form``
        (truncation loss from the spectra, exact for ``whiten``).
    calibration_order: ``independent`` (every linear factored from the dense model's
        statistics), ``sequential`` (in graph order, each linear is whitened with the
        statistics of its inputs in the model whose earlier layers are already
        factored: SVD-LLM's sequential update, target ``W X^``) or ``error_feedback``
        (the same order, and each linear is refit so that, fed those inputs, it best
        reproduces the dense layer's output ``W X``; see ``passes.sequential_calibration``).
        Both need ``method="whiten"``; ranks are planned first from the dense statistics.
        None (default): ``error_feedback`` with ``whiten`` when nothing is quantised (the most
        accurate order and the lightest on memory, docs/results/smollm2.md), else ``independent``.

    The defaults follow docs/results: ``whiten`` beats ``asvd`` and ``svd`` on
    every model measured (on SmolLM2, whose activations have outliers, ``asvd``
    is unusable); ``closed_form`` matches ``sensitivity`` on the trained
    fixture at a 27-41x lower cost and beats ``uniform`` on SmolLM2; ``uniform``
    K/V ranks match or beat Fisher ranks on the fixture and SmolLM2.
    include / exclude: glob patterns over module paths choosing the linears to compress.
    kv_ratio: latent K/V values cached per token over dense K+V values (Palu); None
        leaves attention as it is. At 1.0 the restructure is exact (full rank).
    kv_group_size: KV heads sharing one latent (1 = per head, ``"all"`` = joint).
    kv_allocation: ``uniform``, ``closed_form`` (truncation loss from the K/V spectra,
        as for weights: no forward pass), ``fisher`` (ranks proportional to the Fisher
        information of the K/V weights on calibration, Palu Sec. 3.3) or
        ``sensitivity`` (output-KL search per K/V projection, as for weights).
    kv_key_share: under ``uniform`` K/V ranks, K's share of each group's K+V latent
        values (the rest go to V). 0.375 (K : V = 3 : 5) by measurement on SmolLM2:
        pre-RoPE keys are the more compressible (``passes.kv_rank_allocation``).
    kv_unmatched: with a ``kv_ratio``, an attention block that cannot be restructured
        (no RoPE, another attention kernel, a dense KV cache in the graph) is an
        error naming it and why (``"error"``) or a warning, the block left dense (``"warn"``).
    quantize: ``"aqlm"`` quantises every compressible linear after factoring (AQLM,
        ``passes.quantize_linears``): a layer left at full rank (all of them at
        ``param_ratio=1``) becomes an ``AQLinear``, a factored one has both factors
        quantised. None (default): no quantisation. Needs calibration (the inputs' Gram).
    aq_config: ``"MxB"``: M codebooks of 2^B codewords (``"2x8"``: 2 bits a weight at group size 8).
    aq_group_size: consecutive input weights per code group (g); must divide every quantised layer's input width.
    aq_beam_size: code tuples kept per group during AQLM's beam search (1: greedy).
    aq_tolerance: AQLM stops when a round improves the output error by less than this fraction.
    finetune_epochs: block fine-tuning (AQLM Sec. 3.4; block by block only): after each decoder block is
        compressed, this many passes of Adam over the calibration batches fit the compressed block, fed the
        compressed model's activations, to the dense block's outputs (per-token relative squared error).
        Trained: factors, AQ codebooks and scales, norms, biases and the linears left dense; AQ codes stay.
        0 (default): none.
    finetune_lr: Adam's first learning rate for block fine-tuning (decayed to 0 along a half cosine).
    distill_epochs: end-to-end distillation (block by block; the backend refuses it, and a model it compressed
        is distilled with ``lrcompile.distill_model``, as ``compress --kv-ratio`` does): once every block is
        compressed, this many passes of Adam over the calibration batches (or ``compress_model_blocks``'
        ``distill_batches``, CLI ``--distill-batches``) train the blocks' floating-point parameters (as block
        fine-tuning does) to match the dense model's next-token distribution (KL divergence). The whole model
        and its gradients are held at once. 0 (default): none.
    distill_lr: Adam's first learning rate for distillation (decayed to 0 along a half cosine).
    compiler: the downstream compiler of the rewritten graph: ``inductor``, ``aot_eager`` or ``eager``.
    compiler_mode / compiler_options: with ``inductor``, torch.compile's ``mode`` (``"reduce-overhead"``:
        CUDA graphs, ``"max-autotune"``, ...) and ``options`` (Inductor config names and values), handed to
        Inductor as its config patches.

    Equality is identity (``eq=False``): Dynamo reuses a graph captured for one
    model instance for another of the same class when their backends' options
    compare equal, and that graph holds the first instance's factors.
    """

    calibration: tuple[Any, ...] | None = field(default=None, repr=False)
    param_ratio: float = 0.85
    method: str = "whiten"
    alpha: float = 0.5
    allocation: str = "closed_form"
    calibration_order: str | None = None
    rank_multiple: int = 8
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    sensitivity_ratios: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    sensitivity_batches: int = 4
    kv_ratio: float | None = None
    kv_group_size: int | str = 1
    kv_allocation: str = "uniform"
    kv_key_share: float = 0.375
    kv_unmatched: str = "error"
    quantize: str | None = None
    aq_config: str = "2x8"
    aq_group_size: int = 8
    aq_beam_size: int = 1
    aq_tolerance: float = 0.01
    finetune_epochs: int = 0
    finetune_lr: float = 5e-4
    distill_epochs: int = 0
    distill_lr: float = 5e-5
    dump_dir: str | None = None
    compiler: str = "inductor"
    compiler_mode: str | None = None
    compiler_options: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "calibration", _calibration(self.calibration))
        set_(self, "param_ratio", _ratio("param_ratio", self.param_ratio))
        _choice("method", self.method, FACTOR_METHODS)
        _choice("allocation", self.allocation, ALLOCATION_METHODS)
        if self.calibration_order is None:
            refits = self.method == "whiten" and self.quantize is None
            set_(self, "calibration_order", "error_feedback" if refits else "independent")
        _choice("calibration_order", self.calibration_order, CALIBRATION_ORDERS)
        if self.calibration_order != "independent" and self.method != "whiten":
            raise LowRankConfigError(
                f"option calibration_order={self.calibration_order!r} refits each layer by whitened least squares and "
                f"needs method='whiten' (got method={self.method!r}); use calibration_order='independent' with "
                f"{self.method!r}"
            )
        _choice("compiler", self.compiler, COMPILERS)
        if (self.compiler_mode is not None or self.compiler_options) and self.compiler != "inductor":
            raise LowRankConfigError(
                f"options 'compiler_mode'={self.compiler_mode!r} and 'compiler_options' configure Inductor, but "
                f"compiler={self.compiler!r}: set compiler='inductor' or drop them"
            )
        if self.compiler_mode is not None or self.compiler_options is not None:
            _inductor_config(self.compiler_mode, self.compiler_options)
            set_(self, "compiler_options", None if self.compiler_options is None else dict(self.compiler_options))
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 2:
            raise LowRankConfigError(f"option 'alpha'={self.alpha!r}: expected a number in [0, 2] (ASVD uses 0.5)")
        if isinstance(self.rank_multiple, bool) or not isinstance(self.rank_multiple, int) or self.rank_multiple < 1:
            raise LowRankConfigError(f"option 'rank_multiple'={self.rank_multiple!r}: expected a positive integer")
        if self.kv_ratio is not None:
            set_(self, "kv_ratio", _ratio("kv_ratio", self.kv_ratio))
        group = self.kv_group_size
        if group != "all" and (isinstance(group, bool) or not isinstance(group, int) or group < 1):
            raise LowRankConfigError(f"option 'kv_group_size'={group!r}: expected a positive integer or 'all'")
        _choice("kv_allocation", self.kv_allocation, KV_ALLOCATION_METHODS)
        share = self.kv_key_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < share < 1.0:
            raise LowRankConfigError(f"option 'kv_key_share'={share!r}: expected a number in (0, 1), K's share "
                                     "of the K+V latent values")
        _choice("kv_unmatched", self.kv_unmatched, ("error", "warn"))
        if self.quantize is not None:
            _choice("quantize", self.quantize, QUANTIZE_METHODS)
        else:
            unused = [f"{name}={getattr(self, name)!r}" for name in _AQ_OPTIONS
                      if getattr(self, name) != getattr(LowRankConfig, name)]
            if unused:
                raise LowRankConfigError(f"option(s) {', '.join(unused)} configure AQLM, but quantize is None: set "
                                         "quantize='aqlm' or drop them (they would be ignored)")
        _aq_spec(self.aq_config, self.aq_group_size)
        beam = self.aq_beam_size
        if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
            raise LowRankConfigError(f"option 'aq_beam_size'={beam!r}: expected a positive integer (1: greedy)")
        tolerance = self.aq_tolerance
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
            raise LowRankConfigError(f"option 'aq_tolerance'={tolerance!r}: expected a fraction in [0, 1) (AQLM uses 0.01)")
        for stage in ("finetune", "distill"):
            epochs, lr = getattr(self, f"{stage}_epochs"), getattr(self, f"{stage}_lr")
            if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
                raise LowRankConfigError(f"option '{stage}_epochs'={epochs!r}: expected a non-negative integer (0: none)")
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < 1:
                raise LowRankConfigError(f"option '{stage}_lr'={lr!r}: expected a learning rate in (0, 1)")
        if self.quantize is not None and self.calibration_order != "independent":
            raise LowRankConfigError(
                f"option quantize={self.quantize!r} fits codes to each layer's input statistics from the dense model; "
                f"it does not run with calibration_order={self.calibration_order!r}: use calibration_order='independent'"
            )
        set_(self, "include", _patterns("include", self.include))
        set_(self, "exclude", _patterns("exclude", self.exclude))
        ratios = self.sensitivity_ratios
        if not isinstance(ratios, (list, tuple)) or not ratios:
            raise LowRankConfigError(f"option 'sensitivity_ratios'={ratios!r}: expected a non-empty list of ratios")
        set_(self, "sensitivity_ratios", tuple(sorted(_ratio("sensitivity_ratios", r) for r in ratios)))
        batches = self.sensitivity_batches
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
            raise LowRankConfigError(f"option 'sensitivity_batches'={batches!r}: expected a positive integer")
        if self.dump_dir is None and os.environ.get(DUMP_ENV):
            set_(self, "dump_dir", os.environ[DUMP_ENV])
        if self.dump_dir is not None and not isinstance(self.dump_dir, (str, os.PathLike)):
            raise LowRankConfigError(f"option 'dump_dir'={self.dump_dir!r}: expected a folder path")
        if self.dump_dir is not None:
            existing = nearest_existing(self.dump_dir)
            if not existing.is_dir():
                raise LowRankConfigError(f"option 'dump_dir'={str(self.dump_dir)!r}: {str(existing)!r} is a file, not "
                                         "a folder")

    @property
    def needs_calibration(self) -> bool:
        """Whether layers without a recorded outcome need calibration data (checked when one does).

        At ``param_ratio`` 1 every layer stays dense, so nothing is measured, unless it is quantised."""
        factoring = self.param_ratio < 1.0 and (self.method != "svd" or self.allocation == "sensitivity")
        return factoring or self.quantize is not None

    @property
    def aq_spec(self) -> AQSpec | None:
        """The AQLM shape when ``quantize="aqlm"``, else None."""
        return _aq_spec(self.aq_config, self.aq_group_size) if self.quantize == "aqlm" else None

    @property
    def weight_rank_multiple(self) -> int:
        """What factored weights' ranks are multiples of: ``rank_multiple``, and with AQLM also of its group
        size, since a factor's rank is the input width of its up factor's code groups."""
        spec = self.aq_spec
        return self.rank_multiple if spec is None or self.param_ratio >= 1.0 else math.lcm(self.rank_multiple,
                                                                                           spec.group_size)

    @property
    def kv_needs_calibration(self) -> bool:
        """Whether restructuring attention needs calibration data (not at kv_ratio 1, which is exact)."""
        return self.kv_ratio is not None and self.kv_ratio < 1.0 and (self.method != "svd" or self.kv_allocation != "uniform")

    @classmethod
    def from_options(cls, options: LowRankConfig | Mapping[str, Any] | None) -> LowRankConfig:
        """Parse ``torch.compile``'s options dict; unknown keys fail with a suggestion."""
        if options is None:
            return cls()
        if isinstance(options, LowRankConfig):
            return options
        if not isinstance(options, Mapping):
            raise LowRankConfigError(f"options must be a dict or a LowRankConfig, got {type(options).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise LowRankConfigError(f"unknown option {key!r}{hint} (allowed: {', '.join(known)})")
        return cls(**options)

    def inductor_config(self) -> dict[str, Any]:
        """The config patches Inductor compiles the rewritten graph with (mode's settings, then the options)."""
        if self.compiler_mode is None and not self.compiler_options:
            return {}
        return _inductor_config(self.compiler_mode, self.compiler_options)

    def deciding_options(self) -> dict[str, Any]:
        """The options that decide what a compression produces (not how it is compiled or dumped);
        a later compile of an already-compressed model must ask for the same ones."""
        return {key: value for key, value in self.to_json().items() if key not in _NOT_DECIDING}

    def to_json(self) -> dict[str, Any]:
        """The options that decide the result, for plans and reports (calibration left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "calibration"}
