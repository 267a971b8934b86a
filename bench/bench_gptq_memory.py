"""Peak memory of GPTQ's Hessian preparation (`aptq.gptq._prepare_walk`: float64 copy, damping, Cholesky, inverse,
Cholesky) on one d × d Hessian, above the Hessian itself; one process per measurement (ru_maxrss is per process).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_gptq_memory.py ROOT D ACT_ORDER   # ROOT: a tree with aptq/

ROOT lets an older checkout be measured with the same script. Prints one line: the peak RSS above the Hessian's in
GiB, the size of one float64 copy, the CPU seconds and the sum of the inverse factor (equal sums: equal results).
"""

import gc
import resource
import sys
import time

import torch

root, d, act_order = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
sys.path.insert(0, root)
from aptq import gptq  # noqa: E402  (from ROOT)

torch.manual_seed(0)
inputs = torch.randn(d + 512, d)
hessian = inputs.T @ inputs / d
del inputs
gc.collect()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; includes the freed inputs, so peaks are lower bounds
start = time.process_time()
walk = gptq._prepare_walk(hessian, act_order, 0.01)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{root} d={d} act_order={act_order}: peak RSS above H's {(peak - base) / 2**20:.2f} GiB (float64 copy "
      f"{d * d * 8 / 2**30:.2f} GiB), cpu {time.process_time() - start:.1f}s, "
      f"upper sum {walk.upper.double().sum().item():.6e}", flush=True)
