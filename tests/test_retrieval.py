"""Hummingbird retrieval against the open re-implementation (vpariza/open-hummingbird-eval, hbird/hbird_eval.py
and hbird/utils/eval_metrics.py), transcribed by hand below, and against brute force."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from analysis.retrieval import (ConfusionMatrix, MemoryBuilder, faiss_available, label_fractions,
                                nearest_neighbours, per_image_samples, retrieve_labels, sample_patches,
                                upsampled_prediction)

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the re-implementation, transcribed ----------------------------------------------------------------------
def ref_patchify_gt(gt, patch_size):  # HbirdEvaluation._patchify_gt
    bs, c, h, w = gt.shape
    gt = gt.reshape(bs, c, h // patch_size, patch_size, w // patch_size, patch_size)
    gt = gt.permute(0, 2, 4, 1, 3, 5)
    return gt.reshape(bs, h // patch_size, w // patch_size, c * patch_size * patch_size)


def ref_memory_rows(features, y, patch_size, num_classes, num_sampled_features):
    """HbirdEvaluation._create_memory (bounded branch) + _sample_features for one batch; y (B, 1, H, W) ids."""
    y = y.clone()
    y[y == 255] = 0
    patchified_gts = ref_patchify_gt(y, patch_size)
    one_hot_patch_gt = F.one_hot(patchified_gts, num_classes=num_classes).float()
    label = one_hot_patch_gt.mean(dim=3)
    # _sample_features
    B, SS, D = features.shape
    P = patchified_gts.shape[3]
    gt_flat = patchified_gts.reshape(B, SS, P).reshape(B * SS, P).to(torch.long)
    row_offsets = torch.arange(B * SS, dtype=torch.long).unsqueeze(1) * num_classes
    vals = (gt_flat + row_offsets).reshape(-1)
    counts = torch.bincount(vals, minlength=(B * SS * num_classes)).reshape(B, SS, num_classes)
    presence = counts > 0
    class_freq = presence.sum(dim=1).to(torch.float32)
    patch_scores = torch.einsum("bpc,bc->bp", presence.to(torch.float32), class_freq).cpu()
    nonzero_mask = presence.any(dim=2).cpu()
    patch_scores.masked_fill_(~nonzero_mask, 1e6)
    nz_counts = nonzero_mask.sum(dim=1).tolist()
    r = torch.rand(sum(nz_counts))
    rand_map = torch.ones_like(patch_scores)
    start = 0
    for b, cnt in enumerate(nz_counts):
        if cnt:
            rand_map[b, nonzero_mask[b]] = r[start:start + cnt]
            start += cnt
    patch_scores.mul_(rand_map)
    _, sampled_indices = torch.topk(patch_scores, num_sampled_features, largest=False)
    sampled_features = features.gather(1, sampled_indices.unsqueeze(-1).expand(-1, -1, D))
    normalized = sampled_features / torch.norm(sampled_features, dim=2, keepdim=True)
    label = label.flatten(1, 2)
    label_hat = label.gather(1, sampled_indices.unsqueeze(-1).repeat(1, 1, label.shape[-1]))
    return normalized.flatten(0, 1), label_hat.flatten(0, 1)


def ref_retrieve(q, feature_memory, label_memory, k=30, beta=0.02):
    """_find_nearest_key_to_query (exact inner-product search, query not normalised) + _cross_attention."""
    B, N, D = q.shape
    q_flat = q.reshape(B * N, D)
    idx = (q_flat @ feature_memory.T).topk(k, dim=1).indices  # faiss IndexFlatIP on the normalised memory
    key_features = feature_memory.index_select(0, idx.flatten()).view(B, N, k, -1)
    key_labels = label_memory.index_select(0, idx.flatten()).view(B, N, k, -1)
    qn = F.normalize(q, dim=-1)
    kn = F.normalize(key_features, dim=-1)
    attn = torch.bmm(qn.reshape(B * N, 1, D), kn.reshape(B * N, k, D).transpose(1, 2)).squeeze(1) / beta
    attn = F.softmax(attn, dim=-1)
    label_hat = torch.bmm(attn.unsqueeze(1), key_labels.reshape(B * N, k, -1)).squeeze(1)
    return label_hat.view(B, N, -1)


def ref_prediction(label_hat, s, h, w):  # HbirdEvaluation.evaluate
    bs, n, c = label_hat.shape
    label_hat = label_hat.reshape(bs, s, s, c).permute(0, 3, 1, 2)
    return F.interpolate(label_hat.float(), size=(h, w), mode="bilinear").argmax(dim=1).unsqueeze(1)


# -- tests ---------------------------------------------------------------------------------------------------
def test_chunked_exact_search_is_brute_force():
    g = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(1000, 16, generator=g), dim=1)
    query = F.normalize(torch.randn(77, 16, generator=g), dim=1)
    want = (query @ memory.T).topk(30, dim=1)
    for cq, cm in ((4096, 262_144), (10, 64), (7, 31), (77, 1000)):
        sims, idx = nearest_neighbours(query, memory, 30, chunk_queries=cq, chunk_memory=cm)
        assert torch.equal(idx, want.indices)
        torch.testing.assert_close(sims, want.values, rtol=0, atol=1e-6)
    if faiss_available():
        sims, idx = nearest_neighbours(query, memory, 30, backend="faiss")
        assert (idx == want.indices).float().mean() > 0.99  # float summation order may swap near-ties
        torch.testing.assert_close(sims, want.values, rtol=0, atol=1e-5)


def test_retrieve_labels_equals_the_reference():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(500, 12, generator=g)
    memory = features / features.norm(dim=1, keepdim=True)
    labels = torch.rand(500, 5, generator=g)
    labels = labels / labels.sum(1, keepdim=True)
    query = torch.randn(2, 40, 12, generator=g) * 3  # not normalised: retrieve_labels normalises itself
    want = ref_retrieve(query, memory, labels)
    got = retrieve_labels(query.reshape(80, 12), features * 7, labels, chunk_memory=64)
    torch.testing.assert_close(got, want.reshape(80, 5), rtol=1e-5, atol=1e-6)
    # by hand: one neighbour gets all the weight at a tiny temperature; k=1 copies the nearest label
    got1 = retrieve_labels(memory[:3], memory, labels, k=1)
    torch.testing.assert_close(got1, labels[:3])


def test_memory_rows_equal_the_reference_sampling():
    num_classes, patch, grid = 4, 4, (3, 3)
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, num_classes, (3, 12, 12), generator=g)
    labels[0, :5, :5] = 255  # void counts as background in the memory
    labels[1] = 2
    labels[1, 0:4, 8:12] = 3  # one patch of a rare class: always kept
    features = torch.randn(3, 9, 6, generator=g)
    k = per_image_samples(memory_size=15, images=3, epochs=2)
    assert k == 2 == max(1, 15 // (3 * 2))
    torch.manual_seed(11)
    want_f, want_l = ref_memory_rows(features, labels[:, None], patch, num_classes, k)
    builder = MemoryBuilder(num_classes, memory_size=15, images=3, epochs=2,
                            generator=torch.Generator().manual_seed(11))
    builder.add(features, labels, grid)
    memory = builder.build()
    torch.testing.assert_close(memory.features, want_f)
    torch.testing.assert_close(memory.labels, want_l)
    assert memory.labels[2:4, 3].max() == 1.0  # image 1's rare patch (fully class 3) is among its two
    # unbounded: every patch, fractions by hand for one patch
    builder = MemoryBuilder(num_classes)
    builder.add(features, labels, grid)
    assert builder.build().features.shape == (27, 6)
    fractions = label_fractions(labels, grid, num_classes)
    block = labels[0, 4:8, 0:4].clone()
    block[block == 255] = 0
    assert fractions[0, 3].tolist() == [float((block == c).float().mean()) for c in range(num_classes)]


def test_sampling_favours_rare_classes():
    fractions = torch.zeros(1, 6, 3)
    fractions[0, :5, 0] = 1.0  # five background patches
    fractions[0, 5, 2] = 1.0  # one patch of class 2
    for seed in range(5):
        idx = sample_patches(fractions, 1, torch.Generator().manual_seed(seed))
        # background patches score 5·u, the rare one 1·u: it wins unless its u is 5× larger than every other
        scores = torch.tensor([5.0] * 5 + [1.0]) * torch.rand(6, generator=torch.Generator().manual_seed(seed))
        assert int(idx) == int(scores.argmin())


def test_upsampled_argmax_equals_the_reference():
    g = torch.Generator().manual_seed(3)
    dist = torch.rand(2, 16, 5, generator=g)
    want = ref_prediction(dist, 4, 32, 32)[:, 0]
    assert torch.equal(upsampled_prediction(dist, (4, 4), (32, 32)), want)


def ref_predsmiou_hungarian(conf):
    """PredsmIoU.compute(): Hungarian mapping on the IoU matrix, then TP/FP/FN per ground-truth class."""
    from scipy.optimize import linear_sum_assignment

    C = conf.to(torch.float64)
    score = C / torch.clamp(C.sum(1, keepdim=True) + C.sum(0, keepdim=True) - C, min=1e-8)
    row_ind, col_ind = linear_sum_assignment(1.0 - score.numpy())
    mapping = torch.zeros(conf.shape[1], dtype=torch.int64)
    for r, c in zip(row_ind, col_ind):
        mapping[c] = int(r)
    C_mapped = torch.zeros_like(conf).index_add_(1, mapping, conf)
    tp = torch.diag(C_mapped).double()
    fp = C_mapped.sum(0).double() - tp
    fn = conf.sum(1).double() - tp
    return float((tp / torch.clamp(tp + fp + fn, min=1e-8)).mean())


def test_miou_by_hand_and_hungarian_as_the_reference():
    cm = ConfusionMatrix(3)
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    cm.update(target, pred)
    # class 0: tp 1, fp 1 (the 2 predicted 0), fn 1 → 1/3; class 1: tp 2, fp 1 → 2/3; class 2: tp 1, fn 1 → 1/2
    assert cm.miou() == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    g = torch.Generator().manual_seed(4)
    cm = ConfusionMatrix(6)
    target = torch.randint(0, 6, (4000,), generator=g)
    pred = (target + torch.randint(0, 2, (4000,), generator=g) * 2) % 6  # a permutation mixed with truth
    cm.update(target, pred)
    assert cm.miou("hungarian") == pytest.approx(ref_predsmiou_hungarian(cm.counts), abs=1e-12)
    assert cm.miou("hungarian") >= cm.miou()


def test_planted_features_retrieve_their_labels_perfectly():
    """Patch features that encode their class: every patch retrieves its own class, and the pixel score is
    that of the upsampled one-hot truth (bilinear upsampling blurs corners where three classes meet)."""
    num_classes, grid, size = 3, (4, 4), 16
    g = torch.Generator().manual_seed(5)
    prototypes = torch.eye(8)[:num_classes] * 5

    def batch(n):
        labels = torch.randint(0, num_classes, (n, *grid), generator=g)
        maps = labels.repeat_interleave(4, 1).repeat_interleave(4, 2)  # each patch one class
        feats = prototypes[labels.reshape(n, -1)] + 0.01 * torch.randn(n, 16, 8, generator=g)
        return feats, maps, labels

    builder = MemoryBuilder(num_classes, memory_size=40, images=5, epochs=1, generator=g)
    for _ in range(5):
        feats, maps, _ = batch(1)
        builder.add(feats, maps, grid)
    memory = builder.build()
    assert memory.features.shape[0] == 40
    feats, maps, labels = batch(3)
    dist = retrieve_labels(feats.reshape(-1, 8), memory.features, memory.labels, k=5)
    assert torch.equal(dist.argmax(1), labels.reshape(-1))
    cm = ConfusionMatrix(num_classes)
    cm.update(maps, upsampled_prediction(dist.reshape(3, 16, -1), grid, (size, size)))
    truth = ref_prediction(F.one_hot(labels.reshape(3, 16), num_classes).float(), 4, size, size)[:, 0]
    want = ConfusionMatrix(num_classes)
    want.update(maps, truth)
    assert cm.miou() == want.miou() > 0.8


def test_val_transform_is_the_reference_pipeline():
    """hbird's val path: Resize((S, S), antialias) + ToTensor + Normalize on the image; the mask through
    ToTensor, a tensor Resize with nearest neighbours, then ``(y * 255).long()``."""
    import torchvision.transforms as trn
    import torchvision.transforms.functional as TF
    from PIL import Image

    from analysis.retrieval import val_transform

    g = np.random.default_rng(0)
    image = Image.fromarray(g.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    mask = Image.fromarray(np.where(g.random((37, 53)) < 0.1, 255, g.integers(0, 21, (37, 53))).astype(np.uint8), "L")
    got_image, got_mask = val_transform(image, mask, 32)
    want_image = trn.Compose([trn.Resize((32, 32), antialias=True), trn.ToTensor(),
                              trn.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])(image)
    want_mask = (TF.resize(trn.ToTensor()(mask), (32, 32), interpolation=TF.InterpolationMode.NEAREST) * 255).long()
    torch.testing.assert_close(got_image, want_image)
    assert torch.equal(got_mask, want_mask[0])
