"""The samplers' own work in CPU time (``time.process_time``, so that other processes' load does not
count): the bench's MLP chain (T = 1000, 64 samples) with its network replaced by the identity, at 10
and 50 steps, beside the network's forward pass (docs/performance.md, issue 26).

    OMP_NUM_THREADS=1 python benchmarks/sampler_overhead.py
"""

import time

import torch

from pyrovae.bench.cases import _chain
from pyrovae.bench.harness import FULL
from pyrovae.diffusion.samplers import sample

torch.set_num_threads(1)
chain = _chain(FULL, "mlp", 1000, torch.device("cpu"))
x, tau = torch.randn(64, 784), torch.full((64,), 500.0)


def cpu_ms(f, k=20):
    for _ in range(2):
        f()
    t = time.process_time()
    for _ in range(k):
        f()
    return (time.process_time() - t) / k * 1e3


with torch.no_grad():
    print(f"MLP forward, 64 images: {cpu_ms(lambda: chain.net(x, tau), 200):.3f} ms")


class Identity(torch.nn.Module):
    def forward(self, x, t):
        return x


chain.net = Identity()
for name in ("ddim", "dpm-solver++"):
    a, b = (cpu_ms(lambda k=k, name=name: sample(chain, 64, k, name)) for k in (10, 50))
    per_step = (b - a) / 40
    print(
        f"{name}: 10 steps {a:.2f} ms, 50 steps {b:.2f} ms; per step {per_step:.3f}, fixed {a - 10 * per_step:.2f} ms"
    )
