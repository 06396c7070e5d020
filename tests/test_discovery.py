"""LOST / TokenCut boxes, CorLoc and VOC boxes against the official code, transcribed by hand below.

The transcriptions follow valeoai/LOST (object_discovery.py: lost, patch_scoring, detect_box; datasets.py:
extract_gt_VOC, bbox_iou; main_lost.py: the padding and the key extraction) and YangtaoWANG95/TokenCut
(object_discovery.py: ncut, detect_box), with scipy's eigh and ndimage.label as there. Two reference choices
are device-dependent and fixed on one side only: LOST's degree sort (``torch.argsort(descending=True)`` is not
stable; the transcription is given a stable sort, and one test uses keys without degree ties so the literal
call agrees too) and the eigenvector's sign (the reference fixes it by the seed).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from scipy.linalg import eigh

from analysis.discovery import (bbox_iou, corloc, last_block_keys, lost, lost_box, pad_to_patch, seed_component,
                                tokencut, tokencut_box, voc_gt_boxes)

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the official code, transcribed --------------------------------------------------------------------------
def ref_detect_box(A, seed, dims, initial_im_size, scales):  # LOST object_discovery.detect_box
    w_featmap, h_featmap = dims
    correl = A.reshape(w_featmap, h_featmap).float()
    labeled_array, num_features = scipy.ndimage.label(correl.cpu().numpy() > 0.0)
    cc = labeled_array[np.unravel_index(seed.cpu().numpy(), (w_featmap, h_featmap))]
    if cc == 0:
        raise ValueError("The seed is in the background component.")
    mask = np.where(labeled_array == cc)
    ymin, ymax = min(mask[0]), max(mask[0]) + 1
    xmin, xmax = min(mask[1]), max(mask[1]) + 1
    r_xmin, r_xmax = scales[1] * xmin, scales[1] * xmax
    r_ymin, r_ymax = scales[0] * ymin, scales[0] * ymax
    pred = [r_xmin, r_ymin, r_xmax, r_ymax]
    if initial_im_size:
        pred[2] = min(pred[2], initial_im_size[1])
        pred[3] = min(pred[3], initial_im_size[0])
    return pred


def ref_lost(feats, dims, scales, init_image_size, k_patches=100, stable=True):  # LOST object_discovery.lost
    A = (feats @ feats.transpose(1, 2)).squeeze()
    M0 = A.clone()
    M0.fill_diagonal_(0)
    M0[M0 < 0] = 0
    cent = -torch.sum(M0 > 0.0, dim=1).type(torch.float32)
    sorted_patches = torch.sort(cent, descending=True, stable=True).indices if stable \
        else torch.argsort(cent, descending=True)
    seed = sorted_patches[0]
    potentials = sorted_patches[:k_patches]
    similars = potentials[A[seed, potentials] > 0.0]
    M = torch.sum(A[similars, :], dim=0)
    pred = ref_detect_box(M, seed, dims, initial_im_size=init_image_size[1:], scales=scales)
    return np.asarray(pred), int(seed)


def ref_ncut(feats, dims, scales, init_image_size, tau=0, eps=1e-5):  # TokenCut object_discovery.ncut
    feats = feats[0, 1:, :]
    feats = F.normalize(feats, p=2)
    A = (feats @ feats.transpose(1, 0))
    A = A.cpu().numpy()
    A = A > tau
    A = np.where(A.astype(float) == 0, eps, A)
    d_i = np.sum(A, axis=1)
    D = np.diag(d_i)
    _, eigenvectors = eigh(D - A, D, subset_by_index=[1, 2])
    second_smallest_vec = eigenvectors[:, 0]
    avg = np.sum(second_smallest_vec) / len(second_smallest_vec)
    bipartition = second_smallest_vec > avg
    seed = np.argmax(np.abs(second_smallest_vec))
    if bipartition[seed] != 1:
        bipartition = np.logical_not(bipartition)
    bipartition = bipartition.reshape(dims).astype(float)
    # TokenCut detect_box
    objects, num_objects = scipy.ndimage.label(bipartition)
    cc = objects[np.unravel_index(seed, dims)]
    mask = np.where(objects == cc)
    ymin, ymax = min(mask[0]), max(mask[0]) + 1
    xmin, xmax = min(mask[1]), max(mask[1]) + 1
    pred = [scales[1] * xmin, scales[0] * ymin, scales[1] * xmax, scales[0] * ymax]
    initial_im_size = init_image_size[1:]
    pred[2] = min(pred[2], initial_im_size[1])
    pred[3] = min(pred[3], initial_im_size[0])
    return np.asarray(pred), int(seed)


def ref_bbox_iou(box1, box2, eps=1e-7):  # LOST datasets.bbox_iou, x1y1x2y2 IoU branch
    box2 = box2.T
    b1_x1, b1_y1, b1_x2, b1_y2 = box1[0], box1[1], box1[2], box1[3]
    b2_x1, b2_y1, b2_x2, b2_y2 = box2[0], box2[1], box2[2], box2[3]
    inter = (torch.min(b1_x2, b2_x2) - torch.max(b1_x1, b2_x1)).clamp(0) * \
        (torch.min(b1_y2, b2_y2) - torch.max(b1_y1, b2_y1)).clamp(0)
    w1, h1 = b1_x2 - b1_x1, b1_y2 - b1_y1 + eps
    w2, h2 = b2_x2 - b2_x1, b2_y2 - b2_y1 + eps
    union = w1 * h1 + w2 * h2 - inter + eps
    return inter / union


def ref_extract_gt_voc(objects, remove_hards=False):  # LOST datasets.extract_gt_VOC (torchvision's dict)
    gt_bbxs = []
    for o in range(len(objects)):
        if remove_hards and (objects[o]["truncated"] == "1" or objects[o]["difficult"] == "1"):
            continue
        obj = objects[o]["bndbox"]
        x1y1x2y2 = [int(obj["xmin"]), int(obj["ymin"]), int(obj["xmax"]), int(obj["ymax"])]
        x1y1x2y2[0] -= 1
        x1y1x2y2[1] -= 1
        gt_bbxs.append(x1y1x2y2)
    return np.asarray(gt_bbxs)


def reference_inputs(keys, patch, image_hw):
    """main_lost.py's dims/scales/init_image_size for an image of image_hw padded to the patch size."""
    rows, cols = math.ceil(image_hw[0] / patch), math.ceil(image_hw[1] / patch)
    return [rows, cols], [patch, patch], (3, *image_hw)


# -- keys ----------------------------------------------------------------------------------------------------
def structured_keys(generator, n, dim=32, groups=4, noise=0.6):
    """Random keys with a few directions shared by groups of patches (graphs with clear structure)."""
    prototypes = torch.randn(groups, dim, generator=generator) * 2
    assign = torch.randint(0, groups, (n,), generator=generator)
    return prototypes[assign] + noise * torch.randn(n, dim, generator=generator) + 0.3


def planted_keys(rows, cols, box, dim=16, seed=0):
    """Background patches share one direction, the patches of ``box`` (r0, c0, r1, c1 exclusive) another,
    anti-correlated with it: both methods must find the planted block."""
    g = torch.Generator().manual_seed(seed)
    background, obj = torch.zeros(dim), torch.zeros(dim)
    background[0], obj[0], obj[1] = 1.0, -0.3, 1.0
    keys = background.repeat(rows * cols, 1) + 0.05 * torch.randn(rows * cols, dim, generator=g)
    r0, c0, r1, c1 = box
    grid = torch.zeros(rows, cols, dtype=torch.bool)
    grid[r0:r1, c0:c1] = True
    keys[grid.view(-1)] = obj + 0.05 * torch.randn(int(grid.sum()), dim, generator=g)
    return keys


CASES = [(8, (61, 45)), (14, (100, 83)), (16, (224, 224)), (16, (375, 500)), (8, (30, 17)), (14, (56, 43))]


@pytest.mark.parametrize("patch, image_hw", CASES)
def test_lost_equals_the_reference_on_random_keys(patch, image_hw):
    rows, cols = math.ceil(image_hw[0] / patch), math.ceil(image_hw[1] / patch)
    g = torch.Generator().manual_seed(patch * 1000 + image_hw[0])
    for trial in range(4):
        keys = structured_keys(g, rows * cols) if trial % 2 else torch.randn(rows * cols, 24, generator=g)
        dims, scales, init = reference_inputs(keys, patch, image_hw)
        for k in (100, 5):
            want, want_seed = ref_lost(keys[None], dims, scales, init, k_patches=k)
            got = lost(keys, (rows, cols), patch, image_hw, k_patches=k)
            assert got.box == [int(v) for v in want] and got.seed == want_seed
            assert lost_box(keys, (rows, cols), patch, image_hw, k) == got.box


def test_lost_equals_the_literal_reference_when_the_lowest_degree_is_unique():
    """With k_patches=1 only the seed is expanded, and a unique lowest degree makes the literal (unstable)
    argsort's first element certain: the reference call itself, no tie rule assumed."""
    g = torch.Generator().manual_seed(3)
    rows, cols, patch, image_hw = 5, 6, 16, (70, 90)
    checked = 0
    for _ in range(40):
        keys = torch.randn(rows * cols, 8, generator=g)
        positive = keys @ keys.T > 0
        positive.fill_diagonal_(False)
        degree = positive.sum(1)
        if int((degree == degree.min()).sum()) != 1:
            continue
        dims, scales, init = reference_inputs(keys, patch, image_hw)
        want, want_seed = ref_lost(keys[None], dims, scales, init, k_patches=1, stable=False)
        got = lost(keys, (rows, cols), patch, image_hw, k_patches=1)
        assert got.box == [int(v) for v in want] and got.seed == want_seed
        checked += 1
    assert checked >= 5


def well_posed(keys, tau, eps=1e-5):
    """Whether the reference's answer is defined by its maths rather than by rounding: a simple second
    eigenvalue (gap to the third) and a unique largest |entry| of its eigenvector (the seed)."""
    f = F.normalize(keys, p=2)
    a = np.where((f @ f.T).numpy() > tau, 1.0, eps)
    d = np.diag(a.sum(1))
    values, vectors = eigh(d - a, d, subset_by_index=[1, 2])
    top = np.sort(np.abs(vectors[:, 0]))
    return values[1] - values[0] > 1e-3 * max(values[1], 1e-12) and top[-1] - top[-2] > 1e-6 * top[-1]


@pytest.mark.parametrize("patch, image_hw", CASES)
def test_tokencut_equals_the_reference_on_random_keys(patch, image_hw):
    rows, cols = math.ceil(image_hw[0] / patch), math.ceil(image_hw[1] / patch)
    g = torch.Generator().manual_seed(patch * 7 + image_hw[1])
    checked, trials = 0, 12 if rows * cols < 300 else 2  # a 768-patch eigen-solve takes a while
    for trial in range(trials):
        # patches between two random directions, some near each end: a graph with a clear cut
        mix = torch.rand(rows * cols, 1, generator=g) ** (1 + trial % 3)
        ends = torch.randn(2, 24, generator=g)
        noise = (0.2 + 0.1 * (trial % 4)) * torch.randn(rows * cols, 24, generator=g)
        keys = mix * ends[0] + (1 - mix) * ends[1] + noise
        dims, scales, init = reference_inputs(keys, patch, image_hw)
        cls = torch.randn(1, keys.shape[1], generator=g)  # the reference drops the CLS token itself
        for tau in (0.2, 0.5):
            if not well_posed(keys, tau):
                continue
            want, want_seed = ref_ncut(torch.cat([cls, keys])[None], dims, scales, init, tau=tau)
            got = tokencut(keys, (rows, cols), patch, image_hw, tau=tau)
            assert got.box == [int(v) for v in want] and got.seed == want_seed
            assert tokencut_box(keys, (rows, cols), patch, image_hw, tau) == got.box
            checked += 1
    assert checked >= trials // 2


@pytest.mark.parametrize("patch, image_hw, block, box", [
    (16, (224, 224), (4, 5, 9, 11), [80, 64, 176, 144]),
    (8, (61, 45), (2, 1, 8, 4), [8, 16, 32, 61]),  # bottom row padded: y1 clipped to 61
    (14, (100, 83), (3, 2, 8, 6), [28, 42, 83, 100]),  # right column padded: x1 clipped to 83
])
def test_both_methods_find_a_planted_object(patch, image_hw, block, box):
    rows, cols = math.ceil(image_hw[0] / patch), math.ceil(image_hw[1] / patch)
    keys = planted_keys(rows, cols, block)
    dims, scales, init = reference_inputs(keys, patch, image_hw)
    # the planted block: rows r0..r1-1, cols c0..c1-1 → [c0·p, r0·p, min(c1·p, W), min(r1·p, H)]
    assert lost_box(keys, (rows, cols), patch, image_hw) == box
    assert tokencut_box(keys, (rows, cols), patch, image_hw) == box
    assert [int(v) for v in ref_lost(keys[None], dims, scales, init)[0]] == box
    assert [int(v) for v in ref_ncut(torch.cat([keys[:1], keys])[None], dims, scales, init, tau=0.2)[0]] == box


def test_only_the_seed_component_counts():
    mask = torch.zeros(5, 6, dtype=torch.bool)
    mask[0:2, 0:2] = True  # component A
    mask[3:5, 3:6] = True  # component B
    mask[2, 2] = True  # diagonal neighbour of A only: not 4-connected
    assert seed_component(mask, 0).sum() == 4 and seed_component(mask, 3 * 6 + 4).sum() == 6
    assert seed_component(mask, 2 * 6 + 2).sum() == 1 and not seed_component(mask, 5).any()
    snake = torch.ones(5, 5, dtype=torch.bool)
    snake[1, :4] = snake[3, 1:] = False  # a long path: the flood fill must follow it all
    labels, _ = scipy.ndimage.label(snake.numpy())
    assert torch.equal(seed_component(snake, 0), torch.from_numpy(labels == labels[0, 0]))


def test_inputs_that_do_not_fit_are_refused():
    keys = torch.randn(12, 4)
    with pytest.raises(ValueError, match="grid 3x3 holds 9 patches but keys has 12"):
        lost_box(keys, (3, 3), 16, (48, 48))
    with pytest.raises(ValueError, match="gives a 3x4 grid, not 4x3"):
        tokencut_box(keys, (4, 3), 16, (48, 64))


# -- CorLoc and VOC boxes ------------------------------------------------------------------------------------
def test_bbox_iou_and_corloc_equal_the_reference():
    g = np.random.default_rng(0)
    preds, gts = [], []
    for _ in range(200):
        pred = np.sort(g.integers(0, 100, 4).reshape(2, 2), axis=0).T.reshape(-1)[[0, 2, 1, 3]]
        gt = np.concatenate([np.sort(g.integers(0, 100, (3, 2)), 1), np.sort(g.integers(0, 100, (3, 2)), 1)], 1)
        gt = gt[:, [0, 2, 1, 3]]
        want = ref_bbox_iou(torch.from_numpy(pred), torch.from_numpy(gt)).numpy()
        np.testing.assert_array_equal(bbox_iou(pred, gt), want)
        preds.append(pred)
        gts.append(gt)
    want = np.mean([bool(torch.any(ref_bbox_iou(torch.from_numpy(p), torch.from_numpy(g_)) >= 0.5))
                    for p, g_ in zip(preds, gts)])
    assert corloc(preds, gts) == pytest.approx(want, abs=0)
    assert 0.0 < want < 1.0
    # by hand: the same box → IoU 1; half overlap in x (intersection 50, union 150 → 1/3)
    assert corloc([[0, 0, 10, 10], [0, 0, 10, 10]], [np.array([[0, 0, 10, 10]]), np.array([[5, 0, 15, 10]])]) == 0.5
    assert bbox_iou([0, 0, 10, 10], [[5, 0, 15, 10]])[0] == pytest.approx(1 / 3, rel=1e-6)


VOC_XML = """<annotation><folder>VOC2007</folder><filename>000001.jpg</filename>
<size><width>353</width><height>500</height><depth>3</depth></size>
<object><name>dog</name><pose>Left</pose><truncated>1</truncated><difficult>0</difficult>
<bndbox><xmin>48</xmin><ymin>240</ymin><xmax>195</xmax><ymax>371</ymax></bndbox></object>
<object><name>person</name><pose>Left</pose><truncated>0</truncated><difficult>0</difficult>
<bndbox><xmin>8</xmin><ymin>12</ymin><xmax>352</xmax><ymax>498</ymax></bndbox></object>
<object><name>chair</name><truncated>0</truncated><difficult>1</difficult>
<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>353</xmax><ymax>500</ymax></bndbox></object>
</annotation>"""


def test_voc_gt_boxes_is_extract_gt_voc(tmp_path):
    from torchvision.datasets import VOCDetection

    path = tmp_path / "a.xml"
    path.write_text(VOC_XML)
    import xml.etree.ElementTree as ET

    objects = VOCDetection.parse_voc_xml(ET.parse(path).getroot())["annotation"]["object"]
    for hards in (False, True):
        want = ref_extract_gt_voc(objects, remove_hards=hards)
        np.testing.assert_array_equal(voc_gt_boxes(path, remove_hards=hards), want)
    np.testing.assert_array_equal(voc_gt_boxes(path), [[47, 239, 195, 371], [7, 11, 352, 498], [0, 0, 353, 500]])
    assert voc_gt_boxes(path, remove_hards=True).tolist() == [[7, 11, 352, 498]]


def test_voc_gt_boxes_names_a_bad_file(tmp_path):
    from datamodules.errors import DataError

    bad = tmp_path / "bad.xml"
    bad.write_text("<annotation><object><name>x</name></object></annotation>")
    with pytest.raises(DataError, match="bad.xml: an object has no valid bndbox"):
        voc_gt_boxes(bad)
    with pytest.raises(DataError, match="cannot read annotation .*missing.xml"):
        voc_gt_boxes(tmp_path / "missing.xml")


# -- keys of a timm ViT, as main_lost.py reads them ----------------------------------------------------------
@pytest.mark.parametrize("patch, image_hw", [(16, (50, 37)), (8, (32, 32)), (14, (30, 45))])
def test_last_block_keys_are_the_qkv_key_channels_of_the_padded_image(patch, image_hw):
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=4 * patch,
                            patch_size=patch, depth=2, embed_dim=24, num_heads=3, dynamic_img_size=True).eval()
    image = torch.randn(1, 3, *image_hw)
    keys, grid = last_block_keys(vit, image, dino_pos_embed=False)
    # main_lost.py: zero-pad, hook the last qkv, reshape (B, T, 3, nh, -1), k.transpose(1, 2).reshape(B, T, -1)
    size_im = (3, int(np.ceil(image_hw[0] / patch) * patch), int(np.ceil(image_hw[1] / patch) * patch))
    padded = torch.zeros(size_im)
    padded[:, :image_hw[0], :image_hw[1]] = image[0]
    feat_out = {}
    handle = vit.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: feat_out.__setitem__("qkv", o))
    with torch.no_grad():
        vit.forward_features(padded[None])
    handle.remove()
    nb_tokens, nh = feat_out["qkv"].shape[1], 3
    qkv = feat_out["qkv"].reshape(1, nb_tokens, 3, nh, -1 // nh).permute(2, 0, 3, 1, 4)
    k = qkv[1].transpose(1, 2).reshape(1, nb_tokens, -1)
    assert grid == (size_im[1] // patch, size_im[2] // patch)
    torch.testing.assert_close(keys, k[:, 1:, :], rtol=0, atol=0)
    assert torch.equal(pad_to_patch(image, patch)[0], padded)


def test_dino_position_embedding_is_dino_interpolate_pos_encoding():
    from analysis.discovery import dino_interpolated_pos_embed

    torch.manual_seed(1)
    pos = torch.randn(1, 1 + 14 * 14, 8)
    for w0, h0 in ((20, 31), (14, 14), (9, 14)):
        # DINO vision_transformer.interpolate_pos_encoding (w0 = rows, h0 = cols)
        class_pos_embed, patch_pos_embed = pos[:, 0], pos[:, 1:]
        if (w0, h0) == (14, 14):
            want = pos
        else:
            a, b = w0 + 0.1, h0 + 0.1
            p = F.interpolate(patch_pos_embed.reshape(1, 14, 14, 8).permute(0, 3, 1, 2),
                              scale_factor=(a / 14, b / 14), mode="bicubic")
            want = torch.cat((class_pos_embed.unsqueeze(0), p.permute(0, 2, 3, 1).view(1, -1, 8)), dim=1)
        assert torch.equal(dino_interpolated_pos_embed(pos, 1, (w0, h0)), want)
