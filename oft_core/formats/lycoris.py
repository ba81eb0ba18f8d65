"""LyCORIS diag-oft and BOFT (and the old `oft_diag` key of LyCORIS 2.0): reading and writing.

Keys: `<prefix><module path, "." -> "_">.oft_blocks` — 3-D (num_blocks, b, b) for diag-oft, 4-D
(stages, num_blocks, b, b) for BOFT —, `.alpha` (the constraint; 0 = none; the bound is alpha × out_dim over all
blocks, and all stages for BOFT), `.rescale` (per output row; when trained with `rescaled`).
Prefixes: `lycoris_` (LyCORIS' own wrapper), `lora_unet_` / `lora_te_` / `lora_te1_` / `lora_te2_` (kohya-style names),
`lora_transformer_` (OneTrainer's name for a diffusion transformer).
LyCORIS 2.0 saved `.oft_diag`: the rotation R itself (already through Cayley), applied the same way as diag-oft.
Diag-oft applies Rᵀ per block (einsum "k n m, k n ... -> k m ..."); BOFT applies R (einsum "b i j, b j ... -> b i ...")
between butterfly permutations.

Writing (as `lycoris.kohya` saves): output-side exact-Cayley layers, one block size per layer (equal-size splits
concatenated), per-layer `.alpha` (0: off), `.rescale`, BOFT and `oft_diag` layers as they are. Refused: input-side
rotation, Cayley–Neumann, block_share, BOFT applied transposed, splits of different block sizes, and diag-oft layouts
with more rows per block than blocks (LyCORIS rebuilds the layout from the block size, see `_layout_problem`).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Iterable, Mapping

import torch

from ..errors import OFTError
from ..rotation import _skew
from ..safetensors_io import _Header
from ..spec import Constraint, OFTAdapter, OFTLayer, make_layer
from . import _write as w
from ._keys import group_by_layer

_PREFIXES = {"lycoris_": "unet", "lora_unet_": "unet", "lora_transformer_": "unet", "lora_te1_": "te1",
            "lora_te2_": "te2", "lora_te_": "te"}
_KEY = re.compile(r"^((?:" + "|".join(map(re.escape, _PREFIXES)) + r").+?)\.(oft_blocks|oft_diag|alpha|rescale)$")
# What the writer puts before a text encoder's layer names (the UNet's: `lycoris_` or `lora_unet_`, see `write`).
_WRITE_PREFIXES = {"te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_"}
_UNET_WRITE_PREFIXES = ("lycoris_", "lora_unet_")


def claims(header: _Header, config) -> bool:
    prefixes = tuple(_PREFIXES)
    return any(k.endswith((".oft_blocks", ".oft_diag")) and k.startswith(prefixes) for k in header.tensors)


def _component(key: str) -> tuple[str, str]:
    for prefix, component in _PREFIXES.items():
        if key.startswith(prefix):
            return component, key[len(prefix):]
    raise AssertionError(key)  # unreachable: KEY only matches these prefixes


def read(header: _Header, tensors: dict[str, torch.Tensor], config) -> OFTAdapter:
    path = header.path
    modules, ignored = group_by_layer(tensors, _KEY)
    layers = {}
    for key, parts in sorted(modules.items()):
        if "oft_blocks" not in parts and "oft_diag" not in parts:
            if "alpha" in parts and len(parts) == 1:
                ignored.append(f"{key}.alpha")  # the alpha of a non-OFT module (LoRA etc.) in a mixed file
                continue
            raise OFTError(f"has {sorted(parts)} but no .oft_blocks", path=path, layer=key)
        layer = _read_layer(path, key, parts)
        layers[(layer.component, layer.name)] = layer
    kinds = {layer.source for layer in layers.values()}
    fmt = kinds.pop() if len(kinds) == 1 else "lycoris_mixed"
    info = {"network_args": header.metadata.get("ss_network_args")}
    if ignored:
        info["ignored_keys"] = ignored
    return OFTAdapter(layers, fmt, path, dict(header.metadata), info)


def _read_layer(path: str, key: str, parts: dict[str, torch.Tensor]) -> OFTLayer:
    """One module's tensors: `.oft_diag` (R itself, old LyCORIS) or `.oft_blocks` (diag-oft, or BOFT when 4-D)."""
    component, name = _component(key)
    alpha = parts.get("alpha")
    if alpha is not None and alpha.numel() != 1:
        raise OFTError(f".alpha must be a scalar, found shape {tuple(alpha.shape)}", path=path, layer=key)
    alpha_v = 0.0 if alpha is None else float(alpha.float().reshape(-1)[0].item())
    rescale = parts.get("rescale")
    if "oft_diag" in parts:
        r = parts["oft_diag"].to(torch.float32)
        if r.ndim != 3 or r.shape[1] != r.shape[2]:
            raise OFTError(f".oft_diag: expected (num_blocks, b, b), found {tuple(r.shape)}", path=path, layer=key)
        return make_layer(path=path, name=name, component=component, side="out", blocks=[r], transpose=True,
                          parameterization="matrix", row_scale=rescale, source="lycoris_oft_diag", key=key)
    a = parts["oft_blocks"].to(torch.float32)
    if a.ndim not in (3, 4) or a.shape[-1] != a.shape[-2]:
        raise OFTError(f".oft_blocks: expected (num_blocks, b, b) or (stages, num_blocks, b, b), "
                       f"found {tuple(a.shape)}", path=path, layer=key)
    butterfly = a.ndim == 4
    # alpha ≤ 0 means no constraint (LyCORIS); NaN / Inf are refused by make_layer, as for kohya
    constraint = Constraint("norm_clamp", alpha_v) if alpha_v > 0 or not math.isfinite(alpha_v) else Constraint()
    return make_layer(path=path, name=name, component=component, side="out",
                      kind="butterfly" if butterfly else "diag", blocks=[_skew(a)], num_blocks=[a.shape[-3]],
                      transpose=not butterfly, constraint=constraint, row_scale=rescale,
                      source="lycoris_boft" if butterfly else "lycoris_diag_oft", key=key)


# ------------------------------------------------------------------------------------------------ writing


def _layout(out_dim: int, block_size: int) -> tuple[int, int]:
    """(block size, block count) that LyCORIS 4.1.3 diag-oft builds for a layer whose file stores blocks of
    `block_size`: `DiagOFTModule.make_module_from_state_dict` passes the stored size as `lora_dim`, and
    `factorization(out_dim, lora_dim)` returns the smaller of (lora_dim, out_dim / lora_dim) as the block size."""
    if out_dim % block_size:
        raise ValueError(f"block size {block_size} does not divide {out_dim}")
    return min(block_size, out_dim // block_size), max(block_size, out_dim // block_size)


def _layout_problem(layer: OFTLayer) -> str | None:
    """Why LyCORIS diag-oft cannot load this layer's block layout (all splits as one block-diagonal), or None.

    LyCORIS rebuilds the layout from the stored block size b alone, and always gets a block size ≤ the block count:
    a layer of n blocks of b with b > n (kohya's 8 blocks of 40 on 320, 4 of 32 on 128) comes back as b blocks of n,
    and loading it fails (`size of tensor a (n) must match ... b (b)`). No exact rewrite exists: a rotation with
    blocks of b is not block-diagonal at any smaller size.
    """
    b, out = layer.block_sizes[0], sum(layer.split_sizes)
    n = out // b
    size, count = _layout(out, b)
    if size == b:
        return None
    fits = [k for k in range(1, out + 1) if out % k == 0 and out // k <= k]  # block counts LyCORIS can hold
    return (f"has {n} blocks of {b} on {out} outputs; LyCORIS diag-oft derives a layer's layout from the stored "
            f"block size alone, factorization({out}, {b}) = {count} blocks of {size}, so it only holds a block size "
            f"≤ the block count and would fail to load this layer. Keep this adapter as kohya or PEFT, or train "
            f"with ≥ {fits[0]} blocks (block size ≤ {out // fits[0]}) for LyCORIS")


def _why_not(layer: OFTLayer) -> str | None:
    """Why this layer has no exact LyCORIS form (the first reason), or None."""
    why = w.side_out_problem(layer, "LyCORIS")
    if why:
        return why
    if layer.kind == "butterfly" and layer.transpose:
        return "is BOFT applied transposed: transposing each stage does not transpose the product"
    if len(layer.blocks) > 1 and w.merge_splits(list(layer.blocks)) is None:
        return f"has splits with different block sizes {layer.block_sizes}; LyCORIS stores one block size"
    if layer.parameterization == "matrix" and len(layer.blocks) > 1:
        return "stores several rotation matrices per split"
    if layer.kind != "butterfly" and layer.parameterization != "matrix":
        return _layout_problem(layer)
    return None


def check(adapter: OFTAdapter) -> None:
    """Refuse (one OFTError naming the first layers) an adapter with a layer LyCORIS cannot hold exactly: what
    `write` checks before anything is written."""
    w.check_all(adapter, "LyCORIS", _why_not)


def _unet_prefix(adapter: OFTAdapter, unet_prefix: str | None) -> str:
    """The given prefix, checked; default "lycoris_" when the source used it and has no text-encoder layers."""
    if unet_prefix is None:
        own = adapter.format.startswith("lycoris") and all(
            layer.key.startswith("lycoris_") for layer in adapter if layer.component == "unet")
        unet_prefix = "lycoris_" if own and all(layer.component == "unet" for layer in adapter) else "lora_unet_"
    if unet_prefix not in _UNET_WRITE_PREFIXES:
        raise OFTError(f"LyCORIS UNet prefix: expected 'lycoris_' or 'lora_unet_', found {unet_prefix!r}")
    return unet_prefix


def _algorithm(adapter: OFTAdapter) -> str:
    """"boft" or "diag-oft": a LyCORIS file has one algorithm (ss_network_args algo)."""
    kinds = {"boft" if layer.kind == "butterfly" else "diag-oft" for layer in adapter}
    if len(kinds) > 1:
        raise OFTError("mixes BOFT and diag-oft layers; a LyCORIS file has one algorithm (ss_network_args algo)",
                       path=adapter.path or None)
    return kinds.pop() if kinds else "diag-oft"


def _layer_tensors(key: str, layer: OFTLayer) -> tuple[dict[str, torch.Tensor], float]:
    """The file's tensors of one layer and the alpha written (0: no constraint; a stored R has none)."""
    tensors = {}
    if layer.parameterization == "matrix":
        r = layer.blocks[0] if layer.transpose else layer.blocks[0].transpose(-1, -2)
        tensors[f"{key}.oft_diag"] = r.contiguous()
        alpha = 0.0
    else:
        keep = layer.constraint.kind == "norm_clamp" and len(layer.blocks) == 1 and layer.constraint.value > 0
        gens = list(layer.blocks) if keep else w.constrained(layer)
        q = gens[0] if layer.kind == "butterfly" else w.merge_splits(w.with_transpose(gens, layer.transpose, True))
        tensors[f"{key}.oft_blocks"] = w.upper(q)
        alpha = layer.constraint.value if keep else 0.0  # LyCORIS: alpha 0 = no constraint
        tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    if not w.identity_scale(layer):
        tensors[f"{key}.rescale"] = layer.row_scale.reshape(-1, 1).contiguous()
    return tensors, alpha


def write(adapter: OFTAdapter, out, *, overwrite: bool = False, metadata: Mapping[str, str] | None = None,
          unet_prefix: str | None = None, inputs: Iterable = ()) -> str:
    """Write LyCORIS diag-oft (or BOFT / oft_diag layers as they are), as `lycoris.kohya` saves them.

    `unet_prefix`: "lycoris_" (LyCORIS' own wrapper) or "lora_unet_" (kohya-style names, what `lycoris.kohya` writes
    and ComfyUI maps); default: keep "lycoris_" when the source used it and has no text-encoder layers.
    """
    unet_prefix = _unet_prefix(adapter, unet_prefix)
    check(adapter)
    algo = _algorithm(adapter)
    named = w.underscored_unique(
        adapter, lambda layer: unet_prefix if layer.component == "unet" else _WRITE_PREFIXES[layer.component])
    tensors, alphas = {}, set()
    for key, layer in named.items():
        own, alpha = _layer_tensors(key, layer)
        tensors.update(own)
        alphas.add(alpha)
    any_rescale = any(not w.identity_scale(layer) for layer in named.values())
    dims = Counter(layer.block_sizes[0] for layer in named.values())
    meta = w.base_metadata(adapter, "lycoris")
    meta["ss_network_module"] = "lycoris.kohya"
    meta["ss_network_dim"] = str(dims.most_common(1)[0][0]) if dims else "0"  # LyCORIS' dim = block size
    constraint = repr(alphas.pop()) if len(alphas) == 1 else "per-layer"  # each layer's .alpha is what counts
    meta["ss_network_alpha"] = constraint
    meta["ss_network_args"] = json.dumps({"algo": algo, "constraint": constraint, "rescaled": str(any_rescale)})
    return w.atomic_file(out, overwrite, tensors, w.finish_metadata(meta, metadata), adapter, inputs)
