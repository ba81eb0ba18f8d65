"""What every writer shares: refusal collection, the exact rewrites of generators, metadata, and publishing the
output through `publish.py` (whole or absent, never over an input, never replacing an output without `overwrite`).

Exact rewrites (each gives the same rotation blocks bit for bit, or up to fp32 rounding of one Cayley solve):

- Stored A from the generator: kohya/LyCORIS read Q = A − Aᵀ, PEFT Q = U − Uᵀ from the packed upper triangle; for an
  exactly skew Q, A = triu(Q, 1) gives back Q bit for bit.
- R or Rᵀ (`transpose`): Cayley(Q)ᵀ = Cayley(−Q) (and Neumann(Q)ᵀ = Neumann(−Q), since Qᵀ = −Q), so a layer applied
  with the other transpose is written with −Q.
- A constraint the target cannot express is applied once to Q and the layer written unconstrained: the rotation only
  ever sees the constrained Q (`rotation.rotation_blocks` constrains before scaling by strength), so this is exact at
  every strength.
- Splits with equal block sizes (FLUX q|k|v) are one block-diagonal: LyCORIS and PEFT get them concatenated, after
  the per-split constraint has been applied.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Mapping

import torch

from ..errors import OFTError
from ..publish import _publish_dir, _publish_file
from ..rotation import _constrain
from ..spec import OFTAdapter, OFTLayer

# Metadata that describes the file's bytes or its network structure: never carried over from the source, because
# the written file has other bytes and we recompute the structure keys.
_DROP_METADATA_PREFIXES = ("sshs_", "ss_network_", "modelspec.hash")


class Refusals:
    """Collects why layers cannot be written, then raises one error naming the first few."""

    def __init__(self, adapter: OFTAdapter, target: str):
        self.adapter, self.target, self.items = adapter, target, []

    def add(self, layer: OFTLayer, why: str | None) -> None:
        if why:
            self.items.append(f"{layer.component}:{layer.key}: {why}")

    def raise_if_any(self) -> None:
        if not self.items:
            return
        shown = "; ".join(self.items[:4])
        more = f" (and {len(self.items) - 4} more layers)" if len(self.items) > 4 else ""
        raise OFTError(f"cannot be written as {self.target} without changing the rotation: {shown}{more}",
                       path=self.adapter.path or None)


def check_all(adapter: OFTAdapter, target: str, why_not) -> None:
    """Refuse the whole write (one error, first few layers named) when `why_not(layer)` gives a reason for any."""
    refusals = Refusals(adapter, target)
    for layer in adapter:
        refusals.add(layer, CONV_OPEN if layer.conv_transposed else BIAS if layer.bias is not None else why_not(layer))
    refusals.raise_if_any()


# Why a layer with a trained bias (PEFT bias "oft_only" / "boft_only") is not written: kohya and LyCORIS OFT files
# hold no bias, and the pack writes none into PEFT's either
BIAS = ("trains its layer's bias (PEFT bias 'oft_only' / 'boft_only'), which this pack does not write into an OFT "
        "file: apply the file to a model (or bake it) instead")

# Why a layer read from a OneTrainer file has no form in another file: its convention is known only against a model
CONV_OPEN = ("is a OneTrainer layer, whose rotation is that of a Linear or its transpose for a convolution, which "
             "only the model says: apply the file to a model (or bake it) instead, or extract a LoRA from it for "
             "other tools")


def identity_scale(layer: OFTLayer) -> bool:
    return layer.row_scale is None or bool(torch.all(layer.row_scale == 1))


def constrained(layer: OFTLayer) -> list[torch.Tensor]:
    """The generators with the layer's constraint applied (what the rotation actually uses)."""
    return [_constrain(layer, q, i) for i, q in enumerate(layer.blocks)]


def with_transpose(gens: list[torch.Tensor], have: bool, want: bool) -> list[torch.Tensor]:
    """Cayley(Q)ᵀ = Cayley(−Q): negate to switch between applying R and Rᵀ (exact: negation never rounds)."""
    return gens if have == want else [-q for q in gens]


def upper(q: torch.Tensor) -> torch.Tensor:
    """A with A − Aᵀ = Q exactly, for an exactly skew Q."""
    return torch.triu(q, diagonal=1).contiguous()


def merge_splits(gens: list[torch.Tensor]) -> torch.Tensor | None:
    """Splits with one block size are a single block-diagonal; None when block sizes differ."""
    if len({int(g.shape[-1]) for g in gens}) != 1:
        return None
    return gens[0] if len(gens) == 1 else torch.cat(gens, 0)


def side_out_problem(layer: OFTLayer, target: str) -> str | None:
    """Why a format that rotates output features with an exact Cayley generator (kohya, LyCORIS) cannot hold it."""
    if layer.side != "out":
        return ("rotates the layer's input features (PEFT ≥ 0.14: W·M); " f"{target} rotates output features (M·W), "
                "and the two are different weights for the same blocks")
    if layer.parameterization == "neumann":
        return ("uses PEFT's truncated Cayley–Neumann series, which is not an exact rotation: no Cayley generator "
                "gives the same matrix")
    if layer.block_share:
        return "shares one block along the axis (PEFT block_share): the block count depends on the base weight"
    return None


def underscored_unique(adapter: OFTAdapter, prefix_of) -> dict[str, OFTLayer]:
    """{file key prefix: layer}, the layer name with "." → "_" after `prefix_of(layer)`; refuses collisions."""
    out: dict[str, OFTLayer] = {}
    for layer in adapter:
        key = prefix_of(layer) + layer.name.replace(".", "_")
        if key in out:
            raise OFTError(f"layers {out[key].key!r} and {layer.key!r} both become {key!r} once dots are replaced "
                           "by underscores", path=adapter.path or None)
        out[key] = layer
    return out


# ------------------------------------------------------------------------------------------------ metadata


def base_metadata(adapter: OFTAdapter, target: str) -> dict[str, str]:
    """The source's metadata minus what describes its bytes or structure, plus where this file was written from."""
    meta = {k: v for k, v in adapter.metadata.items() if not k.startswith(_DROP_METADATA_PREFIXES)}
    meta.pop("format", None)
    meta["comfyui_oft.written_from"] = json.dumps({"format": adapter.format, "path": os.path.basename(adapter.path),
                                                   "to": target})
    return meta


def finish_metadata(meta: dict[str, str], extra: Mapping[str, str] | None) -> dict[str, str]:
    for k, v in (extra or {}).items():
        meta[str(k)] = str(v)
    return meta


# ------------------------------------------------------------------------------------------------ publishing


def inputs_of(adapter: OFTAdapter, inputs: Iterable) -> list:
    """Everything the output must never replace: the adapter's own file (and a PEFT config beside it) and `inputs`."""
    out = [os.fspath(p) for p in inputs if p is not None]
    if adapter.path:
        out.append(adapter.path)
        config = os.path.join(os.path.dirname(os.path.abspath(adapter.path)), "adapter_config.json")
        if adapter.format.startswith("peft") and os.path.exists(config):
            out.append(config)
    return out


def serialize(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()},
                metadata={str(k): str(v) for k, v in metadata.items()})


def atomic_file(out: str, overwrite: bool, tensors, metadata, adapter: OFTAdapter, inputs: Iterable) -> str:
    """One safetensors file, published by `publish._publish_file` (whole or absent, never over an input)."""
    blob = serialize(tensors, metadata)
    return _publish_file(out, lambda f: f.write(blob), inputs=inputs_of(adapter, inputs), overwrite=overwrite,
                        what="adapter file")


def atomic_dir(out: str, overwrite: bool, write, adapter: OFTAdapter, inputs: Iterable) -> str:
    """A PEFT adapter folder, published by `publish._publish_dir`."""
    return _publish_dir(out, write, inputs=inputs_of(adapter, inputs), overwrite=overwrite)
