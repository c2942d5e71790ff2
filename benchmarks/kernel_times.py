"""A few calls of each kernel, for `ncu --clock-control none` to time the kernels alone:

    ncu --clock-control none -k regex:"spqt|qmv|gemv" python benchmarks/kernel_times.py
"""

import mlx.core as mx

import spqt_mlx as sq

for N, K in [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]:
    w = (mx.random.normal((N, K)) * 0.02).astype(mx.float16)
    qw = sq.zigzag_quantize(w, 64, 4)
    wq, s, b = mx.quantize(w, group_size=64, bits=4)
    x = mx.random.normal((1, K)).astype(mx.float16)
    t = mx.array(0.6745)  # about half the standard normal's |x| lies below
    mx.eval(qw.weight, wq, x, t)
    for _ in range(3):
        mx.eval(mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4))
        mx.eval(sq.zigzag_gemv(x, qw))
        mx.eval(sq.zigzag_gemv(x, qw, indices=sq.collect_active(x, t)))
