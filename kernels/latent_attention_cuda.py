"""CUDA implementation of ``lowrank::latent_attention``: the Triton kernels, eagerly and under ``torch.compile``.

:func:`torch.library.triton_op` defines a *new* operator from a function that
launches its kernels through :func:`torch.library.wrap_triton`. This op already
exists (reference, fake implementation, CPU decomposition), so this module
gives it the same two registrations ``triton_op`` makes for its own ops,
limited to CUDA tensors:

* a CUDA kernel: eager calls run :func:`latent_attention_triton` with
  ``wrap_triton`` disabled, so the kernels launch directly instead of through
  the higher-order-op dispatch (``triton_op`` does the same);
* a ``FunctionalTensorMode`` rule: when AOTAutograd functionalises a graph for
  ``torch.compile``, the op on CUDA tensors is decomposed into
  :func:`latent_attention_triton`, whose ``wrap_triton`` launches trace into
  ``triton_kernel_wrapper_functional`` nodes. Inductor compiles those as
  user-defined Triton kernels: they appear in its output code. Any other
  device keeps the op (on CPU, Inductor then applies the reference's
  decomposition), and so does ``torch.export`` when it asks custom Triton ops
  to stay whole.

The kernel module (and Triton) is imported on the first CUDA call, so
importing the op costs nothing where there is no GPU, and tests can turn on
Triton's interpreter before the kernels are defined.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
from torch._library.triton import set_wrap_triton_enabled
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

OP = "lowrank::latent_attention"
DEVICE = "cuda"
logger = logging.getLogger(__name__)


def _launcher() -> Any:
    from .latent_attention_triton import latent_attention_triton

    return latent_attention_triton


def _query(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["query"]


def _cuda_kernel(*args: Any, **kwargs: Any) -> torch.Tensor:
    with set_wrap_triton_enabled(False):
        return _launcher()(*args, **kwargs)


def _functional_rule(mode: FunctionalTensorMode, op: Any, types: tuple, args: tuple, kwargs: dict) -> Any:
    from torch.export._trace import custom_triton_ops_decomposition_disabled

    plain = all(issubclass(t, (FakeTensor, FunctionalTensor)) or t is torch.Tensor for t in types)
    if _query(args, kwargs).device.type != DEVICE or not plain or custom_triton_ops_decomposition_disabled():
        return mode.__torch_dispatch__(op, types, args, kwargs)
    with mode:
        return _launcher()(*args, **kwargs)


def register() -> bool:
    """Register the Triton implementation of ``lowrank::latent_attention`` for CUDA; False when Triton is missing."""
    if importlib.util.find_spec("triton") is None:
        logger.info("%s: triton is not installed; CUDA runs the PyTorch reference", OP)
        return False
    torch.library.register_kernel(OP, DEVICE, _cuda_kernel)
    torch.library.register_torch_dispatch(OP, FunctionalTensorMode, _functional_rule)
    return True


register()
