"""Analysis pass: find every matmul-with-a-weight node and name it by module path.

Recognised forms: ``F.linear`` / ``aten.linear`` (weight ``[out, in]``),
``x @ W.T`` (Falcon's ``FalconLinear``; a bias added after it stays the graph's
own add), ``addmm(bias, x, W[in, out])`` (HF ``Conv1D``, GPT-2) and
``call_module`` of an ``nn.Linear`` (``symbolic_trace``). Each found node gets a
:class:`~lrcompile.types.LinearMeta` under ``node.meta["lowrank"]``; a node that
is found but may not be compressed says why in ``skip_reason``.
"""

from __future__ import annotations

import fnmatch
import inspect
import logging
import operator
import re
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from lrcompile.config import DEFAULT_EXCLUDE, MOE_ROUTERS, OUTPUT_HEADS
from lrcompile.errors import LowRankError
from lrcompile.types import FACTOR_OF_KEY, META_KEY, LinearMeta, WeightLayout

log = logging.getLogger(__name__)

LINEAR_TARGETS = (torch._C._nn.linear, F.linear, torch.ops.aten.linear.default)
ADDMM_TARGETS = (torch.addmm, torch.ops.aten.addmm.default)
MATMUL_TARGETS = (operator.matmul, torch.matmul, torch.ops.aten.mm.default)
WEIGHT_SOURCE = "._parameters['weight']"  # the end of a Dynamo source naming a module's weight
EMBEDDING_LOOKUPS = (F.embedding, torch.ops.aten.embedding.default)  # (ids, table) and (table, ids)
_MODULE_PATH = re.compile(r"_modules\['([^']*)'\]")
_PARAMETER_SOURCE = re.compile(r"^L\['([^']+)'\]((?:\[\d+\])*)((?:\._modules\['[^']+'\])+)\._parameters\['[^']+'\]$")


@dataclass(frozen=True)
class LinearNode:
    """Structural view of a linear node: where its input, weight and bias come from."""

    node: fx.Node
    layout: WeightLayout
    weight: fx.Node | None  # None for call_module (the weight lives on the module)
    bias: fx.Node | None

    @property
    def input(self) -> fx.Node:
        """The node feeding the layer now: read from its arguments, since rewriting an earlier linear
        (``Linear -> Linear``) replaces the node this one reads."""
        return self.node.args[1 if self.node.target in ADDMM_TARGETS else 0]

    @property
    def meta(self) -> LinearMeta:
        return self.node.meta[META_KEY]


def _transposed_source(node: Any) -> fx.Node | None:
    """``W`` of ``W.T`` / ``W.t()`` / ``torch.t(W)`` / ``W.transpose(0, 1)`` (or their aten ops, as ``make_fx``
    and AOT graphs hold them) when ``W`` is a parameter node."""
    if not isinstance(node, fx.Node) or len(node.users) != 1 or node.op not in ("call_function", "call_method"):
        return None
    if node.target is getattr and node.args[1:] == ("T",):
        source = node.args[0]
    elif node.target in ("t", torch.t, torch.ops.aten.t.default, torch.ops.aten.numpy_T.default):
        source = node.args[0]
    elif node.target in ("transpose", torch.ops.aten.transpose.int) and set(node.args[1:]) in ({0, 1}, {-2, -1}):
        source = node.args[0]
    elif node.target is torch.ops.aten.permute.default and list(node.args[1]) == [1, 0]:
        source = node.args[0]
    else:
        return None
    if not isinstance(source, fx.Node) or len(source.users) != 1:
        return None
    is_parameter = source.op == "get_attr" or (source.op == "placeholder" and "grapharg" in source.meta)
    return source if is_parameter else None


def linear_view(gm: fx.GraphModule, node: fx.Node) -> LinearNode | None:
    """The :class:`LinearNode` of ``node``, or None when it is no recognised linear."""
    if node.op == "call_function" and node.target in LINEAR_TARGETS:
        args = list(node.args) + [None] * (3 - len(node.args))
        weight = node.kwargs.get("weight", args[1])
        bias = node.kwargs.get("bias", args[2])
        if isinstance(args[0], fx.Node) and isinstance(weight, fx.Node):
            return LinearNode(node, WeightLayout.LINEAR, weight, bias)
    elif node.op == "call_function" and node.target in ADDMM_TARGETS and len(node.args) == 3:
        bias, x, weight = node.args
        transposed = _transposed_source(weight)
        if all(isinstance(a, fx.Node) for a in (bias, x, weight)):  # addmm(b, x, W.t()): linear(x, W, b), as AOT has it
            return LinearNode(node, WeightLayout.ADDMM, weight, bias) if transposed is None else \
                LinearNode(node, WeightLayout.LINEAR, transposed, bias)
    elif node.op == "call_function" and node.target in MATMUL_TARGETS and len(node.args) == 2 and not node.kwargs:
        x, transposed = node.args
        weight = _transposed_source(transposed)
        if isinstance(x, fx.Node) and weight is not None:  # x @ W.T: F.linear(x, W) without bias (Falcon)
            return LinearNode(node, WeightLayout.LINEAR, weight, None)
    elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear):
        return LinearNode(node, WeightLayout.MODULE, None, None)
    return None


@dataclass(frozen=True)
class ModuleSlot:
    """Where a layer's module sits in the model (``root``): ``getattr(parent, name)``."""

    root: nn.Module
    parent: nn.Module
    name: str

    @property
    def module(self) -> nn.Module:
        return getattr(self.parent, self.name)

    def replace(self, module: nn.Module) -> None:
        setattr(self.parent, self.name, module)


def _slot(root: Any, path: list[str]) -> ModuleSlot | None:
    parent = root
    for part in path[:-1]:
        parent = getattr(parent, part, None)
    return ModuleSlot(root, parent, path[-1]) if isinstance(parent, nn.Module) and hasattr(parent, path[-1]) else None


@dataclass(frozen=True)
class CapturedFrame:
    """The Python frame Dynamo is compiling into a graph."""

    name: str  # its code's name: ``forward``, or Dynamo's ``torch_dynamo_resume_in_...`` after a graph break
    location: str  # ``file:line`` of that code
    locals: Mapping[str, Any]  # where the graph's ``L[...]`` sources live
    after_graph_break: bool  # it runs inside code Dynamo compiled: its inputs are the model's intermediate values

    @property
    def description(self) -> str:
        """``'name' (file:line)``, and the model function a wrapper frame calls: Dynamo compiles the outermost frame
        it is given, which for a transformers model is often a decorator's (``wrapped_func``), not ``forward``."""
        called = getattr(self.args_callee, "__qualname__", None)
        calls = f", which calls {called}" if called and called.rsplit(".", 1)[-1] != self.name else ""
        return f"{self.name!r} ({self.location}){calls}"

    @property
    def args_callee(self) -> Callable[..., Any] | None:
        """The function this frame hands its ``*args`` to, whose signature names them: a decorator's wrapped
        ``func`` (transformers wraps ``forward`` so; bound to the frame's ``self``, or unbound with the model as
        ``args[0]``), or ``self.forward`` in ``Module._call_impl``; None for another frame."""
        if not isinstance(self.locals.get("args"), tuple):
            return None
        func, module = self.locals.get("func"), self.locals.get("self")
        if not isinstance(module, nn.Module):
            return func if inspect.isfunction(func) else None
        return func.__get__(module) if inspect.isfunction(func) else module.forward


def captured_frame(gm: fx.GraphModule) -> CapturedFrame | None:
    """The frame Dynamo is compiling into ``gm``, or None for a graph Dynamo did not capture.

    A frame that starts inside another compiled frame's code (the rest of a call a graph break split, or a
    submodule's ``forward`` called between two graphs) takes intermediate values as its inputs, not the
    model's. Dynamo's private API (the tracer and the set of code objects it emitted), checked on torch
    2.11-2.13; used nowhere else."""
    if not any("grapharg" in n.meta for n in gm.graph.nodes if n.op == "placeholder"):
        return None
    try:
        from torch._dynamo.convert_frame import output_codes
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        caller = sys._getframe(1)
        while caller is not None and caller.f_code not in output_codes:
            caller = caller.f_back
        code = tx.f_code
        return CapturedFrame(code.co_name, f"{code.co_filename}:{code.co_firstlineno}", tx.f_locals, caller is not None)
    except Exception as err:  # noqa: BLE001  (any change of that API)
        raise LowRankError(
            f"cannot read the compiled frame from Dynamo ({type(err).__name__}: {err}), whose locals name the "
            f"model's modules; this torch ({torch.__version__}) is outside the versions lrcompile supports "
            "(pyproject.toml), or the graph is compressed outside a Dynamo backend call"
        ) from err


def weight_owner(gm: fx.GraphModule, view: LinearNode, frame_locals: Mapping[str, Any] | None) -> ModuleSlot | None:
    """The module holding the layer's weight (see :func:`parameter_owner`)."""
    if view.layout is WeightLayout.MODULE:
        return _slot(gm, str(view.node.target).split("."))
    return parameter_owner(gm, view.weight, frame_locals)


def parameter_owner(gm: fx.GraphModule, node: fx.Node, frame_locals: Mapping[str, Any] | None) -> ModuleSlot | None:
    """The module holding the parameter ``node`` reads: in ``gm`` (``symbolic_trace``, ``torch.export``), or
    named by the Dynamo source of its placeholder (``L['self']._modules['model']...``, ``L['args'][0]._modules[...]``
    under a decorator) among the captured frame's locals."""
    if node.op == "get_attr":
        path = str(node.target).split(".")
        return _slot(gm, path[:-1]) if len(path) > 1 else None
    grapharg = node.meta.get("grapharg")
    match = _PARAMETER_SOURCE.match(grapharg.source.name) if grapharg is not None else None
    if match is None or frame_locals is None or match.group(1) not in frame_locals:
        return None
    root = frame_locals[match.group(1)]
    for index in re.findall(r"\d+", match.group(2)):
        root = root[int(index)]
    return _slot(root, _MODULE_PATH.findall(match.group(3)))


def attribute_reads(root: nn.Module, rewritten: fx.GraphModule) -> dict[int, str]:
    """Parameters and buffers that the generated code of an ``fx.GraphModule`` inside ``root`` (a
    ``torch.export(...).module()``, say) reads by attribute, by ``id``, with that module's path; the graph being
    ``rewritten`` is left out, since its reads are rewritten with it."""
    reads = {}
    for path, module in root.named_modules():
        if not isinstance(module, fx.GraphModule) or module is rewritten:
            continue
        for node in module.graph.nodes:
            if node.op == "get_attr":
                reads[id(_get_attr(module, node.target))] = path
    return reads


def replacement_breaks(view: LinearNode, slot: ModuleSlot, dynamo: bool, reads: Mapping[int, str]) -> str:
    """Why replacing the layer's module (``slot``) by a compressed one would break the model's own code, or
    ``""``. The module's parameters must be read only by its own ``forward``: in a Dynamo graph the layer's op
    runs inside that module (its ``nn_module_stack`` ends there), and no generated code of another
    ``fx.GraphModule`` (``reads``, from :func:`attribute_reads`) reads them by attribute. Otherwise the
    first call would work and every later one fail on the missing ``weight``."""
    module = slot.module
    reader = next((reads[id(p)] for p in module.parameters(recurse=False) if id(p) in reads), None)
    if reader is not None:
        where = f"its fx.GraphModule {reader!r}" if reader else "the model, an fx.GraphModule"
        return (f"its weight is read by the generated code of {where} (e.g. a torch.export(...).module()), which "
                "replacing the module would break; compress such a module with the pass-level API, or compile the "
                "model it was exported from")
    if not dynamo or view.layout is WeightLayout.MODULE:
        return ""
    stack = list((view.node.meta.get("nn_module_stack") or {}).values())
    owner = type(module)
    if stack and stack[-1][1] in (owner, f"{owner.__module__}.{owner.__qualname__}"):
        return ""
    caller = f"{stack[-1][1].__name__ if isinstance(stack[-1][1], type) else stack[-1][1]} " \
             f"{module_path(stack[-1][0])!r}" if stack else "the model's own"
    return (f"its weight is read outside its module's forward (by {caller} forward), which replacing the module "
            "would break")


def unrecognised_linears(gm: fx.GraphModule, linears: Sequence[LinearNode],
                         frame_locals: Mapping[str, Any] | None) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules (subclasses included), by module path, whose weight ``gm`` reads other than
    as a recognised linear (e.g. in an einsum): they stay dense. Found where the graph's parameter sources lead
    to the model's modules (Dynamo); a ``symbolic_trace`` graph keeps such a weight on a plain ``Module``."""
    recognised = {view.weight for view in linears if view.layout is not WeightLayout.MODULE}
    found = {}
    for node in gm.graph.nodes:
        if node in recognised:
            continue
        grapharg = node.meta.get("grapharg") if node.op == "placeholder" else None
        if node.op == "get_attr" and str(node.target).endswith(".weight"):
            path = str(node.target).removesuffix(".weight")
        elif grapharg is not None and grapharg.source.name.endswith(WEIGHT_SOURCE):
            path = module_path(grapharg.source.name.removesuffix(WEIGHT_SOURCE))
        else:
            continue
        slot = parameter_owner(gm, node, frame_locals)
        if slot is not None and isinstance(slot.module, nn.Linear):
            found[path] = slot.module
    return found


@dataclass(frozen=True)
class UnrecognisedWeight:
    """A parameter of two or more dimensions the graph reads other than as a recognised linear or an embedding
    table (MoE experts stacked in one 3-D tensor, a weight in a matmul): it stays dense."""

    path: str  # module path and parameter name
    shape: tuple[int, ...]
    ops: tuple[str, ...]  # what reads it

    def describe(self) -> str:
        return f"{self.path} {list(self.shape)} ({', '.join(self.ops)})"


def unrecognised_weights(gm: fx.GraphModule, linears: Sequence[LinearNode], values: Mapping[fx.Node, Any],
                         unrecognised_modules: Collection[str]) -> list[UnrecognisedWeight]:
    """Parameters of two or more dimensions that no recognised linear or embedding lookup reads, apart from the
    weights of ``unrecognised_modules`` (``nn.Linear`` modules, named by :func:`unrecognised_linears`)."""
    recognised = {view.weight for view in linears if view.layout is not WeightLayout.MODULE}
    found = []
    for node in gm.graph.nodes:
        grapharg = node.meta.get("grapharg") if node.op == "placeholder" else None
        match = None if grapharg is None else _PARAMETER_SOURCE.match(grapharg.source.name)
        value = values.get(node)
        if match is None or node in recognised or not isinstance(value, torch.Tensor) or value.dim() < 2:
            continue
        if any(user.target in EMBEDDING_LOOKUPS for user in node.users):
            continue
        if all(str(user.target).startswith("lowrank.") for user in node.users):  # compressed already (latent K/V)
            continue
        module = ".".join(_MODULE_PATH.findall(match.group(3)))
        if module in unrecognised_modules:
            continue
        name = grapharg.source.name.rpartition("['")[2].rstrip("']")
        ops = tuple(dict.fromkeys(getattr(user.target, "__name__", str(user.target)) for user in node.users))
        found.append(UnrecognisedWeight(f"{module}.{name}", tuple(value.shape), ops))
    return found


def placeholder_values(gm: fx.GraphModule, example_inputs: list[Any] | None) -> dict[fx.Node, Any]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return dict(zip(placeholders, example_inputs or ()))


def weight_tensor(gm: fx.GraphModule, view: LinearNode, values: dict[fx.Node, Any]) -> torch.Tensor:
    """The layer's weight as stored (``[in, out]`` for addmm, ``[out, in]`` otherwise)."""
    if view.layout is WeightLayout.MODULE:
        return gm.get_submodule(view.node.target).weight
    weight = node_constant(gm, view.weight, values)
    if weight is None:
        raise ValueError(f"weight of {view.node.name} is computed in the graph, not a parameter")
    return weight


def node_constant(gm: fx.GraphModule, node: fx.Node, values: dict[fx.Node, Any]) -> Any:
    """The value of a ``get_attr`` node or of a placeholder in ``values`` (a parameter, buffer or input);
    None for a node the graph computes."""
    if node.op == "get_attr":
        return _get_attr(gm, node.target)
    return values.get(node) if node.op == "placeholder" else None


def dense_weight(gm: fx.GraphModule, view: LinearNode, values: dict[fx.Node, Any]) -> torch.Tensor:
    """The weight in linear layout ``[out, in]``."""
    weight = weight_tensor(gm, view, values)
    return weight.T if view.layout is WeightLayout.ADDMM else weight


def _get_attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def layer_name(view: LinearNode) -> str:
    """Module path of the layer, from the weight's Dynamo source, get_attr target or module."""
    if view.layout is WeightLayout.MODULE:
        return str(view.node.target)
    if view.weight.op == "get_attr":
        return str(view.weight.target).removesuffix(".weight")
    grapharg = view.weight.meta.get("grapharg")
    if grapharg is not None:
        parts = _MODULE_PATH.findall(grapharg.source.name)
        if parts:
            return ".".join(parts)
        parameter = re.search(r"\._parameters\['([^']+)'\]$", grapharg.source.name)
        if parameter:  # a parameter of the model itself
            return parameter.group(1)
    stack = view.node.meta.get("nn_module_stack")
    if stack:
        return module_path(list(stack.values())[-1][0]) or view.node.name
    return view.node.name


def module_path(source: str) -> str:
    """``model.layers.0.self_attn`` from a Dynamo source naming a module: ``L['self']._modules['model']...``, or
    ``L['args'][0].model.layers.0.self_attn`` (a forward wrapped by a decorator taking ``*args``)."""
    return ".".join(_MODULE_PATH.findall(source)) or re.sub(r"^L\['[^']*'\](\[\d+\])?\.?", "", source)


def _skip_reason(gm: fx.GraphModule, view: LinearNode, weight: torch.Tensor, name: str, include, exclude) -> str:
    if FACTOR_OF_KEY in view.node.meta:
        return f"a factor of {view.node.meta[FACTOR_OF_KEY]} (compressed already)"
    if not any(fnmatch.fnmatchcase(name, p) for p in include):
        return "not matched by include patterns"
    matched = next((p for p in exclude if fnmatch.fnmatchcase(name, p)), None)
    if matched is not None:
        return f"excluded by pattern {matched!r}" + (" (the output head, by default)" * (matched in OUTPUT_HEADS)
                                                     + " (an MoE router, by default)" * (matched in MOE_ROUTERS))
    if weight.dim() != 2 or not weight.is_floating_point():
        return f"weight is not a 2-D float matrix ({tuple(weight.shape)}, {weight.dtype})"
    if view.layout is WeightLayout.MODULE:
        if sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == view.node.target) > 1:
            return "module is called more than once"
        if sum(p is weight for _, p in gm.named_parameters(remove_duplicate=False)) > 1:
            return "weight is shared with another module (tied weights)"
    elif len(view.weight.users) > 1:
        return "weight is read by another op too (tied weights, or a module called more than once)"
    if view.layout is WeightLayout.ADDMM and (view.node.kwargs.get("beta", 1) != 1 or view.node.kwargs.get("alpha", 1) != 1):
        return "addmm with beta/alpha other than 1 is not recognised"
    return ""


def find_linears(
    gm: fx.GraphModule,
    example_inputs: list[Any] | None = None,
    include: tuple[str, ...] = ("*",),
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
) -> list[LinearNode]:
    """Annotate every linear node of ``gm`` with a :class:`LinearMeta`; return them in graph order. By default, as
    in ``LowRankConfig``, the output head is excluded."""
    values = placeholder_values(gm, example_inputs)
    found = []
    for node in gm.graph.nodes:
        view = linear_view(gm, node)
        if view is None:
            continue
        try:
            weight = weight_tensor(gm, view, values)
        except ValueError as err:
            log.info("linear %s left alone: %s", node.name, err)
            continue
        name = layer_name(view)
        out_f, in_f = (weight.shape[1], weight.shape[0]) if view.layout is WeightLayout.ADDMM else weight.shape[:2]
        reason = _skip_reason(gm, view, weight, name, include, exclude)
        node.meta[META_KEY] = LinearMeta(
            name=name,
            layout=view.layout,
            out_features=int(out_f),
            in_features=int(in_f),
            has_bias=view.bias is not None or (view.layout is WeightLayout.MODULE and gm.get_submodule(node.target).bias is not None),
            weight_dtype=weight.dtype,
            compressible=not reason,
            skip_reason=reason,
        )
        found.append(view)
    log.info("found %d linear nodes, %d compressible", len(found), sum(v.meta.compressible for v in found))
    return found
