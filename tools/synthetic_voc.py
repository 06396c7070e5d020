"""Command line of the synthetic VOC-layout generator (the generator itself: datamodules/synthetic_voc.py).

    python -m tools.synthetic_voc OUT_DIR --train 1000 --val 200 --size 128 --seed 0 [--workers 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from datamodules.synthetic_voc import (
    CLASS_SHAPES,
    CLASS_TEXTURES,
    MARKER_NAME,
    VOC_CLASSES,
    ForeignDirectoryError,
    _voc_dir,
    generate_synthetic_voc,
)
from tools.cli import OneLineParser, ToolInputError


# option → (smallest, largest) value
LIMITS = {"--train": (1, 999_999), "--val": (1, 999_999), "--size": (16, 4096), "--seed": (0, None), "--workers": (0, None)}


def _build_parser() -> argparse.ArgumentParser:
    classes = ", ".join(f"{i}:{c}={CLASS_SHAPES[i]}/{CLASS_TEXTURES[i]}" for i, c in enumerate(VOC_CLASSES) if i)
    parser = OneLineParser(
        prog="python -m tools.synthetic_voc",
        description=(
            "Generate a synthetic dataset in the Pascal VOC 2012 segmentation layout "
            "(OUT_DIR/VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,SegmentationObject,ImageSets/Segmentation}). "
            "Each image holds 1-3 objects; a class is given by its shape and its fine texture, never by colour. "
            "Read it with torchvision.datasets.VOCSegmentation(OUT_DIR, year='2012', image_set='train'|'val')."
        ),
        epilog=f"Classes (index:name=shape/texture): {classes}",
    )
    parser.add_argument(
        "out_dir", metavar="OUT_DIR",
        help=f"root folder to write (VOCdevkit/ and the {MARKER_NAME} marker go inside it): new, empty, or a "
        "dataset this generator wrote, which is replaced; any other folder is refused",
    )
    parser.add_argument("--train", type=int, default=200, metavar="N", help="training images, >= 1 (default: %(default)s)")
    parser.add_argument("--val", type=int, default=50, metavar="M", help="validation images, >= 1 (default: %(default)s)")
    parser.add_argument("--size", type=int, default=64, metavar="S", help="image side in px, >= 16 (default: %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, metavar="K",
        help="random seed, >= 0; the same seed gives byte-identical files (default: %(default)s)",
    )
    parser.add_argument(
        "--workers", "--num-workers", dest="workers", type=int, default=0, metavar="W",
        help="worker processes; 0 renders in this process; output does not depend on it (default: %(default)s)",
    )
    return parser


def _check_limits(args: argparse.Namespace) -> None:
    for option, (low, high) in LIMITS.items():
        value = getattr(args, option[2:])
        if value < low or (high is not None and value > high):
            valid = f"{low} to {high}" if high is not None else f">= {low}"
            raise ToolInputError(f"{option} must be {valid}, got {value}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = _build_parser().parse_args(argv)
        _check_limits(args)
    except ToolInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        root = generate_synthetic_voc(
            args.out_dir, args.train, args.val, args.size, args.seed, num_workers=args.workers
        )
    except ForeignDirectoryError as exc:  # nothing was written: a usage error, like a bad flag
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: could not write {args.out_dir}: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    print(
        f"wrote {args.train} train + {args.val} val images of {args.size}x{args.size} px (seed {args.seed}) "
        f"to {_voc_dir(root).resolve()} in {elapsed:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
