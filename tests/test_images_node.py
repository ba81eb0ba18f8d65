"""OFT Load Training Images (nodes/images_node.py): a folder of the input directory as one IMAGE batch per size.

Through ComfyUI's executor it runs in the shipped training workflows (tests/test_train_node.py, the server and
browser tiers); here its contract: sizes, order, values, orientation, modes, scaling, and every bad input refused
with the file or folder named.
"""

import asyncio
import math

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.comfyui


@pytest.fixture()
def node(comfyui_oft, monkeypatch, tmp_path):
    import folder_paths
    from comfyui_oft.nodes import images_node

    (tmp_path / "input").mkdir()
    monkeypatch.setattr(folder_paths, "input_directory", str(tmp_path / "input"))
    return images_node


def _rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _folder(tmp_path, name="set"):
    path = tmp_path / "input" / name
    path.mkdir()
    return path


def test_one_batch_per_size_in_file_name_order_with_exact_values(node, tmp_path):
    d = _folder(tmp_path)
    pixels = {"b.png": _rgb(8, 8, 1), "a.png": _rgb(8, 8, 2), "c.png": _rgb(16, 8, 3), "d.PNG": _rgb(8, 8, 4)}
    for name, rows in pixels.items():
        Image.fromarray(rows).save(d / name)
    (d / "notes.txt").write_text("not an image")
    (d / "sub").mkdir()
    Image.fromarray(_rgb(8, 8, 5)).save(d / "sub" / "e.png")  # subfolders are not read
    batches, names = node.images_by_size("set")
    assert names == [["a.png", "b.png", "d.PNG"], ["c.png"]]
    assert [tuple(b.shape) for b in batches] == [(3, 8, 8, 3), (1, 16, 8, 3)]
    for batch, group in zip(batches, names):
        assert batch.dtype == torch.float32
        for rows, name in zip(batch, group):
            assert torch.equal(rows, torch.from_numpy(pixels[name].astype(np.float32) / 255.0))
    out = node.OFTLoadImages.execute("set", 0)
    assert len(out.result[0]) == 2 and torch.equal(out.result[0][1], batches[1])


def test_orientation_alpha_and_16_bit_as_comfyuis_load_image(node, tmp_path):
    d = _folder(tmp_path)
    rows = _rgb(8, 16, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(rows).save(d / "a_rotated.png", exif=exif)
    rgba = np.dstack([rows, np.full((8, 16), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(d / "b_alpha.png")
    Image.fromarray(np.full((8, 16), 25500, np.uint16)).save(d / "c_16bit.png")  # a 16-bit greyscale PNG
    batches, names = node.images_by_size("set")
    assert names == [["a_rotated.png"], ["b_alpha.png", "c_16bit.png"]]
    rotated = batches[0][0]
    assert rotated.shape == (16, 8, 3)
    assert torch.equal(rotated, torch.from_numpy(np.rot90(rows, k=-1).astype(np.float32) / 255.0))
    assert torch.equal(batches[1][0], torch.from_numpy(rows.astype(np.float32) / 255.0))  # alpha dropped
    assert torch.allclose(batches[1][1], torch.full((8, 16, 3), 100 / 255.0))  # 25500 / 255 = 100


def test_longer_side_scales_so_one_aspect_ratio_is_one_batch(node, tmp_path):
    d = _folder(tmp_path)
    Image.fromarray(_rgb(8, 16, 0)).save(d / "small.png")
    Image.fromarray(_rgb(32, 64, 1)).save(d / "large.png")
    Image.fromarray(_rgb(24, 24, 2)).save(d / "square.png")
    batches, names = node.images_by_size("set", 32)
    assert names == [["large.png", "small.png"], ["square.png"]]
    assert [tuple(b.shape) for b in batches] == [(2, 16, 32, 3), (1, 32, 32, 3)]
    expected = np.asarray(Image.fromarray(_rgb(32, 64, 1)).resize((32, 16), Image.Resampling.LANCZOS))
    assert torch.equal(batches[0][0], torch.from_numpy(expected.astype(np.float32) / 255.0))


@pytest.mark.parametrize("folder", ["../elsewhere", "/etc", "", "  ", None, 3, "link_out", ".", "missing"])
def test_folders_outside_the_input_directory_or_missing_are_refused(node, tmp_path, folder):
    from comfyui_oft.oft_core import OFTError

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.fromarray(_rgb(8, 8, 0)).save(outside / "secret.png")
    (tmp_path / "input" / "link_out").symlink_to(outside, target_is_directory=True)
    with pytest.raises(OFTError, match="input directory|no such folder") as e:
        node.images_by_size(folder)
    assert str(tmp_path / "input") in str(e.value)


def test_an_empty_folder_and_an_unreadable_file_are_named(node, tmp_path):
    from comfyui_oft.oft_core import OFTError

    d = _folder(tmp_path)
    (d / "readme.txt").write_text("x")
    with pytest.raises(OFTError, match=r"no images in the folder \(expected files ending in .png") as e:
        node.images_by_size("set")
    assert str(d) in str(e.value)
    Image.fromarray(_rgb(8, 8, 0)).save(d / "good.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(OFTError, match="not an image this loader can read") as e:
        node.images_by_size("set")
    assert str(d / "broken.png") in str(e.value)


@pytest.mark.parametrize("longer_side", [-8, 10**9, math.nan, math.inf, 16.0, True, "32", None])
def test_longer_side_must_be_an_integer_in_range(node, tmp_path, longer_side):
    from comfyui_oft.oft_core import OFTError

    Image.fromarray(_rgb(8, 8, 0)).save(_folder(tmp_path) / "a.png")
    with pytest.raises(OFTError, match="longer_side: expected an integer from 0 to 8192"):
        node.images_by_size("set", longer_side)


def test_images_over_the_pixel_limit_are_refused_before_decoding(node, tmp_path, monkeypatch):
    from comfyui_oft.oft_core import OFTError

    d = _folder(tmp_path)
    Image.fromarray(_rgb(16, 16, 0)).save(d / "big.png")
    monkeypatch.setattr(node, "MAX_PIXELS", 200)
    with pytest.raises(OFTError, match=r"image too large: 16×16, at most 200 pixels \(set longer_side") as e:
        node.images_by_size("set")
    assert str(d / "big.png") in str(e.value)
    assert [b.shape for b in node.images_by_size("set", 8)[0]] == [(1, 8, 8, 3)]  # scaled down first: accepted
    with pytest.raises(OFTError, match=r"image too large: 24×24 after scaling"):
        node.images_by_size("set", 24)


def test_fingerprint_follows_the_folders_images(node, tmp_path):
    import os

    d = _folder(tmp_path)
    Image.fromarray(_rgb(8, 8, 0)).save(d / "a.png")
    first = node.OFTLoadImages.fingerprint_inputs("set", 0)
    assert first == node.OFTLoadImages.fingerprint_inputs("set", 0)
    assert first != node.OFTLoadImages.fingerprint_inputs("set", 8)
    Image.fromarray(_rgb(8, 8, 1)).save(d / "b.png")
    second = node.OFTLoadImages.fingerprint_inputs("set", 0)
    assert second != first
    stat = os.stat(d / "a.png")
    Image.fromarray(_rgb(8, 8, 2)).save(d / "a.png")
    os.utime(d / "a.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert node.OFTLoadImages.fingerprint_inputs("set", 0) != second
    bad = node.OFTLoadImages.fingerprint_inputs("missing", 0)
    assert bad != bad  # NaN: never cached, so execute() reports the missing folder


def test_under_comfyuis_executor_a_changed_folder_reloads_and_an_unchanged_one_is_cached(comfyui_oft, monkeypatch,
                                                                                          tmp_path):
    """OFT Load Training Images → Preview Image through ComfyUI's validate_prompt and one PromptExecutor, three times:
    the first run reads the folder; after an image is added the loader runs again (its fingerprint changed) and
    gives both; queued again unchanged, ComfyUI takes the loader from its cache."""
    import folder_paths
    import test_nodes_workflows as workflows
    from comfyui_oft.nodes import comfy_entrypoint

    import nodes

    for name in ("input", "temp"):
        (tmp_path / name).mkdir()
    monkeypatch.setattr(folder_paths, "input_directory", str(tmp_path / "input"))
    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path / "temp"))
    asyncio.run(nodes.init_builtin_extra_nodes())
    for cls in asyncio.run(comfy_entrypoint().get_node_list()):
        nodes.NODE_CLASS_MAPPINGS[cls.GET_SCHEMA().node_id] = cls
    d = _folder(tmp_path)
    Image.fromarray(_rgb(8, 8, 0)).save(d / "a.png")
    prompt = {"1": {"class_type": "OFTLoadImages", "inputs": {"folder": "set", "longer_side": 0}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    executor = workflows._executor(workflows._Server())

    def run(prompt_id):
        import copy

        import execution

        queued = copy.deepcopy(prompt)  # each /prompt is a new dict (the executor writes "is_changed" into it)
        ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, queued, None))
        assert ok, (error, node_errors)
        executor.execute(queued, prompt_id, {}, outputs)
        assert executor.success, executor.status_messages
        cached = [m[1]["nodes"] for m in executor.status_messages if m[0] == "execution_cached"]
        shown = executor.history_result["outputs"].get("2")  # (ComfyUI 0.8 leaves a cached node's out)
        return (len(shown["images"]) if shown else None), "1" in cached[0]

    assert run("first") == (1, False)
    Image.fromarray(_rgb(8, 8, 1)).save(d / "b.png")
    assert run("added") == (2, False)
    assert run("again")[1] is True
