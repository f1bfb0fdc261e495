"""JPEG decoding on the training device (``data.decode_on=device``): loader workers only read.

Pillow's decode is the floor of any CPU pipeline (~1.5 ms per ImageNet-size JPEG on one core,
BENCHMARKS.md), so at ~1,500 images/s a GPU needs two or three cores for decoding alone. With
``decode_on=device`` a loader worker reads the file, checks its header (format, size, EXIF
orientation, the end-of-image marker) and draws both views' crops from the full size, as it
does for a Pillow decode: 0.15 ms of CPU per image in all (``benchmarks/data.py``); the training device then decodes the step's JPEGs in one
batched call (``torchvision.io.decode_jpeg``, nvJPEG on CUDA), pads them to a common size by
repeating their last row and column (so a bicubic tap past an image's edge reads that edge, as
the clamped taps of a lone image do), and crops and resizes both views of every image in two
batched calls. The colour half follows as for any file batch (``devicefeed.py``).

What stays on the loader: files that are not plain JPEGs (PNG, CMYK, a rotated EXIF
orientation), JPEGs over :data:`MAX_DEVICE_PIXELS` or :data:`MAX_DEVICE_SIDE` (padding a
batch to a 12 MP photo would take gigabytes; the loader's reduced-scale decode is cheap for
those), and files whose header or end marker is broken: Pillow then decodes them and the usual
replacement of bad files applies. A JPEG that passes the header check but fails to decode on the device is handed back
to the loader's code for its batch position (``Batch.recover``), which finds it bad and
replaces it exactly as the Pillow path would (same replacement, same counts).

The decoders differ in their last bit (nvJPEG's IDCT is not libjpeg-turbo's) and the device
decodes in full where Pillow may decode at a reduced scale, so views match the Pillow path's up
to that rounding, not bit for bit; a run keeps one decoder for its whole life, so its resume
stays exact.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import torch
from PIL import Image

# Larger files decode on the loader. The step's decoded JPEGs are padded to the largest height
# and width among them, B x 3 x 1024 x 1024 bytes at worst (1.6 GB at B = 512 per GPU);
# most of ImageNet's images are at most 500 px a side, so a typical step pads to ~500 x 500.
MAX_DEVICE_PIXELS = 1_000_000
MAX_DEVICE_SIDE = 1024


def device_decodable(data: bytes, max_image_pixels: int) -> tuple[int, int] | None:
    """(height, width) of a JPEG the device can decode as Pillow would, else None.

    Reads the header only. None for anything else: not a JPEG, CMYK or other modes, an EXIF
    orientation other than 1, more than :data:`MAX_DEVICE_PIXELS` or ``max_image_pixels``, a
    side over :data:`MAX_DEVICE_SIDE`, no end-of-image marker (truncated), or a header Pillow
    cannot parse.
    """
    if len(data) < 4 or data[:2] != b"\xff\xd8" or not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return None
            if image.getexif().get(0x0112, 1) != 1:
                return None
            width, height = image.size
    except Exception:  # a header Pillow cannot parse: the loader's decode reports why
        return None
    if width * height > min(MAX_DEVICE_PIXELS, max_image_pixels):
        return None
    if max(width, height) > MAX_DEVICE_SIDE:
        return None
    return height, width


def decode(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decodes JPEG bytes to (3, H, W) uint8 on ``device``, batched; None where one fails.

    A batch with a bad image fails as a whole in torchvision, so it is then decoded image by
    image to find which.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if not encoded:
        return []
    # torchvision 0.29 deprecates its decoders in favour of TorchCodec; they are used while
    # they exist (available() says so, and the loader decodes, once they are gone).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of "
                                "TorchVision are deprecated", category=DeprecationWarning)
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            decoded: list[torch.Tensor | None] = []
            for data in encoded:
                try:
                    decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
            return decoded


def pad_to_batch(images: list[torch.Tensor]) -> torch.Tensor:
    """(n, C, H, W): each image padded to the largest height and width by repeating its last
    row and column, so crops inside an image resample exactly as from the image alone."""
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    device = images[0].device
    out = torch.empty(len(images), images[0].shape[0], height, width, dtype=torch.uint8,
                      device=device)  # fmt: skip
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    for slot, image in enumerate(images):
        h, w = image.shape[1:]
        padded = image.index_select(1, rows.clamp(max=h - 1))
        out[slot] = padded.index_select(2, cols.clamp(max=w - 1))
    return out


def available(device: torch.device) -> str | None:
    """None when ``device`` decodes JPEGs; else the reason, for the one-line fallback notice."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 64, 32)).save(buffer, format="JPEG")
    data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    try:
        decode_probe = decode([data], device)
    except Exception as error:  # torchvision built without nvJPEG, an old torchvision, ...
        return f"{type(error).__name__}: {error}"
    if not decode_probe or decode_probe[0] is None:
        return "torchvision could not decode a test JPEG there"
    return None


def fill_decoded(
    batch: Any, loader_pixels: torch.Tensor, augment: Any, device: torch.device
) -> tuple[Any, torch.Tensor]:
    """The batch's (2B, C, S, S) uint8 crops on ``device``: the loader's rows from
    ``loader_pixels`` (2L, C, S, S), the encoded JPEGs decoded and cropped here; a JPEG that
    fails is recovered by the loader's path (``batch.recover``).

    Returns:
        The batch, its indices, colour draws and read counts updated for any recovered
        position (a replacement image has draws of its own), and the crops.
    """
    rows, datas, draws, indices, epochs = zip(*batch.encoded)
    size = len(batch.indices)
    pixels = torch.empty(2 * size, *loader_pixels.shape[1:], dtype=torch.uint8, device=device)
    decoded_rows = set(rows)
    loader_rows = [row for row in range(size) if row not in decoded_rows]
    if loader_rows:
        target = torch.tensor(loader_rows + [size + row for row in loader_rows], device=device)
        pixels.index_copy_(0, target, loader_pixels)
    images = decode(list(datas), device)
    good = [i for i, image in enumerate(images) if image is not None]
    if good:
        padded = pad_to_batch([images[i] for i in good])
        for view in (0, 1):
            params = {key: torch.stack([draws[i][key][view] for i in good]) for key in draws[0]}
            target = torch.tensor([view * size + rows[i] for i in good], device=device)
            pixels.index_copy_(0, target, augment.crop_uint8(padded, params))
    failed = [i for i in range(len(images)) if images[i] is None]
    if not failed:
        return batch, pixels
    batch_indices, params = batch.indices.clone(), {k: v.clone() for k, v in batch.params.items()}
    reads, bad = batch.reads, list(batch.bad)
    for i in failed:
        row = rows[i]
        used, pair, colour, extra_reads, extra_bad = batch.recover(row, indices[i], epochs[i])
        pixels[row] = pair[0].to(device)
        pixels[size + row] = pair[1].to(device)
        batch_indices[row] = used
        for key, value in colour.items():
            params[key][row], params[key][size + row] = value[0], value[1]
        reads, bad = reads + extra_reads, bad + list(extra_bad)
    return batch._replace(indices=batch_indices, params=params, reads=reads, bad=bad), pixels
