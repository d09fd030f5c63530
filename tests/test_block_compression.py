"""Block-by-block compression (lrcompile.block_compression): equal to the whole-graph passes, resumable,
bounded by --max-memory, from safetensors or GGUF, and data-parallel over torch.distributed ranks."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lrcompile
from lrcompile import block_compression
from lrcompile.block_compression import PROGRESS_FILE, BlockCompressor, ResumeError, compress_model_blocks, skeleton_of
from lrcompile.config import LowRankConfig
from lrcompile.errors import LowRankConfigError
from lrcompile.modules import weight_bytes
from lrcompile.weight_sources import ModuleWeights, SafetensorsWeights
from tiny_models import tiny_model, tiny_rope_model, token_batches

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """The graph-path comparisons compile transformers' forward (one code object for every family): start clean, so
    that no test meets Dynamo's recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def batches(count: int = 6) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in token_batches(count, batch=2, seq=16)]


def options(order: str = "error_feedback", **extra) -> LowRankConfig:
    return LowRankConfig(param_ratio=0.6, calibration_order=order, rank_multiple=1, **extra)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family,order", [("llama", "independent"), ("llama", "sequential"),
                                          ("llama", "error_feedback"), ("qwen2", "error_feedback"),
                                          ("gemma", "error_feedback")])
def test_equals_the_graph_passes(tmp_path, family, order):
    """Block by block, the plan and the factors are those of the whole-graph compile (same steps, same statistics);
    Gemma's scaled embedding is a buffer the meta skeleton computes."""
    calibration = batches()
    build = tiny_rope_model if family == "gemma" else tiny_model
    dense = build(family)
    result = compress_model_blocks(dense, calibration, options(order), tmp_path)
    assert result.bytes_before == weight_bytes(dense) > result.bytes_after
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    graph = build(family)
    compiled = torch.compile(graph, backend="lowrank", options=dict(param_ratio=0.6, calibration_order=order,
                                                                    rank_multiple=1, calibration=calibration,
                                                                    compiler="eager"))
    with torch.no_grad():
        compiled(**calibration[0])
    ids = calibration[0]["input_ids"]
    assert torch.allclose(logits(loaded, ids), logits(graph, ids), atol=1e-5)
    assert not torch.allclose(logits(loaded, ids), logits(build(family), ids), atol=1e-3)  # it did compress
    ranks = {name: entry["rank"] for name, entry in loaded.config.quantization_config.linears.items()}
    assert ranks == {layer.name: layer.rank for layer in result.plan.layers}
    assert any(rank is not None for rank in ranks.values())
    assert not list(tmp_path.glob("lowrank_*")), "progress and activation files are removed at the end"


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in folder.rglob("*.safetensors"):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("config,extra", [(options(), {}),
                                          (options(distill_epochs=1, distill_lr=1e-3), {"distill_batches": batches(3)})],
                         ids=["compression", "distillation batches of its own"])
def test_resumes_after_an_interruption(tmp_path, monkeypatch, config, extra):
    """A run killed after block 0 restarts at block 1 and writes exactly what an uninterrupted run writes (the
    activation streams saved after block 0 include distillation's own)."""
    calibration = batches()
    compress_model_blocks(tiny_model("llama"), calibration, config, tmp_path / "whole", **extra)
    original = BlockCompressor._compress_block

    def fail_at_block_1(self, index, *args):
        if index == 1:
            raise KeyboardInterrupt
        return original(self, index, *args)

    monkeypatch.setattr(BlockCompressor, "_compress_block", fail_at_block_1)
    with pytest.raises(KeyboardInterrupt):
        compress_model_blocks(tiny_model("llama"), calibration, config, tmp_path / "resumed", **extra)
    assert json.loads((tmp_path / "resumed" / PROGRESS_FILE).read_text())["blocks_done"] == 1
    monkeypatch.setattr(BlockCompressor, "_compress_block", original)
    result = compress_model_blocks(tiny_model("llama"), calibration, config, tmp_path / "resumed", **extra)
    assert result.blocks_resumed == 1
    whole, resumed = _tensors(tmp_path / "whole"), _tensors(tmp_path / "resumed")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_token_id_tensors_calibrate_as_input_ids_dicts(tmp_path):
    """Batches in every form LowRankConfig.calibration takes: a tensor is its input_ids."""
    ids = token_batches(3, batch=2, seq=16)
    compress_model_blocks(tiny_model("llama"), ids, options(), tmp_path / "tensors")
    compress_model_blocks(tiny_model("llama"), [{"input_ids": b} for b in ids], options(), tmp_path / "dicts")
    tensors, dicts = _tensors(tmp_path / "tensors"), _tensors(tmp_path / "dicts")
    assert tensors and tensors.keys() == dicts.keys() and all(torch.equal(tensors[k], dicts[k]) for k in tensors)


def test_refuses_to_resume_with_other_options(tmp_path, monkeypatch):
    calibration = batches()

    def interrupt(self, index, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(BlockCompressor, "_compress_block", interrupt)
    with pytest.raises(KeyboardInterrupt):
        compress_model_blocks(tiny_model("llama"), calibration, options(), tmp_path)
    monkeypatch.undo()
    with pytest.raises(ResumeError) as refused:
        compress_model_blocks(tiny_model("llama"), calibration, options("sequential"), tmp_path)
    message = str(refused.value)  # names the option that differs, not both whole option sets
    assert "other options: calibration_order = 'error_feedback' there, 'sequential' here; give another --out" in message
    assert "param_ratio" not in message
    with pytest.raises(ResumeError, match="other fingerprint: another model or other calibration data"):
        compress_model_blocks(tiny_model("llama"), calibration[1:], options(), tmp_path)
    with pytest.raises(ResumeError, match="other fingerprint: another model"):  # same config, other weights
        compress_model_blocks(tiny_model("llama", seed=1), calibration, options(), tmp_path)


def test_a_run_stopped_while_planning_resumes(tmp_path, monkeypatch):
    """The progress file is written before the inputs are caught and the layers planned: a run stopped there
    (Ctrl-C, a truncated weight file) is resumed by the same call, not refused as a folder of other files."""
    calibration = batches()

    def interrupt(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(BlockCompressor, "_plan", interrupt)
    with pytest.raises(KeyboardInterrupt):
        compress_model_blocks(tiny_model("llama"), calibration, options(), tmp_path / "stopped")
    assert json.loads((tmp_path / "stopped" / PROGRESS_FILE).read_text())["blocks_done"] == 0
    monkeypatch.undo()
    compress_model_blocks(tiny_model("llama"), calibration, options(), tmp_path / "stopped")
    compress_model_blocks(tiny_model("llama"), calibration, options(), tmp_path / "whole")
    stopped, whole = _tensors(tmp_path / "stopped"), _tensors(tmp_path / "whole")
    assert stopped.keys() == whole.keys() and all(torch.equal(stopped[k], whole[k]) for k in whole)


def test_weight_signatures_follow_the_weights_not_the_path(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    assert SafetensorsWeights(tmp_path / "a").signature() == SafetensorsWeights(tmp_path / "copy").signature()
    assert ModuleWeights(model).signature() == ModuleWeights(tiny_model("llama")).signature()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.neg_()
    assert ModuleWeights(model).signature() != ModuleWeights(tiny_model("llama")).signature()
    model.save_pretrained(tmp_path / "b")
    assert SafetensorsWeights(tmp_path / "b").signature() != SafetensorsWeights(tmp_path / "a").signature()


def test_max_memory_below_one_block_is_refused_before_any_work(tmp_path):
    with pytest.raises(LowRankConfigError, match="--max-memory 1,000 bytes is below .* block 0 needs at once "
                       r"\(weights and factors 0.3 MB, float64 statistics 0.7 MB, calibration activations 0.3 MB\); "
                       r"raise it, or calibrate on fewer or shorter batches \(--max-batches, --seq-len\)"):
        compress_model_blocks(tiny_model("llama"), batches(), options(), tmp_path, max_memory=1000)
    assert not (tmp_path / PROGRESS_FILE).exists()


@pytest.mark.skipif(block_compression._LIBC is None, reason="glibc's allocator only")
def test_max_memory_maps_large_allocations_for_the_run_only(tmp_path, monkeypatch):
    """Under a budget glibc's mmap threshold is fixed low (freed buffers leave the resident set), then raised."""
    calls = []
    monkeypatch.setattr(block_compression._LIBC, "mallopt", lambda *args: calls.append(args), raising=False)
    compress_model_blocks(tiny_model("llama"), batches(2), options(), tmp_path / "unbounded")
    assert calls == []
    compress_model_blocks(tiny_model("llama"), batches(2), options(), tmp_path / "bounded", max_memory=10**9)
    assert calls == [(block_compression.M_MMAP_THRESHOLD, 128 * 1024), (block_compression.M_MMAP_THRESHOLD, 32 << 20)]


def test_latent_kv_is_refused(tmp_path):
    with pytest.raises(LowRankConfigError, match="kv_ratio"):
        compress_model_blocks(tiny_model("llama"), batches(), options(kv_ratio=0.5), tmp_path)


AQ = dict(quantize="aqlm", aq_config="2x4", aq_group_size=8, aq_tolerance=0.05)


@pytest.mark.parametrize("param_ratio", [1.0, 0.6])
def test_quantises_as_the_graph_passes(tmp_path, param_ratio):
    """``quantize="aqlm"`` block by block: every layer (full rank) or both factors hold the codes the
    whole-graph compile fits, from the same dense statistics."""
    calibration = batches()
    config = dict(param_ratio=param_ratio, rank_multiple=8, allocation="uniform", **AQ)  # ranks the group size divides
    compress_model_blocks(tiny_model("llama"), calibration, LowRankConfig(**config), tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    kinds = {type(m).__name__ for m in loaded.modules()}
    assert ("AQLinear" if param_ratio == 1.0 else "AQLowRankLinear") in kinds and "Linear" not in {
        type(m).__name__ for name, m in loaded.named_modules() if "layers" in name}
    graph = tiny_model("llama")
    compiled = torch.compile(graph, backend="lowrank",
                             options=LowRankConfig(calibration=calibration, compiler="eager", **config))
    with torch.no_grad():
        compiled(**calibration[0])
    ids = calibration[0]["input_ids"]
    # the statistics agree to float round-off, which can flip a discrete code choice of a factor (~1e-4 in logits),
    # or the float16 rounding of a stored codeword by one ulp (~2e-5 in logits, measured)
    assert torch.allclose(logits(loaded, ids), logits(graph, ids), atol=1e-4 if param_ratio == 1.0 else 1e-3)


@pytest.mark.parametrize("path", ["blocks", "graph"])
def test_layers_whose_codebooks_outweigh_them_stay_dense(tmp_path, path):
    """2x8 codebooks (2 x 256 x 8 in float16, 8 KiB) outweigh the tiny Llama's 32x64 float32 K/V projections
    (8 KiB): those stay dense, saying why, and quantising never adds bytes; the 64-wide layers are quantised."""
    config = dict(param_ratio=1.0, quantize="aqlm", aq_config="2x8", aq_group_size=8, aq_tolerance=0.05)
    model, calibration = tiny_model("llama"), batches(2)
    dense_bytes = weight_bytes(model)
    if path == "blocks":
        compress_model_blocks(model, calibration, LowRankConfig(**config), tmp_path)
        model = AutoModelForCausalLM.from_pretrained(tmp_path)
    else:
        with torch.no_grad():
            torch.compile(model, backend="lowrank", options=LowRankConfig(calibration=calibration, compiler="eager",
                                                                          **config))(**calibration[0])
    kinds = {name.removeprefix("model."): type(m).__name__ for name, m in model.named_modules() if "layers.0." in name}
    assert kinds["layers.0.self_attn.k_proj"] == kinds["layers.0.self_attn.v_proj"] == "Linear"
    assert kinds["layers.0.self_attn.q_proj"] == kinds["layers.0.mlp.down_proj"] == "AQLinear"
    reasons = {r.name: r.reason for r in lrcompile.model_report(model).layers}
    assert re.fullmatch(r"AQ 2x8 codes, codebooks and scales \(8,832 bytes\) would not save bytes against the "
                        r"torch.float32 weights \(8,192 bytes\)", reasons["model.layers.0.self_attn.k_proj"])
    assert weight_bytes(model) < dense_bytes


def _relative_error(model: torch.nn.Module, dense: torch.nn.Module, calibration) -> float:
    got = torch.cat([logits(model, b["input_ids"]) for b in calibration])
    want = torch.cat([logits(dense, b["input_ids"]) for b in calibration])
    return float((got - want).norm() / want.norm())


TUNING = {  # stage: (epochs, learning rate, the logged objective, the number of logs, the least share it falls)
    "finetune": (4, 1e-3, r"block \d fine-tuned: relative error (\S+) \(before\) -> (\S+) \(after\)", 2, 0.98),
    "distill": (4, 3e-4, r"distilled: KL to the dense model (\S+) \(before\) -> (\S+) \(after\)", 1, 0.95),
}


@pytest.mark.parametrize("stage", list(TUNING))
@pytest.mark.parametrize("extra", [{"calibration_order": "error_feedback", "rank_multiple": 1},
                                   {"calibration_order": "independent", "rank_multiple": 8, **AQ}],
                         ids=["factored", "aq factors"])
def test_tuning_brings_the_model_closer_to_the_dense_model(tmp_path, extra, stage, caplog):
    """``finetune_epochs`` (each block's objective falls) and ``distill_epochs`` (the KL to the dense model
    falls): the compressed model's logits on the calibration data move towards the dense model's; only the
    blocks' floating-point tensors train (norms included; AQ codes, embeddings and the final norm stay), the
    plan is the same and no work file is left."""
    epochs, lr, pattern, logs, share = TUNING[stage]
    calibration = batches()
    results = {}
    for count in (0, epochs):
        out = tmp_path / f"epochs-{count}"
        config = LowRankConfig(param_ratio=0.6, **{f"{stage}_epochs": count, f"{stage}_lr": lr}, **extra)
        with caplog.at_level(logging.INFO, logger="lrcompile.block_compression"):
            compress_model_blocks(tiny_model("llama"), calibration, config, out)
        results[count] = AutoModelForCausalLM.from_pretrained(out).eval()
        assert [p.name for p in out.iterdir() if p.name.startswith("lowrank_")] == []
    objectives = [m for m in (re.search(pattern, r.getMessage()) for r in caplog.records) if m]
    assert len(objectives) == logs and all(float(m[2]) < float(m[1]) for m in objectives)
    dense = tiny_model("llama")
    assert _relative_error(results[epochs], dense, calibration) < share * _relative_error(results[0], dense, calibration)
    before, after = results[0].state_dict(), results[epochs].state_dict()
    assert before.keys() == after.keys()
    assert all(p.dtype == after[k].dtype and not p.requires_grad for k, p in before.items())
    kept = [k for k in before if not k.startswith("model.layers.") or k.endswith(".codes")]
    assert "model.norm.weight" in kept and all(torch.equal(before[k], after[k]) for k in kept)
    assert any(k.endswith(".codes") for k in kept) == ("quantize" in extra)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "model.layers.1.post_attention_layernorm.weight" in changed, "norms are trained too"
    assert any(k.endswith((".up", ".codebooks")) for k in changed)
    plans = [results[e].config.quantization_config.linears for e in (0, epochs)]
    assert {n: e["rank"] for n, e in plans[0].items()} == {n: e["rank"] for n, e in plans[1].items()}


def test_fit_decays_the_learning_rate_along_a_cosine(monkeypatch):
    """Block fine-tuning and distillation share ``_fit``: Adam from ``lr`` down a half cosine towards 0, the
    parameters handed back without gradients."""
    rates = []
    step = torch.optim.Adam.step

    def recording(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording)
    weight = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    before, after = block_compression._fit([weight], [()] * 4, lambda: (weight - 1).square().sum(), 2, 0.1, "test")
    assert rates == pytest.approx([0.05 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])
    assert before == 3.0 and after == pytest.approx((weight - 1).square().sum().item())
    assert after < before and not weight.requires_grad and weight.grad is None


def test_fit_keeps_the_parameters_from_before_when_training_raises_the_loss(caplog):
    """A learning rate far too high overshoots the minimum of ``(w - 1)^2`` from ``w = 0.9``: the loss after is
    higher, so ``w`` is restored and a warning names the stage and both losses."""
    weight = torch.nn.Parameter(torch.full((3,), 0.9, dtype=torch.bfloat16))
    with caplog.at_level(logging.WARNING, logger="lrcompile.block_compression"):
        before, after = block_compression._fit([weight], [()] * 2, lambda: (weight - 1).square().sum(), 1, 0.9,
                                               "fine-tuning block 3")
    assert torch.equal(weight, torch.full((3,), 0.9, dtype=torch.bfloat16)) and weight.dtype == torch.bfloat16
    assert after == before == pytest.approx(0.03, rel=0.05)
    assert re.search(r"fine-tuning block 3 raised its loss from 0\.03\d* to \S+ over 1 epoch\(s\) at learning rate "
                     r"0\.9: the parameters from before it are kept", caplog.text)


def test_distillation_resumes_without_training_again(tmp_path, monkeypatch):
    """A run killed while the distilled tensors are copied into the block files restarts there: it does not train
    again and writes what an uninterrupted run writes."""
    calibration = batches()
    config = options(distill_epochs=2, distill_lr=1e-3)
    compress_model_blocks(tiny_model("llama"), calibration, config, tmp_path / "whole")
    original = block_compression.write_safetensors

    def fail_at_block_1(path, tensors):
        if path.name == "block_00001.safetensors" and (path.parent.parent / "lowrank_distilled.safetensors").exists():
            raise KeyboardInterrupt
        return original(path, tensors)

    monkeypatch.setattr(block_compression, "write_safetensors", fail_at_block_1)
    with pytest.raises(KeyboardInterrupt):
        compress_model_blocks(tiny_model("llama"), calibration, config, tmp_path / "resumed")
    monkeypatch.setattr(block_compression, "write_safetensors", original)
    monkeypatch.setattr(block_compression, "_fit", lambda *args: pytest.fail("trained again"))
    compress_model_blocks(tiny_model("llama"), calibration, config, tmp_path / "resumed")
    whole, resumed = _tensors(tmp_path / "whole"), _tensors(tmp_path / "resumed")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_distillation_on_batches_of_its_own(tmp_path, monkeypatch):
    """``distill_batches``: distillation trains on them, against the dense model's logits on them (the block loop
    carries their dense stream); given the calibration batches it writes what the default writes. Statistics
    still come from the calibration batches only, and the memory estimate counts the extra stream."""
    calibration, config = batches(2), options(distill_epochs=2, distill_lr=1e-3)
    compress_model_blocks(tiny_model("llama"), calibration, config, tmp_path / "default")
    compress_model_blocks(tiny_model("llama"), calibration, config, tmp_path / "same", distill_batches=calibration)
    default, same = _tensors(tmp_path / "default"), _tensors(tmp_path / "same")
    assert all(torch.equal(default[k], same[k]) for k in default)

    own, dense = batches(7)[2:], tiny_model("llama")
    taught = []
    original = block_compression.distill_model

    def spy(model, batches_, teacher, *args):  # the teacher's logits, replayed from the carried stream
        with torch.no_grad():
            taught.extend((batch["input_ids"], teacher(i)) for i, batch in enumerate(batches_))
        return original(model, batches_, teacher, *args)

    monkeypatch.setattr(block_compression, "distill_model", spy)
    compress_model_blocks(tiny_model("llama"), calibration, config, tmp_path / "own", distill_batches=own)
    assert len(taught) == len(own) and all(torch.equal(ids, b["input_ids"]) for (ids, _), b in zip(taught, own))
    assert all(torch.allclose(got, logits(dense, ids), atol=1e-5) for ids, got in taught)
    assert not all(torch.equal(default[k], v) for k, v in _tensors(tmp_path / "own").items())
    plans = [AutoModelForCausalLM.from_pretrained(tmp_path / v).config.quantization_config.linears
             for v in ("default", "own")]
    assert {n: e["rank"] for n, e in plans[0].items()} == {n: e["rank"] for n, e in plans[1].items()}
    no_factoring = LowRankConfig(param_ratio=0.6, calibration_order="independent", distill_epochs=1)
    units = [BlockCompressor(skeleton_of(dense.config), ModuleWeights(dense), calibration, no_factoring, tmp_path,
                             **extra).working_set() for extra in ({}, {"distill_batches": batches(40)})]
    assert units[1].activations > units[0].activations
    with pytest.raises(LowRankConfigError, match=r"distillation batches were given but distill_epochs is 0"):
        BlockCompressor(skeleton_of(dense.config), ModuleWeights(dense), calibration, options(), tmp_path,
                        distill_batches=own)


def test_max_memory_counts_distillation(tmp_path):
    """Distillation holds the whole model: a budget that fits one block is refused, naming it."""
    enough = BlockCompressor(skeleton_of(tiny_model("llama").config), ModuleWeights(tiny_model("llama")), batches(),
                             options(), tmp_path).working_set().total
    compress_model_blocks(tiny_model("llama"), batches(), options(), tmp_path / "blocks", max_memory=enough)
    with pytest.raises(LowRankConfigError, match=r"below the [\d,]+ bytes that distillation \(the whole model\) "
                                                  r"needs at once \(weights and factors [\d.]+ MB, calibration "
                                                  r"activations [\d.]+ MB, fine-tuning copies [\d.]+ MB\)"):
        compress_model_blocks(tiny_model("llama"), batches(), options(distill_epochs=1), tmp_path / "whole",
                              max_memory=enough)


@pytest.mark.parametrize("stage", ["finetune", "distill"])
def test_tuning_a_bfloat16_model_keeps_its_dtype(tmp_path, stage):
    compress_model_blocks(tiny_model("llama").to(torch.bfloat16), batches(2), options(**{f"{stage}_epochs": 1}),
                          tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.isfinite(logits(loaded, batches(1)[0]["input_ids"]).float()).all()


@pytest.mark.parametrize("stage", ["finetune", "distill"])
def test_the_graph_path_refuses_tuning_naming_the_block_path(stage):
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="lowrank", options=LowRankConfig(
        calibration=batches(1), compiler="eager", **{f"{stage}_epochs": 2}))
    with pytest.raises(Exception, match=rf"{stage}_epochs=2 .* runs block by block: use "
                                        rf"lrcompile\.compress_model_blocks.*--{stage}-epochs N"):
        compiled(**batches(1)[0])


@pytest.mark.parametrize("options_, message", [
    ({"finetune_epochs": -1}, r"'finetune_epochs'=-1: expected a non-negative integer"),
    ({"finetune_epochs": 1.5}, r"'finetune_epochs'=1\.5"),
    ({"finetune_lr": 0}, r"'finetune_lr'=0: expected a learning rate in \(0, 1\)"),
    ({"distill_epochs": -2}, r"'distill_epochs'=-2: expected a non-negative integer"),
    ({"distill_lr": 1.5}, r"'distill_lr'=1\.5: expected a learning rate in \(0, 1\)"),
])
def test_bad_tuning_options_are_named(options_, message):
    with pytest.raises(LowRankConfigError, match=message):
        LowRankConfig(**options_)


def test_safetensors_source_reads_what_the_model_holds(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    names = [n for n, _ in skeleton_of(model.config).named_parameters()]
    lazy, eager = SafetensorsWeights(tmp_path).read(names), ModuleWeights(model).read(names)
    assert all(torch.equal(lazy[n], eager[n]) for n in names)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tmp_path):
    """Under torchrun, 2 ranks each calibrate on half the batches; statistics are summed across ranks, so the plan
    is the same and the factors equal a 1-process run to float round-off."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    worker = str(HERE / "block_compression_worker.py")
    single = subprocess.run([sys.executable, worker, "--out", str(tmp_path / "one")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                            f"--master-port={_free_port()}", worker, "--out", str(tmp_path / "two")],
                           env=env, capture_output=True, text=True, timeout=300)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one")
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "two")
    plans = [one.config.quantization_config.linears, two.config.quantization_config.linears]
    assert {n: e["rank"] for n, e in plans[0].items()} == {n: e["rank"] for n, e in plans[1].items()}  # same plan
    assert any(e["rank"] is not None for e in plans[0].values())
    for name, entry in plans[0].items():
        assert entry["truncation_loss"] == pytest.approx(plans[1][name]["truncation_loss"], rel=1e-6, abs=1e-12), name
    for (name, a), (_, b) in zip(one.named_modules(), two.named_modules()):
        if hasattr(a, "down") and hasattr(a, "up"):  # factors agree up to the sign of singular vectors
            assert torch.allclose(a.up @ a.down, b.up @ b.down, atol=1e-4), name
    ids = torch.randint(0, 128, (2, 16))
    assert torch.allclose(logits(one, ids), logits(two, ids), atol=1e-4)


def test_two_gloo_ranks_finetune_on_uneven_shares(tmp_path):
    """Fine-tuning and distillation all-reduce every step's gradients: with 7 batches over 2 ranks (4 and 3) both
    take the same number of steps (no rank waits forever) and the folder rank 0 writes loads."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                            f"--master-port={_free_port()}", str(HERE / "block_compression_worker.py"),
                            "--out", str(tmp_path), "--batches", "7", "--finetune-epochs", "2",
                            "--distill-epochs", "2"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.isfinite(logits(model, torch.randint(0, 128, (2, 16)))).all()


def test_write_safetensors_streams_a_file_safetensors_reads(tmp_path):
    from lrcompile.block_compression import write_safetensors

    tensors = {"a": torch.randn(3, 5), "b.bf16": torch.randn(7).bfloat16(), "c": torch.arange(6).reshape(2, 3),
               "d": torch.randn(4, 4)[:, 1]}  # non-contiguous
    size = write_safetensors(tmp_path / "x.safetensors", iter(tensors.items()))
    loaded = load_file(tmp_path / "x.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert size == sum(t.numel() * t.element_size() for t in tensors.values())
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
