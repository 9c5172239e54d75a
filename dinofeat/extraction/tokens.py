"""Token slicing. HF DINO models emit [CLS, registers..., patches...] in row-major patch order."""

from __future__ import annotations

from typing import Any

from dinofeat.errors import TokenCountError


def expected_tokens(num_registers: int, grid: tuple[int, int]) -> int:
    h, w = grid
    return 1 + num_registers + h * w


def check_token_count(num_tokens: int, num_registers: int, grid: tuple[int, int]) -> None:
    """Stop the run on any mismatch: a wrong count means a wrong register count or patch size, and every stored
    patch would be shifted. Never skipped."""
    want = expected_tokens(num_registers, grid)
    if num_tokens != want:
        h, w = grid
        raise TokenCountError(
            f"model returned {num_tokens} tokens, expected 1 CLS + {num_registers} registers + {h}x{w} patches "
            f"= {want}; the model's num_register_tokens or patch_size does not match its output"
        )


def split_tokens(hidden: Any, num_registers: int, grid: tuple[int, int]) -> tuple[Any, Any, Any]:
    """[B, T, D] -> (cls [B, D], registers [B, R, D], patches [B, h, w, D]). Works on torch tensors and numpy."""
    check_token_count(hidden.shape[1], num_registers, grid)
    h, w = grid
    cls = hidden[:, 0]
    registers = hidden[:, 1 : 1 + num_registers]
    patches = hidden[:, 1 + num_registers :].reshape(hidden.shape[0], h, w, hidden.shape[2])
    return cls, registers, patches
