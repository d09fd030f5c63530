"""Analysis pass: sequential calibration, with or without error feedback.

Independent calibration takes every linear's statistics from the dense model,
so each layer is fit to inputs it will never see once the layers before it are
compressed. Here the linears are visited in graph order, one *step* per
distinct input tensor (q/k/v share one, gate/up another), and each step sees
two streams of the calibration batches: the dense graph (inputs ``X``) and the
graph whose earlier steps already run their factors (inputs ``X^``). This is
finer than per decoder layer: ``o_proj`` sees the compressed ``q/k/v``,
``down_proj`` the compressed ``gate/up``. A linear is then factored from
``C = X^T X^`` (float64) in one of two ways (:mod:`lrcompile.passes.decomposition`):

* ``sequential``: whitened truncation of ``W`` with ``C``, i.e. the rank-k
  optimum of ``||X^ W^T - X^ Wh^T||_F``: SVD-LLM's sequential update (arXiv
  2403.07378, Sec. 3.3), GPTQ's target (arXiv 2210.17323).
* ``error_feedback``: also ``B = X^T X^`` (the ``cross`` term), for the rank-k
  optimum of ``||X W^T - X^ Wh^T||_F``: the dense layer's output is the target,
  so a layer corrects what the layers before it lost (OBC's layer-wise
  reconstruction, arXiv 2208.11580, made low-rank). The correction
  ``W (B - C) C^-1`` is a regression of the upstream error on ``X^`` with
  ``in_features`` regressors: with few calibration rows it fits their noise.

Each batch runs through the graph in resumable pieces (:class:`_Stream`, an
``fx.Interpreter`` that stops at a node and frees values after their last use),
so a pass costs one forward per batch and stream, not one per step, and only
one step's statistics are alive at a time. Nothing after the last step runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from lrcompile.types import ActivationStats, WeightLayout

from .calibration_runner import CalibrationRunner
from .find_linears import LinearNode

log = logging.getLogger(__name__)


@dataclass
class FeedbackStep:
    """Linears reading one input node, with that input's statistics over the calibration batches.

    ``stats`` describe the compressed prefix's inputs ``X^`` (``stats.gram`` is ``C``);
    ``cross`` is ``B = X^T X^`` with the dense inputs ``X`` (None unless asked for).
    The consumer puts each linear's ``(down [rank, in], up [out, rank])`` in ``factors``; those
    run in the compressed stream from the next step on (a linear left out stays dense).
    """

    input: fx.Node
    linears: list[LinearNode]
    stats: ActivationStats
    cross: torch.Tensor | None
    factors: dict[LinearNode, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class _Stream(fx.Interpreter):
    """One calibration batch through the graph, run up to a node at a time; factored linears run their factors."""

    def __init__(self, gm: fx.GraphModule, args: Sequence[Any], factors: Mapping[fx.Node, tuple[LinearNode, torch.Tensor, torch.Tensor]]):
        super().__init__(gm)
        self.env = {node: value for node, value in zip((n for n in gm.graph.nodes if n.op == "placeholder"), args)}
        self._pending = iter(gm.graph.nodes)
        self.factors = factors  # filled as steps are factored: linears executed later run low-rank

    def run_until(self, stop: fx.Node) -> torch.Tensor:
        """Run the nodes up to ``stop``; its value."""
        while stop not in self.env:
            node = next(self._pending)
            if node not in self.env:
                self.env[node] = self._low_rank(node) if node in self.factors else self.run_node(node)
            for dead in self.user_to_last_uses.get(node, ()):
                self.env.pop(dead, None)
        return self.env[stop]

    def _low_rank(self, node: fx.Node) -> torch.Tensor:
        view, down, up = self.factors[node]
        bias = self.env[view.bias] if view.bias is not None else None
        if view.layout is WeightLayout.MODULE:
            bias = self.module.get_submodule(node.target).bias
        return F.linear(F.linear(self.env[view.input], down), up, bias)


def sequential_steps(
    runner: CalibrationRunner, batches: Sequence[Any], linears: Sequence[LinearNode], compressed: bool = True,
    cross: bool = False,
) -> Iterator[FeedbackStep]:
    """Visit the distinct inputs of ``linears`` in graph order, yielding each one's :class:`FeedbackStep`.

    ``compressed``: the statistics are taken on the compressed stream, in which the factors the
    consumer puts in a step run before the next step is observed; else only the dense stream runs
    (e.g. to read every layer's spectrum with one step's Gram alive at a time). ``cross``: also
    accumulate ``B`` with the dense stream's inputs (error feedback).
    """
    gm = runner.gm
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    readers: dict[fx.Node, list[LinearNode]] = {}
    for view in sorted(linears, key=lambda v: position[v.input]):
        readers.setdefault(view.input, []).append(view)
    factors: dict[fx.Node, tuple[LinearNode, torch.Tensor, torch.Tensor]] = {}
    args = [runner.bind(batch, i) for i, batch in enumerate(batches)]
    dense = [_Stream(gm, a, {}) for a in args] if cross or not compressed else []
    refit = [_Stream(gm, a, factors) for a in args] if compressed else []
    masks = [runner.token_mask(batch) for batch in batches]
    for node, views in readers.items():
        width = views[0].meta.in_features
        step = FeedbackStep(node, views, ActivationStats.empty(width), None)
        with torch.no_grad():
            for b, mask in enumerate(masks):
                x_hat = ActivationStats.rows_of((refit or dense)[b].run_until(node), mask)
                step.stats.add_rows(x_hat)
                if cross:  # accumulated in place where the activations live
                    if step.cross is None:
                        step.cross = x_hat.new_zeros(width, width)
                    step.cross.addmm_(ActivationStats.rows_of(dense[b].run_until(node), mask).T, x_hat)
        step.stats.check(views[0].meta.name)
        yield step
        factors.update((view.node, (view, down, up)) for view, (down, up) in step.factors.items())
    log.info("sequential calibration: %d steps over %d batches (%s)", len(readers), len(batches),
             "error feedback" if cross else "compressed inputs" if compressed else "dense inputs")
