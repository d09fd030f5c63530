"""Run calibration batches through a captured graph.

A Dynamo graph takes the model's parameters as placeholders next to the user
inputs; each placeholder's ``grapharg.source`` says where it came from
(``L['kwargs']['input_ids']``, ``L['args'][0]``, ``L['kwargs']['input_ids'].size()[1]``
for a symbolic size, ``L['self']._modules[...]`` for state). The runner binds a
batch (a tensor, a tuple, or a dict of model inputs) to the user placeholders,
derives symbolic sizes from the batch, keeps the state placeholders, and can
substitute one layer's weight (for sensitivity measurements).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import fx
from torch._dynamo.source import (
    DictGetItemSource,
    GetItemSource,
    LocalSource,
    ParamBufferSource,
    TensorProperty,
    TensorPropertySource,
    UnspecializedParamBufferSource,
)

from lrcompile.errors import CalibrationError
from lrcompile.types import WeightLayout

from .find_linears import LinearNode, _get_attr

_ROLE_STATE, _ROLE_USER, _ROLE_SIZE = "state", "user", "size"


class _Missing(Exception):
    pass


def _chain(source: Any) -> list[Any]:
    chain = [source]
    while hasattr(chain[-1], "base"):
        chain.append(chain[-1].base)
    return chain


def _root(source: Any) -> Any:
    return _chain(source)[-1]


def _role(node: fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    if grapharg is None:
        return _ROLE_USER  # symbolic_trace / export: placeholders are the forward's arguments
    source = grapharg.source
    chain = _chain(source)
    root = chain[-1]
    if (
        not isinstance(root, LocalSource)
        or root.local_name == "self"
        or not root.is_input
        or any(isinstance(s, (ParamBufferSource, UnspecializedParamBufferSource)) for s in chain)
    ):
        return _ROLE_STATE
    return _ROLE_SIZE if isinstance(source, TensorPropertySource) else _ROLE_USER


def is_state_input(node: fx.Node) -> bool:
    """A Dynamo placeholder that carries model state (a parameter or buffer), not a user input."""
    return node.op == "placeholder" and node.meta.get("grapharg") is not None and _role(node) == _ROLE_STATE


def _resolve(source: Any, env: Mapping[str, Any]) -> Any:
    if source.name in env:
        return env[source.name]
    try:
        if isinstance(source, LocalSource):
            return env[source.local_name]
        if isinstance(source, (DictGetItemSource, GetItemSource)):
            return _resolve(source.base, env)[source.index]
        if isinstance(source, TensorPropertySource):
            tensor = _resolve(source.base, env)
            if source.prop is TensorProperty.SIZE:
                return tensor.size(source.idx)
            if source.prop is TensorProperty.STRIDE:
                return tensor.stride(source.idx)
            return tensor.storage_offset()
    except (KeyError, IndexError, TypeError) as err:
        raise _Missing(source.name) from err
    raise _Missing(source.name)


class CalibrationRunner:
    """Binds calibration batches to a graph's inputs and runs it."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any] | None = None):
        self.gm = gm
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.examples = list(example_inputs) if example_inputs is not None else [None] * len(self.placeholders)
        self.roles = [_role(n) for n in self.placeholders]
        self.user = [n for n, r in zip(self.placeholders, self.roles) if r == _ROLE_USER]

    def _user_label(self, node: fx.Node) -> str:
        grapharg = node.meta.get("grapharg")
        return grapharg.source.name if grapharg is not None else str(node.target)

    def _env(self, batch: Any) -> dict[str, Any]:
        if isinstance(batch, Mapping):
            return {"kwargs": batch, **batch}
        if isinstance(batch, torch.Tensor):
            batch = (batch,)
        return {"args": tuple(batch)}

    def _user_value(self, node: fx.Node, batch: Any, env: Mapping[str, Any]) -> Any:
        grapharg = node.meta.get("grapharg")
        if isinstance(batch, torch.Tensor) and len(self.user) == 1:
            return batch
        if grapharg is not None:
            return _resolve(grapharg.source, env)
        if isinstance(batch, Mapping):
            return batch[node.target]
        return env["args"][self.user.index(node)]

    def bind(self, batch: Any, index: int = 0) -> list[Any]:
        """Graph arguments for one calibration batch; a clear error when it does not fit.

        User tensors are bound first: symbolic sizes (which Dynamo places before
        the tensor they measure) are then read off the bound tensors.
        """
        env = self._env(batch)
        args: list[Any] = list(self.examples)
        bound: dict[str, Any] = {}  # user input source name -> value
        for phase in (_ROLE_USER, _ROLE_SIZE):
            for i, (node, role) in enumerate(zip(self.placeholders, self.roles)):
                if role != phase:
                    continue
                try:
                    if role == _ROLE_USER:
                        args[i] = self._check_tensor(node, self._user_value(node, batch, env), index)
                        bound[self._user_label(node)] = args[i]
                    else:
                        args[i] = _resolve(node.meta["grapharg"].source, {**env, **bound})
                except (_Missing, KeyError, IndexError) as err:
                    raise CalibrationError(
                        f"calibration batch {index} does not give the graph input {self._user_label(node)!r}; "
                        f"the graph was captured with inputs {', '.join(self._user_label(n) for n in self.user)}. "
                        "Give calibration batches with the same inputs as the compiled call."
                    ) from err
        self._check_extra_keys(batch, index)
        return args

    def _check_tensor(self, node: fx.Node, value: Any, index: int) -> Any:
        expected = node.meta.get("example_value", node.meta.get("val"))
        if not isinstance(value, torch.Tensor) or not isinstance(expected, torch.Tensor):
            return value
        label = self._user_label(node)
        if value.dtype != expected.dtype:
            raise CalibrationError(
                f"calibration batch {index}: input {label!r} has dtype {value.dtype}, the graph takes {expected.dtype}"
            )
        static = [d if not isinstance(d, torch.SymInt) else None for d in expected.shape]
        if value.dim() != len(static) or any(s is not None and s != v for s, v in zip(static, value.shape)):
            shown = tuple("?" if s is None else s for s in static)
            raise CalibrationError(
                f"calibration batch {index}: input {label!r} has shape {tuple(value.shape)}, but the graph was "
                f"captured for shape {shown}. Give batches of the captured shape, or compile with dynamic=True."
            )
        device = self.examples[self.placeholders.index(node)]
        return value.to(device.device) if isinstance(device, torch.Tensor) else value

    def _check_extra_keys(self, batch: Any, index: int) -> None:
        if not isinstance(batch, Mapping) or not all(n.meta.get("grapharg") for n in self.user):
            return
        taken = {_batch_key(n.meta["grapharg"].source) for n in self.user}
        extra = [k for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in taken]
        if extra:
            raise CalibrationError(
                f"calibration batch {index} gives {extra}, which the captured graph does not take "
                f"(its inputs: {', '.join(self._user_label(n) for n in self.user)}); call the compiled "
                "model with the same inputs as the calibration batches."
            )

    @contextlib.contextmanager
    def _weights(self, args: list[Any], overrides: Mapping[LinearNode, torch.Tensor]) -> Iterator[None]:
        """Substitute layer weights (given as ``[out, in]``) for one run."""
        restore = []
        for view, weight in overrides.items():
            stored = weight.T if view.layout is WeightLayout.ADDMM else weight
            if view.layout is WeightLayout.MODULE:
                module = self.gm.get_submodule(view.node.target)
                restore.append((module, "weight", module.weight))
                module.weight = torch.nn.Parameter(stored, requires_grad=False)
            elif view.weight.op == "placeholder":
                args[self.placeholders.index(view.weight)] = stored
            else:
                owner_path, _, attr = view.weight.target.rpartition(".")
                owner = _get_attr(self.gm, owner_path) if owner_path else self.gm
                restore.append((owner, attr, getattr(owner, attr)))
                setattr(owner, attr, torch.nn.Parameter(stored, requires_grad=False))
        try:
            yield
        finally:
            for owner, attr, value in restore:
                setattr(owner, attr, value)

    @staticmethod
    def token_mask(batch: Any) -> torch.Tensor | None:
        """The batch's ``attention_mask`` (1 = real token), when it gives one."""
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        return mask if isinstance(mask, torch.Tensor) else None

    @torch.no_grad()
    def run(self, batch: Any, index: int = 0, overrides: Mapping[LinearNode, torch.Tensor] | None = None) -> Any:
        args = self.bind(batch, index)
        with self._weights(args, overrides or {}):
            return self.gm(*args)


def _batch_key(source: Any) -> Any:
    """The dict key a user input is read from: ``k`` for ``L['kwargs'][k]``, ``x`` for ``L['x']``."""
    while isinstance(source.base if hasattr(source, "base") else None, (DictGetItemSource, GetItemSource)):
        source = source.base
    base = getattr(source, "base", None)
    if isinstance(base, LocalSource) and base.local_name == "kwargs":
        return source.index
    return _root(source).local_name
