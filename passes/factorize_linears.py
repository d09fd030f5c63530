"""Rewrite pass: replace a linear by two thin ones, ``y = A (B x) + b``.

The factors become parameters of the GraphModule (``get_attr``); the bias and
its node are kept. ``addmm`` (Conv1D) and ``call_module`` linears are rewritten
to the same two-linear form. :func:`release_dense_weights` then frees the dense
storage (as FSDP frees parameter storage: the tensor keeps its size, guards
still hold) and removes the now unused weight placeholders.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._dynamo.source import ConstantSource

from lrcompile.types import CompressedLayer, WeightLayout

from .find_linears import LinearNode, placeholder_values, weight_tensor

log = logging.getLogger(__name__)


def add_frozen_parameter(gm: fx.GraphModule, layer: str, part: str, tensor: torch.Tensor) -> str:
    """Register ``tensor`` on ``gm`` as a frozen parameter named after ``layer`` and ``part``; return its name.

    In a Dynamo graph the parameter also gets a source, which aot_autograd
    requires of every parameter of a graph Dynamo captured.
    """
    base = "lowrank_" + re.sub(r"\W", "_", layer) + "_" + part
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        sources[name] = ConstantSource(f"lowrank_factor_{name}")
    return name


def factorize_linear(gm: fx.GraphModule, view: LinearNode, factors: CompressedLayer) -> None:
    """Replace ``view.node`` by ``linear(linear(x, B), A, bias)``."""
    graph = gm.graph
    node = view.node
    down_name = add_frozen_parameter(gm, factors.plan.name, "down", factors.down)
    up_name = add_frozen_parameter(gm, factors.plan.name, "up", factors.up)
    target = torch.ops.aten.linear.default if node.target in (torch.ops.aten.linear.default, torch.ops.aten.addmm.default) else F.linear
    with graph.inserting_before(node):
        bias: Any = view.bias
        if view.layout is WeightLayout.MODULE:
            module_bias = gm.get_submodule(node.target).bias
            if module_bias is not None:
                bias_name = add_frozen_parameter(gm, factors.plan.name, "bias", module_bias.detach())
                bias = graph.get_attr(bias_name)
        down = graph.get_attr(down_name)
        up = graph.get_attr(up_name)
        latent = graph.call_function(target, (view.input, down))
        out = graph.call_function(target, (latent, up, bias))
    out.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "example_value", "val")})
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def factorize_linears(gm: fx.GraphModule, factors: Mapping[LinearNode, CompressedLayer]) -> None:
    for view, fw in factors.items():
        factorize_linear(gm, view, fw)
    gm.graph.lint()
    gm.recompile()
    log.info("factored %d linears", len(factors))


def release_dense_weights(
    gm: fx.GraphModule, views: Sequence[LinearNode], example_inputs: list[Any] | None
) -> tuple[int, list[int]]:
    """Free the dense weights of factored layers; return (bytes freed, kept placeholder indices).

    A weight placeholder left without users is removed from the graph; callers
    pass only the kept inputs (see :func:`drop_inputs`). Only weights used by
    nothing else are freed.
    """
    values = placeholder_values(gm, example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    freed = 0
    removed = set()
    for view in views:
        weight = weight_tensor(gm, view, values)
        freed += weight.untyped_storage().nbytes()
        if not weight.untyped_storage().resizable():
            # from_pretrained maps safetensors storage, which cannot be resized: move the tensor
            # (same object, size and strides, so Dynamo's guards hold) onto ordinary storage first.
            weight.data = torch.empty_like(weight)
        weight.untyped_storage().resize_(0)
        if view.weight is not None and view.weight.op == "placeholder" and not view.weight.users:
            removed.add(placeholders.index(view.weight))
            gm.graph.erase_node(view.weight)
        elif view.weight is not None and view.weight.op == "get_attr" and not view.weight.users:
            gm.graph.erase_node(view.weight)
    for name in {str(v.node.target) for v in views if v.layout is WeightLayout.MODULE}:
        gm.delete_submodule(name)
    gm.recompile()
    log.info("released %.2f MiB of dense weights", freed / 2**20)
    return freed, [i for i in range(len(placeholders)) if i not in removed]
