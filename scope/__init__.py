"""SCOPE: a query-conditioned spectral attention bias plus a pointer-driven block-sparse mask.

The math contract is ``../shared/spec/SCOPE.md``; the internal API is ``docs/SCOPE_CONTRACT.md``.
"""

from scope.config import ScopeConfig, load_scope_config
from scope.errors import ScopeConfigError, ScopeError, ScopeInputError
from scope.pointer_mask import PointerMask, build_pointer_block_mask, sliding_window_block_mask
from scope.scope_attention import ScopeAttention, ScopeAux, ScopeKVCache
from scope.spectral_bias import (
    BiasCoefficients,
    PointerHead,
    PointerParams,
    SpectralBias,
    frequencies,
)
from scope.teacher import TeacherLoss, layer_teacher_loss
from scope.telemetry import ScopeTelemetry, scope_stats

__all__ = [
    "BiasCoefficients",
    "PointerHead",
    "PointerMask",
    "PointerParams",
    "ScopeAttention",
    "ScopeAux",
    "ScopeConfig",
    "ScopeConfigError",
    "ScopeError",
    "ScopeInputError",
    "ScopeKVCache",
    "ScopeTelemetry",
    "SpectralBias",
    "TeacherLoss",
    "build_pointer_block_mask",
    "frequencies",
    "layer_teacher_loss",
    "load_scope_config",
    "scope_stats",
    "sliding_window_block_mask",
]
