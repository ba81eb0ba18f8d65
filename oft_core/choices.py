"""The named options of the core, each defined once and shown by the CLI and the nodes (no torch import here, so the
command line can list them before loading anything).

- `STRENGTH_MODES`: "kohya" (R_s = I + s(R − I), what the trainers do with their multiplier) or "orthogonal"
  (R_s = Cayley(s·Q)); the math is in rotation.py.
- `MERGE_MODES`: "compose" (sequential product of the rotations) or "average" (weighted mean of the generators).
- `FORMATS`: the file formats the pack writes (and reads): kohya sd-scripts, LyCORIS, PEFT.
"""

STRENGTH_MODES = ("kohya", "orthogonal")
MERGE_MODES = ("compose", "average")
FORMATS = ("kohya", "lycoris", "peft")
