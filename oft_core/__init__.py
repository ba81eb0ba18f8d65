"""oft_core: OFT (Orthogonal Fine-Tuning) adapters in pure torch — formats, rotation math, merge, bake.

Never imports ComfyUI. The public API:

- `load_adapter(path)` -> `OFTAdapter` of validated `OFTLayer`s (any kohya / LyCORIS / PEFT OFT file)
- `rotation_blocks`, `rotate_weight` / in place `rotate_weight_` (merge path),
  `rotate_features`, `bypass_forward` (activation path)
- `build_key_map`, `match_adapter` (adapter layer names -> base weights, with a match report)
- `bake(base, [(adapter, strength), ...], out)` (streaming, atomic)
- `OFTError`: every user-facing error
"""

from .bake import bake
from .errors import OFTError
from .formats import READERS, load_adapter
from .match import Match, MatchReport, match_adapter
from .names import KeyMap, Target, build_key_map
from .rotation import STRENGTH_MODES, bypass_forward, rotate_features, rotate_weight, rotate_weight_, rotation_blocks
from .spec import Constraint, OFTAdapter, OFTLayer, make_layer, resolve_for_weight

__all__ = [
    "OFTAdapter", "OFTError", "OFTLayer", "Constraint", "KeyMap", "Match", "MatchReport", "READERS",
    "STRENGTH_MODES", "Target", "bake", "build_key_map", "bypass_forward", "load_adapter", "make_layer",
    "match_adapter", "resolve_for_weight", "rotate_features", "rotate_weight", "rotate_weight_", "rotation_blocks",
]
