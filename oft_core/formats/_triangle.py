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



# `skew_from_upper` builds Q with one matmul by a constant ±1 matrix E up to this block size, else with one gather.
# Measured on CPU (1 thread, forward + backward, blocks × b): the matmul is the fastest up to b = 12 (8×1280:
# 124 µs against 297 gather, 669 index_put) but costs O(b⁴) per block (E is b(b−1)/2 × b²), so from b = 16 the
# gather wins (16×320: 278 µs, matmul 399, index_put 700; 32×320: 829, 4266, 2214); the gather beats
# `unpack_upper`'s index_put at every size measured (up to 64).
_SKEW_MATMUL_MAX = 12
_SKEW_CONSTANTS: dict[tuple[str, int, torch.device, torch.dtype | None], torch.Tensor] = {}


def _skew_constant(kind: str, b: int, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The constants of `skew_from_upper`, cached per (kind, b, device, dtype); never trained.

    kind "gather": for each (r, c) of Q (row-major) its index in [0, vec, −vec]: 0 on the diagonal, 1 + k at the
    k-th (i, j) of `unpack_upper`'s order, 1 + t + k at its mirror (j, i) (t = b(b−1)/2).
    kind "matmul": E (t, b²), row k = +1 at (i, j) and −1 at (j, i): vec·E = vec(U − Uᵀ).
    """
    key = (kind, b, torch.device(device), dtype)
    c = _SKEW_CONSTANTS.get(key)
    if c is None:
        with torch.inference_mode(False), torch.no_grad():
            rows, cols = torch.triu_indices(b, b, 1)
            t = rows.numel()
            k = torch.arange(t)
            if kind == "gather":
                c = torch.zeros(b, b, dtype=torch.long)
                c[rows, cols] = 1 + k
                c[cols, rows] = 1 + t + k
                c = c.flatten().to(device)
            else:
                c = torch.zeros(t, b, b, dtype=dtype)
                c[k, rows, cols] = 1
                c[k, cols, rows] = -1
                c = c.reshape(t, b * b).to(device)
        _SKEW_CONSTANTS[key] = c
    return c


def skew_from_upper(vec: torch.Tensor, b: int) -> torch.Tensor:
    """(blocks, b(b−1)/2) -> Q = U − Uᵀ (blocks, b, b) with U = `unpack_upper(vec, b)`, without its index_put;
    differentiable (the trainer's live generators).

    Every entry of Q is 0 (diagonal), vec_k or −vec_k, so both ways below copy values: Q is `unpack_upper`'s
    U − Uᵀ bit for bit (for finite vec; the matmul may differ in the sign of a zero), and so is the gradient
    ∂L/∂vec_k = G_ij − G_ji. For b ≤ `_SKEW_MATMUL_MAX` one matmul Q = vec·E (the other terms are exact zeros);
    larger b, or under autocast (which would run the matmul in 16 bits), one gather from [0, vec, −vec].
    """
    if b <= _SKEW_MATMUL_MAX and not torch.is_autocast_enabled(vec.device.type):
        return (vec @ _skew_constant("matmul", b, vec.device, vec.dtype)).unflatten(-1, (b, b))
    table = torch.cat([vec.new_zeros(*vec.shape[:-1], 1), vec, -vec], -1)
    return table.index_select(-1, _skew_constant("gather", b, vec.device)).unflatten(-1, (b, b))


def upper_grad(g: torch.Tensor, b: int) -> torch.Tensor:
    """∂L/∂vec of `skew_from_upper(vec, b)` given G = ∂L/∂Q (blocks, b, b): G_ij − G_ji at each packed (i, j), the
    gradient autograd gives through either of its ways (the matmul's Gᵀ-side product G·Eᵀ up to b =
    `_SKEW_MATMUL_MAX`, else the gather's scatter-add, taken here as one gather from G − Gᵀ)."""
    if b <= _SKEW_MATMUL_MAX:
        return g.flatten(-2) @ _skew_constant("matmul", b, g.device, g.dtype).t()
    rows, cols = torch.triu_indices(b, b, 1, device=g.device)
    return (g - g.transpose(-1, -2)).flatten(-2).index_select(-1, rows * b + cols)
