"""Shared by the Triton kernel tests: run cases under ``TRITON_INTERPRET=1`` and compile for sm_90 without a GPU.

Triton decides when ``@triton.jit`` runs whether a kernel is interpreted, so a
test file's cases run in one subprocess started with the variable set (the
test file itself, run as a script, is the worker printing the results as JSON
on its last line), or in-process when this run already has it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"

needs_cpu_compile = pytest.mark.skipif(
    INTERPRETER or torch.cuda.is_available(), reason="checks the CUDA path on a machine without GPU, uninterpreted"
)


def interpreted_results(worker: str, run_cases: Callable[[], dict]) -> dict:
    """``run_cases()`` under the interpreter: in-process when on, else the ``worker`` script in a subprocess."""
    if INTERPRETER:
        return run_cases()
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, worker], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"interpreter worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _nvidia_target():
    from triton.backends.compiler import GPUTarget

    class CompileOnlyDriver:
        """Enough of a Triton driver to compile for sm_90 (and run Inductor's mutation analysis) with no GPU."""

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    return CompileOnlyDriver()


@pytest.fixture
def sm90_driver() -> Iterator[None]:
    """Triton compiles for sm_90 while the test runs (skipped when this Triton build has no NVIDIA backend)."""
    import triton
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    triton.runtime.driver.set_active(_nvidia_target())
    yield
    triton.runtime.driver._active = None  # back to lazy detection (no reset_active: there is no default driver)
