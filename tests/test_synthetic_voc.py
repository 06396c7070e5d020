"""Tests of the synthetic Pascal-VOC-layout generator (datamodules/synthetic_voc.py).

The texture and colour checks analyse the written files only (FFT of masked pixels, mean colours), so they
do not depend on how the generator draws.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # also works with a bare `pytest` run and no pytest config
    sys.path.insert(0, str(REPO_ROOT))

from datamodules.images import DataError  # noqa: E402
from datamodules import synthetic_voc as sv  # noqa: E402
from datamodules.synthetic_voc import VOC_CLASSES, VOC_PALETTE, ensure_synthetic_voc, generate_synthetic_voc  # noqa: E402

SIZE = 64
PATCH = 8  # ViT patch at the smallest image size used


def _voc(root: Path) -> Path:
    return Path(root) / "VOCdevkit" / "VOC2012"


def _ids(root: Path, split: str):
    return (_voc(root) / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def _load(root: Path, image_id: str):
    voc = _voc(root)
    rgb = np.asarray(Image.open(voc / "JPEGImages" / f"{image_id}.jpg").convert("RGB"), dtype=np.float64)
    cls = np.asarray(Image.open(voc / "SegmentationClass" / f"{image_id}.png"))
    inst = np.asarray(Image.open(voc / "SegmentationObject" / f"{image_id}.png"))
    return rgb, cls, inst


def _objects(root: Path, split: str, min_pixels: int = 0):
    """Yield (class, rgb, non-void visible mask of one instance) for every object of a split."""
    for image_id in _ids(root, split):
        rgb, cls, inst = _load(root, image_id)
        for k in np.unique(inst):
            if k in (0, 255):
                continue
            m = inst == k
            if m.sum() >= min_pixels:
                yield int(np.unique(cls[m])[0]), rgb, m


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_synthetic_voc(tmp_path_factory.mktemp("voc64"), n_train=240, n_val=80, size=SIZE, seed=3)


# ------------------------------------------------------------------------------------------ constants


def test_classes_and_palette():
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background"
    assert VOC_CLASSES[1] == "aeroplane" and VOC_CLASSES[15] == "person" and VOC_CLASSES[20] == "tvmonitor"
    assert len(VOC_PALETTE) == 768 and all(0 <= c <= 255 for c in VOC_PALETTE)
    rgb = [tuple(VOC_PALETTE[3 * i : 3 * i + 3]) for i in range(256)]
    assert rgb[0] == (0, 0, 0) and rgb[1] == (128, 0, 0) and rgb[2] == (0, 128, 0)
    assert rgb[15] == (192, 128, 128) and rgb[20] == (0, 64, 128) and rgb[255] == (224, 224, 192)


# ------------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("split,n", [("train", 240), ("val", 80)])
def test_torchvision_reads_it_unchanged(dataset, split, n):
    from torchvision.datasets import VOCSegmentation

    ds = VOCSegmentation(str(dataset), year="2012", image_set=split)
    assert len(ds) == n
    for i in range(0, n, 7):
        img, target = ds[i]
        assert img.mode == "RGB" and img.size == (SIZE, SIZE)
        assert target.mode == "P" and target.size == (SIZE, SIZE)
        assert target.getpalette()[:768] == VOC_PALETTE
        values = set(np.unique(np.asarray(target)).tolist())
        assert values <= set(range(21)) | {255}
        assert 255 in values and 0 in values
        assert 1 <= len(values - {0, 255}) <= 3


def test_split_files_and_ids(dataset):
    train, val, trainval = _ids(dataset, "train"), _ids(dataset, "val"), _ids(dataset, "trainval")
    assert len(train) == 240 and len(val) == 80
    assert trainval == train + val and trainval == sorted(trainval)
    assert len(set(trainval)) == len(trainval)
    voc = _voc(dataset)
    for image_id in trainval:
        for sub, ext in (("JPEGImages", ".jpg"), ("SegmentationClass", ".png"), ("SegmentationObject", ".png")):
            assert (voc / sub / f"{image_id}{ext}").is_file()


def test_every_mask_valid_and_consistent_with_instances(dataset):
    seen_classes = set()
    for image_id in _ids(dataset, "trainval"):
        _, cls, inst = _load(dataset, image_id)
        assert Image.open(_voc(dataset) / "SegmentationObject" / f"{image_id}.png").mode == "P"
        values = set(np.unique(cls).tolist())
        assert values <= set(range(21)) | {255}, image_id
        assert 255 in values, image_id
        n_classes = len(values - {0, 255})
        assert 1 <= n_classes <= 3, image_id
        seen_classes |= values - {0, 255}
        # the same void band in both masks, background in the same places
        np.testing.assert_array_equal(cls == 255, inst == 255)
        np.testing.assert_array_equal(cls == 0, inst == 0)
        ids = sorted(set(np.unique(inst).tolist()) - {0, 255})
        assert ids == list(range(1, len(ids) + 1)) and 1 <= len(ids) <= 3, image_id
        for k in ids:  # each instance is one class
            assert len(np.unique(cls[inst == k])) == 1
        # the void band is thin: it never covers most of the image
        assert (cls == 255).mean() < 0.3
    assert seen_classes == set(range(1, 21))


def test_painted_pixels_match_masks():
    """In the raw render (no JPEG), every instance is exactly two colours (plus faint noise)."""
    for i in range(30):
        rgb, cls, inst = sv.render_sample(SIZE, np.random.default_rng([11, i]))
        rgb = rgb.astype(np.float64)
        for k in set(np.unique(inst).tolist()) - {0, 255}:
            px = rgb[inst == k]
            lum = px @ [0.299, 0.587, 0.114]
            centres = np.stack([px[lum <= np.median(lum)].mean(0), px[lum > np.median(lum)].mean(0)])
            for _ in range(5):  # 2-means
                d = np.linalg.norm(px[:, None, :] - centres[None], axis=2)
                a = d.argmin(1)
                centres = np.stack([px[a == j].mean(0) if (a == j).any() else centres[j] for j in range(2)])
            resid = np.linalg.norm(px - centres[a], axis=1)
            assert np.mean(resid < 20) > 0.99, (i, k)


# ------------------------------------------------------------------------------------------ determinism


def _tree_bytes(root: Path):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical_and_workers_do_not_matter(tmp_path):
    a = generate_synthetic_voc(tmp_path / "a", 6, 3, 48, seed=5)
    b = generate_synthetic_voc(tmp_path / "b", 6, 3, 48, seed=5, num_workers=2)
    ta, tb = _tree_bytes(a), _tree_bytes(b)
    # images, class and instance masks, annotations; trainaug masks of the 6 train images; segmentation split
    # lists + trainaug.txt, detection (Main) split lists; marker
    assert len(ta) == 4 * 9 + 6 + 4 + 3 + 1
    assert ta == tb


def test_different_seed_gives_different_images(tmp_path):
    a = _tree_bytes(generate_synthetic_voc(tmp_path / "a", 4, 2, 48, seed=1))
    b = _tree_bytes(generate_synthetic_voc(tmp_path / "b", 4, 2, 48, seed=2))
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert jpgs and all(a[k] != b[k] for k in jpgs)


# ------------------------------------------------------------------------------------------ texture & colour


def _spectrum(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Power spectrum of the colour-normalised grey pixels inside ``mask`` (phase- and colour-invariant)."""
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    vals = grey[mask]
    g = np.zeros_like(grey)
    g[mask] = (vals - vals.mean()) / (vals.std() + 1e-6)
    return np.abs(np.fft.fft2(g)) ** 2


def _freqs(n: int):
    f = np.fft.fftfreq(n)
    return np.meshgrid(f, f, indexing="xy")  # fx varies along columns, fy along rows


def test_texture_period_fits_twice_in_a_patch(dataset):
    """Inside every object the dominant spatial frequency (ignoring the mask's own low frequencies,
    |f| < 1/8 cycle/px) has a period <= PATCH / 2, i.e. an 8-px patch at 64 px holds at least two periods,
    and most of the texture's power lies at such periods."""
    fx, fy = _freqs(SIZE)
    radius = np.hypot(fx, fy)
    low = radius < 1.0 / 8.0
    fine = radius >= 1.0 / (PATCH / 2 + 0.5)
    periods = {c: [] for c in range(1, 21)}
    for c, rgb, m in _objects(dataset, "trainval", min_pixels=120):
        p = _spectrum(rgb, m)
        p[low] = 0
        periods[c].append(1.0 / radius.flat[np.argmax(p)])
        assert p[fine].sum() / p.sum() > 0.6, VOC_CLASSES[c]
    for c, ps in periods.items():
        assert len(ps) >= 5, VOC_CLASSES[c]
        # per class: the typical period is at most PATCH/2; single small objects may leak by ~1 FFT bin
        assert np.median(ps) <= PATCH / 2 + 0.05, (VOC_CLASSES[c], np.median(ps))
        assert max(ps) <= PATCH / 2 + 0.5, (VOC_CLASSES[c], max(ps))


def test_texture_alone_identifies_the_class(dataset):
    """Nearest-centroid on colour-normalised masked spectra: textures of the 20 classes are distinguishable
    whatever the (random) colours, trained on the train split and tested on the val split."""
    fx, fy = _freqs(SIZE)
    keep = np.hypot(fx, fy) >= 1.0 / 8.0

    def feats(split):
        xs, ys = [], []
        for c, rgb, m in _objects(dataset, split, min_pixels=120):
            f = np.sqrt(_spectrum(rgb, m)[keep])
            xs.append(f / np.linalg.norm(f))
            ys.append(c)
        return np.array(xs), np.array(ys)

    xtr, ytr = feats("train")
    xva, yva = feats("val")
    classes = np.unique(ytr)
    assert len(classes) == 20
    centroids = np.stack([xtr[ytr == c].mean(0) for c in classes])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    pred = classes[np.argmax(xva @ centroids.T, axis=1)]
    accuracy = float(np.mean(pred == yva))
    assert accuracy > 0.8, accuracy


def test_colour_does_not_identify_the_class(dataset):
    means, labels = [], []
    for c, rgb, m in _objects(dataset, "trainval", min_pixels=60):
        means.append(rgb[m].mean(0))
        labels.append(c)
    means, labels = np.array(means), np.array(labels)
    for c in range(1, 21):
        mc = means[labels == c]
        assert len(mc) >= 5, c
        assert np.all(mc.std(0) > 20), (VOC_CLASSES[c], mc.std(0))
        # the mean colours of one class span a wide range
        assert np.all(mc.max(0) - mc.min(0) > 80), (VOC_CLASSES[c], mc.min(0), mc.max(0))
    # nearest class-mean-colour classifier is close to chance (1/20)
    centroids = np.stack([means[labels == c].mean(0) for c in range(1, 21)])
    pred = 1 + np.argmin(np.linalg.norm(means[:, None] - centroids[None], axis=2), axis=1)
    assert np.mean(pred == labels) < 0.25


def test_texture_period_fits_an_8px_patch_twice_at_every_size(tmp_path):
    """Periods stay 2–4 px at 128 px as at 64 px, so one 8-px patch holds at least two periods."""

    def median_period(size):
        root = generate_synthetic_voc(tmp_path / str(size), 40, 1, size, seed=9)
        fx, fy = _freqs(size)
        radius = np.hypot(fx, fy)
        out = []
        for _, rgb, m in _objects(root, "train", min_pixels=150 * (size // 64) ** 2):
            p = _spectrum(rgb, m)
            p[radius < 1.0 / (size / 8.0)] = 0
            out.append(1.0 / radius.flat[np.argmax(p)])
        return np.median(out)

    for size in (64, 128):
        assert median_period(size) <= 4.0, size


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(n_train=0), "n_train"),
        (dict(n_val=0), "n_val"),
        (dict(size=8), "size"),
        (dict(seed=-1), "seed"),
        (dict(num_workers=-1), "num_workers"),
        (dict(n_train=2.5), "n_train"),
        (dict(size=True), "size"),
    ],
)
def test_invalid_arguments(tmp_path, kwargs, name):
    args = dict(n_train=2, n_val=1, size=32, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        generate_synthetic_voc(tmp_path / "x", **args)
    if "num_workers" not in kwargs:
        with pytest.raises(ValueError, match=name):
            ensure_synthetic_voc(tmp_path / "cache", **args)


def test_smallest_size_works(tmp_path):
    root = generate_synthetic_voc(tmp_path / "tiny", 10, 2, 16, seed=0)
    for image_id in _ids(root, "trainval"):
        rgb, cls, _ = _load(root, image_id)
        assert rgb.shape == (16, 16, 3)
        assert 1 <= len(set(np.unique(cls).tolist()) - {0, 255}) <= 3


# ------------------------------------------------------------------------------------------ marker & refusal


def _snapshot(root: Path):
    """Every entry under ``root`` (and root itself): kind, bytes of files, link targets and mtimes."""
    out = {}
    for p in [Path(root)] + sorted(Path(root).rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            kind = ("link", os.readlink(p))
        elif p.is_dir():
            kind = ("dir", None)
        else:
            kind = ("file", p.read_bytes())
        out[str(p.relative_to(root))] = (kind, st.st_mtime_ns, st.st_mode)
    return out


def _fake_voc_root(root: Path) -> Path:
    """A real-looking VOC root: ids like VOC's, none of them written by the generator, no marker."""
    voc = _voc(root)
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation", "Annotations"):
        (voc / sub).mkdir(parents=True)
    ids = ["2007_000032", "2007_000039", "2007_000063"]
    rng = np.random.default_rng(0)
    for i in ids:
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{i}.jpg")
        (voc / "SegmentationClass" / f"{i}.png").write_bytes(b"not really a png")
        (voc / "Annotations" / f"{i}.xml").write_text("<annotation/>")
    for split, chosen in (("train", ids[:2]), ("val", ids[2:]), ("trainval", ids)):
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(i + "\n" for i in chosen))
    return root


def test_marker_names_the_generator_format_and_parameters(tmp_path):
    root = generate_synthetic_voc(tmp_path / "out", 3, 2, 32, seed=7)
    assert sorted(p.name for p in root.iterdir()) == ["VOCdevkit", "synthetic_voc.json"]
    assert json.loads((root / "synthetic_voc.json").read_text()) == {
        "generator": "vitssl utils.synthetic_voc", "format_version": sv.FORMAT_VERSION,
        "n_train": 3, "n_val": 2, "size": 32, "seed": 7,
    }
    # nothing but the dataset and its lock beside it: no temporary folder left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]


def test_refuses_a_real_voc_root_and_leaves_it_byte_for_byte_unchanged(tmp_path):
    root = _fake_voc_root(tmp_path / "voc")
    before, parent_before = _snapshot(root), sorted(os.listdir(tmp_path))
    with pytest.raises(sv.ForeignDirectoryError, match="was not made by datamodules.synthetic_voc") as err:
        generate_synthetic_voc(root, 4, 2, 32, seed=0)
    assert str(root.resolve()) in str(err.value) and "VOCdevkit" in str(err.value)
    assert isinstance(err.value, DataError)  # main.py reports DataError as one line
    assert _snapshot(root) == before
    assert sorted(os.listdir(tmp_path)) == parent_before  # not even a lock file or a temporary folder

    # the same through the command line: one "error:" line naming the folder, exit status 2
    res = subprocess.run(
        [sys.executable, "-m", "tools.synthetic_voc", str(root), "--train", "4", "--val", "2", "--size", "32"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(root.resolve()) in lines[0], res.stderr
    assert "move this one away" in lines[0] and res.stdout == ""
    assert _snapshot(root) == before and sorted(os.listdir(tmp_path)) == parent_before


@pytest.mark.parametrize("case", ["foreign_file", "extra_file_in_own_dataset", "other_generator_marker", "plain_file"])
def test_refuses_any_non_empty_foreign_target(tmp_path, case):
    target = tmp_path / "target"
    if case == "foreign_file":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    elif case == "extra_file_in_own_dataset":
        generate_synthetic_voc(target, 3, 1, 32, seed=0)
        (_voc(target) / "JPEGImages" / "holiday.jpg").write_bytes(b"mine")
    elif case == "other_generator_marker":
        target.mkdir()
        (target / "synthetic_voc.json").write_text(json.dumps({"generator": "someone else", "n_train": 3}))
    else:
        target.write_text("mine")
    before = _snapshot(target)
    with pytest.raises(sv.ForeignDirectoryError, match="nothing was written") as err:
        generate_synthetic_voc(target, 3, 1, 32, seed=0)
    if case == "extra_file_in_own_dataset":
        assert "VOCdevkit/VOC2012/JPEGImages/holiday.jpg, which it did not write" in str(err.value)
    assert _snapshot(target) == before
    assert not list(tmp_path.glob(".target.tmp-*"))


def test_empty_target_folder_is_used(tmp_path):
    (tmp_path / "empty").mkdir()
    root = generate_synthetic_voc(tmp_path / "empty", 2, 1, 32, seed=0)
    assert _ids(root, "trainval") == ["train_000001", "train_000002", "val_000001"]


def test_regenerating_an_own_dataset_replaces_it_completely(tmp_path):
    out = generate_synthetic_voc(tmp_path / "out", 6, 3, 32, seed=1)
    generate_synthetic_voc(out, 3, 1, 48, seed=2)  # other parameters: allowed, old files all gone
    reference = generate_synthetic_voc(tmp_path / "reference", 3, 1, 48, seed=2)
    assert _tree_bytes(out) == _tree_bytes(reference)
    assert not (_voc(out) / "JPEGImages" / "train_000006.jpg").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", ".reference.lock", "out", "reference"]


def test_an_older_format_version_is_rebuilt_not_refused(tmp_path):
    out = generate_synthetic_voc(tmp_path / "out", 3, 1, 32, seed=0)
    marker = json.loads((out / "synthetic_voc.json").read_text())
    (out / "synthetic_voc.json").write_text(json.dumps({**marker, "format_version": sv.FORMAT_VERSION - 1}))
    generate_synthetic_voc(out, 3, 1, 32, seed=0)
    assert json.loads((out / "synthetic_voc.json").read_text())["format_version"] == sv.FORMAT_VERSION


def test_without_a_lock_generation_works_and_leftovers_are_left_alone(tmp_path, monkeypatch):
    fcntl = pytest.importorskip("fcntl")
    leftover = tmp_path / ".out.tmp-99999999-0123abcd"
    generate_synthetic_voc(leftover, 2, 1, 32, seed=0)  # a complete folder of ours under a temporary name

    def no_flock(fd, op):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = generate_synthetic_voc(tmp_path / "out", 2, 1, 32, seed=0)
    assert (out / "synthetic_voc.json").is_file()
    assert leftover.is_dir()  # without the lock a live run could own it: not ours to remove


# ------------------------------------------------------------------------------------------ cache


def _counting_render(monkeypatch):
    calls = []
    real = sv._render_into

    def counting(*args, **kwargs):
        calls.append(args[1:])
        return real(*args, **kwargs)

    monkeypatch.setattr(sv, "_render_into", counting)
    return calls


def test_ensure_caches_and_reuses(tmp_path, monkeypatch):
    calls = _counting_render(monkeypatch)
    root = ensure_synthetic_voc(tmp_path, 5, 2, 32, seed=4)
    assert root == tmp_path / "synthetic_voc_t5_v2_s32_seed4"
    marker = json.loads((root / "synthetic_voc.json").read_text())
    assert marker["generator"] == "vitssl utils.synthetic_voc" and marker["format_version"] == sv.FORMAT_VERSION
    assert (marker["n_train"], marker["n_val"], marker["size"], marker["seed"]) == (5, 2, 32, 4)
    mtime = (root / "synthetic_voc.json").stat().st_mtime_ns
    assert len(calls) == 1

    assert ensure_synthetic_voc(tmp_path, 5, 2, 32, seed=4) == root
    assert len(calls) == 1 and (root / "synthetic_voc.json").stat().st_mtime_ns == mtime
    # no temporary folders left behind
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [root.name]

    from torchvision.datasets import VOCSegmentation

    assert len(VOCSegmentation(str(root), year="2012", image_set="val")) == 2
    # other parameters → another folder
    other = ensure_synthetic_voc(tmp_path, 5, 2, 32, seed=5)
    assert other != root and len(calls) == 2


def test_ensure_never_uses_or_overwrites_a_folder_without_its_marker(tmp_path):
    from datamodules.synthetic_voc import SyntheticSource

    # a complete-looking set whose marker is gone: unknown origin, so neither used nor replaced
    root = ensure_synthetic_voc(tmp_path, 3, 1, 32, seed=0)
    (root / "synthetic_voc.json").unlink()
    before = _snapshot(root)
    with pytest.raises(sv.ForeignDirectoryError, match="no valid synthetic_voc.json marker"):
        ensure_synthetic_voc(tmp_path, 3, 1, 32, seed=0)
    cfg = SimpleNamespace(root=str(tmp_path), synthetic_train=3, synthetic_val=1, synthetic_size=32, synthetic_seed=0)
    with pytest.raises(DataError, match=str(root.resolve())):
        SyntheticSource.prepare(cfg)
    assert _snapshot(root) == before


def test_ensure_rebuilds_own_stale_or_legacy_sets_and_removes_only_own_leftovers(tmp_path, monkeypatch):
    calls = _counting_render(monkeypatch)
    name = "synthetic_voc_t3_v1_s32_seed0"
    root = tmp_path / name
    # a set cached before the generator marked its output: legacy ".complete" marker, older format
    generate_synthetic_voc(root, 3, 1, 32, seed=0)
    (root / "synthetic_voc.json").unlink()
    (root / ".complete").write_text(json.dumps({"format_version": 1, "n_train": 3, "n_val": 1, "size": 32, "seed": 0}))
    # leftovers: a killed run's temporary folder (ours) and folders with our name pattern that are not ours
    killed = tmp_path / f".{name}.tmp-123-deadbeef"
    killed.mkdir()
    (killed / "synthetic_voc.partial").write_text(json.dumps(sv._marker_content(3, 1, 32, 0)))
    (_voc(killed) / "JPEGImages").mkdir(parents=True)
    (_voc(killed) / "JPEGImages" / "train_000001.jpg").write_bytes(b"half-written")
    not_ours = tmp_path / f".{name}.tmp-456-cafebabe"
    not_ours.mkdir()
    (not_ours / "thesis.tex").write_text("mine")
    ours_plus_foreign = tmp_path / f".{name}.old-789-0badf00d"
    generate_synthetic_voc(ours_plus_foreign, 2, 1, 32, seed=0)
    (ours_plus_foreign / "thesis.tex").write_text("mine")
    calls.clear()

    assert ensure_synthetic_voc(tmp_path, 3, 1, 32, seed=0) == root
    assert len(calls) == 1
    assert json.loads((root / "synthetic_voc.json").read_text()) == sv._marker_content(3, 1, 32, 0)
    assert not (root / ".complete").exists()
    assert _tree_bytes(root) == _tree_bytes(generate_synthetic_voc(tmp_path / "reference", 3, 1, 32, seed=0))
    assert not killed.exists()
    assert (not_ours / "thesis.tex").read_text() == "mine" and (ours_plus_foreign / "thesis.tex").is_file()

    # a marker of other parameters (e.g. a set copied under this name) is rebuilt as well
    (root / "synthetic_voc.json").write_text(json.dumps(sv._marker_content(3, 1, 32, 1)))
    calls.clear()
    ensure_synthetic_voc(tmp_path, 3, 1, 32, seed=0)
    assert len(calls) == 1 and json.loads((root / "synthetic_voc.json").read_text())["seed"] == 0


def test_ensure_crash_leaves_the_previous_state(tmp_path, monkeypatch):
    real = sv._render_into

    def crash(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt("simulated crash after writing the files")

    monkeypatch.setattr(sv, "_render_into", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_voc(tmp_path, 3, 1, 32, seed=0)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []
    # over an existing own dataset: it stays as it was
    monkeypatch.setattr(sv, "_render_into", real)
    previous = generate_synthetic_voc(tmp_path / "out", 2, 1, 32, seed=3)
    before = _snapshot(previous)
    monkeypatch.setattr(sv, "_render_into", crash)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_voc(previous, 4, 1, 32, seed=0)
    assert _snapshot(previous) == before and not list(tmp_path.glob(".out.tmp-*"))
    monkeypatch.setattr(sv, "_render_into", real)
    root = ensure_synthetic_voc(tmp_path, 3, 1, 32, seed=0)
    assert (root / "synthetic_voc.json").is_file()


def test_ensure_concurrent_processes(tmp_path):
    code = (
        "import sys; from datamodules.synthetic_voc import ensure_synthetic_voc as e; "
        "print(e(sys.argv[1], 30, 5, 64, 2))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 1
    root = Path(outs[0])
    assert (root / "synthetic_voc.json").is_file() and len(_ids(root, "trainval")) == 35
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [root.name]


# ------------------------------------------------------------------------------------------ killed runs


def _kill_cli_midway(out: Path, *flags: str) -> Path:
    """Starts ``python -m tools.synthetic_voc OUT FLAGS`` (many images, so it cannot finish in time) and
    SIGKILLs it once its temporary folder holds 20 images; returns that temporary folder."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.synthetic_voc", str(out), *flags],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    try:
        while True:
            tmps = list(out.parent.glob(f".{out.name}.tmp-*"))
            images = _voc(tmps[0]) / "JPEGImages" if tmps else None
            if images is not None and images.is_dir() and len(os.listdir(images)) >= 20:
                break
            assert proc.poll() is None, f"generator ended early: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "generator wrote no images in 120 s"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return tmps[0]


def _lock_becomes_free(lock: Path, seconds: float = 20.0) -> bool:
    fcntl = pytest.importorskip("fcntl")
    deadline = time.monotonic() + seconds
    with open(lock, "a") as fh:
        while time.monotonic() < deadline:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                time.sleep(0.05)
                continue
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            return True
    return False


def test_killed_regeneration_leaves_the_previous_dataset_intact(tmp_path):
    out = generate_synthetic_voc(tmp_path / "out", 3, 1, 32, seed=1)
    before = _snapshot(out)
    tmp = _kill_cli_midway(out, "--train", "5000", "--val", "10", "--size", "64", "--seed", "2")
    # killed mid-way: its temporary folder is incomplete (no marker), and OUT was never touched
    assert not (tmp / "synthetic_voc.json").exists()
    assert len(os.listdir(_voc(tmp) / "JPEGImages")) < 5010
    assert _snapshot(out) == before
    # the next run over OUT works and removes the killed run's leftover
    generate_synthetic_voc(out, 2, 1, 32, seed=0)
    assert _tree_bytes(out) == _tree_bytes(generate_synthetic_voc(tmp_path / "reference", 2, 1, 32, seed=0))
    assert not tmp.exists()


def test_killed_generation_with_workers_leaves_nothing_usable_and_ensure_rebuilds(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    target = cache / sv.cache_dir_name(3, 1, 32, 0)
    tmp = _kill_cli_midway(target, "--train", "5000", "--val", "10", "--size", "64", "--workers", "2")
    assert not target.exists()
    # the killed run's pool workers exit too: they would otherwise hold its lock and hang the next run
    assert _lock_becomes_free(cache / f".{target.name}.lock")
    assert ensure_synthetic_voc(cache, 3, 1, 32, seed=0) == target
    assert _tree_bytes(target) == _tree_bytes(generate_synthetic_voc(tmp_path / "reference", 3, 1, 32, seed=0))
    assert not tmp.exists()
    assert sorted(os.listdir(cache)) == [f".{target.name}.lock", target.name]


# ------------------------------------------------------------------------------------------ CLI


def test_cli(tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run(
        [sys.executable, "-m", "tools.synthetic_voc", str(out)]
        + ["--train", "3", "--val", "2", "--size", "32", "--seed", "1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout and str(out.resolve()) in res.stdout and " s" in res.stdout
    assert _ids(out, "train") == ["train_000001", "train_000002", "train_000003"]
    assert len(_ids(out, "val")) == 2
    # the CLI writes exactly what the API writes
    api = generate_synthetic_voc(tmp_path / "api", 3, 2, 32, seed=1)
    assert _tree_bytes(out) == _tree_bytes(api)


def test_cli_help_and_errors(tmp_path):
    env = dict(os.environ)
    res = subprocess.run(
        [sys.executable, "-m", "tools.synthetic_voc", "--help"], cwd=REPO_ROOT, capture_output=True, text=True, env=env
    )
    assert res.returncode == 0 and "OUT_DIR" in res.stdout and "--train" in res.stdout and "--seed" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "tools.synthetic_voc", str(tmp_path / "bad"), "--size", "8"],
        cwd=REPO_ROOT, capture_output=True, text=True, env=env,
    )
    assert res.returncode == 2 and "size" in res.stderr
