"""Save and load of compressed models: an exact round trip without calibration, and clear errors
for every way a saved folder can be missing, corrupted or not match the model."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model, token_batches
from transformers import AutoModelForCausalLM, LlamaConfig

import lrcompile
from lrcompile import LowRankConfig, SavedPlanError, load_compressed, save_compressed
from lrcompile.runtime.compressed_layers import model_layers
from lrcompile.runtime.saved_model import FACTORS_FILE, FORMAT, PLAN_FILE, VERSION

OPTIONS = {"param_ratio": 0.8, "compiler": "eager", "method": "asvd", "allocation": "uniform"}
IDS = token_batches(1, seed=7)[0]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Dynamo reuses a graph compiled for another instance of the same class: start clean."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@dataclass(frozen=True)
class Saved:
    family: str
    folder: Path
    state: dict[str, torch.Tensor]  # dense weights before compression (the backend releases them)
    logits: torch.Tensor  # of the model compressed with calibration
    totals: dict


def _compress_and_save(family: str, folder: Path) -> Saved:
    torch._dynamo.reset()
    model = tiny_model(family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = torch.compile(model, backend="lowrank", options={"calibration": token_batches(2), **OPTIONS})
    with torch.no_grad():
        logits = compiled(input_ids=IDS).logits
    save_compressed(model, folder)
    torch._dynamo.reset()
    return Saved(family, folder, state, logits, lrcompile.model_report(model).totals())


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Callable[[str], Saved]:
    """Compress and save each family once per module."""
    cache: dict[str, Saved] = {}

    def get(family: str) -> Saved:
        if family not in cache:
            cache[family] = _compress_and_save(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


def _fresh(case: Saved) -> torch.nn.Module:
    """A new model with the saved model's dense weights (another seed, so they must come from ``state``)."""
    model = tiny_model(case.family, seed=1)
    model.load_state_dict(case.state)
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_round_trip_reproduces_logits_without_calibration(saved, family):
    case = saved(family)
    model = _fresh(case)
    dense_bytes = lrcompile.weight_bytes(model)
    summary = load_compressed(model, case.folder)
    assert summary.factored == case.totals["factored"] > 0
    assert summary.layers == case.totals["linears"]

    compiled = torch.compile(model, backend="lowrank", options=LowRankConfig(**OPTIONS))  # no calibration
    with torch.no_grad():
        logits = compiled(input_ids=IDS).logits
    torch.testing.assert_close(logits, case.logits, rtol=0, atol=1e-5)
    assert lrcompile.model_report(model).totals() == case.totals
    assert lrcompile.weight_bytes(model) < dense_bytes  # the loaded factors replaced the dense weights


def test_saved_files_hold_plan_and_factors(saved):
    case = saved("gpt2")  # Conv1D weights are stored [in, out]; the plan and factors are in the linear sense
    plan = json.loads((case.folder / PLAN_FILE).read_text())
    assert plan["format"] == FORMAT and plan["version"] == VERSION
    assert plan["totals"]["factored"] == case.totals["factored"]
    layer = next(entry for entry in plan["layers"] if entry["name"] == "transformer.h.0.mlp.c_fc")
    assert layer["parameter"] == "transformer.h.0.mlp.c_fc.weight"
    assert (layer["out_features"], layer["in_features"], layer["weight_shape"]) == (256, 64, [64, 256])
    assert layer["status"] == "factored" and layer["method"] == "asvd" and layer["dtype"] == "float32"
    tensors = load_file(case.folder / FACTORS_FILE)
    rank = layer["rank"]
    assert tensors["transformer.h.0.mlp.c_fc.down"].shape == (rank, 64)
    assert tensors["transformer.h.0.mlp.c_fc.up"].shape == (256, rank)
    factored = [entry["name"] for entry in plan["layers"] if entry["status"] == "factored"]
    assert sorted(tensors) == sorted(f"{name}.{part}" for name in factored for part in ("down", "up"))


def test_save_without_compression_is_an_error(tmp_path):
    with pytest.raises(lrcompile.LowRankError, match="has no compressed layers to save"):
        save_compressed(tiny_model("llama"), tmp_path / "out")


def _edit_plan(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        document = json.loads((folder / PLAN_FILE).read_text())
        edit(document)
        (folder / PLAN_FILE).write_text(json.dumps(document))

    return apply


def _edit_factors(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        tensors = load_file(folder / FACTORS_FILE)
        edit(tensors)
        save_file(tensors, folder / FACTORS_FILE)

    return apply


def _first(document: dict) -> dict:
    return document["layers"][0]


Q = "model.layers.0.self_attn.q_proj"
CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing folder": (shutil.rmtree, r"saved: no such folder"),
    "missing plan": (lambda f: (f / PLAN_FILE).unlink(), r"plan\.json: missing"),
    "missing factors": (lambda f: (f / FACTORS_FILE).unlink(), r"factors\.safetensors: missing"),
    "invalid json": (lambda f: (f / PLAN_FILE).write_text('{"format": '), r"plan\.json: invalid JSON"),
    "not an object": (lambda f: (f / PLAN_FILE).write_text("[]"), r"plan\.json: expected a JSON object, got list"),
    "wrong format": (_edit_plan(lambda d: d.update(format="other")), r"plan\.json: format 'other' is not 'lrcompile\.compressed'"),
    "wrong version": (_edit_plan(lambda d: d.update(version=99)), r"plan\.json: version 99 is not supported"),
    "no layers": (_edit_plan(lambda d: d.pop("layers")), r"plan\.json: key 'layers' must be a non-empty list"),
    "missing key": (_edit_plan(lambda d: _first(d).pop("rank")), rf"plan\.json: layer 0 \('{Q}'\) lacks key\(s\) 'rank'"),
    "wrong type": (_edit_plan(lambda d: _first(d).update(rank="8")), r"plan\.json: layer 0 .* key 'rank'='8' must be int or null"),
    "bad status": (_edit_plan(lambda d: _first(d).update(status="halved")), r"plan\.json: layer 0 .* status 'halved' is not one of"),
    "bad dtype": (_edit_plan(lambda d: _first(d).update(dtype="float33")), r"plan\.json: layer 0 .* dtype 'float33' is not a torch dtype"),
    "dense with rank": (_edit_plan(lambda d: _first(d).update(status="dense")), r"plan\.json: layer 0 .* a dense layer must have rank null"),
    "weight shape disagrees": (
        _edit_plan(lambda d: _first(d).update(weight_shape=[64, 7])),
        r"plan\.json: layer 0 .* weight_shape \[64, 7\] does not hold out_features=64, in_features=64",
    ),
    "duplicate layer": (_edit_plan(lambda d: d["layers"].append(_first(d))), rf"plan\.json: layers repeat the name\(s\) '{Q}'"),
    "layer not in model": (
        _edit_plan(lambda d: _first(d).update(parameter="model.layers.9.self_attn.q_proj.weight")),
        rf"plan\.json: layer '{Q}' \(parameter 'model\.layers\.9\.self_attn\.q_proj\.weight'\) is not in the model \(LlamaForCausalLM\)",
    ),
    "rank disagrees with factors": (
        _edit_plan(lambda d: _first(d).update(rank=_first(d)["rank"] + 8)),
        rf"factors\.safetensors: tensor '{Q}\.down' has shape \[\d+, 64\], but plan\.json says \[\d+, 64\]",
    ),
    "missing factor tensor": (
        _edit_factors(lambda t: t.pop(f"{Q}.up")),
        rf"factors\.safetensors: tensor '{Q}\.up' is missing \(layer '{Q}' is factored\)",
    ),
    "factor shape": (
        _edit_factors(lambda t: t.update({f"{Q}.down": torch.zeros(3, 64)})),
        rf"factors\.safetensors: tensor '{Q}\.down' has shape \[3, 64\], but plan\.json says",
    ),
    "factor dtype": (
        _edit_factors(lambda t: t.update({f"{Q}.up": t[f"{Q}.up"].double()})),
        rf"factors\.safetensors: tensor '{Q}\.up' is torch\.float64, but plan\.json says torch\.float32",
    ),
    "extra tensor": (
        _edit_factors(lambda t: t.update({"lm_head.down": torch.zeros(1, 1)})),
        r"factors\.safetensors: tensors 'lm_head\.down' belong to no factored layer of plan\.json",
    ),
    "corrupted factors": (
        lambda f: (f / FACTORS_FILE).write_bytes(b"\x00garbage"),
        r"factors\.safetensors: not a readable safetensors file",
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupted_folder_raises_naming_the_file(saved, tmp_path, corruption):
    case = saved("llama")
    folder = tmp_path / "saved"
    shutil.copytree(case.folder, folder)
    corrupt, message = CORRUPTIONS[corruption]
    corrupt(folder)
    model = _fresh(case)
    with pytest.raises(SavedPlanError, match=message):
        load_compressed(model, folder)
    assert not list(model_layers(model))  # nothing recorded from a bad folder


def test_other_architecture_shape_mismatch(saved):
    case = saved("llama")
    other = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)
    )
    message = r"plan\.json: layer 'model\.layers\.0\.mlp\.gate_proj': the model's weight .* has shape \[96, 64\], the plan says \[128, 64\]"
    with pytest.raises(SavedPlanError, match=message):
        load_compressed(other, case.folder)


def test_dtype_mismatch(saved):
    model = _fresh(saved("llama")).double()
    with pytest.raises(SavedPlanError, match=r"the model's weight is torch\.float64, the plan says torch\.float32"):
        load_compressed(model, saved("llama").folder)


def test_load_into_already_compressed_model_is_an_error(saved):
    case = saved("llama")
    model = _fresh(case)
    load_compressed(model, case.folder)
    compiled = torch.compile(model, backend="lowrank", options=LowRankConfig(**OPTIONS))
    with torch.no_grad():
        compiled(input_ids=IDS)
    with pytest.raises(SavedPlanError, match=r"holds no data \(its dense storage was released"):
        load_compressed(model, case.folder)
