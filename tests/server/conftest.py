"""Fixtures of the `server` tier: a real ComfyUI main.py process (tests/comfy_server.py does the work).

`server_adapter` (session): a kohya OFT file trained on that server from the tiny checkpoint (2 steps).
`comfy_server` (session): the one shared server of this pytest process (`comfy_server.shared_server()`), with the
tiny SD1.5 checkpoint installed; every test that uses it is marked `server`. Without ComfyUI the tests are skipped
with the reason; a server that fails to start is an error (its log tail is in the message).
"""

from __future__ import annotations

from pathlib import Path

import comfy_models
import comfy_server as harness
import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "comfy_server" in getattr(item, "fixturenames", ()) and item.get_closest_marker("server") is None:
            item.add_marker(pytest.mark.server)


@pytest.fixture(scope="session")
def comfy_server():
    """The shared server; at the end of the session one line says its startup time and the CPU time it used (the
    tier's own cost, apart from the machine's load)."""
    try:
        server = harness.shared_server()
    except comfy_models.ComfyUINotFound as e:
        pytest.skip(f"ComfyUI not found ({e}): real-server tests skipped")
    yield server
    cpu = server.cpu_seconds()
    _SERVER_LINES.append(f"ComfyUI server (server tier): started in {server.startup_seconds:.1f}s, used "
                         f"{cpu or 0:.1f}s of CPU")
    harness.stop_shared_server()


_SERVER_LINES: list[str] = []


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # (written here, not in the fixture's teardown: output during a test's teardown is captured and dropped)
    for line in _SERVER_LINES:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def server_adapter(comfy_server):
    """Path of an OFT adapter the server trained (CheckpointLoaderSimple → images → VAE Encode → OFTTrainer → OFT
    Save, 2 steps), under the server's output/loras."""
    base = comfy_server.base
    harness.write_images(base / "input" / "oft_server_adapter", n=2, size=64)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": harness.CHECKPOINT_NAME}},
        "2": {"class_type": "OFTLoadImages", "inputs": {"folder": "oft_server_adapter", "longer_side": 0}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo"}},
        "5": {"class_type": "OFTTrainer", "inputs": {
            "model": ["1", 0], "latents": ["3", 0], "positive": ["4", 0], "steps": 2, "learning_rate": 1e-2,
            "batch_size": 1, "grad_accumulation": 1, "optimizer": "AdamW", "seed": 1, "num_blocks": 4,
            "constraint": 0.0, "cayley_neumann": False, "neumann_terms": 5, "targets": "attention",
            "training_dtype": "fp32", "gradient_checkpointing": True}},
        "6": {"class_type": "OFTSave", "inputs": {"oft_adapter": ["5", 1], "format": "kohya",
                                                  "filename_prefix": "loras/oft_server_adapter",
                                                  "fractional_block_strength": "refuse"}},
    }
    entry = comfy_server.run(prompt)
    text = " ".join(entry["outputs"]["6"]["text"])
    return Path(text.split("\n", 1)[0].rsplit(": ", 1)[1].strip())  # line 1; "note: …" lines may follow
