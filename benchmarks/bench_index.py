"""The image-folder index: time of the first listing and of the cached one, and memory of the index and the
sampler per image.

    python -m benchmarks.bench_index                       # 100k files, 1M fake entries
    python -m benchmarks.bench_index --files 20000 --fake 200000 --dir /mnt/nfs/tmp

Listing: writes ``--files`` empty files named like ImageNet's (``nXXXXXXXX/nXXXXXXXX_<i>.JPEG``, 1000 per
class folder, a few non-image files beside them) under ``--dir`` (a new folder, removed afterwards; point it
at the file system you care about: a network file system lists far slower than a local disk), then times
``load_or_build_index`` twice: the walk (and the cache write), and the cached read with its check of every
folder's time. The folders' times are set 10 s into the past first, as for data written earlier (a listing
made within 2 s of a change re-lists the folders changed then, datamodules/image_index.py).

Memory: an index of ``--fake`` names (no files), its arrays' bytes and the Python heap growth while building
it (tracemalloc), against a list of ``pathlib.Path`` objects of the same names; then the peak Python heap of
one full pass of :class:`~datamodules.sampling.SeededSampler` over that many items (rank 0 of 1).
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

from datamodules.image_index import ImageIndex, load_or_build_index
from datamodules.sampling import SeededSampler


def make_tree(top: Path, files: int, per_folder: int = 1000) -> None:
    for i in range(files):
        folder = top / f"n{i // per_folder:08d}"
        if i % per_folder == 0:
            folder.mkdir(parents=True)
            (folder / "README.txt").write_bytes(b"")  # ignored: not an image
        os.close(os.open(folder / f"n{i // per_folder:08d}_{i}.JPEG", os.O_CREAT | os.O_WRONLY, 0o644))
    past = time.time() - 10
    for folder, _, _ in os.walk(top):
        os.utime(folder, (past, past))


def bench_listing(files: int, parent: str) -> None:
    top = Path(tempfile.mkdtemp(prefix="bench_index_", dir=parent))
    try:
        start = time.perf_counter()
        make_tree(top / "images", files)
        print(f"generated {files} empty files in {files // 1000 or 1} folders under {top} "
              f"in {time.perf_counter() - start:.1f} s")
        index_dir = str(top / "index")
        start = time.perf_counter()
        index, cached = load_or_build_index(top / "images", index_dir=index_dir)
        first = time.perf_counter() - start
        assert not cached and len(index) == files
        start = time.perf_counter()
        again, cached = load_or_build_index(top / "images", index_dir=index_dir)
        second = time.perf_counter() - start
        assert cached and len(again) == files
        size = sum(p.stat().st_size for p in Path(index_dir).iterdir())
        print(f"first listing (walk + sort + cache write): {first:.3f} s")
        print(f"cached listing (read + stat of {files // 1000 + 1} folders): {second:.3f} s "
              f"({first / second:.0f}x faster); cache file {size / 1e6:.1f} MB")
    finally:
        shutil.rmtree(top, ignore_errors=True)


def bench_memory(entries: int) -> None:
    names = [f"train/n{i // 1300:08d}/n{i // 1300:08d}_{i}.JPEG" for i in range(entries)]
    gc.collect()
    tracemalloc.start()
    index = ImageIndex.from_names(Path("/data/imagenet"), names, labels=[i // 1300 for i in range(entries)])
    _, peak_build = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"index of {entries} entries: {index.nbytes() / 1e6:.1f} MB of arrays "
          f"({index.nbytes() / entries:.1f} bytes per image, paths average "
          f"{sum(map(len, names)) / entries:.1f} characters); peak heap while building {peak_build / 1e6:.1f} MB")
    gc.collect()
    tracemalloc.start()
    paths = [Path("/data/imagenet") / n for n in names]
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"for comparison, a list of {entries} pathlib.Path objects: {held / 1e6:.1f} MB of Python objects")
    del paths, names
    gc.collect()
    sampler = SeededSampler(entries, seed=0)
    tracemalloc.start()
    count = sum(1 for _ in sampler)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == entries
    print(f"SeededSampler over {entries} items, one epoch: peak Python heap {peak / 1e6:.1f} MB "
          f"(the Python ints of one chunk of the shuffled order; the randperm tensor itself, "
          f"{entries * 8 / 1e6:.0f} MB, is not counted by tracemalloc)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000, help="empty files to list")
    parser.add_argument("--fake", type=int, default=1_000_000, help="index entries for the memory measurement")
    parser.add_argument("--dir", default=None, help="parent folder of the generated tree (default: the temp dir)")
    args = parser.parse_args()
    bench_listing(args.files, args.dir)
    bench_memory(args.fake)


if __name__ == "__main__":
    main()
