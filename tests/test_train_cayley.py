"""The trainer's rotation blocks: the Cayley map with a closed-form backward, the skew generator without index_put.

Pinned: in the trainer's path (`sync_free=True`, gradients wanted) `rotation._cayley` gives the values of the
method it chose before (solve, series, block elimination) bit for bit, through `_CayleyMap`; its gradient passes
fp64 gradcheck / gradgradcheck for every method and matches autograd through the old expression to fp32 rounding
(both against an fp64 reference); every other path (merge, bypass, formats: `sync_free=False`, or no gradients) is
the old code, unchanged, except blocks of 8–15, whose in-place Gauss–Jordan elimination is always differentiated in
closed form (its gradient is checked against autograd through the solve it replaced). `skew_from_upper` gives
`unpack_upper`'s U − Uᵀ and its gradient bit for bit (matmul and gather ways, under autocast too). And the blocks
keep for backward no LU / pivots: only Q and R.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import oft_core.rotation as rotation
import oft_core.train as train
from oft_core.formats._triangle import _SKEW_MATMUL_MAX, skew_from_upper, unpack_upper
from oft_core.rotation import _cayley, _cayley_value, _skew
from oft_core.train import OFTTrainer

# (block size, blocks, ‖Q_i‖_F, norm_bound): which method `_cayley` picks with sync_free=True
METHODS = {
    "solve_small": (4, 6, 0.5, 0.6),  # b ≤ 7 or 16: batched solve_ex
    "eliminated_small": (8, 6, 0.5, 0.6),  # 8 ≤ b ≤ 15: Gauss–Jordan, in place, so always the closed-form backward
    "series": (24, 4, 0.2, 0.25),  # 16 < b ≤ 96, bound allows ≤ 3 doublings
    "solve_no_bound": (24, 4, 1.5, None),  # 16 < b ≤ 96, no bound: solve_ex
    "solve_large_bound": (24, 4, 1.5, 2.0),
    "elimination": (100, 2, 0.8, None),  # b > 96: _inverse_positive_real
}


def random_skew(n, b, norm, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = _skew(torch.randn(n, b, b, generator=g, dtype=torch.float64))
    return (q * (norm / torch.linalg.matrix_norm(q, keepdim=True))).to(dtype)


def cayley64(q):
    eye = torch.eye(q.shape[-1], dtype=torch.float64)
    q = q.double()
    return torch.linalg.solve(eye - q, eye + q)


@pytest.mark.parametrize("method", list(METHODS))
def test_forward_values_bit_identical(method):
    b, n, norm, bound = METHODS[method]
    q = random_skew(n, b, norm).requires_grad_()
    r = _cayley(q, norm_bound=bound, sync_free=True)
    assert type(r.grad_fn).__name__ == "_CayleyMapBackward"
    with torch.no_grad():
        old = _cayley_value(q, norm_bound=bound, sync_free=True)
    assert torch.equal(r.detach(), old)
    assert (r.detach().double() - cayley64(q.detach())).abs().max() < 2e-6  # and it is Cayley(Q)


@pytest.mark.parametrize("method", list(METHODS))
def test_gradcheck_fp64(method):
    b, n, norm, bound = METHODS[method]
    if b > 32:  # the full Jacobian of 100×100 blocks is 10⁴ × 10⁴ per block: one block, fast mode
        n = 1
    q = random_skew(n, b, norm, torch.float64).requires_grad_()

    def f(x):
        return _cayley(x, norm_bound=bound, sync_free=True)

    assert type(f(q).grad_fn).__name__ == "_CayleyMapBackward"
    fast = b > 32
    assert torch.autograd.gradcheck(f, (q,), fast_mode=fast)
    if not fast:
        assert torch.autograd.gradgradcheck(f, (q,))


@pytest.mark.parametrize("method", list(METHODS))
def test_gradient_matches_autograd_of_the_old_expression(method):
    b, n, norm, bound = METHODS[method]
    q0 = random_skew(n, b, norm)
    g = torch.randn(n, b, b, generator=torch.Generator().manual_seed(1))

    q_new = q0.clone().requires_grad_()
    _cayley(q_new, norm_bound=bound, sync_free=True).backward(g)
    q_old = q0.clone().requires_grad_()
    if method == "eliminated_small":  # no autograd path through the in-place elimination: the solve it replaced
        eye = torch.eye(b).expand_as(q_old)
        r_old = torch.linalg.solve(eye - q_old, eye + q_old)
    else:
        r_old = _cayley_value(q_old, norm_bound=bound, sync_free=True)
    assert type(r_old.grad_fn).__name__ != "_CayleyMapBackward"
    r_old.backward(g)
    q64 = q0.double().requires_grad_()
    cayley64(q64).backward(g.double())

    scale = q64.grad.abs().max()
    err_new = (q_new.grad.double() - q64.grad).abs().max() / scale
    err_old = (q_old.grad.double() - q64.grad).abs().max() / scale
    assert err_new < 1e-6, (err_new, err_old)  # a few fp32 ulp of the largest entry, as autograd through the method
    assert err_old < 1e-6, (err_new, err_old)


@pytest.mark.parametrize("method", ["solve_small", "series", "elimination"])
def test_other_paths_unchanged(method):
    """merge / bypass / formats call `_cayley` without sync_free or without gradients: the old code, same values."""
    b, n, norm, bound = METHODS[method]
    q = random_skew(n, b, norm).requires_grad_()
    r = _cayley(q, norm_bound=bound)  # sync_free=False: autograd through the method, as before
    assert type(r.grad_fn).__name__ != "_CayleyMapBackward"
    assert torch.equal(r.detach(), _cayley_value(q.detach(), norm_bound=bound))
    with torch.no_grad():
        assert torch.equal(_cayley(q, norm_bound=bound, sync_free=True), _cayley_value(q, norm_bound=bound,
                                                                                        sync_free=True))
    plain = q.detach()  # no gradient wanted: no Function node at all
    assert _cayley(plain, norm_bound=bound, sync_free=True).grad_fn is None


@pytest.mark.parametrize("b", [2, 3, 8, _SKEW_MATMUL_MAX, _SKEW_MATMUL_MAX + 1, 16, 33])
@pytest.mark.parametrize("autocast", [False, True])
def test_skew_from_upper_is_unpack_upper_bit_for_bit(b, autocast):
    g = torch.Generator().manual_seed(b)
    vec = torch.randn(5, b * (b - 1) // 2, generator=g)
    vec[0, 0] = 0.0
    grad_out = torch.randn(5, b, b, generator=g)
    p_new, p_old = vec.clone().requires_grad_(), vec.clone().requires_grad_()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        q_new = skew_from_upper(p_new, b)
        q_old = _skew(unpack_upper(p_old, b))
    assert q_new.dtype == torch.float32
    assert torch.equal(q_new, q_old)
    q_new.backward(grad_out)
    q_old.backward(grad_out)
    assert torch.equal(p_new.grad, p_old.grad)
    rows, cols = torch.triu_indices(b, b, 1)
    assert torch.equal(p_new.grad, (grad_out - grad_out.mT)[:, rows, cols])


def _old_generators(self):
    return [_skew(unpack_upper(p, b)) for p, b in zip(self.params, self.layer.block_sizes)]


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd saves while `fn` runs (parameters and cached constants excluded)."""
    seen = {}

    def pack(t):
        if not (isinstance(t, nn.Parameter) or t.requires_grad and t.grad_fn is None):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    constants = {c.untyped_storage().data_ptr() for c in train.skew_from_upper.__globals__["_SKEW_CONSTANTS"].values()}
    return out, sum(v for k, v in seen.items() if k not in constants), seen


@pytest.mark.parametrize("b, alpha", [(8, 1e-3), (24, 1e-3), (24, 0.0), (100, 1e-3)])
def test_trainer_blocks_same_values_less_saved(monkeypatch, b, alpha):
    n = 6
    trainer = OFTTrainer([("l", nn.Linear(4, n * b))], block_size=b, alpha=alpha)
    tl = trainer.layers[0]
    with torch.no_grad():
        tl.params[0].copy_(torch.randn(tl.params[0].shape, generator=torch.Generator().manual_seed(3)) * 0.01)
    g = torch.randn(n, b, b, generator=torch.Generator().manual_seed(4))

    r_new, saved_new, _ = _saved_bytes(lambda: trainer.blocks(tl)[0])
    r_new.backward(g)
    grad_new = tl.params[0].grad.clone()
    tl.params[0].grad = None

    # the plain autograd expression the trainer's node replaces: index_put generators, autograd through the solve
    monkeypatch.setattr(rotation, "_cayley", _cayley_value)
    r_old, saved_old, _ = _saved_bytes(
        lambda: rotation.rotation_blocks(tl.layer, blocks=_old_generators(tl), sync_free=True)[0])
    r_old.backward(g)
    grad_old = tl.params[0].grad

    assert torch.equal(r_new, r_old)  # same forward, bit for bit
    scale = grad_old.abs().max()
    assert (grad_new - grad_old).abs().max() <= 2e-6 * scale
    block = n * b * b * 4
    assert saved_new <= 2 * block + 64, saved_new  # Q (for the clamp) and R, nothing else
    assert saved_new < saved_old
