"""CPU implementation of ``lowrank::aq_linear``: the C++ kernels of ``aq_linear_cpu.cpp``, eagerly and under Inductor.

The kernels (see the source's header) are compiled on the first CPU call with
:func:`torch.utils.cpp_extension.load` (about 15 s on 2 cores, once per
machine: the build directory under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``, is reused while the source and flags are
unchanged) and registered as the op's CPU kernel. Inductor keeps the custom op
as an extern call, so compiled graphs reach the same kernel. Without a working
compiler the op logs one warning and keeps its reference (dequantise, then a
dense matmul): correct, not fast.

Codebooks in another dtype than float32 (16-bit, as models store them) are
converted to float32 on each call, with x, scales and bias: 2^B x g values a
codebook, measured as no slower at batch 1 than float32 codebooks (within
the noise of ~1 us on a 40 us 576 x 576 call, ``benchmarks/aq_speed.py``).

Which kernel runs is chosen per call by shape (``choose`` in the source,
thresholds measured by ``benchmarks/aq_speed.py``): the codebook matrix-vector
product for decode (at most 16 rows), dequantise + matmul for prefill.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from enum import IntEnum
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("aq_linear_cpu.cpp")
MAX_MATVEC_ROWS = 16  # rows the matrix-vector kernels take; more dequantise and run one matmul (measured crossover)
logger = logging.getLogger(__name__)


class Kernel(IntEnum):
    """The C++ entry point's ``kernel`` argument."""

    CHOOSE = 0  # by shape, what the op runs
    TABLE = 1  # lookup table (one row; measured slower than CODEBOOK here, kept for the benchmark's comparison)
    CODEBOOK = 2  # codewords summed and multiplied into x: g = 8 (or 4, in_features a multiple of 8), M <= 2, <= 16 rows
    DEQUANTIZE = 3  # dense weight, then one matmul


def _machine_tag() -> str:
    """A short tag of this CPU's instruction set: ``-march=native`` builds must not be reused on another CPU."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:8]


@functools.cache
def load_kernels() -> bool:
    """Build (or reuse) and load the C++ kernels once per process; False, with a warning, when that fails."""
    from torch.utils.cpp_extension import load

    try:
        load(name=f"lrcompile_aq_linear_cpu_{_machine_tag()}", sources=[str(SOURCE)],
             extra_cflags=["-O3", "-march=native", f"-DAQ_MAX_ROWS={MAX_MATVEC_ROWS}"], is_python_module=False)
    except Exception as error:  # noqa: BLE001 - no compiler, headers or build tools: the reference still works
        logger.warning("lowrank::aq_linear: could not build the C++ CPU kernels (%s: %s); CPU calls run the "
                       "reference (dequantise + dense matmul), correct but slow", type(error).__name__, error)
        return False
    return True


def aq_linear_cpu(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Tensor | None,
                  kernel: Kernel = Kernel.CHOOSE) -> Tensor:
    """``lowrank::aq_linear`` on CPU tensors through the C++ kernels (the reference when they could not be built)."""
    if not load_kernels():
        from .aq_linear import aq_linear_reference

        return aq_linear_reference(x, codes, codebooks, scales, bias)
    return torch.ops.lowrank_aq_cpu.aq_linear(x, codes, codebooks, scales, bias, int(kernel))
