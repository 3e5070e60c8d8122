"""Triton CPU-interpreter compatibility (TRITON_INTERPRET=1; nothing changes on the GPU).

Triton 3.6's interpreter holds a scalar as a 1-element array and converts it with int(array), which
numpy >= 2.4 refuses, so a loop bound loaded from memory (``range(0, tl.load(p))``, as the block-sparse
kernels use) fails under the interpreter only. ``allow_loaded_loop_bounds`` makes the conversion go
through the array's single element, which is what the compiled kernel means.
"""

from __future__ import annotations

import functools

from nsa.dispatch import interpreter_enabled


@functools.cache
def allow_loaded_loop_bounds() -> None:
    """Idempotent; a no-op unless TRITON_INTERPRET=1."""
    if not interpreter_enabled():
        return
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor: type, scope: object) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))  # type: ignore[attr-defined]

    interpreter._patch_lang_tensor = patched
