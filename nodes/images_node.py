"""OFT Load Training Images: a folder of ComfyUI's input directory as IMAGE batches, one per image size.

Why the pack has its own: the training workflows need a folder loader that exists in every ComfyUI they run in, and
core's changed under them (ComfyUI 0.3.x `LoadImageSetFromFolderNode`, one batch, every image resized to the first
one's size; 0.8 `LoadImageDataSetFromFolder`, a list of single images, no resizing). This one gives the same result
everywhere and what Train OFT trains best from:
- one batch per image size, so images of several sizes train together without distortion (Train OFT takes every
  micro-batch from one size: bucketing);
- file-name order (core lists the folder in the filesystem's order, so the same seed could give another adapter on
  another machine);
- EXIF orientation applied, as ComfyUI's Load Image does; alpha dropped; 16-bit greyscale scaled as Load Image does;
- optionally every image scaled to one longer side first (sizes of the same aspect ratio then share a batch).
"""

from __future__ import annotations

import logging
import os

import folder_paths
import node_helpers
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image, ImageOps, UnidentifiedImageError

from ..oft_core import OFTError

log = logging.getLogger(__name__)

CATEGORY = "training/oft"
EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MAX_LONGER_SIDE = 8192
MAX_PIXELS = MAX_LONGER_SIDE * MAX_LONGER_SIDE  # one image, after any resize (a 64-megapixel float image is 768 MiB)


def folder_path(folder: str) -> str:
    """The absolute path of `folder`, a folder of ComfyUI's input directory (never outside it, links resolved)."""
    base = os.path.realpath(folder_paths.get_input_directory())
    if not isinstance(folder, str) or not folder.strip():
        raise OFTError(f"expected the name of a folder in ComfyUI's input directory, found {folder!r} (put the "
                       "training images in a folder there, refresh the page and pick it in the node's folder "
                       "list)", path=base)
    path = os.path.realpath(os.path.join(base, folder))
    if path == base or os.path.commonpath([base, path]) != base:
        raise OFTError(f"the image folder must be a folder inside the input directory, found {folder!r}", path=base)
    if not os.path.isdir(path):
        raise OFTError("no such folder in the input directory (put the training images in a folder there and pick "
                       "it in the node's folder list)", path=path)
    return path


def image_files(path: str) -> list[str]:
    """The image files of `path` (not its subfolders), sorted by name."""
    names = sorted(n for n in os.listdir(path)
                   if n.lower().endswith(EXTENSIONS) and os.path.isfile(os.path.join(path, n)))
    if not names:
        raise OFTError(f"no images in the folder (expected files ending in {', '.join(EXTENSIONS)})", path=path)
    return names


def load_image(path: str, longer_side: int = 0) -> torch.Tensor:
    """One image as ComfyUI's IMAGE rows: (height, width, 3) float32 in [0, 1]."""
    try:
        with node_helpers.pillow(Image.open, path) as img:
            if not longer_side and img.size[0] * img.size[1] > MAX_PIXELS:  # before decoding it
                raise OFTError(f"image too large: {img.size[0]}×{img.size[1]}, at most {MAX_PIXELS} pixels (set "
                               "longer_side to scale it down)", path=path)
            img = node_helpers.pillow(ImageOps.exif_transpose, img)
            if img.mode.startswith("I;16"):  # newer Pillow opens 16-bit PNGs so; Load Image would clip them
                img = img.convert("I")
            if img.mode == "I":  # 16-bit greyscale, scaled as ComfyUI's Load Image does
                img = img.point(lambda i: i * (1 / 255))
            img = img.convert("RGB")
            w, h = img.size
            if longer_side and max(w, h) != longer_side:
                scale = longer_side / max(w, h)
                w, h = max(1, round(w * scale)), max(1, round(h * scale))
                if w * h > MAX_PIXELS:
                    raise OFTError(f"image too large: {w}×{h} after scaling, at most {MAX_PIXELS} pixels", path=path)
                img = img.resize((w, h), Image.Resampling.LANCZOS)
            if w * h > MAX_PIXELS:
                raise OFTError(f"image too large: {w}×{h}, at most {MAX_PIXELS} pixels (set longer_side to scale "
                               "it down)", path=path)
            rows = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, OFTError):
            raise
        raise OFTError(f"not an image this loader can read ({type(e).__name__}: {e})", path=path) from None
    return torch.from_numpy(rows)


def images_by_size(folder: str, longer_side: int = 0) -> tuple[list[torch.Tensor], list[list[str]]]:
    """The folder's images as batches (n, height, width, 3), one per size in order of first appearance (file-name
    order inside each), and the file names in each."""
    if isinstance(longer_side, bool) or not isinstance(longer_side, int) or not 0 <= longer_side <= MAX_LONGER_SIDE:
        raise OFTError(f"longer_side: expected an integer from 0 to {MAX_LONGER_SIDE}, found {longer_side!r}")
    path = folder_path(folder)
    groups: dict[tuple[int, int], tuple[list, list]] = {}
    for name in image_files(path):
        rows = load_image(os.path.join(path, name), longer_side)
        images, names = groups.setdefault(tuple(rows.shape[:2]), ([], []))
        images.append(rows)
        names.append(name)
    return [torch.stack(images) for images, _ in groups.values()], [names for _, names in groups.values()]


class OFTLoadImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OFTLoadImages",
            display_name="OFT Load Training Images",
            category=CATEGORY,
            description="The images of a folder in ComfyUI's input directory, one batch per image size (file-name "
            "order), for VAE Encode → Train OFT: images of several sizes train together, each micro-batch from one "
            "size.",
            inputs=[
                io.Combo.Input("folder", options=folder_paths.get_input_subfolders(),
                               tooltip="A folder inside ComfyUI's input directory; its images (png, jpg, webp, bmp, "
                               "tif) are read in file-name order, subfolders are not."),
                io.Int.Input("longer_side", default=0, min=0, max=MAX_LONGER_SIDE, step=8,
                             tooltip="0: every image at its own size. Otherwise each image is first scaled "
                             "(Lanczos, aspect ratio kept) so that its longer side has this many pixels; images "
                             "of the same aspect ratio then share a batch."),
            ],
            outputs=[io.Image.Output(display_name="images", is_output_list=True,
                                     tooltip="One IMAGE batch per image size; VAE Encode encodes each, and Train OFT "
                                     "takes the list as it is.")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, longer_side=0):
        """What the folder holds (names, sizes, modification times): a changed image reloads, nothing else does."""
        try:
            path = folder_path(folder)
            stats = [(n, os.stat(os.path.join(path, n))) for n in image_files(path)]
            return [(n, st.st_mtime_ns, st.st_size) for n, st in stats], longer_side
        except (OFTError, OSError):
            return float("nan")  # never equal: execute() then reports the problem

    @classmethod
    def execute(cls, folder, longer_side=0) -> io.NodeOutput:
        batches, names = images_by_size(folder, longer_side)
        log.info("OFT Load Training Images: %d images from %s in %d sizes (%s)", sum(len(n) for n in names), folder,
                 len(batches), ", ".join(f"{b.shape[0]}× {b.shape[2]}×{b.shape[1]}" for b in batches))
        return io.NodeOutput(batches)


NODES = [OFTLoadImages]
