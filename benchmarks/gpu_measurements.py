"""The GPU measurements (training step, data path, MFU, largest batch) in one prepared run (about 9 minutes
on an H200; a deadline skips what would not fit): for ViT-S/16 and ResNet-50 at 224 px in bf16,

1. our training step vs a bare PyTorch loop at batch 64 and 256 (benchmarks/bench_train_step.py);
2. the data path's images/s in each ``--aug.device`` mode (cpu, gpu_photometric, gpu_full) next to the step
   rate at batch 64 and 256 (benchmarks/bench_data.py, ViT-S/16 step measured in the same run);
3. MFU: model FLOPs per image pair (torch's FLOP counter, bench_micro_batch.model_flops_per_pair) × our
   step rate from 1., over the device's peak (``--peak-tflops``, 989 for an H100/H200 SXM in bf16);
4. the largest batch that fits the device's memory with and without micro-batching
   (benchmarks/bench_micro_batch.py, doubling from 256 until out of memory or the limit).

Every measurement runs in its own process under a time limit; its full output lands in ``OUT/<name>.txt``,
the parsed figures in ``OUT/summary.json`` and ``OUT/summary.md`` (with the issue's targets: ours/bare ≥ 0.95
at batch 64; gpu_full ≥ 1.5× the ViT-S/16 batch-256 step rate). ``--smoke`` runs everything with tiny models
and images on the CPU, to know that the script works before a GPU is spent on it::

    python benchmarks/gpu_measurements.py --out "$OUT"                # needs: gpu
    python benchmarks/gpu_measurements.py --smoke --out /tmp/gpu_measurements  # CPU: ~21 min on the busy 2-core CI machine
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCH = ["--backbone.depth", "0", "--backbone.embed_dim", "0", "--backbone.num_heads", "0", "--backbone.patch_size", "0"]
MODELS = {"vit_s16": ["--backbone.name", "vit_small_patch16_224", *ARCH], "resnet50": ["--backbone.name", "resnet50", *ARCH]}
SMOKE_MODELS = {"vit_s16": ["--backbone.name", "vit", "--backbone.depth", "1", "--backbone.embed_dim", "16",
                            "--backbone.num_heads", "1", "--backbone.patch_size", "8"],
                "resnet50": ["--backbone.name", "resnet50", *ARCH]}


def settings(smoke: bool, out: Path) -> dict:
    """Sizes of the real run (H200) or of the CPU smoke run. The data: generated VOC-layout JPEGs of VOC's
    size (500 px), made once by tools.synthetic_voc with several processes."""
    if smoke:
        return dict(models=SMOKE_MODELS, batches=[8, 16], img=32, data_root=out / "data", images=48, size=48,
                    workers=2, steps=2, warmup=1, rounds=1, data_batches=2, budget_start=8, budget_limit=16,
                    deadline=1500, limit=600, largest_limit=600)
    return dict(models=MODELS, batches=[64, 256], img=224, data_root=Path("/tmp/bench_voc_gpu"), images=1024,
                size=500, workers=8, steps=15, warmup=3, rounds=2, data_batches=10, budget_start=512,
                budget_limit=4096, deadline=560, limit=150, largest_limit=200)


def device_memory_gib() -> float:
    """Total memory of GPU 0 (nvidia-smi), or 0 when there is none."""
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30).stdout
        return float(text.split()[0]) / 1024
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return 0.0


class Runner:
    """Runs the measurements one after another, each in its own process, until the deadline."""

    def __init__(self, out: Path, deadline_s: float, limit_s: float):
        self.out, self.start, self.deadline, self.limit = out, time.time(), deadline_s, limit_s
        self.status: dict[str, str] = {}

    def left(self) -> float:
        return self.deadline - (time.time() - self.start)

    def __call__(self, name: str, command: list[str], limit: float | None = None) -> str:
        """The command's output ('' when skipped or failed); its status goes into summary.json."""
        limit = min(limit or self.limit, self.left())
        if limit < 20:
            self.status[name] = "skipped: deadline"
            print(f"[{time.time() - self.start:5.0f} s] skip {name} (deadline)", flush=True)
            return ""
        print(f"[{time.time() - self.start:5.0f} s] {name}: {' '.join(command[1:])}", flush=True)
        try:
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            text, rc = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as err:
            text = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
            rc = f"timeout after {limit:.0f} s"
        (self.out / f"{name}.txt").write_text(text)
        self.status[name] = "ok" if rc == 0 else f"failed ({rc})"
        return text if rc == 0 else ""


def number(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None


def flops_worker(overrides: list[str]) -> None:
    """(hidden) Print the model FLOPs of one training step per image pair, as JSON."""
    sys.path.insert(0, str(ROOT))
    import torch

    # local: only this hidden worker mode needs torch; the orchestrating process stays torch-free
    from benchmarks.bench_micro_batch import model_flops_per_pair
    from config.loading import parse_config  # local: as above

    cfg = parse_config(["--config", "config/quickstart.yaml", *overrides])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps({"flops_per_pair": model_flops_per_pair(cfg, device)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="folder for the results")
    parser.add_argument("--smoke", action="store_true", help="tiny models and images on the CPU: does it run?")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the device's peak bf16 TFLOP/s (dense), for MFU: 989 for an H100/H200 SXM")
    parser.add_argument("--deadline-s", type=float, default=0, help="stop starting measurements after this "
                        "many seconds (default: 560 on a GPU, so the whole run stays under 10 minutes)")
    parser.add_argument("--parts", default="step,data,mfu,largest",
                        help="which measurements (comma-separated): step, data, mfu (needs step), largest; a second "
                             "run (another --out) can do what the deadline skipped in the first")
    parser.add_argument("--flops-worker", action="store_true", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.flops_worker:
        flops_worker(rest)
        return
    parts = set(args.parts.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    s = settings(args.smoke, out)
    run = Runner(out, args.deadline_s or s["deadline"], s["limit"])
    py = sys.executable
    common = ["--config", "config/quickstart.yaml", "--data.img_size", str(s["img"]), "--data.dataset", "voc",
              "--data.root", str(s["data_root"])]
    # the largest batch: until out of memory (the device's whole memory as the budget), or 1 GiB on the CPU
    budget_gib = 1.0 if args.smoke else (device_memory_gib() or 1000.0)
    summary: dict = {"smoke": args.smoke, "peak_tflops": args.peak_tflops, "step": {}, "data": {}, "mfu": {},
                     "largest_batch": {}}
    if not args.smoke:
        try:
            summary["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                             "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
        except OSError as err:
            summary["gpu"] = f"nvidia-smi: {err}"
    # The data once, with several processes (the datamodules' own generator uses one).
    if "data" in parts:
        run("prepare_data", [py, "-m", "tools.synthetic_voc", str(s["data_root"]), "--train", str(s["images"]), "--val",
                             "64", "--size", str(s["size"]), "--seed", "0", "--workers", str(min(12, os.cpu_count() or 1))],
            limit=240)
    # 1. our step vs the bare loop
    for model, flags in (s["models"].items() if parts & {"step", "mfu"} else ()):
        for b in s["batches"]:
            text = run(f"step_{model}_b{b}", [py, "benchmarks/bench_train_step.py", *common, *flags,
                                              "--batch-size", str(b), "--steps", str(s["steps"]), "--warmup",
                                              str(s["warmup"]), "--rounds", str(s["rounds"]), "--data-batches", "0"])
            summary["step"][f"{model}_b{b}"] = {"ours_steps_per_s": number(r"(?m)^ours: ([\d.]+) steps/s", text),
                                                 "bare_steps_per_s": number(r"(?m)^bare PyTorch loop: ([\d.]+) steps/s", text),
                                                 "ratio_ours_bare": number(r"(?m)^ratio ours/bare: ([\d.]+)", text)}
    # 2. the data path in each mode, next to the ViT-S/16 step
    for b in (s["batches"] if "data" in parts else ()):
        path = out / f"data_b{b}.json"
        text = run(f"data_b{b}", [py, "benchmarks/bench_data.py", *common, *s["models"]["vit_s16"],
                                  "--batch-size", str(b), "--workers", str(s["workers"]), "--batches",
                                  str(s["data_batches"]), "--steps", str(s["steps"] // 2), "--warmup", str(s["warmup"]),
                                  "--json", str(path), *(["--compare-resamplers"] if b == s["batches"][0] else [])])
        if text and path.is_file():
            summary["data"][f"b{b}"] = json.loads(path.read_text())
    # 3. MFU from the FLOP count and our measured step rate
    for model, flags in (s["models"].items() if "mfu" in parts else ()):
        text = run(f"flops_{model}", [py, "benchmarks/gpu_measurements.py", "--flops-worker", *common, *flags], limit=120)
        flops = number(r'"flops_per_pair": ([\d.e+]+)', text)
        for b in s["batches"]:
            rate = summary["step"].get(f"{model}_b{b}", {}).get("ours_steps_per_s")
            if flops and rate:
                achieved = flops * b * rate / 1e12
                summary["mfu"][f"{model}_b{b}"] = {"model_tflops_per_s": achieved, "mfu": achieved / args.peak_tflops,
                                                   "flops_per_pair": flops}
    # 4. the largest batch, without and with micro-batching (last: the slowest part)
    for model, flags in (s["models"].items() if "largest" in parts else ()):
        text = run(f"largest_batch_{model}", [py, "benchmarks/bench_micro_batch.py", *common, *flags,
                                              "--micro", str(s["budget_start"]), "--batches", str(2 * s["budget_start"]),
                                              "--steps", "1", "--warmup", "1", "--peak-tflops", str(args.peak_tflops),
                                              "--budget-gib", f"{budget_gib:.1f}", "--budget-limit",
                                              str(s["budget_limit"])], limit=s["largest_limit"])
        for micro, label in ((r"off", "without_micro_batching"), (r"\d+", "with_micro_batching")):
            found = re.search(rf"largest batch within [\d.]+ GiB, micro-batching {micro}: (\d+|none)", text)
            summary["largest_batch"].setdefault(model, {})[label] = found.group(1) if found else None
        summary["largest_batch"][model]["budget_gib"] = round(budget_gib, 1)
        summary["largest_batch"][model]["search"] = f"doubling from {s['budget_start']} to {s['budget_limit']}"
    summary["status"] = run.status
    summary["elapsed_s"] = round(time.time() - run.start)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(report(summary, s["batches"]))
    print((out / "summary.md").read_text())


def report(summary: dict, batches: list[int]) -> str:
    """The figures as markdown, with the issue's targets."""
    lines = [f"# GPU measurements ({'CPU smoke run: tiny sizes, not the real figures' if summary['smoke'] else summary.get('gpu', '')})",
             "", "| model | batch | ours steps/s | bare steps/s | ours/bare | model TFLOP/s | MFU |", "|---|---|---|---|---|---|---|"]
    fmt = lambda v, f="{:.3f}": "-" if v is None else f.format(v)  # noqa: E731
    for key, step in summary["step"].items():
        model, b = key.rsplit("_b", 1)
        m = summary["mfu"].get(key, {})
        lines.append(f"| {model} | {b} | {fmt(step['ours_steps_per_s'])} | {fmt(step['bare_steps_per_s'])} | "
                     f"{fmt(step['ratio_ours_bare'])} | {fmt(m.get('model_tflops_per_s'), '{:.1f}')} | "
                     f"{fmt(m.get('mfu'), '{:.1%}')} |")
    lines += ["", "| batch | data cpu img/s | gpu_photometric | gpu_full | ViT-S/16 step img/s | gpu_full / step |",
              "|---|---|---|---|---|---|"]
    for key, d in summary["data"].items():
        rates, step = d["loader_images_per_s"], d.get("training_images_per_s")
        full = rates.get("gpu_full")
        lines.append(f"| {key[1:]} | {fmt(rates.get('cpu'), '{:.0f}')} | {fmt(rates.get('gpu_photometric'), '{:.0f}')} | "
                     f"{fmt(full, '{:.0f}')} | {fmt(step, '{:.0f}')} | {fmt(full / step if full and step else None, '{:.2f}')} |")
    lines += ["", "| model | largest batch without micro-batching | with micro-batching | budget |", "|---|---|---|---|"]
    for model, found in summary["largest_batch"].items():
        lines.append(f"| {model} | {found['without_micro_batching']} | {found['with_micro_batching']} | "
                     f"{found['budget_gib']} GiB, {found['search']} |")
    vit64 = summary["step"].get(f"vit_s16_b{batches[0]}", {}).get("ratio_ours_bare")
    data_big = summary["data"].get(f"b{batches[-1]}", {})
    full, step = data_big.get("loader_images_per_s", {}).get("gpu_full"), data_big.get("training_images_per_s")
    lines += ["", f"Targets: ours/bare at batch {batches[0]} (ViT-S/16) ≥ 0.95: {fmt(vit64)}; gpu_full ≥ 1.5× the "
              f"ViT-S/16 batch-{batches[-1]} step rate: {fmt(full / step if full and step else None, '{:.2f}')}×.",
              "", "Status: " + ", ".join(f"{k} {v}" for k, v in summary["status"].items()),
              f"Elapsed: {summary['elapsed_s']} s", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
