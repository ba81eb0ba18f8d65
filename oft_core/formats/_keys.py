"""Grouping a file's tensors by layer, shared by the readers whose keys are `<layer>.<part>`."""

from __future__ import annotations

import re

import torch


def group_by_layer(tensors: dict[str, torch.Tensor], pattern: re.Pattern) -> tuple[dict[str, dict], list[str]]:
    """({layer: {part: tensor}}, keys the pattern does not match); `pattern` has groups (layer, part)."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    ignored = []
    for key, t in tensors.items():
        m = pattern.match(key)
        if m:
            layers.setdefault(m.group(1), {})[m.group(2)] = t
        else:
            ignored.append(key)
    return layers, ignored
