"""Images per second of each emergence metric (tools.emergence) for a ViT-S/16 at 224 and 512 px on this machine.

    python -m benchmarks.bench_emergence                    # CPU (or the GPU when there is one)
    python -m benchmarks.bench_emergence --sizes 224 --repeats 3 --memory 102400

Per metric, the cost of one image, weights random (speed does not depend on them):

* ``jaccard``: the last block's CLS attention of a batch of images (analysis.emergence's dino path);
* ``corloc LOST`` / ``corloc TokenCut``: the last block's keys of one padded image (batch 1, as the references)
  plus the box of each method (TokenCut: a dense float64 eigen-solve of an N×N matrix, N patches);
* ``hummingbird memory``: the normalised patch features of one augmented image, plus the rare-class sampling;
* ``hummingbird query``: one validation image's features plus the exact k=30 search of its N patches in a memory
  of ``--memory`` patches (torch chunked search; faiss IndexFlatIP too when faiss is installed, its index built
  once beforehand as the tool does).

Prints one line per metric and size: milliseconds per image and images per second (median of ``--repeats``).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from analysis.discovery import dino_vit_position_embedding, last_block_keys, lost, tokencut
from analysis.emergence import dino_position_embedding, normalize
from analysis.attention import cls_attention
from analysis.retrieval import MemoryBuilder, faiss_available, faiss_index, retrieve_labels


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    import timm

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="images per forward pass for jaccard and hummingbird")
    parser.add_argument("--memory", type=int, default=102_400, help="memory-bank patches for the query timing")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0,
                            dynamic_img_size=True).to(device).eval()
    print(f"device {device}, torch threads {torch.get_num_threads()}, ViT-S/16 random init, batch {args.batch}, "
          f"median of {args.repeats}")
    for size in args.sizes:
        grid = (size // 16, size // 16)
        images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8, device=device)
        one = normalize(images[:1])

        def jaccard():
            with torch.no_grad(), dino_position_embedding(vit, grid):
                cls_attention(vit, normalize(images), block=-1)

        t = timed(jaccard, args.repeats) / args.batch
        print(f"{size} px  jaccard            {1000 * t:8.1f} ms/image  {1 / t:8.2f} images/s")

        keys, key_grid = last_block_keys(vit, one)
        t_keys = timed(lambda: last_block_keys(vit, one), args.repeats)
        t_lost = timed(lambda: lost(keys[0], key_grid, 16, (size, size)), args.repeats)
        t_cut = timed(lambda: tokencut(keys[0], key_grid, 16, (size, size)), args.repeats)
        for name, t in (("corloc LOST", t_keys + t_lost), ("corloc TokenCut", t_keys + t_cut)):
            print(f"{size} px  {name:18s} {1000 * t:8.1f} ms/image  {1 / t:8.2f} images/s")
        print(f"{size} px    (keys {1000 * t_keys:.1f} ms, LOST box {1000 * t_lost:.1f} ms, "
              f"TokenCut box {1000 * t_cut:.1f} ms; {grid[0] * grid[1]} patches)")

        labels = torch.randint(0, 21, (args.batch, size, size), device=device)

        def features(x):
            with torch.no_grad(), dino_vit_position_embedding(vit, grid):
                return vit.forward_features(x)[:, vit.num_prefix_tokens:]

        def memory_step():
            # half of each image's patches kept (the sampling's cost does not depend on how many)
            builder = MemoryBuilder(21, memory_size=args.batch * grid[0] * grid[1] // 2, images=args.batch, epochs=1,
                                    generator=torch.Generator().manual_seed(0), device=device)
            builder.add(features(normalize(images)), labels, grid)

        t = timed(memory_step, args.repeats) / args.batch
        print(f"{size} px  hummingbird memory {1000 * t:8.1f} ms/image  {1 / t:8.2f} images/s")

        memory = F.normalize(torch.randn(args.memory, 384, device=device), dim=1)
        memory_labels = torch.rand(args.memory, 21, device=device)
        query = features(normalize(images[:1]))[0]
        t_feat = timed(lambda: features(normalize(images)), args.repeats) / args.batch
        backends = ["torch"] + (["faiss"] if faiss_available() else [])
        for backend in backends:
            index = faiss_index(memory) if backend == "faiss" else None  # built once, as tools.emergence does
            t_knn = timed(lambda: retrieve_labels(query, memory, memory_labels, backend=backend, index=index),
                          args.repeats)
            t = t_feat + t_knn
            print(f"{size} px  hummingbird query  {1000 * t:8.1f} ms/image  {1 / t:8.2f} images/s  "
                  f"({backend} search of {query.shape[0]} patches in {args.memory} : {1000 * t_knn:.1f} ms)")


if __name__ == "__main__":
    main()
