"""oft_core: OFT (Orthogonal Fine-Tuning) adapters in pure torch — formats, rotation math, merge, bake, train.

Never imports ComfyUI (tests/test_core_standalone.py). The package namespace holds the core objects below; the rest of
the API is used from its module, and these are the names the nodes, the CLI and the benchmarks use (anything else,
or anything with a leading underscore, is internal and may change):

- description: `spec` — `OFTAdapter`, `OFTLayer`, `Constraint`, `make_layer`, `resolve_for_weight`, `COMPONENTS`,
  `TE_COMPONENTS`; `choices` — `STRENGTH_MODES`, `MERGE_MODES`, `FORMATS`; `errors` — `OFTError`, `check_strength`
- files: `formats` — `load_adapter`, `open_streamed`, `write_adapter`, `READERS`, `WRITERS`, `FORMATS`,
  `format_family`, `not_oft_message`; `safetensors_io` — `read_header`; `publish` — `publish_file`,
  `publish_safetensors`, `check_output`, `check_output_name`
- math: `rotation` — `rotation_blocks`, `rotate_weight` / `rotate_weight_` (merge path), `rotate_features`,
  `bypass_forward`, `apply_rows` (activation and weight paths); `bypass` — `ModuleBypass`, `module_bypasses`,
  `attach`
- names: `names` — `build_key_map`, `KeyMap`, `Target`; `match` — `match_adapter`, `Match`, `MatchReport`
- operations: `blocks` — `parse_block_spec`, `apply_block_strength`, `with_block_strength`, `scale_layers`,
  `layer_multiplier`, `layer_block`; `combine` — `blend`, `merge`, `provenance`; `bake` — `bake`; `extract` — `extract`,
  `extract_lora`, `lora_metadata`; `summary` — `describe`, `format_text`, `tool_notes`
- training: `train` — `OFTTrainer`, `select_targets`, `PRESETS`, `run_training`, `training_metadata`,
  `frozen_for_training`, `gradient_checkpointing`, `inplace_safe`, `checkpoint_blocks`; `demo` — `ToyModel`,
  `run_demo`
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
