"""SCOPE: a query-conditioned spectral attention bias plus a pointer-driven block-sparse mask.

The math contract is ``../shared/spec/SCOPE.md``; the internal API is ``docs/SCOPE_CONTRACT.md``. The op:
``scope_attention`` (scope.functional), with its dense twin ``naive_scope_attention``; the layer:
``ScopeAttention``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sparse-attention-lab")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"


from scope.config import ScopeConfig, load_scope_config
from scope.errors import ScopeConfigError, ScopeError, ScopeInputError
from scope.functional import naive_scope_attention, scope_attention_backend
from scope.functional import scope_attention as _scope_attention_fn
from scope.pointer_mask import PointerMask, build_pointer_block_mask, sliding_window_block_mask
from scope.scope_attention import ScopeAttention, ScopeAux, ScopeKVCache, ScopeProjection
from scope.spectral_bias import (
    BiasCoefficients,
    BiasTerms,
    PointerHead,
    PointerParams,
    Ramp,
    SpectralBias,
    frequencies,
)
from scope.teacher import TeacherLoss, layer_teacher_loss
from scope.telemetry import ScopeTelemetry, scope_stats

# The submodule scope.scope_attention (home of ScopeAttention) shares this name; importing it rebinds the
# package attribute to the module, so the public name is bound to the function after all imports.
scope_attention = _scope_attention_fn

__all__ = [
    "BiasCoefficients",
    "BiasTerms",
    "PointerHead",
    "PointerMask",
    "PointerParams",
    "Ramp",
    "ScopeAttention",
    "ScopeAux",
    "ScopeConfig",
    "ScopeConfigError",
    "ScopeError",
    "ScopeInputError",
    "ScopeKVCache",
    "ScopeProjection",
    "ScopeTelemetry",
    "SpectralBias",
    "TeacherLoss",
    "__version__",
    "build_pointer_block_mask",
    "frequencies",
    "layer_teacher_loss",
    "load_scope_config",
    "naive_scope_attention",
    "scope_attention",
    "scope_attention_backend",
    "scope_stats",
    "sliding_window_block_mask",
]
