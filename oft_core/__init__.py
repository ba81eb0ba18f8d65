"""oft_core: OFT (Orthogonal Fine-Tuning) adapters in pure torch — formats, rotation math, merge, bake, train.

Never imports ComfyUI (tests/test_core_standalone.py). The package namespace holds the core objects in `__all__`
below; the rest of the API is used from its module. Declared here, by module, are exactly the names the nodes, the
CLI (oft_core/cli.py) and the benchmarks use; every other top-level name of a core module starts with an underscore
(internal: it may change). tests/test_packaging.py checks both directions.

- description: `spec` — `OFTAdapter`, `Constraint`, `make_layer`, `TE_COMPONENTS`; `choices` — `STRENGTH_MODES`,
  `MERGE_MODES`, `FORMATS`; `errors` — `OFTError`, `check_strength`
- files: `formats` — `load_adapter`, `write_adapter`, `READERS`, `format_family`, `not_oft_message`;
  `formats.peft` — `find_config`; `formats.lycoris` — `check`; `safetensors_io` — `read_header`; `publish` —
  `publish_safetensors`, `check_output_name`
- math: `rotation` — `rotation_blocks`, `rotate_weight`, `rotate_weight_`, `apply_rows`, `adapted_bias`,
  `cayley_may_fail`;
  `bypass` — `ModuleBypass`, `module_bypasses`
- names: `names` — `Target`, `bias_key`; `match` — `Match`, `MatchReport`
- operations: `blocks` — `parse_block_spec`, `with_block_strength`, `scale_layers`, `refuse_layer_strengths`,
  `layer_multiplier`, `layer_block`; `combine` — `blend`, `merge`, `provenance`; `bake` — `bake`; `extract` —
  `extract`, `ExtractResult`, `extract_lora`, `lora_metadata`, `low_rank`; `summary` — `describe`, `format_text`,
  `tool_notes`
- training: `train` — `OFTTrainer`, `select_targets`, `detect_family`, `PRESETS`, `OPTIMIZERS`, `LOSSES`,
  `KOHYA_LOSS`, `SCHEDULES`, `lr_factor`, `residual_loss`, `run_training`, `training_metadata`, `export_names`,
  `frozen_for_training`, `frozen_bases`, `gradient_checkpointing`, `inplace_safe`, `checkpoint_blocks`,
  `rotate_output`, `rotate_from_input`, `rotate_through_weight`, `frozen_base`, `is_linear`; `demo` — `run_demo`

Public beyond those uses:

- entry points: `cli` — `main` (the `oft-core` console script, python -m oft_core); `bypass` — `attach` (the
  README's Python API for a plain torch model)
- the format protocol: `formats` — `WRITERS` (per format, as `READERS`); `formats.kohya`, `formats.lycoris`,
  `formats.peft` — `claims`, `read`, `write`
- training policy: `train` — `keeps_input`, `rotates_weight`, `keeps_output` (`OFTTrainer`'s default `keep_input`,
  `through_weight` and `keep_output`, to build on)
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
