"""pytest setup for comfyui-oft.

- The repo root is on sys.path: the comfy-free core is imported as `oft_core`.
- The pack itself (root `__init__.py`, relative imports) is imported as the package `comfyui_oft`:
  `import_pack()` / the `comfyui_oft` fixture.
- `FIXTURES`: the reference fixtures (env OFT_FIXTURES, else <repo root>/../shared/fixtures).
- The session fixture `comfy` imports the real ComfyUI (COMFYUI_PATH, else ~/.cache/comfyui-oft/ComfyUI) on the CPU
  and returns the `comfy` package, or skips the test when there is none. Every test that uses it is marked
  `comfyui` automatically; tests may also carry `@pytest.mark.comfyui` themselves.
- At the end of the session one line says how many ComfyUI integration tests ran or were skipped:
  "ComfyUI integration tests: N ran, M skipped (ComfyUI at PATH)" or
  "ComfyUI integration tests: N ran, M skipped (ComfyUI not found: WHY)". .ci/run greps it.
- Test tiers, one pytest marker each (`TIERS`): `comfyui` (the real ComfyUI as a library), `server` (a real
  `main.py` process), `browser` (the frontend in headless Chromium), `tools` (the reference tools in their own venvs).
  At the end one line per tier: "Tier NAME: N ran, M skipped (first skip reason)". .ci/run greps them and fails
  when a tier it requires did not run.
- A test marked `third_party` needs a node pack or package that is not the pack's (city96's ComfyUI-GGUF and `gguf`):
  it runs where that is installed, is counted on a line of its own ("Third-party tests: …"), and never counts against
  a required tier, so a fresh machine without it still passes. A test (or parameter) marked `newer_comfyui` needs a
  model class only newer ComfyUI has (FLUX.2, Z-Image: 0.8): the same, on its line "Newer-ComfyUI tests: …".
- A test marked `comfyui` is skipped without ComfyUI even when it does not request the `comfy` fixture.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
for _p in (str(REPO_ROOT), str(TESTS_DIR)):  # TESTS_DIR too, for `import comfy_models` under any import mode
    if _p not in sys.path:
        sys.path.insert(0, _p)

import comfy_models  # noqa: E402  (plain helper module next to this file; it imports nothing heavy)

FIXTURES: Path = comfy_models.FIXTURES
PACK_NAME = "comfyui_oft"

SKIP_PREFIX = "ComfyUI not found"
SKIP_REASON = (
    f"{SKIP_PREFIX} (set COMFYUI_PATH or put it at ~/.cache/comfyui-oft/ComfyUI): "
    "real-ComfyUI integration tests skipped"
)


# ------------------------------------------------------------------------------------------------ markers
def pytest_configure(config):
    # Many small solves and matmuls: with 2 OpenMP threads on a busy 2-core machine each can take 50 ms instead of
    # 50 µs (oversubscription, measured), so the suite runs single-threaded. Tests about threading set it themselves.
    import torch

    torch.set_num_threads(1)
    config.addinivalue_line(
        "markers",
        "comfyui: integration test against the real ComfyUI (needs COMFYUI_PATH or ~/.cache/comfyui-oft/ComfyUI; "
        "skipped otherwise)",
    )
    for name, what in TIERS.items():
        if name != "comfyui":
            config.addinivalue_line("markers", f"{name}: {what}")
    config.addinivalue_line("markers", f"{THIRD_PARTY}: needs a third-party node pack or package (optional; counted "
                            "apart from the tiers)")
    config.addinivalue_line("markers", f"{NEWER_COMFYUI}: needs a model class only newer ComfyUI has (optional; "
                            "counted apart from the tiers)")
    for v in _STATS.values():
        v.clear()
    _TIER_STATS.clear()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "comfy" in getattr(item, "fixturenames", ()) and item.get_closest_marker("comfyui") is None:
            item.add_marker(pytest.mark.comfyui)


def pytest_runtest_setup(item):
    if item.get_closest_marker("comfyui") is not None:
        try:
            comfy_models.find_comfyui()
        except comfy_models.ComfyUINotFound:
            pytest.skip(SKIP_REASON)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The reference fixtures folder; an error (not a skip) when it is missing."""
    if not FIXTURES.is_dir():
        pytest.fail(f"fixtures not found at {FIXTURES} (expected <repo root>/../shared/fixtures, or set OFT_FIXTURES)")
    return FIXTURES


@pytest.fixture(scope="session")
def comfy():
    """The real ComfyUI `comfy` package, imported as a library on the CPU; skips the test when ComfyUI is absent.

    `comfy.lora`, `comfy.model_patcher`, `comfy.model_management`, `comfy.sd`, `comfy.supported_models` and
    `comfy.utils` are imported. Small models: the `comfy_models` helper module.
    """
    try:
        return comfy_models.import_comfy()
    except comfy_models.ComfyUINotFound:
        # One short reason per test; the end-of-session line says what was looked at.
        pytest.skip(SKIP_REASON)


def import_pack(name: str = PACK_NAME):
    """Import the repo root as the package `name` (default comfyui_oft), the way ComfyUI imports a node pack:
    the root `__init__.py` uses relative imports, so it cannot be imported as a plain module."""
    if name in sys.modules:
        return sys.modules[name]
    init = REPO_ROOT / "__init__.py"
    if not init.is_file():
        raise FileNotFoundError(f"{init} does not exist: the pack has no root __init__.py yet")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@pytest.fixture(scope="session")
def comfyui_oft(comfy):
    """The pack imported as package `comfyui_oft` with the real ComfyUI importable (for node tests)."""
    return import_pack()


@pytest.fixture()
def output_dir(monkeypatch, tmp_path):
    """ComfyUI's output folder (`folder_paths.output_directory`) pointed at a fresh `output` folder of the test."""
    import folder_paths

    out = tmp_path / "output"
    out.mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(out))
    return out


# ------------------------------------------------------------------------------------------------ summary line
_STATS: dict = {"ran": set(), "skipped": set(), "errors": set()}  # node ids of tests marked comfyui

# The test tiers: marker -> what it needs. Each gets a summary line at the end of the session.
TIERS = {
    "comfyui": "the real ComfyUI imported as a library",
    "server": "a real ComfyUI main.py process on a loopback port (private copy of ComfyUI, tiny checkpoints)",
    "browser": "the ComfyUI frontend in headless Chromium (Debian chromium + python playwright)",
    "tools": "the reference tools (sd-scripts, lycoris-lora, peft) in venvs of their own",
}
# tier -> {"ran": set, "skipped": {nodeid: reason}, "errors": set}
_TIER_STATS: dict = {}


THIRD_PARTY = "third_party"
NEWER_COMFYUI = "newer_comfyui"
# optional markers -> their summary line's label; a test with one counts there only, never against a tier
OPTIONAL = {THIRD_PARTY: "Third-party tests", NEWER_COMFYUI: "Newer-ComfyUI tests"}


def _optional(report) -> str | None:
    return next((m for m in OPTIONAL if m in report.keywords), None)


def _tier_logreport(report) -> None:
    optional = _optional(report)
    tiers = (optional,) if optional else TIERS
    for tier in tiers:
        if tier not in report.keywords:
            continue
        st = _TIER_STATS.setdefault(tier, {"ran": set(), "skipped": {}, "errors": set()})
        if report.when == "call" and not (report.skipped and not hasattr(report, "wasxfail")):
            st["ran"].add(report.nodeid)  # passed, failed or xfailed
        elif report.skipped:  # at setup, or pytest.skip() inside the test
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            st["skipped"][report.nodeid] = reason.removeprefix("Skipped: ")
        elif report.failed and report.when == "setup":
            st["errors"].add(report.nodeid)


def tier_lines() -> list[str]:
    lines = []
    for tier in TIERS:
        st = _TIER_STATS.get(tier, {"ran": set(), "skipped": {}, "errors": set()})
        ran = st["ran"]
        skipped = {k: v for k, v in st["skipped"].items() if k not in ran}
        errors = st["errors"] - ran
        line = f"Tier {tier}: {len(ran)} ran, {len(skipped)} skipped"
        if errors:
            line += f", {len(errors)} errored before running"
        if skipped:
            line += f" (first skip: {next(iter(skipped.values()))})"
        elif not ran and not errors:
            line += " (no test of this tier collected)"
        lines.append(line)
    return lines


def pytest_runtest_logreport(report):
    _tier_logreport(report)
    if "comfyui" not in report.keywords or _optional(report):
        return
    if report.when == "call" and not (report.skipped and not hasattr(report, "wasxfail")):
        _STATS["ran"].add(report.nodeid)  # passed, failed or xfailed: it ran
    elif report.skipped:
        _STATS["skipped"].add(report.nodeid)
    elif report.failed and report.when == "setup":
        _STATS["errors"].add(report.nodeid)


def comfyui_status() -> str:
    if comfy_models.COMFYUI_ROOT is not None:
        return f"ComfyUI at {comfy_models.COMFYUI_ROOT}"
    try:
        return f"ComfyUI at {comfy_models.find_comfyui()}"
    except comfy_models.ComfyUINotFound as e:
        return f"{SKIP_PREFIX}: {e}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    ran = _STATS["ran"]
    skipped = _STATS["skipped"] - ran
    errors = _STATS["errors"] - ran
    line = f"ComfyUI integration tests: {len(ran)} ran, {len(skipped)} skipped"
    if errors:
        line += f", {len(errors)} errored before running"
    terminalreporter.write_line(f"{line} ({comfyui_status()})")
    for tier_line in tier_lines():
        terminalreporter.write_line(tier_line)
    for marker, label in OPTIONAL.items():
        st = _TIER_STATS.get(marker)
        if st is None:
            continue
        skipped = {k: v for k, v in st["skipped"].items() if k not in st["ran"]}
        line = f"{label}: {len(st['ran'])} ran, {len(skipped)} skipped"
        if skipped:
            line += f" ({next(iter(skipped.values()))})"
        terminalreporter.write_line(line)
