"""The one script that checks CUDA for real: the whole pipeline on one GPU.

Synthetic data -> teacher extraction -> neighbours -> 300 steps of ViT-XS-16 with
plain CLIP and with CLIP-PING (same data, steps and seed) -> evaluation. Prints
samples/s, the CLIP-PING / CLIP step-time ratio, peak GPU memory and the metrics.
On a machine without CUDA it says so in one line and exits 0.

    python benchmarks/gpu_smoke.py [--steps 300] [--batch-size 256] [--precision bf16] [--work /tmp/gpu_smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--n-train", type=int, default=8000)
    parser.add_argument("--work", default="/tmp/clip_ping_gpu_smoke")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device on this machine; nothing to check (exit 0)")
        return 0

    from clip_ping.banks import ExtractConfig, extract_banks
    from clip_ping.data.synth import SynthConfig, generate_synthetic
    from clip_ping.evaluation.stage import EvalConfig, evaluate_from_config
    from clip_ping.knn import NeighborsConfig, build_neighbors
    from clip_ping.training.trainer import TrainConfig, train

    work = Path(args.work)
    data, banks = work / "data", work / "data" / "banks"
    device = torch.cuda.get_device_name(0)
    t0 = time.perf_counter()
    generate_synthetic(SynthConfig(out=str(data), n_train=args.n_train, n_val=500, n_test=1000, image_size=224))
    t_extract = time.perf_counter()
    extract_banks(ExtractConfig(data=str(data / "train.csv"), out=str(banks), device="cuda", batch_size=256, workers=8))
    t_neighbors = time.perf_counter()
    build_neighbors(NeighborsConfig(banks=str(banks), k=10, device="cuda"))
    t_train = time.perf_counter()
    results = {"device": device, "stage_s": {"synth": round(t_extract - t0, 1), "extract": round(t_neighbors - t_extract, 1),
                                               "neighbors": round(t_train - t_neighbors, 1)}}
    for method in ("clip", "clip-ping"):
        run = work / f"run-{method}"
        torch.cuda.reset_peak_memory_stats()
        cfg = TrainConfig(data=str(data), banks=str(banks), out=str(run), method=method, model="ViT-XS-16",
                          steps=args.steps, batch_size=args.batch_size, precision=args.precision, workers=8,
                          warmup_steps=30, save_every=args.steps, log_every=10, device="auto", seed=0)
        train(cfg)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steady = [r["samples_per_s"] for r in records[len(records) // 3:]]  # after warm-up and compilation
        metrics = evaluate_from_config(EvalConfig(checkpoint=str(run), data=str(data), device="cuda", workers=8))
        results[method] = {"samples_per_s": round(statistics.median(steady), 1),
                           "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
                           "final_loss": records[-1]["loss"], "eval": metrics}
    results["step_time_ratio_clip_ping_over_clip"] = round(
        results["clip"]["samples_per_s"] / results["clip-ping"]["samples_per_s"], 3)
    print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
