"""sensor_msgs/Image <-> numpy without cv_bridge (no working cv_bridge wheel exists for these ROS wheels).

Decoding validates every field a bad publisher can get wrong and raises :class:`ImageDecodeError` with a
reason a node can log and count; it never returns a silently wrong array.
"""
from __future__ import annotations

import numpy as np

# encoding -> (channels, dtype, channel order to reach RGB)
_ENCODINGS = {
    "rgb8": (3, np.uint8, None),
    "bgr8": (3, np.uint8, [2, 1, 0]),
    "rgba8": (4, np.uint8, [0, 1, 2]),
    "bgra8": (4, np.uint8, [2, 1, 0]),
    "mono8": (1, np.uint8, None),
}


class ImageDecodeError(ValueError):
    """A camera message that cannot be turned into an RGB frame; ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def decode_rgb(encoding: str, height: int, width: int, step: int, data, is_bigendian: int = 0,
               expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Return an (H, W, 3) uint8 RGB array (a copy, safe to keep after the message is gone)."""
    enc = encoding.lower()
    if enc not in _ENCODINGS:
        raise ImageDecodeError("encoding", f"unsupported encoding {encoding!r} (supported: {', '.join(_ENCODINGS)})")
    channels, dtype, order = _ENCODINGS[enc]
    if height <= 0 or width <= 0:
        raise ImageDecodeError("size", f"empty image {width}x{height}")
    if expected_hw is not None and (height, width) != tuple(expected_hw):
        raise ImageDecodeError("size", f"got {width}x{height}, expected {expected_hw[1]}x{expected_hw[0]}")
    row_bytes = width * channels * np.dtype(dtype).itemsize
    if step < row_bytes:
        raise ImageDecodeError("step", f"step {step} < {row_bytes} bytes per row")
    buf = np.frombuffer(memoryview(data), dtype=np.uint8)
    if buf.size != step * height:
        raise ImageDecodeError("data", f"data has {buf.size} bytes, expected step*height = {step * height}")
    img = buf.reshape(height, step)[:, :row_bytes].reshape(height, width, channels)
    if channels == 1:
        return np.repeat(img, 3, axis=2)
    if order is not None:
        img = img[:, :, order]
    return np.ascontiguousarray(img)


def decode_image_msg(msg, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    return decode_rgb(msg.encoding, msg.height, msg.width, msg.step, msg.data, msg.is_bigendian, expected_hw)


def decode_compressed_msg(msg) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg/png) -> RGB, via Pillow."""
    import io

    from PIL import Image as PILImage

    try:
        with PILImage.open(io.BytesIO(bytes(msg.data))) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as exc:  # Pillow raises many types for garbage input
        raise ImageDecodeError("compressed", f"cannot decode {msg.format!r}: {exc}") from exc


def encode_image_msg(rgb: np.ndarray, stamp, frame_id: str):
    """numpy RGB -> sensor_msgs/Image. ``tobytes()`` first: assigning a numpy array to ``data`` is ~80x slower."""
    from sensor_msgs.msg import Image

    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected HxWx3 uint8, got {rgb.shape} {rgb.dtype}")
    msg = Image()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(rgb.shape[0]), int(rgb.shape[1])
    msg.encoding = "rgb8"
    msg.is_bigendian = 0
    msg.step = msg.width * 3
    msg.data = np.ascontiguousarray(rgb).tobytes()
    return msg
