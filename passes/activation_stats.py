"""Analysis pass: statistics of each linear layer's input activations.

Follows the pt2e calibration flow: :func:`insert_observers` puts an identity
:class:`ActivationObserver` in front of every compressible linear, calibration
data runs through the graph (:func:`calibrate`, or the user's own loop), and
:func:`collect_stats` moves the statistics onto ``node.meta["lowrank"].stats``
and removes the observers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from lrcompile.errors import CalibrationError
from lrcompile.types import ActivationStats

from .calibration_runner import CalibrationRunner
from .find_linears import LinearNode

log = logging.getLogger(__name__)

OBSERVER_PREFIX = "lowrank_observer_"


class ActivationObserver(nn.Module):
    """Identity that accumulates :class:`ActivationStats` of what passes through it."""

    def __init__(self, in_features: int, layer: str, gram: bool = True):
        super().__init__()
        self.layer = layer
        self.stats = ActivationStats.empty(in_features, gram)
        self.token_mask: torch.Tensor | None = None  # padding rows to drop, set per batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = self.stats.abs_sum.shape[0]
        if x.dim() == 0 or x.shape[-1] != width:
            raise CalibrationError(
                f"layer {self.layer!r} takes inputs of width {width}, but a calibration batch gives it a tensor of "
                f"shape {list(x.shape)}: check the batches' shape against the model's input")
        self.stats.update(x, self.token_mask)
        return x


def _is_observer(node: fx.Node) -> bool:
    return node.op == "call_module" and str(node.target).startswith(OBSERVER_PREFIX)


def insert_observers(gm: fx.GraphModule, linears: Iterable[LinearNode], gram: bool = True) -> None:
    """Route the input of every compressible linear through an observer, one per distinct input node.

    Linears reading the same tensor (q/k/v after one norm, gate/up) share one
    observer and so one :class:`ActivationStats`: one Gram instead of three.
    ``gram``: also accumulate X^T X (``in x in`` float64 per distinct input), which
    only whitening needs; ASVD needs the per-channel statistics alone. A graph that
    still holds observers (no :func:`collect_stats` since) is refused: a second set
    would count every calibration row twice.
    """
    present = sorted(n.target for n in gm.graph.nodes if _is_observer(n))
    if present:
        raise CalibrationError(f"the graph already holds {len(present)} observer(s) ({', '.join(present[:3])}"
                               f"{', ...' if len(present) > 3 else ''}): call collect_stats before inserting observers again")
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    observed: dict[fx.Node, fx.Node] = {}
    for view in sorted((v for v in linears if v.meta.compressible), key=lambda v: position[v.node]):
        if view.input not in observed:  # before the first linear reading it
            name = f"{OBSERVER_PREFIX}{len(observed)}"
            gm.add_submodule(name, ActivationObserver(view.meta.in_features, view.meta.name, gram))
            with gm.graph.inserting_before(view.node):
                observed[view.input] = gm.graph.call_module(name, (view.input,))
        view.node.replace_input_with(view.input, observed[view.input])
    gm.recompile()


def collect_stats(gm: fx.GraphModule, linears: Iterable[LinearNode], validate: bool = True) -> None:
    """Attach each observer's statistics to its linear node and remove the observer.

    With ``validate`` (the default) it raises :class:`CalibrationError` naming the first layer (in graph order) whose
    statistics hold NaN/Inf or that no calibration row reached.
    """
    observers: set[fx.Node] = set()
    for view in linears:
        observer_node = next((a for a in view.node.all_input_nodes if _is_observer(a)), None)
        if observer_node is None:
            continue
        view.meta.stats = gm.get_submodule(observer_node.target).stats  # shared by the linears reading this input
        view.node.replace_input_with(observer_node, observer_node.args[0])
        observers.add(observer_node)
    for observer_node in observers:
        if not observer_node.users:
            gm.graph.erase_node(observer_node)
            gm.delete_submodule(observer_node.target)
    gm.recompile()
    for view in linears if validate else ():
        stats = view.meta.stats
        if stats is not None:
            stats.check(view.meta.name)


def calibrate(runner: CalibrationRunner, batches: Iterable[Any], total: int | None = None) -> None:
    """Run every calibration batch through the observed graph, with a progress bar.

    Rows of padding tokens (``attention_mask`` 0 in a dict batch) are left out of the statistics.
    """
    observers = [m for m in runner.gm.modules() if isinstance(m, ActivationObserver)]
    count = 0
    for count, batch in enumerate(tqdm(batches, total=total, desc="lowrank: calibration", unit="batch", leave=False), 1):
        for observer in observers:
            observer.token_mask = runner.token_mask(batch)
        runner.run(batch, count - 1)
    if not count:
        raise CalibrationError("calibration is empty: give at least one batch of model inputs")
    log.info("calibrated on %d batches", count)
