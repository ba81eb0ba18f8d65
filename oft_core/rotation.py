"""OFT rotation math: constraint, Cayley / Cayley–Neumann, strength, and the two application paths.

One definition of each thing, used by every format, the ComfyUI patch, the baker and the trainer:

- constraint (`_constrain`): kohya/LyCORIS clamp ‖Q‖_F of a split at alpha·split_size,
  Q ← Q·(min(‖Q‖, c) + 1e-8)/(‖Q‖ + 1e-8) (sd-scripts `networks/oft.py`); PEFT COFT projects every block to
  ‖Q_i‖_F ≤ eps/√(stored blocks) (PEFT `_project_batch`); or none.
- rotation (`rotation_blocks`): R = (I + Q)(I − Q)⁻¹ (`_cayley`: Gauss–Jordan elimination vectorised over the batch
  for blocks of 8–15, a linear solve, the series Σ Q^j, or matmul-only block elimination for large blocks; the
  eliminations only while the blocks' norm is known to be small enough for them, `_cayley_method`), or the
  Cayley–Neumann series Σ c_k Q^k; always in fp32, whatever the stored dtype. With `sync_free` and gradients (and
  for blocks of 8–15 always) the Cayley map is differentiated in closed form (`_cayley_grad`:
  ∂L/∂Q = ½(I + R)ᵀ G (I + R)ᵀ, only R kept for backward), by `_CayleyMap` here and by the trainer's own node
  (`train._TrainedBlocks`, several layers at once: `_split_batches`).
- strength (`rotation_blocks`): mode "kohya" R_s = I + s(R − I), linear in the weight and what sd-scripts and
  LyCORIS do with their multiplier (the default: results match the trainer); mode "orthogonal" R_s = R(s·Q), a
  rotation for every s with R_0 = I, R_1 = R, R_−1 = Rᵀ. Strength 0 returns the input untouched in both modes.
- merge path (`rotate_weight`): W' = M·W (side "out") or W·M (side "in"), M = blockdiag(B).
- bypass path (`rotate_features`, `bypass_forward`): the same M applied to activations, never materialising W'.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from .choices import STRENGTH_MODES
from .errors import OFTError, _mismatch, check_strength
from .spec import OFTLayer

_StrengthMode = Literal["kohya", "orthogonal"]  # the values of choices.STRENGTH_MODES, for type checkers

# sd-scripts and LyCORIS add 1e-8 to the norm before dividing; kept so clamped layers match them.
_NORM_EPS = 1e-8


def _skew(a: torch.Tensor) -> torch.Tensor:
    """A − Aᵀ over the last two axes."""
    return a - a.transpose(-1, -2)


def _eye_like(q: torch.Tensor) -> torch.Tensor:
    return torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)


def _constrain(layer: OFTLayer, q: torch.Tensor, split: int) -> torch.Tensor:
    """Apply the layer's constraint to the generator `q` of split `split` (any leading batch axes).

    The arithmetic is in the helpers below (`_split_norm`, `_clamp_factor`, `_block_norms`, `_projected`), which the
    trainer's batched pass over many splits (`_SplitBatch.constrain`) calls too, with the per-split numbers side by
    side: one definition, the same values bit for bit."""
    c = layer.constraint
    if c.kind == "none":
        return q
    if c.kind == "norm_clamp":
        return q * _clamp_factor(_split_norm(q), _clamp_bound(c.value, layer.split_sizes[split]))
    # PEFT COFT: per-block projection onto the Frobenius ball of radius eps/√(stored blocks).
    return _projected(q, _block_norms(q), _projection_bound(c.value, q.shape[-3]))


def _clamp_bound(alpha: float, width: int) -> float:
    """The norm clamp's bound c = alpha·split width (host numbers)."""
    return alpha * width


def _split_norm(q: torch.Tensor) -> torch.Tensor:
    """The norm clamp's ‖q‖_F of one split's generator: one reduction per split, whoever calls it."""
    return torch.linalg.vector_norm(q.flatten())


def _clamp_factor(norm: torch.Tensor, bound) -> torch.Tensor:
    """s = (min(‖q‖, c) + ε)/(‖q‖ + ε): of one split (0-d `norm`, float c) or of several side by side ((K,) each)."""
    return (torch.clamp(norm, max=bound) + _NORM_EPS) / (norm + _NORM_EPS)


def _clamp_grad_terms(norm: torch.Tensor, bound, neg_bound_eps, dot: torch.Tensor):
    """(s, r) with ∂L/∂q = G·s + r·q for the norm clamp (`_constrain_grad`), of one split or of several side by
    side: r = ⟨G, q⟩·s'/‖q‖ where ‖q‖ > c, else 0, s' = −(c + ε)/(‖q‖ + ε)²; `neg_bound_eps` is −(c + ε) rounded
    once from the host number (as Python's float / tensor does: the reciprocal of the tensor times the float)."""
    out = norm > bound
    radial = ((norm + _NORM_EPS) ** 2 * torch.where(out, norm, 1.0)).reciprocal() * neg_bound_eps * dot
    return _clamp_factor(norm, bound), torch.where(out, radial, 0.0)


def _projection_bound(eps: float, stored_blocks: int) -> float:
    """PEFT COFT's radius eps/√(stored blocks) of a split (host numbers)."""
    return eps / math.sqrt(stored_blocks)


def _block_norms(q: torch.Tensor) -> torch.Tensor:
    """Each block's ‖q_i‖_F, kept as (…, 1, 1) (PEFT COFT): one reduction per block, however many are batched."""
    return torch.linalg.matrix_norm(q, keepdim=True)


def _projected(q: torch.Tensor, norms: torch.Tensor, bound) -> torch.Tensor:
    """COFT: each block inside the ball as it is, outside scaled onto it (`bound`: a float or one per block)."""
    return torch.where(norms <= bound, q, q * (norms.reciprocal() * bound))


def _projected_grad(q: torch.Tensor, g: torch.Tensor, norms: torch.Tensor, bound) -> torch.Tensor:
    """∂L/∂q of `_projected` given G (see `_constrain_grad`)."""
    inside = norms <= bound
    n = torch.where(inside, 1.0, norms)
    dots = (g * q).sum((-2, -1), keepdim=True)
    return torch.where(inside, g, (n.reciprocal() * bound) * (g - dots / n**2 * q))


def _constrain_grad(layer: OFTLayer, q: torch.Tensor, g: torch.Tensor, split: int) -> torch.Tensor:
    """∂L/∂q of `_constrain(layer, q, split)` given G = ∂L/∂(its result), in closed form (the trainer's block node:
    no autograd graph to build and walk per split), without reading any value on the host.

    norm_clamp, s = (min(‖q‖, c) + ε)/(‖q‖ + ε): G·s, plus when ‖q‖ > c (the clamp's own mask: at ‖q‖ ≤ c its
    derivative is 1 and s' = 0) the radial term ⟨G, q⟩·s'/‖q‖·q with s' = −(c + ε)/(‖q‖ + ε)². COFT, per block
    outside the ball (‖q_i‖ > c): (c/‖q_i‖)(G_i − ⟨G_i, q_i⟩ q_i/‖q_i‖²); inside, G_i. The trainer's block node
    takes the same helpers over many splits at once (`_SplitBatch.constrain_grad`)."""
    c = layer.constraint
    if c.kind == "none":
        return g
    if c.kind == "norm_clamp":
        bound = _clamp_bound(c.value, layer.split_sizes[split])
        scale, radial = _clamp_grad_terms(_split_norm(q), bound, -(bound + _NORM_EPS), (g * q).sum())
        return g * scale + radial * q
    return _projected_grad(q, g, _block_norms(q), _projection_bound(c.value, q.shape[-3]))


# Batched LU on CPU is not safe for large blocks: with torch 2.14.1 (MKL 2024.2) and more than one thread,
# torch.linalg.solve / inv on a batch of ≥ ~160×160 matrices fails ("Pivots given to lu_solve must all be ≥ 1")
# or, worse, returns wrong numbers (errors of 0.1 seen here); one matrix at a time is right. Large blocks cost
# O(b³) each, so the per-block loop costs nothing measurable there.
_CPU_BATCHED_SOLVE_MAX = 96


def _solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a⁻¹·b over the last two axes, batched where that is safe."""
    n = a.shape[-1]
    if a.device.type != "cpu" or n <= _CPU_BATCHED_SOLVE_MAX or a.ndim == 2:
        return torch.linalg.solve(a, b)
    lead = a.shape[:-2]
    a2, b2 = a.reshape(-1, n, n), b.expand(*lead, *b.shape[-2:]).reshape(-1, n, b.shape[-1])
    return torch.stack([torch.linalg.solve(x, y) for x, y in zip(a2, b2)]).reshape(*lead, n, b.shape[-1])


# Cayley blocks up to this size are solved by LAPACK in one batched call (cheap, and inside the safe batched range
# above); larger ones by `_inverse_positive_real`, whose leaves are again at most this size.
_CAYLEY_LEAF = 96


def _inverse_positive_real(a: torch.Tensor, *, sync_free: bool = False) -> torch.Tensor:
    """a⁻¹ over the last two axes, for matrices whose symmetric part is positive definite (here I − Q, Q skew).

    Recursive 2×2 block elimination without pivoting: X₁₁ = A₁₁⁻¹, S = A₂₂ − A₂₁X₁₁A₁₂, then the four blocks of A⁻¹
    from X₁₁, S⁻¹ and three products. Six half-size matmuls per level, 2b³ FLOPs in all, all of them batched
    matmuls; LAPACK's pivoted LU + solve (8/3·b³ FLOPs) runs at a quarter to a half of the matmul rate on CPU, so this
    is 1.5–2.5× faster for blocks of 160 and up (benchmarks/bench_patch.py). No pivoting is safe here: when the
    symmetric part of A is ≥ μI, so is that of every Schur complement (S⁻¹ is a principal block of A⁻¹), so no pivot
    can be small; for A = I − Q, μ = 1 and κ(A) = √(1 + ‖Q‖₂²). Differentiable (the trainer's large blocks use it).
    """
    n = a.shape[-1]
    if n <= _CAYLEY_LEAF:
        eye = _eye_like(a)
        e = eye - a
        doublings = None if sync_free else _neumann_doublings(e)
        if doublings is not None:  # (I − E)⁻¹ by the series, as `_cayley` does for small blocks
            return _series_inverse(eye, e, doublings)
        # Else LAPACK in fp64 (where the device has it): its fp32 inverse is off by up to ~8 ulp, which the levels
        # above would carry into R; in fp64 the result is as accurate as the fp32 solve of small blocks. `inv_ex`
        # skips the error check, which on a GPU would wait for the device (A is never singular here, see above).
        wide = torch.float64 if a.device.type in ("cpu", "cuda") else a.dtype
        return torch.linalg.inv_ex(a.to(wide))[0].to(a.dtype)
    h = n // 2
    a11, a12, a21, a22 = a[..., :h, :h], a[..., :h, h:], a[..., h:, :h], a[..., h:, h:]
    x11 = _inverse_positive_real(a11, sync_free=sync_free)
    t = x11 @ a12
    s_inv = _inverse_positive_real(a22 - a21 @ t, sync_free=sync_free)
    v = a21 @ x11
    y12 = -(t @ s_inv)
    top = torch.cat([x11 - y12 @ v, y12], -1)
    bottom = torch.cat([-(s_inv @ v), s_inv], -1)
    return torch.cat([top, bottom], -2)


# Panel width of `_solve_positive_real_`: its updates are matmuls with this inner dimension (≥ 128 runs near the
# matmul rate); each panel's diagonal block is inverted by `_inverse_positive_real`.
_SOLVE_PANEL = 192


def _solve_positive_real_(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w ← a⁻¹·w in place (batched (n, b, b) and (n, b, m)); `a` is overwritten. Same class of `a` as above.

    Blocked Gaussian elimination without pivoting (safe for the same reason as `_inverse_positive_real`): for each
    panel of rows, its diagonal block inverted, the panel scaled, the rows below updated (one matmul each for `a`
    and `w`); then back substitution, one matmul per panel. 2/3·b³ + 2·b²·m FLOPs, against 2·b³ + 2·b²·m for
    "build R, then multiply": a third less when b ≈ m (e.g. kohya dim 4–8 on FLUX / SD MLP layers).
    """
    b = a.shape[-1]
    starts = range(0, b, _SOLVE_PANEL)
    for k0 in starts:
        k1 = min(k0 + _SOLVE_PANEL, b)
        d_inv = _inverse_positive_real(a[:, k0:k1, k0:k1])
        w[:, k0:k1] = torch.bmm(d_inv, w[:, k0:k1])
        if k1 < b:
            a[:, k0:k1, k1:] = torch.bmm(d_inv, a[:, k0:k1, k1:])
            lower = a[:, k1:, k0:k1]
            a[:, k1:, k1:].baddbmm_(lower, a[:, k0:k1, k1:], alpha=-1)
            w[:, k1:].baddbmm_(lower, w[:, k0:k1], alpha=-1)
    for k0 in reversed(starts):
        if k0:
            w[:, :k0].baddbmm_(a[:, :k0, k0 : min(k0 + _SOLVE_PANEL, b)], w[:, k0 : k0 + _SOLVE_PANEL], alpha=-1)
    return w


def _cayley(q: torch.Tensor, *, norm_bound: float | None = None, sync_free: bool = False) -> torch.Tensor:
    """R = (I + Q)(I − Q)⁻¹ for skew-symmetric Q.

    With `sync_free=True` and gradients wanted the same R comes through `_CayleyMap`, whose backward is the closed
    form of the Cayley map's derivative instead of autograd through the solve / series / elimination (values
    identical: the forward is this function's own method, run without gradients); so do blocks of 8–15 always (in
    `_cayley_value`: their elimination works in place, autograd cannot go through it). The trainer itself goes through
    `train._TrainedBlocks`, which uses the same closed form (`_cayley_grad`) for all of a block's layers at once.
    """
    if sync_free and q.requires_grad and torch.is_grad_enabled():
        return _CayleyMap.apply(q, norm_bound, sync_free)
    return _cayley_value(q, norm_bound=norm_bound, sync_free=sync_free)


class _CayleyMap(torch.autograd.Function):
    """R = Cayley(Q) with the closed-form backward; keeps only R for backward (no LU, pivots or series terms).

    With A = I − Q: R = 2A⁻¹ − I, so dR = 2A⁻¹·dQ·A⁻¹ and, for the loss gradient G = ∂L/∂R,
    ∂L/∂Q = 2A⁻ᵀ G A⁻ᵀ = ½(I + R)ᵀ G (I + R)ᵀ, as A⁻¹ = (I + R)/2. Two batched matmuls whatever method made R (all
    give Cayley(Q) to fp32 rounding). Like autograd through the solve, this is the gradient for a general Q (the
    skew projection is the caller's `_skew`). R is saved as this Function's output, so a double backward still
    differentiates through it correctly.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, norm_bound: float | None, sync_free: bool) -> torch.Tensor:
        r = _cayley_value(q, norm_bound=norm_bound, sync_free=sync_free)  # (no gradient mode in here)
        ctx.save_for_backward(r)
        return r

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (r,) = ctx.saved_tensors
        return _cayley_grad(r, g), None, None


def _cayley_grad(r: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """∂L/∂Q from G = ∂L/∂R for R = Cayley(Q): ½(I + R)ᵀ G (I + R)ᵀ (see `_CayleyMap`)."""
    p = (r + _eye_like(r)).transpose(-1, -2)  # (I + R)ᵀ = 2A⁻ᵀ
    return 0.5 * (p @ g @ p)


def _cayley_value(q: torch.Tensor, *, norm_bound: float | None = None, sync_free: bool = False) -> torch.Tensor:
    """`_cayley`'s value: R = (I + Q)(I − Q)⁻¹ for skew-symmetric Q.

    R = 2(I − Q)⁻¹ − I (the same matrix: (I + Q) = 2I − (I − Q)), with the inverse from matmuls: for large blocks by
    block elimination (`_inverse_positive_real`), for blocks of 17–96 by the series Σ Q^j while it converges within a
    few doublings (`_neumann_doublings`); blocks of 8–15 by Gauss–Jordan elimination vectorised over the batch
    (`_cayley_eliminated`); otherwise (I − Q)⁻¹(I + Q) by LAPACK's pivoted solve (`_cayley_solved`). The two
    eliminations do not pivot, so their error grows with ‖Q‖ faster than the solve's: each is taken only while every
    block's ‖Q_i‖_F is known to be at most its `_ELIMINATION_MAX_NORM` / `_BLOCK_ELIMINATION_MAX_NORM`, where it is
    as accurate as the solve (a file's huge generators get the solve, not NaN). All agree to fp32 rounding
    (tests/test_rotation.py, tests/test_cayley_small.py). The method (`_cayley_method`) depends on the block size and
    that norm, never on the number of blocks, so a batch of several layers' blocks gives each layer's values bit for
    bit (the trainer's block node, `_split_batches`).

    The norm: without `sync_free`, max_i ‖Q_i‖_F read from `q` (one host read, where the size leaves a choice);
    with `sync_free=True` (the trainer's step, so that on a GPU the step never waits for the device) `norm_bound`,
    a bound on every block's ‖Q_i‖_F known from the constraint, or None (unknown: the solve, no error check).
    """
    b = q.shape[-1]
    if _eliminates(b) and q.requires_grad and torch.is_grad_enabled():
        return _CayleyMap.apply(q, norm_bound, sync_free)  # in place: differentiated in closed form, not by autograd
    how = _cayley_method(b, norm_bound if sync_free else _max_block_norm(q, b))
    if how == "eliminate":
        return _cayley_eliminated(q)
    eye = _eye_like(q)
    if how == "blocks":
        return 2 * _inverse_positive_real(eye - q, sync_free=sync_free) - eye
    if how == "solve":
        return _cayley_solved(q, eye, sync_free)
    return 2 * _series_inverse(eye, q, how[1]) - eye


def _cayley_solved(q: torch.Tensor, eye: torch.Tensor, sync_free: bool) -> torch.Tensor:
    """(I − Q)⁻¹(I + Q) by LAPACK's pivoted LU, accurate whatever ‖Q‖: `_solve` (errors checked), or with
    `sync_free` `solve_ex` (no error check, which on a GPU would wait for the device; I − Q is never singular), one
    matrix at a time for large blocks on a CPU (`_CPU_BATCHED_SOLVE_MAX`)."""
    a, rhs = eye - q, eye + q
    if not sync_free:
        try:
            return _solve(a, rhs)
        except RuntimeError as e:  # torch.linalg.LinAlgError: I − Q singular in float32 (where LAPACK notices)
            rho = float(torch.linalg.matrix_norm(q.detach()).max())
            raise OFTError(_mismatch("the Cayley map of the generators", "I − Q invertible in float32 (it is for "
                                     "trained rotations, ‖Q_i‖_F of order 1)",
                                     f"I − Q singular in float32 with ‖Q_i‖_F up to {rho:.3g} (from ~10⁷ on, I − Q "
                                     "rounds to −Q, singular for an odd block size): the file is damaged or its "
                                     "training diverged")) from e
    n = a.shape[-1]
    if a.device.type == "cpu" and n > _CPU_BATCHED_SOLVE_MAX and a.ndim > 2:
        pairs = zip(a.reshape(-1, n, n), rhs.reshape(-1, n, n))
        return torch.stack([torch.linalg.solve_ex(x, y)[0] for x, y in pairs]).reshape(a.shape)
    return torch.linalg.solve_ex(a, rhs)[0]


def _max_block_norm(q: torch.Tensor, b: int) -> float | None:
    """max_i ‖Q_i‖_F read from `q` (a host read) where the block size leaves `_cayley_method` a choice, else None
    (not read). Inf / NaN (an overflowing norm) are returned as they are: no method's bound admits them."""
    if (b <= _NEUMANN_MIN_BLOCK and not _eliminates(b)) or q.numel() == 0:
        return None
    return float(torch.linalg.matrix_norm(q.detach()).max())


# Blocks of these sizes take `_cayley_eliminated`. LAPACK's batched solve of 8×8 fp32 matrices (MKL 2024.2) is an
# outlier: ~2.3 µs a matrix against ~0.45 µs at 7×7 and ~1.4 µs at 9×9 (its getrs, not getrf); the elimination costs
# O(b³) elementwise work and beats it from ~100 blocks for b = 8 (2688 blocks: 6.0 → 1.9 ms, one thread) and from a
# few hundred for 9–15; at b ≤ 7 LAPACK costs ≤ 1.2 ms for 2688 blocks (the elimination would save a few tenths of a
# ms there and lose on small batches), at b = 16 it is as fast (BENCHMARKS.md, "The Cayley map of small blocks").
_ELIMINATION_MIN_BLOCK, _ELIMINATION_MAX_BLOCK = 8, 15


def _eliminates(b: int) -> bool:
    """Whether blocks of size b are made by `_cayley_eliminated` while their norm allows (`_ELIMINATION_MAX_NORM`),
    and always differentiated in closed form (`_CayleyMap`)."""
    return _ELIMINATION_MIN_BLOCK <= b <= _ELIMINATION_MAX_BLOCK


# The two eliminations without pivoting are taken only for blocks whose ‖Q_i‖_F is known to be at most these (a
# constraint's bound, or the norm read from a file's generators); above, LAPACK's pivoted solve. Their error grows
# with ‖Q‖ where the solve's stays flat, and a file's finite but huge generators turned them into NaN (8×8 blocks at
# ‖Q_i‖_F = 1e30) or into matrices that are not rotations (300×300 at 1e8: errors of 13). Max error against fp64,
# fp32, over ‖Q_i‖_F (tests/test_cayley_small.py and tests/test_rotation.py hold the limits):
# - blocks of 8–15 (3000 random blocks of each size per norm, two draws): elimination / solve 1.0–1.1× at 1,
#   ≤ 1.04× at 10, ≤ 1.8× at 16, 2.3–2.4× at 20, ≤ 2.7× at 22–24 (≤ 2.9e-6), 3.8× at 28, 3.4–5.3× at 32, 7.7× at 100
#   (3.2e-5), 7e-5 at 1e4: limit 24, where the elimination's worst case stays within 3× the solve's, at a few fp32
#   ulps of the rotation's entries (the trainers' own fp32 products round more);
# - blocks of 97–640 (`_inverse_positive_real`, its leaves inverted in fp64): at or below the fp32 solve's error up
#   to 1000 (≤ 5.1e-6), 1.5–5.6× above it at 3000, 1e-3 at 1e4 (b = 300): limit 1000.
# Training bounds (alpha·split width) stay below both for kohya's alpha = 1e-3 up to 24000-wide splits (FLUX.1's
# widest output, linear1 fused: 21504). At a limit of 16 the FLUX race's 18432-wide modulations and fused linear1 took
# the solve: its block nodes' forward took 120–136 ms a step, 74 at 24.
_ELIMINATION_MAX_NORM = 24.0
_BLOCK_ELIMINATION_MAX_NORM = 1000.0


def _cayley_eliminated(q: torch.Tensor) -> torch.Tensor:
    """R = (I − Q)⁻¹(I + Q) for skew-symmetric Q (…, b, b) by Gauss–Jordan elimination on [I − Q | I + Q] WITHOUT
    pivoting, vectorised over the batch: b steps of four tensor ops, no LAPACK, no host read, any device and float
    dtype; in place, so not for autograd (`_cayley` routes gradients through `_CayleyMap`).

    No pivoting is safe because the symmetric part of I − Q is I: so is that of every Schur complement, no pivot is
    below 1 (see `_inverse_positive_real`). Its growth does grow with ‖Q‖ (pivoted LU's error ∝ κ(A) = √(1 + ‖Q‖₂²)
    ε, this one's ∝ ‖Q‖² ε): against fp64 its max error is the fp32 LAPACK solve's (0.6–1.2× of it, ≤ 5.2·10⁻⁷) for
    ‖Q‖_F up to 5, ≤ 2.7× at 24, 3–7.5× at 100 (3.2·10⁻⁵; 3000 random blocks of each size 8–15 per norm), NaN at
    1e30: `_cayley_value` takes it only up to `_ELIMINATION_MAX_NORM` (tests/test_cayley_small.py). Q = 0 gives I
    exactly.

    The batch is the innermost (contiguous) axis of the working copy (b, 2b, n), so every op runs over n contiguous
    numbers whatever b (on a CPU in pieces that stay in cache: `_ELIMINATION_PIECE_ELEMENTS`). Each update is one
    fused multiply-add (`addcmul_`), rounded once in its vectorised and scalar loops alike, so a matrix's values do
    not depend on where it sits in the batch or in a piece (pinned for this build by tests/test_cayley_small.py): a
    batch of several layers' blocks gives each layer's values bit for bit.
    """
    b = q.shape[-1]
    flat = q.reshape(-1, b, b)
    n = flat.shape[0]
    piece = max(1, n if q.device.type != "cpu" else _ELIMINATION_PIECE_ELEMENTS // (2 * b * b))
    out = torch.empty(flat.shape, dtype=q.dtype, device=q.device)  # contiguous, whatever the input's layout
    for start in range(0, n, piece):
        out[start : start + piece] = _eliminated_piece(flat[start : start + piece])
    return out.view(q.shape)


# On a CPU `_cayley_eliminated` works through the batch in pieces whose working copy (b, 2b, pieces) is 2¹⁸ numbers
# (1 MiB in fp32) so that it stays in cache: 11520 blocks of 8 (a FLUX double block's layers) 15.5 → 6.6–8 ms, one
# thread; below ~4000 blocks of 8 one piece is as fast. Elsewhere the whole batch is one piece (fewer launches).
_ELIMINATION_PIECE_ELEMENTS = 1 << 18


def _eliminated_piece(flat: torch.Tensor) -> torch.Tensor:
    """`_cayley_eliminated` of (n, b, b) blocks in one working copy; returns a (n, b, b) view of it."""
    b = flat.shape[-1]
    qt = flat.permute(1, 2, 0)  # (b, b, n): a view
    m = torch.empty(b, 2 * b, qt.shape[-1], dtype=flat.dtype, device=flat.device)
    torch.neg(qt, out=m[:, :b])
    m[:, b:] = qt
    m[:, :b].diagonal(0, 0, 1).add_(1)
    m[:, b:].diagonal(0, 0, 1).add_(1)
    for k in range(b):
        # Row k divided by its pivot, then subtracted from every other row; column k of the left half (now e_k) is
        # never read again, so it is not written.
        pivot_row = m[k, k + 1 :] / m[k, k]
        m[:, k + 1 :].addcmul_(m[:, k, None].clone(), pivot_row, value=-1)
        m[k, k + 1 :] = pivot_row
    return m[:, b:].permute(2, 0, 1)


def _series_inverse(eye: torch.Tensor, e: torch.Tensor, doublings: int) -> torch.Tensor:
    """(I − E)⁻¹ = Σ_j E^j = (I + E)(I + E²)(I + E⁴)…, 2^(doublings + 1) terms: only batched matmuls."""
    x, power = eye + e, e
    for _ in range(doublings):
        power = power @ power
        x = x + x @ power
    return x


# Small blocks: LAPACK's batched solve costs 12–17 matmuls of the same size on CPU (its getrs dominates), so while
# the series (I − Q)⁻¹ = Σ Q^j converges fast enough, a few doublings of it are cheaper; its truncation error is held
# under 2⁻²⁵ (a quarter ulp of 1 in fp32), so both give R to fp32 rounding. Past 3 doublings (16 terms: ‖Q‖₂ ≲ 0.33)
# the solve is cheaper again. Measured: 8×40 blocks 237 → 138 µs, 32×96 6.7 → 2.7 ms, and closer to fp64.
_NEUMANN_MAX_DOUBLINGS = 3
# Blocks up to 16 never take the series: the solve (b ≤ 7, 16) or the elimination (8–15), whatever the bound. (Where
# a bound allows ≤ 3 doublings the series would be cheaper for small batches, 0.05 against 0.2 ms for 40 blocks of 8,
# even or slower from ~3000; the races' bounds allow it only for SD's 320-wide layers: not taken, BENCHMARKS.md.)
_NEUMANN_MIN_BLOCK = 16
_NEUMANN_TAIL = 2.0**-25


def _neumann_doublings(q: torch.Tensor) -> int | None:
    """How many doublings (I + Q^(2^k)) make Σ_j Q^j exact to fp32, from ρ = max_i ‖Q_i‖_F ≥ ‖Q_i‖₂; None: too many."""
    if q.numel() == 0:
        return None
    return _doublings_for(float(torch.linalg.matrix_norm(q.detach()).max()))


def _doublings_for(rho: float) -> int | None:
    """`_neumann_doublings` for blocks whose ‖Q_i‖_F are at most `rho` (a host number: no device read)."""
    if not math.isfinite(rho) or rho >= 0.5:
        return None
    if rho == 0:
        return 0
    terms = math.log(_NEUMANN_TAIL * (1 - rho)) / math.log(rho)  # ρ^N / (1 − ρ) ≤ tail for N ≥ terms
    doublings = max(0, math.ceil(math.log2(max(terms, 1.0))) - 1)  # N = 2^(doublings + 1)
    return doublings if doublings <= _NEUMANN_MAX_DOUBLINGS else None


def _neumann(q: torch.Tensor, coeffs: Sequence[float]) -> torch.Tensor:
    """Σ_k c_k Q^k: the truncated Cayley–Neumann series of OFTv2 / PEFT (coefficients as the file's PEFT used)."""
    r = coeffs[0] * _eye_like(q)
    power = None
    for c in coeffs[1:]:
        power = q if power is None else power @ q
        r = r + c * power
    return r


def _param(layer: OFTLayer, q: torch.Tensor, *, norm_bound: float | None = None, sync_free: bool = False
           ) -> torch.Tensor:
    if layer.parameterization == "cayley":
        return _cayley(q, norm_bound=norm_bound, sync_free=sync_free)
    if layer.parameterization == "neumann":
        return _neumann(q, layer.neumann_coeffs)
    return q  # "matrix": the file stores R itself


def _generator_of(r: torch.Tensor, *, layer: str | None = None) -> torch.Tensor:
    """Q with Cayley(Q) = R for a stored rotation R (inverse Cayley: Q = (R − I)(R + I)⁻¹).

    A block with an eigenvalue −1 (a half turn, e.g. R = −I, a valid rotation) has no generator: R + I is singular
    (LAPACK stops, or returns Inf / NaN when rounding hides it). `OFTError` naming `layer`, never torch's error."""
    eye = _eye_like(r)
    try:
        q = _solve(r + eye, r - eye)  # (R + I)⁻¹(R − I): the factors commute
    except RuntimeError:  # torch.linalg.LinAlgError: R + I singular
        q = None
    if q is None or not bool(torch.isfinite(q).all()):
        raise OFTError("the stored rotation turns some block by half a turn (eigenvalue −1, R + I singular): it has "
                       "no Cayley generator, so R to a power (orthogonal strength, a merge weight other than 1) is "
                       "not defined for it; use strength mode kohya", layer=layer)
    return q


def rotation_blocks(
    layer: OFTLayer,
    strength: float = 1.0,
    mode: _StrengthMode = "kohya",
    *,
    blocks: Sequence[torch.Tensor] | None = None,
    sync_free: bool = False,
) -> list[torch.Tensor]:
    """The blocks B of M = blockdiag(B) per split, fp32, shape (num_blocks, b, b) (butterfly: (stages, n, b, b)).

    `blocks` overrides the layer's stored blocks (the trainer passes its live generators Q; gradients flow).
    `sync_free` (the trainer): no value is read back to the host; the Cayley method is chosen from the shapes and
    the constraint's bound on ‖Q‖ (`_cayley`).
    """
    strength = check_strength(strength)
    if mode not in STRENGTH_MODES:
        raise OFTError(_mismatch("strength mode", " | ".join(STRENGTH_MODES), repr(mode)))
    gens = layer.blocks if blocks is None else blocks
    out = []
    for i, q in enumerate(gens):
        try:
            out.append(_split_rotation(layer, q, i, strength, mode, sync_free))
        except OFTError as e:
            if e.layer is not None or e.path is not None:
                raise
            raise OFTError(e.detail, layer=layer.key) from e
    return out


def _split_rotation(layer: OFTLayer, q: torch.Tensor, i: int, strength: float, mode: str, sync_free: bool
                    ) -> torch.Tensor:
    """`rotation_blocks` of split i (generators `q`)."""
    q = _constrain(layer, q.to(torch.float32), i)
    if mode == "orthogonal" and layer.parameterization == "matrix":
        r = _matrix_power(layer, q, strength) if strength != 1 else q
    elif mode == "orthogonal":
        bound = _norm_bound(layer, q, i)
        scaled = q * strength if strength != 1 else q
        if scaled is not q and bound is None and not sync_free and not bool(torch.isfinite(scaled).all()):
            # an unconstrained Q near float32's limit (a constraint bounds it: no read then) times the strength
            raise OFTError(f"the layer's generator Q times strength {strength:g} (orthogonal mode) overflows "
                           f"float32 (largest |Q| {float(q.abs().max()):.3g}); use a strength closer to 1 or "
                           "strength mode kohya", layer=layer.key)
        r = _param(layer, scaled, sync_free=sync_free, norm_bound=None if bound is None else bound * abs(strength))
    else:
        r = _param(layer, q, norm_bound=_norm_bound(layer, q, i), sync_free=sync_free)
        if strength != 1:
            eye = _eye_like(r)
            r = eye + strength * (r - eye)
    if layer.parameterization != "cayley" and not sync_free:
        _check_finite_rotation(layer, r, strength, mode)
    if layer.transpose:
        r = r.transpose(-1, -2)
    if layer.kind == "diag" and r.shape[0] != layer.num_blocks[i]:  # PEFT block_share
        r = r.expand(layer.num_blocks[i], -1, -1)
    return r


def _matrix_power(layer: OFTLayer, r: torch.Tensor, strength: float) -> torch.Tensor:
    """A stored R ("matrix") at orthogonal strength s: Cayley(s·Q), Q its inverse Cayley. LyCORIS 2.0 trained R as a
    free matrix, so Q need not be skew, and I − s·Q can be singular (an eigenvalue λ of R with (λ − 1)/(λ + 1) =
    1/s, e.g. R = 3I at s = 2): refused naming the layer instead of torch's solver error or NaN."""
    q = _generator_of(r, layer=layer.key) * strength
    try:
        out = _cayley(q)
    except (RuntimeError, OFTError):  # torch.linalg.LinAlgError (or `_cayley_solved`'s OFTError): I − s·Q singular
        out = None
    if out is None or not bool(torch.isfinite(out).all()):
        raise OFTError(f"the stored matrix (LyCORIS oft_diag) has no orthogonal power at strength {strength:g}: it is "
                       "not a rotation, and I − s·Q (Q its inverse Cayley) is singular there; use strength mode "
                       "kohya or another strength", layer=layer.key)
    return out


def _check_finite_rotation(layer: OFTLayer, r: torch.Tensor, strength: float, mode: str) -> None:
    """A Cayley–Neumann series or a stored R at a strength ≠ 1 can overflow float32 although the file's values are
    finite (their size is checked at strength 1 when the file is read, `spec._check_magnitudes`): refused here,
    naming the layer, before any weight is written and in the bypass path too (which has no result to check). One
    host read per split; never on the trainer's `sync_free` path, and the Cayley map (always finite) has none."""
    if not bool(torch.isfinite(r).all()):
        what = "Cayley–Neumann series" if layer.parameterization == "neumann" else "stored rotation matrix"
        raise OFTError(f"the layer's {what} overflows float32 at strength {strength:g} ({mode} mode): its rotation "
                       "holds Inf / NaN; use a strength closer to 1", layer=layer.key)


def _cayley_method(b: int, rho: float | None):
    """How `_cayley_value` makes blocks of size b whose ‖Q_i‖_F are all at most `rho` (None: not known): "blocks"
    (`_inverse_positive_real`), "eliminate" (`_cayley_eliminated`), ("series", doublings) or "solve". The one rule,
    used by `_cayley_value` and by `_split_batches` to batch splits that take the same method (every method works
    matrix by matrix, so the values are the same bit for bit)."""
    if b > _CAYLEY_LEAF:
        return "blocks" if rho is not None and rho <= _BLOCK_ELIMINATION_MAX_NORM else "solve"
    if _eliminates(b):
        return "eliminate" if rho is not None and rho <= _ELIMINATION_MAX_NORM else "solve"
    doublings = None if b <= _NEUMANN_MIN_BLOCK or rho is None else _doublings_for(rho)
    return "solve" if doublings is None else ("series", doublings)


def _split_key(layer: OFTLayer, split: int, stored_blocks: int, dtype: torch.dtype, device: torch.device) -> tuple:
    """What `_split_batches` needs of one split (host numbers only): (b, stored blocks, constraint kind and value,
    split width, transpose, dtype and device of the tensor it comes from)."""
    c = layer.constraint
    return (layer.block_sizes[split], stored_blocks, c.kind, c.value, layer.split_sizes[split], layer.transpose,
            dtype, device)


@functools.lru_cache(maxsize=256)
def _split_batches(keys: tuple[tuple, ...]) -> tuple[_SplitBatch, ...]:
    """The splits described by `keys` (`_split_key`, one per split) in batches of one block size and one Cayley
    method (`_cayley_method` of the split's bound; and one dtype and device), each ordered by constraint kind, so
    that each kind is one contiguous run of blocks. One batch per method, not per block size: a batch's blocks are
    then one Cayley call's result as it comes (FLUX's fused 21504-wide layers take the solve beside the elimination
    of the others; one batch for both would copy all its blocks once more, to put them back in one tensor).
    Cached: a trainer's nodes repeat a few layouts, and the batches hold their per-split constants on the device
    (made once, never read back)."""
    groups: dict = {}
    for k, (b, n, kind, value, width, _transpose, dtype, device) in enumerate(keys):
        bound = _constraint_bound(kind, value, width, n)
        by_kind = groups.setdefault((b, _cayley_method(b, bound), dtype, device), {})
        by_kind.setdefault(kind, []).append((k, bound))
    return tuple(_SplitBatch(b, device, by_kind, keys) for (b, _, _, device), by_kind in groups.items())


class _SplitBatch:
    """Splits of one block size and Cayley method made together: their generators concatenated (`positions`: the
    splits in batch order, `counts`: their blocks), constrained in one pass per constraint kind with the per-split
    numbers side by side (`constrain`, `constrain_grad`), mapped by one Cayley call (`rotations`). Elementwise ops
    give every block the bits it gets alone; the reductions stay per split (the clamp's ‖q‖_F and ⟨G, q⟩:
    `_split_norm` and a sum over the split, on the same numbers as `_constrain`) or per block (COFT), as `_constrain`
    does them; the method depends on b and the bound alone, never on the batch (`_cayley_value`)."""

    def __init__(self, b: int, device: torch.device, by_kind: dict, keys: tuple[tuple, ...]):
        self.b = b
        positions, counts, transposed, kinds, bounds = [], [], [], [], []
        start = 0
        for kind, members in by_kind.items():
            kind_start, first = start, len(counts)
            for k, bound in members:
                positions.append(k)
                counts.append(keys[k][1])
                transposed.append(keys[k][5])
                bounds.append(bound)
                start += keys[k][1]
            run = [keys[k] for k in positions[first:]]
            kinds.append((kind, kind_start, start, tuple(counts[first:]), _kind_constants(kind, run, device)))
        self.positions, self.counts, self.transposed = tuple(positions), tuple(counts), tuple(transposed)
        self.total = start
        self.kinds = tuple(kinds)
        # the members' largest bound takes their method (None: every member's is unknown or too large)
        self.bound = None if None in bounds else max(bounds)

    def _run(self, t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return t if start == 0 and stop == self.total else t[start:stop]

    def constrain(self, q: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """`_constrain` of every split of fp32 generators `q` (batch order), and per kind what `constrain_grad`
        takes of this pass (the clamp's per-split norms, COFT's per-block norms)."""
        pieces, kept = [], []
        for kind, start, stop, counts, consts in self.kinds:
            qk = self._run(q, start, stop)
            if kind == "norm_clamp" and len(counts) == 1:  # one split: its (1,) numbers broadcast as they are
                norms = _split_norm(qk)
                pieces.append(qk * _clamp_factor(norms, consts[0]))
            elif kind == "norm_clamp":
                bounds, _, index = consts
                norms = torch.stack([_split_norm(v) for v in qk.split(counts)])
                pieces.append(qk * _clamp_factor(norms, bounds).index_select(0, index).view(-1, 1, 1))
            elif kind == "block_projection":
                norms = _block_norms(qk)
                pieces.append(_projected(qk, norms, consts))
            else:
                norms = None
                pieces.append(qk)
            kept.append(norms)
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)), kept

    def constrain_grad(self, q: torch.Tensor, g: torch.Tensor, kept: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """`_constrain_grad` of every split: ∂L/∂q given G = ∂L/∂(`constrain`'s result), q the generators before it."""
        pieces = []
        for (kind, start, stop, counts, consts), norms in zip(self.kinds, kept):
            qk, gk = self._run(q, start, stop), self._run(g, start, stop)
            if kind == "norm_clamp":
                bounds, neg_bound_eps, index = consts
                if len(counts) == 1:
                    scale, radial = _clamp_grad_terms(norms, bounds, neg_bound_eps, (gk * qk).sum())
                else:
                    dots = torch.stack([v.sum() for v in (gk * qk).split(counts)])
                    terms = torch.stack(_clamp_grad_terms(norms, bounds, neg_bound_eps, dots))
                    scale, radial = terms.index_select(1, index).view(2, -1, 1, 1)
                pieces.append(gk * scale + radial * qk)
            elif kind == "block_projection":
                pieces.append(_projected_grad(qk, gk, norms, consts))
            else:
                pieces.append(gk)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def rotations(self, q: torch.Tensor) -> torch.Tensor:
        """Cayley(q) of constrained generators (batch order, untransposed), in one `_cayley_value` call."""
        return _cayley_value(q, norm_bound=self.bound, sync_free=True)

    def blocks(self, r: torch.Tensor) -> list[torch.Tensor]:
        """Each split's blocks (batch order) from `rotations`' result: views, transposed for transposed layers."""
        return [x.transpose(-1, -2) if t else x for x, t in zip(r.split(self.counts), self.transposed)]


def _kind_constants(kind: str, run: Sequence[tuple], device: torch.device):
    """A kind's per-split numbers on the device, made once per batch layout (no host read): the clamp's bounds c,
    −(c + ε) (rounded from the host number, as `_constrain_grad` does) and each block's split; COFT's radius per
    block, (N, 1, 1)."""
    if kind == "none":
        return None
    with torch.inference_mode(False), torch.no_grad():
        if kind == "norm_clamp":
            bounds = [_clamp_bound(value, width) for _, _, _, value, width, *_ in run]
            index = torch.repeat_interleave(torch.arange(len(run)), torch.tensor([key[1] for key in run]))
            return (torch.tensor(bounds, dtype=torch.float32).to(device),
                    torch.tensor([-(c + _NORM_EPS) for c in bounds], dtype=torch.float32).to(device),
                    index.to(device))
        radii = [_projection_bound(value, n) for _, n, _, value, *_ in run]
        per_block = torch.repeat_interleave(torch.tensor(radii, dtype=torch.float32), torch.tensor([k[1] for k in run]))
        return per_block.view(-1, 1, 1).to(device)


def _norm_bound(layer: OFTLayer, q: torch.Tensor, split: int) -> float | None:
    """A bound on every block's ‖Q_i‖_F after `_constrain` (host numbers only), or None without a constraint."""
    c = layer.constraint
    return _constraint_bound(c.kind, c.value, layer.split_sizes[split], q.shape[-3])


# From about this ‖Q_i‖_F on, the float32 I − Q of `_cayley_solved` loses its identity to rounding (it rounds to −Q
# from ~10⁷, singular for an odd block size) and LAPACK may report it singular (measured: 1e8, blocks of 3 and 9);
# below it the solve never fails (‖Q_i‖_F ≤ 10⁷ never did in 3000 random blocks of each size 2–16).
_SOLVE_SAFE_NORM = 1e6


def cayley_may_fail(layer: OFTLayer, strength: float = 1.0, mode: str = "kohya") -> bool:
    """Whether building `layer`'s Cayley blocks at `strength` in strength `mode` can stop with `_cayley_solved`'s
    OFTError (some block's ‖Q_i‖_F, after the constraint and times the strength in orthogonal mode, beyond
    `_SOLVE_SAFE_NORM`): a host that builds the rotations later, while sampling (ComfyUI), builds such a layer's
    before any weight is patched, so that a damaged file is refused by the node. Reads each split's norms only
    when its constraint does not bound them (an unconstrained file); False for layers of other parameterizations."""
    if layer.parameterization != "cayley":
        return False
    scale = abs(strength) if mode == "orthogonal" else 1.0
    for i, g in enumerate(layer.blocks):
        bound = _norm_bound(layer, g, i)
        if bound is not None and bound * scale <= _SOLVE_SAFE_NORM:
            continue
        if g.numel() and float(torch.linalg.matrix_norm(g.detach().float()).max()) * scale > _SOLVE_SAFE_NORM:
            return True
    return False


def _constraint_bound(kind: str, value: float, width: int, stored_blocks: int) -> float | None:
    """`_norm_bound` from the split's numbers."""
    if kind == "none":
        return None
    if kind == "norm_clamp":  # the whole split's ‖Q‖_F ≤ bound, so every block's too (plus the 1e-8 of the clamp)
        return value * width * (1 + 1e-6) + _NORM_EPS
    return value / math.sqrt(stored_blocks) * (1 + 1e-6)


def _butterfly_index(dim: int, stage: int, block: int, device, style: str = "lycoris",
                     stages: int = 1) -> torch.Tensor:
    """Gather index G of a BOFT stage (the stage is Gᵀ·blockdiag(B)·G: rows gathered by G, multiplied, put back).
    LyCORIS stage `stage`: (c g k) -> (c k g) with g = 2, k = 2^stage · block/2. PEFT (`style` "peft", `stages`
    factors, stored reversed): factor f = stages − 1 − stage, whose block butterfly permutation P (PEFT's
    `block_butterfly_perm`, P[j, perm[j]] = 1) takes, within each group of block · 2^f rows, its chunks of block/2
    rows in the order even chunks, then odd ones; the stage is P·B·Pᵀ, so G = Pᵀ, the inverse permutation (factor 0,
    and a single factor, leave the rows in place)."""
    if style == "peft":
        factor = stages - 1 - stage
        if stages == 1 or factor == 0:
            return torch.arange(dim, device=device)
        chunk = block // 2
        order = torch.cat([torch.arange(0, 2 ** (factor + 1), 2), torch.arange(1, 2 ** (factor + 1), 2)])
        within = (order[:, None] * chunk + torch.arange(chunk)).reshape(-1)  # perm inside one group
        group = within.numel()
        perm = (torch.arange(0, dim, group)[:, None] + within).reshape(-1)
        return torch.argsort(perm).to(device)
    k = (2**stage) * (block // 2)
    return torch.arange(dim, device=device).view(-1, 2, k).transpose(1, 2).reshape(-1)


def apply_rows(layer: OFTLayer, blocks: list[torch.Tensor], w: torch.Tensor, *, transpose: bool = False
               ) -> torch.Tensor:
    """M·w for a 2-D fp32 `w` whose rows are the rotated axis (`transpose`: Mᵀ·w; for BOFT the stages taken in
    reverse order, each transposed)."""
    if layer.kind == "butterfly":
        r = blocks[0]
        n, b = layer.num_blocks[0], layer.block_sizes[0]
        stages = range(r.shape[0])
        for stage in reversed(stages) if transpose else stages:
            idx = _butterfly_index(w.shape[0], stage, b, w.device, layer.butterfly, r.shape[0])
            block = r[stage].transpose(-1, -2) if transpose else r[stage]
            rotated = torch.bmm(block, w[idx].view(n, b, -1)).reshape(w.shape)
            w = torch.empty_like(rotated).index_copy_(0, idx, rotated)
        return w
    parts = []
    start = 0
    for r, n, b in zip(blocks, layer.num_blocks, layer.block_sizes):
        rows = w[start : start + n * b]
        parts.append(torch.bmm(r.transpose(-1, -2) if transpose else r, rows.reshape(n, b, -1)).reshape(n * b, -1))
        start += n * b
    return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


def _apply_last(layer: OFTLayer, blocks: list[torch.Tensor], t: torch.Tensor, *, right: bool = False) -> torch.Tensor:
    """M applied to the last axis of `t`: each row vector v -> M v, or v -> v·M with `right` (the weight W·M)."""
    lead = t.shape[:-1]
    flat = t.reshape(-1, t.shape[-1])
    if layer.kind == "butterfly":  # v·M = (Mᵀ·vᵀ)ᵀ (`right`); M·v otherwise
        return apply_rows(layer, blocks, flat.t(), transpose=right).t().reshape(*lead, -1)
    parts = []
    start = 0
    for r, n, b in zip(blocks, layer.num_blocks, layer.block_sizes):
        cols = flat[:, start : start + n * b].reshape(-1, n, b).transpose(0, 1)  # (n, N, b)
        parts.append(torch.bmm(cols, r if right else r.transpose(-1, -2)).transpose(0, 1).reshape(-1, n * b))
        start += n * b
    out = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    return out.reshape(*lead, -1)


def _row_scale(layer: OFTLayer) -> torch.Tensor | None:
    """LyCORIS `rescale` / PEFT `oft_s`, applied in full at every non-zero strength.

    LyCORIS scales only the rotation by its multiplier and applies `rescale` whole (its merge_to(0.5) does exactly
    that; checked against its own merged weights), so we do the same to give the trainer's result. Strength 0 still
    means "adapter off" and returns W untouched, so for rescaled layers strength is not continuous at 0.
    """
    return layer.row_scale


# fp32 elements of one step of the merge-path block product (4 MiB): small enough to stay in cache and to be served
# from the allocator's free lists, so a patch never allocates (and page-faults in) a full fp32 copy of the weight.
_CHUNK_ELEMENTS = 1 << 20


def _chunk_blocks(n: int, block_elements: int) -> int:
    """Blocks per chunk: ≤ _CHUNK_ELEMENTS each, in equal chunks of an even count where possible (bmm spreads a
    batch over the threads: 8 blocks as 5 + 3 ran 30 % slower than as 4 + 4 on 2 threads)."""
    chunks = -(-n * block_elements // _CHUNK_ELEMENTS)
    step = -(-n // max(1, chunks))
    if step > 1 and step % 2:
        step = step + 1 if step + 1 <= n else step
    return max(1, min(n, step))


def _rotate_into(layer: OFTLayer, blocks: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst ← M·src (side "out": rows rotated) or src·M (side "in": columns), both 2-D, any float dtypes.

    fp32 math a chunk of blocks at a time, rounded once into `dst`; `dst` may be `src` (in place: each chunk reads
    only the rows / columns it then writes, after its product is done). The row scale is applied per chunk.
    """
    scale = _row_scale(layer)
    scale = None if scale is None else scale.to(device=src.device, dtype=torch.float32)
    if layer.kind == "butterfly":  # stages permute the rows between products: whole-tensor path
        w = apply_rows(layer, blocks, src.to(torch.float32)) if layer.side == "out" else \
            _apply_last(layer, blocks, src.to(torch.float32), right=True)
        dst.copy_(w if scale is None else w * scale[:, None])
        return
    rows, cols = src.shape
    start = 0
    for r, n, b in zip(blocks, layer.num_blocks, layer.block_sizes):
        other = cols if layer.side == "out" else rows
        step = _chunk_blocks(n, b * other)
        for k in range(0, n, step):
            m = min(step, n - k)
            span = slice(start + k * b, start + (k + m) * b)
            if layer.side == "out":
                x = src[span].reshape(m, b, cols).to(torch.float32)
                y = torch.bmm(r[k : k + m], x)
                if scale is not None:
                    y.mul_(scale[span].view(m, b, 1))
                dst[span].copy_(y.view(m * b, cols))
            else:
                x = torch.empty(m, rows, b, dtype=torch.float32, device=src.device)  # one layout for every dtype:
                x.copy_(src[:, span].reshape(rows, m, b).transpose(0, 1))  # the same bits from fp32 and bf16 src
                y = torch.bmm(x, r[k : k + m])
                if scale is not None:
                    y.mul_(scale.view(1, rows, 1))
                dst[:, span].copy_(y.transpose(0, 1).reshape(rows, m * b))
        start += n * b


def _solves_directly(layer: OFTLayer, rows: int, cols: int) -> bool:
    """Whether the merge path should solve against W instead of building R (see `_solve_positive_real_`).

    Only for the plain case (Cayley blocks on the output rows) and blocks large against the weight's other side,
    where building R costs as much as the product itself: measured faster from b ≥ cols/4 with b ≥ 512
    (benchmarks/bench_patch.py)."""
    return (layer.kind == "diag" and layer.side == "out" and layer.parameterization == "cayley"
            and not layer.block_share and min(layer.block_sizes) >= _SOLVE_MIN_BLOCK
            and 4 * min(layer.block_sizes) >= cols)


_SOLVE_MIN_BLOCK = 512


def _rotate_by_solving(layer: OFTLayer, strength: float, mode: _StrengthMode, src: torch.Tensor,
                       dst: torch.Tensor) -> bool:
    """dst ← M·src with M = blockdiag(B), B = R or Rᵀ, without forming R: with A = I − Q (R) or I + Q (Rᵀ = Cayley(−Q)),
    R·W = 2A⁻¹W − W, so W' = W + 2s(A⁻¹W − W) (kohya strength s) or 2A⁻¹W − W with Q scaled by s (orthogonal).

    The solve eliminates without pivoting, like `_inverse_positive_real`: False, with nothing written, when a block's
    ‖Q_i‖_F (constrained, scaled) is beyond `_BLOCK_ELIMINATION_MAX_NORM` (one host read per split; a file's huge
    generators: 512-wide blocks at ‖Q‖_F = 1e4 came out 25× less accurate than the pivoted solve); the caller then
    builds R by `_cayley_method`'s route."""
    gens = []
    for i, q in enumerate(layer.blocks):
        q = _constrain(layer, q.to(device=src.device, dtype=torch.float32), i)
        gens.append(q * strength if mode == "orthogonal" else q)
        if gens[-1].numel() and not float(torch.linalg.matrix_norm(gens[-1]).max()) <= _BLOCK_ELIMINATION_MAX_NORM:
            return False
    scale = _row_scale(layer)
    scale = None if scale is None else scale.to(device=src.device, dtype=torch.float32)
    cols = src.shape[1]
    start = 0
    for q, n, b in zip(gens, layer.num_blocks, layer.block_sizes):
        sign = -1.0 if layer.transpose else 1.0
        eye = _eye_like(q)
        step = _chunk_blocks(n, b * cols)
        for k in range(0, n, step):
            m = min(step, n - k)
            span = slice(start + k * b, start + (k + m) * b)
            x = src[span].reshape(m, b, cols)
            y = x.to(torch.float32, copy=True)
            _solve_positive_real_((eye[k : k + m] - sign * q[k : k + m]).contiguous(), y)
            # y ← W + 2s(y − W), s = 1 in orthogonal mode (its s is inside Q); fp32 throughout
            y.sub_(x).mul_(2.0 * (strength if mode == "kohya" else 1.0)).add_(x)
            if scale is not None:
                y.mul_(scale[span].view(m, b, 1))
            dst[span].copy_(y.view(m * b, cols))
        start += n * b
    return True


def rotate_weight(
    layer: OFTLayer,
    weight: torch.Tensor,
    strength: float = 1.0,
    mode: _StrengthMode = "kohya",
    *,
    out_dtype: torch.dtype | None = None,
    blocks: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The merge path: the adapted weight (same shape; dtype `out_dtype` or the weight's), computed in fp32.

    `layer` must fit the weight (see `spec.resolve_for_weight`). Strength 0 returns `weight` itself.
    `blocks` may be passed precomputed (`rotation_blocks(layer, strength, mode)`), e.g. cached across the forwards
    of ComfyUI's low-VRAM path; without them, large Cayley blocks are solved against W directly (`_solves_directly`).
    """
    strength = check_strength(strength)
    if strength == 0:
        return weight if out_dtype in (None, weight.dtype) else weight.to(out_dtype)
    if mode not in STRENGTH_MODES:
        raise OFTError(_mismatch("strength mode", " | ".join(STRENGTH_MODES), repr(mode)))
    was_finite = _finite_flag(weight)
    out = torch.empty(weight.shape, dtype=out_dtype or weight.dtype, device=weight.device)
    _rotate(layer, strength, mode, blocks, weight.reshape(weight.shape[0], -1), out.view(weight.shape[0], -1))
    _check_result(layer, out, was_finite, strength)
    return out


def adapted_bias(layer: OFTLayer, bias: torch.Tensor, strength: float = 1.0, perm=None) -> torch.Tensor:
    """The base bias with the layer's trained bias at `strength` (the one definition): b + s·(trained − b) in fp32,
    returned in `bias`'s dtype; the trained bias itself at 1 (PEFT's merge keeps it as trained), `bias` unchanged at 0
    or when the layer trains none. `perm`: base row i is the adapter's row perm[i] (`names.Target.perm`)."""
    strength = check_strength(strength)
    if layer.bias is None or strength == 0:
        return bias
    trained = layer.bias.to(device=bias.device)
    if perm is not None:
        trained = trained[torch.as_tensor(perm, device=bias.device)]
    if trained.shape != bias.shape:
        raise OFTError(_mismatch("base bias", f"{tuple(trained.shape)} (the trained bias)", tuple(bias.shape)),
                       layer=layer.key)
    if strength == 1:  # PEFT's merge keeps the trained values as they are
        return trained.to(bias.dtype)
    b32 = bias.to(torch.float32)
    return (b32 + strength * (trained - b32)).to(bias.dtype)


def rotate_weight_(
    layer: OFTLayer,
    weight: torch.Tensor,
    strength: float = 1.0,
    mode: _StrengthMode = "kohya",
    *,
    blocks: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """`rotate_weight` in place (what a patch does to the weight copy it is handed): returns `weight`.

    Same numbers as `rotate_weight` (fp32 math, one rounding to the weight's dtype), without a second weight-sized
    buffer. `weight` may be a view (a narrowed slice of a fused q/k/v weight: its parent is updated).
    """
    strength = check_strength(strength)
    if strength == 0:
        return weight
    if mode not in STRENGTH_MODES:
        raise OFTError(_mismatch("strength mode", " | ".join(STRENGTH_MODES), repr(mode)))
    try:
        flat = weight.view(weight.shape[0], -1)
    except RuntimeError:  # not viewable as 2-D (a non-contiguous slice): compute aside, then write back
        weight.copy_(rotate_weight(layer, weight, strength, mode, blocks=blocks))
        return weight
    was_finite = _finite_flag(flat)
    _rotate(layer, strength, mode, blocks, flat, flat)
    _check_result(layer, flat, was_finite, strength)
    return weight


_FINITE_CHUNK = 1 << 18  # elements checked at a time on the CPU: a 256 KiB mask, whatever the weight's size


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`. On the CPU a row chunk at a time, so the bool mask stays small (a bake's peak memory
    is a few layers' worth, tests/test_bake_ops.py; a float64 sum would copy the tensor); elsewhere in one call (one
    read from the device)."""
    if t.numel() == 0:
        return True
    if t.device.type != "cpu" or t.ndim == 0:
        return bool(torch.isfinite(t).all())
    rows = max(1, _FINITE_CHUNK // max(1, t[0].numel()))
    widen = t.is_floating_point() and t.element_size() == 1  # fp8: no isfinite kernel (an overflow there is NaN)
    return all(bool(torch.isfinite(chunk.float() if widen else chunk).all()) for chunk in t.split(rows, dim=0))


def _reads_deferred(t: torch.Tensor) -> bool:
    """Whether `t`'s finite check stays on its device until the result's is known (an accelerator: a patch in
    ComfyUI's low-VRAM mode runs on every forward, and each read from the device waits for it)."""
    return t.device.type != "cpu"


def _finite_flag(t: torch.Tensor) -> bool | torch.Tensor:
    """`_all_finite(t)`, or on an accelerator the same as a 0-d bool tensor not read yet (`_check_result` reads it
    together with the result's: one read per patched weight)."""
    if t.numel() and t.ndim and _reads_deferred(t):
        return torch.isfinite(t).all()
    return _all_finite(t)


def _check_result(layer: OFTLayer, result: torch.Tensor, was_finite: bool | torch.Tensor, strength: float) -> None:
    """Never hand back NaN/Inf the weight did not already have (an overflow in the weight's dtype, e.g. fp16 at a
    large strength): the caller stops and writes nothing."""
    if isinstance(was_finite, torch.Tensor):
        overflowed = bool(was_finite & ~torch.isfinite(result).all())  # the one read of this patch
    else:
        overflowed = was_finite and not _all_finite(result)
    if overflowed:
        scale = layer.row_scale
        big = None if scale is None else float(scale.abs().max())
        why = f"; its row scale (rescale / oft_s) reaches {big:.3g}" if big is not None and big > 1 else ""
        raise OFTError(f"the adapted weight {tuple(result.shape)} ({str(result.dtype).replace('torch.', '')}) would "
                       f"hold NaN or Inf values at strength {strength:g}, while the weight had none: it overflows "
                       f"its dtype; use a smaller strength{why}", layer=layer.key)


def _rotate(layer, strength, mode, blocks, src: torch.Tensor, dst: torch.Tensor) -> None:
    if blocks is None and _solves_directly(layer, *src.shape) and _rotate_by_solving(layer, float(strength), mode,
                                                                                     src, dst):
        return
    if blocks is None:
        blocks = rotation_blocks(layer, strength, mode)
    _rotate_into(layer, [b.to(src.device) for b in blocks], src, dst)


def rotate_features(
    layer: OFTLayer,
    t: torch.Tensor,
    strength: float = 1.0,
    mode: _StrengthMode = "kohya",
    *,
    dim: int = -1,
    blocks: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The bypass path: v ↦ M v on axis `dim` of an activation `t` (fp32 math, `t`'s dtype out).

    Side "out": apply to the layer's output before the bias; side "in": to its input.
    `blocks` may be passed precomputed (e.g. once per training step, with gradients).
    """
    if blocks is None:
        if strength == 0:
            return t
        blocks = rotation_blocks(layer, strength, mode)
    moved = t.movedim(dim, -1)
    out = _apply_last(layer, [b.to(t.device) for b in blocks], moved.to(torch.float32))
    return out.to(t.dtype).movedim(-1, dim)


def bypass_forward(
    layer: OFTLayer,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    strength: float = 1.0,
    mode: _StrengthMode = "kohya",
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    blocks: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """A Linear (2-D weight) or Conv2d (4-D weight) forward with the adapter applied to activations.

    Equals the plain layer forward with `rotate_weight(layer, weight, ...)` as its weight and, for a layer that
    trains its bias, `adapted_bias(layer, bias, strength)` as its bias (the base `bias` is then required).
    """
    if layer.bias is not None:
        if bias is None:
            raise OFTError("the layer trains its bias, and no base bias was given to replace", layer=layer.key)
        bias = adapted_bias(layer, bias, strength)
    if blocks is None:
        blocks = rotation_blocks(layer, strength, mode) if strength != 0 else None
    if blocks is None:  # strength 0
        if weight.ndim == 2:
            return F.linear(x, weight, bias)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    scale = _row_scale(layer)
    conv = weight.ndim == 4
    if layer.side == "out":
        y = F.conv2d(x, weight, None, stride, padding, dilation, groups) if conv else F.linear(x, weight)
        y = rotate_features(layer, y, dim=1 if conv else -1, blocks=blocks)
    elif not conv:
        y = F.linear(rotate_features(layer, x, blocks=blocks), weight)
    else:
        # Input-side rotation acts on the flattened (in, kh, kw) patch axis (PEFT conv), so rotate unfolded patches.
        if groups != 1:
            raise OFTError(_mismatch("grouped convolution with input-side OFT", "groups = 1", groups), layer=layer.key)
        kh, kw = weight.shape[-2:]
        cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (B, C·kh·kw, L)
        cols = rotate_features(layer, cols, dim=1, blocks=blocks)
        y = weight.reshape(weight.shape[0], -1).to(cols.dtype) @ cols
        h_out, w_out = _conv_out_hw(x.shape[-2:], (kh, kw), stride, padding, dilation)
        y = y.reshape(x.shape[0], weight.shape[0], h_out, w_out)
    if scale is not None:
        shape = (-1, 1, 1) if conv else (-1,)
        y = y * scale.to(device=y.device, dtype=y.dtype).reshape(shape)
    if bias is not None:
        y = y + (bias.reshape(-1, 1, 1) if conv else bias)
    return y


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _conv_out_hw(hw, k, stride, padding, dilation) -> tuple[int, int]:
    s, p, d = _pair(stride), _pair(padding), _pair(dilation)
    return tuple((hw[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))


def _orthogonality_error(layer: OFTLayer, strength: float = 1.0, mode: _StrengthMode = "kohya") -> float:
    """max |BᵀB − I| over the layer's blocks (fp32): 0 up to rounding for Cayley, small for Neumann."""
    worst = 0.0
    for b in rotation_blocks(layer, strength, mode):
        eye = _eye_like(b)
        worst = max(worst, float((b.transpose(-1, -2) @ b - eye).abs().max()))
    return worst


def _stored_norms(layer: OFTLayer) -> list[tuple[float, float | None]]:
    """Per split: (how far what the layer stores is from the identity rotation, the bound it is held to or None):
    ‖Q‖_F before the constraint (cayley / neumann: Q = 0 is R = I; COFT's per-block bound: the largest block's), or
    ‖R − I‖_F for a stored rotation ("matrix": no Q is stored, and no constraint applies). `_norm_of` names which."""
    out = []
    for i, q in enumerate(layer.blocks):
        if layer.parameterization == "matrix":
            out.append((float(torch.norm((q - _eye_like(q)).flatten())), None))
            continue
        norm = float(torch.norm(q.flatten()))
        c = layer.constraint
        if c.kind == "norm_clamp":
            bound = c.value * layer.split_sizes[i]
        elif c.kind == "block_projection":
            bound = c.value / math.sqrt(q.shape[-3])
            norm = float(torch.linalg.matrix_norm(q).max())  # per-block bound: report the largest block
        else:
            bound = None
        out.append((norm, bound))
    return out


def _norm_of(layer: OFTLayer) -> str:
    """What `_stored_norms` measures for `layer`: "Q" (its generators) or "R − I" (a stored rotation)."""
    return "R − I" if layer.parameterization == "matrix" else "Q"
