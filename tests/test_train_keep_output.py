"""oft_core.train: trained layers that rotate their weight and keep their OUTPUT for backward (`_RotateKeepOutput`,
the `keep_output` policy) instead of their input (`_RotateThroughWeight`).

With orthogonal blocks (Cayley) W x = Mᵀ(out − bias), so the rotation's gradient Σ g (W x)ᵀ is (Σ g zᵀ)·M with
z = out − bias: a pass over g and the output instead of the gᵀx GEMM. Pinned: the output and ∂x are those of the
path that keeps x bit for bit (the same products), ∂B is the fp64 gradient of M·(W x) + bias to fp32 rounding, for
Linear and Conv2d (bias or not, splits, stride, padding modes, 3×3 convolutions that would otherwise keep their
output), with host weights made per forward and made again in backward (QOFT), and under bf16 autocast; only the
output and the blocks are kept (never x, never a weight); identity blocks give the base output bit for bit; the
Cayley–Neumann series (not orthogonal) never takes it; the default policy takes it for ComfyUI's SD UNets only; a
host that writes the output in place stops backward with autograd's error instead of a wrong gradient; a whole
checkpointed training run follows the path that keeps x to fp32 rounding.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from test_train_keep_input import KINDS, cast_weight_fn, layer_case, net_problem, randomize, run_layer, train_net
from test_train_through_weight import exact
from torch import nn

import oft_core.train as train
from oft_core.errors import OFTError
from oft_core.train import OFTTrainer, checkpoint_blocks, gradient_checkpointing, keeps_output, select_targets


def run(m, path, x, *, keep_output, **kw):
    """`run_layer` of a layer that rotates its weight: (output, ∂x, [∂ packed parameters], the trainer)."""
    return run_layer(m, path, x, keep_input=True, through_weight=True, keep_output=keep_output, **kw)


HOSTS = {"module weight": {}, "weight made per forward": {"weight_fn": cast_weight_fn},
         "weight made again (QOFT)": {"weight_fn": cast_weight_fn, "recompute_weight": True}}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("host", list(HOSTS))
def test_the_output_and_input_gradient_are_the_input_keeping_paths_and_the_rotation_gradient_is_exact(kind, host):
    m, path, x = layer_case(kind)
    kw = HOSTS[host]
    calls = []
    real = train._RotateKeepOutput.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train._RotateKeepOutput, "apply", lambda *a: calls.append(1) or real(*a))
        out, gx, gp, t = run(m, path, x, keep_output=True, **kw)
    assert calls == [1]
    kept_x = run(m, path, x, keep_output=False, **kw)
    assert torch.equal(out, kept_x[0]) and torch.equal(gx, kept_x[1])
    ref_out, ref_gx, ref_gb = exact(m, t, x)
    tl = t.layers[0]
    for p in tl.params:
        p.grad = None
    torch.autograd.backward(t.blocks(tl), [g.float() for g in ref_gb])
    for a, p, b in zip(gp, tl.params, kept_x[2]):
        r = p.grad
        assert bool(r.abs().sum() > 0)
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5 * float(r.abs().max()))
        # as close to the exact gradient as the gᵀx GEMM's
        assert float((a - r).abs().max()) <= 4 * float((b - r).abs().max()) + 1e-6 * float(r.abs().max())


@pytest.mark.parametrize("kind", KINDS)
def test_identity_blocks_give_the_base_output_bit_for_bit(kind):
    m, path, x = layer_case(kind)
    t = OFTTrainer([(path, m)], num_blocks=2, alpha=0, keep_input=True, through_weight=True, keep_output=True,
                   splits={"qkv": (16, 16, 16)} if path == "qkv" else None)
    xx = x.clone().requires_grad_(True)
    with t.attach():
        out = m(xx)
    assert torch.equal(out, m(x))
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)))  # (‖out‖² has none at I)
    assert all(bool(p.grad.abs().sum() > 0) for p in t.parameters())


@pytest.mark.parametrize("kind", ["linear-expand", "linear-splits", "linear-2d", "conv-1x1", "conv-reflect", "conv"])
def test_the_output_is_kept_instead_of_the_input(kind):
    """What is saved for backward is what the path that keeps x saves (its blocks and its node's parameters), with
    the output in place of x: no input, no weight, no rotated weight."""
    m, path, x = layer_case(kind)
    saved_out, saved_x = {}, {}
    out = run(m, path, x, keep_output=True, saved=saved_out)[0]
    run(m, path, x, keep_output=False, saved=saved_x)
    xin = F.pad(x, (1, 1, 1, 1), mode="reflect") if kind == "conv-reflect" else x
    with_out, with_x = sorted(saved_out.values()), sorted(saved_x.values())
    with_out.remove(out.untyped_storage().nbytes())
    with_x.remove(xin.untyped_storage().nbytes())
    assert with_out == with_x
    assert m.weight.untyped_storage().data_ptr() not in saved_out


@pytest.mark.parametrize("shape", [(2, 3, 9, 7), (1, 3, 3, 4)])
def test_a_three_by_three_conv_that_would_keep_its_output_rotates_its_weight(shape):
    """A 3×3 convolution (not a layer `keeps_input` picks), its product with more rows than its weight has inputs or
    fewer: with keep_output it rotates its weight (the product's own kernel makes out; no pass over it in forward,
    none for ∂x), whatever its rows; without, it keeps its base output and rotates it (`_RotateOutput`). Same values
    to one conv's rounding."""
    m, path, x = nn.Conv2d(3, 16, 3, padding=1), "layer", torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    m.requires_grad_(False)
    assert not train.keeps_input(m)
    results, used = {}, {}
    for ko in (True, False):
        calls = {"keep out": 0, "keep y": 0}
        real_ko, real_y = train._RotateKeepOutput.apply, train._RotateOutput.apply

        def ko_apply(*a, calls=calls):
            calls["keep out"] += 1
            return real_ko(*a)

        def y_apply(*a, calls=calls):
            calls["keep y"] += 1
            return real_y(*a)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train._RotateKeepOutput, "apply", ko_apply)
            mp.setattr(train._RotateOutput, "apply", y_apply)
            results[ko] = run_layer(m, path, x, keep_input=None, through_weight=None, keep_output=ko)
        used[ko] = calls
    assert used[True] == {"keep out": 1, "keep y": 0} and used[False] == {"keep out": 0, "keep y": 1}
    ref_out, ref_gx, _ = exact(m, results[True][3], x)
    for r in results.values():
        torch.testing.assert_close(r[0].double(), ref_out, rtol=1e-6, atol=1e-6 * float(ref_out.abs().max()))
        torch.testing.assert_close(r[1].double(), ref_gx, rtol=1e-5, atol=1e-5 * float(ref_gx.abs().max()))
    for a, b in zip(results[True][2], results[False][2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_under_bf16_autocast_a_conv_keeps_its_bf16_output():
    m, path, x = layer_case("conv")
    ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    out, gx, gp, t = run(m, path, x, keep_output=True, ctx=ctx)
    other = run(m, path, x, keep_output=False, ctx=torch.autocast("cpu", dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.equal(out, other[0]) and torch.equal(gx, other[1])
    for a, b in zip(gp, other[2]):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * float(b.abs().max()))


def test_the_neumann_series_is_not_orthogonal_and_keeps_its_input():
    m, path, x = layer_case("linear-expand")
    t = OFTTrainer([(path, m)], num_blocks=2, alpha=0, neumann_terms=3, keep_input=True, through_weight=True,
                   keep_output=True)
    randomize(t)
    calls = []
    real = train._RotateThroughWeight.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train._RotateThroughWeight, "apply", lambda *a: calls.append(1) or real(*a))
        with t.attach():
            m(x.clone().requires_grad_(True)).sum().backward()
    assert calls == [1]


class _WritesItsLayersOutput(nn.Module):
    """A block that adds to its layer's output in place and then uses it (as SVD's video blocks do)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(8, 8)

    def forward(self, x):
        y = self.layer(x)
        y += x
        return y * y


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_write_inside_a_block_stops_backward_instead_of_a_wrong_gradient(checkpointing):
    """Under checkpointing autograd does not see the write (the recomputation's output is the one kept, and it is
    written again): `_RotateKeepOutput` checks the version and raises OFTError naming the layer; without
    checkpointing autograd refuses. The input-keeping path trains the same block (the way out the message names)."""
    block = _WritesItsLayersOutput().requires_grad_(False)
    x = torch.randn(5, 8)
    for keep in (True, False):
        t = OFTTrainer([("layer", block.layer)], num_blocks=2, alpha=0, keep_input=True, through_weight=True,
                       keep_output=keep)
        randomize(t)
        ctx = gradient_checkpointing([block]) if checkpointing else contextlib.nullcontext()
        with t.attach(), ctx:
            loss = block(x.clone().requires_grad_(True)).sum()
            if keep:
                err = OFTError if checkpointing else RuntimeError
                with pytest.raises(err, match="gradient checkpointing off" if checkpointing else "inplace"):
                    loss.backward()
            else:
                loss.backward()
                assert bool(t.parameters()[0].grad.abs().sum() > 0)


@pytest.mark.parametrize("kind", ["linear-2d", "conv"])
def test_a_host_writing_the_output_in_place_stops_training_instead_of_a_wrong_gradient(kind):
    m, path, x = layer_case("linear-expand")
    t = OFTTrainer([(path, m)], num_blocks=2, alpha=0, keep_input=True, through_weight=True, keep_output=True)
    randomize(t)
    with pytest.raises(RuntimeError, match="inplace"):  # 3-D Linear outputs are views: refused at the write
        with t.attach():
            out = m(x.clone().requires_grad_(True))
            out.mul_(2.0)
    m, path, x = layer_case(kind)
    t = OFTTrainer([(path, m)], num_blocks=2, alpha=0, keep_input=True, through_weight=True, keep_output=True)
    randomize(t)
    with t.attach():
        out = m(x.clone().requires_grad_(True))
        out.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def _comfy_unet_class():
    """A class named and placed as ComfyUI's SD UNet (`comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel`)."""
    def init(self):
        nn.Module.__init__(self)
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8)), nn.Sequential(nn.Linear(8, 8))])

    def forward(self, x):
        for block in self.input_blocks:
            x = block[0](x)
        return x
    return type("UNetModel", (nn.Module,), {"__init__": init, "forward": forward,
                                            "__module__": "comfy.ldm.modules.diffusionmodules.openaimodel"})


def test_the_default_policy_keeps_outputs_in_comfyuis_sd_unet_inside_checkpointed_blocks_only():
    """ComfyUI's UNetModel (SD1.x / SD2.x / SDXL): inside the blocks `gradient_checkpointing` runs (there a write
    the host adds after a block meets the recomputation's own output); outside them, in other models (a UNet of
    another class; a UNetModel with video blocks, SVD's, whose BasicTransformerBlock adds to its ff_in's output in
    place; a model named like a UNet; none) never."""
    unet = _comfy_unet_class()().requires_grad_(False)
    other = type("StageC", (type(unet),), {})().requires_grad_(False)
    video = _comfy_unet_class()().requires_grad_(False)
    video.input_blocks.append(type("SpatialVideoTransformer", (nn.Module,), {})())
    assert not keeps_output(video)(nn.Linear(8, 8), 16) and not keeps_output(other)(nn.Linear(8, 8), 16)
    x = torch.randn(16, 8)  # 16 rows ≥ the layers' 8 inputs: M·W is the smaller side
    for root, expected in ((unet, {"input_blocks.0.0": 2, "input_blocks.1.0": 2}), (other, {})):
        targets = [(n, m) for n, m in root.named_modules() if isinstance(m, nn.Linear)]
        t = OFTTrainer(targets, num_blocks=2, alpha=0, root=root)
        assert t.family == "sd"
        assert not t.keep_output(targets[0][1], 16)  # (no block running)
        for ck in (False, True):
            names = {id(m): n for n, m in targets}
            calls = {}
            real = train._RotateKeepOutput.apply

            def counted(*a, calls=calls):
                calls[names[id(a[1].module)]] = calls.get(names[id(a[1].module)], 0) + 1
                return real(*a)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(train._RotateKeepOutput, "apply", counted)
                ctx = gradient_checkpointing([b for b in root.input_blocks]) if ck else contextlib.nullcontext()
                with t.attach(), ctx:
                    root(x.clone().requires_grad_(True)).square().sum().backward()
            assert calls == (expected if ck else {})
    assert not keeps_output(None)(nn.Linear(8, 8), 16) and not keeps_output(nn.Linear(8, 8))(nn.Linear(8, 8), 16)


@pytest.mark.parametrize("make,rows,expected", [
    (lambda: nn.Linear(320, 320), 2048, True),  # M·W (320 × 320) smaller than the output (2048 × 320)
    (lambda: nn.Linear(1280, 320), 2048, True),  # a feed-forward's second layer at SD1.x's 64×64 level
    (lambda: nn.Linear(1280, 1280), 128, True),  # keeps its input (out ≥ in): saves the base product made again
    (lambda: nn.Linear(1280, 10240), 128, True),  # its GEGLU projection at the 8×8 level
    (lambda: nn.Linear(1280, 1280), 2, False),  # a time embedding (2 rows): the product again is cheaper
    (lambda: nn.Linear(768, 320), 77, False),  # cross-attention's to_k / to_v on the text (out < in)
    (lambda: nn.Conv2d(320, 320, 3), 8192, True),  # 2880 inputs ≤ 8192 positions
    (lambda: nn.Conv2d(1280, 1280, 3), 128, False),  # the 8×8 level: M·W (1280 × 11520) ≫ the output
])
def test_the_default_policy_takes_the_cheaper_side(make, rows, expected):
    policy = keeps_output(_comfy_unet_class()())
    m = make()
    assert not policy(m, rows)  # (no checkpointed block running)
    with train._unit_blocks(nn.Identity()):
        assert policy(m, rows) is expected


@pytest.mark.parametrize("wrap", ["none", "checkpointing"])
def test_whole_training_follows_the_path_that_keeps_the_input(wrap):
    trained = {ko: train_net(wrap, through_weight=True, keep_input=True, keep_output=ko) for ko in (False, True)}
    assert trained[True][1][-1] < trained[True][1][0]
    torch.testing.assert_close(torch.tensor(trained[True][1]), torch.tensor(trained[False][1]), rtol=1e-5, atol=0)
    for a, b in zip(trained[True][0], trained[False][0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_checkpointed_layers_keep_their_outputs_in_forward_and_recomputation():
    """Under gradient checkpointing every layer takes the output-keeping path in forward and in the recomputation
    (else the checkpoint would see other tensors saved)."""
    net, x, context = net_problem()
    targets = select_targets(net, "all-linear", "generic")
    t = OFTTrainer(targets, num_blocks=2, alpha=0, keep_input=True, through_weight=True, keep_output=True)
    randomize(t)
    names = {id(m): n for n, m in targets}
    calls = {}
    real = train._RotateKeepOutput.apply

    def counted(*a):
        calls[names[id(a[1].module)]] = calls.get(names[id(a[1].module)], 0) + 1
        return real(*a)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train._RotateKeepOutput, "apply", counted)
        with t.attach(), gradient_checkpointing(checkpoint_blocks(net)):
            net(x, context).square().sum().backward()
    assert set(calls) == {n for n, _ in targets}
    assert all(c == (1 if n == "head" else 2) for n, c in calls.items())
    assert all(bool(p.grad.abs().sum() > 0) for p in t.parameters())


def test_a_fused_layers_splits_each_get_their_own_gradient():
    """Three splits (q|k|v) kept as one output: each split's gradient is its own (Σ g zᵀ)·M on its columns."""
    m, path, x = layer_case("linear-splits")
    out, _, gp, t = run(m, path, x, keep_output=True)
    _, _, ref_gb = exact(m, t, x)
    tl = t.layers[0]
    for p in tl.params:
        p.grad = None
    torch.autograd.backward(t.blocks(tl), [g.float() for g in ref_gb])
    assert len(gp) == 3
    for a, p in zip(gp, tl.params):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-5 * float(p.grad.abs().max()))
    assert F.linear(x, m.weight, m.bias).shape == out.shape
