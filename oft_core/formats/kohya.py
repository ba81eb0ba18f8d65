"""kohya sd-scripts `networks.oft` (SD1.x/2.x/SDXL) and `networks.oft_flux` (FLUX.1): reading and writing.

Keys: `oft_unet_<module path, "." -> "_">.oft_blocks` (num_blocks, b, b) and `.alpha` (scalar constraint);
FLUX fused layers store one tensor per split, `.oft_blocks.<i>` (a single-split FLUX layer has `.oft_blocks.0`).
Module paths are diffusers names for SD1/2, LDM names for SDXL, BFL names for FLUX. sd-scripts' `dim` is the number
of blocks. Split sizes are read from the tensors (split_i = blocks_i.shape[0] × blocks_i.shape[1]): sd-scripts
hard-codes FLUX.1 widths, which would be wrong for any other width.

Writing: the file holds output-side, exact-Cayley, diagonal-block layers of the UNet / transformer with one `.alpha`
for the whole file (sd-scripts builds every module with the first `.alpha` it reads). kohya has no "no constraint":
an unconstrained layer gets an alpha so large that the clamp never bites (checked, `_fits`); a constraint it cannot
express (PEFT COFT) is applied to Q and the layer written unclamped. Refused: input-side rotation, Cayley–Neumann,
block_share, BOFT, stored R (`oft_diag`), per-row rescale, text-encoder layers (sd-scripts adapts the UNet only),
splits without `flux`, FLUX splits of different block counts.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from itertools import repeat
from operator import is_, methodcaller
from typing import Iterable, Mapping, NamedTuple

import torch

from ..errors import OFTError
from ..rotation import _constrain, _skew
from ..safetensors_io import _DTYPE_SHAPE, _FileTensors, _Header, _stack_values
from ..spec import _FP32_MAX, Constraint, OFTAdapter, OFTLayer, _finite_each, _make_layers, _tensor_facts
from . import _write as w

log = logging.getLogger(__name__)

_PREFIX = "oft_unet_"
_BATCH_ELEMENTS = 1 << 22
_KEY = re.compile(r"^(oft_unet_.+?)\.(oft_blocks(?:\.(\d+))?|alpha)$")


def claims(header: _Header, config) -> bool:
    return any(k.startswith(_PREFIX) and ".oft_blocks" in k for k in header.tensors)


def _group(keys: Iterable[str], path: str) -> tuple[dict[str, list], list[str]]:
    """({layer key: [`.oft_blocks` key | None, {index: `.oft_blocks.<i>` key} | None, `.alpha` key | None]}, keys of
    no layer), by the grammar `_KEY`. A key with one dot, `oft_unet_<name>.oft_blocks` or `.alpha`, is split at its dot
    (what `_KEY` gives it: a name without a dot or newline has no shorter prefix the grammar could take); any other key
    goes through `_KEY` itself (a regex match per key was a fifth of a second for 200,000 keys)."""
    layers: dict[str, list] = {}
    ignored = []
    match = _KEY.match
    first = len(_PREFIX) + 1  # `.+?`: at least one character after the prefix
    for key in keys:
        head, _, tail = key.rpartition(".")
        if (tail == "oft_blocks" or tail == "alpha") and len(head) >= first and head.startswith(_PREFIX) \
                and "." not in head and "\n" not in head:
            index = 0 if tail == "oft_blocks" else 2
        else:
            m = match(key)
            if not m:
                if key.startswith(_PREFIX):
                    raise OFTError(f"unexpected key {key!r} in a kohya OFT file (expected <name>.oft_blocks[.<i>] "
                                   "and <name>.alpha)", path=path)
                ignored.append(key)
                continue
            head, part, number = m.group(1, 2, 3)
            if part != "alpha" and number is not None:  # `.oft_blocks.<i>`: a numbered split
                entry = layers.get(head)
                if entry is None:
                    entry = layers[head] = [None, None, None]
                if entry[1] is None:
                    entry[1] = {}
                entry[1][int(number)] = key
                continue
            index = 2 if part == "alpha" else 0
        entry = layers.get(head)
        if entry is None:
            entry = layers[head] = [None, None, None]
        entry[index] = key
    return layers, ignored


def _simple_keys(keys: list[str]) -> tuple[list[str], list[str], list[str]] | None:
    """(layer keys sorted, their `.alpha` keys, their `.oft_blocks` keys) when the file holds exactly
    `oft_unet_<name>.alpha` and `oft_unet_<name>.oft_blocks` for each layer, with one dot and no newline in every key
    (the usual file), decided for all keys at once; else None (`_group`, key by key). Sorted, each layer's two keys
    are neighbours (`.alpha` first): a key between them would have to start with `<name>.`, i.e. hold a second
    dot. Each key is split as `_group` splits it (its one-dot case), without a Python step per key."""
    ordered = sorted(keys)
    alpha_keys, block_keys = ordered[0::2], ordered[1::2]
    if (not keys or len(alpha_keys) != len(block_keys)
            or not all(map(methodcaller("endswith", ".alpha"), alpha_keys))
            or not all(map(methodcaller("endswith", ".oft_blocks"), block_keys))):
        return None
    names = [k[:-6] for k in alpha_keys]
    if names != [k[:-11] for k in block_keys]:
        return None
    joined = "".join(keys)
    if (joined.count(".") != len(keys) or "\n" in joined or min(map(len, names)) <= len(_PREFIX)
            or not all(map(methodcaller("startswith", _PREFIX), names))):
        return None
    return names, alpha_keys, block_keys


def _simple_rows(names: list[str], values: list, qs: list, finite: list, facts: list, source: str
                 ) -> "_Rows | None":
    """The rows `read`'s per-layer loop gives when every layer (`names`, sorted; the batched values aligned with
    them) has one well-shaped `.oft_blocks` and a nonzero scalar `.alpha` (the usual file), built for all layers at
    once; None for anything else (the loop, whose refusals come in key order)."""
    if any(map(is_, qs, repeat(None))) or None in values or 0.0 in values:  # 0.0 and -0.0: the loop keeps apart
        return None
    constraint_of = {v: Constraint("norm_clamp", v) for v in dict.fromkeys(values)}
    start = len(_PREFIX)
    return _Rows([key[start:] for key in names], names, [(q,) for q in qs], [(f,) for f in finite],
                 list(map(constraint_of.__getitem__, values)), [source] * len(names), facts)


def _by_layout(layouts: list) -> list:
    """Positions grouped by their `layouts` (first-seen order): a range when there is one layout (the usual file of
    one block size), without a dict operation per key when there are few."""
    if not layouts:
        return []
    if layouts.count(layouts[0]) == len(layouts):
        return [range(len(layouts))]
    distinct = list(dict.fromkeys(layouts))
    if len(distinct) <= 8:
        return [[i for i, lay in enumerate(layouts) if lay == want] for want in distinct]
    groups: dict = {}
    for i, lay in enumerate(layouts):
        groups.setdefault(lay, []).append(i)
    return list(groups.values())


def _batched_values(alpha_keys: list[str], block_keys: list[str], tensors: Mapping[str, torch.Tensor],
                    header: _Header) -> tuple[list, list, list, list]:
    """What the per-layer checks need of the tensors' values, computed for all layers of one layout at once, as
    lists aligned with the keys: each scalar `.alpha` as a float, each well-shaped `.oft_blocks` as Q = A − Aᵀ in
    fp32, whether that Q is finite, and that Q's `_tensor_facts` (one tuple per batch). The same values the
    per-layer ops give (elementwise ops, stacked); malformed tensors get None, for the per-layer checks to refuse in
    file order. Shapes and dtypes come from the header; values from `tensors` in batches (a `_FileTensors` stacks
    them without a tensor per key)."""
    info = header.tensors
    if isinstance(tensors, _FileTensors):
        def entries(keys):
            return list(map(info.__getitem__, keys))

        def layouts(keys, infos):
            return list(map(_DTYPE_SHAPE, infos))

        def stack(keys, infos):
            return tensors.stack_entries(infos)
    else:  # a plain mapping (the streamed skeleton: small tensors real, large ones on the meta device): per device
        def entries(keys):
            return list(map(info.__getitem__, keys))

        def layouts(keys, infos):
            return [(*ti[:2], tensors[k].device) for k, ti in zip(keys, infos)]

        def stack(keys, infos):
            return _stack_values(tensors, keys)
    alpha_values: list = [None] * len(alpha_keys)
    infos = entries(alpha_keys)
    for positions in _by_layout(layouts(alpha_keys, infos)):
        if math.prod(infos[positions[0]].shape) == 1:
            keys = [alpha_keys[i] for i in positions] if len(positions) < len(alpha_keys) else alpha_keys
            chosen = [infos[i] for i in positions] if len(positions) < len(alpha_keys) else infos
            values = stack(keys, chosen).reshape(len(keys)).float().tolist()  # exact: bf16 0.00099945... stays
            _scatter(alpha_values, positions, values)
    qs: list = [None] * len(block_keys)
    finite: list = [None] * len(block_keys)
    facts: list = [None] * len(block_keys)
    infos = entries(block_keys)
    for positions in _by_layout(layouts(block_keys, infos)):
        shape = infos[positions[0]].shape
        if len(shape) != 3 or shape[1] != shape[2]:
            continue
        step = max(1, _BATCH_ELEMENTS // max(1, math.prod(shape)))  # bounds the transient stacked copy
        for start in range(0, len(positions), step):
            chunk = positions[start:start + step]
            whole = len(chunk) == len(block_keys)
            q = _skew(stack(block_keys if whole else [block_keys[i] for i in chunk],
                           infos if whole else [infos[i] for i in chunk]).to(torch.float32))
            views = q.unbind(0)
            _scatter(qs, chunk, views)
            _scatter(finite, chunk, _finite_each(q))
            _scatter(facts, chunk, [_tensor_facts(views[0])] * len(views))  # one unbind: one type, shape, ...
    return alpha_values, qs, finite, facts


def _scatter(out: list, positions, values) -> None:
    if isinstance(positions, range) and len(positions) == len(out):
        out[:] = values
    else:
        for i, v in zip(positions, values):
            out[i] = v


def _split_order(key: str, splits: dict, path: str) -> list[int]:
    """The layer's split indices: [-1] (`.oft_blocks`) or 0..n−1 (`.oft_blocks.<i>`), never both."""
    if not splits:
        raise OFTError("has .alpha but no .oft_blocks", path=path, layer=key)
    if -1 in splits and len(splits) > 1:
        raise OFTError("mixes .oft_blocks with numbered .oft_blocks.<i> splits", path=path, layer=key)
    order = sorted(splits)
    if order != [-1] and order != list(range(len(order))):
        raise OFTError(f"split indices must be 0..{len(order) - 1}, found {order}", path=path, layer=key)
    return order


def _alpha(key: str, alpha: str | None, file_alpha: float | None, header: _Header) -> float:
    """The refusal for a layer whose `.alpha` value is not in the batch: none and no ss_network_alpha, or not a
    scalar; else the file's ss_network_alpha."""
    if alpha is None:
        if file_alpha is None:
            raise OFTError("no .alpha tensor and no ss_network_alpha metadata: the constraint is unknown",
                           path=header.path, layer=key)
        return file_alpha
    raise OFTError(f".alpha must be a scalar, found shape {tuple(header.tensors[alpha].shape)}", path=header.path,
                   layer=key)


def _bad_blocks(key: str, splits: dict, order: list[int], header: _Header) -> OFTError:
    i = next(i for i in order if not _square(header.tensors[splits[i]].shape))
    return OFTError(f".oft_blocks{'' if i < 0 else f'.{i}'}: expected (num_blocks, b, b), "
                    f"found {tuple(header.tensors[splits[i]].shape)}", path=header.path, layer=key)


def _square(shape) -> bool:
    return len(shape) == 3 and shape[1] == shape[2]


class _Rows(NamedTuple):
    """`_make_layers`' per-layer columns, filled in key order."""

    names: list
    keys: list
    blocks: list
    finite: list
    constraints: list
    sources: list
    facts: list | None = None  # `_tensor_facts` of each row's one generator, when `_batched_values` made them all

    def layers(self, path: str) -> list[OFTLayer]:
        return _make_layers(
            path=path,
            names=self.names,
            keys=self.keys,
            blocks=self.blocks,
            finite=self.finite,
            constraints=self.constraints,
            sources=self.sources,
            facts=self.facts,
            side="out",
            transpose=True,  # sd-scripts: einsum("k n m, k n ... -> k m ...", R, W) = Rᵀ·W per block
        )


def read(header: _Header, tensors: Mapping[str, torch.Tensor], config) -> OFTAdapter:
    """The adapter of a kohya file. Per layer, in key order: its splits, its alpha, its block shapes, then
    `make_layer`'s checks (tests/test_bad_input.py pins each refusal); tensor values are computed for all layers of
    one layout at once, and the layers built by `_make_layers` (the same checks, once per distinct layout)."""
    path = header.path
    keys = list(tensors)
    simple = _simple_keys(keys)
    file_alpha = _metadata_alpha(header)
    flux = header.metadata.get("ss_network_module") == "networks.oft_flux"
    rows = None
    if simple is not None:
        names, alpha_keys, block_keys = simple
        ignored = []
        values, qs, finite, facts = _batched_values(alpha_keys, block_keys, tensors, header)
        rows = _simple_rows(names, values, qs, finite, facts, "kohya_flux" if flux else "kohya")
        if rows is None:
            layers = {name: [b, None, a] for name, a, b in zip(names, alpha_keys, block_keys)}
    else:
        layers, ignored = _group(keys, path)
    if rows is None:
        if simple is None:  # (the usual file's values, already batched above, line up with these same keys)
            alpha_keys = [e[2] for e in layers.values() if e[2] is not None]
            block_keys = [e[0] for e in layers.values() if e[0] is not None]
            block_keys += [k for e in layers.values() if e[1] is not None for k in e[1].values()]
            values, qs, finite, _ = _batched_values(alpha_keys, block_keys, tensors, header)
        alpha_of = {k: v for k, v in zip(alpha_keys, values) if v is not None}
        q_of = {k: q for k, q in zip(block_keys, qs) if q is not None}
        finite_of = dict(zip(block_keys, finite))
        rows, flux = _layer_rows(layers, alpha_of, q_of, finite_of, file_alpha, flux, header)
    built = dict(zip((("unet", name) for name in rows.names), rows.layers(path)))
    fmt = "kohya_flux" if flux else "kohya"
    info_out = {"alpha": sorted({c.value for c in rows.constraints})}
    if ignored:
        info_out["ignored_keys"] = ignored
    return OFTAdapter(built, fmt, path, dict(header.metadata), info_out)


def _layer_rows(layers: dict[str, list], alpha_of: dict, q_of: dict, finite: dict, file_alpha: float | None,
                flux: bool, header: _Header) -> tuple[_Rows, bool]:
    """`_make_layers`' rows, layer by layer in key order: its splits, its alpha, its block shapes (each refusal
    raised after the earlier layers' own checks, as when each layer was built in turn); and whether the file is
    FLUX (metadata, or a layer of numbered splits: that layer and the later ones get source "kohya_flux")."""
    path = header.path
    rows = _Rows([], [], [], [], [], [])
    constraint_of: dict[float, Constraint] = {}  # one object per alpha (100,000 layers usually share one)
    start = len(_PREFIX)
    try:
        for key in sorted(layers):
            blocks, numbered, alpha = layers[key]
            usual = numbered is None and blocks is not None  # one unnumbered `.oft_blocks`: the usual layer
            if not usual:
                splits = dict(numbered or {})
                if blocks is not None:
                    splits[-1] = blocks
                order = _split_order(key, splits, path)
                flux = flux or order != [-1]
            alpha_v = alpha_of.get(alpha) if alpha is not None else None
            if alpha_v is None:
                alpha_v = _alpha(key, alpha, file_alpha, header)
            if usual:
                q = q_of.get(blocks)
                if q is None:
                    raise _bad_blocks(key, {-1: blocks}, [-1], header)
                gens, flags = (q,), (finite[blocks],)
            else:
                if any(splits[i] not in q_of for i in order):
                    raise _bad_blocks(key, splits, order, header)
                gens = tuple(q_of[splits[i]] for i in order)
                flags = tuple(finite[splits[i]] for i in order)
            constraint = constraint_of.get(alpha_v) if alpha_v else None  # 0.0 and -0.0 kept apart
            if constraint is None:
                constraint = Constraint("norm_clamp", alpha_v)
                if alpha_v:
                    constraint_of[alpha_v] = constraint
            rows.names.append(key[start:])
            rows.keys.append(key)
            rows.blocks.append(gens)
            rows.finite.append(flags)
            rows.constraints.append(constraint)
            rows.sources.append("kohya_flux" if flux else "kohya")
    except OFTError:
        rows.layers(path)  # an earlier layer's own problem is raised first, as when each layer was built in turn
        raise
    return rows, flux


def _metadata_alpha(header: _Header) -> float | None:
    v = header.metadata.get("ss_network_alpha")
    try:
        return None if v in (None, "None", "") else float(v)
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------ writing


def _why_not(layer: OFTLayer, flux: bool) -> str | None:
    """Why this layer has no exact kohya form (the first reason), or None."""
    why = w.side_out_problem(layer, "kohya")
    if why:
        return why
    if layer.component != "unet":
        return "is a text-encoder layer; sd-scripts' OFT networks adapt the UNet / transformer only"
    if layer.kind == "butterfly":
        return "is BOFT (butterfly stages): its rotation is not one block-diagonal matrix"
    if layer.parameterization == "matrix":
        return "stores the rotation R itself (LyCORIS oft_diag): it has no exact Cayley generator in fp32"
    if not w.identity_scale(layer):
        return "has a per-row rescale, which kohya OFT cannot store"
    if len(layer.blocks) > 1 and not flux:
        return "has several splits, which only networks.oft_flux stores (pass flux=True)"
    if flux and len(set(layer.num_blocks)) != 1:
        return f"has split block counts {layer.num_blocks}; oft_flux uses one block count for every split"
    return None


def _fits(layer: OFTLayer, gens: list[torch.Tensor], alpha: float) -> bool:
    """True when kohya's clamp at `alpha` leaves every split of `gens` bit-identical (never bites)."""
    probe = layer.with_(constraint=Constraint("norm_clamp", alpha))
    for i, q in enumerate(gens):
        # the strict margin keeps sd-scripts' own float rounding of the same comparison on the safe side too
        if float(torch.norm(q.flatten())) * (1 + 1e-6) > alpha * layer.split_sizes[i]:
            return False
        if not torch.equal(_constrain(probe, q, i), q):
            return False
    return True


def _norm_text(gens: list[torch.Tensor]) -> str:
    n = max(float(torch.norm(q.flatten())) for q in gens)
    return f"{n:.3g}" if math.isfinite(n) else "beyond float32"


def _kohya_alpha(layers: dict[str, OFTLayer], gens: dict[str, list[torch.Tensor]]) -> tuple[float, dict]:
    """One alpha for the whole file (sd-scripts builds every module with the first `.alpha` it reads).

    Keeps the layers' own alpha when they share one and every unconstrained layer fits under it; otherwise applies
    every clamp to its Q (exact) and picks a power of two at least twice the largest ‖Q‖/split ratio, so the clamp
    never bites for any layer — which is how an unconstrained layer is written in a format that always clamps.
    """
    values = {layer.constraint.value for layer in layers.values() if layer.constraint.kind == "norm_clamp"}
    if len(values) == 1:
        (v,) = values
        if v > 0 and all(layer.constraint.kind == "norm_clamp" or _fits(layer, gens[k], v)
                         for k, layer in layers.items()):
            return v, gens
    baked = {}
    ratio = 0.0
    for k, layer in layers.items():
        g = gens[k]
        if layer.constraint.kind == "norm_clamp":
            g = [_constrain(layer, q, i) for i, q in enumerate(g)]
        baked[k] = g
        for i, q in enumerate(g):
            ratio = max(ratio, float(torch.norm(q.flatten())) / layer.split_sizes[i])
    widest = max(size for layer in layers.values() for size in layer.split_sizes)
    if not ratio * 4 * widest <= _FP32_MAX:  # ‖Q‖ beyond float32, or an alpha × width that float32 cannot hold
        worst = max(layers, key=lambda k: max(float(torch.norm(q.flatten())) / s
                                              for q, s in zip(baked[k], layers[k].split_sizes)))
        raise OFTError(f"cannot be written as kohya without changing the rotation: {layers[worst].key}: its ‖Q‖_F "
                       f"({_norm_text(baked[worst])}) needs an alpha whose "
                       "bound alpha × width float32 cannot hold (sd-scripts always clamps ‖Q‖ at alpha × width); "
                       "write it as LyCORIS (alpha 0: no constraint) or PEFT")
    alpha = 1e-3 if ratio == 0 else 2.0 ** math.ceil(math.log2(2 * ratio))
    for k, layer in layers.items():
        if not _fits(layer, baked[k], alpha):  # cannot happen with the factor 2; checked, never assumed
            raise OFTError(f"internal: alpha {alpha} would clamp layer {layer.key!r}")
    return alpha, baked


def _looks_flux(adapter: OFTAdapter) -> bool:
    if adapter.format == "kohya_flux" or any(len(layer.blocks) > 1 for layer in adapter):
        return True
    return any(layer.name.startswith(("double_blocks", "single_blocks")) for layer in adapter)


def _generators(named: dict[str, OFTLayer]) -> tuple[float, dict[str, list[torch.Tensor]]]:
    """(the file's alpha, per key the generators to store, applied as Rᵀ) for layers `_why_not` accepted."""
    gens = {}
    for key, layer in named.items():
        g = list(layer.blocks)
        if layer.constraint.kind == "block_projection":  # PEFT COFT (legacy 0.13): applied here, written unclamped
            g = w.constrained(layer)
        gens[key] = w.with_transpose(g, layer.transpose, True)
    work = {k: (layer if layer.constraint.kind == "norm_clamp" else layer.with_(constraint=Constraint()))
            for k, layer in named.items()}
    alpha, gens = _kohya_alpha(work, gens)
    if float(torch.tensor(alpha, dtype=torch.float32)) != alpha:  # a file's alpha is fp32-exact; ours a power of 2
        raise OFTError(f"internal: alpha {alpha!r} is not exact in fp32")
    return alpha, gens


# Set on a file whose layers include unconstrained ones, written with an alpha whose clamp never bites on them (kohya
# has no "no constraint"): what lets a trainer without a constraint resume its own kohya file (`train_io`).
_UNCONSTRAINED_METADATA = "comfyui_oft.unconstrained"


def _metadata(adapter: OFTAdapter, named: dict[str, OFTLayer], alpha: float, flux: bool) -> dict[str, str]:
    dims = Counter(n for layer in named.values() for n in layer.num_blocks)
    if len(dims) > 1:
        log.warning("layers have different block counts %s: readers that take one network dim for the whole file "
                    "(sd-scripts' create_network_from_weights) cannot load it; ComfyUI-OFT reads each layer's shape",
                    dict(dims))
    meta = w.base_metadata(adapter, "kohya")
    meta["ss_network_module"] = "networks.oft_flux" if flux else "networks.oft"
    meta["ss_network_dim"] = str(dims.most_common(1)[0][0])  # sd-scripts' dim = number of blocks
    meta["ss_network_alpha"] = repr(alpha)
    meta.pop(_UNCONSTRAINED_METADATA, None)  # (a source's marker says nothing of this file's layers)
    if any(layer.constraint.kind != "norm_clamp" for layer in named.values()):
        meta[_UNCONSTRAINED_METADATA] = "true"
    if flux:
        meta.setdefault("ss_base_model_version", "flux1")
        if meta["ss_base_model_version"] == "flux1":  # (not for Chroma / HunyuanVideo / FLUX.2 files)
            meta.setdefault("modelspec.architecture", "flux-1-dev/lora")
    return meta


def write(adapter: OFTAdapter, out, *, overwrite: bool = False, metadata: Mapping[str, str] | None = None,
          flux: bool | None = None, inputs: Iterable = ()) -> str:
    """Write sd-scripts `networks.oft` (or `networks.oft_flux` when `flux`; default: guessed from the adapter)."""
    refused = adapter.refused_formats.get("kohya")
    if refused:  # e.g. trained on a family sd-scripts has no OFT network for (SD3, Wan, Qwen-Image, ...)
        raise OFTError(f"cannot be written as kohya: {refused}", path=adapter.path or None)
    flux = _looks_flux(adapter) if flux is None else flux
    w.check_all(adapter, "kohya", lambda layer: _why_not(layer, flux))
    named = w.underscored_unique(adapter, lambda layer: _PREFIX)
    try:
        alpha, gens = _generators(named)
    except OFTError as e:  # name the adapter's file
        raise OFTError(e.detail, path=e.path or adapter.path or None, layer=e.layer) from None
    alpha32 = torch.tensor(alpha, dtype=torch.float32)
    tensors = {}
    for key, g in gens.items():
        for i, q in enumerate(g):
            tensors[f"{key}.oft_blocks.{i}" if flux else f"{key}.oft_blocks"] = w.upper(q)
        tensors[f"{key}.alpha"] = alpha32.clone()
    meta = w.finish_metadata(_metadata(adapter, named, alpha, flux), metadata)
    return w.atomic_file(out, overwrite, tensors, meta, adapter, inputs)
