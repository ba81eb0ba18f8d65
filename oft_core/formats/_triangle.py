"""The packed strict upper triangle of square blocks: how PEFT ≥ 0.16 stores a generator (`oft_R.weight`) and how the
trainer holds its parameters. One definition, used by the PEFT reader and writer and by `train.py`.

Order: `torch.triu_indices(b, b, 1)` (row-major over the strict upper triangle), PEFT's own; Q = U − Uᵀ.
"""

from __future__ import annotations

import math

import torch


def block_size_of(n_values: int) -> int | None:
    """The block size b with b(b−1)/2 = `n_values` (b ≥ 2), or None when there is none."""
    b = (1 + math.isqrt(1 + 8 * n_values)) // 2
    return b if b * (b - 1) // 2 == n_values and b >= 2 else None


def pack_upper(q: torch.Tensor) -> torch.Tensor:
    """(blocks, b, b) -> (blocks, b(b−1)/2): the strict upper triangle of each block (for an exactly skew Q,
    `unpack_upper` of it gives Q back bit for bit)."""
    b = int(q.shape[-1])
    rows, cols = torch.triu_indices(b, b, 1, device=q.device)
    return q[:, rows, cols].contiguous()


def unpack_upper(vec: torch.Tensor, b: int) -> torch.Tensor:
    """(blocks, b(b−1)/2) -> U (blocks, b, b), zero on and below the diagonal; differentiable (the trainer's
    parameters go through it), so Q = U − Uᵀ carries gradients."""
    rows, cols = torch.triu_indices(b, b, 1, device=vec.device)
    u = vec.new_zeros(vec.shape[0], b, b)
    return u.index_put((torch.arange(vec.shape[0], device=vec.device)[:, None], rows, cols), vec)
