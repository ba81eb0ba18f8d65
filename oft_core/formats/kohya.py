"""kohya sd-scripts `networks.oft` (SD1.x/2.x/SDXL) and `networks.oft_flux` (FLUX.1).

Keys: `oft_unet_<module path, "." -> "_">.oft_blocks` (num_blocks, b, b) and `.alpha` (scalar constraint);
FLUX fused layers store one tensor per split, `.oft_blocks.<i>` (a single-split FLUX layer has `.oft_blocks.0`).
Module paths are diffusers names for SD1/2, LDM names for SDXL, BFL names for FLUX. sd-scripts' `dim` is the number
of blocks. Split sizes are read from the tensors (split_i = blocks_i.shape[0] × blocks_i.shape[1]): sd-scripts
hard-codes FLUX.1 widths, which would be wrong for any other width.
"""

from __future__ import annotations

import re

import torch

from ..errors import OFTError
from ..rotation import skew
from ..safetensors_io import Header
from ..spec import Constraint, OFTAdapter, make_layer

PREFIX = "oft_unet_"
KEY = re.compile(r"^(oft_unet_.+?)\.(oft_blocks(?:\.(\d+))?|alpha)$")


def claims(header: Header, config) -> bool:
    return any(k.startswith(PREFIX) and ".oft_blocks" in k for k in header.tensors)


def read(header: Header, tensors: dict[str, torch.Tensor], config) -> OFTAdapter:
    path = header.path
    modules: dict[str, dict] = {}
    ignored = []
    for key, t in tensors.items():
        m = KEY.match(key)
        if not m:
            if key.startswith(PREFIX):
                raise OFTError(f"unexpected key {key!r} in a kohya OFT file (expected <name>.oft_blocks[.<i>] "
                               "and <name>.alpha)", path=path)
            ignored.append(key)
            continue
        mod = modules.setdefault(m.group(1), {"splits": {}, "alpha": None})
        if m.group(2) == "alpha":
            mod["alpha"] = t
        else:
            mod["splits"][-1 if m.group(3) is None else int(m.group(3))] = t

    file_alpha = _metadata_alpha(header)
    flux = header.metadata.get("ss_network_module") == "networks.oft_flux"
    layers = {}
    for key, mod in sorted(modules.items()):
        splits = mod["splits"]
        if not splits:
            raise OFTError("has .alpha but no .oft_blocks", path=path, layer=key)
        if -1 in splits and len(splits) > 1:
            raise OFTError("mixes .oft_blocks with numbered .oft_blocks.<i> splits", path=path, layer=key)
        order = sorted(splits)
        if order != [-1] and order != list(range(len(order))):
            raise OFTError(f"split indices must be 0..{len(order) - 1}, found {order}", path=path, layer=key)
        flux = flux or order != [-1]
        alpha = mod["alpha"]
        if alpha is None:
            if file_alpha is None:
                raise OFTError("no .alpha tensor and no ss_network_alpha metadata: the constraint is unknown",
                               path=path, layer=key)
            alpha_v = file_alpha
        else:
            if alpha.numel() != 1:
                raise OFTError(f".alpha must be a scalar, found shape {tuple(alpha.shape)}", path=path, layer=key)
            alpha_v = float(alpha.float().item())  # exactly the stored value (bf16 files store 0.00099945...)
        gens = []
        for i in order:
            a = splits[i]
            if a.ndim != 3 or a.shape[1] != a.shape[2]:
                raise OFTError(f".oft_blocks{'' if i < 0 else f'.{i}'}: expected (num_blocks, b, b), "
                               f"found {tuple(a.shape)}", path=path, layer=key)
            gens.append(skew(a.to(torch.float32)))
        layers[("unet", key[len(PREFIX):])] = make_layer(
            path=path,
            name=key[len(PREFIX):],
            side="out",
            generators=gens,
            transpose=True,  # sd-scripts: einsum("k n m, k n ... -> k m ...", R, W) = Rᵀ·W per block
            constraint=Constraint("norm_clamp", alpha_v),
            source="kohya_flux" if flux else "kohya",
            key=key,
        )
    fmt = "kohya_flux" if flux else "kohya"
    info = {"alpha": sorted({layer.constraint.value for layer in layers.values()})}
    if ignored:
        info["ignored_keys"] = ignored
    return OFTAdapter(layers, fmt, path, dict(header.metadata), info)


def _metadata_alpha(header: Header) -> float | None:
    v = header.metadata.get("ss_network_alpha")
    try:
        return None if v in (None, "None", "") else float(v)
    except ValueError:
        return None
