"""Triton kernels in tests without a GPU: importing this module sets ``TRITON_INTERPRET=1`` (it must precede the first
import of triton in the process: triton.language is built for one mode), and :func:`patch_interpreter` fixes the
interpreter for numpy >= 2.4 (the ``triton_interpreter`` fixture of conftest.py applies it to a test module).

On a CUDA machine with ``TRITON_INTERPRET`` unset, ``ON_GPU`` is true and the kernels run compiled on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = "cuda" if ON_GPU else "cpu"


def patch_interpreter(mp: pytest.MonkeyPatch) -> None:
    """triton 3.6's interpreter turns a scalar into an int with ``int(array of shape (1,))``, an error
    since numpy 2.4 (``range(0, n)`` on a kernel argument fails); convert through its only element."""
    from triton.runtime import interpreter as ti

    original = ti._patch_lang_tensor

    def patched(tensor, scope):  # noqa: ANN001, ANN202
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    mp.setattr(ti, "_patch_lang_tensor", patched)
