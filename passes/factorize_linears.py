"""Rewrite pass: replace a linear by two thin ones, ``y = A (B x) + b``.

The factors are the parameters of the layer's :class:`~lrcompile.modules.LowRankLinear`
(the module that replaces it on the model); the rewritten graph reads those very
tensors as parameters of the GraphModule (``get_attr``). The bias and its node
are kept. ``addmm`` (Conv1D) and ``call_module`` linears are rewritten to the
same two-linear form. :func:`release_dense_weights` then removes the now unused
dense weights from the graph, so the downstream compiler never receives them.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._dynamo.source import ConstantSource

from lrcompile.modules import LowRankLinear
from lrcompile.types import FACTOR_OF_KEY, WeightLayout

from .find_linears import LinearNode, placeholder_values, weight_tensor

log = logging.getLogger(__name__)


def add_frozen_parameter(gm: fx.GraphModule, layer: str, part: str, tensor: torch.Tensor) -> str:
    """Register ``tensor`` on ``gm`` as a frozen parameter named after ``layer`` and ``part``; return its name.

    A parameter is registered as itself (the graph and the module holding it share it).
    In a Dynamo graph the parameter also gets a source, which aot_autograd
    requires of every parameter of a graph Dynamo captured.
    """
    base = "lowrank_" + re.sub(r"\W", "_", layer) + "_" + part
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_parameter(name, tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False))
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        sources[name] = ConstantSource(f"lowrank_factor_{name}")
    return name


def factorize_linear(gm: fx.GraphModule, view: LinearNode, module: LowRankLinear) -> None:
    """Replace ``view.node`` by ``linear(linear(x, B), A, bias)`` reading ``module``'s factors."""
    graph = gm.graph
    node = view.node
    name = view.meta.name
    down_name = add_frozen_parameter(gm, name, "down", module.down)
    up_name = add_frozen_parameter(gm, name, "up", module.up)
    aten = isinstance(node.target, torch._ops.OpOverload)  # an aten graph (export, make_fx) stays aten
    target = torch.ops.aten.linear.default if aten else F.linear
    with graph.inserting_before(node):
        bias: Any = view.bias
        if view.layout is WeightLayout.MODULE:
            if module.bias is not None:
                bias = graph.get_attr(add_frozen_parameter(gm, name, "bias", module.bias))
        down = graph.get_attr(down_name)
        up = graph.get_attr(up_name)
        latent = graph.call_function(target, (view.input, down))
        out = graph.call_function(target, (latent, up, bias))
    replace_linear(view, out, latent, module.rank)


def replace_linear(view: LinearNode, out: fx.Node, latent: fx.Node | None = None, rank: int | None = None) -> None:
    """Put ``out`` (after ``latent``, the ``[..., rank]`` activation of a factored layer) in the place of
    ``view.node``. They take its source location and output shapes, as later passes and graph dumps read
    them, and are marked as the layer's factors, which :func:`find_linears` does not compress again."""
    node = view.node
    for new in (out, latent):
        if new is not None:
            new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
            new.meta[FACTOR_OF_KEY] = view.meta.name
    out.meta.update({k: v for k, v in node.meta.items() if k in ("example_value", "val")})
    for key in ("example_value", "val") if latent is not None else ():
        value = view.input.meta.get(key)
        if isinstance(value, torch.Tensor):  # a fake tensor: an empty one of the latent's shape
            latent.meta[key] = value.new_empty((*value.shape[:-1], rank))
    inputs = node.all_input_nodes
    node.replace_all_uses_with(out)
    node.graph.erase_node(node)
    for dead in inputs:  # the weight's transpose (x @ W.T, addmm(b, x, W.t())): it would keep W in the graph
        if not dead.users and dead.op in ("call_function", "call_method"):
            node.graph.erase_node(dead)


def factorize_linears(gm: fx.GraphModule, modules: Mapping[LinearNode, LowRankLinear]) -> None:
    for view, module in modules.items():
        factorize_linear(gm, view, module)
    gm.graph.lint()
    gm.recompile()
    log.info("factored %d linears", len(modules))


def _reads(gm: fx.GraphModule, op: str, target: str) -> bool:
    """Whether a node of ``gm``'s graph still reads the module or attribute ``target``."""
    return any(n.op == op and n.target == target for n in gm.graph.nodes)


def _drop_weight(gm: fx.GraphModule, view: LinearNode) -> None:
    """Remove a rewritten layer's dense weight from ``gm`` unless another node still reads it.

    Its module, placeholder or ``get_attr`` node goes, and with a ``get_attr`` node the parameter itself:
    an exported module holds its weights as its own parameters, which would otherwise stay in its state_dict.
    """
    if view.layout is WeightLayout.MODULE:
        if not _reads(gm, "call_module", view.node.target):
            gm.delete_submodule(str(view.node.target))
        return
    node = view.weight
    if node.users:
        return
    gm.graph.erase_node(node)
    owner, _, attr = str(node.target).rpartition(".")
    # a module the graph also calls is the user's own (symbolic_trace shares it): its weight stays
    if node.op == "get_attr" and not _reads(gm, "get_attr", node.target) and not _reads(gm, "call_module", owner):
        delattr(gm.get_submodule(owner), attr)


def release_dense_weights(
    gm: fx.GraphModule, views: Sequence[LinearNode], example_inputs: list[Any] | None
) -> tuple[int, list[int]]:
    """Remove the dense weights of rewritten layers from ``gm``; return (their bytes, kept placeholder indices).

    A weight placeholder left without users is erased; Dynamo builds the call of
    the compiled graph from the placeholders left, so the downstream compiler
    never receives those weights. They are freed when the model drops the
    modules holding them (the backend replaces those by their compressed form).
    Only weights ``gm`` neither holds nor takes any more count: not one another
    node still reads, nor one held under another name (a tied weight).
    """
    values = placeholder_values(gm, example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    weights = {id(w): w for w in (weight_tensor(gm, view, values) for view in views)}
    for view in views:
        _drop_weight(gm, view)
    gm.recompile()
    left = {n for n in gm.graph.nodes if n.op == "placeholder"}
    held = {id(t) for t in itertools.chain(gm.parameters(), gm.buffers(), (values.get(n) for n in left))}
    released = sum(w.untyped_storage().nbytes() for key, w in weights.items() if key not in held)
    log.info("dropped %.2f MiB of dense weights from the graph", released / 2**20)
    return released, [i for i, node in enumerate(placeholders) if node in left]
