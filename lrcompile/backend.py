"""The ``lowrank`` Dynamo backend: compress the captured graph, then hand it to a downstream compiler.

Registered under the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="lowrank", options={...})`` works after install.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx

from .config import LowRankConfig
from .pipeline import GraphCompression, compress_graph

log = logging.getLogger(__name__)


def compile_downstream(compression: GraphCompression, compiler: str) -> Callable[..., Any]:
    """Compile the rewritten graph with ``compiler``.

    Released dense weights were erased from the graph's placeholders; Dynamo
    builds its call from the placeholders left after the backend returns, so
    the compiled function never receives (or reads) those weights.
    """
    gm = compression.gm
    kept = compression.kept_inputs
    inputs = compression.example_inputs if kept is None else [compression.example_inputs[i] for i in kept]
    if compiler == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, inputs)
    if compiler == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, inputs)
    return gm.forward


def lowrank_backend(
    gm: fx.GraphModule, example_inputs: list[Any], options: LowRankConfig | Mapping[str, Any] | None = None
) -> Callable[..., Any]:
    """Dynamo backend entry: ``options`` is torch.compile's options dict or a :class:`LowRankConfig`."""
    config = LowRankConfig.from_options(options)
    with torch.no_grad():
        compression = compress_graph(gm, example_inputs, config)
    return compile_downstream(compression, config.compiler)
