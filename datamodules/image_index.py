"""The list of image files of a folder source, built once and cached on disk.

Listing a tree of a million files costs minutes on a network file system; every run (and every process of a
distributed run) would pay it again. :func:`load_or_build_index` walks the tree once and saves the list, and
later runs read it back after a cheap check that it still describes the tree.

Memory: the paths live in one numpy byte array and an array of offsets (about the paths' own bytes plus 8
bytes per image; labels 4 bytes per image), never as one Python object per image. DataLoader workers share
these pages with the main process (no reference counts are touched when an item is read).

Staleness: the cache records the modification time of every *directory* of the tree. Adding, removing or
renaming a file changes its directory's time, so checking the D directories (not the N files) finds any change
of the listing. A directory changed within :data:`RACY_NS` before the listing started may have changed again
in the same clock tick unnoticed: such directories alone are listed again when the cache is read, and compared
with it. Changing a file's content in place keeps the listing valid; the images are read at each epoch anyway.

Where the cache goes (``data.index_dir``, empty = automatic): a hidden folder ``.vitssl_index`` inside the
data's root when it is writable (so every machine reading shared data shares it), else
``$XDG_CACHE_HOME/vitssl/index`` (``~/.cache/vitssl/index``). The file name carries a hash of the root's
real path and the listing options, so two data sets never share a file. Files are written to a temporary
name in the same folder and renamed (two processes saving at once leave one complete file). Delete the
folder at any time; it is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
"""File name endings read as images (any case: ImageNet's files end in .JPEG). Everything else is ignored."""

INDEX_FOLDER = ".vitssl_index"
INDEX_VERSION = 2
RACY_NS = 2_000_000_000  # coarser than any file system's timestamp granularity (FAT: 2 s)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _pack(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings → (uint8 bytes of all of them, int64 offsets of length n + 1), appended one by one into one
    buffer (no list of n bytes objects on the way). surrogateescape keeps file names that are not valid UTF-8
    byte-exact."""
    offsets = np.zeros(len(strings) + 1, dtype=np.int64)
    buffer = bytearray()
    for i, text in enumerate(strings):
        buffer += text.encode("utf-8", "surrogateescape")
        offsets[i + 1] = len(buffer)
    return np.frombuffer(buffer, dtype=np.uint8).copy(), offsets


def _unpack_one(blob: np.ndarray, offsets: np.ndarray, i: int) -> str:
    return blob[offsets[i]:offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")


class ImageIndex:
    """The images of a source: ``index[i]`` is the path of image i (``root / name``), ``len(index)`` their
    number; ``labels`` (int32 class ids, or None) and ``classes`` (their names) for class-folder trees.
    Slicing gives a list of paths (the visualisation callbacks take the first few)."""

    def __init__(self, root: Path, blob: np.ndarray, offsets: np.ndarray, labels: Optional[np.ndarray] = None,
                 classes: Sequence[str] = ()):
        self.root = Path(root)
        self._blob = blob
        self._offsets = offsets
        self.labels = labels
        self.classes = tuple(classes)

    @classmethod
    def from_names(cls, root: Path, names: Sequence[str], labels: Optional[Sequence[int]] = None,
                   classes: Sequence[str] = ()) -> "ImageIndex":
        blob, offsets = _pack(names)
        label_array = None if labels is None else np.asarray(labels, dtype=np.int32)
        return cls(root, blob, offsets, label_array, classes)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def name(self, i: int) -> str:
        """Image i's path relative to :attr:`root` (or absolute, as a file list gave it)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"image {i} of {len(self)}")
        return _unpack_one(self._blob, self._offsets, i % len(self))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.root / self.name(int(i))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def nbytes(self) -> int:
        """Memory held by the index's arrays."""
        return self._blob.nbytes + self._offsets.nbytes + (0 if self.labels is None else self.labels.nbytes)


# ----------------------------------------------------------------------------------------------- listing
@dataclass
class Listing:
    """What one walk of a tree found."""

    names: list[str]
    """Image paths relative to the walked root, sorted (byte order of their UTF-8: the same on every machine)."""
    directories: list[tuple[str, int]]
    """(relative path, mtime_ns) of every directory met (the root is ""), walked or not."""
    duplicates: set[str]
    """Directories met again through another link (recorded, not walked)."""
    ignored: int
    """Files that are not images by their name."""
    started_ns: int


def walk_images(top: Path, subfolders: Sequence[str] = ()) -> Listing:
    """Every image file under ``top`` (or under its ``subfolders``), recursively. Hidden entries (a leading
    dot, e.g. this module's cache folder) are skipped; symbolic links to directories are followed once (a link
    loop is walked once). One ``scandir`` per directory; no ``stat`` per file."""
    started = time.time_ns()
    names: list[str] = []
    directories: list[tuple[str, int]] = []
    duplicates: set[str] = set()
    ignored = 0
    seen: set[tuple[int, int]] = set()
    stack = list(reversed(subfolders)) if subfolders else [""]
    while stack:
        rel = stack.pop()
        path = top / rel if rel else top
        stat = os.stat(path)
        directories.append((rel, stat.st_mtime_ns))
        if (stat.st_dev, stat.st_ino) in seen:
            duplicates.add(rel)
            continue  # a second link to a folder already walked: recorded (a cache check looks at it), not walked
        seen.add((stat.st_dev, stat.st_ino))
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                child = f"{rel}/{entry.name}" if rel else entry.name
                try:
                    is_dir = entry.is_dir()  # d_type from the directory listing; stats only symbolic links
                except OSError:
                    is_dir = False
                if is_dir:
                    stack.append(child)
                elif is_image_name(entry.name):
                    names.append(child)
                else:
                    ignored += 1
    names.sort(key=lambda n: n.encode("utf-8", "surrogateescape"))
    return Listing(names, directories, duplicates, ignored, started)


def read_file_list(path: Path, root: Path) -> tuple[list[str], int]:
    """Image paths of a text file, one per line (relative to ``root``, or absolute), in the file's order;
    blank lines and lines starting with '#' are skipped, names that are not images counted and ignored."""
    names, ignored = [], 0
    resolved_root = str(root.resolve())
    with open(path, encoding="utf-8", errors="surrogateescape") as lines:
        for line in lines:
            name = line.strip()
            if not name or name.startswith("#"):
                continue
            if not is_image_name(name):
                ignored += 1
                continue
            if os.path.isabs(name) and name.startswith(resolved_root + os.sep):
                name = name[len(resolved_root) + 1:]
            names.append(name)
    return names, ignored


# ----------------------------------------------------------------------------------------------- caching
def default_index_dir(root: Path) -> Path:
    """``<root>/.vitssl_index`` if it exists or can be created there, else the user's cache folder."""
    inside = root / INDEX_FOLDER
    if inside.is_dir() and os.access(inside, os.W_OK | os.X_OK):
        return inside
    if os.access(root, os.W_OK | os.X_OK):
        try:
            inside.mkdir(exist_ok=True)
            return inside
        except OSError:
            pass
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vitssl" / "index"


def cache_path(root: Path, options: dict, index_dir: str = "") -> Path:
    """The cache file of ``root`` listed with ``options``: its name holds a hash of both, so two trees (or
    two listings of one tree) never share a file."""
    key = json.dumps({"version": INDEX_VERSION, "root": str(root.resolve()), **options}, sort_keys=True)
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:20]
    folder = Path(index_dir) if index_dir else default_index_dir(root)
    return folder / f"{root.resolve().name or 'root'}-{digest}.npz"


def save_index(path: Path, index: ImageIndex, listing: Listing) -> bool:
    """Write atomically; False (with a log line) where the folder is not writable: the listing is then
    simply not cached."""
    dir_blob, dir_offsets = _pack([d for d, _ in listing.directories])
    class_blob, class_offsets = _pack(index.classes)
    arrays = {
        "meta": np.frombuffer(json.dumps({"version": INDEX_VERSION, "started_ns": listing.started_ns,
                                          "ignored": listing.ignored}).encode(), dtype=np.uint8),
        "names": index._blob, "offsets": index._offsets,
        "labels": index.labels if index.labels is not None else np.zeros(0, dtype=np.int32),
        "has_labels": np.array([index.labels is not None]),
        "class_names": class_blob, "class_offsets": class_offsets,
        "dir_names": dir_blob, "dir_offsets": dir_offsets,
        "dir_mtimes": np.array([m for _, m in listing.directories], dtype=np.int64),
        "dir_walked": np.array([d not in listing.duplicates for d, _ in listing.directories], dtype=bool),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)  # readable like any file the user writes (mkstemp's is private)
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as err:
        log.warning("image index not cached (%s: %s); the next run lists %s again", path.parent,
                    os.strerror(err.errno) if err.errno else err, index.root)
        return False
    return True


def load_index(path: Path, root: Path) -> Optional[ImageIndex]:
    """The cached index, or None when there is none, it is unreadable, or the tree changed since."""
    try:
        with np.load(path, allow_pickle=False) as cached:
            arrays = {k: cached[k] for k in cached.files}
    except (OSError, ValueError, KeyError, EOFError):
        return None
    try:
        meta = json.loads(arrays["meta"].tobytes())
        if meta.get("version") != INDEX_VERSION:
            return None
        started = int(meta["started_ns"])
        dir_blob, dir_offsets, mtimes = arrays["dir_names"], arrays["dir_offsets"], arrays["dir_mtimes"]
        walked = arrays["dir_walked"].tolist()
    except (KeyError, ValueError):
        return None
    dirs = [_unpack_one(dir_blob, dir_offsets, i) for i in range(len(mtimes))]
    racy = []
    for rel, recorded, was_walked in zip(dirs, mtimes.tolist(), walked):
        try:
            now = os.stat(root / rel if rel else root).st_mtime_ns
        except OSError:
            return None  # a directory went away
        if now != recorded:
            return None  # entries were added, removed or renamed there
        if recorded >= started - RACY_NS and was_walked:
            racy.append(rel)
    if racy and not _racy_folders_match(root, racy, dirs, arrays["names"], arrays["offsets"]):
        return None
    classes = [_unpack_one(arrays["class_names"], arrays["class_offsets"], i)
               for i in range(len(arrays["class_offsets"]) - 1)]
    labels = arrays["labels"] if bool(arrays["has_labels"][0]) else None
    return ImageIndex(root, arrays["names"], arrays["offsets"], labels, classes)


def _direct_entries(root: Path, rel: str) -> tuple[set[str], set[str]]:
    """(image file names, folder names) directly in ``root/rel``, hidden entries skipped, as the walk sees them."""
    files, folders = set(), set()
    with os.scandir(root / rel if rel else root) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                folders.add(entry.name)
            elif is_image_name(entry.name):
                files.add(entry.name)
    return files, folders


def _racy_folders_match(root: Path, racy: list[str], dirs: list[str], blob: np.ndarray, offsets: np.ndarray) -> bool:
    """Folders modified within RACY_NS of the listing (e.g. the root, where the cache folder was just created)
    may have changed again in the same clock tick: list just those again and compare with the cache (as git
    does with its racily clean index entries), instead of distrusting the whole cache."""
    wanted = set(racy)
    files: dict[str, set[str]] = {rel: set() for rel in racy}
    folders: dict[str, set[str]] = {rel: set() for rel in racy}
    for rel in dirs:
        parent, _, name = rel.rpartition("/")
        if rel and parent in wanted:
            folders[parent].add(name)
    for i in range(len(offsets) - 1):
        parent, _, name = _unpack_one(blob, offsets, i).rpartition("/")
        if parent in wanted:
            files[parent].add(name)
    try:
        return all(_direct_entries(root, rel) == (files[rel], folders[rel]) for rel in racy)
    except OSError:
        return False


def class_labels(names: Sequence[str]) -> tuple[list[str], list[str], list[int], int]:
    """ImageNet-style ``<class>/<...>/<file>`` names → (kept names, sorted class names, class id per kept
    name, files outside any class folder, which are dropped)."""
    kept = [n for n in names if "/" in n]
    classes = sorted({n.split("/", 1)[0] for n in kept})
    ids = {c: i for i, c in enumerate(classes)}
    return kept, classes, [ids[n.split("/", 1)[0]] for n in kept], len(names) - len(kept)


def load_or_build_index(root: Path, subfolders: Sequence[str] = (), labelled: bool = False,
                        index_dir: str = "") -> tuple[ImageIndex, bool]:
    """The index of ``root`` (its ``subfolders`` only, if given; ``labelled``: class ids from the first
    folder level), from the cache when it is still valid, else listed and cached. Returns (index, whether it
    came from the cache)."""
    path = cache_path(root, {"subfolders": list(subfolders), "labelled": labelled}, index_dir)
    cached = load_index(path, root)
    if cached is not None:
        log.info("image index of %s: %d images, read from %s", root, len(cached), path)
        return cached, True
    log.info("listing the images under %s (once; cached in %s)", root, path.parent)
    listing = walk_images(root, subfolders)
    outside = 0
    if labelled:
        names, classes, labels, outside = class_labels(listing.names)
        index = ImageIndex.from_names(root, names, labels, classes)
    else:
        index = ImageIndex.from_names(root, listing.names)
    log.info("image index of %s: %d images (%d other files ignored%s)", root, len(index), listing.ignored,
             f", {outside} images outside any class folder" if outside else "")
    save_index(path, index, listing)
    return index, False
