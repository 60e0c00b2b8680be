"""What `cola`'s AVX2 cap on CPU kernels (src/cola_audio/cpu_kernels.py) costs in training speed.

Not a test: one pretraining-sized step loop (EfficientNet-B0 encoder, forward, backward, Adam; a
batch of 2 × pretrain.batch_size views of pretrain.crop_frames frames, pretrain.threads
threads) per kernel setting, each in its own process, since the libraries read their variables
once. Prints steps/s and the ratio to the CPU's own kernels. On an AVX2-only CPU the cap is the
CPU's own choice (ratio ≈ 1); on an AVX-512 CPU the ratio is the price of identical bytes.
Usage: python benchmarks/cpu_kernels.py [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from cola_audio.cpu_kernels import PINNED

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "the CPU's own kernels": {},
    "capped at AVX2 (every `cola` command)": PINNED,
    "capped, MKL's compatible branch": PINNED | {"MKL_CBWR": "COMPATIBLE"},
    "most basic (SSE, MKL compatible)": {
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "MKL_CBWR": "COMPATIBLE",
    },
}
LOOP = """
import json, sys, time, torch
from cola_audio.models.encoder import Encoder
cfg, steps = json.loads(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
torch.set_num_threads(cfg["threads"])
enc = Encoder()
opt = torch.optim.Adam(enc.parameters(), lr=1e-4)
x = torch.randn(2 * cfg["batch_size"], cfg["crop_frames"], 64)
def step():
    opt.zero_grad()
    enc(x).square().mean().backward()
    opt.step()
step()  # warm-up: kernel selection, allocation
start = time.perf_counter()
for _ in range(steps):
    step()
print(json.dumps({"steps_per_s": steps / (time.perf_counter() - start),
                  "aten": torch.backends.cpu.get_cpu_capability()}))
"""


def measure(kernels: dict[str, str], cfg: dict, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PINNED}  # the shell's own: ignored
    done = subprocess.run(
        [sys.executable, "-c", LOOP, json.dumps(cfg), str(steps)],
        env=env | kernels | {"PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    cfg = yaml.safe_load((REPO / "params.yaml").read_text())["pretrain"]
    cfg = {k: cfg[k] for k in ("batch_size", "crop_frames", "threads")}
    print(f"{cpu_name()}; {cfg}; {args.steps} steps after one warm-up step")
    results = {name: measure(kernels, cfg, args.steps) for name, kernels in SETTINGS.items()}
    own = results["the CPU's own kernels"]["steps_per_s"]
    print(f"{'kernels':40} {'torch picks':>11} {'steps/s':>8} {'× own':>6}")
    for name, r in results.items():
        print(f"{name:40} {r['aten']:>11} {r['steps_per_s']:8.3f} {r['steps_per_s'] / own:6.2f}")


if __name__ == "__main__":
    main()
