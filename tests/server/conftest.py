"""Fixtures of the `server` tier: a real ComfyUI main.py process (tests/comfy_server.py does the work).

`comfy_server` (session): the one shared server of this pytest process (`comfy_server.shared_server()`), with the
tiny SD1.5 checkpoint installed; every test that uses it is marked `server`. Without ComfyUI the tests are skipped
with the reason; a server that fails to start is an error (its log tail is in the message).
"""

from __future__ import annotations

import comfy_models
import comfy_server as harness
import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "server: test against a real ComfyUI main.py process (tests/comfy_server.py)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "comfy_server" in getattr(item, "fixturenames", ()) and item.get_closest_marker("server") is None:
            item.add_marker(pytest.mark.server)


@pytest.fixture(scope="session")
def comfy_server():
    try:
        server = harness.shared_server()
    except comfy_models.ComfyUINotFound as e:
        pytest.skip(f"ComfyUI not found ({e}): real-server tests skipped")
    yield server
    harness.stop_shared_server()
