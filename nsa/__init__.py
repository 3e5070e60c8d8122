"""Native Sparse Attention (Yuan et al., 2025): reference PyTorch path, layout [B, T, H, D]."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sparse-attention-lab")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"


from nsa.block_index import num_compressed_blocks, num_selection_blocks
from nsa.compress_pool import CompressPool, compress_mean_pool
from nsa.compressed_attention import compressed_attention
from nsa.config import NSAConfig, load_nsa_config
from nsa.errors import NSAConfigError, NSAError, NSAInputError
from nsa.functional import NSAOutput
from nsa.functional import nsa_attention as _nsa_attention_fn
from nsa.kv_cache import NSAKVCache
from nsa.naive import (
    naive_compressed_attention,
    naive_nsa_attention,
    naive_select_blocks,
    naive_selected_attention,
    naive_sliding_window_attention,
)
from nsa.nsa_attention import NSAAttention, NSAAux
from nsa.rope import apply_rope
from nsa.selected_attention import selected_attention
from nsa.selection_scorer import group_reduce, map_cmp_to_sel, select_blocks, topn_blocks
from nsa.sliding_window import sliding_window_attention

# The submodule nsa.nsa_attention (home of NSAAttention) shares this name; importing it rebinds the
# package attribute to the module, so the public name is bound to the function after all imports.
nsa_attention = _nsa_attention_fn

# The modules other packages (scope) may import from, besides the names above: the shared pieces (backend
# dispatch, RoPE, config and argument checks, errors, non-finite handling, the Triton interpreter shim and the
# launchers' host-side arguments, the context-parallel layouts and row transport). Every other module of nsa is
# internal.
# tests/test_scope_imports.py holds scope to this list.
PUBLIC_MODULES = (
    "nsa.config",
    "nsa.context_layout",
    "nsa.dispatch",
    "nsa.errors",
    "nsa.kernels.attention_steps",
    "nsa.kernels.interpreter",
    "nsa.kernels.launch_args",
    "nsa.nonfinite",
    "nsa.rope",
    "nsa.validation",
)

__all__ = [
    "CompressPool",
    "NSAAttention",
    "NSAAux",
    "NSAConfig",
    "NSAConfigError",
    "NSAError",
    "NSAInputError",
    "NSAKVCache",
    "NSAOutput",
    "__version__",
    "apply_rope",
    "compress_mean_pool",
    "compressed_attention",
    "group_reduce",
    "load_nsa_config",
    "map_cmp_to_sel",
    "naive_compressed_attention",
    "naive_nsa_attention",
    "naive_select_blocks",
    "naive_selected_attention",
    "naive_sliding_window_attention",
    "nsa_attention",
    "num_compressed_blocks",
    "num_selection_blocks",
    "select_blocks",
    "selected_attention",
    "sliding_window_attention",
    "topn_blocks",
]
