"""Writing an `OFTAdapter` as a kohya, LyCORIS or PEFT file — only where the target can hold the same rotation.

Every writer first checks that each layer is *exactly* representable in the target format and refuses with an
`OFTError` that says which layer and why otherwise; nothing is approximated. What each format can hold:

| target | rotated side | blocks | parameterization | constraint kept as | extra |
|---|---|---|---|---|---|
| kohya | out | diag, splits (FLUX) | Cayley | one `.alpha` for the whole file | - |
| lycoris | out | diag (one split, b ≤ blocks), BOFT, R (`oft_diag`) | Cayley | per-layer `.alpha` (0: off) | rescale |
| peft    | in           | diag (one split), block_share | Cayley or Cayley–Neumann | COFT eps (global) | -          |

Exact rewrites used (each gives the same rotation blocks bit for bit, or up to fp32 rounding of one Cayley solve):

- Stored A from the generator: kohya/LyCORIS read Q = A − Aᵀ, PEFT Q = U − Uᵀ from the packed upper triangle; for an
  exactly skew Q, A = triu(Q, 1) gives back Q bit for bit.
- R or Rᵀ (`transpose`): Cayley(Q)ᵀ = Cayley(−Q) (and Neumann(Q)ᵀ = Neumann(−Q), since Qᵀ = −Q), so a layer applied
  with the other transpose is written with −Q.
- A constraint the target cannot express (PEFT COFT in kohya, per-split or per-layer clamps where the target has one
  global value) is applied once to Q here and the layer is written unconstrained: the rotation only ever sees the
  constrained Q (`rotation.rotation_blocks` constrains before scaling by strength), so this is exact at every strength.
- kohya has no "no constraint": an unconstrained layer gets an alpha so large that the clamp never bites (checked).
- Splits with equal block sizes (FLUX q|k|v) are one block-diagonal: LyCORIS and PEFT get them concatenated, after
  the per-split constraint has been applied.

Not representable, hence refused: input-side rotation (PEFT ≥ 0.14) in kohya/LyCORIS and output-side rotation in PEFT
(W·M ≠ M·W); Cayley–Neumann layers anywhere but PEFT (the series is not an exact Cayley rotation); `rescale` / `oft_s`
in kohya and PEFT; BOFT anywhere but LyCORIS; diag-oft layouts with more rows per block than blocks in LyCORIS
(it rebuilds the layout from the block size with `factorization(out_dim, b)`, see `_lycoris_layout`); text-encoder
layers in kohya OFT (sd-scripts adapts the UNet only);
underscored names as PEFT's dotted module paths unless the model's module names are given (the "." → "_" substitution
cannot be reversed by string rules).

Writes are published by `publish.py`: whole or absent (nothing left after a kill), never over any of the inputs, and
never replacing an existing output unless `overwrite=True` (then only an adapter file, or a PEFT adapter folder holding
nothing else).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from .choices import FORMATS
from .errors import OFTError
from .publish import check_output, publish_dir, publish_file
from .rotation import constrain
from .spec import Constraint, OFTAdapter, OFTLayer, neumann_coefficients

log = logging.getLogger(__name__)

PEFT_VERSION = "0.21.2"  # the PEFT whose file layout we write (packed oft_R, Neumann series with halved last term)
LYCORIS_PREFIXES = {"te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_"}
# adapter.info key: why no kohya file can hold this adapter (set by the trainer for families sd-scripts has no OFT
# network for); write_kohya refuses with it.
KOHYA_REFUSED = "kohya_refused"
# Metadata that describes the file's bytes or its network structure: never carried over from the source, because
# the written file has other bytes and we recompute the structure keys.
_DROP_METADATA_PREFIXES = ("sshs_", "ss_network_", "modelspec.hash")


def format_family(fmt: str) -> str:
    """The writer family of a reader format id ("kohya_flux" -> "kohya", "lycoris_boft" -> "lycoris", ...)."""
    for family in FORMATS:
        if fmt.startswith(family):
            return family
    raise OFTError(f"unknown adapter format {fmt!r}: expected one of {', '.join(FORMATS)}")


# ----------------------------------------------------------------------------------------------------------------
# shared checks and rewrites


class _Refusals:
    """Collects why layers cannot be written, then raises one error naming the first few."""

    def __init__(self, adapter: OFTAdapter, target: str):
        self.adapter, self.target, self.items = adapter, target, []

    def add(self, layer: OFTLayer, why: str) -> None:
        self.items.append(f"{layer.component}:{layer.key}: {why}")

    def raise_if_any(self) -> None:
        if not self.items:
            return
        shown = "; ".join(self.items[:4])
        more = f" (and {len(self.items) - 4} more layers)" if len(self.items) > 4 else ""
        raise OFTError(f"cannot be written as {self.target} without changing the rotation: {shown}{more}",
                       path=self.adapter.path or None)


def _identity_scale(layer: OFTLayer) -> bool:
    return layer.row_scale is None or bool(torch.all(layer.row_scale == 1))


def _constrained(layer: OFTLayer) -> list[torch.Tensor]:
    """The generators with the layer's constraint applied (what the rotation actually uses)."""
    return [constrain(layer, q, i) for i, q in enumerate(layer.generators)]


def _with_transpose(gens: list[torch.Tensor], have: bool, want: bool) -> list[torch.Tensor]:
    """Cayley(Q)ᵀ = Cayley(−Q): negate to switch between applying R and Rᵀ (exact: negation never rounds)."""
    return gens if have == want else [-q for q in gens]


def _upper(q: torch.Tensor) -> torch.Tensor:
    """A with A − Aᵀ = Q exactly, for an exactly skew Q."""
    return torch.triu(q, diagonal=1).contiguous()


def _merge_splits(gens: list[torch.Tensor]) -> torch.Tensor | None:
    """Splits with one block size are a single block-diagonal; None when block sizes differ."""
    if len({int(g.shape[-1]) for g in gens}) != 1:
        return None
    return gens[0] if len(gens) == 1 else torch.cat(gens, 0)


def _check_side_out(layer: OFTLayer, target: str) -> str | None:
    if layer.side != "out":
        return ("rotates the layer's input features (PEFT ≥ 0.14: W·M); " f"{target} rotates output features (M·W), "
                "and the two are different weights for the same blocks")
    if layer.parameterization == "neumann":
        return ("uses PEFT's truncated Cayley–Neumann series, which is not an exact rotation: no Cayley generator "
                "gives the same matrix")
    if layer.block_share:
        return "shares one block along the axis (PEFT block_share): the block count depends on the base weight"
    return None


def _inputs(adapter: OFTAdapter, inputs: Iterable) -> list:
    """Everything the output must never replace: the adapter's own file (and a PEFT config beside it) and `inputs`."""
    out = [os.fspath(p) for p in inputs if p is not None]
    if adapter.path:
        out.append(adapter.path)
        config = os.path.join(os.path.dirname(os.path.abspath(adapter.path)), "adapter_config.json")
        if adapter.format.startswith("peft") and os.path.exists(config):
            out.append(config)
    return out


def _atomic_file(out: str, overwrite: bool, tensors, metadata, adapter: OFTAdapter, inputs: Iterable) -> str:
    """One safetensors file, published by `publish.publish_file` (whole or absent, never over an input)."""
    blob = _serialize(tensors, metadata)
    return publish_file(out, lambda f: f.write(blob), inputs=_inputs(adapter, inputs), overwrite=overwrite,
                        what="adapter file")


def _atomic_dir(out: str, overwrite: bool, write, adapter: OFTAdapter, inputs: Iterable) -> str:
    """A PEFT adapter folder, published by `publish.publish_dir`."""
    return publish_dir(out, write, inputs=_inputs(adapter, inputs), overwrite=overwrite)


def _serialize(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata={str(k): str(v) for k, v in
                                                                           metadata.items()})


def _save(tensors: dict[str, torch.Tensor], path: str, metadata: Mapping[str, str]) -> None:
    with open(path, "wb") as f:
        f.write(_serialize(tensors, metadata))


def _base_metadata(adapter: OFTAdapter, target: str) -> dict[str, str]:
    meta = {k: v for k, v in adapter.metadata.items() if not k.startswith(_DROP_METADATA_PREFIXES)}
    meta.pop("format", None)
    meta["comfyui_oft.written_from"] = json.dumps({"format": adapter.format, "path": os.path.basename(adapter.path),
                                                   "to": target})
    return meta


def _finish_metadata(meta: dict[str, str], extra: Mapping[str, str] | None) -> dict[str, str]:
    for k, v in (extra or {}).items():
        meta[str(k)] = str(v)
    return meta


def _underscored_unique(adapter: OFTAdapter, layers: Iterable[OFTLayer], prefix_of) -> dict[str, OFTLayer]:
    out: dict[str, OFTLayer] = {}
    for layer in layers:
        key = prefix_of(layer) + layer.name.replace(".", "_")
        if key in out:
            raise OFTError(f"layers {out[key].key!r} and {layer.key!r} both become {key!r} once dots are replaced "
                           "by underscores", path=adapter.path or None)
        out[key] = layer
    return out


# ----------------------------------------------------------------------------------------------------------------
# kohya


def _fits(layer: OFTLayer, gens: list[torch.Tensor], alpha: float) -> bool:
    """True when kohya's clamp at `alpha` leaves every split of `gens` bit-identical (never bites)."""
    probe = layer.with_(constraint=Constraint("norm_clamp", alpha))
    for i, q in enumerate(gens):
        # the strict margin keeps sd-scripts' own float rounding of the same comparison on the safe side too
        if float(torch.norm(q.flatten())) * (1 + 1e-6) > alpha * layer.split_sizes[i]:
            return False
        if not torch.equal(constrain(probe, q, i), q):
            return False
    return True


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
            g = [constrain(layer, q, i) for i, q in enumerate(g)]
        baked[k] = g
        for i, q in enumerate(g):
            ratio = max(ratio, float(torch.norm(q.flatten())) / layer.split_sizes[i])
    alpha = 1e-3 if ratio == 0 else 2.0 ** math.ceil(math.log2(2 * ratio))
    for k, layer in layers.items():
        if not _fits(layer, baked[k], alpha):  # cannot happen with the factor 2; checked, never assumed
            raise OFTError(f"internal: alpha {alpha} would clamp layer {layer.key!r}")
    return alpha, baked


def _looks_flux(adapter: OFTAdapter) -> bool:
    if adapter.format == "kohya_flux" or any(len(layer.generators) > 1 for layer in adapter):
        return True
    return any(layer.name.startswith(("double_blocks", "single_blocks")) for layer in adapter)


def write_kohya(adapter: OFTAdapter, out, *, overwrite: bool = False, metadata: Mapping[str, str] | None = None,
                flux: bool | None = None, inputs: Iterable = ()) -> str:
    """Write sd-scripts `networks.oft` (or `networks.oft_flux` when `flux`; default: guessed from the adapter)."""
    refused = adapter.info.get(KOHYA_REFUSED)
    if refused:  # e.g. trained on a family sd-scripts has no OFT network for (SD3, Wan, Qwen-Image, ...)
        raise OFTError(f"cannot be written as kohya: {refused}", path=adapter.path or None)
    flux = _looks_flux(adapter) if flux is None else flux
    refusals = _Refusals(adapter, "kohya")
    for layer in adapter:
        why = _check_side_out(layer, "kohya")
        if why is None and layer.component != "unet":
            why = "is a text-encoder layer; sd-scripts' OFT networks adapt the UNet / transformer only"
        if why is None and layer.kind == "butterfly":
            why = "is BOFT (butterfly stages): its rotation is not one block-diagonal matrix"
        if why is None and layer.parameterization == "matrix":
            why = "stores the rotation R itself (LyCORIS oft_diag): it has no exact Cayley generator in fp32"
        if why is None and not _identity_scale(layer):
            why = "has a per-row rescale, which kohya OFT cannot store"
        if why is None and len(layer.generators) > 1 and not flux:
            why = "has several splits, which only networks.oft_flux stores (pass flux=True)"
        if why is None and flux and len(set(layer.num_blocks)) != 1:
            why = f"has split block counts {layer.num_blocks}; oft_flux uses one block count for every split"
        if why:
            refusals.add(layer, why)
    refusals.raise_if_any()

    named = _underscored_unique(adapter, adapter, lambda layer: "oft_unet_")
    gens = {}
    for key, layer in named.items():
        g = list(layer.generators)
        if layer.constraint.kind == "block_projection":  # PEFT COFT (legacy 0.13): applied here, written unclamped
            g = _constrained(layer)
        gens[key] = _with_transpose(g, layer.transpose, True)
    work = {k: (layer if layer.constraint.kind == "norm_clamp" else layer.with_(constraint=Constraint()))
            for k, layer in named.items()}
    alpha, gens = _kohya_alpha(work, gens)
    alpha32 = torch.tensor(alpha, dtype=torch.float32)
    if float(alpha32) != alpha:  # an alpha from a file is already fp32-exact; a computed one is a power of two
        raise OFTError(f"internal: alpha {alpha!r} is not exact in fp32")

    tensors = {}
    for key, g in gens.items():
        for i, q in enumerate(g):
            tensors[f"{key}.oft_blocks.{i}" if flux else f"{key}.oft_blocks"] = _upper(q)
        tensors[f"{key}.alpha"] = alpha32.clone()
    dims = Counter(n for layer in named.values() for n in layer.num_blocks)
    if len(dims) > 1:
        log.warning("layers have different block counts %s: readers that take one network dim for the whole file "
                    "(sd-scripts' create_network_from_weights) cannot load it; ComfyUI-OFT reads each layer's shape",
                    dict(dims))
    meta = _base_metadata(adapter, "kohya")
    meta["ss_network_module"] = "networks.oft_flux" if flux else "networks.oft"
    meta["ss_network_dim"] = str(dims.most_common(1)[0][0])  # sd-scripts' dim = number of blocks
    meta["ss_network_alpha"] = repr(alpha)
    if flux:
        meta.setdefault("ss_base_model_version", "flux1")
        meta.setdefault("modelspec.architecture", "flux-1-dev/lora")
    _finish_metadata(meta, metadata)
    return _atomic_file(out, overwrite, tensors, meta, adapter, inputs)


# ----------------------------------------------------------------------------------------------------------------
# LyCORIS


def _lycoris_layout(out_dim: int, block_size: int) -> tuple[int, int]:
    """(block size, block count) that LyCORIS 4.1.3 diag-oft builds for a layer whose file stores blocks of
    `block_size`: `DiagOFTModule.make_module_from_state_dict` passes the stored size as `lora_dim`, and
    `factorization(out_dim, lora_dim)` returns the smaller of (lora_dim, out_dim / lora_dim) as the block size."""
    if out_dim % block_size:
        raise ValueError(f"block size {block_size} does not divide {out_dim}")
    return min(block_size, out_dim // block_size), max(block_size, out_dim // block_size)


def _lycoris_layout_problem(layer: OFTLayer) -> str | None:
    """Why LyCORIS diag-oft cannot load this layer's block layout (all splits as one block-diagonal), or None.

    LyCORIS rebuilds the layout from the stored block size b alone, and always gets a block size ≤ the block count:
    a layer of n blocks of b with b > n (kohya's 8 blocks of 40 on 320, 4 of 32 on 128) comes back as b blocks of n,
    and loading it fails (`size of tensor a (n) must match ... b (b)`). No exact rewrite exists: a rotation with
    blocks of b is not block-diagonal at any smaller size.
    """
    b, out = layer.block_sizes[0], sum(layer.split_sizes)
    n = out // b
    size, count = _lycoris_layout(out, b)
    if size == b:
        return None
    fits = [k for k in range(1, out + 1) if out % k == 0 and out // k <= k]  # block counts LyCORIS can hold
    return (f"has {n} blocks of {b} on {out} outputs; LyCORIS diag-oft derives a layer's layout from the stored "
            f"block size alone, factorization({out}, {b}) = {count} blocks of {size}, so it only holds a block size "
            f"≤ the block count and would fail to load this layer. Keep this adapter as kohya or PEFT, or train "
            f"with ≥ {fits[0]} blocks (block size ≤ {out // fits[0]}) for LyCORIS")


def write_lycoris(adapter: OFTAdapter, out, *, overwrite: bool = False, metadata: Mapping[str, str] | None = None,
                  unet_prefix: str | None = None, inputs: Iterable = ()) -> str:
    """Write LyCORIS diag-oft (or BOFT / oft_diag layers as they are), as `lycoris.kohya` saves them.

    `unet_prefix`: "lycoris_" (LyCORIS' own wrapper) or "lora_unet_" (kohya-style names, what `lycoris.kohya` writes
    and ComfyUI maps); default: keep "lycoris_" when the source used it and has no text-encoder layers.
    """
    if unet_prefix is None:
        own = adapter.format.startswith("lycoris") and all(
            layer.key.startswith("lycoris_") for layer in adapter if layer.component == "unet")
        unet_prefix = "lycoris_" if own and all(layer.component == "unet" for layer in adapter) else "lora_unet_"
    if unet_prefix not in ("lycoris_", "lora_unet_"):
        raise OFTError(f"LyCORIS UNet prefix: expected 'lycoris_' or 'lora_unet_', found {unet_prefix!r}")
    refusals = _Refusals(adapter, "LyCORIS")
    kinds = set()
    for layer in adapter:
        why = _check_side_out(layer, "LyCORIS")
        if why is None and layer.kind == "butterfly" and layer.transpose:
            why = "is BOFT applied transposed: transposing each stage does not transpose the product"
        if why is None and len(layer.generators) > 1 and _merge_splits(list(layer.generators)) is None:
            why = f"has splits with different block sizes {layer.block_sizes}; LyCORIS stores one block size"
        if why is None and layer.parameterization == "matrix" and len(layer.generators) > 1:
            why = "stores several rotation matrices per split"
        if why is None and layer.kind != "butterfly" and layer.parameterization != "matrix":
            why = _lycoris_layout_problem(layer)
        if why:
            refusals.add(layer, why)
        kinds.add("boft" if layer.kind == "butterfly" else "diag-oft")
    refusals.raise_if_any()
    if len(kinds) > 1:
        raise OFTError("mixes BOFT and diag-oft layers; a LyCORIS file has one algorithm (ss_network_args algo)",
                       path=adapter.path or None)

    named = _underscored_unique(adapter, adapter,
                                lambda layer: unet_prefix if layer.component == "unet" else LYCORIS_PREFIXES[
                                    layer.component])
    tensors = {}
    alphas = set()
    any_rescale = False
    for key, layer in named.items():
        if layer.parameterization == "matrix":
            r = layer.generators[0] if layer.transpose else layer.generators[0].transpose(-1, -2)
            tensors[f"{key}.oft_diag"] = r.contiguous()
            alpha = 0.0
        else:
            keep = layer.constraint.kind == "norm_clamp" and len(layer.generators) == 1 and layer.constraint.value > 0
            gens = list(layer.generators) if keep else _constrained(layer)
            if layer.kind == "butterfly":
                q = gens[0]
            else:
                q = _merge_splits(_with_transpose(gens, layer.transpose, True))
            tensors[f"{key}.oft_blocks"] = _upper(q)
            alpha = layer.constraint.value if keep else 0.0  # LyCORIS: alpha 0 = no constraint
            tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        alphas.add(alpha)
        if not _identity_scale(layer):
            tensors[f"{key}.rescale"] = layer.row_scale.reshape(-1, 1).contiguous()
            any_rescale = True
    algo = kinds.pop() if kinds else "diag-oft"
    dims = Counter(layer.block_sizes[0] for layer in named.values())
    meta = _base_metadata(adapter, "lycoris")
    meta["ss_network_module"] = "lycoris.kohya"
    meta["ss_network_dim"] = str(dims.most_common(1)[0][0]) if dims else "0"  # LyCORIS' dim = block size
    constraint = repr(alphas.pop()) if len(alphas) == 1 else "per-layer"  # each layer's .alpha is what counts
    meta["ss_network_alpha"] = constraint
    meta["ss_network_args"] = json.dumps({"algo": algo, "constraint": constraint, "rescaled": str(any_rescale)})
    _finish_metadata(meta, metadata)
    return _atomic_file(out, overwrite, tensors, meta, adapter, inputs)


# ----------------------------------------------------------------------------------------------------------------
# PEFT


@dataclass(frozen=True)
class _PeftLayer:
    path: str
    q: torch.Tensor  # (stored blocks, b, b), for PEFT's convention


def _neumann_terms(coeffs: tuple[float, ...]) -> tuple[int, bool] | None:
    """(num_cayley_neumann_terms, written by PEFT ≥ 0.18) whose series has exactly these coefficients."""
    for halved in (True, False):
        for n in range(1, 65):
            if neumann_coefficients(n, last_term_halved=halved) == tuple(coeffs):
                return n, halved
    return None


def _dotted_names(module_names: Iterable[str] | None) -> dict[str, str | None]:
    """underscored -> dotted module path (None when two paths collide), from weight keys or module paths."""
    out: dict[str, str | None] = {}
    for n in module_names or ():
        for suffix in (".weight", ".bias"):
            if n.endswith(suffix):
                n = n[: -len(suffix)]
        u = n.replace(".", "_")
        out[u] = n if out.get(u, n) == n else None
    return out


def write_peft(adapter: OFTAdapter, out, *, overwrite: bool = False, metadata: Mapping[str, str] | None = None,
               module_names: Iterable[str] | None = None, inputs: Iterable = ()) -> str:
    """Write a PEFT (≥ 0.16 layout) OFT adapter directory: adapter_model.safetensors + adapter_config.json.

    `module_names`: the base model's module paths or weight keys (e.g. a diffusers UNet's state-dict keys), needed
    only to turn underscored layer names back into PEFT's dotted module paths.
    """
    refusals = _Refusals(adapter, "PEFT")
    dotted = _dotted_names(module_names)
    for layer in adapter:
        why = None
        if layer.side != "in":
            why = ("rotates output features (M·W); PEFT ≥ 0.14 rotates input features (W·M), a different weight for "
                   "the same blocks")
        elif layer.component != "unet":
            why = "is a text-encoder layer; a PEFT adapter directory holds the layers of one model"
        elif layer.kind == "butterfly":
            why = "is BOFT; PEFT's OFT has no butterfly stages (PEFT BOFT is another adapter type)"
        elif layer.parameterization == "matrix":
            why = "stores the rotation R itself: it has no exact Cayley generator in fp32"
        elif not _identity_scale(layer):
            why = "has a per-row scale (PEFT 0.14–0.15 oft_s), which current PEFT OFT does not store"
        elif len(layer.generators) > 1 and _merge_splits(list(layer.generators)) is None:
            why = f"has splits with different block sizes {layer.block_sizes}; PEFT stores one block size per layer"
        elif "." not in layer.name and layer.name not in dotted and "_" in layer.name:
            why = ("has an underscored name, and PEFT needs the dotted module path: the '.' → '_' substitution "
                   "cannot be undone by string rules; pass the base model's module names (module_names)")
        elif "." not in layer.name and dotted.get(layer.name, "") is None:
            why = "matches two module paths of the base model once dots become underscores"
        if why:
            refusals.add(layer, why)
    refusals.raise_if_any()
    layers = list(adapter)
    if not layers:
        raise OFTError("no layers to write", path=adapter.path or None)

    # Parameterization is global in adapter_config.json.
    params = {(layer.parameterization, layer.neumann_coeffs) for layer in layers}
    if len(params) > 1:
        raise OFTError("mixes exact Cayley and Cayley–Neumann layers (or different series lengths); PEFT's config "
                       "holds one for the whole adapter", path=adapter.path or None)
    (param, coeffs), = params
    neumann = param == "neumann"
    terms, new_series = (5, True)
    if neumann:
        found = _neumann_terms(coeffs)
        if found is None:
            raise OFTError(f"Cayley–Neumann coefficients {coeffs} are not a series any PEFT version computes",
                           path=adapter.path or None)
        terms, new_series = found
    # block_share is global too.
    shares = {layer.block_share for layer in layers}
    if len(shares) > 1:
        raise OFTError("mixes block_share layers with unshared ones; PEFT's block_share is one setting",
                       path=adapter.path or None)
    block_share = shares.pop()
    # COFT (eps) is global: kept when every layer has the same one, otherwise applied to Q here (exact).
    cons = {(layer.constraint.kind, layer.constraint.value) for layer in layers}
    coft = len(cons) == 1 and next(iter(cons))[0] == "block_projection"
    eps = next(iter(cons))[1] if coft else 6e-5  # PEFT's default eps; unused with coft false

    if coft and any(len(layer.generators) > 1 for layer in layers):
        coft = False  # COFT's bound depends on the stored block count: concatenated splits are written projected
    want_transpose = neumann  # PEFT exact branch applies Cayley(Q)ᵀ·…, its Neumann branch ≈ Cayley(Q)
    written: list[_PeftLayer] = []
    for layer in layers:
        gens = list(layer.generators) if coft else _constrained(layer)
        q = _merge_splits(_with_transpose(gens, layer.transpose, want_transpose))
        path = layer.name if "." in layer.name or layer.name not in dotted else dotted[layer.name]
        written.append(_PeftLayer(path, q))
    paths = [w.path for w in written]
    if len(set(paths)) != len(paths):
        raise OFTError("two layers map to the same PEFT module path", path=adapter.path or None)

    sizes = {int(w.q.shape[-1]) for w in written}
    counts = {int(w.q.shape[0]) for w in written}
    source_r = int((adapter.info.get("peft_config") or {}).get("r") or 0)
    if block_share:
        if len(sizes) != 1:
            raise OFTError(f"block_share layers with block sizes {sorted(sizes)}: PEFT derives them from one "
                           "oft_block_size", path=adapter.path or None)
        r, block = 0, sizes.pop()
    elif len(counts) == 1 and (source_r or len(sizes) != 1):
        r, block = counts.pop(), 0
    elif len(sizes) == 1:
        r, block = 0, sizes.pop()
    else:
        raise OFTError(f"layers differ both in block size {sorted(sizes)} and in block count {sorted(counts)}; PEFT's "
                       "config sets one r or one oft_block_size for every layer", path=adapter.path or None)

    tensors = {}
    for w in written:
        b = int(w.q.shape[-1])
        rows, cols = torch.triu_indices(b, b, 1)
        tensors[f"base_model.model.{w.path}.oft_R.weight"] = w.q[:, rows, cols].contiguous()
    config = {
        "peft_type": "OFT",
        "r": r,
        "oft_block_size": block,
        "use_cayley_neumann": neumann,
        "num_cayley_neumann_terms": terms,
        "coft": coft,
        "eps": eps,
        "block_share": block_share,
        "target_modules": sorted(paths),
        "module_dropout": 0.0,
        "bias": "none",
        "init_weights": True,
        "inference_mode": True,
        "fan_in_fan_out": False,
        "base_model_name_or_path": None,
        "revision": None,
        "task_type": None,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }
    if not neumann or new_series:
        config["peft_version"] = PEFT_VERSION
    # else: the 0.16–0.17 series (last coefficient 2) is what a config without peft_version means to our reader and
    # to those PEFT versions; PEFT ≥ 0.18 would compute its newer series for such a file whatever we write.
    meta = {"format": "pt"}
    _finish_metadata(meta, metadata)

    def write(tmp_dir: str) -> None:
        from .formats.peft import CONFIG_NAME, MODEL_NAME

        _save(tensors, os.path.join(tmp_dir, MODEL_NAME), meta)
        with open(os.path.join(tmp_dir, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)

    return _atomic_dir(out, overwrite, write, adapter, inputs)


# ----------------------------------------------------------------------------------------------------------------


WRITERS = {"kohya": write_kohya, "lycoris": write_lycoris, "peft": write_peft}


def write_adapter(adapter: OFTAdapter, out, to: str, *, overwrite: bool = False,
                  metadata: Mapping[str, str] | None = None, **options) -> str:
    """Write `adapter` as `to` ("kohya" | "lycoris" | "peft"); options go to that writer (`inputs`: files the output
    must never replace, besides the adapter's own file). Returns the output path."""
    if to not in WRITERS:
        raise OFTError(f"output format: expected one of {', '.join(FORMATS)}, found {to!r}")
    # the output rules first (never over an input, never over an existing output without overwrite): a refusal
    # about the path comes before any work on the layers
    check_output(out, _inputs(adapter, options.get("inputs", ())), overwrite=overwrite,
                 kind="dir" if to == "peft" else "file")
    return WRITERS[to](adapter, out, overwrite=overwrite, metadata=metadata, **options)
