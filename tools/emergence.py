"""The emergence Jaccard of any ViT on a VOC-layout split, in one command — the number DINO reports
(ViT-S/16 on VOC12 val: 45.9 DINO, 27.3 supervised, 22.0 random weights; a fraction here, 0.459).

    python -m tools.emergence --backbone.name vit_small_patch16_224.dino --backbone.pretrained true \\
        --data.root /datasets/voc                                # timm weights (online once)
    python -m tools.emergence --backbone.name vit_small_patch16_224 --backbone.weights dino_deitsmall16_pretrain.pth \\
        --data.root /datasets/voc                                # a local weight file
    python -m tools.emergence --backbone.name vit_small_patch16_224 --data.root /datasets/voc \\
        --backbone.weights runs/<run>/checkpoints/last.ckpt      # one of our checkpoints
    python -m tools.emergence --config runs/<run>/config.yaml --backbone.weights runs/<run>/checkpoints/last.ckpt

Flags: main.py's (``--config``, ``--backbone.*``, ``--data.*``; ``--callbacks.jaccard_protocol`` dino|strict,
``--callbacks.attention_keep`` 0.6, ``--callbacks.emergence_img_size`` 512; ``--data.batch_size`` images per
forward pass, ``--data.num_workers``; ``--log.output_dir``/``--log.run_name``), plus this program's own:
``--split`` (val; train, trainval) and ``--num-images`` (0 = the whole split, else that many, evenly spaced).

The protocol is :mod:`analysis.emergence`'s (``dino`` by default: the public evaluation code behind DINO's
numbers, step by step). Writes, in a fresh run directory ``<output_dir>/<run_name>`` (default
``emergence-<backbone>-<time>``): ``emergence.csv`` and ``emergence.md`` (the best-head Jaccard and each
head's own, the number of images and objects), ``config.yaml`` (main.py's flags as resolved) and
``code/``; prints the headline number. Exit status 0; 2 for a configuration error (one line, before any
data or model is touched), 1 for a data or weight file that cannot be used.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import logging
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from config.loading import ConfigError, parse_config, save_config
from config.validation import validate
from utils.run_dir import save_code_state

if TYPE_CHECKING:
    from analysis.emergence import EmergenceScore

log = logging.getLogger("tools.emergence")

SPLITS = ("val", "train", "trainval")
CSV_FILE, MD_FILE = "emergence.csv", "emergence.md"


@dataclass
class Result:
    run_dir: Path
    score: "EmergenceScore"
    protocol: str
    split: str


def tool_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.emergence", allow_abbrev=False,
        description="Emergence Jaccard (DINO's attention-mask protocol) of a ViT on a VOC-layout split. Also takes "
                    "main.py's flags for the backbone, data, callbacks.jaccard_protocol/attention_keep/"
                    "emergence_img_size and log (see python main.py --help).")
    parser.add_argument("--split", default="val", help="VOC segmentation split: val (default), train or trainval")
    parser.add_argument("--num-images", type=int, default=0,
                        help="score at most this many images, evenly spaced over the split (0 = all, default)")
    return parser


def check(cfg, split: str, num_images: int) -> None:
    """The tool's own config errors (ConfigError), before any data or model is touched."""
    from models.backbones import is_vit, resolve_architecture  # local: a config error is reported before torch loads

    if split not in SPLITS:
        raise ConfigError(f"--split: {split!r} is not one of {', '.join(SPLITS)}")
    if num_images < 0:
        raise ConfigError(f"--num-images must be >= 0 (0 = the whole split), got {num_images}")
    if not is_vit(cfg.backbone.name) or cfg.backbone.name == "pixels":
        raise ConfigError(f"the emergence Jaccard reads a ViT's CLS-token attention; --backbone.name="
                          f"{cfg.backbone.name} has none (use a ViT: vit, vit_small_patch16_224.dino, ...)")
    patch = resolve_architecture(cfg.backbone)["patch_size"]
    size = cfg.callbacks.emergence_img_size
    if size % patch:
        raise ConfigError(f"--callbacks.emergence_img_size={size} is not a multiple of the patch size {patch}; "
                          f"e.g. {max(patch, size // patch * patch)}")


def default_run_name(cfg) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]
    return f"emergence-{cfg.backbone.name.replace('/', '-')}-{stamp}"


def fresh_run_dir(cfg) -> Path:
    """``<output_dir>/<run_name>``, created exclusively: an existing directory is never written into (the name
    gets a numeric suffix, with a warning)."""
    out = Path(cfg.log.output_dir)
    base = cfg.log.run_name or default_run_name(cfg)
    try:
        out.mkdir(parents=True, exist_ok=True)
        n = 0
        while True:
            name = base if n == 0 else f"{base}-{n}"
            try:
                (out / name).mkdir()
                break
            except FileExistsError:
                n += 1
    except OSError as err:
        raise ConfigError(f"--log.output_dir: cannot create a run directory in {out}: {err.strerror or err}") from None
    if n:
        log.warning("run directory %s already exists; writing to %s", out / base, out / name)
    cfg.log.run_name = name
    return out / name


def weights_description(cfg) -> str:
    b = cfg.backbone
    if b.weights:
        return f"weights {b.weights}"
    return "published weights (timm)" if b.pretrained else "random initialisation"


def collate(batch):
    import torch

    return torch.stack([image for image, _ in batch]), [label for _, label in batch]


class EmergenceImages:
    """(uint8 image, label map) pairs of the protocol, loaded as the reference code loads them."""

    def __init__(self, root: Path, ids: list[str], img_size: int, protocol: str):
        self.root, self.ids, self.img_size, self.protocol = root, ids, img_size, protocol

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        from callbacks.emergence import load_example  # local: a config error is reported before torch loads

        return load_example(self.root, self.ids[index], self.img_size, self.protocol)


def measure(cfg, split: str, num_images: int, argv: Sequence[str] = ()) -> Result:
    """Build the backbone, score the split, write the tables. ConfigError / DataError / WeightLoadingError
    for the user's input; nothing is written before the model and the data are known to be usable."""
    import torch
    from torch.utils.data import DataLoader

    # local: a config error is reported before torch loads
    from analysis.emergence import label_folders, per_image_jaccard, summarize
    from callbacks.emergence import attention_maps, emergence_ids
    from callbacks.visual import cls_attention_problem
    from datamodules import DATASETS
    from datamodules.barlow_twins import default_num_workers
    from datamodules.images import DataError
    from models.backbones import build_backbone

    c = cfg.callbacks
    protocol = c.jaccard_protocol
    vit = build_backbone(cfg.backbone, cfg.data.img_size).vit  # a bad weight file fails here
    problem = cls_attention_problem(vit)
    if problem:
        raise ConfigError(f"--backbone.name={cfg.backbone.name}: {problem}")
    root = DATASETS.get(cfg.data.dataset).prepare(cfg.data)
    ids = emergence_ids(root, num_images, protocol, split)
    if not ids:
        raise DataError(f"no {split} image under {root} has a {' or '.join(label_folders(protocol))} mask "
                        f"(--callbacks.jaccard_protocol={protocol})")

    run_dir = fresh_run_dir(cfg)
    save_config(cfg, run_dir / "config.yaml")
    save_code_state(run_dir)

    use_cuda = torch.cuda.is_available() and cfg.trainer.accelerator not in ("cpu", "mps")
    device = torch.device("cuda" if use_cuda else "cpu")
    vit = vit.to(device).eval()
    workers = cfg.data.num_workers if cfg.data.num_workers >= 0 else default_num_workers()
    loader = DataLoader(EmergenceImages(root, ids, c.emergence_img_size, protocol), batch_size=cfg.data.batch_size,
                        num_workers=workers, collate_fn=collate)
    matrices = []
    try:
        with torch.no_grad():
            for images, labels in loader:
                attn = attention_maps(vit, images, device, protocol, chunk=len(images))
                matrices += per_image_jaccard(attn, labels, c.attention_keep, protocol)
                log.info("%d / %d images", len(matrices), len(ids))
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)  # an unreadable image halfway: no half-finished run left behind
        raise
    result = Result(run_dir, summarize(matrices, vit.blocks[-1].attn.num_heads), protocol, split)
    write_tables(result, cfg, argv)
    return result


def write_tables(result: Result, cfg, argv: Sequence[str]) -> None:
    score, c = result.score, cfg.callbacks
    rows = [("best", score.jaccard)] + [(str(h), float(v)) for h, v in enumerate(score.per_head)]
    with (result.run_dir / CSV_FILE).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["head", "jaccard", "images", "skipped", "objects", "protocol", "split", "keep", "img_size",
                         "backbone"])
        for head, value in rows:
            writer.writerow([head, f"{value:.6f}", score.images, score.skipped, score.objects, result.protocol,
                             result.split, c.attention_keep, c.emergence_img_size, cfg.backbone.name])
    objects = "classes" if result.protocol == "dino" else "objects"
    lines = [
        f"# Emergence Jaccard: {cfg.backbone.name}, {weights_description(cfg)}",
        "",
        f"Protocol `{result.protocol}` (analysis/emergence.py), {result.split} split of {cfg.data.root}: "
        f"{score.images} images scored ({score.skipped} left out: no object in their mask), {score.objects} {objects}; "
        f"masks keep {c.attention_keep:g} of the attention mass; images at {c.emergence_img_size} px.",
        "",
        "| head | Jaccard |",
        "|---|---|",
        f"| best head per {objects[:-1] if objects == 'objects' else 'class'} | {score.jaccard:.4f} |",
        *(f"| {h} | {float(v):.4f} |" for h, v in enumerate(score.per_head)),
        "",
        f"Command: `python -m tools.emergence {' '.join(shlex.quote(a) for a in argv)}`",
        "",
    ]
    (result.run_dir / MD_FILE).write_text("\n".join(lines))


def one_line(err: BaseException) -> str:
    """The error's message; one raised in a DataLoader worker carries the worker's traceback, whose last line
    is the original message."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(err).__name__
    prefix = f"{type(err).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    own, rest = tool_parser().parse_known_args(argv)
    try:
        cfg = validate(parse_config(rest))
        check(cfg, own.split, own.num_images)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    # local: a config error is reported before torch loads
    from datamodules.images import DataError
    from models.weights import WeightLoadingError

    try:
        result = measure(cfg, own.split, own.num_images, argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (DataError, WeightLoadingError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    s = result.score
    best_head = int(s.per_head.argmax()) if s.images else -1
    print(f"emergence Jaccard ({result.protocol} protocol, {s.images} {result.split} images, keep "
          f"{cfg.callbacks.attention_keep:g}): {s.jaccard:.4f}  (best single head {best_head}: "
          f"{float(s.per_head.max()) if s.images else float('nan'):.4f})")
    print(f"run directory: {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
