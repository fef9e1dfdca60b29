"""FlexAttention's ``kernel_options`` (torch 2.13's ``FlexKernelOptions``) in attncc's terms.

Tile sizes, warps and pipeline stages become options of the ``tile`` pass: unprefixed
or ``fwd_`` keys the forward's, ``bwd_`` keys and torch's backward tiles (``BLOCK_M1`` /
``BLOCK_N1`` of its dK/dV kernel, ``BLOCK_M2`` / ``BLOCK_N2`` of its dQ kernel) the
backward's, which attncc's dK/dV and dQ kernels share. ``BACKEND`` chooses attncc's
backend; every other key is accepted and has no effect, for the reason ``NO_OPS`` gives.
"""

from __future__ import annotations

from dataclasses import dataclass

from attncc.errors import InputError

# kernel option -> option of the tile pass (with a bwd_ prefix: its bwd_ option).
TILE_OPTIONS = {"BLOCK_M": "block_m", "BLOCK_N": "block_n", "num_warps": "num_warps", "num_stages": "num_stages"}
# torch's backward tiles -> the tile pass's backward tiles.
BACKWARD_TILES = {"BLOCK_M1": "bwd_block_m", "BLOCK_M2": "bwd_block_m", "BLOCK_N1": "bwd_block_n",
                  "BLOCK_N2": "bwd_block_n"}  # fmt: skip

# kernel option -> (the type its value must have, why attncc has nothing to change for it).
NO_OPS = {
    "PRESCALE_QK": (bool, "the fold-scale pass always folds the scale (and log2(e)) into one factor"),
    "ROWS_GUARANTEED_SAFE": (bool, "rows without a visible key cost nothing extra: o = 0, lse = -inf"),
    "BLOCKS_ARE_CONTIGUOUS": (bool, "the sparsity pass derives each query tile's key range from the mask"),
    "WRITE_DQ": (bool, "attncc's backward writes dQ in its own kernel"),
    "FORCE_USE_FLEX_ATTENTION": (bool, "attncc has one kernel for every length"),
    "USE_TMA": (bool, "the generated Triton kernels load through pointers"),
    "kpack": (int, "a ROCm setting; the generated kernels leave it to Triton"),
    "matrix_instr_nonkdim": (int, "a ROCm setting; the generated kernels leave it to Triton"),
    "waves_per_eu": (int, "a ROCm setting; the generated kernels leave it to Triton"),
}

# BACKEND -> attncc backend (None: the device's preferred backend).
BACKENDS = {"AUTO": None, "TRITON": "triton", "TRITON_DECODE": "triton"}

KNOWN = (*TILE_OPTIONS, *BACKWARD_TILES, *NO_OPS, "BACKEND")


@dataclass(frozen=True)
class KernelOptions:
    """What ``kernel_options`` asks of attncc: tile-pass options and, if named, a backend."""

    tile: tuple[tuple[str, int], ...] = ()
    backend: str | None = None


def parse_kernel_options(options) -> KernelOptions:
    """Check torch's ``kernel_options`` dict and translate it; unknown keys and bad values raise InputError."""
    if options is None:
        return KernelOptions()
    if not isinstance(options, dict):
        raise InputError(f"kernel_options is a {type(options).__name__}: a dict of FlexKernelOptions is allowed")
    tile: dict[str, int] = {}
    backend = None
    for key, value in options.items():
        name = key.removeprefix("fwd_").removeprefix("bwd_") if isinstance(key, str) else key
        if name not in KNOWN:
            raise InputError(
                f"kernel_options key {key!r} is unknown; allowed (each also with a fwd_ or bwd_ prefix): "
                f"{', '.join(KNOWN)}"
            )
        if name == "BACKEND":
            backend = _backend(key, value, options)
        elif name in TILE_OPTIONS or name in BACKWARD_TILES:
            _check_type(key, value, int)
            if value <= 0:
                raise InputError(f"kernel_options[{key!r}]={value!r} is invalid: a positive integer is allowed")
            option = BACKWARD_TILES.get(name) or ("bwd_" if key.startswith("bwd_") else "") + TILE_OPTIONS[name]
            if tile.setdefault(option, value) != value:
                raise InputError(
                    f"kernel_options[{key!r}]={value!r} disagrees with another key's {tile[option]} for the tile "
                    f"pass's {option}: attncc's dK/dV and dQ kernels share the backward tiles"
                )
        else:
            _check_type(key, value, NO_OPS[name][0])
    return KernelOptions(tuple(sorted(tile.items())), backend)


def _check_type(key: str, value, kind: type) -> None:
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise InputError(f"kernel_options[{key!r}]={value!r} is invalid: a {kind.__name__} is allowed")


def _backend(key: str, value, options: dict) -> str | None:
    if options.get("FORCE_USE_FLEX_ATTENTION"):
        raise InputError("kernel_options BACKEND and FORCE_USE_FLEX_ATTENTION=True cannot be combined; drop the latter")
    if value == "FLASH":
        raise InputError(f"kernel_options[{key!r}]='FLASH' is not available in attncc; allowed: {', '.join(BACKENDS)}")
    if value not in BACKENDS:
        raise InputError(f"kernel_options[{key!r}]={value!r} is invalid; allowed: {', '.join(BACKENDS)}")
    return BACKENDS[value]
