"""LyCORIS diag-oft and BOFT (and the old `oft_diag` key of LyCORIS 2.0).

Keys: `<prefix><module path, "." -> "_">.oft_blocks` — 3-D (num_blocks, b, b) for diag-oft, 4-D
(stages, num_blocks, b, b) for BOFT —, `.alpha` (the constraint; 0 = none; the bound is alpha × out_dim over all
blocks, and all stages for BOFT), `.rescale` (per output row; when trained with `rescaled`).
Prefixes: `lycoris_` (LyCORIS' own wrapper), `lora_unet_` / `lora_te_` / `lora_te1_` / `lora_te2_` (kohya-style names),
`lora_transformer_` (OneTrainer's name for a diffusion transformer).
LyCORIS 2.0 saved `.oft_diag`: the rotation R itself (already through Cayley), applied the same way as diag-oft.
Diag-oft applies Rᵀ per block (einsum "k n m, k n ... -> k m ..."); BOFT applies R (einsum "b i j, b j ... -> b i ...")
between butterfly permutations.
"""

from __future__ import annotations

import math
import re

import torch

from ..errors import OFTError
from ..rotation import skew
from ..safetensors_io import Header
from ..spec import Constraint, OFTAdapter, make_layer
from ._keys import group_by_layer

PREFIXES = {"lycoris_": "unet", "lora_unet_": "unet", "lora_transformer_": "unet", "lora_te1_": "te1",
            "lora_te2_": "te2", "lora_te_": "te"}
KEY = re.compile(r"^((?:lycoris_|lora_unet_|lora_transformer_|lora_te1_|lora_te2_|lora_te_).+?)"
                 r"\.(oft_blocks|oft_diag|alpha|rescale)$")


def claims(header: Header, config) -> bool:
    return any(
        (k.endswith(".oft_blocks") or k.endswith(".oft_diag")) and k.startswith(tuple(PREFIXES)) for k in header.tensors
    )


def _component(key: str) -> tuple[str, str]:
    for prefix, component in PREFIXES.items():
        if key.startswith(prefix):
            return component, key[len(prefix):]
    raise AssertionError(key)  # unreachable: KEY only matches these prefixes


def read(header: Header, tensors: dict[str, torch.Tensor], config) -> OFTAdapter:
    path = header.path
    modules, ignored = group_by_layer(tensors, KEY)
    layers = {}
    kinds = set()
    for key, parts in sorted(modules.items()):
        if "oft_blocks" not in parts and "oft_diag" not in parts:
            if "alpha" in parts and len(parts) == 1:
                ignored.append(f"{key}.alpha")  # the alpha of a non-OFT module (LoRA etc.) in a mixed file
                continue
            raise OFTError(f"has {sorted(parts)} but no .oft_blocks", path=path, layer=key)
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
            layer = make_layer(path=path, name=name, component=component, side="out", generators=[r],
                               transpose=True, parameterization="matrix", row_scale=rescale,
                               source="lycoris_oft_diag", key=key)
            kinds.add("lycoris_oft_diag")
        else:
            a = parts["oft_blocks"].to(torch.float32)
            if a.ndim not in (3, 4) or a.shape[-1] != a.shape[-2]:
                raise OFTError(f".oft_blocks: expected (num_blocks, b, b) or (stages, num_blocks, b, b), "
                               f"found {tuple(a.shape)}", path=path, layer=key)
            butterfly = a.ndim == 4
            # alpha ≤ 0 means no constraint (LyCORIS); NaN / Inf are refused by make_layer, as for kohya
            constraint = Constraint("norm_clamp", alpha_v) if alpha_v > 0 or not math.isfinite(alpha_v) \
                else Constraint()
            layer = make_layer(
                path=path,
                name=name,
                component=component,
                side="out",
                kind="butterfly" if butterfly else "diag",
                generators=[skew(a)],
                num_blocks=[a.shape[-3]],
                transpose=not butterfly,
                constraint=constraint,
                row_scale=rescale,
                source="lycoris_boft" if butterfly else "lycoris_diag_oft",
                key=key,
            )
            kinds.add(layer.source)
        layers[(component, name)] = layer
    fmt = kinds.pop() if len(kinds) == 1 else "lycoris_mixed"
    info = {"network_args": header.metadata.get("ss_network_args")}
    if ignored:
        info["ignored_keys"] = ignored
    return OFTAdapter(layers, fmt, path, dict(header.metadata), info)
