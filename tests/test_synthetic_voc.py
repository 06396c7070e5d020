"""Tests of the synthetic Pascal-VOC-layout generator (utils/synthetic_voc.py).

The texture and colour checks analyse the written files only (FFT of masked pixels, mean colours), so they
do not depend on how the generator draws.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # also works with a bare `pytest` run and no pytest config
    sys.path.insert(0, str(REPO_ROOT))

from utils import synthetic_voc as sv  # noqa: E402
from utils.synthetic_voc import VOC_CLASSES, VOC_PALETTE, ensure_synthetic_voc, generate_synthetic_voc  # noqa: E402

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
    assert len(ta) == 3 * 9 + 3
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


# ------------------------------------------------------------------------------------------ cache


def test_ensure_caches_and_reuses(tmp_path, monkeypatch):
    calls = []
    real = sv.generate_synthetic_voc

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(sv, "generate_synthetic_voc", counting)
    root = ensure_synthetic_voc(tmp_path, 5, 2, 32, seed=4)
    assert root == tmp_path / "synthetic_voc_t5_v2_s32_seed4"
    marker = json.loads((root / ".complete").read_text())
    assert marker["format_version"] == sv.FORMAT_VERSION
    assert (marker["n_train"], marker["n_val"], marker["size"], marker["seed"]) == (5, 2, 32, 4)
    mtime = (root / ".complete").stat().st_mtime_ns
    assert len(calls) == 1

    assert ensure_synthetic_voc(tmp_path, 5, 2, 32, seed=4) == root
    assert len(calls) == 1 and (root / ".complete").stat().st_mtime_ns == mtime
    # no temporary folders left behind
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [root.name]

    from torchvision.datasets import VOCSegmentation

    assert len(VOCSegmentation(str(root), year="2012", image_set="val")) == 2
    # other parameters → another folder
    other = ensure_synthetic_voc(tmp_path, 5, 2, 32, seed=5)
    assert other != root and len(calls) == 2


def test_ensure_ignores_incomplete_or_stale_folder(tmp_path, monkeypatch):
    name = "synthetic_voc_t3_v1_s32_seed0"
    half = tmp_path / name
    (half / "VOCdevkit" / "VOC2012" / "JPEGImages").mkdir(parents=True)
    (half / "VOCdevkit" / "VOC2012" / "JPEGImages" / "junk.jpg").write_bytes(b"half-written")
    (tmp_path / f"{name}.tmp-123-deadbeef").mkdir()  # leftover of a crashed run
    root = ensure_synthetic_voc(tmp_path, 3, 1, 32, seed=0)
    assert root == half and (root / ".complete").is_file()
    assert not (root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "junk.jpg").exists()
    assert len(_ids(root, "trainval")) == 4
    assert not list(tmp_path.glob(f"{name}.tmp-*")) and not list(tmp_path.glob(f"{name}.stale-*"))

    # a marker of another format version is not trusted either
    (root / ".complete").write_text(json.dumps({"format_version": -1}))
    calls = []
    real = sv.generate_synthetic_voc
    monkeypatch.setattr(sv, "generate_synthetic_voc", lambda *a, **k: (calls.append(a), real(*a, **k))[1])
    ensure_synthetic_voc(tmp_path, 3, 1, 32, seed=0)
    assert len(calls) == 1 and json.loads((root / ".complete").read_text())["format_version"] == sv.FORMAT_VERSION


def test_ensure_crash_leaves_nothing_marked_complete(tmp_path, monkeypatch):
    real = sv.generate_synthetic_voc

    def crash(out_dir, *args, **kwargs):
        real(out_dir, *args, **kwargs)
        raise KeyboardInterrupt("simulated crash after writing the files")

    monkeypatch.setattr(sv, "generate_synthetic_voc", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_voc(tmp_path, 3, 1, 32, seed=0)
    assert list(p.name for p in tmp_path.iterdir() if p.is_dir()) == []
    monkeypatch.setattr(sv, "generate_synthetic_voc", real)
    root = ensure_synthetic_voc(tmp_path, 3, 1, 32, seed=0)
    assert (root / ".complete").is_file()


def test_ensure_concurrent_processes(tmp_path):
    code = (
        "import sys; from utils.synthetic_voc import ensure_synthetic_voc as e; "
        "print(e(sys.argv[1], 30, 5, 64, 2))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 1
    root = Path(outs[0])
    assert (root / ".complete").is_file() and len(_ids(root, "trainval")) == 35
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [root.name]


# ------------------------------------------------------------------------------------------ CLI


def test_cli(tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run(
        [sys.executable, "-m", "utils.synthetic_voc", str(out)]
        + ["--train", "3", "--val", "2", "--size", "32", "--seed", "1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
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
        [sys.executable, "-m", "utils.synthetic_voc", "--help"], cwd=REPO_ROOT, capture_output=True, text=True, env=env
    )
    assert res.returncode == 0 and "OUT_DIR" in res.stdout and "--train" in res.stdout and "--seed" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "utils.synthetic_voc", str(tmp_path / "bad"), "--size", "8"],
        cwd=REPO_ROOT, capture_output=True, text=True, env=env,
    )
    assert res.returncode == 2 and "size" in res.stderr
