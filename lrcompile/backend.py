"""The ``lowrank`` Dynamo backend: compress the captured graph, then hand it to a downstream compiler.

Registered under the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="lowrank", options={...})`` works after install.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx

from .config import LowRankConfig
from .errors import LowRankError
from .pipeline import GraphCompression, compress_graph

log = logging.getLogger(__name__)


def _check_instance(compression: GraphCompression, compiled: Callable[..., Any]) -> Callable[..., Any]:
    """Refuse to run the factors of one model instance on another (see ``_instance_input``)."""
    if compression.instance_input is None:
        return compiled
    position, source, tensor = compression.instance_input
    expected = weakref.ref(tensor)

    def run(*args: Any) -> Any:
        if args[position] is not expected():
            raise LowRankError(
                f"this lowrank-compiled graph holds the factors of another model instance (its input {source} is a "
                "different tensor): Dynamo reuses a graph across instances of one class when their backends compare "
                "equal. Compile each model with its own LowRankConfig object, or call torch._dynamo.reset() first."
            )
        return compiled(*args)  # Dynamo calls a backend's result unboxed

    return run


def compile_downstream(compression: GraphCompression, config: LowRankConfig) -> Callable[..., Any]:
    """Compile the rewritten graph with ``config.compiler`` (Inductor with ``config.inductor_config()``).

    Released dense weights were erased from the graph's placeholders; Dynamo
    builds its call from the placeholders left after the backend returns, so
    the compiled function never receives (or reads) those weights.
    """
    gm = compression.gm
    kept = compression.kept_inputs
    inputs = compression.example_inputs if kept is None else [compression.example_inputs[i] for i in kept]
    if config.compiler == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return _check_instance(compression, compile_fx(gm, inputs, config_patches=config.inductor_config()))
    if config.compiler == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return _check_instance(compression, lookup_backend("aot_eager")(gm, inputs))
    return _check_instance(compression, gm.forward)


def lowrank_backend(
    gm: fx.GraphModule, example_inputs: list[Any], options: LowRankConfig | Mapping[str, Any] | None = None
) -> Callable[..., Any]:
    """Dynamo backend entry: ``options`` is torch.compile's options dict or a :class:`LowRankConfig`."""
    config = LowRankConfig.from_options(options)
    with torch.no_grad():
        compression = compress_graph(gm, example_inputs, config)
    # The compiled graph lives as long as the model: drop the float64 statistics (X^T X is
    # in x in per layer) that layers left dense would otherwise keep on their nodes.
    for view in compression.linears:
        view.meta.stats = None
    return compile_downstream(compression, config)
