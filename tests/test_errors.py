"""Bad input through torch.compile: each fails at once with a message naming the input."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, tiny_model, token_batches

import lrcompile
from lrcompile.errors import CalibrationError, LowRankConfigError, NoCompressibleLinearError


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inner(excinfo) -> BaseException:
    """Dynamo wraps a backend's exception in BackendCompilerFailed; unwrap it."""
    err = excinfo.value
    return getattr(err, "inner_exception", err)


def _run(model, options, *, input_ids=None, **kwargs):
    compiled = torch.compile(model, backend="lowrank", fullgraph=True, options=options)
    with torch.no_grad():
        return compiled(input_ids=token_batches(1)[0] if input_ids is None else input_ids, **kwargs)


def test_unknown_option_suggests_the_key():
    with pytest.raises(Exception, match="unknown option 'param_ration'; did you mean 'param_ratio'") as excinfo:
        _run(tiny_model("llama"), {"param_ration": 0.8, "calibration": token_batches(1)})
    assert isinstance(_inner(excinfo), LowRankConfigError)


@pytest.mark.parametrize("ratio", [0.0, 1.5, -0.2])
def test_ratio_outside_unit_interval(ratio):
    with pytest.raises(Exception, match=rf"option 'param_ratio'={ratio!r} is outside \(0, 1\]") as excinfo:
        _run(tiny_model("llama"), {"param_ratio": ratio, "calibration": token_batches(1)})
    assert isinstance(_inner(excinfo), LowRankConfigError)


def test_empty_calibration():
    with pytest.raises(Exception, match="option 'calibration' is empty") as excinfo:
        _run(tiny_model("llama"), {"calibration": []})
    assert isinstance(_inner(excinfo), CalibrationError)


def test_missing_calibration_for_asvd():
    with pytest.raises(Exception, match="option 'calibration' is required for method='asvd'"):
        _run(tiny_model("llama"), {"method": "asvd", "allocation": "uniform", "compiler": "eager"})


def test_calibration_shape_does_not_fit_static_graph():
    options = lrcompile.LowRankConfig(calibration=[torch.randint(0, 128, (1, 9))], compiler="eager")
    with pytest.raises(Exception, match=r"captured for inputs of shape \(2, 16\) and the calibration batches hold fewer "
                       r"than 2 windows of 16 tokens; .* dynamic=True") as excinfo:
        _run(tiny_model("llama"), options)
    assert isinstance(_inner(excinfo), CalibrationError)


def test_feature_batches_of_another_width_are_refused_not_re_cut():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)).eval()
    options = lrcompile.LowRankConfig(calibration=[torch.randn(8, 128)] * 2, param_ratio=0.5, compiler="eager")
    with pytest.raises(Exception, match=r"calibration batch 0: input 'positional input 0' has shape \(8, 128\), but the "
                       r"graph was captured for shape \(8, 64\)") as excinfo:
        with torch.no_grad():
            torch.compile(model, backend="lowrank", options=options)(torch.randn(8, 64))
    assert isinstance(_inner(excinfo), CalibrationError)


def test_feature_batches_with_more_rows_are_regrouped_and_counted_as_values(caplog):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)).eval()
    options = lrcompile.LowRankConfig(calibration=[torch.randn(16, 64)] * 2, param_ratio=0.5, compiler="eager")
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="lrcompile"):
        torch.compile(model, backend="lowrank", options=options)(torch.randn(8, 64))
    assert "re-cut into 4 batches of that shape, using 2048 of the 2048 values given" in caplog.text


def test_calibration_dtype_does_not_fit():
    options = lrcompile.LowRankConfig(calibration=[torch.zeros(2, 16)], compiler="eager")
    with pytest.raises(Exception, match=r"calibration batch 0 gives input_ids of dtype torch.float32: token ids are "
                       r"integers \(torch.long\)"):
        _run(tiny_model("llama"), options)
    options = lrcompile.LowRankConfig(calibration=[{"input_ids": token_batches(1)[0], "attention_mask": "all"}],
                                      compiler="eager")
    with pytest.raises(Exception, match="calibration batch 0 gives attention_mask as text"):
        _run(tiny_model("llama"), options)


def test_int32_token_ids_calibrate_as_int64():
    batches = token_batches(2)
    outputs = []
    for calib in (batches, [b.to(torch.int32) for b in batches]):
        torch._dynamo.reset()
        options = lrcompile.LowRankConfig(calibration=calib, param_ratio=0.6, compiler="eager")
        outputs.append(_run(tiny_model("llama"), options).logits)
    assert torch.equal(*outputs)


def test_calibration_batch_as_a_python_list_is_named():
    options = lrcompile.LowRankConfig(calibration=[token_batches(1)[0].tolist()], compiler="eager")
    with pytest.raises(Exception, match=r"calibration batch 0 is a Python list of numbers: give token ids as a tensor"):
        _run(tiny_model("llama"), options)


def test_calibration_dict_with_a_padding_mask_the_graph_does_not_take():
    ids = token_batches(1)[0]
    mask = torch.ones_like(ids)
    mask[:, -3:] = 0
    options = lrcompile.LowRankConfig(calibration=[{"input_ids": ids, "attention_mask": mask}], compiler="eager")
    with pytest.raises(Exception, match=r"calibration batch 0 gives \['attention_mask'\], which the captured graph does not take "
                       r"\(its attention_mask marks padding, which the graph cannot see\) \(its inputs: input_ids\)"):
        _run(tiny_model("llama"), options)


def test_calibration_dict_with_an_all_ones_mask_calibrates_a_graph_without_one():
    """A tokenizer's mask for unpadded text changes nothing: a call without attention_mask takes such batches."""
    batches = token_batches(2)
    outputs = []
    for calib in (batches, [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in batches]):
        torch._dynamo.reset()
        options = lrcompile.LowRankConfig(calibration=calib, param_ratio=0.6, compiler="eager")
        outputs.append(_run(tiny_model("llama"), options).logits)
    assert torch.equal(*outputs)


def test_calibration_without_an_attention_mask_gets_the_one_generate_would_build():
    """The graph takes attention_mask; batches that leave it out calibrate as with an all-ones mask."""
    ids = token_batches(2)
    outputs = []
    for calib in ([{"input_ids": ids[0]}], [{"input_ids": ids[0], "attention_mask": torch.ones_like(ids[0])}]):
        torch._dynamo.reset()
        options = lrcompile.LowRankConfig(calibration=calib, compiler="eager", allocation="uniform", param_ratio=0.6)
        with torch.no_grad():
            outputs.append(torch.compile(tiny_model("bert"), backend="lowrank", options=options)(
                input_ids=ids[1], attention_mask=torch.ones_like(ids[1]))[0])
    assert torch.equal(*outputs)


@pytest.mark.parametrize("family,bad_id", [*((f, VOCAB) for f in FAMILIES), ("llama", -1)])
def test_token_ids_outside_the_vocabulary_name_the_batch(family, bad_id):
    batches = token_batches(2)
    batches[1][0, 3] = bad_id  # an embedding lookup's own error would be a bare IndexError
    options = lrcompile.LowRankConfig(param_ratio=0.8, calibration=batches, compiler="eager")
    with pytest.raises(Exception, match=rf"calibration batch 1 holds token id {bad_id}, outside the model's vocabulary "
                       rf"\[0, {VOCAB}\): tokenize with the model's own tokenizer") as excinfo:
        _run(tiny_model(family), options)
    assert isinstance(_inner(excinfo), CalibrationError)


def test_token_ids_outside_the_vocabulary_are_refused_block_by_block(tmp_path):
    batches = token_batches(2)
    batches[0][1, 0] = VOCAB + 7
    with pytest.raises(CalibrationError, match=rf"calibration batch 0 holds token id {VOCAB + 7}, outside"):
        lrcompile.compress_model_blocks(tiny_model("llama"), batches, lrcompile.LowRankConfig(param_ratio=0.8), tmp_path)


_UNRUNNABLE_BATCHES = {
    "meta tensor": ({"input_ids": torch.zeros(2, 16, dtype=torch.long, device="meta")}, "input_ids on the meta device"),
    "text": ({"input_ids": "The capital of France is"}, "input_ids as text: tokenize it"),
}


@pytest.mark.parametrize("blocks", [False, True], ids=["graph", "block by block"])
@pytest.mark.parametrize("kind", sorted(_UNRUNNABLE_BATCHES))
def test_calibration_batches_that_cannot_run_name_the_batch(kind, blocks, tmp_path):
    """Meta tensors and untokenized text would otherwise fail deep inside the model as a bare NotImplementedError
    or TypeError."""
    bad, message = _UNRUNNABLE_BATCHES[kind]
    batches = [token_batches(1)[0], bad]
    options = lrcompile.LowRankConfig(param_ratio=0.8, calibration=batches, compiler="eager")
    with pytest.raises(Exception, match=rf"calibration batch 1 gives {message}") as excinfo:
        if blocks:
            lrcompile.compress_model_blocks(tiny_model("llama"), batches, options, tmp_path)
        else:
            _run(tiny_model("llama"), options)
    assert isinstance(_inner(excinfo), CalibrationError)


def test_floating_point_token_ids_are_refused_block_by_block(tmp_path):
    batches = [token_batches(1)[0].float()]
    with pytest.raises(CalibrationError, match=r"calibration batch 0 gives input_ids of dtype torch.float32: token "
                       r"ids are integers"):
        lrcompile.compress_model_blocks(tiny_model("llama"), batches, {"param_ratio": 0.8}, tmp_path)


def test_calibration_whose_masks_mark_no_token_is_refused_as_such():
    ids = token_batches(1)[0]
    batches = [dict(input_ids=ids, attention_mask=torch.zeros_like(ids))] * 2
    options = lrcompile.LowRankConfig(param_ratio=0.8, calibration=batches, compiler="eager")
    with pytest.raises(Exception, match=r"the attention_mask of every calibration batch \(2\) is all zeros") as excinfo:
        _run(tiny_model("llama"), options)
    assert isinstance(_inner(excinfo), CalibrationError)


def test_block_compression_takes_its_options_as_a_dict_and_names_an_unknown_one(tmp_path):
    with pytest.raises(LowRankConfigError, match=r"unknown option 'param_ration'; did you mean 'param_ratio'\?"):
        lrcompile.compress_model_blocks(tiny_model("llama"), token_batches(1), {"param_ration": 0.8}, tmp_path)


def test_aqlm_options_without_quantize_are_refused():
    with pytest.raises(LowRankConfigError, match=r"aq_config='1x8', aq_group_size=4 configure AQLM, but quantize is "
                       r"None: set quantize='aqlm'"):
        lrcompile.LowRankConfig(aq_config="1x8", aq_group_size=4)


@pytest.mark.parametrize("blocks", [False, True], ids=["graph", "block by block"])
@pytest.mark.parametrize("count,warned", [(1, True), (4, False)])  # 32 / 128 tokens; the widest input: down_proj's 128
def test_fewer_calibration_tokens_than_inputs_is_a_warning(blocks, count, warned, tmp_path, caplog):
    model, batches = tiny_model("llama"), token_batches(count)
    assert model.model.layers[0].mlp.down_proj.in_features == 128
    options = lrcompile.LowRankConfig(param_ratio=0.8, calibration=batches, compiler="eager")
    with caplog.at_level(logging.WARNING, logger="lrcompile"):
        if blocks:
            lrcompile.compress_model_blocks(model, batches, options, tmp_path)
        else:
            _run(model, options)
    message = "calibration holds 32 real tokens, fewer than the 128 inputs of model.layers.0.mlp.down_proj"
    assert (message in caplog.text) == warned, caplog.text


@pytest.mark.parametrize("options", [dict(), dict(method="svd"), dict(calibration_order="sequential"),
                                     dict(kv_ratio=0.5, param_ratio=1.0)],
                         ids=["error feedback", "svd", "sequential", "latent kv"])
def test_a_non_finite_weight_names_its_layer(options):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[0, 0] = float("nan")
    options = lrcompile.LowRankConfig(**{"param_ratio": 0.5, "calibration": token_batches(4), "compiler": "eager",
                                         **options})
    layer = r"model\.layers\.0\.self_attn\.v_proj(\[group 0\])?"
    with pytest.raises(Exception, match=rf"layer '{layer}': its weight holds NaN or Inf") as excinfo:
        _run(model, options, use_cache=False)
    assert isinstance(_inner(excinfo), lrcompile.WeightError)


def test_nan_activations_name_the_first_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = float("nan")
    ids = token_batches(1)[0]
    ids[0, 0] = 5
    options = lrcompile.LowRankConfig(calibration=[ids], compiler="eager")
    with pytest.raises(Exception, match="layer 'model.layers.0.self_attn.q_proj' contain NaN or Inf") as excinfo:
        _run(model, options)
    assert isinstance(_inner(excinfo), CalibrationError)


def test_graph_without_linear_is_left_as_it_is_with_a_warning(caplog):
    """Graph breaks make fragments without linears (embeddings, mask building): not an error."""
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.LayerNorm(8)).eval()
    ids = torch.zeros(2, 4, dtype=torch.long)
    options = lrcompile.LowRankConfig(calibration=[ids], compiler="eager")
    with torch.no_grad():
        out = torch.compile(model, backend="lowrank", options=options)(ids)
        assert torch.equal(out, model(ids))
    assert "has no linear layer: nothing to compress" in caplog.text


def test_every_linear_excluded_names_them():
    options = lrcompile.LowRankConfig(calibration=token_batches(1), exclude=["*"], compiler="eager")
    with pytest.raises(Exception, match=r"model.layers.0.self_attn.q_proj: excluded by pattern.*exclude=\['\*'\]") as excinfo:
        _run(tiny_model("llama"), options)
    assert isinstance(_inner(excinfo), NoCompressibleLinearError)
