"""The pass-level example of docs/architecture.md runs as written, so it cannot drift from the API."""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
SECTION = "## The pass-level API, step by step"


def _section_code(path: Path, heading: str) -> str:
    """The ```python block of the section ``heading`` of ``path``, shifted down to its line there (tracebacks
    then name the document's lines)."""
    text = path.read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    block = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE).search(text, start, end if end >= 0 else len(text))
    assert block is not None, f"no python block under {heading!r}"
    return "\n" * text.count("\n", 0, block.start(1)) + block.group(1)


def test_pass_level_example_runs_every_step(capsys):
    code = _section_code(ARCHITECTURE, SECTION)
    for step in ("find_linears", "insert_observers", "calibrate", "collect_stats", "allocate_uniform", "build_plan",
                 "decompose", "factorize_linears", "release_dense_weights"):
        assert f"{step}(" in code, f"the example no longer shows {step}"
    namespace = {"__name__": "architecture_example"}
    exec(compile(code, str(ARCHITECTURE), "exec"), namespace)
    gm = namespace["gm"]
    assert not any(isinstance(m, nn.Linear) for m in gm.modules())  # every linear factored, dense weights dropped
    printed = capsys.readouterr().out.strip()
    assert printed == code.rstrip().splitlines()[-1].removeprefix("# ")  # the output its last line shows
