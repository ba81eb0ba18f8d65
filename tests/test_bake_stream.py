"""`bake` streams the adapter file too: a skeleton first (every check the reader makes, each layer's structure, large
tensors on the meta device), then each layer read alone when its weight comes up. Pinned here: the streamed bake
writes the same bits as baking the fully loaded adapter, for every fixture; its peak memory does not grow with the
adapter file; a damaged layer anywhere in the file still stops the bake before anything is written."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from oracle import FIXTURES, REL_TOL, case_ids, get_case, rel_err
from safetensors.torch import load_file, save_file

from oft_core import OFTError, load_adapter
from oft_core.bake import bake
from oft_core.formats import _open_streamed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _base_file(case, tmp_path):
    if case.base_file is not None:
        return case.base_file
    path = tmp_path / "base.safetensors"
    save_file(dict(case.originals), str(path))
    return path


@pytest.mark.parametrize("case_id", case_ids())
def test_streamed_bake_equals_the_loaded_adapter_bit_for_bit(case_id, tmp_path):
    case = get_case(case_id)
    base = _base_file(case, tmp_path)
    loaded = load_adapter(case.adapter)
    streamed = _open_streamed(case.adapter)
    assert [layer.key for layer in streamed.skeleton] == [layer.key for layer in loaded]
    # The skeleton holds no values (every reader ran on meta tensors: the bakes below test that path for each format).
    assert all(g.device.type == "meta" for layer in streamed.skeleton for g in layer.blocks)
    assert all(layer.row_scale is None or layer.row_scale.device.type == "meta" for layer in streamed.skeleton)
    for layer in streamed.skeleton:  # every layer read alone is the layer of the whole file
        alone, whole = streamed.layer(layer.key), loaded.layers[(layer.component, layer.name)]
        assert all(torch.equal(a, b) for a, b in zip(alone.blocks, whole.blocks))
        assert (alone.row_scale is None) == (whole.row_scale is None)
        assert alone.row_scale is None or torch.equal(alone.row_scale, whole.row_scale)
    partial = case.id == "sd15_oft_attn_dim8_bf16"  # 9 of its 128 layers have weights in this base
    for strength, merged in case.expected.items():
        a, b = tmp_path / f"streamed_{strength}.safetensors", tmp_path / f"loaded_{strength}.safetensors"
        bake(base, [(case.adapter, strength)], a, allow_unmatched=partial, show_progress=False)
        bake(base, [(loaded, strength)], b, allow_unmatched=partial, show_progress=False)
        sa, sb = load_file(str(a)), load_file(str(b))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        for key, ref in merged.items():
            assert rel_err(sa[key], ref) <= REL_TOL, key


_CHILD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from oft_core import bake, load_adapter

    torch.set_num_threads(1)  # as the test session (conftest): 2 threads on a busy 2-core machine oversubscribe

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    def reset_peak():  # VmHWM (peak RSS) back to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status("VmRSS")

    repo, adapter, base, warm, out = sys.argv[1:6]
    bake(warm, [(adapter, 1.0)], out + ".warm", allow_unmatched=True, overwrite=True, show_progress=False)
    before = reset_peak()
    bake(base, [(adapter, 1.0)], out, overwrite=True, show_progress=False)
    streamed = status("VmHWM") - before
    before = reset_peak()
    whole = load_adapter(adapter)  # control: the adapter loaded whole, as bake did before it streamed
    print(json.dumps({"streamed": streamed, "whole": status("VmHWM") - before, "layers": len(whole)}))
""")


def test_streamed_bake_peak_memory_does_not_grow_with_the_adapter(tmp_path):
    """Peak RSS growth of a bake from a 24-layer, 96 MiB kohya file (4 MiB of blocks per layer) onto its base.

    Same method as tests/test_bake_ops.py (fresh subprocess, warm-up on a one-layer base, VmHWM reset through
    /proc/self/clear_refs, glibc's mmap threshold pinned so RSS is what is alive). Streamed: one layer's working set,
    under 6× its 4 MiB of blocks (as read, made skew, constrained, I − Q for the solve; the 2 MiB base tensor and its
    chunk copies), measured 19–21 MiB, and under a quarter of the file. Control, in the same process after the bake
    (VmHWM reset again): loading the adapter whole (what bake did before it streamed the adapter, before baking
    its first layer) grows by more than the 96 MiB file: measured 220 MiB (the file's fp32 blocks and their skew Q
    side by side while the reader runs), so the measurement does see a whole-file working set. One process, one
    bake: the control's bake would only add to a peak its load has already passed.
    """
    layer_bytes = 4 * 512 * 512 * 4
    g = torch.Generator().manual_seed(0)
    adapter, base = {}, {}
    for i in range(24):
        adapter[f"oft_unet_layers_{i}_proj.oft_blocks"] = torch.randn(4, 512, 512, generator=g) * 1e-3
        adapter[f"oft_unet_layers_{i}_proj.alpha"] = torch.tensor(1e-3)
        base[f"layers.{i}.proj.weight"] = torch.randn(2048, 256, generator=g)
    paths = {k: tmp_path / f"{k}.safetensors" for k in ("adapter", "base", "warm")}
    save_file(adapter, str(paths["adapter"]), metadata={"ss_network_module": "networks.oft"})
    save_file(base, str(paths["base"]))
    save_file({"layers.0.proj.weight": base["layers.0.proj.weight"]}, str(paths["warm"]))
    del adapter, base
    size = os.path.getsize(paths["adapter"])
    assert size > 24 * layer_bytes

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    run = subprocess.run([sys.executable, "-c", _CHILD, REPO, str(paths["adapter"]), str(paths["base"]),
                          str(paths["warm"]), str(tmp_path / "out.safetensors")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    m = json.loads(run.stdout.strip().splitlines()[-1])
    streamed = m["streamed"]
    assert streamed < 6 * layer_bytes, f"streamed bake grew by {streamed / 2**20:.1f} MiB (a layer is 4 MiB)"
    assert streamed < size / 4
    assert m["layers"] == 24 and m["whole"] > size
    baked, ref = load_file(str(tmp_path / "out.safetensors")), load_file(str(paths["base"]))
    assert all(not torch.equal(baked[k], ref[k]) for k in ref)


def test_a_damaged_layer_in_the_middle_stops_the_bake_before_writing(tmp_path):
    g = torch.Generator().manual_seed(1)
    adapter = {f"oft_unet_layers_{i}_proj.oft_blocks": torch.randn(2, 8, 8, generator=g) * 1e-2 for i in range(5)}
    adapter["oft_unet_layers_2_proj.oft_blocks"][1, 3, 4] = float("nan")
    base = {f"layers.{i}.proj.weight": torch.randn(16, 4, generator=g) for i in range(5)}
    a, b, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "out.safetensors"
    save_file(adapter, str(a), metadata={"ss_network_alpha": "0.001"})
    save_file(base, str(b))
    with pytest.raises(OFTError) as e:
        bake(b, [(a, 1.0)], out, show_progress=False)
    assert "a.safetensors" in str(e.value) and "oft_unet_layers_2_proj" in str(e.value) and "NaN" in str(e.value)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["a.safetensors", "b.safetensors"]


def test_several_adapters_fused_slices_and_block_specs_stream_like_loaded(tmp_path):
    """Three adapters, orthogonal mode, per-adapter and default block specs, and fused slices: a diffusers-named
    LyCORIS file whose to_q / to_k / to_v layers patch row slices of the BFL fused qkv weight (three layers of one
    adapter on one base tensor, each read alone). Streamed from the files: bit for bit the bake of the loaded ones."""
    flux = FIXTURES / "kohya" / "flux_tiny_oft_attn_dim4.safetensors"
    base_file = FIXTURES / "kohya" / "flux_tiny_base.safetensors"
    g = torch.Generator().manual_seed(3)
    qkv = {f"lycoris_transformer_blocks_1_attn_to_{p}.oft_blocks": torch.randn(4, 32, 32, generator=g) * 0.05
           for p in "qkv"}
    qkv.update({f"lycoris_transformer_blocks_1_attn_to_{p}.alpha": torch.tensor(0.0) for p in "qkv"})
    fused = tmp_path / "qkv.safetensors"
    save_file(qkv, str(fused))
    items = [(flux, 0.7, "double:0=0.5"), (fused, 0.9), (flux, -0.4)]
    loaded = [(load_adapter(item[0]), *item[1:]) for item in items]
    a, b = tmp_path / "streamed.safetensors", tmp_path / "loaded.safetensors"
    ra = bake(base_file, items, a, mode="orthogonal", block_spec="double:1=0.25", show_progress=False)
    rb = bake(base_file, loaded, b, mode="orthogonal", block_spec="double:1=0.25", show_progress=False)
    assert ra.tensors_changed == rb.tensors_changed == 8 and [len(r.matched) for r in ra.reports] == [8, 3, 8]
    sa, sb, base = load_file(str(a)), load_file(str(b)), load_file(str(base_file))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    key = "double_blocks.1.img_attn.qkv.weight"  # 384 = q|k|v rows of 128
    assert sorted((m.target.key, m.target.offset) for m in ra.reports[1].matched) == [
        (key, (0, 0, 128)), (key, (0, 128, 128)), (key, (0, 256, 128))]
    assert all(not torch.equal(sa[key][i:i + 128], base[key][i:i + 128]) for i in (0, 128, 256))


def _five_layers(tmp_path, adapter_edit=None, base_rows=None):
    """A 5-layer kohya file and its base; `adapter_edit` / `base_rows` spoil layer 2 (the middle of the file)."""
    g = torch.Generator().manual_seed(2)
    adapter = {f"oft_unet_layers_{i}_proj.oft_blocks": torch.randn(2, 8, 8, generator=g) * 1e-2 for i in range(5)}
    base = {f"layers.{i}.proj.weight": torch.randn(16, 4, generator=g) for i in range(5)}
    if adapter_edit:
        adapter_edit(adapter)
    if base_rows:
        base["layers.2.proj.weight"] = torch.randn(base_rows, 4, generator=g)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(adapter, str(a), metadata={"ss_network_alpha": "0.001"})
    save_file(base, str(b))
    return a, b


def _renamed(adapter):
    adapter["oft_unet_layers_2_proj.oft_blockz"] = adapter.pop("oft_unet_layers_2_proj.oft_blocks")


@pytest.mark.parametrize("spoil, expect", [
    ({"base_rows": 24}, "expected 16 (= 2×8 blocks of the adapter), found 24"),
    ({"adapter_edit": _renamed}, "unexpected key 'oft_unet_layers_2_proj.oft_blockz'"),
    ({"adapter_edit": lambda a: a.update({"oft_unet_layers_2_proj.oft_blocks": torch.zeros(2, 8, 4)})},
     "expected (num_blocks, b, b), found (2, 8, 4)"),
], ids=["wrong-shape-for-its-weight", "malformed-key", "non-square-blocks"])
def test_bad_layer_in_the_middle_writes_nothing_and_names_it(tmp_path, spoil, expect):
    a, b = _five_layers(tmp_path, **spoil)
    out = tmp_path / "out.safetensors"
    with pytest.raises(OFTError) as e:
        bake(b, [(a, 1.0)], out, show_progress=False)
    msg = str(e.value)
    assert msg.startswith(str(a)) and "oft_unet_layers_2_proj" in msg and expect in msg, msg
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]
    good = tmp_path / "good"
    good.mkdir()
    good_a, good_b = _five_layers(good)
    assert bake(good_b, [(good_a, 1.0)], good / "out.safetensors", show_progress=False).tensors_changed == 5


def test_a_reader_that_needs_values_for_the_skeleton_fails_clearly(tmp_path, monkeypatch):
    """A reader that reads a value the skeleton left on the meta device gets an OFTError naming the file, not a raw
    torch error from deep inside the reader."""
    from oracle import FIXTURES

    import oft_core.formats as formats

    path = FIXTURES / "kohya" / "flux_tiny_oft_attn_dim4.safetensors"
    real = formats.READERS[0]

    def needs_values(header, tensors, config):
        float(next(t for k, t in tensors.items() if k.endswith(".oft_blocks.0")).sum())  # .item() of a meta tensor
        return real.read(header, tensors, config)

    monkeypatch.setattr(formats, "READERS", [real._replace(read=needs_values), *formats.READERS[1:]])
    with pytest.raises(OFTError) as e:
        _open_streamed(path)
    assert str(path) in str(e.value) and "cannot be streamed" in str(e.value)
    assert len(load_adapter(path)) > 0  # the whole-file path still reads it
