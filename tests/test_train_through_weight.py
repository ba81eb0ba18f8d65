"""oft_core.train: trained layers that keep their input and rotate their WEIGHT (`rotate_through_weight`, the
`through_weight` policy) instead of making their base output again and rotating it (`rotate_from_input`).

Pinned: the output is M·(W x) + bias to one GEMM's rounding (against fp64), the gradients for the input and every
rotation block are those of the plain expression (fp64 autograd), for Linear (bias or not, 2-D input, fused splits,
wide expansions) and Conv2d (bias, stride, non-zero padding modes, 1×1), with host weights made per forward and made
again in backward (QOFT), and under bf16 autocast; identity blocks give the base layer's output bit for bit; only x
and the blocks are kept for backward (no output, no weight, no rotated weight); the default policy picks the weight
where the product has at least as many rows as the weight has inputs, the same in forward and in the checkpoint
recomputation; a whole training run follows the path that makes y again to fp32 rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_train_keep_input import KINDS, cast_weight_fn, layer_case, net_problem, randomize, run_layer, train_net
from torch import nn

import oft_core.train as train
from oft_core.rotation import apply_rows
from oft_core.train import (
    OFTTrainer,
    checkpoint_blocks,
    gradient_checkpointing,
    keeps_input,
    rotates_weight,
    select_targets,
)


def run(m, path, x, *, through_weight, **kw):
    """`run_layer` with keep_input=True: (output, ∂x, [∂ packed parameters], the trainer)."""
    return run_layer(m, path, x, keep_input=True, through_weight=through_weight, **kw)


def exact(m, t, x):
    """(out, ∂x, [∂B per split]) of M·(W x) + bias in fp64 by autograd, from the trainer's blocks at its parameters."""
    tl = t.layers[0]
    blocks = [b.detach().double().requires_grad_(True) for b in t.blocks(tl)]
    x64 = x.detach().double().requires_grad_(True)
    if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
        xin, padding = F.pad(x64, m._reversed_padding_repeated_twice, mode=m.padding_mode), 0
    else:
        xin, padding = x64, getattr(m, "padding", None)
    w = m.weight.double()
    w_rot = apply_rows(tl.layer, blocks, w.reshape(w.shape[0], -1)).reshape(w.shape)
    b = None if m.bias is None else m.bias.double()
    if isinstance(m, nn.Conv2d):
        out = F.conv2d(xin, w_rot, b, m.stride, padding, m.dilation, m.groups)
    else:
        out = F.linear(xin, w_rot, b)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).double()
    out.backward(g)
    return out.detach(), x64.grad, [bl.grad for bl in blocks]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("host", ["module weight", "weight made per forward", "weight made again (QOFT)"])
def test_the_output_and_gradients_are_the_rotated_weights_product(kind, host):
    m, path, x = layer_case(kind)
    kw = {"module weight": {}, "weight made per forward": {"weight_fn": cast_weight_fn},
          "weight made again (QOFT)": {"weight_fn": cast_weight_fn, "recompute_weight": True}}[host]
    out, gx, gp, t = run(m, path, x, through_weight=True, **kw)
    ref_out, ref_gx, ref_gb = exact(m, t, x)
    scale = float(ref_out.abs().max())
    assert float((out.double() - ref_out).abs().max()) <= 1e-6 * scale
    torch.testing.assert_close(gx.double(), ref_gx, rtol=1e-5, atol=1e-5 * float(ref_gx.abs().max()))
    # the packed parameters' gradients from the fp64 block gradients, through the trainer's own (fp32) packing
    tl = t.layers[0]
    for p in tl.params:
        p.grad = None
    blocks = t.blocks(tl)
    torch.autograd.backward(blocks, [g.float() for g in ref_gb])
    for a, p in zip(gp, tl.params):
        r = p.grad
        assert bool(r.abs().sum() > 0)
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5 * float(r.abs().max()))
    # and the other path that keeps x (y made again, then rotated) to fp32 rounding
    other = run(m, path, x, through_weight=False, **kw)
    torch.testing.assert_close(out, other[0], rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("kind", KINDS)
def test_both_gradients_of_a_product_at_once_are_each_ones_bit_for_bit(kind):
    """`_BaseProduct.grads` (a Conv2d's from one convolution_backward call) gives `input_grad` and `weight_grad`."""
    m, _, x = layer_case(kind)
    if isinstance(m, nn.Conv2d):
        x, padding = train._conv_input(m, x)
    else:
        padding = None
    base = train._BaseProduct.of(m, train._default_weight_fn, padding, x)
    w = m.weight * 1.5  # the product's (rotated) weight, not the module's
    g = torch.randn(base(x, w, m.bias).shape, generator=torch.Generator().manual_seed(3))
    gx, gw = base.grads(x, g, w)
    assert torch.equal(gx, base.input_grad(x.shape, x.dtype, g, w))
    assert torch.equal(gw, base.weight_grad(x, g, w.shape))
    assert bool(gx.abs().sum() > 0) and bool(gw.abs().sum() > 0)


@pytest.mark.parametrize("kind", KINDS)
def test_identity_blocks_give_the_base_output_bit_for_bit(kind):
    m, path, x = layer_case(kind)
    t = OFTTrainer([(path, m)], num_blocks=2, alpha=0, keep_input=True, through_weight=True,
                   splits={"qkv": (16, 16, 16)} if path == "qkv" else None)
    with torch.no_grad():
        for p in t.parameters():
            p.zero_()
    with t.attach():
        out = m(x)
    assert torch.equal(out, m(x))


@pytest.mark.parametrize("kind", ["linear-expand", "linear-splits", "conv-1x1", "conv-reflect", "conv"])
def test_only_the_input_and_the_blocks_are_kept(kind):
    """What is saved for backward is what the path that makes y again saves (x and the blocks, pinned in
    test_train_keep_input.py): no output, no weight, no rotated weight."""
    m, path, x = layer_case(kind)
    saved, saved_again = {}, {}
    out = run(m, path, x, through_weight=True, saved=saved)[0]
    run(m, path, x, through_weight=False, saved=saved_again)
    xin = F.pad(x, (1, 1, 1, 1), mode="reflect") if kind == "conv-reflect" else x
    assert xin.untyped_storage().nbytes() in saved.values()
    assert sorted(saved.values()) == sorted(saved_again.values())
    assert out.untyped_storage().data_ptr() not in saved and m.weight.untyped_storage().data_ptr() not in saved


def test_under_bf16_autocast_a_conv_rotates_its_weight_in_the_autocast_dtype():
    m, path, x = layer_case("conv-1x1")
    ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    out, gx, gp, t = run(m, path, x, through_weight=True, ctx=ctx)
    other = run(m, path, x, through_weight=False, ctx=torch.autocast("cpu", dtype=torch.bfloat16))
    assert out.dtype == other[0].dtype == torch.bfloat16
    ref_out, ref_gx, _ = exact(m, t, x)
    scale = float(ref_out.abs().max())
    assert float((out.double() - ref_out).abs().max()) <= 2**-7 * scale
    torch.testing.assert_close(gx.double(), ref_gx, rtol=2e-2, atol=2e-2 * float(ref_gx.abs().max()))
    for a, b in zip(gp, other[2]):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * float(b.abs().max()))


def test_an_fp8_weight_under_autocast_rotates_in_the_products_dtype():
    """A weight stored in fp8 and used as it is under autocast (the default weight_fn): M·W is made in the product's
    dtype, not rounded back to fp8 (3 mantissa bits would lose most of a small rotation); the output is as close to
    the exact M·(W x) + bias as the path that makes y again."""
    m, path, x = layer_case("conv-1x1")
    m8 = nn.Conv2d(2, 32, 1)
    with torch.no_grad():
        m8.weight.copy_(m.weight)
        m8.bias.copy_(m.bias)
    m8 = m8.to(torch.float8_e4m3fn).requires_grad_(False)
    errs = {}
    for through in (False, True):
        out, _, grads, t = run(m8, path, x, through_weight=through, ctx=torch.autocast("cpu", dtype=torch.bfloat16))
        assert out.dtype == torch.bfloat16 and all(bool(g.abs().sum() > 0) for g in grads)
        errs[through] = float((out.double() - exact(m8, t, x)[0]).abs().max())
    assert errs[True] <= 1.5 * errs[False]


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Linear(8, 4), (3, 5, 8)),
    (lambda: nn.Linear(8, 4), (7, 8)),
    (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 9, 7)),
    (lambda: nn.Conv2d(3, 4, 3, stride=2), (2, 3, 9, 8)),
    (lambda: nn.Conv2d(3, 4, (3, 1), stride=(2, 1), padding=(0, 2), dilation=(2, 1)), (1, 3, 11, 6)),
    (lambda: nn.Conv2d(3, 4, 3, padding="same"), (2, 3, 5, 6)),
    (lambda: nn.Conv2d(3, 4, 3, padding="valid"), (2, 3, 5, 6)),
    (lambda: nn.Conv2d(4, 4, 1, groups=2), (3, 4, 2, 2)),
])
def test_product_rows_are_the_outputs_rows(make, shape):
    m = make()
    x = torch.randn(shape)
    y = m(x)
    rows = y.numel() // y.shape[1 if isinstance(m, nn.Conv2d) else -1]
    assert train._product_rows(m, x, getattr(m, "padding", None)) == rows


def test_default_policy_comes_from_rows_and_inputs():
    assert rotates_weight(nn.Linear(320, 320), 2048)  # SD1.x 32×32 latents, batch 2: 2048 tokens ≥ 320 inputs
    assert rotates_weight(nn.Linear(320, 2560), 2048)  # its GEGLU projection
    assert not rotates_weight(nn.Linear(1280, 1280), 128)  # the 8×8 level: 128 tokens < 1280 inputs
    assert not rotates_weight(nn.Linear(3072, 9216), 1040)  # FLUX.1 at 1024 image tokens
    assert rotates_weight(nn.Conv2d(320, 320, 1), 320) and not rotates_weight(nn.Conv2d(320, 320, 3), 2048)
    assert rotates_weight(nn.Conv2d(4, 320, 3), 36) and not rotates_weight(nn.Conv2d(4, 320, 3), 35)
    assert not rotates_weight(nn.LayerNorm(8), 1 << 20)


def routes(tokens: int):
    """({layer: calls} through the weight, {layer: calls} making y again) of one checkpointed forward + backward of
    the two-block net on `tokens` tokens per sample (the context: 4 tokens of 6)."""
    net, x, context = net_problem()
    targets = select_targets(net, "all-linear", "generic")
    t = OFTTrainer(targets, num_blocks=2, alpha=0)
    randomize(t)
    names = {id(m): n for n, m in targets}
    calls = {"through": {}, "again": {}}
    real = {"through": train._RotateThroughWeight.apply, "again": train._RotateFromInput.apply}

    def counted(kind):
        def apply(*a):
            calls[kind][names[id(a[1].module)]] = calls[kind].get(names[id(a[1].module)], 0) + 1
            return real[kind](*a)
        return apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train._RotateThroughWeight, "apply", counted("through"))
        mp.setattr(train._RotateFromInput, "apply", counted("again"))
        with t.attach(), gradient_checkpointing(checkpoint_blocks(net)):
            net(x[:, :tokens], context).square().sum().backward()
    return calls["through"], calls["again"], {n for n, m in targets if keeps_input(m)}


def test_the_trainer_routes_by_the_policy_the_same_in_forward_and_recomputation():
    """Under gradient checkpointing a layer takes the same path in forward and in the recomputation (else the
    checkpoint would see other tensors saved: CheckpointError): layers that keep x rotate their weight where the
    product has at least as many rows as the weight has inputs, else make y again; the others keep y."""
    through, again, keep = routes(10)  # 20 rows ≥ 8 inputs; the context's to_k / to_v: 8 rows ≥ 6 inputs
    assert set(through) == keep and again == {}
    assert "blocks.0.0.out" not in keep and "blocks.0.0.attn2.to_k" in keep
    assert all(c == (1 if n == "head" else 2) for n, c in through.items())  # forward + recomputation; head: forward
    through, again, keep = routes(3)  # 6 rows < 8 inputs: the 8-wide layers make y again; to_k / to_v do not
    assert set(through) == {"blocks.0.0.attn2.to_k", "blocks.0.0.attn2.to_v", "blocks.1.0.attn2.to_k",
                            "blocks.1.0.attn2.to_v"}
    assert set(again) == keep - set(through)
    assert all(c == (1 if n == "head" else 2) for n, c in {**through, **again}.items())


@pytest.mark.parametrize("wrap", ["none", "checkpointing"])
def test_whole_training_follows_the_path_that_makes_y_again(wrap):
    trained = {through: train_net(wrap, through_weight=through) for through in (False, None)}
    assert trained[None][1][-1] < trained[None][1][0]
    torch.testing.assert_close(torch.tensor(trained[None][1]), torch.tensor(trained[False][1]), rtol=1e-5, atol=0)
    for a, b in zip(trained[None][0], trained[False][0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
