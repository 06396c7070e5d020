"""Reading images from disk with errors that name the file."""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image, read_file


from datamodules.errors import DataError  # noqa: E402,F401  (raised here; importable without torch from errors)


def load_rgb(path: str | Path) -> torch.Tensor:
    """Decode a JPEG/PNG into a uint8 (3, H, W) tensor (libjpeg-turbo; no PIL round trip)."""
    try:
        data = read_file(str(path))
        return decode_image(data, mode=ImageReadMode.RGB)
    except Exception as err:  # noqa: BLE001 - torchvision raises RuntimeError/ValueError depending on damage
        reason = " ".join(str(err).split()) or type(err).__name__  # one line, whatever the decoder says
        raise DataError(f"cannot decode image {path}: {reason}") from None
