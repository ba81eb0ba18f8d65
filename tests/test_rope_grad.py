"""nodes/rope_grad.py: the RoPE backward registered on comfy-kitchen's ops where they have none (ComfyUI >= 0.8).

Each check runs in a fresh interpreter: the registration is process-wide. "standin" defines comfy_kitchen::apply_rope1
and ::apply_rope itself, as comfy-kitchen 0.2.40 does (custom ops with no autograd formula; the math is ComfyUI
0.3.64's plain-torch RoPE), so the check runs wherever torch does; "real" uses the installed comfy-kitchen and skips
without it. Both compare every gradient with autograd through ComfyUI's plain-torch RoPE, which is the reference.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_STANDIN = """
@torch.library.custom_op("comfy_kitchen::apply_rope1", mutates_args=())
def _ck_rope1(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    return reference1(x, freqs_cis)

@torch.library.custom_op("comfy_kitchen::apply_rope", mutates_args=())
def _ck_rope(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return reference1(xq, freqs_cis), reference1(xk, freqs_cis)
"""

_CHECK = """
import importlib.util, math, sys, torch

def reference1(x, freqs_cis):  # ComfyUI 0.3.64's comfy/ldm/flux/math.py apply_rope1, autograd-able
    x_ = x.to(dtype=freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    x_out = freqs_cis[..., 0] * x_[..., 0] + freqs_cis[..., 1] * x_[..., 1]
    return x_out.reshape(*x.shape).type_as(x)

MODE = sys.argv[1]
if MODE == "real":
    import comfy_kitchen  # noqa: F401
else:
    exec(STANDIN)
ops = torch.ops.comfy_kitchen

def rope_freqs(tokens, dim, theta=10000):  # ComfyUI's flux `rope` layout: (1, 1, tokens, dim / 2, 2, 2)
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    a = torch.arange(tokens, dtype=torch.float64)[:, None] * omega
    out = torch.stack([a.cos(), -a.sin(), a.sin(), a.cos()], dim=-1).reshape(tokens, dim // 2, 2, 2)
    return out[None, None].float()

def no_backward(fn):
    x = torch.randn(1, 2, 3, 8, requires_grad=True)
    try:
        fn(x).sum().backward()
    except RuntimeError as e:
        return "autograd" in str(e)
    return False

assert no_backward(lambda x: ops.apply_rope1(x, rope_freqs(3, 8)))
assert no_backward(lambda x: ops.apply_rope(x, x, rope_freqs(3, 8))[1])

spec = importlib.util.spec_from_file_location("rope_grad", ROPE_GRAD)
rope_grad = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rope_grad)
with torch.inference_mode():  # as ComfyUI's executor calls the trainer
    rope_grad.ensure_rope_backward()
rope_grad.ensure_rope_backward()  # once per process: a second call changes nothing

torch.manual_seed(0)
for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
    freqs = rope_freqs(5, 16)
    q = torch.randn(2, 3, 5, 16, dtype=dtype)
    k = torch.randn(2, 3, 5, 16, dtype=dtype)
    gq, gk = torch.randn_like(q), torch.randn_like(k)

    def grads(fn, *xs, outs):
        xs = [x.clone().requires_grad_(True) for x in xs]
        ys = fn(*xs)
        ys = ys if isinstance(ys, tuple) else (ys,)
        torch.autograd.backward([y for y, g in zip(ys, outs) if g is not None], [g for g in outs if g is not None])
        return [y.detach() for y in ys], [x.grad for x in xs]

    for outs in ((gq, gk), (gq, None), (None, gk)):  # q only, k only: the other output gets no gradient
        (y1, y2), g = grads(lambda a, b: ops.apply_rope(a, b, freqs), q, k, outs=outs)
        (r1, r2), r = grads(lambda a, b: (reference1(a, freqs), reference1(b, freqs)), q, k, outs=outs)
        assert torch.allclose(y1.float(), r1.float(), atol=tol) and torch.allclose(y2.float(), r2.float(), atol=tol)
        for x, mine, ref in zip((q, k), g, r):
            ref = torch.zeros_like(x) if ref is None else ref  # the op's other input gets zeros (one node)
            assert mine is not None and mine.dtype == ref.dtype == dtype
            err = float((mine.float() - ref.float()).abs().max())
            assert err <= tol * max(1.0, float(ref.float().abs().max())), (dtype, err)
    (y,), (g,) = grads(lambda a: ops.apply_rope1(a, freqs), q, outs=(gq,))
    (r,), (rg,) = grads(lambda a: reference1(a, freqs), q, outs=(gq,))
    assert float((g.float() - rg.float()).abs().max()) <= tol * max(1.0, float(rg.float().abs().max()))
    assert float(g.float().norm()) > 0
print("ok")
"""


def _run(mode: str):
    code = f"STANDIN = {_STANDIN!r}\nROPE_GRAD = {str(ROOT / 'nodes' / 'rope_grad.py')!r}\n" + _CHECK
    out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().endswith("ok")


def test_rope_backward_on_ops_without_one_is_autograd_through_comfyuis_plain_rope():
    _run("standin")


def test_rope_backward_on_the_installed_comfy_kitchen():
    if importlib.util.find_spec("comfy_kitchen") is None:
        pytest.skip("comfy-kitchen is not installed (ComfyUI < 0.8 does not use it)")
    _run("real")
