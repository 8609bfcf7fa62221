"""TerraTorch, imported without its process-wide side effect on torch's float32 matmul precision.

``import terratorch`` imports every backbone it ships, and one of them (``clay_v15``) calls
``torch.set_float32_matmul_precision("medium")`` at import time. On CPUs with native bf16 (AMX, AVX512-BF16) oneDNN
then runs *every* float32 matmul of the process in bf16: on such a machine the Stage 2/3 figures moved in the 4th
digit, and the Stage 3 attention maps no longer matched the layer they explain (91 % of its outputs off by up to
0.006). GAC's float32 stays float32; bf16 is something a user asks for (``precision: bf16-mixed``).

Every function of ``gac`` that imports from ``terratorch`` is decorated with :func:`uses_terratorch`, so the first
import, wherever it happens, restores the precision the process had before it.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

from gac.startup import quiet_gc

P = ParamSpec("P")
R = TypeVar("R")


@functools.cache
def import_terratorch() -> None:
    """Import ``terratorch`` once, keeping torch's float32 matmul precision as it was before.

    Where something outside GAC imported ``terratorch`` first, the precision it left is not the user's choice: GAC
    resets torch's default (``"highest"``).
    """
    before = "highest" if "terratorch" in sys.modules else torch.get_float32_matmul_precision()
    with quiet_gc():  # ~8,000 modules: see gac.startup
        importlib.import_module("terratorch")
    torch.set_float32_matmul_precision(before)


def uses_terratorch(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a function that imports from ``terratorch`` inside its body (see the module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        import_terratorch()
        return fn(*args, **kwargs)

    return wrapper
