"""attncc: an attention compiler.

Describe what an attention layer computes (an AttentionSpec, a TOML spec file, or
FlexAttention-style score_mod / mask_mod callables); attncc builds a symbolic IR,
lowers it to generated source, loads it as a torch module and checks it against
a float64 reference.
"""

__version__ = "0.1.0"

from attncc import masks, nn  # noqa: E402
from attncc.api import CompiledAttention, ValidationReport, compile, validate  # noqa: E402
from attncc.capture import capture  # noqa: E402
from attncc.errors import (  # noqa: E402
    AttnccError,
    BackendError,
    InputError,
    IRError,
    ModError,
    SpecError,
    ValidationError,
)
from attncc.flex import BlockMask, create_block_mask, flex_attention  # noqa: E402
from attncc.frontend.spec_file import load_spec  # noqa: E402
from attncc.ir.rope import RoPE  # noqa: E402
from attncc.kv_cache import PagedKVCache, StaticKVCache  # noqa: E402
from attncc.linear import CompiledLinearAttention, LinearAttentionState, linear_attention  # noqa: E402
from attncc.merge import merge_attention_states  # noqa: E402
from attncc.spec import AttentionSpec  # noqa: E402

__all__ = [
    "AttentionSpec",
    "AttnccError",
    "BackendError",
    "BlockMask",
    "CompiledAttention",
    "CompiledLinearAttention",
    "IRError",
    "InputError",
    "LinearAttentionState",
    "ModError",
    "PagedKVCache",
    "RoPE",
    "SpecError",
    "StaticKVCache",
    "ValidationError",
    "ValidationReport",
    "capture",
    "compile",
    "create_block_mask",
    "flex_attention",
    "linear_attention",
    "load_spec",
    "masks",
    "merge_attention_states",
    "nn",
    "validate",
]
