"""16-bit grayscale images: scaled by the bit depth the file declares, not by their own range."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from PIL import PngImagePlugin

from mrcnn_jax.data import coco as coco_lib


def _save_png16(path, values, significant_bits=None):
  img = Image.fromarray(np.asarray(values, np.uint16).reshape(1, -1))
  assert img.mode == "I;16"
  info = None
  if significant_bits is not None:
    info = PngImagePlugin.PngInfo()
    info.add(b"sBIT", bytes([significant_bits]))
  img.save(path, format="PNG", pnginfo=info)
  return str(path)


def _decode_gray(path):
  got = coco_lib.decode_image_rgb(path)
  assert got.dtype == np.uint8 and got.shape[2] == 3
  assert np.array_equal(got[..., 0], got[..., 1]) and np.array_equal(got[..., 0], got[..., 2])
  return got[0, :, 0].tolist()


def test_full_range_16_bit(tmp_path):
  """No sBIT: 0..65535 onto 0..255, rounded; a dark image stays dark (max 255 -> 1)."""
  path = _save_png16(tmp_path / "a.png", [0, 128, 255, 257 * 100, 32767, 32768, 65535])
  assert _decode_gray(path) == [0, 0, 1, 100, 127, 128, 255]
  dark = _save_png16(tmp_path / "b.png", [0, 100, 255])
  assert _decode_gray(dark) == [0, 0, 1]


def test_12_bit_in_16_bit_png_with_sbit(tmp_path):
  """sBIT = 12, samples in the low 12 bits: 0..4095 onto 0..255."""
  path = _save_png16(tmp_path / "a.png", [0, 1000, 2048, 4000, 4095], significant_bits=12)
  assert _decode_gray(path) == [0, 62, 128, 249, 255]


def test_sbit_with_samples_in_the_high_bits(tmp_path):
  """The PNG spec's sBIT layout (12-bit samples shifted left by 4) keeps the 16-bit range."""
  path = _save_png16(tmp_path / "a.png", np.array([0, 1000, 2048, 4095]) << 4,
                     significant_bits=12)
  assert _decode_gray(path) == [0, 62, 128, 255]
  # A dark image in that layout (every sample < 4096, all multiples of 16) is not brightened.
  dark = _save_png16(tmp_path / "b.png", np.array([0, 50, 100, 200]) << 4, significant_bits=12)
  assert _decode_gray(dark) == [0, 3, 6, 12]


def test_8_bit_in_16_bit_png_with_sbit(tmp_path):
  path = _save_png16(tmp_path / "a.png", [0, 1, 128, 255], significant_bits=8)
  assert _decode_gray(path) == [0, 1, 128, 255]


def test_12_bit_without_sbit_uses_the_16_bit_range(tmp_path):
  """Without a declared depth the file is 16-bit: no per-image stretch."""
  path = _save_png16(tmp_path / "a.png", [0, 2048, 4095])
  assert _decode_gray(path) == [0, 8, 16]


def test_32_bit_integer_image_out_of_16_bit_range_is_refused(tmp_path):
  path = str(tmp_path / "a.tif")
  Image.fromarray(np.array([[0, 70000]], np.int32)).save(path)
  with pytest.raises(ValueError, match="outside 0..65535"):
    coco_lib.decode_image_rgb(path)
  ok = str(tmp_path / "b.tif")
  Image.fromarray(np.array([[0, 65535]], np.int32)).save(ok)
  assert _decode_gray(ok) == [0, 255]
