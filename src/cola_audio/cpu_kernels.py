"""Every `cola` command caps the x86 kernels of torch, oneDNN and MKL at AVX2.

Left alone, each library picks the widest kernels its CPU offers (AVX-512 on many servers), and
wider kernels add float sums in another order: the same default pretraining gave another encoder
on an AVX-512 CPU than the committed dvc.lock's (issue 21), so `dvc repro` on a teammate's machine
did not give `dvc pull`'s bytes. Most x86-64 CPUs of the last decade have AVX2. On this
project's (AMD, AVX2) machine the cap kept the encoder's bytes and the speed; MKL's reproducible
mode moved some embeddings by ≤ 6e-5 (docs/determinism.md).

Each library reads its variable once, when first used, so the cap is set before torch loads;
a process that imported torch earlier (a test calling `cli.main`) keeps the kernels it has.
The cap overrides these variables when a user sets them: the bytes are a function of the inputs,
not of the shell. What it is not known to cover is in docs/determinism.md (MKL's fixed AVX2
branch exists on Intel CPUs only; CPUs without AVX2; GPUs; torch used from your own Python).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import MutableMapping

PINNED = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's own vectorised kernels (default: the widest)
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN's JIT kernels: convolutions, batch norm
    "MKL_CBWR": "AVX2",  # MKL's BLAS (matrix products): one code branch, fixed reductions
}
X86 = {"x86_64", "amd64", "x86", "i686"}


def pin(environ: MutableMapping[str, str] = os.environ, machine: str | None = None) -> bool:
    """Set the caps in `environ` on an x86 machine before torch is loaded; True if it did."""
    if (machine or platform.machine()).lower() not in X86 or "torch" in sys.modules:
        return False
    environ.update(PINNED)
    return True
