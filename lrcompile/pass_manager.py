"""Orders passes by what they require and provide, runs them, times them, dumps graphs."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import networkx as nx
from torch import fx

from .types import META_KEY, LinearMeta, dtype_name

log = logging.getLogger(__name__)

_ASSIGNMENT = re.compile(r"^(\s*)(\w+)(?::|\s=)")  # a node's line in generated code: ``name: "f32[..]" = ...``

Context = TypeVar("Context")


@dataclass(frozen=True)
class Pass(Generic[Context]):
    name: str
    run: Callable[[Context], None]
    requires: frozenset[str] = frozenset()
    provides: frozenset[str] = frozenset()


def order_passes(passes: Sequence[Pass]) -> list[Pass]:
    """Topological order of ``passes`` by requires/provides (ties keep the given order)."""
    producers = {}
    for p in passes:
        for fact in p.provides:
            producers[fact] = p.name
    dag = nx.DiGraph()
    dag.add_nodes_from(p.name for p in passes)
    for p in passes:
        for fact in p.requires:
            if fact not in producers:
                raise ValueError(f"pass {p.name!r} requires {fact!r}, which no pass provides")
            dag.add_edge(producers[fact], p.name)
    if not nx.is_directed_acyclic_graph(dag):
        raise ValueError(f"passes form a cycle: {nx.find_cycle(dag)}")
    position = {p.name: i for i, p in enumerate(passes)}
    by_name = {p.name: p for p in passes}
    return [by_name[n] for n in nx.lexicographical_topological_sort(dag, key=position.__getitem__)]


def _lowrank_note(meta: LinearMeta) -> str:
    """One line of what the passes know of a linear: shape, whether it may be compressed (or why not),
    statistics observed (counts and shapes, never the tensors), the sensitivity curve, its part in an attention
    block to restructure and the planned rank."""
    bias = " +bias" if meta.has_bias else ""
    parts = [f"{meta.name}: {meta.layout.value} out={meta.out_features} in={meta.in_features} "
             f"{dtype_name(meta.weight_dtype)}{bias}",
             "compressible" if meta.compressible else f"not compressible ({meta.skip_reason})"]
    if meta.stats is not None:
        gram = "no gram" if meta.stats.gram is None else f"gram {list(meta.stats.gram.shape)}"
        parts.append(f"stats: {meta.stats.rows} tokens, {gram}")
    if meta.sensitivity:
        curve = ", ".join(f"{ratio:g}: {kl:.3g}" for ratio, kl in sorted(meta.sensitivity.items()))
        parts.append(f"sensitivity (ratio: KL) {curve}")
    if meta.refit_rows:
        parts.append(f"factored on {meta.refit_rows} tokens of its input with the layers before it compressed")
    if meta.attention_role:
        parts.append(meta.attention_role)
    plan = meta.plan
    if plan is not None:
        parts.append(f"plan: dense ({plan.reason})" if plan.rank is None else
                     f"plan: rank {plan.rank}, {plan.params_after / plan.dense_params:.3f} of its parameters")
    return "; ".join(parts)


def readable_graph(gm: fx.GraphModule) -> str:
    """``gm``'s code, each linear's line preceded by a ``# lowrank`` comment from its ``node.meta["lowrank"]``.

    Analysis passes attach metadata and leave the code as it was; the comments
    make their before/after dumps differ where they did something.
    """
    code = gm.print_readable(print_output=False, include_stride=False, include_device=False)
    notes = {node.name: _lowrank_note(node.meta[META_KEY]) for node in gm.graph.nodes if META_KEY in node.meta}
    lines = []
    for line in code.splitlines(keepends=True):
        match = _ASSIGNMENT.match(line)
        if match and match.group(2) in notes:  # popped: the top-level forward comes first, nested graphs after
            lines.append(f"{match.group(1)}# lowrank {notes.pop(match.group(2))}\n")
        lines.append(line)
    return "".join(lines)


class PassManager(Generic[Context]):
    """Runs ordered passes on a context holding ``gm``; records each pass's wall time.

    With a ``dump_dir``, a pass that changed the graph or its ``# lowrank`` notes leaves its graph before and
    after it (``NN_name_before.py`` / ``_after.py``); a failing pass leaves its ``before``; ``passes.txt``
    says where the graph came from (``source``), then lists every pass run, whether it changed anything, and its
    time."""

    def __init__(self, passes: Sequence[Pass[Context]], dump_dir: Path | None = None, source: str = ""):
        self.passes = order_passes(passes)
        self.dump_dir = dump_dir
        self.source = source
        self.timings: dict[str, float] = {}

    def run(self, context: Context, graph_of: Callable[[Context], fx.GraphModule]) -> None:
        if self.dump_dir is None:
            for p in self.passes:
                self._run(p, context)
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        summary = [f"# {self.source}"] if self.source else []
        try:
            for i, p in enumerate(self.passes):
                before = readable_graph(graph_of(context))
                path = self.dump_dir / f"{i:02d}_{p.name}_before.py"
                path.write_text(before)
                try:
                    self._run(p, context)
                except Exception as err:
                    summary.append(f"{i:02d} {p.name}: FAILED ({type(err).__name__}: {err}); its graph before: "
                                   f"{path.name}")
                    raise
                after = readable_graph(graph_of(context))
                if after == before:
                    path.unlink()
                else:
                    (self.dump_dir / f"{i:02d}_{p.name}_after.py").write_text(after)
                summary.append(f"{i:02d} {p.name}: {'changed' if after != before else 'no change'}, "
                               f"{self.timings[p.name]:.3f} s")
        finally:
            (self.dump_dir / "passes.txt").write_text("\n".join(summary) + "\n")

    def _run(self, p: Pass[Context], context: Context) -> None:
        start = time.perf_counter()
        p.run(context)
        self.timings[p.name] = time.perf_counter() - start
        log.info("pass %s: %.2f s", p.name, self.timings[p.name])
