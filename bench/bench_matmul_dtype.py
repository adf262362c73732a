"""bf16 vs fp32 matmul rate on this CPU, one thread, the shapes of an ABMIL step and of a 35-member population.

    PYTHONPATH=$PWD python bench/bench_matmul_dtype.py

Shapes: (1800 × 384) @ (384 × 128) (one model's input Linear on a wsi-small bag), (1800 × 384) @
(384 × 4480) (the shared input product of 35 members), (1800 × 128) @ (128 × 128) (V/U), a small
(64 × 128) @ (128 × 128), and a 35-member bmm (35, 1800, 128) @ (35, 128, 256).
"""
import time

import torch

torch.set_num_threads(1)
for (m,k,n) in [(1800,384,128),(1800,384,4480),(1800,128,128),(64,128,128)]:
    for dt in (torch.float32, torch.bfloat16):
        a=torch.randn(m,k,dtype=dt); b=torch.randn(k,n,dtype=dt)
        for _ in range(3): a@b
        r=max(1,int(2e9/(2*m*k*n)))
        t=time.perf_counter()
        for _ in range(r): a@b
        dtm=(time.perf_counter()-t)/r
        print(m,k,n,dt, f"{2*m*k*n/dtm/1e12:.3f} TFLOP/s")
    # batched 35
K=35
for dt in (torch.float32, torch.bfloat16):
    a=torch.randn(K,1800,128,dtype=dt); b=torch.randn(K,128,256,dtype=dt)
    for _ in range(3): torch.bmm(a,b)
    t=time.perf_counter()
    for _ in range(5): torch.bmm(a,b)
    dtm=(time.perf_counter()-t)/5
    print("bmm",K,dt,f"{2*K*1800*128*256/dtm/1e12:.3f}")
