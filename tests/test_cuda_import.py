"""The CUDA kernel packages (causal_conv1d, mamba_ssm) are optional and GPU-only: a CPU process
never even tries to import them, and ``GRANITE_LSP_CUDA_KERNELS=0`` keeps them out on CUDA too."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

_CHECK = """
import os
import sys

PACKAGES = ("mamba_ssm", "causal_conv1d", "causal_conv1d_cuda", "selective_scan_cuda")
tried = []


class Spy:  # sees every import that is not already in sys.modules, installed or not
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in PACKAGES:
            tried.append(name)
        return None


sys.meta_path.insert(0, Spy())

import torch

from granite_lsp.runtime import HybridModel, cuda_kernels

model = HybridModel.from_pretrained(sys.argv[1])  # CPU, torch ops (GRANITE_LSP_KERNELS=0)
state = model.new_state(64)
model.forward(torch.arange(40) % model.config.vocab_size, state)
model.forward(torch.tensor([5]), state)
assert not cuda_kernels.available("cpu")
assert cuda_kernels.describe("cpu") == "conv: torch, scan: torch"
assert cuda_kernels.conv(torch.zeros(3, 8), torch.zeros(3, 8), torch.zeros(8, 4), None) is None
x, dt, A = torch.zeros(2, 2, 4), torch.ones(2, 2), -torch.ones(2)
assert cuda_kernels.scan(x, dt, A, torch.zeros(2, 1, 4), torch.zeros(2, 1, 4), torch.zeros(2, 4, 4)) is None
os.environ[cuda_kernels.ENV] = "0"
assert not cuda_kernels.available("cuda")
assert not tried, tried
assert not [m for m in sys.modules if m.split(".")[0] in PACKAGES]
print("ok")
"""


def test_cpu_runtime_never_tries_the_cuda_kernel_packages():
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "GRANITE_LSP_KERNELS": "0", "PYTHONPATH": path}
    env.pop("GRANITE_LSP_CUDA_KERNELS", None)
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK, str(REPO / "model" / "tiny")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
