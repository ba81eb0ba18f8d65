"""Fixtures of the `browser` tier: ComfyUI's own frontend in headless Chromium, driven by Python playwright, against
a real server of tests/comfy_server.py (its own, not the `server` tier's shared one). The work is in frontend.py.

- `browser_server` (session): a server with the files the shipped workflows name (tiny SD1.5 checkpoint under the
  SD1.5 name, OFT fixture adapters under the adapter names, empty FLUX files, a training image folder).
- `comfy_page` (per module): one Chromium page with that server's frontend loaded (a `frontend.BrowserSession`).
  Every test in tests/browser is marked `browser`.
- `BrowserSession.failure_shot(name)`: a context manager that, when the block fails, saves a screenshot into the
  session's failure folder (a temp folder) and names the file in the failure message.

Prerequisites, each a skip with its reason when missing: ComfyUI (COMFYUI_PATH or the default folder), the Python
package playwright (scripts/run.sh installs it) and a Chromium executable (OFT_CHROMIUM, else /usr/bin/chromium or
`chromium` on PATH; .ci/run installs Debian's package). Playwright's own browser download is never used.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import comfy_models
import comfy_server as harness
import frontend
import pytest

BROWSER_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if BROWSER_DIR in Path(str(item.fspath)).resolve().parents and item.get_closest_marker("browser") is None:
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def browser_server(fixtures_dir):
    """The browser tier's ComfyUI server (a private folder with the files the workflows and the report test name)."""
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("the Python package playwright is not installed (bash scripts/run.sh installs it): browser tests "
                    "skipped")
    if frontend.chromium_executable() is None:
        pytest.skip("no Chromium executable (OFT_CHROMIUM, /usr/bin/chromium or chromium on PATH; .ci/run installs "
                    "Debian's chromium): browser tests skipped")
    try:
        comfy_root = harness.find_comfyui()
    except comfy_models.ComfyUINotFound as e:
        pytest.skip(f"ComfyUI not found ({e}): browser tests skipped")
    # A server of its own (not the server tier's shared one): the files installed here under the workflows' names
    # would otherwise decide what the server tier's workflow runs load.
    with tempfile.TemporaryDirectory(prefix="oft-browser-comfyui-") as tmp:
        base = harness.private_comfyui(Path(tmp) / "ComfyUI", comfy_root=comfy_root)
        harness.install_checkpoint(base)
        frontend.install_workflow_files(base, fixtures_dir)
        frontend.install_report_files(base, fixtures_dir)
        with harness.ComfyServer(base) as server:
            yield server


@pytest.fixture(scope="session")
def failure_shots():
    shots = Path(tempfile.mkdtemp(prefix="oft-browser-failures-"))
    yield shots
    if not any(shots.iterdir()):
        shots.rmdir()


@pytest.fixture(scope="module")
def comfy_page(browser_server, failure_shots):
    """A Chromium page on the browser server's frontend, per test module: playwright's sync API runs an asyncio loop
    in this thread while it is open, and tests of other tiers call asyncio.run(), so it is closed after the module."""
    with frontend.open_frontend(browser_server, failure_shots) as session:
        yield session
