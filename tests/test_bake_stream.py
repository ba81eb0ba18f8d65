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
from oracle import REL_TOL, case_ids, get_case, rel_err
from safetensors.torch import load_file, save_file

from oft_core import OFTError, load_adapter
from oft_core.bake import bake
from oft_core.formats import open_streamed

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
    streamed = open_streamed(case.adapter)
    assert [layer.key for layer in streamed.skeleton] == [layer.key for layer in loaded]
    for layer in streamed.skeleton:  # every layer read alone is the layer of the whole file
        alone, whole = streamed.layer(layer.key), loaded.layers[(layer.component, layer.name)]
        assert all(torch.equal(a, b) for a, b in zip(alone.generators, whole.generators))
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
    from oft_core import bake, load_adapter

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    repo, adapter, base, warm, out = sys.argv[1:6]
    bake(warm, [(adapter, 1.0)], out + ".warm", allow_unmatched=True, overwrite=True, show_progress=False)
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM (peak RSS) to the current RSS
        f.write("5")
    before = status("VmRSS")
    item = load_adapter(adapter) if len(sys.argv) > 6 else adapter  # control: the adapter loaded whole
    bake(base, [(item, 1.0)], out, overwrite=True, show_progress=False)
    print(json.dumps({"before": before, "peak": status("VmHWM")}))
""")


def test_streamed_bake_peak_memory_does_not_grow_with_the_adapter(tmp_path):
    """Peak RSS growth of a bake from a 24-layer, 96 MiB kohya file (4 MiB of blocks per layer) onto its base.

    Same method as tests/test_bake_ops.py (fresh subprocess, warm-up on a one-layer base, VmHWM reset through
    /proc/self/clear_refs, glibc's mmap threshold pinned so RSS is what is alive). Streamed: one layer's working set,
    under 6× its 4 MiB of blocks (as read, made skew, constrained, I − Q for the solve; the 2 MiB base tensor and its
    chunk copies), measured 21 MiB, and under a quarter of the file. Control: the same bake with the adapter loaded
    whole first (what bake did before it streamed the adapter) grows by more than the 96 MiB file.
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

    def growth(*control):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        run = subprocess.run([sys.executable, "-c", _CHILD, REPO, str(paths["adapter"]), str(paths["base"]),
                              str(paths["warm"]), str(tmp_path / "out.safetensors"), *control],
                             capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 0, run.stderr
        m = json.loads(run.stdout.strip().splitlines()[-1])
        return m["peak"] - m["before"]

    streamed = growth()
    assert streamed < 6 * layer_bytes, f"streamed bake grew by {streamed / 2**20:.1f} MiB (a layer is 4 MiB)"
    assert streamed < size / 4
    assert growth("load-whole") > size
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
