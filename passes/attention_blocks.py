"""Analysis pass: recognise RoPE attention blocks in a Dynamo graph of an HF decoder.

A block is matched structurally, from the attention op back to the projections
and forward to the output projection (Llama, Mistral and Qwen2 share this
code in transformers):

* q/k/v projections ``linear(x)`` split into heads, ``view(B, T, -1, D).transpose(1, 2)``;
* RoPE on q and k, ``x * cos + rotate_half(x) * sin`` with ``cos``/``sin`` from
  the model's rotary embedding, ``cat(p * inv_freq, p * inv_freq).cos() * scale``;
* optionally the GQA repeat ``x[:, :, None].expand(...).reshape(...)``, or the
  runtime cache's marker op in between (:mod:`lrcompile.kernels.latent_cache`);
* ``scaled_dot_product_attention``, or eager ``softmax(q k^T * s + mask) v``;
* the head merge ``transpose(1, 2) ... reshape(B, T, -1)`` into the output projection.

Anything else is left alone and reported with the reason it did not match.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from lrcompile.types import LinearMeta

from .find_linears import LinearNode, module_path

log = logging.getLogger(__name__)

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention,
                torch.ops.aten.scaled_dot_product_attention.default)
SOFTMAX_TARGETS = (F.softmax, torch.softmax, torch.Tensor.softmax)
MARKER = torch.ops.lowrank.latent_cache_marker.default
GROUPED_UP = torch.ops.lowrank.grouped_up_projection.default
DENSE_CACHE = ("K/V go to a dense KV cache (use_cache=True without lrcompile.LatentKVCache): compress with "
               "use_cache=False first, or generate with lrcompile.generate / a LatentKVCache")
_VIEW_METHODS = ("view", "reshape")


class NoMatch(Exception):
    """The structure around an attention op is not the one this pass knows."""


@dataclass(frozen=True)
class GroupedProjectionNode:
    """A K or V projection already restructured (``GroupedLowRankProjection``):
    ``grouped_up_projection(linear(x, down), up, bias)``; ``latent`` is the down linear."""

    node: fx.Node
    latent: LinearNode
    up: fx.Node
    bias: fx.Node | None

    @property
    def input(self) -> fx.Node:
        return self.latent.input

    @property
    def meta(self) -> LinearMeta:
        return self.latent.meta


Projection = LinearNode | GroupedProjectionNode


@dataclass
class AttentionBlock:
    """One recognised attention block; nodes belong to the graph it was found in.

    K and V are dense linears (a block to restructure) or both grouped
    projections (a block restructured earlier, read back from the model).
    """

    name: str  # module path, e.g. "model.layers.0.self_attn"
    q_linear: Projection  # the query projection, whose weights weigh K's errors (passes.kv_metrics)
    k_linear: Projection
    v_linear: Projection
    o_linear: LinearNode
    query: fx.Node  # RoPE'd query [B, Hq, T, D] as fed to attention
    attention: fx.Node  # SDPA node, or the value matmul of eager attention
    merged: fx.Node  # [B, T, Hq * D], the output projection's input
    mask: fx.Node | None
    is_causal: bool
    scale: float
    inv_freq: fx.Node
    positions: fx.Node  # position ids [1 or B, T]
    rope_scale: float
    num_heads: int
    num_kv_heads: int
    head_dim: int
    marker: fx.Node | None = None  # the latent cache's marker, when the graph writes a cache
    cache_slots: object = None  # attention reads only the first n cache slots (int or SymInt node), else all

    @property
    def restructured(self) -> bool:
        return isinstance(self.k_linear, GroupedProjectionNode)


@dataclass(frozen=True)
class UnmatchedAttention:
    name: str
    reason: str
    cache_marker: bool = False  # a latent cache marker no recognised block consumes: the graph cannot run


def _tensor_value(node: fx.Node) -> torch.Tensor | None:
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def _shape(node: fx.Node) -> tuple[int, ...]:
    value = _tensor_value(node)
    if value is None:
        raise NoMatch(f"node {node.name} has no tensor metadata")
    return tuple(value.shape)


def _is_fn(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _is_method(node, *names) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def _strip_casts(node: fx.Node) -> fx.Node:
    while _is_method(node, "to", "float", "type"):
        node = node.args[0]
    return node


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _mul_operands(node: fx.Node) -> tuple[object, object]:
    if not _is_fn(node, operator.mul, torch.mul):
        raise NoMatch(f"{node.name} is not a multiplication")
    return node.args[0], node.args[1]


def _known_form(node: fx.Node, depth: int = 8) -> str:
    """Name a form the restructuring does not support among the ops between ``node`` and the projections before
    it (``""`` if none seen)."""
    seen, frontier = set(), [node]
    for _ in range(depth):
        frontier = [n for f in frontier for n in f.all_input_nodes if n not in seen]
        seen.update(frontier)
        frontier = [n for n in frontier if not _is_projection(n)]
    if any(_is_fn(n, torch.rsqrt, F.layer_norm, F.rms_norm) or _is_method(n, "rsqrt") for n in seen):
        return ("; a normalisation is applied to each head after the projection (a q/k norm, as Qwen3, OLMo-2 and "
                "Gemma 3 have), which a latent cache cannot hold")
    if any(_is_fn(n, operator.getitem) and any(isinstance(i, slice) and i.step == 2 for i in
                                                (n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)))
           for n in seen):
        return ("; RoPE rotates interleaved pairs (x[..., ::2], x[..., 1::2], as GPT-J and Cohere do); only "
                "rotate_half RoPE is restructured")
    if any(_is_method(n, "chunk", "split", "split_with_sizes") or _is_fn(n, torch.chunk, torch.split)
           or (_is_fn(n, operator.getitem) and _is_projection(_through_views(n.args[0]))) for n in seen):
        return ("; K and V are cut from one fused projection (a qkv_proj or query_key_value, as Phi-3, GPT-NeoX and "
                "Falcon have); only separate K and V projections are restructured")
    return ""


def _through_views(node: object) -> object:
    while _is_method(node, *_VIEW_METHODS):
        node = node.args[0]
    return node


def _is_projection(node: object) -> bool:
    return isinstance(node, fx.Node) and (node.op == "call_module" or _is_fn(node, F.linear, torch.addmm, torch.matmul,
                                                                             operator.matmul))


def _head_split(node: fx.Node, linears: dict[fx.Node, Projection]) -> Projection:
    """``linear(x).view(B, T, -1, D).transpose(1, 2)`` -> the linear."""
    if not (_is_method(node, "transpose") and sorted(node.args[1:3]) == [1, 2]):
        raise NoMatch(f"{node.name} is not the head transpose of a projection{_known_form(node)}")
    view = node.args[0]
    if not _is_method(view, *_VIEW_METHODS) or view.args[0] not in linears:
        raise NoMatch(f"{node.name} does not split a projection into heads{_known_form(node)}")
    return linears[view.args[0]]


def _dtype(node: fx.Node) -> torch.dtype | None:
    value = _tensor_value(node)
    return None if value is None else value.dtype


def _rope_operands(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
    """``x * cos + rotate_half(x) * sin`` -> ``(x, cos, sin)``; also under a cast back to ``x``'s dtype (OLMo's
    ``.to(q.dtype)``) and as ``cat(rotated, x[..., D:])`` with an empty pass-through (transformers' partial-rotary
    code at ``partial_rotary_factor`` 1)."""
    output = node
    node = _strip_casts(node)
    parts = node.args[0] if _is_fn(node, torch.cat) and node.args else ()
    if isinstance(parts, (list, tuple)) and len(parts) == 2 and _is_fn(parts[0], operator.add, torch.add):
        if _shape(parts[1])[-1] != 0:
            raise NoMatch(f"{node.name} applies RoPE as cat(rotated part, pass-through part) of each head (partial "
                          "rotary, as GPT-NeoX and StableLM do by default); only RoPE over the whole head is restructured")
        node = parts[0]
    if not _is_fn(node, operator.add, torch.add) or len(node.args) != 2:
        raise NoMatch(f"{node.name} has no RoPE (x * cos + rotate_half(x) * sin); only RoPE attention is "
                      f"restructured{_known_form(node)}")
    for plain, rotated in (node.args, node.args[::-1]):
        try:
            a, b = _mul_operands(plain)
            c, d = _mul_operands(rotated)
        except NoMatch:
            continue
        for x, cos in ((a, b), (b, a)):
            for half, sin in ((c, d), (d, c)):
                if _is_rotate_half(half, x):
                    x = _whole_head(x)
                    if _dtype(output) != _dtype(x):
                        raise NoMatch(f"{output.name} casts the rotated heads to {_dtype(output)} from the "
                                      f"projection's {_dtype(x)}; a latent cache keeps the projection's dtype")
                    return x, cos, sin
    raise NoMatch(f"{node.name} has no RoPE (x * cos + rotate_half(x) * sin); only RoPE attention is "
                  f"restructured{_known_form(node)}")


def _whole_head(x: fx.Node) -> fx.Node:
    """``heads[..., :D]`` over a head dim of ``D`` (the rotated part at partial_rotary_factor 1) -> ``heads``."""
    if not _is_fn(x, operator.getitem) or not isinstance(x.args[0], fx.Node):
        return x
    index = x.args[1][-1] if isinstance(x.args[1], tuple) else x.args[1]
    if (isinstance(index, slice) and index.start in (None, 0) and index.step in (None, 1)
            and index.stop is not None and index.stop >= _shape(x.args[0])[-1] and _shape(x) == _shape(x.args[0])):
        return x.args[0]
    return x


def _is_rotate_half(node, x: fx.Node) -> bool:
    """``cat((-x[..., h:], x[..., :h]), -1)``."""
    if not _is_fn(node, torch.cat):
        return False
    parts = node.args[0]
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not _is_fn(parts[0], operator.neg):
        return False
    upper, lower = parts[0].args[0], parts[1]
    if not (_is_fn(upper, operator.getitem) and _is_fn(lower, operator.getitem)):
        return False
    if upper.args[0] is not x or lower.args[0] is not x:
        return False
    up, low = upper.args[1], lower.args[1]
    up, low = (up[-1] if isinstance(up, tuple) else up), (low[-1] if isinstance(low, tuple) else low)
    half = _shape(x)[-1] // 2
    return (isinstance(up, slice) and isinstance(low, slice) and up.start == half and up.stop is None
            and low.start in (None, 0) and low.stop == half)


def _number(arg: object) -> float | None:
    """A Python number, or a node holding a symbolic one (``torch.compile(dynamic=True)`` lifts a module's float
    attributes, e.g. ``attention_scaling``, to graph inputs) taken at its value when captured; else None."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg)
    value = arg.meta.get("example_value") if isinstance(arg, fx.Node) else None
    if isinstance(value, (torch.SymFloat, torch.SymInt)) and value.node.has_hint():
        return float(value.node.hint)
    return None


def _rotary_table(node: fx.Node, fn: str) -> tuple[fx.Node, float]:
    """``(emb.<fn>() * scale).to(dtype).unsqueeze(1)`` -> ``(emb, scale)``."""
    if not (_is_method(node, "unsqueeze") and _arg(node, 1, "dim") == 1):
        raise NoMatch(f"rotary table {node.name} is not unsqueezed on the head dim")
    node = _strip_casts(node.args[0])
    scale = 1.0
    if _is_fn(node, operator.mul, torch.mul):
        a, b = node.args
        scale_b = _number(b)
        node, scale = (a, scale_b) if scale_b is not None else (b, _number(a))
        if scale is None or not isinstance(node, fx.Node):
            raise NoMatch("rotary table is scaled by a tensor, not a number")
    if not (_is_method(node, fn) or _is_fn(node, getattr(torch, fn))):
        raise NoMatch(f"rotary table {node.name} is not a {fn}")
    return node.args[0], float(scale)


def _rotary_source(cos: fx.Node, sin: fx.Node) -> tuple[fx.Node, fx.Node, float]:
    """``(inv_freq, positions, attention_scaling)`` behind HF's rotary cos/sin."""
    emb, scale = _rotary_table(cos, "cos")
    emb_sin, scale_sin = _rotary_table(sin, "sin")
    if emb_sin is not emb or scale_sin != scale:
        raise NoMatch("cos and sin come from different rotary tables")
    if not _is_fn(emb, torch.cat) or len(emb.args[0]) != 2 or emb.args[0][0] is not emb.args[0][1]:
        raise NoMatch("rotary angles are not cat((freqs, freqs), -1)")
    a, b = _mul_operands(emb.args[0][0])
    for pos, inv in ((a, b), (b, a)):
        pos = _strip_casts(pos)
        if _is_fn(pos, operator.getitem) and pos.args[1] in ((Ellipsis, None),):
            return _strip_casts(inv), pos.args[0], scale
    raise NoMatch("rotary angles are not positions[..., None] * inv_freq")


def _repeat_source(node: fx.Node) -> tuple[fx.Node, int]:
    """HF ``repeat_kv``: ``x[:, :, None].expand(B, Hk, n, T, D).reshape(B, Hk * n, T, D)`` -> ``(x, n)``."""
    if _is_method(node, "reshape") and _is_method(node.args[0], "expand"):
        expand = node.args[0]
        src = expand.args[0]
        if _is_fn(src, operator.getitem) and isinstance(src.args[1], tuple) and None in src.args[1]:
            return src.args[0], _shape(expand)[2]
    return node, 1


def _leading_slots(node: fx.Node):
    """``x[:, :, :n]`` (transformers trims a static cache to the filled slots) -> ``(x, n)``; else ``(node, None)``."""
    if _is_fn(node, operator.getitem) and isinstance(node.args[1], tuple) and len(node.args[1]) == 4:
        index = node.args[1]
        full = slice(None, None, None)
        if index[0] == index[1] == index[3] == full and isinstance(index[2], slice) and index[2].start in (None, 0) \
                and index[2].step is None and index[2].stop is not None:
            return node.args[0], index[2].stop
    return node, None


def _is_sequence_cat(node: object) -> bool:
    """``cat((past, new), dim=-2)`` on ``[B, H, T, D]``: a dense cache's concatenation along the sequence (a cat
    along the head dim is partial rotary's)."""
    if not _is_fn(node, torch.cat):
        return False
    dim = _arg(node, 1, "dim", 0)
    return not (isinstance(dim, int) and dim % len(_shape(node)) == len(_shape(node)) - 1)


def _kv_sources(k_arg: fx.Node, v_arg: fx.Node) -> tuple[fx.Node, fx.Node, int, fx.Node | None, object]:
    """Undo the GQA repeat and the cache marker: ``(k_rope, v_heads, n_rep, marker, slots read or None)``."""
    k_src, k_rep = _repeat_source(k_arg)
    v_src, v_rep = _repeat_source(v_arg)
    if k_rep != v_rep:
        raise NoMatch("K and V are repeated differently")
    if _is_sequence_cat(k_src) or _is_sequence_cat(v_src):
        raise NoMatch(DENSE_CACHE)
    marker = None
    k_src, k_slots = _leading_slots(k_src)
    v_src, v_slots = _leading_slots(v_src)
    if k_slots != v_slots:
        raise NoMatch("K and V read different cache lengths")
    if k_slots is not None and not (_is_fn(k_src, operator.getitem) and _is_fn(k_src.args[0], MARKER)):
        raise NoMatch("attention reads a slice of K that does not come from the latent cache")
    if _is_fn(k_src, operator.getitem) and _is_fn(k_src.args[0], MARKER):
        marker = k_src.args[0]
        if not (_is_fn(v_src, operator.getitem) and v_src.args[0] is marker and (k_src.args[1], v_src.args[1]) == (0, 1)):
            raise NoMatch("K and V do not come from the same latent cache marker")
        k_src, v_src = marker.args[0], marker.args[1]
    return k_src, v_src, k_rep, marker, k_slots


def _sdpa_parts(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node | None, bool, float | None]:
    q, k, v = node.args[:3]
    if _arg(node, 4, "dropout_p", 0.0) not in (0, 0.0):
        raise NoMatch("attention dropout is on")
    given = _arg(node, 6, "scale")
    scale = None if given is None else _number(given)
    if given is not None and scale is None:
        raise NoMatch(f"{node.name}'s scale is not a number")
    return q, k, v, _arg(node, 3, "attn_mask"), bool(_arg(node, 5, "is_causal", False)), scale


def _eager_parts(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node | None, bool, float]:
    """``matmul(dropout(softmax(matmul(q, k.transpose(2, 3)) * s + mask).to(dtype)), v)``."""
    probs, v = node.args
    while _is_method(probs, "to") or _is_fn(probs, F.dropout):
        if _is_fn(probs, F.dropout) and _arg(probs, 1, "p", 0.5) not in (0, 0.0):
            raise NoMatch("attention dropout is on")
        probs = probs.args[0]
    if not (_is_fn(probs, *SOFTMAX_TARGETS) or _is_method(probs, "softmax")) or _arg(probs, 1, "dim") not in (-1, 3):
        raise NoMatch("eager attention probabilities are not a softmax over keys")
    scores, mask = probs.args[0], None
    if _is_fn(scores, operator.add):
        scores, mask = scores.args
    product, scale = _mul_operands(scores)
    scale = _number(scale)
    if scale is None or not _is_fn(product, torch.matmul):
        raise NoMatch("eager attention scores are not matmul(q, k^T) * scale")
    q, kt = product.args
    if not (_is_method(kt, "transpose") and sorted(kt.args[1:3]) == [2, 3]):
        raise NoMatch("eager attention keys are not transposed (2, 3)")
    return q, kt.args[0], v, mask, False, float(scale)


def _merged_heads(node: fx.Node, linears: dict[fx.Node, LinearNode]) -> tuple[fx.Node, LinearNode]:
    """Follow ``transpose(1, 2)``, no-op reshapes and ``contiguous`` to the output projection."""
    out_shape = _shape(node)
    batch, heads, length, head_dim = out_shape
    transposed = False
    while True:
        if node in linears:
            raise NoMatch("output projection reads attention without merging heads")
        users = list(node.users)
        if len(users) != 1:
            raise NoMatch(f"attention output {node.name} has {len(users)} users")
        user = users[0]
        if user in linears:
            if not transposed or _shape(node) != (batch, length, heads * head_dim):
                raise NoMatch("attention heads are not merged as transpose(1, 2).reshape(B, T, -1)")
            return node, linears[user]
        if _is_method(user, "contiguous"):
            pass
        elif _is_method(user, "transpose") and sorted(user.args[1:3]) == [1, 2] and not transposed:
            transposed = True
        elif _is_method(user, *_VIEW_METHODS):
            shape = _shape(user)
            if shape != _shape(node) and not (transposed and shape == (batch, length, heads * head_dim)):
                raise NoMatch(f"unexpected reshape of attention output to {shape}")
        else:
            raise NoMatch(f"attention output goes through {user.target} before the output projection")
        node = user


def _block_name(k_linear: LinearNode) -> str:
    return k_linear.meta.name.rsplit(".", 1)[0] if "." in k_linear.meta.name else k_linear.meta.name


def _module_name(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    return module_path(list(stack.values())[-1][0]) if stack else node.name


def _attention_modules(linears: list[LinearNode]) -> set[str]:
    """Module paths (named like the linears) of the ``*Attention`` modules (by class) that hold a linear of the graph."""
    found = set()
    for view in linears:
        stack = list((view.node.meta.get("nn_module_stack") or {}).values())
        if not stack:
            continue
        depth = len(module_path(stack[-1][0]).split("."))
        for path, cls in stack:
            if getattr(cls, "__name__", str(cls)).endswith("Attention"):
                below = depth - len(module_path(path).split("."))
                found.add(".".join(view.meta.name.split(".")[: -below or None]))
    return found


def match_attention(node: fx.Node, linears: dict[fx.Node, Projection]) -> AttentionBlock:
    """The :class:`AttentionBlock` around attention op ``node``; raises :class:`NoMatch` with the reason."""
    parts = _sdpa_parts(node) if _is_fn(node, *SDPA_TARGETS) else _eager_parts(node)
    q_arg, k_arg, v_arg, mask, is_causal, scale = parts
    q_heads, q_cos, q_sin = _rope_operands(q_arg)  # first: without RoPE, nothing else matters (e.g. GPT-2's cache)
    k_rope, v_heads, n_rep, marker, cache_slots = _kv_sources(k_arg, v_arg)
    if any(user.op == "output" for node in (k_rope, v_heads) for user in node.users):
        raise NoMatch(DENSE_CACHE)
    k_heads, cos, sin = _rope_operands(k_rope)
    if (q_cos, q_sin) != (cos, sin):
        raise NoMatch("q and k are rotated with different tables")
    k_linear, v_linear = _head_split(k_heads, linears), _head_split(v_heads, linears)
    q_linear = _head_split(q_heads, linears)
    if isinstance(k_linear, GroupedProjectionNode) != isinstance(v_linear, GroupedProjectionNode):
        raise NoMatch("one of K and V is restructured for a latent cache and the other is not")
    if k_linear.input is not v_linear.input:
        raise NoMatch("k and v projections read different inputs")
    inv_freq, positions, rope_scale = _rotary_source(cos, sin)
    _, num_heads, _, head_dim = _shape(q_arg)
    num_kv_heads = _shape(k_heads)[1]
    if _is_fn(node, *SDPA_TARGETS) and _arg(node, 7, "enable_gqa", False) and n_rep == 1 and num_kv_heads:
        n_rep = num_heads // num_kv_heads  # SDPA repeats the KV heads itself
    if num_heads != num_kv_heads * n_rep or _shape(v_heads)[-1] != head_dim:
        raise NoMatch(f"{num_heads} query heads do not match {num_kv_heads} KV heads repeated {n_rep} times")
    merged, o_linear = _merged_heads(node, linears)
    if scale is None:
        scale = head_dim**-0.5
    dense = (o_linear,) if isinstance(k_linear, GroupedProjectionNode) else (k_linear, v_linear, o_linear)
    for view in dense:
        if not view.meta.compressible:
            raise NoMatch(f"{view.meta.name} may not be compressed: {view.meta.skip_reason}")
    return AttentionBlock(
        name=_block_name(k_linear), q_linear=q_linear, k_linear=k_linear, v_linear=v_linear, o_linear=o_linear, query=q_arg,
        attention=node, merged=merged, mask=mask, is_causal=is_causal, scale=float(scale), inv_freq=inv_freq,
        positions=positions, rope_scale=rope_scale, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, marker=marker, cache_slots=cache_slots,
    )


def _attention_ops(gm: fx.GraphModule) -> list[fx.Node]:
    """SDPA nodes and the value matmul of every eager softmax attention."""
    found = []
    for node in gm.graph.nodes:
        if _is_fn(node, *SDPA_TARGETS):
            found.append(node)
        elif _is_fn(node, *SOFTMAX_TARGETS) or _is_method(node, "softmax"):
            user = node
            while len(user.users) == 1 and (_is_method(user, "to", "type", "softmax") or _is_fn(user, F.dropout, *SOFTMAX_TARGETS)):
                user = next(iter(user.users))
            if _is_fn(user, torch.matmul):
                found.append(user)
    return found


def find_attention_blocks(
    gm: fx.GraphModule, linears: list[LinearNode]
) -> tuple[list[AttentionBlock], list[UnmatchedAttention]]:
    """Every recognised attention block of ``gm``, and every attention op left alone with its reason."""
    by_node: dict[fx.Node, Projection] = {view.node: view for view in linears if view.layout.name == "LINEAR"}
    for node in gm.graph.nodes:
        if _is_fn(node, GROUPED_UP) and node.args[0] in by_node:
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            by_node[node] = GroupedProjectionNode(node, by_node[node.args[0]], node.args[1], bias)
    latent = {_block_name(p) for p in by_node.values() if isinstance(p, GroupedProjectionNode)}
    blocks, unmatched, dense_cache = [], [], set()
    for node in _attention_ops(gm):
        try:
            blocks.append(match_attention(node, by_node))
        except NoMatch as reason:
            name = _module_name(node)
            if str(reason) == DENSE_CACHE and name in latent:  # as an eager call: K/V rebuilt from the latents
                dense_cache.add(name)
                log.info("attention %s, restructured already, runs with a dense KV cache", name)
                continue
            unmatched.append(UnmatchedAttention(name, str(reason)))
            log.info("attention %s not recognised for a latent KV cache: %s", unmatched[-1].name, reason)
    seen = {b.name for b in blocks} | {u.name for u in unmatched} | dense_cache
    modules = _attention_modules(linears)
    related = lambda a, b: a == b or a.startswith(b + ".") or b.startswith(a + ".")  # noqa: E731
    for name in sorted(m for m in modules if not any(related(m, other) for other in seen)
                       and not any(other.startswith(m + ".") for other in modules)):
        unmatched.append(UnmatchedAttention(name, "its attention is computed by an op the matcher does not know (only "
                                            "scaled_dot_product_attention and eager softmax attention are recognised: "
                                            "load the model with attn_implementation='sdpa' or 'eager')"))
        log.info("attention %s not recognised for a latent KV cache: %s", name, unmatched[-1].reason)
    markers = {n for n in gm.graph.nodes if _is_fn(n, MARKER)}
    for stray in markers - {b.marker for b in blocks}:
        unmatched.append(UnmatchedAttention(_module_name(stray), "latent cache marker without a recognised attention",
                                            cache_marker=True))
    return blocks, unmatched
