"""The node-side shared types and option lists, each defined once (the core owns the lists; nodes show them).

- `OFTAdapterType`: the OFT_ADAPTER socket every node that passes an adapter uses.
- `STRENGTH_MODES`: oft_core's strength modes ("kohya", "orthogonal"), the strength_mode dropdown.
- `TRAINING_TARGETS`: every target preset of oft_core.train (each family's presets, in their order), the trainer's
  targets dropdown; which presets fit which family is checked by the core when training starts.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..oft_core.choices import STRENGTH_MODES as _CORE_MODES
from ..oft_core.train import PRESETS

OFTAdapterType = io.Custom("OFT_ADAPTER")
STRENGTH_MODES = list(_CORE_MODES)
TRAINING_TARGETS = list(dict.fromkeys(p for presets in PRESETS.values() for p in presets))
