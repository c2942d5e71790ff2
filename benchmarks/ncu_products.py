"""Three products of 14336x4096 (fp16, 4-bit g64), three calls each, for Nsight Compute: dense (the
bulk-copy kernel on Hopper), and thresholded (the tensor-core kernel's fused collection) at about 75 %
and 50 % active columns, as decode runs them at 25 % and 50 % sparsity.

    ncu --clock-control none -k regex:spqt --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section SchedulerStats --section LaunchStats --csv \
        python benchmarks/ncu_products.py > ncu.csv
"""

import mlx.core as mx
import numpy as np
import spqt_mlx as sq


def main():
    N, K = 14336, 4096
    w = (mx.random.normal((N, K), key=mx.random.key(1)) * 0.02).astype(mx.float16)
    qw = sq.zigzag_quantize(w, 64, 4)
    x = mx.random.normal((1, K), key=mx.random.key(2)).astype(mx.float16)
    mx.eval(qw.weight, qw.scales, qw.biases, x)
    a = np.abs(np.array(x.astype(mx.float32))).ravel()
    for label, t in (("dense", None), ("d=0.75", float(np.quantile(a, 0.25))), ("d=0.5", float(np.quantile(a, 0.5)))):
        for _ in range(3):
            mx.eval(sq.zigzag_gemv(x, qw, threshold=t) if t is not None else sq.zigzag_gemv(x, qw))
        print(label, "threshold", t, flush=True)


if __name__ == "__main__":
    main()
