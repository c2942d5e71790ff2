"""model.shard(group) on patched models: zigzag layers split by output bands or input columns,
checked in one process against the unsharded layer, and end to end over two processes
(mlx.launch, ring backend) against the unsharded model."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from lm_fixtures import free_ports, launcher
from spqt_mlx.patch import FAMILIES, ZigzagLinear
from spqt_mlx.patch.sharded import ZigzagAllToShardedLinear, ZigzagShardedToAllLinear, shard_zigzag

JOB = Path(__file__).resolve().parent / "distributed" / "sharded_decode.py"


class FakeGroup:
    """A rank of a group, for splitting parameters in one process."""

    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def layer(out_dims=256, in_dims=96, bias=True, seed=0):
    mx.random.seed(seed)
    return ZigzagLinear.from_linear(nn.Linear(in_dims, out_dims, bias=bias), group_size=32, bits=4)


@pytest.mark.parametrize("segments", [1, 2, [0.25, 0.75]])
def test_all_to_sharded_ranks_hold_whole_bands(segments):
    full = layer()
    x = mx.random.normal((3, 96))
    want = np.array(full(x))
    parts = [np.array(ZigzagLinear.__call__(ZigzagAllToShardedLinear.from_zigzag(full, segments=segments,
                                                                                  group=FakeGroup(r, 2)), x))
             for r in range(2)]
    # Each segment's rows are split in two, rank 0 taking the first half: put them back in order.
    bounds = {1: [0, 256], 2: [0, 128, 256]}.get(segments, [0, 64, 256]) if not isinstance(segments, list) \
        else [0, 64, 192, 256]
    offset, pieces = [0, 0], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        share = (hi - lo) // 2
        for r in range(2):
            pieces.append(parts[r][:, offset[r]:offset[r] + share])
            offset[r] += share
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), want, rtol=1e-5, atol=1e-5)


def test_sharded_to_all_partials_sum_to_the_layer():
    full = layer(in_dims=128)
    full.threshold = 0.3
    x = mx.random.normal((1, 128))
    want = np.array(full(x))  # one token: the sparse kernel
    shards = [ZigzagShardedToAllLinear.from_zigzag(full, group=FakeGroup(r, 2)) for r in range(2)]
    partial = sum(np.array(ZigzagLinear.__call__(s, x[:, 64 * r:64 * (r + 1)])) for r, s in enumerate(shards))
    np.testing.assert_allclose(partial + np.array(full.bias), want, rtol=1e-5, atol=1e-5)
    assert all(s.threshold == 0.3 and "bias" not in s and "sharded_bias" in s for s in shards)


def test_the_criterion_follows_the_shards():
    """Under WINA's criterion a rank's slice of input columns keeps its columns' norms, and a rank's
    output rows keep the whole layer's: the ranks skip what the whole layer skips."""
    from spqt_mlx.patch.model import column_scales

    full = layer(in_dims=128)
    full.set_column_scale(column_scales({"l": full})["l"])
    full.threshold = 0.2
    x = mx.random.normal((1, 128), key=mx.random.key(9))
    want = np.array(full(x))
    shards = [ZigzagShardedToAllLinear.from_zigzag(full, group=FakeGroup(r, 2)) for r in range(2)]
    partial = sum(np.array(ZigzagLinear.__call__(s, x[:, 64 * r:64 * (r + 1)])) for r, s in enumerate(shards))
    np.testing.assert_allclose(partial + np.array(full.bias), want, rtol=1e-5, atol=1e-5)
    rows = ZigzagAllToShardedLinear.from_zigzag(full, group=FakeGroup(1, 2))
    assert rows.column_scale is full.column_scale
    np.testing.assert_allclose(np.array(ZigzagLinear.__call__(rows, x)), want[:, 128:], rtol=1e-5, atol=1e-5)


def test_uneven_splits_are_refused():
    with pytest.raises(ValueError, match="cannot be split over 3 ranks in whole bands of 32 rows; no supported"):
        shard_zigzag(layer(out_dims=128), "all-to-sharded", group=FakeGroup(0, 3))
    wide = ZigzagLinear.from_linear(nn.Linear(96, 192), group_size=64, bits=4)  # 3 bands of 64
    with pytest.raises(ValueError, match=r"bands of 64 rows; quantize with a group size of 32 \(--group-size 32\)"):
        shard_zigzag(wide, "all-to-sharded", group=FakeGroup(0, 2))
    with pytest.raises(ValueError, match="cannot be split over 5 ranks; use a number of ranks that divides it"):
        shard_zigzag(layer(in_dims=96), "sharded-to-all", group=FakeGroup(0, 5))
    with pytest.raises(ValueError, match="sharding must be"):
        shard_zigzag(layer(), "both")
    with pytest.raises(TypeError, match="ZigzagLinear"):
        shard_zigzag(nn.Linear(64, 64), "all-to-sharded")


@pytest.mark.parametrize("threshold,family", [(0.0, "llama"), (0.05, "llama"), (0.05, "qwen2"), (0.05, "qwen3"),
                                              (0.05, "qwen3_moe")])
def test_two_processes_decode_as_one(threshold, family):
    """Two ranks over the ring backend: prompt logits and greedy (sparse) decode of the sharded model
    equal the unsharded model's."""
    port = free_ports()
    cmd = [launcher(), "-n", "2", "--backend", "ring", "--starting-port", str(port), "--python", sys.executable,
           str(JOB), str(threshold), family]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # MoE experts are sharded in place (mlx-lm's shard_inplace): they keep their class.
    experts = ["ZigzagSwitchLinear"] if family == "qwen3_moe" else []
    assert result["size"] == 2 and result["kinds"] == ["ZigzagAllToShardedLinear", "ZigzagShardedToAllLinear", *experts]
    assert result["prompt_diff"] < 1e-4 and result["decode_diff"] < 1e-4
    assert result["tokens"] == result["ref_tokens"]
    # Families with fused decoder blocks keep them sharded: their decode above ran fused.
    assert result["fused_blocks"] == (result["blocks"] if family in FAMILIES else 0)


@pytest.mark.skipif(__import__("importlib").util.find_spec("_spqt_mlx_lm_hook") is None,
                    reason="spqt-mlx is not pip-installed (no mlx-lm hook)")
def test_mlx_lm_benchmark_spqt_under_mlx_launch(tmp_path):
    """The user's path: mlx.launch -n 2 ... mlx_lm.benchmark --spqt (mlx-lm's sharded_load, patched)."""
    import os

    from lm_fixtures import write_model_dir

    model_dir = write_model_dir(tmp_path / "tiny", chat_template=True)
    port = free_ports()
    benchmark = shutil.which("mlx_lm.benchmark") or str(Path(sys.executable).parent / "mlx_lm.benchmark")
    # Long options only: mlx.launch takes -n and -p itself.
    cmd = [launcher(), "-n", "2", "--backend", "ring", "--starting-port", str(port), "--python", sys.executable,
           benchmark, "--model", str(model_dir), "--spqt", "--sparsity", "0.4", "--group-size", "32",
           "--prompt-tokens", "16", "--generation-tokens", "8", "--num-trials", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert out.count("[spqt] sharded over 2 processes") == 2 and "Averages: prompt_tps=" in out


def test_spqt_generate_under_mlx_launch(tmp_path):
    """mlx.launch -n 2 spqt-generate --spqt: the model is sharded over both processes, rank 0 alone
    prints, and the text is the unsharded run's."""
    import os

    from lm_fixtures import write_model_dir

    model_dir = write_model_dir(tmp_path / "tiny")
    args = ["--model", str(model_dir), "--spqt", "--sparsity", "0.4", "--group-size", "32", "--prompt", "the quick brown",
            "--max-tokens", "12", "--ignore-chat-template", "--temp", "0"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    single = subprocess.run([sys.executable, "-m", "spqt_mlx.generate", *args], capture_output=True, text=True,
                            env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    port = free_ports()
    script = shutil.which("spqt-generate") or str(Path(sys.executable).parent / "spqt-generate")
    if not Path(script).exists():
        pytest.skip("spqt-mlx is not pip-installed (no spqt-generate script)")
    cmd = [launcher(), "-n", "2", "--backend", "ring", "--starting-port", str(port), "--python", sys.executable,
           script, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert done.stdout.count("Generation:") == 1 and (done.stdout + done.stderr).count("sharded over 2 processes") == 2
    text = lambda out: out.split("==========")[1].strip()
    assert text(done.stdout) == text(single.stdout)


def test_integer_split_points_and_in_place_sharding():
    """segments as split points (qwen3_5's [kd, 2*kd]) and mlx-lm's shard_inplace, for zigzag layers."""
    from spqt_mlx.patch.sharded import _parts, shard_zigzag_inplace

    assert _parts(192, [64, 128], "w") == [(0, 64), (64, 128), (128, 192)]
    assert _parts(192, [0.25, 0.5], "w") == [(0, 48), (48, 96), (96, 192)]
    with pytest.raises(ValueError, match="not ordered"):
        _parts(192, [128, 64], "w")
    full = layer(out_dims=256, in_dims=64)
    x = mx.random.normal((2, 64))
    want = np.array(full(x))
    rank1 = layer(out_dims=256, in_dims=64)
    shard_zigzag_inplace(rank1, "all-to-sharded", segments=[64], group=FakeGroup(1, 2))
    assert type(rank1) is ZigzagLinear and rank1.output_dims == 128
    # Rank 1 holds the second half of each segment: rows 32-63 and 160-255.
    np.testing.assert_allclose(np.array(rank1(x)), np.concatenate([want[:, 32:64], want[:, 160:]], axis=1),
                               rtol=1e-5, atol=1e-5)
