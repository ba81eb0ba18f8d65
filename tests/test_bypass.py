"""The bypass apply mode in oft_core (oft_core/bypass.py): forward hooks that rotate activations, against the
merge path and the trainers' own merged weights and forwards, on every reference fixture. No ComfyUI here
(tests/test_nodes_bypass.py runs the same through ComfyUI's ModelPatcher)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from oracle import FIXTURES, case_ids, get_case, rel_err
from safetensors.torch import load_file

import oft_core.bypass as bypass_mod
from oft_core import OFTError, load_adapter, make_layer, resolve_for_weight, rotate_weight
from oft_core.bypass import ModuleBypass, _BypassTarget, attach

# A bypass forward and a forward with the merged weight sum the same products in different orders: they agree to
# fp32 rounding of the output, a few ulp of max |y| (measured up to ~5e-7 here).
FWD_TOL = 2e-6


def _layer_module(w: torch.Tensor, bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    if w.ndim == 2:
        m = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias)
    else:
        m = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], padding=1, bias=bias)
    with torch.no_grad():
        m.weight.copy_(w)
        if bias:
            m.bias.copy_(torch.randn(w.shape[0], generator=g) * 0.1)
    return m.requires_grad_(False)


def _forward_with(m, w, x):
    return F.linear(x, w, m.bias) if w.ndim == 2 else F.conv2d(x, w, m.bias, padding=1)


def _input_for(w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, w.shape[1], generator=g) if w.ndim == 2 else torch.randn(2, w.shape[1], 6, 6, generator=g)


@pytest.mark.parametrize("case_id", case_ids())
def test_bypass_equals_the_trainers_merge_on_every_fixture(case_id):
    """Forward with hooks == forward with the trainer's merged weight, every layer, every reference strength."""
    case = get_case(case_id)
    layers = {layer.name.replace(".", "_"): layer for layer in load_adapter(case.adapter)}
    checked = 0
    for strength, merged in case.expected.items():
        for i, (key, ref) in enumerate(merged.items()):
            w = case.originals[key]
            layer = resolve_for_weight(layers[case.module_key[key]], w.shape)
            m = _layer_module(w, bias=True, seed=i)
            x = _input_for(w, seed=i)
            mb = ModuleBypass([_BypassTarget(layer, strength)], conv=w.ndim > 2)
            handles = mb.attach(m)
            try:
                y = m(x)
            finally:
                for h in handles:
                    h.remove()
            want = _forward_with(m, ref, x)
            assert rel_err(y, want) <= FWD_TOL, f"{key} at strength {strength}"
            assert rel_err(want, _forward_with(m, w, x)) > 1e-4 or torch.equal(ref, w)  # a visible change
            assert torch.equal(m(x), _forward_with(m, w, x))  # hooks removed: the plain layer again
            assert torch.equal(m.weight, w)  # never written
            checked += 1
    assert checked == sum(len(v) for v in case.expected.values())


FORWARD_DIRS = sorted(p.parent for p in FIXTURES.glob("*/*/forward_io.safetensors"))


@pytest.mark.parametrize("fixture_dir", FORWARD_DIRS, ids=[p.name for p in FORWARD_DIRS])
def test_bypass_equals_the_trainers_own_forward(fixture_dir):
    """LyCORIS / PEFT recorded their un-merged (wrapped) layer outputs: the bypass layer gives the same numbers."""
    io = load_file(fixture_dir / "forward_io.safetensors")
    base = load_file(fixture_dir / "base.safetensors")
    adapter_path = (fixture_dir / f"{fixture_dir.name}.safetensors" if fixture_dir.parent.name == "lycoris"
                    else fixture_dir)
    adapter = load_adapter(adapter_path)
    model = torch.nn.Module()
    # a model whose state-dict names are the fixture's base names: the adapter matched by the baker's key map
    for name in sorted({k[: -len(".weight")] for k in base if k.endswith(".weight")}):
        w = base[name + ".weight"]
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=name + ".bias" in base)
        with torch.no_grad():
            lin.weight.copy_(w)
            if lin.bias is not None:
                lin.bias.copy_(base[name + ".bias"])
        parent = model
        parts = name.split(".")
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, torch.nn.Module())
            parent = getattr(parent, p)
        parent.add_module(parts[-1], lin.requires_grad_(False))
    with attach(model, adapter, 1.0) as handle:
        assert len(handle.report.matched) == len(adapter)
        modules = dict(model.named_modules())
        checked = 0
        for key in io:
            if key.endswith(".out"):
                continue
            y = modules[key](io[key])
            assert rel_err(y, io[key + ".out"]) <= FWD_TOL, key
            checked += 1
    assert checked == len(adapter)
    for key in io:  # detached: the base layers again
        if not key.endswith(".out"):
            m = modules[key]
            assert torch.equal(m(io[key]), F.linear(io[key], m.weight, m.bias))


def _random_layer(side, out, inner, b, seed, *, rescale=False, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    axis = out if side == "out" else inner
    a = torch.randn(axis // b, b, b, generator=g) * scale
    return make_layer(path="t", name=f"l{seed}", side=side, blocks=[a - a.transpose(-1, -2)],
                      transpose=side == "out", row_scale=(1 + 0.1 * torch.randn(out, generator=g)) if rescale else None)


@pytest.mark.parametrize("side", ["out", "in"])
@pytest.mark.parametrize("mode", ["kohya", "orthogonal"])
@pytest.mark.parametrize("strength", [1.0, 0.5, -0.7])
def test_stacked_bypasses_give_the_merge_order(side, mode, strength):
    """Two adapters on one layer, attached in order a, b == merging a then b (output side M_b·M_a·W, input side
    W·M_a·M_b), with row scales, strengths and both strength modes."""
    w = torch.randn(24, 32, generator=torch.Generator().manual_seed(0))
    la = _random_layer(side, 24, 32, 8, 1, rescale=side == "out")
    lb = _random_layer(side, 24, 32, 4 if side == "out" else 16, 2)
    m = _layer_module(w, bias=True, seed=3)
    x = _input_for(w, 4)
    handles = []
    for layer in (la, lb):
        handles += ModuleBypass([_BypassTarget(layer, strength, mode)], conv=False).attach(m)
    y = m(x)
    for h in handles:
        h.remove()
    merged = rotate_weight(lb, rotate_weight(la, w, strength, mode), strength, mode)
    assert rel_err(y, _forward_with(m, merged, x)) <= FWD_TOL
    wrong = rotate_weight(la, rotate_weight(lb, w, strength, mode), strength, mode)
    assert rel_err(y, _forward_with(m, wrong, x)) > 1e-4  # the order is visible, and the merge order is kept


def test_conv_output_side_and_1x1_input_side_match_merge():
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    m = _layer_module(w, bias=True, seed=1)
    x = _input_for(w, 2)
    layer = resolve_for_weight(_random_layer("out", 16, 72, 4, 5, rescale=True), w.shape)
    with_hooks = ModuleBypass([_BypassTarget(layer, 0.8)], conv=True, kernel_numel=9).attach(m)
    y = m(x)
    for h in with_hooks:
        h.remove()
    assert rel_err(y, _forward_with(m, rotate_weight(layer, w, 0.8), x)) <= FWD_TOL
    plain = resolve_for_weight(_random_layer("out", 16, 72, 8, 9), w.shape)  # no row scale: the (M − I)·y path
    with_hooks = ModuleBypass([_BypassTarget(plain, -0.6, "orthogonal")], conv=True, kernel_numel=9).attach(m)
    y = m(x)
    for h in with_hooks:
        h.remove()
    assert rel_err(y, _forward_with(m, rotate_weight(plain, w, -0.6, "orthogonal"), x)) <= FWD_TOL

    w1 = torch.randn(16, 8, 1, 1, generator=torch.Generator().manual_seed(6))
    conv1 = torch.nn.Conv2d(8, 16, 1).requires_grad_(False)
    with torch.no_grad():
        conv1.weight.copy_(w1)
    layer_in = resolve_for_weight(_random_layer("in", 16, 8, 4, 7), w1.shape)
    hs = ModuleBypass([_BypassTarget(layer_in, 1.0)], conv=True, kernel_numel=1).attach(conv1)
    y1 = conv1(x)
    for h in hs:
        h.remove()
    assert rel_err(y1, F.conv2d(x, rotate_weight(layer_in, w1, 1.0), conv1.bias)) <= FWD_TOL
    # input side on a 3×3 kernel mixes kernel positions: refused, naming the layer, nothing attached
    layer_in3 = resolve_for_weight(_random_layer("in", 16, 72, 8, 8), w.shape)
    with pytest.raises(OFTError, match="kernel larger than 1×1.*merge"):
        ModuleBypass([_BypassTarget(layer_in3, 1.0)], conv=True, kernel_numel=9)


def test_fused_slices_are_rotated_in_place_of_their_rows():
    """Two layers on two slices of one fused weight (FLUX q|k|v by diffusers names): each slice rotated, bias
    respected, the third slice bit for bit."""
    w = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))
    m = _layer_module(w, bias=True, seed=1)
    x = _input_for(w, 2)
    lq, lv = _random_layer("out", 16, 16, 4, 3), _random_layer("out", 16, 16, 8, 4)
    hs = ModuleBypass([_BypassTarget(lq, 1.0, span=(0, 16)), _BypassTarget(lv, 1.0, span=(32, 16))],
                      conv=False).attach(m)
    y = m(x)
    for h in hs:
        h.remove()
    want_w = torch.cat([rotate_weight(lq, w[:16]), w[16:32], rotate_weight(lv, w[32:])])
    assert rel_err(y, _forward_with(m, want_w, x)) <= FWD_TOL
    assert torch.equal(y[:, 16:32], m(x)[:, 16:32])
    with pytest.raises(OFTError, match="slice of a fused weight"):
        ModuleBypass([_BypassTarget(_random_layer("in", 16, 16, 4, 5), 1.0, span=(0, 16))], conv=False)


@pytest.mark.parametrize("row_scale", [False, True])
def test_permuted_rows_are_rotated_in_the_adapters_order(row_scale):
    """A weight the host stores with its rows permuted (SD3 / FLUX `norm_out.linear`: scale and shift halves
    swapped): base row i is the adapter's row perm[i]. Bypass equals the merge path the weight patch takes (rows into
    the adapter's order, rotated, put back), bias included; the input side ignores the row order."""
    w_adapter = torch.randn(32, 12, generator=torch.Generator().manual_seed(2))
    perm = tuple(list(range(16, 32)) + list(range(16)))  # the two halves swapped
    w_base = w_adapter[list(perm)]
    m = _layer_module(w_base, bias=True, seed=3)
    x = _input_for(w_base, 4)
    layer = _random_layer("out", 32, 12, 4, 6)
    if row_scale:
        layer = layer.with_(row_scale=1 + 0.1 * torch.randn(32, generator=torch.Generator().manual_seed(7)))
    handles = ModuleBypass([_BypassTarget(layer, 0.7, perm=perm)], conv=False).attach(m)
    y = m(x)
    for h in handles:
        h.remove()
    want_w = rotate_weight(layer, w_base[torch.argsort(torch.tensor(perm))], 0.7)[list(perm)]
    assert rel_err(y, _forward_with(m, want_w, x)) <= FWD_TOL
    assert rel_err(y, m(x)) > 1e-3  # the rotation did something
    layer_in = _random_layer("in", 32, 12, 4, 8)
    handles = ModuleBypass([_BypassTarget(layer_in, 1.0, perm=perm)], conv=False).attach(m)
    y_in = m(x)
    for h in handles:
        h.remove()
    assert rel_err(y_in, _forward_with(m, rotate_weight(layer_in, w_base), x)) <= FWD_TOL


@pytest.mark.parametrize("side", ["out", "in"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_is_rounded_once_more_at_most(dtype, side):
    """A bf16 / fp16 layer: bypass == the fp32 reference forward of the rotated weight, to the output's rounding
    (the layer's own rounding of y, plus one of the rotated y; input side: of the rotated x)."""
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 0.1
    layer = _random_layer(side, 64, 32, 8, 1)
    m = _layer_module(w, bias=True, seed=2).to(dtype)
    x = _input_for(w, 3).to(dtype)
    hs = ModuleBypass([_BypassTarget(layer, 1.0)], conv=False).attach(m)
    y = m(x)
    for h in hs:
        h.remove()
    assert y.dtype == dtype
    ref = F.linear(x.float(), rotate_weight(layer, m.weight.float()), m.bias.float())
    eps = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    assert rel_err(y, ref) <= 3 * eps


def test_strength_zero_attaches_nothing_identity_is_skipped_and_attach_refuses_a_bad_mode():
    layer = _random_layer("out", 8, 8, 4, 0)
    assert not ModuleBypass([_BypassTarget(layer, 0.0)], conv=False)
    zero = make_layer(path="t", name="zero", side="out", blocks=[torch.zeros(2, 4, 4)], transpose=True)
    lin = _layer_module(torch.randn(8, 8), bias=True, seed=0)
    x = _input_for(lin.weight, 1)
    mb = ModuleBypass([_BypassTarget(zero, 0.7)], conv=False)
    hs = mb.attach(lin)
    y = lin(x)
    for h in hs:
        h.remove()
    assert torch.equal(y, lin(x)) and mb._identity == {id(mb.out_targets[0]): True}  # found at the forward
    m = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(OFTError, match="strength mode"):
        attach(m, load_adapter(get_case("lycoris_diag_oft_dim8").adapter), 1.0, "sideways")


def _split_layer(side, sizes, seed, scale=0.3):
    """A diag layer with one split per (n, b) in `sizes` (as kohya FLUX's split q|k|v layers carry)."""
    g = torch.Generator().manual_seed(seed)
    gens = []
    for n, b in sizes:
        a = torch.randn(n, b, b, generator=g) * scale
        gens.append(a - a.transpose(-1, -2))
    return make_layer(path="t", name=f"s{seed}", side=side, blocks=gens, transpose=side == "out")


# (n, b) splits: blocks of 4 / 8 / 12 / 16 are multiplied as block-diagonal groups up to 32 wide (`_group_blocks`:
# 8×4 → one 32-wide group, 6×8 → 24 wide, 4×12 → 24, 3×16 stays ungrouped: 3 has no divisor 2), 40 and 48 as they
# are; two splits. With 40 rows, fp32 with a bias takes the one-pass form up to 40 wide and the other one for 48.
_BLOCK_CASES = {"g8x4": [(8, 4)], "g6x8": [(6, 8)], "3x16": [(3, 16)], "4x12": [(4, 12)], "2x40": [(2, 40)],
                "1x48": [(1, 48)], "splits": [(2, 16), (4, 8)]}


@pytest.mark.parametrize("case", sorted(_BLOCK_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("side", ["out", "in"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("pieces", ["one", "pieces", "pieces in place"])
def test_the_block_product_paths_equal_the_fp32_reference(case, dtype, side, bias, pieces, monkeypatch):
    """Every shape of the step's block product (grouped small blocks, plain ones, several splits), both sides, with and
    without bias, on a (batch, tokens, features) input, in one piece and in row pieces (`_piece_rows`: here 32 + 8
    rows; without autograd an output side's pieces are written over y itself): == the fp32 forward of the merged
    weight; fp32 to fp32 rounding, 16-bit to the output's own rounding (the layer's rounding of y and one more, each
    ≤ u·max|y|)."""
    if pieces != "one":
        monkeypatch.setattr(bypass_mod, "_ONE_PIECE_ROWS", 8)
        monkeypatch.setattr(bypass_mod, "_PIECE_ELEMENTS", 1)
    sizes = _BLOCK_CASES[case]
    feat = sum(n * b for n, b in sizes)
    out_f, in_f = (feat, 24) if side == "out" else (20, feat)
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(1)) * 0.2
    layer = _split_layer(side, sizes, 2)
    m = _layer_module(w, bias=bias, seed=3).to(dtype)
    if bias:  # a bias as large as the outputs: its term (B − I)·b weighs as much as the rest
        with torch.no_grad():
            m.bias.mul_(10)
    x = torch.randn(2, 20, in_f, generator=torch.Generator().manual_seed(4)).to(dtype)
    raw = []
    m.register_forward_hook(lambda _m, _a, out: raw.append(out))  # before the bypass: sees the layer's own y
    mb = ModuleBypass([_BypassTarget(layer, 0.8)], conv=False)
    hs = mb.attach(m)
    with torch.no_grad() if pieces == "pieces in place" else contextlib.nullcontext():
        y = m(x)
    for h in hs:
        h.remove()
    assert y.dtype == dtype and y.shape == (2, 20, out_f)
    if side == "out":  # (the input side rotates x: y is the layer's own output either way)
        assert (y.data_ptr() == raw[0].data_ptr()) == (pieces == "pieces in place")
    ref = F.linear(x.float(), rotate_weight(layer, m.weight.float(), 0.8), None if m.bias is None else m.bias.float())
    u = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    assert rel_err(y, ref) <= (FWD_TOL if dtype == torch.float32 else 2.5 * u)
    assert rel_err(y, F.linear(x.float(), m.weight.float(), None if m.bias is None else m.bias.float())) > 10 * u


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pieces", [False, True])
def test_fused_slices_with_a_gap_and_several_splits_16_bit(dtype, pieces, monkeypatch):
    """q and v slices of a fused weight (v with two splits), k untouched: each slice == the fp32 reference to the
    output's rounding, k bit for bit the layer's own output, in fp32 and bf16; also in row pieces written over y
    (no autograd)."""
    if pieces:
        monkeypatch.setattr(bypass_mod, "_ONE_PIECE_ROWS", 8)
        monkeypatch.setattr(bypass_mod, "_PIECE_ELEMENTS", 1)
    w = torch.randn(96, 16, generator=torch.Generator().manual_seed(0)) * 0.3
    m = _layer_module(w, bias=True, seed=1).to(dtype)
    x = torch.randn(3, 15, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    lq, lv = _split_layer("out", [(4, 8)], 3), _split_layer("out", [(1, 16), (2, 8)], 4)
    hs = ModuleBypass([_BypassTarget(lq, 1.0, span=(0, 32)), _BypassTarget(lv, 1.0, span=(64, 32))],
                      conv=False).attach(m)
    with torch.no_grad() if pieces else contextlib.nullcontext():
        y = m(x)
    for h in hs:
        h.remove()
    wf = m.weight.float()
    want_w = torch.cat([rotate_weight(lq, wf[:32]), wf[32:64], rotate_weight(lv, wf[64:])])
    u = 2.0**-24 if dtype == torch.float32 else 2.0**-8
    assert rel_err(y, F.linear(x.float(), want_w, m.bias.float())) <= (FWD_TOL if dtype == torch.float32 else 2.5 * u)
    assert torch.equal(y[..., 32:64], m(x)[..., 32:64])
