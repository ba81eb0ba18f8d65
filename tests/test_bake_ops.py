"""Bake options (strength mode, per-block strength, dtypes incl. fp8, progress, streaming memory), the extended
`inspect` (orthogonality error, hyperspherical energy on a base) and the end-to-end `demo` command."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from oracle import FIXTURES, REL_TOL, get_case, rel_err
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from oft_core import OFTAdapter, load_adapter, make_layer, resolve_for_weight, rotate_weight
from oft_core.bake import bake
from oft_core.cli import main as cli
from oft_core.spec import Constraint
from oft_core.summary import _hyperspherical_energy, describe

FLUX = FIXTURES / "kohya" / "flux_tiny_oft_attn_dim4.safetensors"
FLUX_BASE = FIXTURES / "kohya" / "flux_tiny_base.safetensors"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flux_layers():
    return {layer.name: layer for layer in load_adapter(FLUX)}


# ------------------------------------------------------------------------------------------------ per-block strength
def test_blocks_spec_on_cli_leaves_switched_off_blocks_bit_exact(tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    rc = cli(["bake", "--base", str(FLUX_BASE), "--adapter", f"{FLUX}:0.8", "--out", str(out),
              "--blocks", "double:0=0, double:1=0.5", "--no-progress"])
    assert rc == 0
    assert "4 layers at strength 0 left untouched" in capsys.readouterr().out
    base, baked = load_file(str(FLUX_BASE)), load_file(str(out))
    layers = _flux_layers()
    checked = 0
    for name, layer in layers.items():
        key = name.replace("double_blocks_", "double_blocks.").replace("_img_attn_", ".img_attn.")
        key = key.replace("_txt_attn_", ".txt_attn.") + ".weight"
        w = base[key]
        if key.startswith("double_blocks.0."):
            assert torch.equal(baked[key], w), key  # multiplier 0: untouched
        else:
            ref = rotate_weight(resolve_for_weight(layer, w.shape), w, 0.8 * 0.5)
            assert torch.equal(baked[key], ref), key
            assert rel_err(baked[key], w) > 1e-6, f"{key}: strength 0.4 left the weight unchanged"
        checked += 1
    assert checked == 8
    meta = json.loads(safe_open(str(out), "pt").metadata()["comfyui_oft.baked"])
    assert meta[0]["blocks"] == "double:0=0, double:1=0.5" and meta[0]["strength"] == 0.8


def test_orthogonal_strength_mode_on_cli(tmp_path):
    out_o, out_k = tmp_path / "o.safetensors", tmp_path / "k.safetensors"
    assert cli(["bake", "--base", str(FLUX_BASE), "--adapter", f"{FLUX}:-0.7", "--out", str(out_o),
                "--strength-mode", "orthogonal"]) == 0
    assert cli(["bake", "--base", str(FLUX_BASE), "--adapter", f"{FLUX}:-0.7", "--out", str(out_k)]) == 0
    base, o, k = load_file(str(FLUX_BASE)), load_file(str(out_o)), load_file(str(out_k))
    key = "double_blocks.1.img_attn.qkv.weight"
    layer = resolve_for_weight(_flux_layers()["double_blocks_1_img_attn_qkv"], base[key].shape)
    assert torch.equal(o[key], rotate_weight(layer, base[key], -0.7, "orthogonal"))
    assert torch.equal(k[key], rotate_weight(layer, base[key], -0.7, "kohya"))
    assert rel_err(o[key], k[key]) > 1e-6  # the two modes differ away from 0 and 1
    # orthogonal mode keeps the rotation orthogonal: the column norms of the rotated rows are kept (M·W)
    assert torch.allclose(o[key].norm(dim=0), base[key].norm(dim=0), rtol=1e-5)


def test_library_block_spec_and_per_adapter_spec(tmp_path):
    a = tmp_path / "a.safetensors"
    b = tmp_path / "b.safetensors"
    bake(FLUX_BASE, [(FLUX, 1.0)], a, block_spec="default=0, double:1=1")
    bake(FLUX_BASE, [(FLUX, 1.0, "double:0=0")], b, block_spec="default=0")  # the adapter's own spec wins
    ra, rb = load_file(str(a)), load_file(str(b))
    assert torch.equal(ra["double_blocks.1.img_attn.proj.weight"], rb["double_blocks.1.img_attn.proj.weight"])
    base = load_file(str(FLUX_BASE))
    assert torch.equal(ra["double_blocks.0.img_attn.proj.weight"], base["double_blocks.0.img_attn.proj.weight"])
    assert not torch.equal(ra["double_blocks.1.img_attn.proj.weight"], base["double_blocks.1.img_attn.proj.weight"])


def test_bad_block_spec_and_mode_write_nothing(tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    assert cli(["bake", "--base", str(FLUX_BASE), "--adapter", str(FLUX), "--out", str(out),
                "--blocks", "doubel=0"]) == 2
    assert "unknown group 'doubel'" in capsys.readouterr().err and not out.exists()
    from oft_core import OFTError

    with pytest.raises(OFTError, match="strength mode"):
        bake(FLUX_BASE, [(FLUX, 1.0)], out, mode="linear")
    assert not out.exists() and not list(tmp_path.glob(".oft-bake-*"))


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    assert cli(["bake", "--base", str(FLUX_BASE), "--adapter", str(FLUX), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert cli(["bake", "--base", str(FLUX_BASE), "--adapter", str(FLUX), "--out", str(out), "--overwrite"]) == 0
    assert len(load_file(str(out))) == len(load_file(str(FLUX_BASE)))


# ------------------------------------------------------------------------------------------------ dtypes
def _layer(name, n_blocks, b, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n_blocks, b, b, generator=g) * scale
    return make_layer(path="", name=name, side="out", blocks=[a - a.transpose(1, 2)], transpose=True,
                      constraint=Constraint("norm_clamp", 1e-3), source="kohya", key=f"oft_unet_{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_each_dtype_is_kept_and_computed_in_fp32(tmp_path, dtype):
    g = torch.Generator().manual_seed(1)
    tensors = {
        "blk.a.weight": (torch.randn(64, 48, generator=g) * 0.5).to(dtype),
        "blk.b.weight": (torch.randn(32, 16, generator=g) * 0.5).to(dtype),
        "blk.a.bias": torch.randn(64, generator=g).to(dtype),
        "steps": torch.arange(5, dtype=torch.int64),
    }
    base = tmp_path / "base.safetensors"
    save_file(tensors, str(base), metadata={"origin": "synthetic", "note": "kept"})
    adapter = OFTAdapter({("unet", "blk_a"): _layer("blk_a", 4, 16, 0), ("unet", "blk_b"): _layer("blk_b", 2, 16, 1)},
                         "kohya")
    out = tmp_path / "out.safetensors"
    bake(base, [(adapter, 0.75)], out)
    baked = load_file(str(out))
    for key, t in tensors.items():
        assert baked[key].dtype == t.dtype and baked[key].shape == t.shape
    for key, layer in (("blk.a.weight", adapter.layers[("unet", "blk_a")]),
                       ("blk.b.weight", adapter.layers[("unet", "blk_b")])):
        w = tensors[key]
        ref = rotate_weight(layer, w.to(torch.float32), 0.75).to(dtype)  # fp32 math, written back in the dtype
        assert torch.equal(baked[key].view(torch.uint8), ref.view(torch.uint8)), key
        assert not torch.equal(baked[key].view(torch.uint8), w.view(torch.uint8))
    assert torch.equal(baked["blk.a.bias"].view(torch.uint8), tensors["blk.a.bias"].view(torch.uint8))
    assert torch.equal(baked["steps"], tensors["steps"])
    meta = safe_open(str(out), "pt").metadata()
    assert meta["origin"] == "synthetic" and meta["note"] == "kept" and "comfyui_oft.baked" in meta


# ------------------------------------------------------------------------------------------------ progress
def test_progress_callback_and_forced_display(tmp_path, capsys):
    calls = []
    out = tmp_path / "out.safetensors"
    bake(FLUX_BASE, [(FLUX, 1.0)], out, progress=lambda done, total: calls.append((done, total)))
    total = os.path.getsize(FLUX_BASE) - (8 + int.from_bytes(FLUX_BASE.read_bytes()[:8], "little"))
    assert calls[-1] == (total, total) and len(calls) == len(load_file(str(FLUX_BASE)))
    assert all(a[0] < b[0] for a, b in zip(calls, calls[1:]))
    assert capsys.readouterr().err == ""  # short bake into a non-terminal stderr: silent
    bake(FLUX_BASE, [(FLUX, 1.0)], out, overwrite=True, show_progress=True)
    err = capsys.readouterr().err
    assert "baking: 100%" in err and err.count("baking:") == 11  # 0 %, 10 %, …, 100 %


# ------------------------------------------------------------------------------------------------ memory
_MEMORY_CHILD = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    from oft_core import OFTAdapter, make_layer, bake
    from oft_core.spec import Constraint

    torch.set_num_threads(1)  # as the test session (conftest): 2 threads on a busy 2-core machine oversubscribe

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    layers = {}
    for i in range(20):
        g = torch.Generator().manual_seed(i)
        a = torch.randn(4, 256, 256, generator=g) * 0.01
        name = f"layers_{i}_proj"
        layers[("unet", name)] = make_layer(path="", name=name, side="out", blocks=[a - a.transpose(1, 2)],
                                            transpose=True, constraint=Constraint("norm_clamp", 1e-3))
    adapter = OFTAdapter(layers, "kohya")
    # warm-up on a one-layer base: first-use allocations of torch, safetensors and one layer's working set, but never
    # the whole file's worth (the allocator keeps freed memory, so warming on the big file would hide a non-streaming
    # bake)
    bake(sys.argv[4], [(adapter, 1.0)], sys.argv[3] + ".warm", allow_unmatched=True, overwrite=True,
         show_progress=False)

    def growth(hold=False):
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM (peak RSS) to the current RSS
            f.write("5")
        before = status("VmRSS")
        held = open(sys.argv[2], "rb").read() if hold else None  # noqa: F841  (kept alive through the bake)
        bake(sys.argv[2], [(adapter, 1.0)], sys.argv[3], overwrite=True, show_progress=False)
        return status("VmHWM") - before

    out = {"streamed": growth()}
    if len(sys.argv) > 5:  # control, after the measurement: hold every tensor of the file, as a non-streaming bake
        out["holding_the_file"] = growth(hold=True)
    print(json.dumps(out))
""")


def test_streaming_bake_peak_memory_is_a_few_layers_not_the_file(tmp_path):
    """Peak resident memory of a bake grows by a few layers' worth, not by the file size.

    Method: the bake runs in a fresh Python subprocess (nothing else of the test session in its heap). There, after a
    warm-up bake of a one-layer base (lazy allocations of torch, safetensors and one layer's working set), writing "5"
    to /proc/self/clear_refs resets the kernel's peak-RSS counter VmHWM to the current RSS; the bake runs; VmHWM − RSS
    before is the peak growth. VmHWM counts every resident page: torch's CPU allocator (which tracemalloc does not
    see) and mapped file pages alike, so it is the honest total. Written tensors go to the page cache, not to RSS.

    The base is 20 Linear weights of 1024×1024 fp32 (4 MiB each) plus an untouched 4 MiB tensor: an 84 MiB file.
    - Live working set: with glibc's dynamic mmap threshold pinned (MALLOC_MMAP_THRESHOLD_=128 KiB, so every freed
      large block goes back to the kernel and RSS is what is alive), the bake must stay under 3 layers (12 MiB): the
      one read buffer, the rotated copy, the rotation blocks.
    - Default allocator: glibc keeps freed blocks for reuse, which adds a bounded slack; under 5 layers (20 MiB).
    - Control: the same window while holding every tensor of the file (what a non-streaming bake would do) grows by
      more than the file size, so the measurement does see a whole-file working set. It runs in the pinned
      process after the live measurement (VmHWM reset again; with the pinned threshold the first bake's freed
      memory is back with the kernel), so the test starts two processes, not three.
    """
    layer_bytes = 1024 * 1024 * 4
    g = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.proj.weight": torch.randn(1024, 1024, generator=g) for i in range(20)}
    tensors["embed.weight"] = torch.randn(1024, 1024, generator=g)
    base, warm = tmp_path / "base.safetensors", tmp_path / "warm.safetensors"
    save_file(tensors, str(base))
    save_file({"layers.0.proj.weight": tensors["layers.0.proj.weight"]}, str(warm))
    del tensors
    size = os.path.getsize(base)
    assert size > 20 * layer_bytes

    def growth(pinned: bool, *control):
        env = dict(os.environ)
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
        if pinned:
            env["MALLOC_MMAP_THRESHOLD_"] = "131072"
        run = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, REPO, str(base), str(tmp_path / "out.safetensors"),
                              str(warm), *control], capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout.strip().splitlines()[-1])

    pinned = growth(True, "and-hold-everything")  # the live peak, then the control in the same process
    live = pinned["streamed"]
    assert live < 3 * layer_bytes, f"live peak grew by {live / 2**20:.1f} MiB (a layer is 4 MiB, the file 84 MiB)"
    default = growth(False)["streamed"]
    assert default < 5 * layer_bytes, f"peak RSS grew by {default / 2**20:.1f} MiB with the default allocator"
    assert pinned["holding_the_file"] > size
    baked = load_file(str(tmp_path / "out.safetensors"))
    ref = load_file(str(base))
    assert len(baked) == 21 and not torch.equal(baked["layers.7.proj.weight"], ref["layers.7.proj.weight"])
    assert torch.equal(baked["embed.weight"], ref["embed.weight"])


# ------------------------------------------------------------------------------------------------ inspect
def test_hyperspherical_energy_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 7, generator=g, dtype=torch.float64)  # > one chunk of 256 rows
    u = w / w.norm(dim=1, keepdim=True)
    brute = sum(1 / float((u[i] - u[j]).norm()) for i in range(300) for j in range(300) if i != j)
    assert math.isclose(_hyperspherical_energy(w.float()), brute, rel_tol=1e-6)
    assert math.isclose(_hyperspherical_energy(w * 3.0), _hyperspherical_energy(w), rel_tol=1e-12)  # scale-free


def test_inspect_energy_input_side_invariant_output_side_changes():
    peft = get_case("peft_oft_cayley_bs8")
    d = describe(load_adapter(peft.adapter), base=peft.base_file)
    assert d["energy"]["layers_measured"] == 56 and all(x["side"] == "in" for x in d["per_layer"])
    # rows rotated by one orthogonal M: every pairwise angle and the energy are kept, up to fp32 rounding of W·M
    assert d["energy"]["he_rel_change_max_abs"] < 1e-6
    lyc = get_case("lycoris_diag_oft_dim8")
    e = describe(load_adapter(lyc.adapter), base=lyc.base_file)
    assert e["energy"]["layers_measured"] == 56 and all(x["side"] == "out" for x in e["per_layer"])
    changes = [abs(x["he_rel_change"]) for x in e["per_layer"]]
    assert min(changes) > 1e-5 and max(changes) > 1e-3  # mixing rows within blocks changes the energy
    for x in d["per_layer"] + e["per_layer"]:
        assert 0 <= x["orthogonality_error"] < 2e-6 and x["he_before"] > 0


def test_inspect_orthogonality_error_of_neumann_layers_is_reported():
    d = describe(load_adapter(get_case("peft_oft_neumann_r4").adapter))
    cayley = describe(load_adapter(get_case("peft_oft_cayley_bs8").adapter))
    assert d["orthogonality_error_max"] > 10 * cayley["orthogonality_error_max"] > 0  # the series is approximate
    assert "energy" not in d


def test_inspect_cli_with_base(capsys):
    lyc = get_case("lycoris_diag_oft_dim8")
    assert cli(["inspect", str(lyc.adapter), "--base", str(lyc.base_file)]) == 0
    text = capsys.readouterr().out
    assert "orthogonality: max |BᵀB − I|" in text and "hyperspherical energy on" in text and "56 of 56" in text
    assert cli(["inspect", str(lyc.adapter), "--base", str(lyc.base_file), "--json", "--he-rows", "16"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert {x["rows"] for x in d["per_layer"]} == {16}
    assert all("he_rel_change" in x and "orthogonality_error" in x for x in d["per_layer"])


# ------------------------------------------------------------------------------------------------ demo
def test_demo_runs_end_to_end(tmp_path):
    # single-threaded as the test session (conftest): 2 threads on a busy 2-core machine oversubscribe (34 s vs 9 s)
    run = subprocess.run([sys.executable, "-m", "oft_core", "demo", "--out-dir", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert out.count("[ok]") == 6 and "FAILED" not in out
    loss = [float(v) for v in out.split("loss ")[1].split()[0:3:2]]
    assert loss[1] < 0.5 * loss[0]  # training really reduced the loss
    diff = float(out.split("max |baked forward − trained forward| = ")[1].split()[0])
    assert diff < 1e-3
    base = load_file(str(tmp_path / "demo_base.safetensors"))
    zero = load_file(str(tmp_path / "demo_baked_s0.safetensors"))
    assert all(torch.equal(base[k], zero[k]) for k in base)
    adapter = load_adapter(tmp_path / "demo_oft.safetensors")
    assert adapter.format == "kohya" and len(adapter) == 7
    one = load_file(str(tmp_path / "demo_baked_s1.safetensors"))
    layer = adapter.layers[("unet", "attn_to_q")]
    w = base["attn.to_q.weight"]
    assert rel_err(one["attn.to_q.weight"], rotate_weight(resolve_for_weight(layer, w.shape), w, 1.0)) <= REL_TOL


def test_progress_bar_on_a_terminal_redraws_one_line():
    import io

    from oft_core.bake import _Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    bar = _Progress(400, stream=term)
    for done in (100, 200, 300, 400):
        bar(done, 400)
    text = term.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n") and text.count("\n") == 1
    assert "[" + "#" * 30 + "] 100.0%" in text and "[" + "#" * 7 + " " * 23 + "]  25.0%" in text
