"""The math pinned: orthogonality, the two application paths agree, one definition of strength and of the constraint."""

import math

import pytest
import torch
import torch.nn.functional as F
from oracle import case_ids, get_case

from oft_core import Constraint, load_adapter, make_layer, resolve_for_weight, rotate_weight
from oft_core.rotation import (
    _cayley,
    _constrain,
    _neumann,
    _orthogonality_error,
    _skew,
    bypass_forward,
    rotation_blocks,
)
from oft_core.spec import _neumann_coefficients

DTYPE_TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _layers(case_id, limit=None):
    adapter = load_adapter(get_case(case_id).adapter)
    return list(adapter)[:limit]


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("case_id", case_ids())
def test_rotation_is_orthogonal_to_fp32_precision(case_id):
    for layer in _layers(case_id, 8):
        if layer.parameterization == "neumann":
            continue  # a truncated series is only approximately orthogonal: see the test below
        err = _orthogonality_error(layer)
        assert err < 2e-6, (layer.key, err)


def test_neumann_series_is_orthogonal_only_up_to_truncation():
    small = make_layer(path="t", name="x", side="in", blocks=[_gen(4, 8, 0.001)], transpose=True,
                       parameterization="neumann", neumann_coeffs=(1, 2, 2, 2, 1))
    large = small.with_(blocks=(_gen(4, 8, 0.1),))
    assert _orthogonality_error(small) < 1e-6  # truncation error ~ ‖Q‖⁴
    assert _orthogonality_error(large) > 1e-3


def test_cayley_solve_equals_explicit_inverse():
    torch.manual_seed(0)
    q = _skew(torch.randn(6, 16, 16) * 0.1)
    eye = torch.eye(16).expand_as(q)
    ref = (eye + q) @ torch.linalg.inv(eye - q)
    assert torch.allclose(_cayley(q), ref, atol=1e-6, rtol=0)
    assert torch.allclose(_cayley(-q), ref.transpose(-1, -2), atol=1e-6, rtol=0)  # Cayley(Q)ᵀ = Cayley(−Q)


def test_neumann_coefficients_follow_peft_versions():
    assert _neumann_coefficients(5, last_term_halved=True) == (1, 2, 2, 2, 1)  # PEFT ≥ 0.18
    assert _neumann_coefficients(5, last_term_halved=False) == (1, 2, 2, 2, 2)  # PEFT 0.16–0.17
    assert _neumann_coefficients(3, last_term_halved=True) == (1, 2, 2, 1)  # PEFT's loop for n = 3
    assert _neumann_coefficients(2, last_term_halved=True) == (1, 2)
    q = _skew(torch.randn(2, 4, 4) * 0.02)
    eye = torch.eye(4).expand_as(q)
    assert torch.allclose(_neumann(q, (1, 2, 2, 2, 1)), eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q,
                          atol=1e-7)
    # the series approximates Cayley(Q), not PEFT's exact branch Cayley(Q)ᵀ
    assert _rel(_neumann(q, (1, 2, 2, 2, 1)), _cayley(q)) < 1e-4


def _gen(n, b, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    return _skew(torch.randn(n, b, b, generator=g) * scale)


def test_kohya_constraint_clamps_the_whole_layer_norm():
    q = _gen(4, 8, 0.3)
    norm = float(torch.norm(q))
    layer = make_layer(path="t", name="x", side="out", blocks=[q], transpose=True,
                       constraint=Constraint("norm_clamp", norm / 2 / 32))  # bound = alpha × 32 = norm / 2
    clamped = _constrain(layer, q, 0)
    assert math.isclose(float(torch.norm(clamped)), norm / 2, rel_tol=1e-6)
    loose = layer.with_(constraint=Constraint("norm_clamp", 2 * norm / 32))
    assert torch.equal(_constrain(loose, q, 0), q)  # under the bound: untouched, bit for bit


def test_fused_split_constraint_uses_split_width():
    q0, q1 = _gen(4, 8, 0.3, 1), _gen(4, 4, 0.3, 2)
    layer = make_layer(path="t", name="x", side="out", blocks=[q0, q1], transpose=True,
                       constraint=Constraint("norm_clamp", 0.01))
    assert layer.split_sizes == (32, 16)
    assert math.isclose(float(torch.norm(_constrain(layer, q0, 0))), 0.32, rel_tol=1e-6)
    assert math.isclose(float(torch.norm(_constrain(layer, q1, 1))), 0.16, rel_tol=1e-6)


def test_coft_projects_each_block():
    q = _gen(4, 6, 0.5)
    layer = make_layer(path="t", name="x", side="in", blocks=[q], transpose=False,
                       constraint=Constraint("block_projection", 0.2))
    out = _constrain(layer, q, 0)
    norms = torch.linalg.matrix_norm(out)
    assert torch.allclose(norms, torch.full((4,), 0.2 / 2), rtol=1e-6)  # eps / √4


@pytest.mark.parametrize("case_id", case_ids())
def test_strength_zero_returns_base_bit_exact(case_id):
    case = get_case(case_id)
    layers = {layer.name.replace(".", "_"): layer for layer in load_adapter(case.adapter)}
    for key, w in list(case.originals.items())[:6]:
        w = w.clone()
        w.view(-1)[0] = -0.0  # signed zero survives too
        layer = resolve_for_weight(layers[case.module_key[key]], w.shape)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            wd = w.to(dtype)
            for mode in ("kohya", "orthogonal"):
                out = rotate_weight(layer, wd, 0.0, mode)
                assert out.dtype == dtype and torch.equal(out.view(torch.int16 if dtype != torch.float32 else
                                                                   torch.int32),
                                                          wd.view(torch.int16 if dtype != torch.float32 else
                                                                  torch.int32))


@pytest.mark.parametrize("case_id", ["sd15_oft_attn_dim8_bf16", "flux_tiny_oft_attn_dim4", "lycoris_boft_dim8",
                                     "lycoris_diag_oft_dim8", "lycoris_diag_oft_constrained"])
def test_kohya_strength_is_linear_and_signed(case_id):
    case = get_case(case_id)
    layers = {layer.name.replace(".", "_"): layer for layer in load_adapter(case.adapter)}
    for key, w in list(case.originals.items())[:4]:
        layer = resolve_for_weight(layers[case.module_key[key]], w.shape)
        if layer.kind == "butterfly":
            continue  # BOFT scales each stage (LyCORIS): a product of stages, not linear in s
        d = {s: rotate_weight(layer, w.double(), s).double() - w.double() for s in (0.3, 0.6, -0.3)}
        if float(d[0.6].abs().max()) == 0:
            continue  # the all-zero (identity) module
        # R is built in fp32: R_s − I is linear in s to one fp32 ulp of 1, and ΔW to that times |W| summed over a
        # block's rows; the effect itself is 100× larger than this tolerance.
        eye = torch.eye(layer.block_sizes[0])
        b3, b6 = rotation_blocks(layer, 0.3)[0], rotation_blocks(layer, 0.6)[0]
        assert float(((b6 - eye) - 2 * (b3 - eye)).abs().max()) <= 2.5e-7
        tol = 1e-5 * float(w.abs().max())
        assert float(d[0.6].abs().max()) > 100 * tol
        assert float((d[0.6] - 2 * d[0.3]).abs().max()) <= tol
        assert float((d[-0.3] + d[0.3]).abs().max()) <= tol


def test_orthogonal_mode_is_a_rotation_for_every_strength():
    layer = make_layer(path="t", name="x", side="out", blocks=[_gen(4, 8, 0.4)], transpose=True)
    r1 = rotation_blocks(layer, 1.0)[0]
    for s in (0.3, 0.5, 2.0, -1.0):
        b = rotation_blocks(layer, s, "orthogonal")[0]
        assert float((b.transpose(-1, -2) @ b - torch.eye(8)).abs().max()) < 2e-6
    assert torch.allclose(rotation_blocks(layer, -1.0, "orthogonal")[0], r1.transpose(-1, -2), atol=2e-6)
    assert torch.equal(rotation_blocks(layer, 1.0, "orthogonal")[0], r1)


def _linear_cases():
    for case_id in case_ids():
        for layer in _layers(case_id, 2):
            yield pytest.param(case_id, layer.key, id=f"{case_id}-{layer.key[-24:]}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case_id", case_ids())
def test_bypass_equals_merge_linear(case_id, dtype):
    case = get_case(case_id)
    layers = {layer.name.replace(".", "_"): layer for layer in load_adapter(case.adapter)}
    torch.manual_seed(1)
    for key, w in list(case.originals.items())[:3]:
        layer = resolve_for_weight(layers[case.module_key[key]], w.shape)
        bias = torch.randn(w.shape[0])
        x = torch.randn(5, w.shape[1])
        for strength in (1.0, 0.5):
            exact = F.linear(x.double(), rotate_weight(layer, w, strength).double(), bias.double())
            merged = F.linear(x.to(dtype), rotate_weight(layer, w.to(dtype), strength), bias.to(dtype))
            bypass = bypass_forward(layer, x.to(dtype), w.to(dtype), bias.to(dtype), strength)
            assert bypass.dtype == dtype
            assert _rel(bypass, exact) <= DTYPE_TOL[dtype], (key, strength)
            assert _rel(merged, exact) <= DTYPE_TOL[dtype], (key, strength)


def _conv_layer(kind):
    """A layer of each format family on a Conv2d weight (out 16, in 4, 3×3): rows for out-side, patches for in-side."""
    if kind == "kohya":
        return make_layer(path="t", name="c", side="out", blocks=[_gen(4, 4, 0.3)], transpose=True,
                          constraint=Constraint("norm_clamp", 0.02))
    if kind == "lycoris_rescaled":
        return make_layer(path="t", name="c", side="out", blocks=[_gen(2, 8, 0.3)], transpose=True,
                          row_scale=1 + 0.1 * torch.randn(16))
    if kind == "boft":
        return make_layer(path="t", name="c", side="out", kind="butterfly", blocks=[_skew(
            torch.randn(3, 4, 4, 4) * 0.2)], num_blocks=[4], transpose=False)
    if kind == "peft":
        return make_layer(path="t", name="c", side="in", blocks=[_gen(4, 9, 0.2)], transpose=False)  # 36 = 4·3·3
    if kind == "peft_neumann":
        return make_layer(path="t", name="c", side="in", blocks=[_gen(4, 9, 0.05)], transpose=True,
                          parameterization="neumann", neumann_coeffs=(1, 2, 2, 2, 1))
    raise ValueError(kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["kohya", "lycoris_rescaled", "boft", "peft", "peft_neumann"])
def test_bypass_equals_merge_conv2d(kind, dtype):
    torch.manual_seed(2)
    layer = _conv_layer(kind)
    w, bias = torch.randn(16, 4, 3, 3), torch.randn(16)
    layer = resolve_for_weight(layer, w.shape)
    x = torch.randn(2, 4, 7, 6)
    for strength in (1.0, 0.5):
        for stride, padding in ((1, 1), (2, 0)):
            exact = F.conv2d(x.double(), rotate_weight(layer, w, strength).double(), bias.double(), stride, padding)
            bypass = bypass_forward(layer, x.to(dtype), w.to(dtype), bias.to(dtype), strength, stride=stride,
                                    padding=padding)
            assert bypass.shape == exact.shape and bypass.dtype == dtype
            assert _rel(bypass, exact) <= DTYPE_TOL[dtype], (kind, strength, stride)


def test_cayley_is_right_for_large_blocks_with_threads():
    """Guards the CPU batched-LU defect (torch 2.14.1 / MKL 2024.2, > 1 thread, blocks ≥ ~160): see rotation.solve."""
    threads = torch.get_num_threads()
    try:
        torch.manual_seed(4)
        q = _skew(torch.randn(8, 192, 192) * 0.05)
        eye = torch.eye(192, dtype=torch.float64)
        torch.set_num_threads(1)
        ref = torch.stack([torch.linalg.solve(eye - x, eye + x) for x in q.double()])
        torch.set_num_threads(max(2, threads))
        assert float((_cayley(q).double() - ref).abs().max()) < 1e-5
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("size", [24, 40, 96, 97, 160, 301, 768])
@pytest.mark.parametrize("scale", [0.002, 0.05, 0.3, 1.0])
def test_cayley_paths_are_exact(size, scale):
    """Every route of `_cayley` against fp64: blocks > 96 by block elimination (`_inverse_positive_real`), odd sizes;
    blocks of 17–96 by the series while ‖Q‖ is small (scales 0.002–0.05 here) and by the solve beyond (0.3, 1)."""
    torch.manual_seed(size)
    q = _skew(torch.randn(2, size, size) * scale / math.sqrt(size))
    eye = torch.eye(size, dtype=torch.float64)
    ref = torch.stack([torch.linalg.solve(eye - x, eye + x) for x in q.double()])
    r = _cayley(q)
    assert r.dtype == torch.float32
    e32 = torch.eye(size).expand_as(q)
    lapack = torch.stack([torch.linalg.solve(x, y) for x, y in zip(e32 - q, e32 + q)])  # the fp32 solve, unbatched
    assert float((r.double() - ref).norm() / ref.norm()) < 1e-6
    assert _rel(r, ref) <= 2 * _rel(lapack, ref) + 1e-7, (_rel(r, ref), _rel(lapack, ref))
    assert float((r.double().transpose(-1, -2) @ r.double() - eye).abs().max()) < 4e-6


@pytest.mark.parametrize("size", [97, 130, 300])
@pytest.mark.parametrize("norm", [1.0, 100.0, 1000.0, 1e4, 1e8, 1e19])
def test_large_blocks_with_large_generators_take_the_solve(size, norm):
    """Block elimination without pivoting (`_inverse_positive_real`) only while every ‖Q_i‖_F ≤ 1000, where it is as
    accurate as the fp32 solve; above, the solve itself (before: 300×300 blocks at 1e8 came out off by 13, not
    rotations). A file's blocks: the norm read from them; the trainer's: the constraint's bound, or the solve."""
    from oft_core.rotation import _BLOCK_ELIMINATION_MAX_NORM, _cayley_value

    assert _BLOCK_ELIMINATION_MAX_NORM == 1000.0
    torch.manual_seed(size)
    q = _skew(torch.randn(2, size, size, dtype=torch.float64))
    q = (q * (norm / torch.linalg.matrix_norm(q, keepdim=True))).float()
    eye = torch.eye(size, dtype=torch.float64)
    ref = torch.stack([torch.linalg.solve(eye - x, eye + x) for x in q.double()])
    e32 = torch.eye(size)
    lapack = torch.stack([torch.linalg.solve(e32 - x, e32 + x) for x in q])  # the fp32 solve, one matrix at a time
    r = _cayley_value(q)
    err, err_lapack = float((r.double() - ref).abs().max()), float((lapack.double() - ref).abs().max())
    if norm <= _BLOCK_ELIMINATION_MAX_NORM:
        assert err <= 1.5 * err_lapack + 1e-7, (err, err_lapack)
        assert err < 6e-6
        # the trainer's route (the leaves of the recursion inverted in fp64 instead of by the series: other roundings)
        trainer = _cayley_value(q, norm_bound=norm, sync_free=True)
        assert float((trainer.double() - ref).abs().max()) <= 1.5 * err_lapack + 1e-7
        assert not torch.equal(trainer, lapack)
    else:
        assert torch.equal(r, lapack)  # what the reference tools' fp32 solve gives
        assert torch.equal(_cayley_value(q, norm_bound=norm * 1.001, sync_free=True), lapack)
    assert torch.equal(_cayley_value(q, sync_free=True), lapack)  # no bound known: the solve
    if norm <= 100:
        assert float((r.double().transpose(-1, -2) @ r.double() - eye).abs().max()) < 4e-6


@pytest.mark.parametrize("b", [8, 12, 300])
def test_a_files_huge_generators_merge_as_the_fp32_solve_gives_them(b):
    """An unconstrained layer (LyCORIS diag-oft, PEFT without COFT) whose stored generators are finite but huge: its
    merged weight is M·W with the blocks of the fp32 solve, as the reference tools' solve makes them; before, blocks
    of 8–15 came out NaN at ‖Q_i‖_F = 1e30 and blocks of 300 were not rotations at 1e8."""
    torch.manual_seed(b)
    w = torch.randn(2 * b, 16)
    for norm in (1e4, 1e8, 1e30):
        q = _skew(torch.randn(2, b, b, dtype=torch.float64))
        q = (q * (norm / torch.linalg.matrix_norm(q, keepdim=True))).float()
        layer = make_layer(path="huge.safetensors", name="x", side="out", blocks=[q], transpose=False)
        e32 = torch.eye(b)
        m = torch.block_diag(*[torch.linalg.solve(e32 - x, e32 + x) for x in q])
        merged = rotate_weight(layer, w)
        assert bool(torch.isfinite(merged).all()) == bool(torch.isfinite(m).all()), norm
        assert float((merged.double() - m.double() @ w.double()).abs().max()) < 1e-4 * float(w.abs().max()), norm


def test_the_cayley_method_rule():
    """One rule for every route (`_cayley_method`): the size, and a bound on the blocks' norms when one is known."""
    from oft_core.rotation import _cayley_method

    assert [_cayley_method(b, 0.1) for b in (1, 7, 16)] == ["solve"] * 3
    assert [_cayley_method(b, rho) for b in (8, 15) for rho in (0.0, 24.0, 24.5, None, math.inf, math.nan)] == \
        ["eliminate", "eliminate", "solve", "solve", "solve", "solve"] * 2
    assert _cayley_method(40, 0.01) == ("series", 1) and _cayley_method(40, 0.3) == ("series", 3)
    assert [_cayley_method(40, rho) for rho in (0.5, None, math.nan)] == ["solve"] * 3
    assert [_cayley_method(97, rho) for rho in (0.0, 1000.0, 1001.0, None, math.inf)] == \
        ["blocks", "blocks", "solve", "solve", "solve"]


def test_series_doublings_follow_the_norm():
    from oft_core.rotation import _neumann_doublings

    eye = torch.eye(40)
    for rho, expected in ((0.0, 0), (0.01, 1), (0.05, 2), (0.1, 2), (0.3, 3), (0.35, None), (0.6, None)):
        q = _skew(torch.triu(torch.ones(40, 40), 1))[None]
        q = q * (rho / float(torch.linalg.matrix_norm(q))) if rho else q * 0
        assert _neumann_doublings(q) == expected, rho
        if expected is not None:  # N = 2^(d+1) terms leave a tail ρ^N/(1 − ρ) under 2⁻²⁵
            assert rho ** (2 ** (expected + 1)) / (1 - rho) <= 2.0**-25
    assert float((_cayley(torch.zeros(1, 40, 40)) - eye).abs().max()) == 0


@pytest.mark.parametrize("size", [40, 130])
def test_cayley_gradient_matches_the_solve(size):
    """The trainer differentiates through the same paths (series at 40, block elimination at 130): its gradient
    equals the solve's."""
    torch.manual_seed(3)
    a = (torch.randn(2, size, size) * 0.01).requires_grad_()
    g = torch.randn(2, size, size)
    (_cayley(_skew(a)) * g).sum().backward()
    grad_new, a_ref = a.grad.clone(), a.detach().double().requires_grad_()
    q = _skew(a_ref)
    eye = torch.eye(size, dtype=torch.float64)
    (torch.linalg.solve(eye - q, eye + q) * g.double()).sum().backward()
    assert _rel(grad_new, a_ref.grad) < 1e-5


def _dense_reference(layer, w, strength=1.0):
    """W' from the dense block-diagonal M, in fp64: M·W (side out) or W·M (side in), then the row scale."""
    from oft_core.rotation import apply_rows

    blocks = [b.double() for b in rotation_blocks(layer, strength)]
    flat = w.double().reshape(w.shape[0], -1)
    if layer.kind == "butterfly":
        out = apply_rows(layer, blocks, flat)
    else:
        m = torch.block_diag(*[blk for r in blocks for blk in r])
        out = m @ flat if layer.side == "out" else flat @ m
    if layer.row_scale is not None:
        out = out * layer.row_scale.double()[:, None]
    return out.reshape(w.shape)


@pytest.mark.parametrize("chunk", [1 << 20, 40])  # 40 elements: every block is its own chunk
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["kohya", "lycoris_rescaled", "boft", "peft", "peft_neumann"])
def test_merge_path_in_place_and_chunked_equals_the_dense_product(kind, dtype, chunk, monkeypatch):
    """`rotate_weight` (new tensor) and `rotate_weight_` (in place) give the same bits, chunked or not, and equal the
    dense block-diagonal product rounded once to the weight's dtype."""
    import oft_core.rotation as rot

    monkeypatch.setattr(rot, "_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(5)
    w = torch.randn(16, 4, 3, 3).to(dtype)
    layer = resolve_for_weight(_conv_layer(kind), w.shape)
    for strength in (1.0, 0.5, -1.0):
        ref = _dense_reference(layer, w, strength)
        out = rotate_weight(layer, w, strength)
        in_place = w.clone()
        assert rot.rotate_weight_(layer, in_place, strength) is in_place
        assert out.dtype == dtype and torch.equal(out, in_place)
        assert _rel(out, ref) <= {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}[dtype]
        assert torch.equal(rotate_weight(layer, w, strength, out_dtype=torch.float32),
                           rotate_weight(layer, w.float(), strength))


def test_in_place_merge_updates_a_narrowed_slice_of_a_fused_weight():
    """ComfyUI hands a patch a narrowed view (q, k or v of a fused qkv): only that slice changes, in its parent."""
    from oft_core.rotation import rotate_weight_

    torch.manual_seed(6)
    fused = torch.randn(3 * 24, 10)
    layer = make_layer(path="t", name="k", side="out", blocks=[_gen(3, 8, 0.2)], transpose=True)
    before = fused.clone()
    rotate_weight_(layer, fused.narrow(0, 24, 24))
    assert torch.equal(fused[:24], before[:24]) and torch.equal(fused[48:], before[48:])
    assert torch.equal(fused[24:48], rotate_weight(layer, before[24:48]))
    assert not torch.equal(fused[24:48], before[24:48])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("transpose", [True, False])
def test_solving_against_w_equals_building_r(transpose, dtype, monkeypatch):
    """The route for large blocks (`_solve_positive_real_`, no R formed) gives the product route's weights: several
    panels per block (odd sizes), fused splits, row scale, both strength modes, negative strength, in place too."""
    import oft_core.rotation as rot

    monkeypatch.setattr(rot, "_SOLVE_MIN_BLOCK", 1)
    monkeypatch.setattr(rot, "_SOLVE_PANEL", 7)
    torch.manual_seed(8)
    layer = make_layer(path="t", name="qkv", side="out", blocks=[_gen(2, 30, 0.1), _gen(3, 23, 0.3, seed=1)],
                       transpose=transpose, constraint=Constraint("norm_clamp", 0.02),
                       row_scale=1 + 0.1 * torch.randn(129))
    w = torch.randn(129, 40).to(dtype)  # cols 40 ≤ 4·23: the solve route is taken
    assert rot._solves_directly(layer, *w.shape)
    for mode in ("kohya", "orthogonal"):
        for strength in (1.0, 0.5, -1.0):
            product = rotate_weight(layer, w, strength, mode, blocks=rotation_blocks(layer, strength, mode))
            solved = rotate_weight(layer, w, strength, mode)
            assert _rel(solved, _dense_reference(layer, w, strength) if mode == "kohya" else product) <= \
                {torch.float32: 2e-6, torch.bfloat16: 8e-3}[dtype]
            assert _rel(solved, product) <= {torch.float32: 2e-6, torch.bfloat16: 8e-3}[dtype]
            in_place = w.clone()
            rot.rotate_weight_(layer, in_place, strength, mode)
            assert torch.equal(in_place, solved)


def test_blocked_solve_is_exact_on_large_blocks():
    from oft_core.rotation import _solve_positive_real_

    torch.manual_seed(9)
    q = _skew(torch.randn(2, 700, 700) * 0.3 / math.sqrt(700))
    w = torch.randn(2, 700, 50)
    eye = torch.eye(700).expand_as(q)
    ref = torch.stack([torch.linalg.solve((e - x).double(), y.double()) for e, x, y in zip(eye, q, w)])
    y = _solve_positive_real_((eye - q).contiguous(), w.clone())
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-6


def test_a_patch_on_an_accelerator_reads_its_finite_checks_from_the_device_once(monkeypatch):
    """ComfyUI's low-VRAM mode patches weights on every forward: with the rotation blocks cached (as the weight adapter
    keeps them), a patch on an accelerator reads the device once (the weight's and the result's finite flags
    together), and still refuses an overflow the weight did not have and keeps an Inf it had. Pinned on the CPU by
    routing it through the deferred path and counting the host reads."""
    from test_sync_free import count_reads

    from oft_core import rotation
    from oft_core.errors import OFTError

    g = torch.Generator().manual_seed(0)
    layer = make_layer(path="x.safetensors", name="l", side="out", blocks=[0.3 * _skew(torch.randn(4, 10, 10,
                       generator=g))], transpose=True, constraint=Constraint("norm_clamp", 1e3), key="oft_unet_l")
    w = ((torch.rand(40, 40, generator=g) * 2 - 1) * 2000).to(torch.float16)
    expected = rotate_weight(layer, w, 1.0)
    monkeypatch.setattr(rotation, "_reads_deferred", lambda t: True)
    for strength in (1.0, 900.0):
        blocks = rotation.rotation_blocks(layer, strength, "kohya")
        with count_reads() as reads:
            try:
                out = rotation.rotate_weight_(layer, w.clone(), strength, blocks=blocks)
            except OFTError as e:
                assert strength == 900.0 and "overflows" in str(e)
            else:
                assert strength == 1.0 and torch.equal(out, expected)
        assert sum(reads.values()) == 1, reads
    with_inf = w.clone()
    with_inf[0, 0] = float("inf")  # an Inf the weight already has: no refusal, whatever the result holds
    out = rotation.rotate_weight_(layer, with_inf, 900.0, blocks=rotation.rotation_blocks(layer, 900.0, "kohya"))
    assert not torch.isfinite(out).all()
    monkeypatch.undo()
    with count_reads() as reads:  # the CPU path reads a chunk at a time (a small mask): more than one read
        rotation.rotate_weight_(layer, w.clone(), 1.0, blocks=rotation.rotation_blocks(layer, 1.0, "kohya"))
    assert sum(reads.values()) >= 2


@pytest.mark.parametrize("norm", [10.0, 1e4, 1e8])
def test_solving_against_w_only_where_its_elimination_is_accurate(norm, monkeypatch):
    """`_rotate_by_solving` eliminates without pivoting: taken only while every block's ‖Q_i‖_F (constrained, scaled)
    is ≤ `_BLOCK_ELIMINATION_MAX_NORM`; beyond, the merge builds R by the pivoted solve, as `rotation_blocks` does
    (before: 512-wide blocks at 1e4 came out ~25× less accurate than the fp32 solve)."""
    import oft_core.rotation as rot

    calls = []
    solving = rot._rotate_by_solving
    monkeypatch.setattr(rot, "_rotate_by_solving", lambda *a: calls.append(solving(*a)) or calls[-1])
    torch.manual_seed(11)
    b = 512
    q = _skew(torch.randn(2, b, b, dtype=torch.float64))
    q = (q * (norm / torch.linalg.matrix_norm(q, keepdim=True))).float()
    layer = make_layer(path="huge.safetensors", name="x", side="out", blocks=[q], transpose=False)
    w = torch.randn(2 * b, 256)
    assert rot._solves_directly(layer, *w.shape)
    merged = rotate_weight(layer, w)
    assert calls == [norm <= rot._BLOCK_ELIMINATION_MAX_NORM]
    eye = torch.eye(b, dtype=torch.float64)
    m = torch.block_diag(*[torch.linalg.solve(eye - x, eye + x) for x in q.double()])
    ref = m @ w.double()
    e32 = torch.eye(b)
    m32 = torch.block_diag(*[torch.linalg.solve(e32 - x, e32 + x) for x in q])
    err, err_solve = _rel(merged, ref), _rel(m32 @ w, ref)
    assert err <= 2 * err_solve + 1e-6, (err, err_solve)
