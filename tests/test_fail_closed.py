"""Issue 10, through the CLI: hostile and broken files, bad numbers, full disks, kills and concurrent runs never leave a
wrong, broken or overwritten file.

Every refusal is checked the same way (`refused`): exit status 2, exactly one stderr line `error: …` that names the
file or input and says what was expected and what was found, no traceback, nothing at the output path or beside it,
and every input file byte for byte as before. The node side of the same classes is tests/test_nodes_fail_closed.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from oracle import get_case
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from oft_core import OFTError, load_adapter
from oft_core.cli import main as cli

REPO = Path(__file__).resolve().parent.parent
LYCORIS = get_case("lycoris_diag_oft_dim8")
PEFT = get_case("peft_oft_cayley_bs8")
KOHYA_LAYER = "oft_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


# ------------------------------------------------------------------------------------------------ helpers
def digest(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a folder (keyed by relative path)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path) if p != path else p.name): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


class Scene:
    """A work folder with copies of the inputs, and the checks every refusal must pass."""

    def __init__(self, tmp_path: Path):
        self.dir = tmp_path / "work"
        self.dir.mkdir()
        self.inputs: list[Path] = []

    def add(self, src: Path, name: str | None = None) -> Path:
        dst = self.dir / (name or src.name)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy(src, dst)
        self.inputs.append(dst)
        return dst

    def track(self, path: Path) -> Path:
        self.inputs.append(path)
        return path

    def snapshot(self):
        self.before_listing = sorted(os.listdir(self.dir))
        self.before = {str(p): digest(p) for p in self.inputs}

    def refused(self, argv: list[str], capsys, *words: str, out: Path | None = None) -> str:
        """Run the CLI in process; assert the whole contract; return the error line."""
        self.snapshot()
        capsys.readouterr()
        rc = cli([str(a) for a in argv])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2, err
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert "Traceback" not in err
        for w in words:
            assert w in lines[0], (w, lines[0])
        if out is not None:
            assert not os.path.lexists(out) or str(out) in self.before, f"{out} was created"
        assert sorted(os.listdir(self.dir)) == self.before_listing, "something was left in the folder"
        assert {str(p): digest(p) for p in self.inputs} == self.before, "an input changed"
        return lines[0]


@pytest.fixture()
def scene(tmp_path):
    return Scene(tmp_path)


def header_and_data(path: Path) -> tuple[dict, bytes]:
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path: Path, header, data: bytes) -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


def kohya_file(path: Path, blocks: torch.Tensor, alpha=1e-3, name: str = KOHYA_LAYER) -> Path:
    save_file({f"{name}.oft_blocks": blocks, f"{name}.alpha": torch.tensor(alpha)}, str(path))
    return path


# ------------------------------------------------------------------------------------------------ malformed base
def _first_two(h):
    keys = sorted((k for k in h if k != "__metadata__" and h[k]["shape"]), key=lambda k: h[k]["data_offsets"][0])
    return keys[0], keys[1]


def _mut_short(h, d):
    a, _ = _first_two(h)
    h[a]["shape"] = [h[a]["shape"][0] + 1] + h[a]["shape"][1:]
    return h, d


def _mut_overlap(h, d):
    a, b = _first_two(h)
    h[b] = dict(h[a])
    return h, d


def _mut_negative_offset(h, d):
    a, _ = _first_two(h)
    h[a]["data_offsets"] = [-8, h[a]["data_offsets"][1]]
    return h, d


def _mut_huge_shape(h, d):
    a, _ = _first_two(h)
    h[a]["shape"] = [2 ** 20, 2 ** 20]
    return h, d


def _mut_dim(value):
    def mut(h, d):
        a, _ = _first_two(h)
        h[a]["shape"] = [value] + h[a]["shape"][1:]
        return h, d
    return mut


def _mut_dtype(h, d):
    a, _ = _first_two(h)
    h[a]["dtype"] = "F12"
    return h, d


def _mut_metadata(value):
    def mut(h, d):
        h["__metadata__"] = value
        return h, d
    return mut


def _mut_trailing(h, d):
    return h, d + b"\0" * 8


def _mut_text(fn):
    """A mutation of the header's JSON text itself (what json.dumps cannot write)."""
    def mut(h, d):
        return fn(json.dumps(h)).encode(), d
    return mut


def _infinity_offset(text: str) -> str:
    i = text.index('"data_offsets": [') + len('"data_offsets": [')
    return text[:i] + "0, Infinity" + text[text.index("]", i):]


def _infinity_dim(text: str) -> str:
    i = text.index('"shape": [') + len('"shape": [')
    return text[:i] + "Infinity, " + text[i:]


def _deep(text: str) -> str:
    return '{"deep": ' + "[" * 100_000 + "]" * 100_000 + ", " + text[1:]


def _digits(text: str) -> str:
    i = text.index('"data_offsets": [') + len('"data_offsets": [')
    return text[:i] + "1" * 5000 + ", " + text[text.index(",", i) + 1:]


MALFORMED = {
    "data shorter than dtype x shape": (_mut_short, "takes"),
    "overlapping offsets": (_mut_overlap, "overlaps"),
    "negative offset": (_mut_negative_offset, "data_offsets"),
    "2^40-element shape": (_mut_huge_shape, "takes"),
    "negative dim": (_mut_dim(-1), "shape of integers ≥ 0"),
    "float dim": (_mut_dim(4.0), "shape of integers ≥ 0"),
    "unknown dtype": (_mut_dtype, "'F12'"),
    "__metadata__ list": (_mut_metadata(["a"]), "__metadata__: expected an object of text values, found list"),
    "__metadata__ string": (_mut_metadata("a"), "__metadata__: expected an object of text values, found str"),
    "__metadata__ number value": (_mut_metadata({"a": 1}), "found 'a': int"),
    "trailing bytes": (_mut_trailing, "after the last tensor"),
    "Infinity in data_offsets": (_mut_text(_infinity_offset), "Infinity is not a JSON number"),
    "Infinity dim": (_mut_text(_infinity_dim), "Infinity is not a JSON number"),
    "nested 100,000 deep": (_mut_text(_deep), "nested too deeply"),
    "5000-digit offset": (_mut_text(_digits), "5000 digits"),
}


def malformed(src: Path, dst: Path, case: str) -> Path:
    h, d = header_and_data(src)
    h, d = MALFORMED[case][0](h, d)
    return write_raw(dst, h, d)


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_base_is_refused_before_anything_is_written(scene, capsys, case):
    adapter = scene.add(LYCORIS.adapter)
    base = scene.track(malformed(LYCORIS.base_file, scene.dir / "base.safetensors", case))
    out = scene.dir / "out.safetensors"
    line = scene.refused(["bake", "--base", base, "--adapter", adapter, "--out", out], capsys, str(base),
                         MALFORMED[case][1], out=out)
    assert "not a" in line or "truncated" in line


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_adapter_header_is_refused(scene, capsys, case):
    adapter = scene.track(malformed(LYCORIS.adapter, scene.dir / "adapter.safetensors", case))
    scene.refused(["inspect", adapter], capsys, str(adapter), MALFORMED[case][1])
    out = scene.dir / "out.safetensors"
    scene.refused(["convert", adapter, "--to", "kohya", "--out", out], capsys, str(adapter), out=out)


def test_every_refused_header_is_one_safetensors_refuses_too(tmp_path):
    """The strict checks are safetensors' own rules, not stricter: each malformed variant above fails to open with
    safetensors itself (so refusing it loses no file anyone could use), while every fixture opens with both."""
    for case in MALFORMED:
        path = malformed(LYCORIS.base_file, tmp_path / f"{len(os.listdir(tmp_path))}.safetensors", case)
        with pytest.raises(Exception):
            with safe_open(str(path), "pt") as f:
                for k in f.keys():
                    f.get_tensor(k)


def test_baked_output_opens_with_safetensors(scene):
    out = scene.dir / "out.safetensors"
    assert cli(["bake", "--base", str(LYCORIS.base_file), "--adapter", f"{LYCORIS.adapter}:0.5", "--out",
                str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        assert sorted(f.keys()) == sorted(load_file(str(LYCORIS.base_file)))


# ------------------------------------------------------------------------------------------------ deep / hostile JSON
def test_deep_adapter_config_json_is_refused(scene, capsys):
    d = scene.add(PEFT.adapter, "peft")
    (d / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    scene.snapshot()
    scene.refused(["inspect", d], capsys, str(d / "adapter_config.json"), "nested too deeply")


@pytest.mark.parametrize("field,value,words", [
    ("num_cayley_neumann_terms", '"abc"', 'expected an integer from 1 to 64 (PEFT: int, default 5), found "abc"'),
    ("num_cayley_neumann_terms", "null", "found null"),
    ("num_cayley_neumann_terms", "1e400", "found Infinity"),
    ("num_cayley_neumann_terms", "2000000000", "found 2000000000"),
    ("num_cayley_neumann_terms", "100000", "found 100000"),
    ("eps", '"small"', 'eps: expected a finite number ≥ 0 (PEFT: float, default 6e-05), found "small"'),
    ("eps", "null", "eps: expected a finite number"),
    ("use_cayley_neumann", '"false"', 'use_cayley_neumann: expected true or false (PEFT: bool), found "false"'),
    ("coft", "1", "coft: expected true or false"),
    ("oft_block_size", "4", "says oft_block_size 4, but layer"),
    ("oft_block_size", '"8"', "oft_block_size: expected an integer ≥ 0"),
    ("r", "-1", "r: expected an integer ≥ 0"),
])
def test_peft_config_field_of_wrong_type_or_range(scene, capsys, field, value, words):
    d = scene.add(PEFT.adapter, "peft")
    cfg_path = d / "adapter_config.json"
    text = json.dumps(json.loads(cfg_path.read_text()) | {field: "@@"}).replace('"@@"', value)
    cfg_path.write_text(text)
    out = scene.dir / "out"
    line = scene.refused(["convert", d, "--to", "peft", "--out", out], capsys, str(cfg_path), words, out=out)
    assert field in line


def test_peft_r_disagreeing_with_the_tensors(scene, capsys):
    d = scene.add(PEFT.adapter, "peft")
    cfg = json.loads((d / "adapter_config.json").read_text())
    stored = load_file(str(d / "adapter_model.safetensors"))
    blocks = next(iter(stored.values())).shape[0]
    cfg.update(r=blocks * 2, oft_block_size=0)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    scene.refused(["inspect", d], capsys, f"says r {blocks * 2}", f"holds {blocks} blocks", "disagree")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8])
def test_integer_generators_are_refused(scene, capsys, dtype):
    path = scene.track(kohya_file(scene.dir / "int.safetensors", torch.zeros(8, 40, 40, dtype=dtype)))
    scene.refused(["inspect", path], capsys, str(path), "expected a floating point dtype", ".oft_blocks")
    d = scene.add(PEFT.adapter, "peft")
    model = d / "adapter_model.safetensors"
    save_file({k: v.to(dtype) for k, v in load_file(str(model)).items()}, str(model))
    scene.refused(["inspect", d], capsys, str(model), "expected a floating point dtype", "oft_R.weight")


# ------------------------------------------------------------------------------------------------ alpha
@pytest.mark.parametrize("alpha,words", [(float("nan"), "constraint (alpha): expected a finite number ≥ 0, found nan"),
                                         (float("inf"), "expected a finite number ≥ 0, found inf"),
                                         (3e38, "constraint (alpha): expected at most")])
def test_alpha_nan_and_overflow_refused_alike_in_kohya_and_lycoris(scene, capsys, alpha, words):
    kohya = scene.track(kohya_file(scene.dir / "kohya.safetensors", torch.zeros(8, 40, 40), alpha=alpha))
    k_line = scene.refused(["inspect", kohya], capsys, str(kohya), words)
    sd = load_file(str(LYCORIS.adapter))
    for k in sd:
        if k.endswith(".alpha"):
            sd[k] = torch.tensor(alpha, dtype=torch.float32)
    lyco = scene.dir / "lyco.safetensors"
    save_file(sd, str(lyco))
    scene.track(lyco)
    l_line = scene.refused(["inspect", lyco], capsys, str(lyco), words)
    def words_of(line):  # after the file and layer names, without the numbers (the layers' widths differ)
        return re.sub(r"[-+.\de]+\b", "N", line.split(": ", 3)[-1])
    assert words_of(k_line) == words_of(l_line)


def test_lycoris_alpha_zero_and_negative_still_mean_no_constraint(tmp_path):
    sd = load_file(str(LYCORIS.adapter))
    for alpha in (0.0, -1.0):
        for k in sd:
            if k.endswith(".alpha"):
                sd[k] = torch.tensor(alpha)
        path = tmp_path / f"a{alpha}.safetensors"
        save_file(sd, str(path))
        assert all(layer.constraint.kind == "none" for layer in load_adapter(path))


# ------------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize("text,words", [("nan", "expected a finite number, found nan"),
                                        ("inf", "expected a finite number, found inf"),
                                        ("-inf", "expected a finite number, found -inf"),
                                        ("1e30", "expected a number from -1000 to 1000, found 1e+30")])
@pytest.mark.parametrize("mode", ["kohya", "orthogonal"])
def test_non_finite_or_huge_strength_is_refused(scene, capsys, text, words, mode):
    adapter = scene.add(LYCORIS.adapter)
    base = scene.add(LYCORIS.base_file)
    out = scene.dir / "out.safetensors"
    scene.refused(["bake", "--base", base, "--adapter", f"{adapter}:{text}", "--out", out, "--strength-mode", mode],
                  capsys, str(adapter), "strength", words, out=out)
    with pytest.raises(OFTError, match="strength"):
        from oft_core.bake import bake

        bake(base, [(adapter, float(text))], out, mode=mode)
    assert not out.exists()


@pytest.mark.parametrize("spec,words", [("default=1e300", "multiplier: expected a number from -1000 to 1000"),
                                        ("default=nan", "expected a finite number"),
                                        ("input=inf", "expected a finite number"),
                                        ("default=100", "× block multiplier 100"),
                                        (f"double:{'9' * 5000}=1", "block index of 5000 digits"),
                                        (f"double:1-{'9' * 5000}=1", "block index of 5000 digits"),
                                        (f"input={'1' * 5000}", "multiplier: expected a finite number")])
def test_block_spec_numbers(scene, capsys, spec, words):
    adapter = scene.add(LYCORIS.adapter)
    base = scene.add(LYCORIS.base_file)
    out = scene.dir / "out.safetensors"
    strength = "20" if "100" in spec else "1"
    line = scene.refused(["bake", "--base", base, "--adapter", f"{adapter}:{strength}", "--blocks", spec, "--out",
                          out], capsys, words, out=out)
    assert len(line) < 400  # a 5000-digit input is not echoed whole


def test_merge_weights_must_be_finite(scene, capsys):
    a = scene.add(LYCORIS.adapter)
    out = scene.dir / "out.safetensors"
    for bad in ("nan", "inf"):
        scene.refused(["merge", f"{a}:{bad}", f"{a}:1", "--out", out], capsys, str(a), "weight", "finite", out=out)


def _fp16_overflow_pair(d: Path) -> tuple[Path, Path, str]:
    """An fp16 base whose weight is near fp16's largest value and a strong kohya adapter for it: strength 1 fits,
    strength 900 overflows fp16."""
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    g = torch.Generator().manual_seed(0)
    w = (torch.rand(40, 40, generator=g) * 2 - 1) * 2000
    other = torch.full((8,), float("inf"), dtype=torch.float16)  # an Inf the base already has: copied as it is
    base = d / "fp16_base.safetensors"
    save_file({key: w.to(torch.float16), "model.diffusion_model.other": other}, str(base))
    adapter = kohya_file(d / "strong.safetensors", 0.3 * torch.randn(4, 10, 10, generator=g), alpha=1e3)
    return base, adapter, key


def test_a_weight_that_would_overflow_is_never_written(scene, capsys):
    base, adapter, key = _fp16_overflow_pair(scene.dir)
    scene.track(base)
    scene.track(adapter)
    out = scene.dir / "out.safetensors"
    scene.refused(["bake", "--base", base, "--adapter", f"{adapter}:900", "--out", out], capsys, str(adapter),
                  KOHYA_LAYER, key, "NaN or Inf", "overflows", out=out)
    assert cli(["bake", "--base", str(base), "--adapter", f"{adapter}:1", "--out", str(out)]) == 0
    baked = load_file(str(out))
    assert torch.isfinite(baked[key]).all() and not torch.equal(baked[key], load_file(str(base))[key])
    assert torch.isinf(baked["model.diffusion_model.other"]).all()  # the base's own Inf kept


def test_a_weight_that_would_overflow_in_its_own_dtype_after_fp32_math(scene, capsys):
    """Two adapters on one weight take the fp32 path: the overflow happens when rounding back to fp16."""
    base, adapter, key = _fp16_overflow_pair(scene.dir)
    scene.track(base)
    scene.track(adapter)
    out = scene.dir / "out.safetensors"
    scene.refused(["bake", "--base", base, "--adapter", f"{adapter}:300", "--adapter", f"{adapter}:300", "--out",
                   out], capsys, "NaN or Inf", out=out)


# ------------------------------------------------------------------------------------------------ --overwrite
def test_bake_over_its_adapter_is_refused_even_with_overwrite(scene, capsys):
    adapter = scene.add(LYCORIS.adapter)
    base = scene.add(LYCORIS.base_file)
    scene.refused(["bake", "--base", base, "--adapter", adapter, "--out", adapter, "--overwrite"], capsys,
                  str(adapter), "over one of this command's inputs")


def test_convert_over_its_input_is_refused_even_with_overwrite(scene, capsys):
    adapter = scene.add(LYCORIS.adapter)
    scene.refused(["convert", adapter, "--to", "lycoris", "--out", adapter, "--overwrite"], capsys,
                  "over one of this command's inputs")
    peft = scene.add(PEFT.adapter, "peft")
    scene.refused(["convert", peft, "--to", "peft", "--out", peft, "--overwrite"], capsys,
                  "over one of this command's inputs")
    scene.refused(["convert", peft, "--to", "peft", "--out", peft / ".." / "peft", "--overwrite"], capsys,
                  "over one of this command's inputs")
    scene.refused(["convert", peft, "--to", "peft", "--out", peft / "adapter_model.safetensors", "--overwrite"],
                  capsys, "over one of this command's inputs")
    scene.refused(["convert", peft, "--to", "kohya", "--out", peft / "adapter_model.safetensors", "--overwrite"],
                  capsys, "over one of this command's inputs")  # checked before the conversion's own refusal


def test_links_to_inputs_are_never_replaced(scene, capsys):
    adapter = scene.add(LYCORIS.adapter)
    base = scene.add(LYCORIS.base_file)
    sym = scene.dir / "sym.safetensors"
    sym.symlink_to(adapter)
    hard = scene.dir / "hard.safetensors"
    os.link(base, hard)
    for out, words in ((sym, "over one of this command's inputs"), (hard, "hard link")):
        scene.refused(["bake", "--base", base, "--adapter", adapter, "--out", out, "--overwrite"], capsys, str(out),
                      words)
    # a link to something that is not an input is not replaced either: --overwrite replaces a regular file only
    other = scene.dir / "other.safetensors"
    other.write_bytes(b"someone else's")
    scene.track(other)
    link = scene.dir / "link.safetensors"
    link.symlink_to(other)
    scene.refused(["bake", "--base", base, "--adapter", adapter, "--out", link, "--overwrite"], capsys,
                  "symbolic link")
    dangling = scene.dir / "dangling.safetensors"
    dangling.symlink_to(scene.dir / "nowhere")
    scene.refused(["bake", "--base", base, "--adapter", adapter, "--out", dangling], capsys, "symbolic link")


def test_overwrite_replaces_only_what_the_command_could_have_written(scene, capsys):
    adapter = scene.add(LYCORIS.adapter)
    base = scene.add(LYCORIS.base_file)
    folder = scene.dir / "folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    scene.track(folder / "keep.txt")
    scene.refused(["bake", "--base", base, "--adapter", adapter, "--out", folder, "--overwrite"], capsys,
                  "not a regular file")
    scene.refused(["convert", adapter, "--to", "kohya", "--out", folder, "--overwrite"], capsys, "not a regular file")
    peft = scene.add(PEFT.adapter, "peft")
    scene.refused(["convert", peft, "--to", "peft", "--out", folder, "--overwrite"], capsys, "holds 'keep.txt'")
    # a PEFT adapter folder holding nothing else is replaced, a regular file too
    target = scene.dir / "peft_out"
    assert cli(["convert", str(peft), "--to", "peft", "--out", str(target)]) == 0
    assert cli(["convert", str(peft), "--to", "peft", "--out", str(target)]) == 2
    assert cli(["convert", str(peft), "--to", "peft", "--out", str(target), "--overwrite"]) == 0
    assert sorted(os.listdir(target)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert len(load_adapter(target)) == len(load_adapter(peft))
    (target / "notes.txt").write_text("x")
    scene.refused(["convert", peft, "--to", "peft", "--out", target, "--overwrite"], capsys, "holds 'notes.txt'")
    out = scene.dir / "out.safetensors"
    out.write_bytes(b"old")
    assert cli(["bake", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes() != b"old"
    assert not [n for n in os.listdir(scene.dir) if n.startswith(".oft-")]


# ------------------------------------------------------------------------------------------------ output folder
def test_missing_output_folder(scene, capsys):
    adapter = scene.add(LYCORIS.adapter)
    base = scene.add(LYCORIS.base_file)
    out = scene.dir / "no" / "such" / "out.safetensors"
    scene.refused(["bake", "--base", base, "--adapter", adapter, "--out", out], capsys, str(scene.dir / "no" / "such"),
                  "output folder does not exist")
    scene.refused(["convert", adapter, "--to", "kohya", "--out", out], capsys, "output folder does not exist")


def _fail_opens_in(monkeypatch, folder: Path, err: int):
    """The folder refuses new files (what a read-only folder does for a user who is not root: tests run as root)."""
    import oft_core.publish as publish

    real_open = os.open

    def fake_open(path, flags, *a, **k):
        p = os.fspath(path)
        if (flags & (os.O_WRONLY | os.O_RDWR | getattr(os, "O_TMPFILE", 0))) and (
                p == str(folder) or os.path.dirname(p) == str(folder)):
            raise OSError(err, os.strerror(err), p)
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(publish.os, "open", fake_open)
    monkeypatch.setattr(publish.os, "mkdir", lambda p, *a, **k: (_ for _ in ()).throw(OSError(err, os.strerror(err),
                                                                                               p)))


@pytest.mark.parametrize("err,words", [(errno.EACCES, "not writable (Permission denied)"),
                                       (errno.EROFS, "not writable (Read-only file system)")])
def test_read_only_output_folder(scene, capsys, monkeypatch, err, words):
    adapter = scene.add(LYCORIS.adapter)
    base = scene.add(LYCORIS.base_file)
    peft = scene.add(PEFT.adapter, "peft")
    _fail_opens_in(monkeypatch, scene.dir, err)
    out = scene.dir / "out.safetensors"
    scene.refused(["bake", "--base", base, "--adapter", adapter, "--out", out], capsys, f"{scene.dir}: ", words,
                  out=out)
    scene.refused(["convert", adapter, "--to", "lycoris", "--out", out], capsys, words, out=out)
    scene.refused(["convert", peft, "--to", "peft", "--out", scene.dir / "p"], capsys, words)


def _disk_full_after(monkeypatch, limit: int):
    """Writes to the output fail with ENOSPC once `limit` bytes are written (a full disk)."""
    import oft_core.publish as publish

    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > limit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(publish.os, "fdopen", lambda *a, **k: Full(real_fdopen(*a, **k)))


@pytest.mark.parametrize("tmpfile", [True, False], ids=["O_TMPFILE", "named-temp"])
def test_disk_full_mid_write(scene, capsys, monkeypatch, tmpfile):
    import oft_core.publish as publish

    monkeypatch.setattr(publish, "_tmpfile_supported", lambda: tmpfile)
    adapter = scene.add(LYCORIS.adapter)
    base = scene.add(LYCORIS.base_file)
    _disk_full_after(monkeypatch, os.path.getsize(base) // 2)
    out = scene.dir / "out.safetensors"
    scene.refused(["bake", "--base", base, "--adapter", adapter, "--out", out], capsys, str(out),
                  "no space left on the device", "nothing was written", out=out)
    _disk_full_after(monkeypatch, 100)
    scene.refused(["convert", adapter, "--to", "kohya", "--out", out], capsys, "no space left", out=out)


# ------------------------------------------------------------------------------------------------ CLI contract
def test_unexpected_internal_errors_keep_their_traceback(monkeypatch):
    bake_mod = sys.modules["oft_core.bake"]

    monkeypatch.setattr(bake_mod, "_bake", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        cli(["bake", "--base", str(LYCORIS.base_file), "--adapter", str(LYCORIS.adapter), "--out", "/tmp/x-oft-bug"])


def test_a_real_process_prints_one_line_and_exits_2(scene):
    adapter = scene.add(LYCORIS.adapter)
    base = scene.add(LYCORIS.base_file)
    out = scene.dir / "out.safetensors"
    proc = subprocess.run([sys.executable, "-m", "oft_core", "bake", "--base", str(base), "--adapter",
                           f"{adapter}:nan", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: {adapter}: strength given after the file name: expected a finite number")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ kill, concurrency
_BAKE_SCRIPT = r"""
import os, sys, time
sys.path.insert(0, {repo!r})
import oft_core.publish as publish
if {named}:
    publish._tmpfile_supported = lambda: False
from oft_core.bake import bake
state = {{"said": False}}
def progress(done, total):
    if not state["said"] and done >= total // 2:
        state["said"] = True
        print("HALF", done, total, flush=True)
        time.sleep(60)  # killed here, mid-write
bake({base!r}, [({adapter!r}, 1.0)], {out!r}, progress=progress, show_progress=False)
print("DONE", flush=True)
"""


def _padded_base(d: Path, mib: int) -> Path:
    """The tiny FLUX base padded to `mib` MiB with untouched tensors (written fast: zeros)."""
    from oracle import FIXTURES

    sd = load_file(str(FIXTURES / "kohya" / "flux_tiny_base.safetensors"))
    for i in range(mib):
        sd[f"zz_padding.{i:03}"] = torch.zeros(256 * 1024, dtype=torch.float32)  # 1 MiB each
    path = d / f"base_{mib}mib.safetensors"
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def big_base(tmp_path_factory) -> Path:
    """~300 MB: the kill test's base."""
    return _padded_base(tmp_path_factory.mktemp("big"), 300)


@pytest.fixture(scope="module")
def mid_base(tmp_path_factory) -> Path:
    """~40 MB: the concurrency test's base (the race at the publish step itself is forced in the next test)."""
    return _padded_base(tmp_path_factory.mktemp("mid"), 40)


def _tmpfile_of(pid: int, folder: Path) -> int:
    """Bytes written so far to the unnamed O_TMPFILE file the process holds in `folder` (0 when none)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder) + "/#") or (target.startswith(str(folder)) and "(deleted)" in target):
            return os.stat(f"/proc/{pid}/fd/{fd}").st_size
    return 0


@pytest.mark.parametrize("named", [False, True], ids=["O_TMPFILE", "named-temp"])
def test_sigkill_mid_write_leaves_nothing(tmp_path, big_base, named):
    from oracle import FIXTURES

    if not named and not sys.platform.startswith("linux"):
        pytest.skip("O_TMPFILE is Linux only")
    adapter = FIXTURES / "kohya" / "flux_tiny_oft_attn_dim4.safetensors"
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "baked.safetensors"
    before = digest(big_base)
    script = _BAKE_SCRIPT.format(repo=str(REPO), named=named, base=str(big_base), adapter=str(adapter), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("HALF"), (line, proc.stderr.read() if proc.poll() is not None else "")
        done, total = map(int, line.split()[1:])
        if named:
            leftovers = [n for n in os.listdir(folder) if n.startswith(".oft-tmp-")]
            assert len(leftovers) == 1 and os.path.getsize(folder / leftovers[0]) >= done  # really mid-write
        else:
            assert os.listdir(folder) == [] and done <= _tmpfile_of(proc.pid, folder) < total + 10_000
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert digest(big_base) == before
    if named:
        # the named temp of the killed run is left (no process can remove its own file after SIGKILL) and swept by
        # the next run in that folder
        assert [n for n in os.listdir(folder) if n.startswith(".oft-tmp-")]
        assert cli(["convert", str(adapter), "--to", "kohya", "--out", str(folder / "next.safetensors")]) == 0
        assert os.listdir(folder) == ["next.safetensors"]
    else:
        assert os.listdir(folder) == []


def test_two_bakes_to_one_output(tmp_path, mid_base):
    """Started together: exactly one succeeds, the other refuses clearly, and the output is one valid file."""
    from oracle import FIXTURES

    adapter = FIXTURES / "kohya" / "flux_tiny_oft_attn_dim4.safetensors"
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "baked.safetensors"
    cmd = [sys.executable, "-m", "oft_core", "bake", "--base", str(mid_base), "--adapter", str(adapter), "--out",
           str(out), "--no-progress"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 2], results
    _, _, err = next(r for r in results if r[0] == 2)
    assert err.count("\n") == 1 and "Traceback" not in err and str(out) in err, err
    assert "output exists" in err or "output appeared while this run was writing it" in err, err
    assert os.listdir(folder) == ["baked.safetensors"]
    baked = load_file(str(out))
    ref = tmp_path / "reference.safetensors"  # the same bake alone: the survivor is exactly it, not a mix of two
    from oft_core.bake import bake

    changed = bake(mid_base, [(adapter, 1.0)], ref, show_progress=False).tensors_changed
    expected = load_file(str(ref))
    assert baked.keys() == expected.keys() and all(torch.equal(baked[k], expected[k]) for k in baked)
    base_sd = load_file(str(mid_base))
    # the adapter's layers are baked in (one of its fixture layers is the identity: 7 of the 8 weights change)
    assert 0 < sum(not torch.equal(baked[k], base_sd[k]) for k in base_sd) <= changed


def test_two_writers_racing_at_the_publish_step(tmp_path, monkeypatch):
    """The check at the start passes for both, the second publish finds the name taken: refused, nothing replaced
    (forced deterministically: the other run publishes while this one writes)."""
    import oft_core.publish as publish

    out = tmp_path / "out.safetensors"
    real = publish._check_output
    calls = []

    def check_then_race(*a, **k):
        r = real(*a, **k)
        if not calls:
            calls.append(1)
            out.write_bytes(b"the other run's file")
        return r

    monkeypatch.setattr(publish, "_check_output", check_then_race)
    with pytest.raises(OFTError, match="output appeared while this run was writing it"):
        publish._publish_file(out, lambda f: f.write(b"mine"))
    assert out.read_bytes() == b"the other run's file" and os.listdir(tmp_path) == ["out.safetensors"]
    calls.clear()
    target = tmp_path / "dir"
    monkeypatch.setattr(publish, "_check_output",
                        lambda *a, **k: (real(*a, **k), calls or (calls.append(1), target.mkdir(),
                                                                   (target / "x").write_text("other")))[0])
    with pytest.raises(OFTError, match="output appeared while this run was writing it"):
        publish._publish_dir(target, lambda d: Path(d, "adapter_config.json").write_text("{}"))
    assert os.listdir(target) == ["x"] and sorted(os.listdir(tmp_path)) == ["dir", "out.safetensors"]


def test_sweep_removes_only_leftovers_of_dead_processes(tmp_path):
    import oft_core.publish as publish

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".oft-tmp-{dead.pid}-abcdef.tmp").write_bytes(b"partial")
    (tmp_path / f".oft-tmp-{dead.pid}-abcdef.d").mkdir()
    live = tmp_path / f".oft-tmp-{os.getpid()}-123456.tmp"
    live.write_bytes(b"in progress")
    (tmp_path / ".oft-tmp-not-a-pid.tmp").write_bytes(b"not ours")
    # the first versions' bake left `.oft-bake-XXXXXXXX.tmp` (mkstemp) when killed: day-old regular files go
    day_old = time.time() - 24 * 3600 - 60
    stale = tmp_path / ".oft-bake-ab12_xyz.tmp"
    stale.write_bytes(b"partial of a killed bake")
    os.utime(stale, (day_old, day_old))
    fresh = tmp_path / ".oft-bake-cd34_xyz.tmp"  # may still be written by a running bake
    fresh.write_bytes(b"in progress")
    old_dir = tmp_path / ".oft-bake-ef56_xyz.tmp"  # not what a bake made: left alone
    old_dir.mkdir()
    os.utime(old_dir, (day_old, day_old))
    target = tmp_path / "precious.safetensors"
    target.write_bytes(b"user file")
    old_link = tmp_path / ".oft-bake-gh78_xyz.tmp"  # a link: never followed, never removed
    old_link.symlink_to(target)
    os.utime(old_link, (day_old, day_old), follow_symlinks=False)
    publish._sweep(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, ".oft-tmp-not-a-pid.tmp", fresh.name, old_dir.name,
                                                   old_link.name, target.name])
    assert target.read_bytes() == b"user file"


def test_strength_zero_bake_is_still_bit_exact(tmp_path):
    out = tmp_path / "zero.safetensors"
    assert cli(["bake", "--base", str(LYCORIS.base_file), "--adapter", f"{LYCORIS.adapter}:0", "--out", str(out)]) == 0
    a, b = load_file(str(LYCORIS.base_file)), load_file(str(out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o666 & ~_umask())  # an ordinary file, not mkstemp's 0600


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
