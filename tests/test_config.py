"""Unit tests of lrcompile/config.py: LowRankConfig validation and parsing."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from lrcompile import CalibrationError, LowRankConfig, LowRankConfigError
from lrcompile.config import DUMP_ENV


@pytest.fixture(autouse=True)
def _no_dump_env(monkeypatch):
    monkeypatch.delenv(DUMP_ENV, raising=False)


def _calib():
    return [torch.zeros(1, 4, dtype=torch.long)]


def _opts(**kw):
    return {"calibration": _calib(), **kw}


def _error(options, error=LowRankConfigError):
    with pytest.raises(error) as info:
        LowRankConfig.from_options(options)
    return str(info.value)


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "key,suggestion",
    [("param_ration", "param_ratio"), ("methd", "method"), ("alocation", "allocation"), ("dumpdir", "dump_dir")],
)
def test_unknown_key_suggests_closest(key, suggestion):
    message = _error(_opts(**{key: 1}))
    assert repr(key) in message
    assert f"did you mean {suggestion!r}" in message
    assert "allowed:" in message and "param_ratio" in message


def test_unknown_key_without_close_match():
    message = _error(_opts(zzzzzz=1))
    assert "'zzzzzz'" in message and "did you mean" not in message


def test_options_must_be_a_mapping():
    message = _error([("param_ratio", 0.5)])
    assert "list" in message


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("value", [0, -1, 1.5, "0.8", True, None, float("nan"), 0.0])
def test_bad_param_ratio_names_key_and_value(value):
    message = _error(_opts(param_ratio=value))
    assert "'param_ratio'" in message
    assert repr(value) in message


@pytest.mark.parametrize(
    "key,value",
    [
        ("method", "pca"),
        ("method", "ASVD"),
        ("method", None),
        ("allocation", "fisher"),
        ("allocation", "greedy"),
        ("compiler", "cudagraphs"),
        ("compiler", ""),
    ],
)
def test_bad_choice_names_key_value_and_allowed(key, value):
    message = _error(_opts(**{key: value}))
    assert f"'{key}'={value!r}" in message
    allowed = {"method": ("svd", "asvd", "whiten"), "allocation": ("uniform", "sensitivity", "closed_form"),
               "compiler": ("inductor", "aot_eager", "eager")}[key]
    assert all(repr(a) in message for a in allowed)


@pytest.mark.parametrize(
    "key,value",
    [
        ("alpha", -0.1),
        ("alpha", 3),
        ("alpha", "0.5"),
        ("alpha", True),
        ("rank_multiple", 0),
        ("rank_multiple", 8.0),
        ("rank_multiple", True),
        ("include", 3),
        ("exclude", [1, 2]),
        ("sensitivity_ratios", []),
        ("sensitivity_ratios", [0.5, 1.5]),
        ("sensitivity_ratios", 0.5),
        ("sensitivity_batches", 0),
        ("dump_dir", 3),
    ],
)
def test_other_bad_values_name_key_and_value(key, value):
    message = _error(_opts(**{key: value}))
    assert repr(key) in message
    shown = value[1] if key == "sensitivity_ratios" and isinstance(value, list) and value else value
    assert repr(shown) in message


@pytest.mark.parametrize("under", ["", "/graphs"], ids=["the file", "under the file"])
def test_dump_dir_at_a_file_is_refused(tmp_path, under):
    (tmp_path / "notes.txt").write_text("x")
    message = _error(_opts(dump_dir=f"{tmp_path}/notes.txt{under}"))
    assert re.search(r"option 'dump_dir'='.*notes\.txt(/graphs)?': '.*notes\.txt' is a file, not a folder", message), message


def test_valid_values_are_normalised():
    cfg = LowRankConfig.from_options(
        _opts(param_ratio=1, include="model.*", exclude=["a", "b"], sensitivity_ratios=[0.9, 0.2, 0.5], alpha=1)
    )
    assert cfg.param_ratio == 1.0 and isinstance(cfg.param_ratio, float)
    assert cfg.include == ("model.*",)
    assert cfg.exclude == ("a", "b")
    assert cfg.sensitivity_ratios == (0.2, 0.5, 0.9)


def test_defaults():
    cfg = LowRankConfig(calibration=_calib())
    assert (cfg.param_ratio, cfg.method, cfg.allocation, cfg.compiler) == (0.85, "whiten", "closed_form", "inductor")
    assert (cfg.kv_ratio, cfg.kv_group_size, cfg.kv_allocation) == (None, 1, "uniform")
    assert cfg.rank_multiple == 8 and cfg.alpha == 0.5
    assert "lm_head" in cfg.exclude
    assert cfg.dump_dir is None


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("empty", [[], (), iter([])])
def test_empty_calibration_is_calibration_error(empty):
    message = _error({"calibration": empty}, CalibrationError)
    assert "'calibration'" in message and "empty" in message


def test_single_tensor_calibration_is_rejected():
    message = _error({"calibration": torch.zeros(2, 8, dtype=torch.long)})
    assert "'calibration'" in message and "Tensor" in message and "list" in message


@pytest.mark.parametrize("bad", [{"input_ids": torch.zeros(1, 4)}, "some text", 3])
def test_non_iterable_calibration_is_rejected(bad):
    message = _error({"calibration": bad})
    assert "'calibration'" in message and type(bad).__name__ in message


def test_calibration_batch_of_wrong_type_names_index():
    message = _error({"calibration": [torch.zeros(1, 4), "text"]}, CalibrationError)
    assert "batch 1" in message and "str" in message


def test_calibration_generator_is_materialised():
    batches = (torch.full((1, 3), i) for i in range(3))
    cfg = LowRankConfig.from_options({"calibration": batches})
    assert isinstance(cfg.calibration, tuple) and len(cfg.calibration) == 3
    assert [int(b[0, 0]) for b in cfg.calibration] == [0, 1, 2]
    assert [int(b[0, 0]) for b in cfg.calibration] == [0, 1, 2]  # reusable


def test_dict_batches_are_accepted():
    cfg = LowRankConfig.from_options({"calibration": [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}]})
    assert len(cfg.calibration) == 1


def test_svd_uniform_needs_no_calibration():
    cfg = LowRankConfig.from_options({"method": "svd", "allocation": "uniform"})
    assert cfg.calibration is None
    assert not cfg.needs_calibration


@pytest.mark.parametrize(
    "options",
    [{"method": "asvd", "allocation": "uniform"}, {"method": "whiten", "allocation": "closed_form"}, {}, None],
)
def test_missing_calibration_is_not_a_config_error(options):
    cfg = LowRankConfig.from_options(options)
    assert cfg.calibration is None
    assert cfg.needs_calibration


def test_missing_calibration_is_checked_when_a_layer_needs_it():
    from torch import fx, nn

    from lrcompile.pipeline import compress_graph

    cfg = LowRankConfig.from_options({"method": "asvd", "allocation": "uniform", "compiler": "eager"})
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(16, 16)))
    with pytest.raises(CalibrationError, match="'calibration' is required for method='asvd'"):
        compress_graph(gm, [torch.randn(2, 16)], cfg)


# --------------------------------------------------------------------------- frozen, from_options, env


def test_config_is_frozen():
    cfg = LowRankConfig(calibration=_calib())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.param_ratio = 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.method = "svd"


def test_from_options_accepts_dict_and_config():
    cfg = LowRankConfig.from_options(_opts(param_ratio=0.6, method="whiten", allocation="closed_form", compiler="eager"))
    assert (cfg.param_ratio, cfg.method, cfg.allocation, cfg.compiler) == (0.6, "whiten", "closed_form", "eager")
    assert LowRankConfig.from_options(cfg) is cfg
    again = LowRankConfig.from_options(cfg.to_json() | {"calibration": cfg.calibration})
    assert again.to_json() == cfg.to_json()
    # identity equality: Dynamo shares a captured graph between backends whose options compare equal
    assert again != cfg and again == again


def test_to_json_leaves_out_calibration():
    data = LowRankConfig(calibration=_calib(), param_ratio=0.7).to_json()
    assert "calibration" not in data
    assert data["param_ratio"] == 0.7 and data["method"] == "whiten"


def test_dump_env_sets_dump_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(DUMP_ENV, str(tmp_path / "env_dump"))
    assert LowRankConfig(calibration=_calib()).dump_dir == str(tmp_path / "env_dump")
    given = LowRankConfig(calibration=_calib(), dump_dir="explicit")
    assert given.dump_dir == "explicit"


def test_empty_dump_env_is_ignored(monkeypatch):
    monkeypatch.setenv(DUMP_ENV, "")
    assert LowRankConfig(calibration=_calib()).dump_dir is None


# --------------------------------------------------------------------------- downstream compiler options


def test_compiler_mode_and_options_become_inductor_config_patches():
    cfg = LowRankConfig.from_options(_opts(compiler_mode="reduce-overhead",
                                           compiler_options={"max-autotune": True, "triton.cudagraphs": False}))
    assert cfg.inductor_config() == {"triton.cudagraphs": False, "max_autotune": True}  # options win over the mode
    assert LowRankConfig.from_options(_opts(compiler_mode="max-autotune")).inductor_config()["triton.cudagraphs"]
    assert LowRankConfig.from_options(_opts()).inductor_config() == {}
    assert "compiler_mode" not in cfg.deciding_options() and "compiler_options" not in cfg.deciding_options()


@pytest.mark.parametrize("options, expected", [
    ({"compiler_mode": "fast"}, r"option 'compiler_mode'='fast' is not one of 'default', .*'reduce-overhead'"),
    ({"compiler_options": {"max_autotun": True}},
     r"option 'compiler_options': 'max_autotun' is not an Inductor config; did you mean 'max_autotune'\?"),
    ({"compiler_options": {"max_autotune": "yes"}}, r"'max_autotune'='yes' should be a bool"),
    ({"compiler_options": ["max_autotune"]}, r"option 'compiler_options'=\['max_autotune'\]: expected a dict"),
    ({"compiler": "aot_eager", "compiler_mode": "reduce-overhead"},
     r"configure Inductor, but compiler='aot_eager': set compiler='inductor' or drop them"),
])
def test_bad_compiler_mode_or_options_name_what_to_fix(options, expected):
    import re

    assert re.search(expected, _error(_opts(**options)))


@pytest.mark.parametrize("value", [0.0, 1.0, -0.2, 1.5, True, "0.4"])
def test_kv_key_share_outside_the_open_unit_interval_is_refused(value):
    message = _error(_opts(kv_key_share=value))
    assert "'kv_key_share'" in message and repr(value) in message
