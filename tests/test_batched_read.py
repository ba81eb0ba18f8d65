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


# ------------------------------------------------------------------------------------------ header read at once
# read_header has three ways to the same entries: safetensors' compact form by one regex split (`_canonical`), any
# other JSON by json.loads + all entries at once (`_entries_at_once`), and one by one (`_entries_one_by_one`, which
# names the first bad entry). Each variant below goes through read_header and through json.loads + one by one.

import json as _json  # noqa: E402
import struct as _struct  # noqa: E402

from oft_core import safetensors_io  # noqa: E402
from oft_core.safetensors_io import (  # noqa: E402
    _canonical,
    _entries_at_once,
    _entries_one_by_one,
    _FileTensors,
    _stack_values,
    read_header,
)


def _raw_file(path, header_text: str, data: bytes):
    raw = header_text.encode("utf-8")
    path.write_bytes(_struct.pack("<Q", len(raw)) + raw + data)
    return path


def _reference(path):
    """What json.loads and the one-by-one checks make of the file (entries, metadata), or the error text."""
    blob = path.read_bytes()
    (n,) = _struct.unpack("<Q", blob[:8])
    try:
        header = _json.loads(blob[8:8 + n])
        metadata = header.pop("__metadata__", None) or {}
        return _entries_one_by_one(header, len(blob) - 8 - n, str(path)), metadata
    except Exception as e:  # noqa: BLE001
        return type(e).__name__


_ENTRIES = {"b.alpha": ("F32", [], [0, 4]), "b.oft_blocks": ("F32", [2, 2, 2], [4, 36]), "a": ("BF16", [3], [36, 42])}


def _compact(entries=_ENTRIES, metadata=None, **dumps):
    h = {} if metadata is None else {"__metadata__": metadata}
    h.update({k: {"dtype": d, "shape": s, "data_offsets": o} for k, (d, s, o) in entries.items()})
    return _json.dumps(h, separators=(",", ":"), **dumps)


VARIANTS = {
    "compact": _compact(),
    "compact with metadata": _compact(metadata={"k": "v", "q": 'a "quoted" \\ value\n', "é": "ü"}),
    "compact, trailing spaces": _compact() + "    ",
    "pretty printed": _json.dumps(_json.loads(_compact()), indent=2),
    "spaces after separators": _json.dumps(_json.loads(_compact(metadata={"k": "v"}))),
    "escaped key": _compact({"a\"b": ("F32", [], [0, 4]), "c\\u00e9": ("F32", [2], [4, 12])}),
    "unicode key": _compact({"é.alpha": ("F32", [], [0, 4]), "ü": ("F32", [2], [4, 12])}, ensure_ascii=False),
    "metadata last": _compact()[:-1] + ',"__metadata__":{"k":"v"}}',
    "metadata null": '{"__metadata__":null,' + _compact()[1:],
    "repeated key (JSON keeps the last)": _compact()[:-1] + ',"a":{"dtype":"U8","shape":[6],"data_offsets":[36,42]}}',
    "leading zero offset": _compact().replace("[4,36]", "[04,36]"),
    "negative offset": _compact().replace("[4,36]", "[-4,36]"),
    "float dim": _compact().replace("[2,2,2]", "[2,2.0,2]"),
    "21-digit offset": _compact().replace("[4,36]", "[4," + "9" * 21 + "]"),
    "20-digit offset": _compact().replace("[4,36]", "[4," + "9" * 20 + "]"),
    "gap": _compact().replace("[36,42]", "[38,44]"),
    "overlap": _compact().replace("[4,36]", "[2,34]"),
    "unknown dtype": _compact().replace('"BF16"', '"F12"'),
    "wrong length": _compact().replace("[36,42]", "[36,41]"),
    "missing comma": _compact().replace('},"b.oft', '}"b.oft'),
    "control character in key": _compact({"a\tb": ("F32", [], [0, 4]), "c": ("F32", [2], [4, 12])}).replace(
        "\\t", "\t"),
    "no tensors": '{"__metadata__":{"k":"v"}}',
    "extra field": _compact().replace('"dtype":"BF16"', '"dtype":"BF16","x":1'),
}


@pytest.mark.parametrize("case", list(VARIANTS))
def test_header_variants_read_as_json_and_the_entry_rules_say(tmp_path, case):
    data_size = 44 if case == "gap" else 12 if case in ("escaped key", "unicode key") else 42
    path = _raw_file(tmp_path / "h.safetensors", VARIANTS[case], bytes(range(data_size)))
    expected = _reference(path)
    try:
        header = read_header(path)
        got = (header.tensors, header.metadata)
        # what the compact form's check knew on the way (or what the entries say) = the entries' own figures
        assert header.dtypes == {ti.dtype for ti in header.tensors.values()}, case
        assert header.data_end == max((ti.end for ti in header.tensors.values()), default=0) == data_size, case
    except OFTError as e:
        got = str(e)
        assert str(path) in got  # a refusal names the file
    if isinstance(expected, str):  # json.loads or the one-by-one check refuses: so does read_header
        assert isinstance(got, str), (case, got)
    else:
        assert got == expected and list(got[0]) == list(expected[0]), case  # the same entries, in the same order


def test_compact_form_is_read_without_json_and_equals_it(tmp_path):
    """The regex split is really taken for safetensors' own form, and gives what json.loads gives."""
    text = _compact(metadata={"ss_network_module": "networks.oft", "q": 'a "b" \\ c'})
    result = _canonical(text.encode(), 42)
    assert result is not None
    entries, metadata, dtypes = result
    assert dtypes == {"F32", "BF16"}
    reference = _json.loads(text)
    assert metadata == reference.pop("__metadata__")
    assert entries == _entries_one_by_one(reference, 42, "x") == _entries_at_once(reference, 42)
    assert entries["b.oft_blocks"].shape == (2, 2, 2) and entries["a"].start == 36
    for case in ("pretty printed", "repeated key (JSON keeps the last)", "metadata last", "leading zero offset",
                 "missing comma", "gap", "unknown dtype"):
        assert _canonical(VARIANTS[case].encode(), 42) is None, case  # left to json.loads and the checks


@pytest.mark.parametrize("case", list(VARIANTS))
def test_header_split_in_chunks_reads_as_split_whole(tmp_path, monkeypatch, case):
    """`_canonical` splits the header in chunks of about `_CHUNK` characters cut where an entry ends; with a chunk of
    one character (a cut after every entry) every variant reads as with one chunk, and as json.loads says."""
    data_size = 44 if case == "gap" else 12 if case in ("escaped key", "unicode key") else 42
    whole = _canonical(VARIANTS[case].encode(), data_size)
    monkeypatch.setattr(safetensors_io, "_CHUNK", 1)
    assert _canonical(VARIANTS[case].encode(), data_size) == whole, case
    test_header_variants_read_as_json_and_the_entry_rules_say(tmp_path, case)


def test_a_cut_inside_a_key_goes_to_json_and_reads_the_same(tmp_path, monkeypatch):
    """A key holding `]},` looks like an entry's end to the chunk cut: that chunk is no whole entries, so the header
    goes to json.loads, with the same result; one chunk reads it by the split."""
    entries = {"x]},": ("F32", [], [0, 4]), "y": ("F32", [2], [4, 12]), "z": ("F32", [], [12, 16])}
    text = _compact(entries, metadata={"k": "v"})
    path = _raw_file(tmp_path / "k.safetensors", text, bytes(16))
    whole = _canonical(text.encode(), 16)
    assert whole is not None and list(whole[0]) == list(entries)
    monkeypatch.setattr(safetensors_io, "_CHUNK", 1)
    assert _canonical(text.encode(), 16) is None
    header = read_header(path)
    assert (header.tensors, header.metadata) == _reference(path) == whole[:2]


def test_entries_at_once_declines_what_one_by_one_refuses():
    good = _json.loads(_compact())
    assert _entries_at_once(good, 42) == _entries_one_by_one(good, 42, "x")
    bad = {
        "bool dim": {"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
        "list dim": {"a": {"dtype": "F32", "shape": [[1]], "data_offsets": [0, 4]}},
        "float offset": {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}},
        "three offsets": {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]}},
        "entry a list": {"a": [1, 2]},
        "no dtype": {"a": {"shape": [1], "data_offsets": [0, 4]}},
        "dtype a number": {"a": {"dtype": 3, "shape": [1], "data_offsets": [0, 4]}},
        "huge offset": {"a": {"dtype": "F32", "shape": [1], "data_offsets": [2**64, 2**64 + 4]}},
        "huge shape": {"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}},
        "half a byte": {"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 1]}},
    }
    for case, header in bad.items():
        assert _entries_at_once(header, 4) is None, case
        with pytest.raises(OFTError):
            _entries_one_by_one(header, 4, "x")


def test_a_bool_or_float_dim_behind_an_equal_int_shape_is_declined_and_refused(tmp_path):
    """True == 1 == 1.0 and they hash alike: a second entry whose shape is [true] or [1.0] must not pass on the
    strength of a first entry's [1] (safetensors itself refuses such a file: "expected usize")."""
    for dim in (True, 1.0):
        header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                  "b": {"dtype": "F32", "shape": [dim], "data_offsets": [4, 8]}}
        assert _entries_at_once(header, 8) is None, dim
        with pytest.raises(OFTError, match="'b': expected a shape of integers"):
            _entries_one_by_one(header, 8, "x")
        path = tmp_path / f"dim_{type(dim).__name__}.safetensors"
        _raw_file(path, _json.dumps(header), bytes(8))
        with pytest.raises(OFTError, match="'b': expected a shape of integers"):
            read_header(path)


# ------------------------------------------------------------------------------------------ FileTensors.stack


def test_stack_equals_torch_stack_for_every_layout(tmp_path):
    g = torch.Generator().manual_seed(2)
    tensors = {f"even{i:02d}": torch.randn(2, 3, generator=g) for i in range(5)}  # evenly spaced: a strided view
    tensors.update({f"odd{i:02d}": torch.randn(2, 3, generator=g) for i in range(4)})
    tensors["odd_gap"] = torch.randn(7, generator=g)  # makes the odd ones unevenly spaced: a gather
    tensors.update({f"h{i}": torch.randn(3, generator=g).half() for i in range(3)})
    tensors["e0"], tensors["e1"] = torch.zeros(0, 2), torch.zeros(0, 2)
    path = tmp_path / "s.safetensors"
    save_file(tensors, str(path))
    loaded = _FileTensors(read_header(path))
    for keys in ([f"even{i:02d}" for i in range(5)], ["odd03", "odd00", "odd02", "odd01"], ["even03"],
                 ["even01", "even01"], ["h2", "h0"], ["e0", "e1"]):
        got = _stack_values(loaded, keys)
        assert torch.equal(got, torch.stack([tensors[k] for k in keys])), keys
        assert torch.equal(got, _stack_values(dict(tensors), keys))
    with pytest.raises(ValueError, match="one dtype and shape"):
        loaded.stack(["even00", "h0"])
    assert dict(loaded.items()).keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_a_dtype_torch_cannot_read_is_refused_even_if_never_asked_for(tmp_path):
    path = _raw_file(tmp_path / "u.safetensors", _compact({"a.alpha": ("F32", [], [0, 4]),
                                                           "x": ("U16", [2], [4, 8])}), bytes(8))
    with pytest.raises(OFTError, match="'x' has dtype U16"):
        _FileTensors(read_header(path))


# ------------------------------------------------------------------------------------------ make_layers = make_layer

from oft_core.spec import Constraint, _make_layers, _tensor_facts  # noqa: E402


def _rows(gens, flags, constraints):
    n = len(gens)
    return dict(path="f.safetensors", names=[f"l{i}" for i in range(n)], keys=[f"k{i}" for i in range(n)],
                blocks=gens, finite=flags, constraints=constraints, sources=["kohya"] * n, side="out",
                transpose=True)


def _one_by_one(rows):
    out = []
    for i in range(len(rows["names"])):
        out.append(make_layer(path=rows["path"], name=rows["names"][i], key=rows["keys"][i],
                              blocks=_Blocks(rows["blocks"][i], rows["finite"][i]),
                              constraint=rows["constraints"][i], source=rows["sources"][i], side="out",
                              transpose=True))
    return out


def _same_layer(a, b):
    assert {k: v for k, v in vars(a).items() if k != "blocks"} == {
        k: v for k, v in vars(b).items() if k != "blocks"}
    assert len(a.blocks) == len(b.blocks) and all(
        x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a.blocks, b.blocks))


BAD_ROWS = {  # row 3 of 6 carries the bad value; the other rows are good
    "NaN flag": ((torch.zeros(2, 4, 4),), (False,), Constraint("norm_clamp", 1e-3), "contain NaN or Inf"),
    "NaN alpha": ((torch.zeros(2, 4, 4),), (True,), Constraint("norm_clamp", float("nan")), "finite number"),
    "negative alpha": ((torch.zeros(2, 4, 4),), (True,), Constraint("norm_clamp", -1.0), "finite number ≥ 0"),
    "alpha overflowing fp32": ((torch.zeros(2, 4, 4),), (True,), Constraint("norm_clamp", 3e38), "fit in float32"),
    "2-D blocks": ((torch.zeros(8, 4),), (True,), Constraint("norm_clamp", 1e-3), "3-D tensor of square blocks"),
    "non-square": ((torch.zeros(2, 4, 3),), (True,), Constraint("norm_clamp", 1e-3), "square blocks"),
    "no blocks": ((torch.zeros(0, 4, 4),), (True,), Constraint("norm_clamp", 1e-3), "at least one block"),
    "not a tensor": (([[0.0]],), (True,), Constraint("norm_clamp", 1e-3), "3-D tensor of square blocks"),
    "no split": ((), (), Constraint("norm_clamp", 1e-3), "no rotation blocks"),
    "flags missing": ((torch.zeros(2, 4, 4),), (), Constraint("norm_clamp", 1e-3), "finiteness flags"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_make_layers_refuses_exactly_as_make_layer(case):
    gen, flag, constraint, words = BAD_ROWS[case]
    good = Constraint("norm_clamp", 1e-3)
    gens = [(1e-3 * torch.randn(2, 4, 4),) for _ in range(6)]
    flags, constraints = [(True,)] * 6, [good] * 6
    gens[3], flags = gen, flags[:3] + [flag] + flags[4:]
    constraints = constraints[:3] + [constraint] + constraints[4:]
    rows = _rows(gens, flags, constraints)
    with pytest.raises((OFTError, ValueError), match=words) as batched:
        _make_layers(**rows)
    with pytest.raises((OFTError, ValueError), match=words) as single:
        _one_by_one(rows)
    assert str(batched.value) == str(single.value)
    if isinstance(batched.value, OFTError):
        assert "'k3'" in str(batched.value)  # the bad row, by its key


def _with_facts(rows):
    """`rows` with the generators' facts supplied, as the kohya reader supplies them for the views of one batch."""
    return {**rows, "facts": [_tensor_facts(gens[0]) for gens in rows["blocks"]]}


@pytest.mark.parametrize("case", [c for c in BAD_ROWS if c not in ("not a tensor", "no split")])
def test_make_layers_with_known_facts_refuses_exactly_as_make_layer(case):
    gen, flag, constraint, words = BAD_ROWS[case]
    good = Constraint("norm_clamp", 1e-3)
    gens = [(1e-3 * torch.randn(2, 4, 4),) for _ in range(6)]
    gens[3] = gen
    flags = [(True,)] * 3 + [flag] + [(True,)] * 2
    rows = _rows(gens, flags, [good] * 3 + [constraint] + [good] * 2)
    with pytest.raises((OFTError, ValueError), match=words) as batched:
        _make_layers(**_with_facts(rows))
    with pytest.raises((OFTError, ValueError), match=words) as single:
        _one_by_one(rows)
    assert str(batched.value) == str(single.value)


def test_make_layers_raises_the_first_bad_row_in_order():
    gens = [(torch.zeros(2, 4, 4),)] * 4 + [(torch.zeros(2, 4, 3),)] + [(torch.zeros(2, 4, 4),)] * 3
    flags = [(True,)] * 8
    flags[6] = (False,)  # a later row of the common signature is bad, an earlier row of its own signature too
    flags[2] = (False,)
    rows = _rows(gens, flags, [Constraint("norm_clamp", 1e-3)] * 8)
    with pytest.raises(OFTError, match="'k2'.*NaN or Inf"):
        _make_layers(**rows)
    with pytest.raises(OFTError, match="'k2'.*NaN or Inf"):
        _one_by_one(rows)


def test_make_layers_builds_what_make_layer_builds():
    g = torch.Generator().manual_seed(4)
    shared, other = Constraint("norm_clamp", 1e-3), Constraint("norm_clamp", 2e-3)
    gens = [(1e-3 * torch.randn(2, 4, 4, generator=g),) for _ in range(5)]
    gens += [(1e-3 * torch.randn(2, 4, 4, generator=g).half(),)]  # converted to fp32 by make_layer: built alone
    gens += [(1e-3 * torch.randn(1, 8, 8, generator=g, requires_grad=True),)]  # detached by make_layer
    gens += [(1e-3 * torch.randn(2, 4, 4, generator=g), 1e-3 * torch.randn(1, 4, 4, generator=g))]  # two splits
    constraints = [shared, shared, other, shared, None, shared, shared, other]
    rows = _rows(gens, [(True,) * len(x) for x in gens], constraints)
    rows["sources"] = ["kohya", "kohya", "kohya_flux", "kohya", "kohya", "kohya", "kohya", "kohya_flux"]
    batched, single = _make_layers(**rows), _one_by_one(rows)
    assert len(batched) == len(single) == 8
    for a, b in zip(batched, single):
        _same_layer(a, b)
    assert batched[4].constraint == Constraint()  # None became "no constraint", as in make_layer
    assert batched[1].blocks[0] is gens[1][0]  # built like the first row of its signature: the caller's tensor
    assert batched[5].blocks[0].dtype == torch.float32 and not batched[6].blocks[0].requires_grad
    one_split = {k: v[:7] if isinstance(v, list) else v for k, v in rows.items()}  # facts: one tensor per row
    for a, b in zip(_make_layers(**_with_facts(one_split)), single[:7]):
        _same_layer(a, b)
    with pytest.raises(ValueError, match="one item per layer"):
        _make_layers(**{**_with_facts(one_split), "facts": _with_facts(one_split)["facts"][:6]})


# ------------------------------------------------------------------------------------------ kohya: usual file path


def test_usual_kohya_file_reads_as_the_per_layer_loop(tmp_path):
    """The all-at-once path (one-dot keys, one .oft_blocks and a nonzero scalar .alpha per layer) gives the layers
    the per-layer loop gives: an ignored extra key sends the same layers through the loop."""
    _, tensors = _many(tmp_path, n=30)
    fast = tmp_path / "fast.safetensors"
    save_file(tensors, str(fast))
    slow = tmp_path / "slow.safetensors"
    save_file({**tensors, "other.weight": torch.zeros(3)}, str(slow))
    a, b = load_adapter(fast), load_adapter(slow)
    assert list(a.layers) == list(b.layers) and b.info["ignored_keys"] == ["other.weight"]
    for key in a.layers:
        _same_layer(a.layers[key], b.layers[key])
    assert a.layers[("unet", "layer007")].constraint is a.layers[("unet", "layer021")].constraint  # one per alpha


def test_bulk_leaves_what_it_made_collectable():
    import gc
    import weakref

    from oft_core.errors import _bulk

    class Node:
        pass

    with _bulk():
        a, b = Node(), Node()
        a.other, b.other = b, a  # a reference cycle only the cyclic collector frees
        ref = weakref.ref(a)
        assert not gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() == 0
    del a, b
    gc.collect()
    assert ref() is None


def test_describe_batched_figures_equal_the_per_layer_ones(tmp_path):
    """describe computes figures once per layout and norms / orthogonality errors in batches: per layer they are
    the numbers `rotation._stored_norms` and `rotation._orthogonality_error` give (layouts of several block sizes,
    dtypes, alphas, clamped layers, and FLUX split layers, which take the per-layer path)."""
    from collections import Counter

    from oft_core.rotation import _orthogonality_error, _stored_norms
    from oft_core.summary import describe

    g = torch.Generator().manual_seed(3)
    t = {}
    for i in range(40):
        k = f"oft_unet_down_blocks_0_attn1_to_q{i}" if i % 3 else f"oft_unet_x_in_layers_2_{i}"
        n, b = 1 + i % 2, 4 if i % 4 else 2
        t[k + ".oft_blocks"] = ((0.3 if i % 5 == 0 else 1e-3) * torch.randn(n, b, b, generator=g)).to(
            torch.float16 if i % 7 == 0 else torch.float32)
        t[k + ".alpha"] = torch.tensor(1e-3 if i % 6 else 0.01, dtype=torch.bfloat16 if i % 8 == 0 else torch.float32)
    for i in range(3):
        for s in range(2):
            t[f"oft_unet_double_blocks_{i}_img_attn_qkv.oft_blocks.{s}"] = 1e-2 * torch.randn(2, 4, 4, generator=g)
        t[f"oft_unet_double_blocks_{i}_img_attn_qkv.alpha"] = torch.tensor(1e-3)
    path = tmp_path / "mixed.safetensors"
    save_file(t, str(path))
    adapter = load_adapter(path)
    d = describe(adapter)
    assert len(d["per_layer"]) == len(adapter) == 43
    clamped = []
    for x, layer in zip(d["per_layer"], adapter):
        norms = _stored_norms(layer)
        assert x["name"] == layer.key and x["block_size"] == list(layer.block_sizes)
        assert x["num_blocks"] == list(layer.num_blocks) and x["params"] == layer.num_params()
        assert x["bound"] == [None if b is None else round(b, 6) for _, b in norms]
        for got, (norm, _) in zip(x["norm"], norms):
            assert got == pytest.approx(round(norm, 6), rel=1e-5, abs=2e-6)
        assert x["orthogonality_error"] == pytest.approx(_orthogonality_error(layer), abs=2e-6)
        assert x["clamped"] == any(b is not None and n > b for n, b in norms)
        if x["clamped"]:
            clamped.append(layer.key)
    assert d["clamped_layers"] == clamped and len(clamped) >= 5  # the 0.3-scale layers hit alpha 1e-3
    assert d["parameters"] == adapter.num_params()
    assert d["components"] == {"unet": 43}
    layouts = Counter((tuple(layer.num_blocks), tuple(layer.block_sizes)) for layer in adapter)
    assert [(tuple(x["num_blocks"]), tuple(x["block_size"]), x["layers"]) for x in d["block_layouts"]] == [
        (n, b, c) for (n, b), c in layouts.most_common()]
