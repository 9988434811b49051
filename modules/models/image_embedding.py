"""Textual-inversion embeddings stored inside images (A1111's "embedding as image" PNG/WEBP files).

A1111 writes the embedding twice (facts of its format, implemented here from scratch):

* a PNG text chunk ``sd-ti-embedding``: base64 of a JSON object in which every tensor is written as
  ``{"TORCHTENSOR": nested lists of numbers}``;
* the image data itself: the zlib-compressed same JSON, split into low and high nibbles, each nibble
  block XOR-ed with a fixed LCG stream (seed 0, a=1664525, c=1013904223, m=2**32, value mod 255, low
  4 bits) and laid out row-major in RGB pixels left (low nibbles) and right (high nibbles) of the
  picture, with a one-pixel black column between each block and the picture, on a black border.

Decoding is data only: JSON (never pickle), tensors become float32 numpy arrays, and every size is
bounded (text length, pixel count, decompressed bytes, number count). Torch-free.
"""
from __future__ import annotations

import base64
import binascii
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np

TEXT_CHUNK = "sd-ti-embedding"
IMAGE_SUFFIXES = (".png", ".webp")
MAX_JSON_BYTES = 32 * 1024 * 1024        # decompressed/decoded JSON of one embedding
MAX_NUMBERS = 4 * 1024 * 1024            # floats in all its tensors together
MAX_IMAGE_PIXELS = 4096 * 4096           # read from the header before anything is decoded


class ImageEmbeddingError(ValueError):
    """The image carries embedding data that cannot be read safely."""


_LCG_A, _LCG_C, _LCG_M = 1664525, 1013904223, 2 ** 32
_LCG_BLOCK = 4096


def _lcg_nibbles(count: int) -> np.ndarray:
    """The first `count` values of A1111's LCG stream, low 4 bits (hand-written: the format's own PRNG).

    One Python loop for the first block, then the stream doubles at each step: L steps of the generator
    are the affine map s -> A_L*s + C_L (mod 2**32), and A_L*s + C_L < 2**64 fits numpy's uint64."""
    stream = np.empty(min(count, _LCG_BLOCK), dtype=np.uint64)
    state = 0
    for i in range(len(stream)):
        state = (_LCG_A * state + _LCG_C) % _LCG_M
        stream[i] = state
    a_l, c_l = 1, 0
    for _ in range(len(stream)):
        a_l, c_l = (_LCG_A * a_l) % _LCG_M, (_LCG_A * c_l + _LCG_C) % _LCG_M
    while len(stream) < count:
        step = len(stream)
        more = (stream[:count - step] * np.uint64(a_l) + np.uint64(c_l)) & np.uint64(_LCG_M - 1)
        stream = np.concatenate([stream, more])
        a_l, c_l = (a_l * a_l) % _LCG_M, (a_l * c_l + c_l) % _LCG_M   # the map for twice as many steps
    return ((stream.astype(np.uint32) % np.uint32(255)) & np.uint32(0x0F)).astype(np.uint8)


def _unxor(block: np.ndarray) -> np.ndarray:
    return block ^ _lcg_nibbles(block.size).reshape(block.shape)


def _crop_black(pixels: np.ndarray) -> np.ndarray:
    """Drop the rows and columns at the borders where no pixel has all three channels above 0."""
    lit = (pixels > 0).all(axis=2)
    cols, rows = np.flatnonzero(lit.any(axis=0)), np.flatnonzero(lit.any(axis=1))
    if not len(cols) or not len(rows):
        return pixels[:0, :0]
    return pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _inflate(data: bytes) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_JSON_BYTES + 1)
    except zlib.error as exc:
        raise ImageEmbeddingError(f"embedded data is not zlib data ({exc})") from None
    if len(out) > MAX_JSON_BYTES:
        raise ImageEmbeddingError(f"embedded data is larger than {MAX_JSON_BYTES} bytes")
    return out


def data_from_pixels(image) -> dict[str, Any] | None:
    """The embedding hidden in the image data, or None when the image has none."""
    pixels = _crop_black(np.asarray(image.convert("RGB"), dtype=np.uint8)) & 0x0F
    empty_cols = np.flatnonzero(pixels.sum(axis=(0, 2)) == 0)
    if len(empty_cols) < 2:
        return None
    low = pixels[:, :empty_cols.min(), :]
    high = pixels[:, empty_cols.max() + 1:, :]
    if low.shape != high.shape or low.size == 0:
        return None
    packed = ((_unxor(high) << 4) | _unxor(low)).tobytes()
    try:
        return decode_json(_inflate(packed))
    except ImageEmbeddingError:
        return None  # an ordinary picture with black columns, not an embedding


def _tensor_hook(counter: list[int]):
    def hook(obj: dict) -> Any:
        if "TORCHTENSOR" not in obj:
            return obj
        try:
            array = np.asarray(obj["TORCHTENSOR"], dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ImageEmbeddingError(f"a tensor in the embedding is not a list of numbers ({exc})") from None
        counter[0] += array.size
        if counter[0] > MAX_NUMBERS:
            raise ImageEmbeddingError(f"the embedding holds more than {MAX_NUMBERS} numbers")
        return array
    return hook


def decode_json(raw: bytes | str) -> dict[str, Any]:
    """A1111's JSON with ``TORCHTENSOR`` objects -> a dict whose tensors are float32 numpy arrays."""
    if len(raw) > MAX_JSON_BYTES:
        raise ImageEmbeddingError(f"embedded data is larger than {MAX_JSON_BYTES} bytes")
    try:
        data = json.loads(raw, object_hook=_tensor_hook([0]))
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, ImageEmbeddingError):
            raise
        raise ImageEmbeddingError(f"embedded data is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ImageEmbeddingError("embedded data is not a JSON object")
    return data


def data_from_text(text: str) -> dict[str, Any]:
    try:
        raw = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise ImageEmbeddingError(f"the {TEXT_CHUNK} chunk is not base64 ({exc})") from None
    return decode_json(raw)


def read_image_embedding(path: Path) -> dict[str, Any] | None:
    """The embedding data of an image file: its text chunk, else its pixels; None for a plain picture."""
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ImageEmbeddingError(f"{width}x{height} is larger than {MAX_IMAGE_PIXELS} pixels")
        text = getattr(image, "text", None) or {}
        if TEXT_CHUNK in text:
            return data_from_text(text[TEXT_CHUNK])
        return data_from_pixels(image)


def encode_json(data: dict[str, Any]) -> str:
    """The inverse of decode_json (numpy arrays and tensors as ``TORCHTENSOR`` lists); for writers and tests."""
    def default(obj: Any) -> Any:
        if hasattr(obj, "tolist"):
            return {"TORCHTENSOR": obj.tolist()}
        raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
    return json.dumps(data, default=default)


def embed_in_pixels(image, data: dict[str, Any]):
    """A new RGB image: `image` with `data` laid out around it in A1111's data layer (no decoration)."""
    return embed_bytes_in_pixels(image, zlib.compress(encode_json(data).encode(), 9))


def embed_bytes_in_pixels(image, compressed: bytes):
    """The data layer around `image` for already compressed bytes (embed_in_pixels' layout)."""
    from PIL import Image

    packed = np.frombuffer(compressed, dtype=np.uint8)
    height = image.size[1]
    per_column = height * 3
    size = -(-len(packed) // per_column) * per_column
    padded = np.resize(packed, size)  # repeats the data to fill the block; zlib stops at its own end
    blocks = [_unxor((padded & 0x0F).reshape(height, -1, 3)), _unxor((padded >> 4).reshape(height, -1, 3))]
    width = blocks[0].shape[1]
    out = Image.new("RGB", (image.size[0] + 2 * width + 2, height), (0, 0, 0))
    out.paste(Image.fromarray(blocks[0], "RGB"), (0, 0))
    out.paste(image.convert("RGB"), (width + 1, 0))
    out.paste(Image.fromarray(blocks[1], "RGB"), (width + 1 + image.size[0] + 1, 0))
    return out
