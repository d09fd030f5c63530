"""FX graph passes: analysis (linears, activation statistics, sensitivity),
planning (rank allocation) and rewriting (factored linears).

Each pass is a function over an ``fx.GraphModule``; results of analysis live
on the nodes under ``node.meta["lowrank"]``.
"""

from .activation_stats import ActivationObserver, calibrate, collect_stats, insert_observers
from .calibration_runner import CalibrationRunner
from .decomposition import LinearDecomposition, Whitening, decompose
from .factorize_linears import factorize_linear, factorize_linears, release_dense_weights
from .find_linears import LinearNode, dense_weight, find_linears, linear_view
from .rank_allocation import allocate_by_sensitivity, allocate_closed_form, allocate_uniform, build_plan, rank_for_ratio
from .sensitivity import OutputReference, measure_sensitivity, sensitivity_output

__all__ = [
    "ActivationObserver",
    "CalibrationRunner",
    "LinearDecomposition",
    "LinearNode",
    "OutputReference",
    "allocate_by_sensitivity",
    "allocate_closed_form",
    "allocate_uniform",
    "build_plan",
    "calibrate",
    "collect_stats",
    "decompose",
    "Whitening",
    "dense_weight",
    "factorize_linear",
    "factorize_linears",
    "find_linears",
    "insert_observers",
    "linear_view",
    "measure_sensitivity",
    "rank_for_ratio",
    "sensitivity_output",
    "release_dense_weights",
]
