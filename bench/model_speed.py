"""CPU (or GPU) forward speed of every registered model: ms per 256x256 pair at batch 1 and 8.

Writes a markdown table to ``bench/model_speed_<device>.md`` with the machine it ran on.
``python bench/model_speed.py [--device cpu|cuda] [--threads 2] [--precision fp32|bf16]``
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from geochange.engine.models import create, list_models, spec
from geochange.engine.models.stats import count_params
from geochange.engine.process import configure_process


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


@torch.inference_mode()
def ms_per_pair(model, batch: int, device, dtype, repeats: int) -> float:
    pre = torch.rand(batch, 3, 256, 256, device=device)
    post = torch.rand(batch, 3, 256, 256, device=device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        model(pre, post)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            model(pre, post)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats / batch * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=None)
    args = parser.parse_args()
    configure_process(threads=args.threads)  # as the engine's runs are
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    rows = [f"Machine: {machine(device)}; {args.precision}; mean of {args.repeats} runs after one warm-up.", "",
            "| model | params (M) | ms/pair, batch 1 | ms/pair, batch 8 |", "|---|---:|---:|---:|"]
    for name in args.models or list_models():
        model = create(name).eval().to(device).to(memory_format=torch.channels_last)
        b1 = ms_per_pair(model, 1, device, dtype, args.repeats)
        b8 = ms_per_pair(model, 8, device, dtype, args.repeats)
        params = count_params(model, spec(name).training_only)  # the inference model, as geochange models
        rows.append(f"| {name} | {params / 1e6:.3f} | {b1:.1f} | {b8:.1f} |")
        print(rows[-1], flush=True)
        del model
    out = Path(__file__).with_name(f"model_speed_{device.type}_{args.precision}.md")
    out.write_text("\n".join(rows) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
