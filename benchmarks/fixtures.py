"""Trained causal-LM fixtures: small Llama models with real activation statistics.

Compression accuracy is only meaningful on a *trained* model: random weights
have no activation outliers and no structure for a low-rank factorisation to
keep or lose. No weights can be downloaded here, so this module trains its
own, once per machine, on text every machine has:

* **Corpus.** The Python standard library's top-level ``*.py`` files (sorted),
  split by a stable hash of each file's name into a train part and a held-out
  part (:data:`HELDOUT_SHARE`), so held-out text is never trained on.
* **Tokenizer.** A byte-level BPE trained with ``tokenizers`` on the train
  part, wrapped as :class:`transformers.PreTrainedTokenizerFast` with
  ``<pad>`` / ``<s>`` / ``</s>``, saved next to the model.
* **Model.** ``LlamaForCausalLM``: grouped-query attention, RoPE, SwiGLU MLP,
  RMSNorm, untied ``lm_head``; trained in float32 with AdamW, linear warmup
  and a cosine schedule, on random windows of the train token stream, with
  fixed seeds.

Named recipes (:data:`RECIPES`): ``tiny`` (CI, trains in well under a minute),
``small`` (accuracy benchmarks, ~10 minutes) and ``medium`` (compile-cost
scaling only; trained briefly). A fixture is cached under
``$LRCOMPILE_CACHE/fixtures`` (default ``~/.cache/lrcompile/fixtures``) in a
folder named by the recipe and a hash of the recipe and of the training code,
so a change to either trains a new one. Training writes to a temporary folder
that is renamed into place when complete.

Usage::

    from benchmarks.fixtures import load_fixture, heldout_chunks, calibration_chunks, perplexity
    fx = load_fixture("tiny")
    model = fx.load_model()                      # fresh float32 eval model per call
    ppl = perplexity(lambda ids: model(input_ids=ids).logits, heldout_chunks(fx, 128, 4))

``python -m benchmarks.fixtures [tiny|small|medium]`` trains (or loads) a
fixture and prints its recipe, size, training time and held-out perplexity.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import inspect
import json
import logging
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lrcompile.evaluation import perplexity

log = logging.getLogger(__name__)

HELDOUT_SHARE = 0.1
CACHE_ENV = "LRCOMPILE_CACHE"
THREADS_ENV = "LRCOMPILE_FIXTURE_THREADS"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
TOKENS_FILE = "tokens.safetensors"
FIXTURE_FILE = "fixture.json"
EVAL_SEQUENCES = 64  # held-out perplexity recorded in fixture.json: 64 windows of the training length


@dataclass(frozen=True)
class FixtureRecipe:
    """Everything that decides a fixture's weights (with the training code itself)."""

    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    seq_len: int
    batch: int
    steps: int
    lr: float
    seed: int = 0
    warmup: float = 0.05  # share of steps with linear warmup
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1

    def llama_config(self) -> Any:
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=max(self.seq_len, 512),
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            hidden_act="silu",
            tie_word_embeddings=False,
            initializer_range=0.02,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            use_cache=False,
        )


RECIPES: dict[str, FixtureRecipe] = {
    r.name: r
    for r in (
        # ~0.3M parameters; CI trains it from an empty cache.
        FixtureRecipe("tiny", vocab=512, hidden=96, layers=2, heads=6, kv_heads=2, intermediate=256,
                      seq_len=128, batch=16, steps=500, lr=3e-3, seed=0),
        # ~3.9M parameters; accuracy benchmarks (~1.8 passes over the train split).
        FixtureRecipe("small", vocab=2048, hidden=256, layers=4, heads=8, kv_heads=2, intermediate=704,
                      seq_len=256, batch=8, steps=1200, lr=2e-3, seed=0),
        # ~27M parameters; compile-cost scaling only (briefly trained, far from converged).
        FixtureRecipe("medium", vocab=4096, hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1408,
                      seq_len=256, batch=8, steps=150, lr=1e-3, seed=0),
    )
}


# --------------------------------------------------------------------------- corpus


def stdlib_files() -> list[Path]:
    """Top-level ``*.py`` files of the running Python's standard library, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(root.glob("*.py"), key=lambda p: p.name)


def is_heldout(path: Path, share: float = HELDOUT_SHARE) -> bool:
    """Stable split by a hash of the file name (not the install prefix, which differs between machines)."""
    bucket = int(hashlib.sha256(path.name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < share


def corpus(split: str) -> list[str]:
    """Texts of the ``train`` or ``heldout`` split, one per file."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split {split!r}: expected 'train' or 'heldout'")
    texts = []
    for path in stdlib_files():
        if is_heldout(path) != (split == "heldout"):
            continue
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    if not texts:
        raise RuntimeError(f"no stdlib source files for split {split!r} under {sysconfig.get_paths()['stdlib']}")
    return texts


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Iterable[str], vocab: int) -> Any:
    """Byte-level BPE over ``texts``, as a ``PreTrainedTokenizerFast`` with pad/bos/eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != [PAD_ID, BOS_ID, EOS_ID]:
        raise RuntimeError(f"special token ids {ids}, expected {[PAD_ID, BOS_ID, EOS_ID]}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token=None,
        model_max_length=1 << 20,
    )


def token_stream(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """All ``texts`` tokenised and concatenated, each followed by ``</s>``: a 1-D int32 tensor."""
    encoded = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
    ids: list[int] = []
    for enc in encoded:
        ids.extend(enc.ids)
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.int32)


# --------------------------------------------------------------------------- training


def _lr_factor(step: int, recipe: FixtureRecipe) -> float:
    warmup = max(1, int(recipe.warmup * recipe.steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, recipe.steps - warmup)
    return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _windows(stream: torch.Tensor, seq_len: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - seq_len, (batch,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()]).long()


def train_model(recipe: FixtureRecipe, train_tokens: torch.Tensor) -> tuple[Any, float]:
    """Train a Llama on random windows of ``train_tokens``; returns ``(model, final train loss)``.

    The final loss is the mean over the last 5% of steps (at least one).
    """
    from tqdm.auto import tqdm
    from transformers import LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(recipe.llama_config()).float().train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, recipe))
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    tail = max(1, recipe.steps // 20)
    losses: list[float] = []
    bar = tqdm(range(recipe.steps), desc=f"fixture {recipe.name}: training", unit="step", leave=False)
    for step in bar:
        ids = _windows(train_tokens, recipe.seq_len, recipe.batch, generator)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == recipe.steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if step % max(1, recipe.steps // 10) == 0:
            log.debug("fixture %s: step %d loss %.4f", recipe.name, step, losses[-1])
    bar.close()
    return model.eval(), sum(losses[-tail:]) / len(losses[-tail:])


# Functions whose source decides the trained weights: part of the cache key.
_TRAINING_CODE: tuple[Callable[..., Any], ...] = (
    FixtureRecipe.llama_config, stdlib_files, is_heldout, corpus, train_tokenizer, token_stream,
    _lr_factor, _windows, train_model,
)


def fixture_key(recipe: FixtureRecipe) -> str:
    """Short hash of the recipe, the training code and the Python version (whose stdlib is the corpus)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(dataclasses.asdict(recipe), sort_keys=True).encode())
    digest.update(repr((HELDOUT_SHARE, SPECIAL_TOKENS, sys.version_info[:2])).encode())
    for fn in _TRAINING_CODE:
        try:
            digest.update(inspect.getsource(fn).encode())
        except (OSError, TypeError):  # no source (frozen or bytecode-only install): hash the bytecode
            digest.update(fn.__code__.co_code)
    return digest.hexdigest()[:10]


def cache_root() -> Path:
    """``$LRCOMPILE_CACHE/fixtures``, default ``~/.cache/lrcompile/fixtures``."""
    base = os.environ.get(CACHE_ENV)
    return (Path(base) if base else Path.home() / ".cache" / "lrcompile") / "fixtures"


def fixture_dir(recipe: FixtureRecipe) -> Path:
    return cache_root() / f"{recipe.name}-{fixture_key(recipe)}"


# --------------------------------------------------------------------------- the fixture


@dataclass
class Fixture:
    """A trained model folder (``save_pretrained`` + tokenizer + token streams + ``fixture.json``)."""

    folder: Path
    recipe: FixtureRecipe
    tokenizer: Any
    info: dict[str, Any]
    _tokens: dict[str, torch.Tensor] | None = dataclasses.field(default=None, repr=False)

    def load_model(self) -> Any:
        """A fresh float32 model in eval mode (the lowrank backend releases dense weights, so one per compile)."""
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM.from_pretrained(self.folder, dtype=torch.float32).eval()

    def tokens(self, split: str) -> torch.Tensor:
        """The ``train`` or ``heldout`` token stream (1-D int32), files separated by ``</s>``."""
        if self._tokens is None:
            from safetensors.torch import load_file

            self._tokens = load_file(self.folder / TOKENS_FILE)
        if split not in self._tokens:
            raise ValueError(f"split {split!r}: expected 'train' or 'heldout'")
        return self._tokens[split]

    @property
    def num_params(self) -> int:
        return int(self.info["num_params"])

    @property
    def heldout_ppl(self) -> float:
        return float(self.info["heldout_ppl"])


def _chunks(stream: torch.Tensor, seq_len: int, count: int, batch: int, what: str) -> list[torch.Tensor]:
    """``count`` batches ``[batch, seq_len]`` of windows at evenly spaced offsets of ``stream`` (deterministic)."""
    if count < 1 or batch < 1 or seq_len < 2:
        raise ValueError(f"count={count}, batch={batch}, seq_len={seq_len}: expected count, batch >= 1, seq_len >= 2")
    n = count * batch
    span = stream.numel() - seq_len
    if span < 0:
        raise ValueError(f"the {what} stream has {stream.numel()} tokens, fewer than seq_len={seq_len}")
    if n * seq_len > stream.numel():
        log.warning("%s: %d windows of %d tokens overlap (stream has %d tokens)", what, n, seq_len, stream.numel())
    starts = [round(i * span / max(1, n - 1)) if n > 1 else 0 for i in range(n)]
    windows = torch.stack([stream[s : s + seq_len] for s in starts]).long()
    return list(windows.view(count, batch, seq_len).unbind(0))


def heldout_chunks(fixture: Fixture, seq_len: int, count: int, batch: int = 8) -> list[torch.Tensor]:
    """``count`` int64 batches ``[batch, seq_len]`` of held-out text, for evaluation (never trained on)."""
    return _chunks(fixture.tokens("heldout"), seq_len, count, batch, "held-out")


def calibration_chunks(fixture: Fixture, seq_len: int, count: int, batch: int = 8) -> list[torch.Tensor]:
    """``count`` int64 batches ``[batch, seq_len]`` of train text, for calibration."""
    return _chunks(fixture.tokens("train"), seq_len, count, batch, "train")


def _evaluate(model: Any, heldout: torch.Tensor, seq_len: int) -> float:
    chunks = _chunks(heldout, seq_len, EVAL_SEQUENCES // 8, 8, "held-out")
    return perplexity(lambda ids: model(input_ids=ids).logits, chunks)


def free_threads() -> int:
    """Intra-op threads for training and evaluating fixtures: ``$LRCOMPILE_FIXTURE_THREADS``, else the idle cores.

    The fixtures' ops are small, and OpenMP workers spin while they wait: on a machine whose cores are busy with
    other work, a second thread makes each step several times slower instead of faster (training tiny on 2 cores
    with a load of 2.5: 47 s with one thread, ~180 s with two; its accuracy guard test: 14 s against 69 s).
    """
    env = os.environ.get(THREADS_ENV)
    if env:
        return max(1, int(env))
    threads = torch.get_num_threads()
    try:
        busy = round(os.getloadavg()[0])
    except (AttributeError, OSError):  # no load average on this platform
        return threads
    return max(1, min(threads, (os.cpu_count() or threads) - busy))


@contextlib.contextmanager
def num_threads(threads: int) -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(threads)``, restoring the previous count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _build(recipe: FixtureRecipe, folder: Path) -> dict[str, Any]:
    """Train tokenizer and model into ``folder``; returns the fixture info."""
    import platform

    import transformers
    from safetensors.torch import save_file

    start = time.perf_counter()
    train_texts, heldout_texts = corpus("train"), corpus("heldout")
    tokenizer = train_tokenizer(train_texts, recipe.vocab)
    streams = {"train": token_stream(tokenizer, train_texts), "heldout": token_stream(tokenizer, heldout_texts)}
    tokenize_s = time.perf_counter() - start
    log.info("fixture %s: corpus %d train / %d held-out files, %d / %d tokens (%.1f s)", recipe.name,
             len(train_texts), len(heldout_texts), streams["train"].numel(), streams["heldout"].numel(), tokenize_s)

    threads = free_threads()
    log.info("fixture %s: training %d steps with %d thread(s)", recipe.name, recipe.steps, threads)
    start = time.perf_counter()
    with num_threads(threads):
        model, train_loss = train_model(recipe, streams["train"])
    train_s = time.perf_counter() - start
    ppl = _evaluate(model, streams["heldout"], recipe.seq_len)
    info = {
        "recipe": dataclasses.asdict(recipe),
        "key": fixture_key(recipe),
        "num_params": sum(p.numel() for p in model.parameters()),
        "tokenizer_s": round(tokenize_s, 2),
        "train_s": round(train_s, 2),
        "final_train_loss": round(train_loss, 4),
        "heldout_ppl": round(ppl, 4),
        "heldout_eval": {"sequences": EVAL_SEQUENCES, "seq_len": recipe.seq_len},
        "tokens": {k: int(v.numel()) for k, v in streams.items()},
        "files": {"train": len(train_texts), "heldout": len(heldout_texts)},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "threads": threads,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    save_file(streams, str(folder / TOKENS_FILE))
    (folder / FIXTURE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    log.info("fixture %s: %d params, trained in %.1f s, final loss %.3f, held-out ppl %.2f", recipe.name,
             info["num_params"], train_s, train_loss, ppl)
    return info


STALE_TEMP_S = 24 * 3600


def _remove_stale_temp_dirs(folder: Path) -> None:
    """Temporary folders of trainings that were killed (a live one is younger than a day)."""
    for tmp in folder.parent.glob(f".{folder.name}.*"):
        try:
            if tmp.is_dir() and time.time() - tmp.stat().st_mtime > STALE_TEMP_S:
                log.info("removing stale temporary fixture folder %s", tmp)
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            continue


def load_fixture(name: str | FixtureRecipe = "tiny") -> Fixture:
    """The trained fixture ``name`` (a key of :data:`RECIPES` or a recipe): trained once, then loaded from the cache."""
    from transformers import PreTrainedTokenizerFast

    if isinstance(name, FixtureRecipe):
        recipe = name
    elif name in RECIPES:
        recipe = RECIPES[name]
    else:
        raise ValueError(f"unknown fixture {name!r}; known: {', '.join(RECIPES)}")
    folder = fixture_dir(recipe)
    if not (folder / FIXTURE_FILE).is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_dirs(folder)
        log.info("fixture %s: not cached at %s; training", recipe.name, folder)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            _build(recipe, tmp)
            try:
                os.rename(tmp, folder)
            except OSError:
                if not (folder / FIXTURE_FILE).is_file():
                    raise
                log.info("fixture %s: another process finished it first; using theirs", recipe.name)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    info = json.loads((folder / FIXTURE_FILE).read_text())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    return Fixture(folder=folder, recipe=recipe, tokenizer=tokenizer, info=info)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import platform

    parser = argparse.ArgumentParser(prog="python -m benchmarks.fixtures", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"fixtures to train or load ({', '.join(RECIPES)}; default tiny)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown fixture(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    args.names = args.names or ["tiny"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in args.names:
        fx = load_fixture(name)
        info = fx.info
        print(f"fixture {name}: {fx.folder}")
        print(f"  recipe: {json.dumps(info['recipe'])}")
        print(f"  parameters: {info['num_params']:,}")
        print(f"  tokens: train {info['tokens']['train']:,}, held-out {info['tokens']['heldout']:,}")
        print(f"  training: {info['train_s']:.1f} s ({info['recipe']['steps']} steps, {info['threads']} thread(s)), "
              f"final train loss {info['final_train_loss']:.4f}")
        print(f"  held-out perplexity: {info['heldout_ppl']:.4f}")
        machine = f"{info.get('platform', platform.platform())}, {info.get('cpu_count', os.cpu_count())} cores"
        print(f"  trained {info['date']} with torch {info['torch']} on {machine}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
