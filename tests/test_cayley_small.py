"""The Cayley map of small blocks (b ≤ 16): Gauss–Jordan elimination without pivoting for blocks of 8–15
(`rotation._cayley_eliminated`) while every block's ‖Q_i‖_F is known to be at most `_ELIMINATION_MAX_NORM`, LAPACK's
batched solve for the others and above that norm.

Pinned: values against fp64 for every small size and norms from those training and files meet to huge finite ones
(1e30), no worse than the fp32 LAPACK solve beyond a small factor where the elimination is taken (equal up to
‖Q‖_F = 5, ≤ 3× near the limit) and equal to it bit for bit above; Q = 0 gives I bit for bit; R is orthogonal to
fp32 rounding; batch shapes (empty, leading axes, one matrix, non-contiguous input); a matrix's values do not depend
on its place in the batch or the thread count (what lets the trainer's block node batch several layers:
tests/test_train_unit_blocks.py); fp64 input; gradients in closed form (`_CayleyMap`), checked against fp64 autograd
and gradcheck; the trainer's route reads no value on the host (also on the meta device: nothing data-dependent).
"""

from __future__ import annotations

import pytest
import torch
from test_sync_free import count_reads

import oft_core.rotation as rotation
from oft_core import make_layer
from oft_core.errors import OFTError
from oft_core.rotation import (
    _ELIMINATION_MAX_BLOCK,
    _ELIMINATION_MAX_NORM,
    _ELIMINATION_MIN_BLOCK,
    _cayley,
    _cayley_eliminated,
    _cayley_value,
    _eliminates,
    _skew,
)

SIZES = [2, 3, 4, 5, 7, 8, 9, 10, 12, 13, 15, 16]


def random_skew(n: int, b: int, norm: float, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """n skew-symmetric b×b blocks, each of Frobenius norm `norm`."""
    g = torch.Generator().manual_seed(seed)
    q = _skew(torch.randn(n, b, b, generator=g, dtype=torch.float64))
    return (q * (norm / torch.linalg.matrix_norm(q, keepdim=True))).to(dtype)


def cayley64(q: torch.Tensor) -> torch.Tensor:
    q = q.double()
    eye = torch.eye(q.shape[-1], dtype=torch.float64).expand_as(q)
    return torch.linalg.solve(eye - q, eye + q)


def lapack32(q: torch.Tensor) -> torch.Tensor:
    """The fp32 batched solve every block ≤ 16 took before."""
    eye = torch.eye(q.shape[-1]).expand_as(q)
    return torch.linalg.solve_ex(eye - q, eye + q)[0]


def max_err(r: torch.Tensor, ref: torch.Tensor) -> float:
    return float((r.double() - ref).abs().max())


def test_the_elimination_takes_blocks_of_8_to_15():
    assert (_ELIMINATION_MIN_BLOCK, _ELIMINATION_MAX_BLOCK) == (8, 15)
    assert [b for b in range(1, 20) if _eliminates(b)] == list(range(8, 16))


# ‖Q‖_F per block → how far the error against fp64 may exceed the fp32 LAPACK solve's where the elimination is taken
# (measured: ≤ 1.3× up to 5, ≤ 1.8× at 16, ≤ 2.7× at 24, where no pivoting lets the growth follow ‖Q‖²; see
# `_cayley_eliminated`);
# above `_ELIMINATION_MAX_NORM` the solve itself (factor 1: the same values). Before the limit, 8×8 blocks at 1e30
# came out NaN and at 1e4 off by 7e-5.
NORM_FACTORS = {1e-4: 1.5, 0.01: 1.5, 0.1: 1.5, 1.0: 1.5, 5.0: 1.5, 16.0: 2.5, 23.0: 3.0, 26.0: 1.0, 100.0: 1.0,
                1e4: 1.0, 1e8: 1.0, 1e19: 1.0, 1e30: 1.0}


def test_the_elimination_limit():
    assert _ELIMINATION_MAX_NORM == 24.0


@pytest.mark.parametrize("b", SIZES)
@pytest.mark.parametrize("norm", list(NORM_FACTORS))
def test_values_against_fp64_no_worse_than_the_fp32_solve(b, norm):
    q = torch.cat([random_skew(400, b, norm, seed=s) for s in range(3)])
    eye = torch.eye(b).expand_as(q)
    if bool((torch.linalg.solve_ex(eye - q, eye + q)[1] != 0).any()):
        # I − Q rounds to −Q (odd b, ‖Q‖ ≳ 1e8) and this CPU's LAPACK finds it singular (elsewhere the same matrices
        # give finite, meaningless values): refused instead of torch's solver error; the trainer's route (no
        # error check, never such norms) gives LAPACK's values
        assert norm >= 1e8 and b % 2 == 1
        with pytest.raises(OFTError, match="I − Q singular in float32"):
            _cayley_value(q)
        torch.testing.assert_close(_cayley_value(q, sync_free=True), lapack32(q), rtol=0, atol=0, equal_nan=True)
        return
    ref = cayley64(q)
    r = _cayley_value(q)
    assert r.dtype == torch.float32 and r.shape == q.shape
    ours, lapack = max_err(r, ref), max_err(lapack32(q), ref)
    assert ours <= NORM_FACTORS[norm] * lapack + 1e-7, (ours, lapack)
    if norm <= 5:
        assert ours < 1.5e-6
    if norm <= 100:
        assert ours < 1e-5
    # beyond, the fp32 map itself is ill-conditioned (κ(I − Q) ≈ ‖Q‖: errors of 5e-4 at 1e4, and at 1e8 and up I − Q
    # rounds to −Q, singular for odd b), in the reference tools' fp32 solve as here: the same values as theirs
    rho = float(torch.linalg.matrix_norm(q).max())
    # the trainer's route with a bound (here the blocks' own largest norm): the same values; without one, the solve
    assert torch.equal(_cayley_value(q, norm_bound=rho, sync_free=True), r)
    assert torch.equal(_cayley_value(q, sync_free=True), lapack32(q))
    if not _eliminates(b) or rho > _ELIMINATION_MAX_NORM:
        assert torch.equal(r, lapack32(q))  # other small sizes and larger norms: the solve, bit for bit
    else:
        assert not torch.equal(r, lapack32(q))  # the elimination (other roundings)


@pytest.mark.parametrize("b", list(range(1, 17)))
def test_zero_generators_give_the_identity_bit_for_bit(b):
    eye = torch.eye(b)
    for shape in ((5, b, b), (2, 3, b, b), (b, b)):
        q = torch.zeros(shape)
        assert torch.equal(_cayley_value(q), eye.expand(shape))
        assert torch.equal(_cayley_value(q, sync_free=True), eye.expand(shape))
    q = random_skew(6, b, 0.3)
    q[2] = 0  # one zero block among others
    assert torch.equal(_cayley_value(q)[2], eye)


@pytest.mark.parametrize("b", SIZES)
@pytest.mark.parametrize("norm", [1e-3, 0.3, 2.0, 5.0])
def test_rotations_are_orthogonal_to_fp32_rounding(b, norm):
    r = _cayley_value(random_skew(500, b, norm, seed=b)).double()
    eye = torch.eye(b, dtype=torch.float64)
    assert float((r.mT @ r - eye).abs().max()) < 2e-6
    assert float((torch.linalg.det(r) - 1).abs().max()) < 1e-5  # proper rotations (Cayley never gives det −1)


@pytest.mark.parametrize("b", [8, 11, 15])
def test_batch_shapes(b):
    q = random_skew(24, b, 0.5, seed=1)
    flat = _cayley_value(q)
    assert torch.equal(_cayley_value(q.reshape(2, 3, 4, b, b)), flat.reshape(2, 3, 4, b, b))
    assert torch.equal(_cayley_value(q[5]), flat[5])  # one matrix, no batch axis
    assert _cayley_value(q[:0]).shape == (0, b, b)
    assert _cayley_value(q[:0].reshape(3, 0, b, b)).shape == (3, 0, b, b)
    # a non-contiguous input (Qᵀ = −Q as a transposed view) gives Cayley(−Q) = Cayley(Q)ᵀ
    assert torch.equal(_cayley_value(q.mT), _cayley_value(-q))
    assert max_err(_cayley_value(q.mT), cayley64(q).mT) < 1e-6


@pytest.mark.parametrize("b", [8, 9, 15])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_block_has_the_same_values_wherever_it_sits_in_the_batch(b, threads):
    """What the trainer's block node relies on (`_TrainedBlocks`: several layers' blocks in one call give each
    layer's own values bit for bit): sizes with and without vector tails, under one and two threads."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        q = random_skew(4099, b, 0.7, seed=b)
        whole = _cayley_value(q)
        for start, stop in ((0, 1), (1, 8), (3, 40), (17, 1000), (1000, 4099), (4090, 4099)):
            assert torch.equal(_cayley_value(q[start:stop]), whole[start:stop]), (start, stop)
            assert torch.equal(_cayley_value(q[start:stop].clone()), whole[start:stop]), (start, stop)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("b", [8, 12])
def test_fp64_input_is_solved_in_fp64(b):
    q = random_skew(50, b, 2.0, seed=2, dtype=torch.float64)
    r = _cayley_value(q)
    assert r.dtype == torch.float64
    assert max_err(r, cayley64(q)) < 1e-14


@pytest.mark.parametrize("b", [8, 9, 12])
@pytest.mark.parametrize("sync_free", [False, True])
def test_gradients_in_closed_form_match_fp64_autograd(b, sync_free):
    q0 = random_skew(5, b, 0.8, seed=3)
    g = torch.randn(5, b, b, generator=torch.Generator().manual_seed(4))
    q = q0.clone().requires_grad_()
    r = _cayley(q, sync_free=sync_free, norm_bound=1.0)
    assert type(r.grad_fn).__name__ == "_CayleyMapBackward"  # autograd never goes through the in-place elimination
    with torch.no_grad():
        assert torch.equal(r, _cayley_value(q0))  # eliminated: the bound (trainer) or the norm read (files) allows
    r.backward(g)
    q64 = q0.double().requires_grad_()
    cayley64(q64).backward(g.double())
    assert float((q.grad.double() - q64.grad).abs().max() / q64.grad.abs().max()) < 1e-6


@pytest.mark.parametrize("b", [8, 9])
def test_gradcheck_fp64(b):
    q = random_skew(2, b, 0.7, seed=5, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(_cayley, (q,))
    assert torch.autograd.gradgradcheck(_cayley, (q,))


def test_the_trainers_route_reads_nothing_on_the_host():
    q = random_skew(300, 8, 0.5)
    for bound in (None, 1.0, 100.0):  # the solve, the elimination, the solve
        with count_reads() as reads:
            _cayley_value(q, norm_bound=bound, sync_free=True)
        assert sum(reads.values()) == 0, dict(reads)
    with count_reads() as reads:  # a file's blocks (no bound to trust): their largest norm, read once
        _cayley_value(q)
    assert sum(reads.values()) == 1, dict(reads)
    with count_reads() as reads:  # sizes that take the solve whatever the norm: nothing read
        _cayley_value(random_skew(30, 7, 0.5))
    assert sum(reads.values()) == 0, dict(reads)
    r = _cayley_eliminated(torch.empty(7, 3, 8, 8, device="meta"))  # shapes only: no data-dependent step
    assert r.device.type == "meta" and r.shape == (7, 3, 8, 8)


@pytest.mark.parametrize("b", [8, 13])
def test_pieces_give_the_values_of_one_pass(b, monkeypatch):
    """On a CPU the batch is eliminated in cache-sized pieces (`_ELIMINATION_PIECE_ELEMENTS`): same bits as one
    pass over everything, for pieces that divide the batch and pieces that do not."""
    import oft_core.rotation as rotation

    q = random_skew(1000, b, 0.9, seed=7).reshape(10, 100, b, b)
    monkeypatch.setattr(rotation, "_ELIMINATION_PIECE_ELEMENTS", 1 << 40)
    whole = _cayley_eliminated(q)
    for per_piece in (1, 3, 100, 999):
        monkeypatch.setattr(rotation, "_ELIMINATION_PIECE_ELEMENTS", per_piece * 2 * b * b)
        r = _cayley_eliminated(q)
        assert r.shape == q.shape and r.is_contiguous() and torch.equal(r, whole), per_piece


def test_a_singular_solve_is_refused_naming_the_layer(monkeypatch):
    """Where LAPACK reports I − Q singular (huge generators of an odd block size), `rotation_blocks` raises
    OFTError naming the layer and the norm found, never torch's solver error."""
    def singular(a, b):
        raise torch.linalg.LinAlgError("torch.linalg.solve: The solver failed because the input matrix is singular.")
    monkeypatch.setattr(rotation, "_solve", singular)
    q = random_skew(4, 17, 3e8)  # 17: the solve (beyond the elimination's sizes)
    layer = make_layer(path="down.0", name="down.0", side="out", blocks=[q], transpose=True)
    with pytest.raises(OFTError, match="I − Q singular in float32") as e:
        rotation.rotation_blocks(layer)
    assert e.value.layer == layer.key and "3e+08" in str(e.value)
