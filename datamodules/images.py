"""Reading images from disk with errors that name the file and say what is wrong with it."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image, read_file


from datamodules.errors import DataError  # noqa: E402,F401  (raised here; importable without torch from errors)

# File signatures of the formats torchvision and PIL decode here (the first bytes of the file).
_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
               (b"BM", "BMP"))
# What decoders add that says nothing about the file: torchvision's C++ source location
# ("decode_jpeg, /__w/vision/.../decode_jpeg.cpp:171, ") and PIL's repr of the buffer it read from
# ("cannot identify image file <_io.BytesIO object at 0x7f...>").
_SOURCE_LOCATION = re.compile(r"^[^,]+, \S+\.(?:cpp|h|c):\d+, ")
_PYTHON_OBJECT = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")


def image_format(head: bytes) -> str | None:
    """'JPEG', 'PNG', 'GIF', 'BMP' or 'WEBP' from a file's first bytes; None when it is none of them."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((name for signature, name in _SIGNATURES if head.startswith(signature)), None)


def _decoder_message(err: BaseException) -> str:
    text = " ".join(str(err).split())
    text = _PYTHON_OBJECT.sub("", _SOURCE_LOCATION.sub("", text)).strip()
    return text or type(err).__name__


def undecodable(path: str | Path, err: BaseException) -> DataError:
    """The one-line error for an image file a decoder failed on: the path and what is wrong with the file, found
    from the file itself (missing, empty, not an image at all, or an image whose data is damaged), never a
    Python object or a decoder's source location."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        return DataError(f"cannot decode image {path}: the file does not exist")
    except OSError as os_err:
        return DataError(f"cannot decode image {path}: cannot read it ({os_err.strerror or os_err})")
    if size == 0:
        return DataError(f"cannot decode image {path}: the file is empty (0 bytes)")
    found = image_format(head)
    if found is None:
        start = head.decode("ascii", "replace") if all(32 <= b < 127 or b in b"\t\r\n" for b in head) else None
        shown = f"the text {start!r}" if start is not None else f"the bytes {head[:8].hex(' ')}"
        return DataError(f"cannot decode image {path}: it is not an image file (it starts with {shown}, not a JPEG, "
                         f"PNG, GIF, BMP or WEBP signature)")
    return DataError(f"cannot decode image {path}: its {found} data is damaged or truncated ({size} bytes; the "
                     f"decoder says: {_decoder_message(err)})")


def load_rgb(path: str | Path) -> torch.Tensor:
    """Decode a JPEG/PNG into a uint8 (3, H, W) tensor (libjpeg-turbo; no PIL round trip)."""
    try:
        data = read_file(str(path))
        return decode_image(data, mode=ImageReadMode.RGB)
    except Exception as err:  # noqa: BLE001 - torchvision raises RuntimeError/ValueError depending on damage
        raise undecodable(path, err) from None
