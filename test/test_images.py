"""Image decoding: every way a publisher can get an Image wrong gives a typed, countable error."""
from __future__ import annotations

import numpy as np
import pytest

from spanvla_ros.ros.images import ImageDecodeError, decode_rgb


def _img(h=4, w=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_roundtrip_and_padding():
    img = _img()
    assert np.array_equal(decode_rgb("rgb8", 4, 5, 15, img.tobytes()), img)
    padded = np.zeros((4, 16), np.uint8)
    padded[:, :15] = img.reshape(4, 15)
    assert np.array_equal(decode_rgb("rgb8", 4, 5, 16, padded.tobytes()), img)


@pytest.mark.parametrize("enc,make", [
    ("bgr8", lambda x: x[:, :, ::-1]),
    ("rgba8", lambda x: np.concatenate([x, np.full(x.shape[:2] + (1,), 255, np.uint8)], 2)),
    ("bgra8", lambda x: np.concatenate([x[:, :, ::-1], np.zeros(x.shape[:2] + (1,), np.uint8)], 2)),
])
def test_channel_orders(enc, make):
    img = _img()
    raw = np.ascontiguousarray(make(img))
    assert np.array_equal(decode_rgb(enc, 4, 5, raw.shape[1] * raw.shape[2], raw.tobytes()), img)


def test_mono_expands_to_three_channels():
    g = np.arange(20, dtype=np.uint8).reshape(4, 5)
    out = decode_rgb("mono8", 4, 5, 5, g.tobytes())
    assert out.shape == (4, 5, 3) and np.array_equal(out[:, :, 1], g)


@pytest.mark.parametrize("args,reason", [
    (("16UC1", 4, 5, 10, b"\0" * 40), "encoding"),
    (("rgb8", 0, 5, 15, b""), "size"),
    (("rgb8", 4, 5, 14, b"\0" * 56), "step"),
    (("rgb8", 4, 5, 15, b"\0" * 59), "data"),
])
def test_bad_images_raise_typed_errors(args, reason):
    with pytest.raises(ImageDecodeError) as e:
        decode_rgb(*args)
    assert e.value.reason == reason


def test_unexpected_size_is_rejected():
    with pytest.raises(ImageDecodeError, match="expected 6x4"):
        decode_rgb("rgb8", 4, 5, 15, _img().tobytes(), expected_hw=(4, 6))
