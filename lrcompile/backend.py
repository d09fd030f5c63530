"""The ``lowrank`` Dynamo backend: compress the captured graph, put the outcome on the model, then hand
the graph to a downstream compiler.

Registered under the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="lowrank", options={...})`` works after install.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx

from .config import LowRankConfig
from .errors import LowRankError
from .pipeline import GraphCompression, compress_graph, install

log = logging.getLogger(__name__)


def _on_call(compression: GraphCompression, compiled: Callable[..., Any]) -> Callable[..., Any]:
    """The compiled graph as Dynamo calls it: the first call installs the new modules on the model,
    and a graph that reads new factors refuses another model instance's inputs.

    The modules are swapped in at the first call, not during compilation: Dynamo builds the
    frame's guards and loads the graph's inputs from the model as it was captured. The swap
    changes the model, so the next call recompiles and finds the compressed modules.
    """
    check = compression.instance_input
    expected = None if check is None else weakref.ref(check[2])
    # holds the new modules, not the compression (whose example inputs are the dense weights)
    models = list({id(slot.root): slot.root for slot in compression.owners.values()}.values())
    pending = [functools.partial(install, compression.replacements, compression.records, models)]

    def run(*args: Any) -> Any:
        if check is not None and args[check[0]] is not expected():
            raise LowRankError(
                f"this lowrank-compiled graph holds the factors of another model instance (its input {check[1]} is a "
                "different tensor): Dynamo reuses a graph across instances of one class when their backends compare "
                "equal. Compile each model with its own LowRankConfig object, or call torch._dynamo.reset() first."
            )
        while pending:
            pending.pop()()
        return compiled(*args)  # Dynamo calls a backend's result unboxed

    return run


def compile_downstream(compression: GraphCompression, config: LowRankConfig) -> Callable[..., Any]:
    """Compile the rewritten graph with ``config.compiler`` (Inductor with ``config.inductor_config()``).

    Dense weights of replaced layers were erased from the graph's placeholders;
    Dynamo builds its call from the placeholders left after the backend returns,
    so the compiled function never receives (or reads) those weights.
    """
    gm = compression.gm
    kept = compression.kept_inputs
    inputs = compression.example_inputs if kept is None else [compression.example_inputs[i] for i in kept]
    if config.compiler == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return _on_call(compression, compile_fx(gm, inputs, config_patches=config.inductor_config()))
    if config.compiler == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return _on_call(compression, lookup_backend("aot_eager")(gm, inputs))
    return _on_call(compression, gm.forward)


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
