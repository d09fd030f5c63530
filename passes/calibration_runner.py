"""Run calibration batches through a captured graph.

A Dynamo graph takes the model's parameters as placeholders next to the user
inputs; each placeholder's ``grapharg.source`` says where it came from
(``L['kwargs']['input_ids']``, ``L['args'][0]``, ``L['kwargs']['input_ids'].size()[1]``
for a symbolic size, ``L['self']._modules[...]`` for state). The runner binds a
batch (a tensor, a tuple, or a dict of model inputs) to the user placeholders,
derives symbolic sizes from the batch, keeps the state placeholders, and can
substitute one layer's weight (for sensitivity measurements).

A ``torch.export(...).module()`` checks each call against the structure it
was exported with (positional inputs, then keyword ones) and guards the
constants it was exported with (an HF model's ``use_cache=False``): the runner
fills those constants in and calls the module in that structure.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch._dynamo.source import (
    DictGetItemSource,
    GetItemSource,
    LocalSource,
    NNModuleSource,
    TensorProperty,
    TensorPropertySource,
)

from lrcompile.errors import CalibrationError
from lrcompile.types import WeightLayout

from .find_linears import LinearNode, _get_attr

log = logging.getLogger(__name__)

_ROLE_STATE, _ROLE_USER, _ROLE_SIZE = "state", "user", "size"


class _Missing(Exception):
    pass


def _chain(source: Any) -> list[Any]:
    chain = [source]
    while hasattr(chain[-1], "base"):
        chain.append(chain[-1].base)
    return chain


def _is_attribute(source: Any) -> bool:
    """An attribute access (``x.attr``, ``m._modules[...]``, a parameter or buffer), as opposed to an item of an input."""
    return hasattr(source, "member") or isinstance(source, NNModuleSource)


def _role(node: fx.Node) -> str:
    """``user`` for a tensor reached from the call's arguments by indexing alone, ``size`` for a
    symbolic size of one, ``state`` for everything read from an object's attributes: parameters,
    buffers and module constants (Dynamo lifts float attributes such as ``variance_epsilon``
    to inputs under ``dynamic=True``), a cache object's tensors, globals."""
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
        or any(_is_attribute(s) for s in chain)
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


@dataclass(frozen=True)
class _Input:
    """A top-level model input the graph reads: by keyword ``name``, by ``position``, or both."""

    source: str  # the source name the graph's placeholders resolve it by, e.g. "L['kwargs']['input_ids']"
    name: str | None
    position: int | None

    @property
    def label(self) -> str:
        """How a message names it: ``input_ids``, or ``positional input 0``."""
        return self.name if self.name is not None else f"positional input {self.position}"


def _top_input(node: fx.Node, order: int, positional: int, parameters: Sequence[str]) -> _Input:
    """The call argument a user placeholder reads (``kwargs[k]``, a named local, ``args[i]``); ``positional``:
    how many of a non-Dynamo graph's inputs it takes by position; ``parameters``: the called ``forward``'s
    positional parameter names, which name ``args[i]`` (``model(ids)`` reads ``args[0]``, ``input_ids``)."""
    grapharg = node.meta.get("grapharg")
    if grapharg is None:
        return _Input(str(node.target), str(node.target), order if order < positional else None)
    chain = _chain(grapharg.source)
    root = chain[-1]
    top = chain[-2] if len(chain) > 1 and root.local_name in ("args", "kwargs") else root
    if top is root:
        return _Input(top.name, root.local_name, None)
    if root.local_name == "kwargs":
        return _Input(top.name, str(top.index), None)
    position = int(top.index)
    return _Input(top.name, parameters[position] if position < len(parameters) else None, position)


def _positional_parameters(forward: Callable[..., Any] | None) -> list[str]:
    """The names ``forward`` binds its positional arguments to, in order (none for ``*args``)."""
    if forward is None:
        return []
    try:
        signature = inspect.signature(forward)
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return list(itertools.takewhile(lambda name: signature.parameters[name].kind in kinds, signature.parameters))


def _positional_count(gm: fx.GraphModule) -> int:
    """How many of the graph's flat inputs are positional: those of an exported module's ``in_spec`` args,
    all of them in a graph called flat."""
    spec = getattr(gm, "_in_spec", None)
    if spec is None:
        return sum(n.op == "placeholder" for n in gm.graph.nodes)
    args, _ = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    return len(pytree.tree_leaves(args))


def _exported_constant(node: fx.Node) -> Any:
    """The non-tensor value torch.export recorded for an input (``use_cache=False``), which the exported
    module guards on; None for a tensor or symbolic input, and in other graphs."""
    value = node.meta.get("val")
    return None if isinstance(value, (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool)) else value


def _derived_input(name: str | None, given: Mapping[str, Any], example: Any) -> Any:
    """A standard transformers input the batch did not give, derived from its ``input_ids``
    as ``model.generate`` builds it; None when ``name`` is not one of them."""
    ids = given.get("input_ids")
    if not isinstance(ids, torch.Tensor) or not isinstance(example, torch.Tensor):
        return None
    mask = given.get("attention_mask")
    if mask is None:
        mask = torch.ones(ids.shape[:2], dtype=torch.long, device=ids.device)
    if name == "attention_mask":
        return mask.to(example.dtype)
    if name == "position_ids":
        return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1).to(example.dtype)
    if name == "cache_position":
        return torch.arange(ids.shape[1], dtype=example.dtype, device=ids.device)
    if name == "token_type_ids":
        return torch.zeros(ids.shape[:2], dtype=example.dtype, device=ids.device)
    return None


class CalibrationRunner:
    """Binds calibration batches to a graph's inputs, by name, and runs it.

    A tensor batch is the model's ``input_ids`` (or its one input), whether the
    graph took it by keyword or by position; a tuple fills the positional
    inputs in order; a dict gives inputs by name. Inputs a batch leaves out are
    derived as transformers' ``generate`` derives them (``attention_mask``,
    ``position_ids``, ``cache_position``, ``token_type_ids``) or taken from the
    captured call (an exported module's: the constants it was exported with);
    model state (parameters, buffers, module constants) is always the captured call's.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any] | None = None,
                 forward: Callable[..., Any] | None = None):
        self.gm = gm
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.examples = (list(example_inputs) if example_inputs is not None
                         else [_exported_constant(n) for n in self.placeholders])
        self.roles = [_role(n) for n in self.placeholders]
        self.user = [n for n, r in zip(self.placeholders, self.roles) if r == _ROLE_USER]
        positional = _positional_count(gm)
        parameters = _positional_parameters(forward)
        self.inputs = {node: _top_input(node, order, positional, parameters) for order, node in enumerate(self.user)}
        self.top_inputs = list(dict.fromkeys(self.inputs.values()))
        self.positional = sorted((i for i in self.top_inputs if i.position is not None), key=lambda i: i.position)
        named = [i for i in self.top_inputs if i.name == "input_ids"]
        # the input a lone tensor batch stands for: input_ids, else the first positional input
        self.primary = (named or self.positional or self.top_inputs or [None])[0]

    def _user_label(self, node: fx.Node) -> str:
        grapharg = node.meta.get("grapharg")
        return grapharg.source.name if grapharg is not None else str(node.target)

    def _labels(self) -> list[str]:
        """The graph's user inputs as messages name them, each once."""
        return list(dict.fromkeys(self.inputs[n].label for n in self.user))

    def _given(self, batch: Any, index: int) -> dict[_Input, Any]:
        """The batch's values keyed by the top-level inputs they fill."""
        if isinstance(batch, Mapping):
            return {i: batch[i.name] for i in self.top_inputs if i.name in batch}
        if isinstance(batch, torch.Tensor):
            batch = (batch,)
        if isinstance(batch, (list, tuple)) and batch and all(isinstance(x, (int, float, list)) for x in batch):
            raise CalibrationError(f"calibration batch {index} is a Python list of numbers: give token ids as a "
                                   "tensor (torch.tensor(batch)), or a dict of tensors by input name")
        positional = self.positional or ([self.primary] if self.primary is not None else [])
        if len(batch) > len(positional):
            raise CalibrationError(
                f"calibration batch {index} gives {len(batch)} positional inputs, the captured graph takes "
                f"{len(positional)} ({', '.join(i.label for i in positional) or 'none'}); give a dict of inputs by name"
            )
        return dict(zip(positional, batch))

    def _complete(self, given: dict[_Input, Any]) -> dict[str, Any]:
        """Source name -> value for every top-level input: given, derived, or the captured call's."""
        by_name = {i.name: v for i, v in given.items() if i.name is not None}
        if "input_ids" not in by_name and self.primary in given:
            by_name["input_ids"] = given[self.primary]
        env = {i.source: v for i, v in given.items()}
        for node, top in self.inputs.items():
            if top.source in env:
                continue
            example = self.examples[self.placeholders.index(node)]
            if example is None:
                example = node.meta.get("val")  # an exported module's input, for its dtype
            derived = _derived_input(top.name, by_name, example) if top.source == self._user_label(node) else None
            if derived is not None:
                env[top.source] = derived
        return env

    def sequence_length(self, batches: Sequence[Any]) -> int | None:
        """The longest ``[batch, length]`` primary input (token ids) among ``batches``; None when none is one."""
        lengths = [value.shape[1] for k, batch in enumerate(batches) for i, value in self._given(batch, k).items()
                   if i == self.primary and isinstance(value, torch.Tensor) and value.dim() == 2]
        return max(lengths, default=None)

    def fit(self, batches: Sequence[Any]) -> list[Any]:
        """The calibration batches as this graph can run them.

        A graph captured with static shapes runs only on its captured
        ``[batch, length]`` (``model.generate`` compiles the prompt's shape). Batches
        of another shape are re-cut into windows of that shape, their 2-D inputs
        (ids, mask, token types) alike; a row's tail shorter than a window, and
        windows beyond a whole batch, are dropped (the warning counts them).
        """
        primary = self.primary
        node = next((n for n, i in self.inputs.items() if i == primary and self._user_label(n) == i.source), None)
        expected = None if node is None else node.meta.get("example_value", node.meta.get("val"))
        if not isinstance(expected, torch.Tensor) or expected.dim() != 2 or any(
                isinstance(d, torch.SymInt) for d in expected.shape):
            return list(batches)
        shape = tuple(expected.shape)
        for k, batch in enumerate(batches):  # before re-cutting, which keeps only the inputs the graph takes
            self._check_extra_keys(batch, k)
        named = [{i.name: v for i, v in self._given(b, k).items()} for k, b in enumerate(batches)]
        ids = [b.get(primary.name) for b in named]
        if all(isinstance(t, torch.Tensor) and tuple(t.shape) == shape for t in ids):
            return list(batches)
        rows, length = shape
        windows: dict[str, list[torch.Tensor]] = {}
        for batch, batch_ids in zip(named, ids):
            if not isinstance(batch_ids, torch.Tensor) or batch_ids.dim() != 2:
                return list(batches)  # not token batches: bind() reports what does not fit
            if expected.is_floating_point() and batch_ids.shape[1] != length:
                return list(batches)  # [rows, features]: a row is no window of tokens; bind() names the width
            usable = batch_ids.shape[1] // length * length
            for key, value in batch.items():
                if isinstance(value, torch.Tensor) and value.shape[:2] == batch_ids.shape:
                    windows.setdefault(key, []).extend(value[:, :usable].reshape(-1, length))
        count = len(windows.get(primary.name, [])) // rows
        window, item, unit = (("rows", "features", "values") if expected.is_floating_point() else
                              ("windows", "tokens", "token positions"))
        if count == 0:
            raise CalibrationError(
                f"the graph was captured for inputs of shape {shape} and the calibration batches hold fewer than "
                f"{rows} {window} of {length} {item}; give more calibration data or compile with dynamic=True"
            )
        given = sum(t.numel() for t in ids)
        log.warning("graph captured for the static shape %s: calibration re-cut into %d batches of that shape, "
                    "using %d of the %d %s given (compile with dynamic=True to calibrate on the batches as given)",
                    shape, count, count * rows * length, given, unit)
        return [{key: torch.stack(parts[k * rows:(k + 1) * rows]) for key, parts in windows.items()} for k in range(count)]

    def _user_value(self, node: fx.Node, env: Mapping[str, Any]) -> Any:
        """The value of one user placeholder; the captured call's when the batch neither gives nor implies it."""
        if self.inputs[node].source not in env:
            example = self.examples[self.placeholders.index(node)]
            if example is None and isinstance(node.meta.get("val"), torch.Tensor):
                raise _Missing(self.inputs[node].source)  # an exported module's tensor input
            return example
        grapharg = node.meta.get("grapharg")
        return _resolve(grapharg.source, env) if grapharg is not None else env[self.inputs[node].source]

    def bind(self, batch: Any, index: int = 0) -> list[Any]:
        """Graph arguments for one calibration batch; a clear error when it does not fit.

        User tensors are bound first: symbolic sizes (which Dynamo places before
        the tensor they measure) are then read off the bound tensors.
        """
        env = self._complete(self._given(batch, index))
        args: list[Any] = list(self.examples)
        bound: dict[str, Any] = {}  # user input source name -> value
        for phase in (_ROLE_USER, _ROLE_SIZE):
            for i, (node, role) in enumerate(zip(self.placeholders, self.roles)):
                if role != phase:
                    continue
                try:
                    if role == _ROLE_USER:
                        args[i] = self._check_tensor(node, self._user_value(node, env), index)
                        bound[self._user_label(node)] = args[i]
                    else:
                        args[i] = _resolve(node.meta["grapharg"].source, {**env, **bound})
                except (_Missing, KeyError, IndexError) as err:
                    raise CalibrationError(
                        f"calibration batch {index} does not give the graph input {self._user_label(node)!r}; "
                        f"the graph was captured with inputs {', '.join(self._labels())}. "
                        "Give calibration batches with the same inputs as the compiled call."
                    ) from err
        self._check_extra_keys(batch, index)
        return args

    def _check_tensor(self, node: fx.Node, value: Any, index: int) -> Any:
        expected = node.meta.get("example_value", node.meta.get("val"))
        if not isinstance(value, torch.Tensor) or not isinstance(expected, torch.Tensor):
            return value
        label = self.inputs[node].label
        integers = not (value.is_floating_point() or value.is_complex() or expected.is_floating_point()
                        or expected.is_complex() or torch.bool in (value.dtype, expected.dtype))
        if value.dtype != expected.dtype and integers and torch.iinfo(value.dtype).bits <= torch.iinfo(expected.dtype).bits:
            value = value.to(expected.dtype)  # e.g. int32 token ids for a graph captured with int64: exact
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
        if not isinstance(batch, Mapping):
            return
        taken = {i.name for i in self.inputs.values()}
        extra = [k for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in taken
                 and not (k == "attention_mask" and bool((v == 1).all()))]  # no padding: the same as no mask
        if extra:
            padded = (" (its attention_mask marks padding, which the graph cannot see)" if "attention_mask" in extra
                      else "")
            raise CalibrationError(
                f"calibration batch {index} gives {extra}, which the captured graph does not take{padded} "
                f"(its inputs: {', '.join(self._labels())}); call the compiled "
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

    def call(self, args: Sequence[Any]) -> Any:
        """Run the graph on :meth:`bind`'s arguments; an exported module in the structure it was exported with."""
        spec = getattr(self.gm, "_in_spec", None)
        if spec is None:
            return self.gm(*args)
        call_args, call_kwargs = pytree.tree_unflatten(list(args), spec)
        return self.gm(*call_args, **call_kwargs)

    @torch.no_grad()
    def run(self, batch: Any, index: int = 0, overrides: Mapping[LinearNode, torch.Tensor] | None = None) -> Any:
        args = self.bind(batch, index)
        with self._weights(args, overrides or {}):
            return self.call(args)
