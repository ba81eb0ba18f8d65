"""The kohya reader computes tensor values for all layers of one layout at once (issue 10: inspect of 200,000 keys);
these pin that the batched path refuses and reads exactly what the per-layer path did."""

import pytest
import torch
from safetensors.torch import save_file

from oft_core import OFTError, load_adapter
from oft_core.rotation import _skew
from oft_core.safetensors_io import _load_tensors
from oft_core.spec import _Blocks, _finite_each, make_layer


def _many(tmp_path, n=50, bad=None, value=float("nan"), alpha_dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(n):
        blocks = 1e-3 * torch.randn(2, 4, 4, generator=g)
        if i == bad:
            blocks[1, 0, 3] = value
            blocks[1, 3, 0] = -value  # finite A whose Q = A − Aᵀ overflows when value is 3e38
        tensors[f"oft_unet_layer{i:03d}.oft_blocks"] = blocks
        tensors[f"oft_unet_layer{i:03d}.alpha"] = torch.tensor(1e-3, dtype=alpha_dtype)
    path = tmp_path / "many.safetensors"
    save_file(tensors, str(path))
    return path, tensors


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 3e38])  # 3e38 − (−3e38) overflows in Q = A − Aᵀ
def test_one_bad_layer_among_many_is_refused_by_name(tmp_path, value):
    path, _ = _many(tmp_path, bad=37, value=value)
    with pytest.raises(OFTError, match="NaN or Inf") as e:
        load_adapter(path)
    assert "oft_unet_layer037" in str(e.value)


def test_batched_values_equal_per_layer_values(tmp_path):
    path, tensors = _many(tmp_path, alpha_dtype=torch.bfloat16)
    adapter = load_adapter(path)
    for i in range(50):
        layer = adapter.layers[("unet", f"layer{i:03d}")]
        assert torch.equal(layer.blocks[0], _skew(tensors[f"oft_unet_layer{i:03d}.oft_blocks"].float()))
        assert layer.constraint.value == float(tensors[f"oft_unet_layer{i:03d}.alpha"].float().item())
        assert layer.constraint.value != 1e-3  # the bf16 value itself, not a rounded-up literal


def test_finite_flags_are_checked_by_make_layer():
    q = torch.zeros(2, 4, 4)
    with pytest.raises(OFTError, match="split 0 blocks contain NaN or Inf"):
        make_layer(path="f", name="x", side="out", blocks=_Blocks([q], [False]), transpose=True)
    assert make_layer(path="f", name="x", side="out", blocks=_Blocks([q], [True]), transpose=True).dim == 8
    stacked = torch.zeros(3, 2, 4, 4)
    stacked[1, 0, 0, 1] = float("nan")
    assert _finite_each(stacked) == [True, False, True]
    assert _finite_each(torch.empty(3, 2, 4, 4, device="meta")) == [True, True, True]


def test_load_tensors_views_equal_safetensors(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 4, 5), "b": torch.tensor(1.5, dtype=torch.bfloat16), "c": torch.zeros(0, 3),
               "d": torch.arange(7, dtype=torch.int16), "e": torch.randn(2, dtype=torch.float64)}
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    ours, _ = _load_tensors(path)
    ref = load_file(str(path))
    for k in tensors:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape and torch.equal(ours[k], ref[k])
