"""NSA and SCOPE in Hugging Face transformers models (Llama, Mistral, Qwen2, Gemma): the `hf` extra.

    import sal_hf
    model = AutoModelForCausalLM.from_pretrained(path)              # a dense Llama / Mistral / Qwen2 / Gemma checkpoint
    sal_hf.swap_attention(model, "nsa", window_size=512)              # or "scope"; converts the dense weights
    model.generate(input_ids, max_new_tokens=32)                      # NSA's per-branch decode cache, automatically
    model.save_pretrained(out)                                        # the layers' parameters, under self_attn.nsa.*
    model = sal_hf.load_swapped(out)                                  # the swapped model again
    sal_hf.convert_checkpoint(path, out, "scope", block=64)           # load, swap, save in one call

Importing sal_hf registers "nsa" and "scope" with transformers' attention and mask interfaces, so a swapped model
runs under attn_implementation="nsa" / "scope". Those interfaces hand an attention function q, k and v already
projected by the dense layer, which is not enough for either layer: NSA has per-branch K/V projections and gates
computed from the hidden states, SCOPE's pointer head reads q before RoPE and its decode keeps per-row pointer
parameters. Both therefore come in through the module swap (sal_hf.swap); the attention interface's entry tells a
dense model that reaches it what to do, the mask interface passes the swapped layers the padding mask.
What is copied by the conversion and how new parameters start: sal_hf.swap. The modules: sal_hf.attention.
The decode caches in transformers' cache API: sal_hf.cache.

Supported transformers: tested with 5.24.0 (the version pinned in requirements.txt and the `hf` extra); it relies on
transformers 5's layered Cache API (CacheLayerMixin), AttentionInterface / AttentionMaskInterface and the `cache=`
keyword of the decoder layers (`past_key_values=` is accepted too). transformers is imported only by this package:
nsa and scope import with torch alone.
"""

from __future__ import annotations

try:
    import transformers
except ImportError as missing:  # pragma: no cover - exercised only without the extra
    raise ImportError("sal_hf needs transformers: pip install 'sparse-attention-lab[hf]'") from missing

from sal_hf.attention import NSASelfAttention, ScopeSelfAttention, SparseSelfAttention
from sal_hf.cache import NSACacheLayer, ScopeCacheLayer, SparseAttentionCache, SparseCacheLayer
from sal_hf.swap import SPEC_KEY, convert_checkpoint, load_swapped, register, swap_attention

TESTED_TRANSFORMERS = "5.24.0"
TRANSFORMERS_VERSION = transformers.__version__

register()

__all__ = [
    "SPEC_KEY",
    "TESTED_TRANSFORMERS",
    "TRANSFORMERS_VERSION",
    "NSACacheLayer",
    "NSASelfAttention",
    "ScopeCacheLayer",
    "ScopeSelfAttention",
    "SparseAttentionCache",
    "SparseCacheLayer",
    "SparseSelfAttention",
    "convert_checkpoint",
    "load_swapped",
    "swap_attention",
]
