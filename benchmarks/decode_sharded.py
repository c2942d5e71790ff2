"""Decode speed of tensor-parallel models: mlx-lm's 4-bit model against the zigzag model, both
sharded with ``model.shard(group)`` over the processes of ``mlx.launch`` (issue 14).

    mlx.launch -n 2 --backend nccl python benchmarks/decode_sharded.py --size 8b --json sharded.json
    python benchmarks/decode_sharded.py --size 8b --json single.json     # one process: the scaling base

Models are built as in decode_cuda.py (random weights, the same on every rank, quantized block by
block), calibrated for the target sparsity on the whole model (identically on every rank), then
sharded. Rank 0 writes rows ``size, model, processes, sparsity, decode_tps, prefill_tps``.
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_cuda import SIZES, baseline_quantize, decode_speed, load_model, zigzag_quantize  # noqa: E402

import spqt_mlx.calibrate as calibrate  # noqa: E402
from spqt_mlx.patch import fuse_shared_inputs, set_thresholds  # noqa: E402
from spqt_mlx.patch.sharded import make_shardable  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="8b")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--json")
    args = p.parse_args(argv)

    group = mx.distributed.init()
    n = group.size()
    prompt = mx.random.randint(0, 128256, (128,), key=mx.random.key(1))
    calib = mx.random.randint(0, 128256, (256,), key=mx.random.key(2))
    rows = []

    def record(model_name, sparsity, model):
        mx.eval(mx.distributed.all_sum(mx.array(1.0)))  # start together
        pre, dec = decode_speed(model, prompt, args.tokens)
        rows.append(dict(size=args.size, model=model_name, processes=n, sparsity=sparsity, prefill_tps=pre,
                         decode_tps=dec))
        if group.rank() == 0:
            print(rows[-1], flush=True)

    model, _ = load_model(args.size, baseline_quantize)
    if n > 1:
        model.shard(group)
        mx.eval(model.parameters())
    record("mlx-lm 4-bit (nn.QuantizedLinear)", 0.0, model)
    del model
    mx.clear_cache()

    model, _ = load_model(args.size, zigzag_quantize)
    thresholds = {s: calibrate.calibrate(model, calib, s, progress=False) if s else 0.0 for s in args.sparsities}
    if n > 1:
        make_shardable(model)  # load_model patched block by block: the model itself was not seen
        model.shard(group)
        mx.eval(model.parameters())
    fuse_shared_inputs(model)
    for s in args.sparsities:
        set_thresholds(model, thresholds[s])
        record("zigzag 4-bit", s, model)

    if group.rank() == 0 and args.json:
        device = mx.device_info().get("device_name", "") if mx.cuda.is_available() else "cpu"
        with open(args.json, "w") as f:
            json.dump(dict(device=device, date=datetime.date.today().isoformat(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
