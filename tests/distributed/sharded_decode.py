"""Run by tests/test_sharding.py under ``mlx.launch -n 2``: a patched model's prompt logits and
greedy sparse decode, unsharded and then sharded over the group; rank 0 prints both as JSON."""

import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lm_fixtures import random_tokens, tiny_llama, tiny_model  # noqa: E402

from spqt_mlx.patch import fuse_shared_inputs, patch_model, zigzag_layers  # noqa: E402
from spqt_mlx.patch.blocks import FusedDecoderBlock  # noqa: E402

threshold = float(sys.argv[1])
family = sys.argv[2] if len(sys.argv) > 2 else "llama"
group = mx.distributed.init()
model = tiny_llama(seed=5) if family == "llama" else tiny_model(family, seed=5)  # the same weights on every rank
patch_model(model, group_size=32, bits=4, thresholds=threshold)
prompt = random_tokens(9, seed=3)


def run(model, steps=6):
    logits = model(prompt)
    cache = make_prompt_cache(model)
    out = model(prompt, cache=cache)
    tokens, decode_logits = [], []
    for _ in range(steps):  # single-token steps: the sparse kernels
        token = mx.argmax(out[:, -1, :], axis=-1)
        tokens.append(int(token.item()))
        out = model(token[None], cache=cache)
        decode_logits.append(out[0, -1])
    return logits, tokens, mx.stack(decode_logits)


ref_logits, ref_tokens, ref_decode = run(model)
model.shard(group)
fuse_shared_inputs(model)
kinds = sorted({type(m).__name__ for m in zigzag_layers(model).values()})
logits, tokens, decode = run(model)
# Blocks whose decode steps ran the fused step on the rank's sharded projections.
fused = sum(isinstance(b, FusedDecoderBlock) and b._spqt_plan.group is not None
            and b._spqt_plan.ready(b, decode.dtype) is not None for b in model.model.layers)
mx.eval(ref_logits, ref_decode, logits, decode)  # every rank takes part in every collective
if group.rank() == 0:
    print(json.dumps({
        "size": group.size(),
        "kinds": kinds,
        "fused_blocks": fused,
        "blocks": len(model.model.layers),
        "prompt_diff": float(mx.abs(logits - ref_logits).max()),
        "decode_diff": float(mx.abs(decode - ref_decode).max()),
        "tokens": tokens,
        "ref_tokens": ref_tokens,
    }))
