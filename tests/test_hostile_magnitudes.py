"""Hostile but FINITE magnitudes in adapter files and user numbers (NaN / Inf are refused at load elsewhere:
tests/test_bad_input.py, tests/test_batched_read.py).

Each test shows what a finite but huge value does on one path, with real values: either the mathematically right
result (the one the reference tool computes) or an `OFTError` naming the file / input, what was expected and what
was found, raised before anything is patched or written. What happened before each fix is in the test's docstring.
The Cayley map of huge generators itself (‖Q‖ ≳ 100 without a constraint) is not here: it is the lead's
(`rotation._cayley_eliminated`, `_inverse_positive_real`).
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from oracle import get_case
from safetensors.torch import load_file, save_file

from oft_core import OFTError, load_adapter, rotate_features, rotate_weight, rotation_blocks
from oft_core.combine import blend, merge
from oft_core.formats import write_adapter
from oft_core.rotation import _NORM_EPS, _neumann, _skew
from oft_core.spec import Constraint, OFTAdapter, _Blocks, _make_layers, _neumann_coefficients, make_layer

KOHYA_LAYER = "oft_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
LYCORIS = get_case("lycoris_diag_oft_dim8")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _kohya_file(path, a: torch.Tensor, alpha: float = 1e-3, names=(KOHYA_LAYER,)):
    tensors = {}
    for name in names:
        tensors[f"{name}.oft_blocks"] = a.clone()
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def _cayley64(q: torch.Tensor) -> torch.Tensor:
    """R = (I + Q)(I − Q)⁻¹ in float64 (the reference for fp32 results)."""
    q = q.double()
    eye = torch.eye(q.shape[-1], dtype=torch.float64).expand_as(q)
    return (eye + q) @ torch.linalg.inv(eye - q)


# ------------------------------------------------------------------------------------------------ norm clamp
def test_a_clamped_layer_whose_norm_overflows_float32_is_refused_at_load(tmp_path):
    """kohya / LyCORIS clamp Q ← Q·(min(‖Q‖, c) + ε)/(‖Q‖ + ε). With values ~10¹⁸ (finite, and Q = A − Aᵀ finite)
    ‖Q‖² overflows float32: sd-scripts' own formula gives ‖Q‖ = Inf, scale 0, Q = 0, R = I: the layer silently
    vanished (and so it did here before). Now the file is refused by name when it is read."""
    a = 1e18 * torch.randn(8, 40, 40, generator=_gen())
    q = _skew(a)
    assert torch.isfinite(q).all()
    norm = torch.norm(q.flatten())  # what sd-scripts computes (networks/oft.py: torch.norm(block_Q.flatten()))
    c = 1e-3 * 320
    assert math.isinf(float(norm))
    assert float((torch.clamp(norm, max=c) + _NORM_EPS) / (norm + _NORM_EPS)) == 0.0  # the references' identity
    path = _kohya_file(tmp_path / "huge.safetensors", a)
    with pytest.raises(OFTError) as e:
        load_adapter(path)
    msg = str(e.value)
    for words in (str(path), KOHYA_LAYER, "‖Q‖_F of the split overflows float32", "largest |value|",
                  "‖Q‖ ≤ 0.001·dim", "identity", "damaged"):
        assert words in msg, (words, msg)


def test_one_layer_with_an_overflowing_norm_among_many_is_refused_by_name(tmp_path):
    """The kohya reader checks many layers at once (`_finite_each`): the flag of the bad one is what names it."""
    g = _gen(1)
    names = [f"oft_unet_layer{i:02d}" for i in range(20)]
    tensors = {}
    for i, name in enumerate(names):
        tensors[f"{name}.oft_blocks"] = (1e19 if i == 13 else 1e-3) * torch.randn(2, 4, 4, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(1e-3)
    path = tmp_path / "many.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(OFTError, match="overflows float32") as e:
        load_adapter(path)
    assert "oft_unet_layer13" in str(e.value) and str(path) in str(e.value)


def test_finite_flags_are_false_for_a_norm_beyond_float32_only():
    """`_finite_each`'s flag per row: no NaN / Inf and Σ x² (‖Q‖²) within float32. 10¹⁸ × 32 values: ‖Q‖ ~ 6·10¹⁸,
    fine; 10¹⁹ × 32: ‖Q‖² ~ 3·10³⁹, beyond."""
    from oft_core.spec import _finite_each

    stacked = torch.ones(4, 2, 4, 4) * 1e-3
    stacked[1] = 1e18
    stacked[2] = 1e19
    stacked[3, 0, 0, 0] = float("inf")
    assert _finite_each(stacked) == [True, True, False, False]
    assert _finite_each(stacked[:2]) == [True, True]


def test_a_large_but_representable_norm_is_clamped_exactly_as_the_formula_says(tmp_path):
    """‖Q‖ ~10¹⁰ fits in float32: the clamp scales Q down to the bound, and R is the Cayley map of that (checked
    against float64), the rotation sd-scripts computes."""
    a = 1e8 * torch.randn(8, 40, 40, generator=_gen(2))
    layer = next(iter(load_adapter(_kohya_file(tmp_path / "big.safetensors", a))))
    q = _skew(a).double()
    c = layer.constraint.value * 320
    clamped = q * ((c + 1e-8) / (float(torch.norm(q.flatten())) + 1e-8))
    expected = _cayley64(clamped).transpose(-1, -2)  # kohya applies Rᵀ
    got = rotation_blocks(layer)[0]
    assert float((got.double() - expected).abs().max()) < 1e-6
    assert float((got.double() - torch.eye(40, dtype=torch.float64)).abs().max()) > 1e-3  # not the identity


def test_an_alpha_near_the_float32_limit_is_a_clamp_that_never_bites(tmp_path):
    """alpha × 320 rows just under float32's largest value is accepted (above it is refused: test_fail_closed.py);
    the clamp then never bites, so the rotation is the unconstrained one bit for bit, at every strength."""
    a = 1e3 * torch.randn(8, 40, 40, generator=_gen(15))
    alpha = float(torch.tensor(1e36))  # × 320 = 3.2e38 < 3.40e38
    layer = next(iter(load_adapter(_kohya_file(tmp_path / "wide.safetensors", a, alpha=alpha))))
    assert layer.constraint.kind == "norm_clamp" and layer.constraint.value == alpha
    free = layer.with_(constraint=Constraint())
    w = torch.randn(320, 16, generator=_gen(16))
    for strength, mode in ((1.0, "kohya"), (0.5, "kohya"), (-3.0, "orthogonal")):
        assert torch.equal(rotate_weight(layer, w, strength, mode), rotate_weight(free, w, strength, mode))


def _unconstrained_lycoris_at(folder, peak: float):
    """The LyCORIS fixture with alpha 0 (no constraint) and every `.oft_blocks` scaled to entries up to `peak`,
    written as `folder`/noclamp.safetensors: (its path, its tensors)."""
    sd = load_file(str(LYCORIS.adapter))
    for k in list(sd):
        if k.endswith(".alpha"):
            sd[k] = torch.tensor(0.0)
        elif k.endswith(".oft_blocks"):
            sd[k] = sd[k] / sd[k].abs().max() * peak
    path = folder / "noclamp.safetensors"
    save_file(sd, str(path))
    return path, sd


def test_an_overflowing_norm_is_kept_when_no_constraint_divides_by_it(tmp_path):
    """LyCORIS alpha 0 (no constraint): the norm is never taken, so a huge Q is read as it is (its Cayley map is
    defined for every Q)."""
    path, sd = _unconstrained_lycoris_at(tmp_path, 1e19)
    adapter = load_adapter(path)
    for layer in adapter:
        assert layer.constraint.kind == "none"
        assert math.isinf(float(torch.norm(layer.blocks[0].flatten())))
        assert torch.equal(layer.blocks[0], _skew(sd[f"{layer.key}.oft_blocks"]))


def test_a_false_flag_for_a_huge_norm_never_lets_a_later_nan_row_through():
    """`_make_layers` builds later rows "like" the first of their signature: a false flag (NaN, Inf, or a norm
    beyond float32) is now looked at row by row, so an unconstrained huge-norm row (accepted) cannot carry a NaN row
    of the same signature through."""
    huge = torch.full((2, 4, 4), 1e19) * torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    bad = torch.zeros(2, 4, 4)
    bad[0, 0, 1] = float("nan")
    none = Constraint()
    rows = dict(path="f.safetensors", names=["l0", "l1"], keys=["k0", "k1"], blocks=[(huge,), (bad,)],
                finite=[(False,), (False,)], constraints=[none, none], sources=["kohya"] * 2, side="out",
                transpose=True)
    with pytest.raises(OFTError, match="'k1'.*contain NaN or Inf"):
        _make_layers(**rows)
    rows.update(names=["l0"], keys=["k0"], blocks=[(huge,)], finite=[(False,)], constraints=[none], sources=["k"])
    (layer,) = _make_layers(**rows)
    assert torch.equal(layer.blocks[0], huge)
    with pytest.raises(OFTError, match="overflows float32"):
        make_layer(path="f", name="x", side="out", blocks=_Blocks([huge], [False]), transpose=True,
                   constraint=Constraint("norm_clamp", 1e-3))


def _peft_coft_copy(tmp_path, name: str, key_end: str, scale: float):
    """A PEFT fixture with COFT switched on in its config and its stored blocks scaled to a largest |value| of
    `scale`."""
    import json

    d = tmp_path / f"{name}_{scale:g}"
    shutil.copytree(get_case(name).adapter, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["coft"] = True
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    model = d / "adapter_model.safetensors"
    sd = load_file(str(model))
    save_file({k: v / v.abs().max() * scale if k.endswith(key_end) else v for k, v in sd.items()}, str(model))
    return d, model, cfg["eps"]


@pytest.mark.parametrize("name,key_end", [("peft_oft_cayley_bs8", "oft_R.weight"), ("peft0.13.2_oft_r4", "oft_r")])
def test_peft_coft_blocks_whose_norm_overflows_are_refused(tmp_path, name, key_end):
    """PEFT's COFT projects each block to ‖·‖_F ≤ eps/√blocks: with a norm beyond float32 PEFT computes Inf and the
    block becomes 0 (the identity), here too before. Current files project Q at use (`make_layer` refuses), PEFT ≤
    0.15 projects the stored A when read (its reader refuses). With values ~10⁸ the projection is exact."""
    d, model, eps = _peft_coft_copy(tmp_path, name, key_end, 1e19)
    with pytest.raises(OFTError, match="overflows float32") as e:
        load_adapter(d)
    assert str(model) in str(e.value) and f"COFT eps {eps:g}" in str(e.value) and "identity" in str(e.value)
    d, model, eps = _peft_coft_copy(tmp_path, name, key_end, 1e8)
    for layer in list(load_adapter(d))[:3]:
        if key_end == "oft_r":  # A projected when read: Q = ½(A_p − A_pᵀ), ‖A_p,i‖ = eps/√blocks
            raw = load_file(str(model))[layer.key + ".oft_r"].double()
            bound = eps / math.sqrt(raw.shape[0])
            a_p = raw * (bound / torch.linalg.matrix_norm(raw, keepdim=True))
            expected = 0.5 * (a_p - a_p.transpose(-1, -2))
            assert float((layer.blocks[0].double() - expected).abs().max()) <= 1e-6 * float(expected.abs().max())
        else:  # Q projected at use: every block's norm is the bound, and R its Cayley map
            from oft_core.rotation import _constrain

            q = _constrain(layer, layer.blocks[0], 0)
            norms = torch.linalg.matrix_norm(q.double())
            assert torch.allclose(norms, torch.full_like(norms, eps / math.sqrt(q.shape[0])), rtol=1e-6, atol=0)
            expected = _cayley64(q).transpose(-1, -2) if layer.transpose else _cayley64(q)
            assert float((rotation_blocks(layer)[0].double() - expected).abs().max()) < 1e-6


# ------------------------------------------------------------------------------------------------ Neumann
def _peft_neumann_copy(tmp_path, rho: float):
    """The PEFT Cayley–Neumann fixture with every layer's blocks scaled so that the largest block's ‖Q_i‖_F = rho."""
    src = get_case("peft_oft_neumann_r4").adapter
    d = tmp_path / f"neumann_{rho:g}"
    shutil.copytree(src, d)
    model = d / "adapter_model.safetensors"
    sd = load_file(str(model))
    for k, v in sd.items():
        # packed upper triangle U: Q = U − Uᵀ, so ‖Q_i‖_F = √2·‖U_i‖
        sd[k] = v * (rho / (math.sqrt(2) * float(v.norm(dim=1).max())))
    save_file(sd, str(model))
    return d, model


def test_a_neumann_series_that_overflows_float32_is_refused_at_load(tmp_path):
    """PEFT's Σ c_k Q^k (5 terms: I + 2Q + 2Q² + 2Q³ + Q⁴) of ‖Q‖ = 10¹⁹ overflows float32: PEFT gets NaN, and so
    did the bypass path here, silently (the merge path blamed the strength). Now the file is refused when read."""
    d, model = _peft_neumann_copy(tmp_path, 1e19)
    with pytest.raises(OFTError) as e:
        load_adapter(d)
    msg = str(e.value)
    for words in (str(model), "Cayley–Neumann series of 5 terms", "expected blocks with ‖Q_i‖_F ≤ 4.29e+09",
                  "found ‖Q_i‖_F up to 1e+19"):
        assert words in msg, (words, msg)
    # what the series gives for such a block: NaN (the reason for the refusal)
    q = _skew(torch.randn(1, 8, 8, generator=_gen(3)))
    q = q * (1e19 / float(torch.linalg.matrix_norm(q).max()))
    assert not torch.isfinite(_neumann(q, _neumann_coefficients(5, last_term_halved=True))).all()


def test_a_large_neumann_series_that_fits_float32_is_the_series(tmp_path):
    """‖Q‖ = 10³: far from a rotation, but finite, and exactly what PEFT computes (checked in float64)."""
    d, _ = _peft_neumann_copy(tmp_path, 1e3)
    adapter = load_adapter(d)
    for layer in list(adapter)[:4]:
        q = layer.blocks[0].double()
        expected = _neumann(q, layer.neumann_coeffs)
        expected = expected.transpose(-1, -2) if layer.transpose else expected
        got = rotation_blocks(layer)[0].double()
        assert float((got - expected).abs().max() / expected.abs().max()) < 1e-6
        assert float(expected.abs().max()) > 1e8


def test_a_neumann_series_overflowing_only_at_a_strength_is_refused_on_both_paths():
    """Finite at strength 1 (so it loads) but not at kohya strength 1000 or orthogonal strength 3: refused naming
    the layer, on the merge path and on the bypass path (`rotate_features`), which before returned NaN."""
    q = _skew(torch.randn(4, 8, 8, generator=_gen(4)))
    q = q * (4e9 / float(torch.linalg.matrix_norm(q).max()))
    layer = make_layer(path="n.safetensors", name="l", key="base_model.model.l", side="in", blocks=[q],
                       transpose=True, parameterization="neumann",
                       neumann_coeffs=_neumann_coefficients(5, last_term_halved=True))
    r = rotation_blocks(layer)[0]
    assert torch.isfinite(r).all() and float(r.abs().max()) > 1e36
    w = torch.randn(8, 32, generator=_gen(5))
    x = torch.randn(3, 32, generator=_gen(6))
    for strength, mode in ((1000.0, "kohya"), (3.0, "orthogonal")):
        for run in (lambda: rotation_blocks(layer, strength, mode), lambda: rotate_features(layer, x, strength, mode),
                    lambda: rotate_weight(layer, w, strength, mode)):
            with pytest.raises(OFTError) as e:
                run()
            assert "'base_model.model.l'" in str(e.value)
            assert "Cayley–Neumann series overflows float32" in str(e.value) or "overflows" in str(e.value)
        with pytest.raises(OFTError, match=f"Cayley–Neumann series overflows float32 at strength {strength:g}"):
            rotate_features(layer, x, strength, mode)


# ------------------------------------------------------------------------------------------------ stored R
def _oft_diag_file(path, r: torch.Tensor, name="lycoris_down_blocks_0_attentions_0_proj_in"):
    save_file({f"{name}.oft_diag": r.contiguous()}, str(path))
    return path


def test_a_stored_half_turn_is_applied_as_stored_and_has_no_power(tmp_path):
    """R = −I per block is a rotation (a half turn). At kohya strength 1 it is applied as stored (W' = −W, what
    LyCORIS computes); its orthogonal power and a merge weight other than 1 need its Cayley generator, which does not
    exist (R + I = 0): before, torch's "The solver failed because the input matrix is singular"; now an OFTError
    naming the layer (and the file, from merge)."""
    r = -torch.eye(4).expand(4, 4, 4).clone()
    path = _oft_diag_file(tmp_path / "flip.safetensors", r)
    adapter = load_adapter(path)
    (layer,) = adapter
    w = torch.randn(16, 8, generator=_gen(7))
    assert torch.equal(rotate_weight(layer, w), -w)
    assert torch.equal(rotate_weight(layer, w, 0.5), 0.0 * w)  # kohya: I + ½(R − I) = 0
    with pytest.raises(OFTError, match=r"'lycoris_down_blocks_0_attentions_0_proj_in'.*half a turn \(eigenvalue −1"):
        rotate_weight(layer, w, 0.5, "orthogonal")
    with pytest.raises(OFTError, match="half a turn") as e:
        merge([(adapter, 0.5)], "compose")
    assert str(path) in str(e.value)


def test_a_stored_matrix_that_is_no_rotation(tmp_path):
    """LyCORIS 2.0 trained R as a free matrix. R = 3I: kohya strength is linear in R (W' = 3W at 1, 5W at 2);
    orthogonal strength s is Cayley(s·Q) with Q = (R − I)(R + I)⁻¹ = ½I: at s = ½, (1 + ¼)/(1 − ¼) = 5/3; at s = 2,
    I − 2Q = 0 (before: torch's singular-matrix error, or NaN for blocks of 8–15; now an OFTError). Composing it
    at weight ½ took the skew part of Q (zero) and silently wrote the identity; now refused: it is no rotation."""
    for b in (4, 8):
        r = 3 * torch.eye(b).expand(16 // b, b, b).clone()
        path = _oft_diag_file(tmp_path / f"three{b}.safetensors", r)
        adapter = load_adapter(path)
        (layer,) = adapter
        w = torch.randn(16, 8, generator=_gen(8))
        assert torch.allclose(rotate_weight(layer, w), 3 * w, rtol=1e-6, atol=0)
        assert torch.allclose(rotate_weight(layer, w, 2.0), 5 * w, rtol=1e-6, atol=0)
        assert torch.allclose(rotate_weight(layer, w, 0.5, "orthogonal"), w * (5 / 3), rtol=1e-6, atol=0)
        with pytest.raises(OFTError, match="no orthogonal power at strength 2"):
            rotate_weight(layer, w, 2.0, "orthogonal")
        with pytest.raises(OFTError, match=r"not a rotation \(max \|Cayley\(Q\) − R\| 2") as e:
            merge([(adapter, 0.5)], "compose")
        assert str(path) in str(e.value)


def test_a_stored_rotation_still_composes_at_any_weight(tmp_path):
    """The checks above leave real rotations alone: R = Cayley(Q) stored, composed at weight ½, equals the stored
    layer at orthogonal strength ½ (and Cayley(½Q) in float64)."""
    q = _skew(0.2 * torch.randn(4, 4, 4, generator=_gen(9)))
    r = _cayley64(q).float()
    adapter = load_adapter(_oft_diag_file(tmp_path / "rot.safetensors", r))
    (layer,) = adapter
    w = torch.randn(16, 8, generator=_gen(10))
    (half,) = merge([(adapter, 0.5)], "compose")
    expected = torch.block_diag(*_cayley64(0.5 * q).transpose(-1, -2)) @ w.double()  # LyCORIS applies Rᵀ
    assert float((rotate_weight(half, w).double() - expected).abs().max()) < 1e-5
    assert float((rotate_weight(layer, w, 0.5, "orthogonal").double() - expected).abs().max()) < 1e-5


# ------------------------------------------------------------------------------------------------ row scales
def test_row_scale_zero_and_huge_give_the_formula_or_name_the_scale(tmp_path):
    """LyCORIS rescale: W' = rescale ⊙ (Rᵀ·W). 0 gives zero rows and 10³⁰ the rows × 10³⁰ (both what LyCORIS
    computes, finite in fp32); on an fp16 weight 10³⁰ overflows: refused, and the message now names the row scale
    (before it only said "use a smaller strength", which cannot help)."""
    case = get_case("lycoris_diag_oft_rescaled")
    adapter = load_adapter(case.adapter)
    base = load_file(str(case.base_file))
    layer = next(iter(adapter))
    key = next(k for k, v in case.module_key.items() if v == layer.key.removeprefix("lycoris_"))
    w = base[key]
    rotated = rotate_weight(layer.with_(row_scale=None), w)
    for s in (0.0, 1e30):
        scaled = layer.with_(row_scale=torch.full_like(layer.row_scale, s))
        out = rotate_weight(scaled, w)
        assert torch.isfinite(out).all()
        expected = rotated.double().reshape(w.shape[0], -1) * s
        assert float((out.double().reshape(w.shape[0], -1) - expected).abs().max()) <= 1e-6 * max(
            float(expected.abs().max()), 1e-30)
    with pytest.raises(OFTError, match=r"overflows its dtype; use a smaller strength; its row scale \(rescale / "
                                       r"oft_s\) reaches 1e\+30"):
        rotate_weight(layer.with_(row_scale=torch.full_like(layer.row_scale, 1e30)), w.half())


# ------------------------------------------------------------------------------------------------ user numbers
def test_blend_and_merge_numbers_go_through_the_one_strength_check():
    """blend(a, b, t) is Q_a + t(Q_b − Q_a): t = 10³⁰ gave generators of 10³⁰ (and 10³⁸ an error blaming "the
    file"); average weights that nearly cancel scaled the generators by 10⁷. Now the same range as every strength
    (|x| ≤ 1000), naming the number."""
    a = load_adapter(LYCORIS.adapter)
    c = load_adapter(get_case("lycoris_diag_oft_constrained").adapter)
    for t in (1e30, 1e38, -2000.0):
        with pytest.raises(OFTError, match=r"blend factor: expected a number from -1000 to 1000"):
            blend(a, c, t)
    with pytest.raises(OFTError, match=r"average weight 1 / the weights' sum 1e-07: expected a number from -1000"):
        merge([(a, 1.0), (c, -0.9999999)], "average")
    with pytest.raises(OFTError, match=r"average weight: expected a number from -1000 to 1000, found 1e\+30"):
        merge([(a, 1e30), (c, 1.0)], "average")
    with pytest.raises(OFTError, match=r"compose weight: expected a number from -1000 to 1000, found 1e\+30") as e:
        merge([(a, 1e30)], "compose")
    assert str(LYCORIS.adapter) in str(e.value)
    # in range: unchanged (blend at 1000 is still Q_a + 1000(Q_b − Q_a))
    far = blend(a, a, 1000.0)
    assert all(torch.equal(x.blocks[0], y.blocks[0]) for x, y in zip(far, a) if x.constraint.kind == "none"
               and y.constraint.kind == "none")


def test_combined_generators_that_overflow_float32_name_the_operation():
    """Finite inputs near float32's limit times in-range weights: the sum overflows. Before, the result was refused
    with "the file is damaged or the training diverged" (about a file that was fine); now the operation is named.
    A blend inside [0, 1] has a finite value and gets it (before: refused, as torch.lerp's Q_b − Q_a overflowed)."""
    q = _skew(torch.randn(2, 4, 4, generator=_gen(14)))
    q = q / q.abs().max() * 3e38
    a = OFTAdapter({("unet", "l"): make_layer(path="a", name="l", side="out", blocks=[q], transpose=True)}, "lycoris")
    b = OFTAdapter({("unet", "l"): make_layer(path="b", name="l", side="out", blocks=[-q], transpose=True)}, "lycoris")
    for run, what in ((lambda: blend(a, b, 2.0), "blend"), (lambda: merge([(a, 3.0), (b, -1.0)], "average"), "average"),
                      (lambda: merge([(a, 2.0)], "compose"), "combined")):
        with pytest.raises(OFTError, match=rf"'l': the {what} generators of split 0 overflow float32.*largest \|Q\| "
                                           r"3e\+38"):
            run()
    # in [0, 1] the blend is finite, though Q_b − Q_a = −2Q overflows in fp32 (torch.lerp alone gave ±Inf): ½Q
    assert not torch.isfinite(torch.lerp(q, -q, 0.25)).all()
    (half,) = blend(a, b, 0.25)
    assert torch.equal(half.blocks[0], 0.5 * q)


# ------------------------------------------------------------------------------------------------ writers / stores
def test_extracting_a_lora_that_overflows_fp16_is_refused_before_writing(tmp_path):
    """A LoRA factor of ~10⁹ is Inf in fp16: it was written so, silently (112 Inf tensors for this file). Now
    refused naming the factor and the dtype; bf16 (float32's range) writes the same factors as fp32, rounded."""
    from oft_core.extract import extract_lora

    case = get_case("lycoris_diag_oft_rescaled")
    sd = load_file(str(case.adapter))
    path = tmp_path / "strong.safetensors"
    save_file({k: v * 1e19 if k.endswith(".rescale") else v for k, v in sd.items()}, str(path))
    out16 = tmp_path / "l16.safetensors"
    with pytest.raises(OFTError, match=r"the LoRA factor lora_unet_.*\.lora_(up|down)\.weight holds values up to "
                                       r".*, beyond fp16's largest \(65504\)") as e:
        extract_lora(path, str(case.base_file), str(out16), rank=4, dtype="fp16")
    assert str(path) in str(e.value)
    assert not out16.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["strong.safetensors"]
    extract_lora(path, str(case.base_file), str(tmp_path / "l32.safetensors"), rank=4, dtype="fp32")
    extract_lora(path, str(case.base_file), str(tmp_path / "lbf.safetensors"), rank=4, dtype="bf16")
    f32, fbf = load_file(str(tmp_path / "l32.safetensors")), load_file(str(tmp_path / "lbf.safetensors"))
    assert max(float(v.abs().max()) for v in f32.values()) > 1e9
    for k, v in f32.items():
        assert torch.isfinite(fbf[k]).all()
        assert float((fbf[k].float() - v).abs().max()) <= 2 ** -8 * float(v.abs().max())


def test_kohya_cannot_hold_an_unconstrained_layer_whose_norm_overflows(tmp_path):
    """kohya always clamps ‖Q‖ at alpha × width, so an unconstrained layer is written with an alpha large enough
    never to clamp; for ‖Q‖ beyond float32 there is none: before, `OverflowError: cannot convert float infinity to
    integer` (a traceback); now a refusal naming the layer, nothing written. LyCORIS (alpha 0) holds it exactly."""
    src, _ = _unconstrained_lycoris_at(tmp_path, 1e19)
    adapter = load_adapter(src)
    out = tmp_path / "k.safetensors"
    with pytest.raises(OFTError, match=r"cannot be written as kohya without changing the rotation: lycoris_.*: its "
                                       r"‖Q‖_F \(beyond float32\) needs an alpha"):
        write_adapter(adapter, out, "kohya")
    assert not out.exists()
    back = load_adapter(write_adapter(adapter, tmp_path / "l.safetensors", "lycoris"))
    for layer in adapter:
        assert torch.equal(back.layers[(layer.component, layer.name)].blocks[0], layer.blocks[0])


# ------------------------------------------------------------------------------------------------ trainer
def test_a_resumed_adapter_with_huge_generators(tmp_path):
    """A kohya file of the trainer's own layout with generators ~10⁸ (alpha 10⁻³): resumed, its blocks are the
    clamped Cayley rotation (equal to what the file gives when applied); with ~10¹⁹ the norm overflows and the file
    is refused when read, before any parameter is written."""
    from oft_core.demo import _ToyModel
    from oft_core.train import OFTTrainer, select_targets

    model = _ToyModel(dim=16).requires_grad_(False)
    targets = select_targets(model, "attention", "generic")
    a = OFTTrainer(targets, num_blocks=4, alpha=1e-3)
    with torch.no_grad():
        for i, p in enumerate(a.parameters()):
            p.copy_(torch.randn(p.shape, generator=_gen(20 + i)))
    small = write_adapter(a.to_adapter(), tmp_path / "a.safetensors", "kohya")
    sd = load_file(str(small))
    for scale, name in ((1e8, "big"), (1e19, "huge")):
        save_file({k: v * scale if k.endswith(".oft_blocks") else v for k, v in sd.items()},
                  str(tmp_path / f"{name}.safetensors"))
    loaded = load_adapter(tmp_path / "big.safetensors")
    b = OFTTrainer(targets, num_blocks=4, alpha=1e-3)
    b.load_adapter(loaded)
    with torch.no_grad():
        for tl in b.layers:
            got = b.blocks(tl)[0]
            layer = loaded.layers[("unet", tl.path.replace(".", "_"))]
            assert torch.isfinite(got).all()
            assert float((got - rotation_blocks(layer)[0]).abs().max()) < 1e-6
            assert float((got - torch.eye(4)).abs().max()) > 1e-3
    c = OFTTrainer(targets, num_blocks=4, alpha=1e-3)
    before = [p.clone() for p in c.parameters()]
    with pytest.raises(OFTError, match="overflows float32") as e:
        c.load_adapter(load_adapter(tmp_path / "huge.safetensors"))
    assert "huge.safetensors" in str(e.value)
    assert all(torch.equal(p, q) for p, q in zip(before, c.parameters()))


def test_an_adapter_made_in_memory_names_no_empty_file():
    """An OFTError with path "" (an adapter made in memory: the trainer's, a merge) starts with the layer, not ": "."""
    with pytest.raises(OFTError) as e:
        make_layer(path="", name="x", side="out", blocks=[torch.full((1, 2, 2), float("nan"))], transpose=True)
    assert str(e.value).startswith("layer 'x': ")


def test_normal_files_are_unchanged_by_the_magnitude_checks():
    """Every fixture still loads, and its layers still match their stored values (the checks only refuse)."""
    from oracle import all_cases

    for case in all_cases():
        adapter = load_adapter(case.adapter)
        assert len(adapter) > 0
        for layer in adapter:
            for r in rotation_blocks(layer):
                assert torch.isfinite(r).all()


# ------------------------------------------------------------------------------------------------ ComfyUI
@pytest.mark.comfyui
@pytest.mark.parametrize("apply_mode", ["merge", "bypass"])
def test_a_rotation_a_strength_breaks_is_refused_by_the_apply_node_before_any_patch(comfyui_oft, tmp_path,
                                                                                      apply_mode):
    """A stored half turn (LyCORIS oft_diag R = −I) at orthogonal strength 0.5 has no rotation. Before, OFT Apply
    added its patches and the error (torch's singular-matrix error) came from ComfyUI's model load while sampling,
    whose `ModelPatcher.load` has no handler: the weights patched before it stayed patched until the next unpatch.
    Now the apply itself raises, naming the file and layer, and nothing is patched.
    At kohya strength the same file applies (W' = −W on that layer)."""
    import comfy_models
    from comfyui_oft.nodes import patch
    from test_nodes import assert_same_state, patched, snapshot

    path = tmp_path / "flip.safetensors"
    save_file({"lycoris_double_blocks_0_img_attn_proj.oft_diag": -torch.eye(8).expand(16, 8, 8).contiguous()},
              str(path))
    from comfyui_oft.oft_core import OFTError as PackError
    from comfyui_oft.oft_core import load_adapter as pack_load

    adapter = pack_load(path)
    base = comfy_models.flux_tiny()
    snap = snapshot(base)
    with pytest.raises(PackError, match="half a turn") as e:
        patch.apply_oft(base, None, adapter, 0.5, "orthogonal", apply_mode)
    assert str(path) in str(e.value) and "lycoris_double_blocks_0_img_attn_proj" in str(e.value)
    assert not base.patches
    assert_same_state(base, snap)
    model, _, text = patch.apply_oft(base, None, adapter, 1.0, "kohya", apply_mode)
    assert "1 of 1 adapter layers applied" in text
    if apply_mode == "merge":
        key = "diffusion_model.double_blocks.0.img_attn.proj.weight"
        assert torch.equal(patched(model, [key])[key], -snap[key])


@pytest.mark.comfyui
def test_create_hook_oft_refuses_a_rotation_its_strength_breaks_before_any_hook(comfyui_oft, tmp_path):
    """Create Hook OFT builds the same rotations as OFT Apply at its strengths: a stored half turn at orthogonal
    strength_model 0.5 is refused naming the file, no hook made (before: the hook was made and failed while
    sampling); strength_clip does not apply to UNet layers (0.5 there is fine), kohya mode makes the hook."""
    from comfyui_oft.nodes import hook_nodes
    from comfyui_oft.oft_core import OFTError as PackError
    from comfyui_oft.oft_core import load_adapter as pack_load

    path = tmp_path / "flip.safetensors"
    save_file({"lycoris_double_blocks_0_img_attn_proj.oft_diag": -torch.eye(8).expand(16, 8, 8).contiguous()},
              str(path))
    adapter = pack_load(path)
    with pytest.raises(PackError, match="half a turn") as e:
        hook_nodes.create_oft_hook(adapter, 0.5, 1.0, "orthogonal")
    assert str(path) in str(e.value)
    assert len(hook_nodes.create_oft_hook(adapter, 1.0, 0.5, "orthogonal").hooks) == 1
    assert len(hook_nodes.create_oft_hook(adapter, 0.5, 0.5, "kohya").hooks) == 1


def test_an_unconstrained_generator_times_an_orthogonal_strength_beyond_float32_is_refused():
    """Orthogonal strength s is Cayley(s·Q): for an unconstrained Q of ~10³⁸ (finite, loaded) s = 10 makes s·Q Inf
    and R NaN; the merge path blamed the weight's dtype, the bypass path (`rotate_features`) returned NaN. Now both
    name the layer and the strength. Kohya strength never overflows there (R is orthogonal: |R − I| ≤ 2)."""
    q = _skew(torch.randn(2, 4, 4, generator=_gen(11)))
    q = q / q.abs().max() * 1e38
    layer = make_layer(path="u.safetensors", name="l", key="lycoris_l", side="out", blocks=[q], transpose=True)
    w = torch.randn(8, 6, generator=_gen(12))
    x = torch.randn(3, 8, generator=_gen(13))
    for run in (lambda: rotate_weight(layer, w, 10.0, "orthogonal"),
                lambda: rotate_features(layer, x, 10.0, "orthogonal")):
        with pytest.raises(OFTError, match=r"'lycoris_l'.*Q times strength 10 \(orthogonal mode\) overflows float32"):
            run()
    r1 = rotation_blocks(layer)[0].double()  # R at strength 1 (≈ −I: Q is huge), kohya's Rᵀ already
    eye = torch.eye(4, dtype=torch.float64)
    for strength in (10.0, 1000.0):
        out = rotate_weight(layer, w, strength)
        expected = torch.block_diag(*(eye + strength * (r1 - eye))) @ w.double()
        assert float((out.double() - expected).abs().max()) <= 1e-6 * float(expected.abs().max())


# ------------------------------------------------------------------------------------------------ CLI
def test_the_cli_refuses_hostile_magnitudes_in_one_line_and_writes_nothing(tmp_path, capsys):
    """The refusals above through `python -m oft_core`: exit status 2, one `error:` line naming the file, no
    traceback, nothing written, the inputs unchanged (tests/test_fail_closed.py's contract)."""
    from test_fail_closed import Scene

    scene = Scene(tmp_path)
    huge = scene.track(_kohya_file(scene.dir / "huge.safetensors", 1e18 * torch.randn(8, 40, 40, generator=_gen())))
    scene.refused(["inspect", huge], capsys, str(huge), "overflows float32", "identity")
    d, _ = _peft_neumann_copy(scene.dir, 1e19)
    scene.track(d)
    scene.refused(["inspect", d], capsys, "Cayley–Neumann series of 5 terms", "4.29e+09")
    src = scene.track(_kohya_file(scene.dir / "ok.safetensors", 1e-3 * torch.randn(8, 40, 40, generator=_gen())))
    noclamp, _ = _unconstrained_lycoris_at(scene.dir, 1e19)
    scene.track(noclamp)
    out = scene.dir / "out.safetensors"
    scene.refused(["convert", noclamp, "--to", "kohya", "--out", out], capsys, str(noclamp),
                  "cannot be written as kohya", out=out)
    assert src.exists()


# ------------------------------------------------------------------------------------------------ a singular solve
def _huge_unconstrained(path, peak_norm: float, b: int = 8, n: int = 16):
    """A LyCORIS diag-oft file (alpha 0: no constraint) for FLUX's double_blocks.0.img_attn.proj whose blocks have
    ‖Q_i‖_F = `peak_norm`."""
    q = _skew(torch.randn(n, b, b, generator=_gen(3)))
    q = q * (peak_norm / torch.linalg.matrix_norm(q, keepdim=True))
    save_file({"lycoris_double_blocks_0_img_attn_proj.oft_blocks": q.contiguous(),
               "lycoris_double_blocks_0_img_attn_proj.alpha": torch.tensor(0.0)}, str(path))
    return path


def _singular_solve(monkeypatch, rotation_module):
    """LAPACK reporting I − Q singular, as it does on some CPUs for huge generators of an odd block size (the tiny
    models' widths have no odd divisor: the report is what matters here)."""
    def singular(a, b):
        raise torch.linalg.LinAlgError("torch.linalg.solve: The solver failed because the input matrix is singular.")
    monkeypatch.setattr(rotation_module, "_solve", singular)


def test_cayley_may_fail_reads_norms_only_where_no_constraint_bounds_them():
    from oft_core.rotation import cayley_may_fail

    def layer(norm, constraint=None, parameterization="cayley"):
        q = _skew(torch.randn(4, 8, 8, generator=_gen(1)))
        q = q * (norm / torch.linalg.matrix_norm(q, keepdim=True))
        return make_layer(path="f", name="x", side="out", blocks=[q], transpose=True, constraint=constraint,
                          parameterization=parameterization)
    assert not cayley_may_fail(layer(1.0)) and cayley_may_fail(layer(3e8))
    assert not cayley_may_fail(layer(3e8, Constraint("norm_clamp", 1e-3)))  # the clamp bounds it below 1e6
    assert not cayley_may_fail(layer(3e5), 2.0, "kohya") and cayley_may_fail(layer(3e5), 10.0, "orthogonal")
    assert not cayley_may_fail(layer(3e8, parameterization="matrix"))


def test_inspect_names_the_file_whose_rotation_float32_cannot_build(tmp_path, monkeypatch, capsys):
    import oft_core.rotation as rotation
    from oft_core.cli import main
    from oft_core.summary import describe

    path = _huge_unconstrained(tmp_path / "huge.safetensors", 3e8, b=4, n=32)
    _singular_solve(monkeypatch, rotation)
    with pytest.raises(OFTError, match="I − Q singular in float32") as e:
        describe(load_adapter(path))
    assert e.value.path == str(path)
    assert main(["inspect", str(path)]) == 2
    assert str(path) in capsys.readouterr().err


@pytest.mark.comfyui
@pytest.mark.parametrize("apply_mode", ["merge", "bypass"])
def test_a_cayley_rotation_float32_cannot_build_is_refused_by_the_apply_node_before_any_patch(
        comfyui_oft, tmp_path, monkeypatch, apply_mode):
    """ComfyUI builds the patched weights while sampling, in a model load with no handler: a Cayley layer whose
    solve LAPACK reports singular (a damaged file's huge unconstrained generators) is built by the node first and
    refused there, naming the file and the layer, nothing patched. Ordinary Cayley layers are not built then."""
    import comfy_models
    import comfyui_oft.oft_core.rotation as rotation
    from comfyui_oft.nodes import patch
    from comfyui_oft.oft_core import OFTError as PackError
    from comfyui_oft.oft_core import load_adapter as pack_load
    from test_nodes import assert_same_state, snapshot

    base = comfy_models.flux_tiny()
    snap = snapshot(base)
    _singular_solve(monkeypatch, rotation)
    huge = pack_load(_huge_unconstrained(tmp_path / "huge.safetensors", 3e8))
    with pytest.raises(PackError, match="I − Q singular in float32") as e:
        patch.apply_oft(base, None, huge, 1.0, "kohya", apply_mode)
    assert str(tmp_path / "huge.safetensors") in str(e.value)
    assert "lycoris_double_blocks_0_img_attn_proj" in str(e.value)
    assert not base.patches
    assert_same_state(base, snap)
    small = pack_load(_huge_unconstrained(tmp_path / "small.safetensors", 0.3))
    _, _, text = patch.apply_oft(base, None, small, 1.0, "kohya", apply_mode)  # (no solve: never built)
    assert "1 of 1 adapter layers applied" in text
