"""Decoder blocks whose decode step runs four zigzag products and little else.

A pre-norm decoder block (``h = x + attn(norm1(x))``, ``out = h + mlp(norm2(h))``, RMSNorm and a
SwiGLU MLP) calls, per decoded token, two norms, a stacked q/k/v product, the attention, o_proj, a
residual add, a stacked gate/up product, the SwiGLU, down_proj and another residual add. Decoding
small models on a fast GPU is bound by the host's cost per kernel, so this module folds each
product's neighbours into the product's kernel (``zigzag_gemv``'s prologue and residual):

    qkv = W_qkv @ rmsnorm(x)            one kernel (q/k/v stacked)
    h   = x + W_o @ attention(q, k, v)  one kernel after the attention
    gu  = W_gu @ rmsnorm(h)             one kernel (gate/up stacked)
    out = h + W_down @ swiglu(gu)       one kernel

The active columns of each product are still decided on its real input (the normalized vector,
the SwiGLU output), as calibrated. A block sharded by its model's ``shard(group)`` (q/k/v and
gate/up by output rows, o and down by input columns) runs the same four products on its rank's
part, o and down each followed by the sum over the group, into which rank 0 alone adds the
residual. The block is installed by class (the instance keeps its
parameters and mlx-lm class, so saving, loading, sharding and LoRA see the same model) for the
families listed in ``FAMILIES``. A decode step is one token, or one token for each sequence of a
batch of up to ``GEMV_MAX_ROWS`` (mlx-lm's BatchGenerator, as mlx_lm.server runs it), whose rows
each keep their own active columns. Any other call (prefill, larger batches, recording statistics,
calibration probes, LoRA adapters, thresholds that differ within a stack) runs the family's own
forward, and with it the per-projection path.
"""

from __future__ import annotations

from operator import is_

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention

from .._ext import Prologue
from .fused import identical, stack_siblings
from .linear import GEMV_MAX_ROWS, ZigzagLinear, zigzag_product
from .sharded import ZigzagAllToShardedLinear, ZigzagShardedToAllLinear

# mlx-lm model modules whose TransformerBlock is the pre-norm SwiGLU block above, with the
# attention of llama (q/k/v or a single qkv_proj; qwen3's per-head q/k norms) and an MLP of
# gate/up (or a single gate_up_proj) and down. Others (gemma2/3's post-norms and GeGLU, granite's
# residual multipliers, ...) keep the per-projection path.
FAMILIES = ("llama", "qwen2", "qwen3", "phi3")


def _projection_names(attn: nn.Module, mlp: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The names of the q/k/v and gate/up projections (stacked at load, or one per projection)."""
    qkv = ("qkv_proj",) if "qkv_proj" in attn else ("q_proj", "k_proj", "v_proj")
    gate_up = ("gate_up_proj",) if "gate_up_proj" in mlp else ("gate_proj", "up_proj")
    return qkv, gate_up


class _Stack:
    """A product's weight: a single ZigzagLinear, or sibling ZigzagLinear layers stacked into one
    (stacked on the first fused step, so a patched model that never decodes is not copied)."""

    __slots__ = ("layers", "has_bias", "_key", "_bias", "_bias_of")

    def __init__(self, layers: list[ZigzagLinear]):
        self.layers = layers
        # A layer sharded by input columns adds its whole bias after the sum over the group.
        self._key = "sharded_bias" if type(layers[0]) is ZigzagShardedToAllLinear else "bias"
        self.has_bias = self._key in layers[0]  # all or none (checked by _why_not)
        self._bias = self._bias_of = None

    def arrays(self):
        """(weight, scales, biases, threshold layer) to run the product now, or None."""
        layers = self.layers
        if len(layers) == 1:
            m = layers[0]
            return m["weight"], m["scales"], m["biases"], m
        group = stack_siblings(layers)
        return None if group is None else group.stacked()

    def bias(self):
        """The layers' output biases, stacked once per set of bias arrays."""
        of = tuple(m[self._key] for m in self.layers)
        if self._bias_of is None or not identical(of, self._bias_of):
            self._bias = mx.concatenate(of) if len(of) > 1 else of[0]
            self._bias_of = of
        return self._bias


def _product(x, arrays, prologue, norm, residual):
    """One zigzag product of a decode step, with its neighbours folded in."""
    w, s, b, layer = arrays
    weight, eps = (norm["weight"], norm.eps) if norm is not None else (None, 0.0)
    return zigzag_product(x, w, s, b, layer.group_size, layer.bits, layer._threshold_value, layer["_threshold"],
                          prologue, weight, eps, residual)


class _Plan:
    """What the fused step of one block runs, and the modules it was built from: checked on every
    call (identity only, a few dict lookups), so a replaced module sends the block back to its own
    forward."""

    __slots__ = ("attn", "norms", "checks", "layers", "kinds", "group", "qkv", "o", "gate_up", "down", "qk_norms",
                 "heads", "_seen", "_arrays")

    def __init__(self, block: nn.Module):
        attn, mlp = block["self_attn"], block["mlp"]
        self.attn = attn
        self.norms = (block["input_layernorm"], block["post_attention_layernorm"])
        qkv_names, gate_up_names = _projection_names(attn, mlp)
        self.checks = [
            (block, "self_attn", attn), (block, "mlp", mlp),
            (block, "input_layernorm", self.norms[0]), (block, "post_attention_layernorm", self.norms[1]),
            *((attn, n, attn[n]) for n in (*qkv_names, "o_proj", "rope", "q_norm", "k_norm") if n in attn),
            *((mlp, n, mlp[n]) for n in (*gate_up_names, "down_proj")),
        ]
        qkv = [attn[n] for n in qkv_names]
        self.qkv, self.o = _Stack(qkv), _Stack([attn["o_proj"]])
        self.gate_up, self.down = _Stack([mlp[n] for n in gate_up_names]), _Stack([mlp["down_proj"]])
        self.layers = (*qkv, attn["o_proj"], *self.gate_up.layers, mlp["down_proj"])
        self.kinds = tuple(type(m) for m in self.layers)
        self.group = attn["o_proj"].group if _sharded(self.layers) else None
        self.qk_norms = (attn["q_norm"], attn["k_norm"]) if "q_norm" in attn else None
        head_dim = sum(m.output_dims for m in qkv) // (attn.n_heads + 2 * attn.n_kv_heads)
        self.heads = (attn.n_heads, attn.n_kv_heads, head_dim)
        self._seen = self._arrays = None

    def __getstate__(self):
        # A copy (deepcopy of the model) has its own modules: it starts without the readiness cache.
        return None, {k: getattr(self, k) for k in self.__slots__ if k not in ("_seen", "_arrays")} | dict(
            _seen=None, _arrays=None)

    def ready(self, block, dtype) -> tuple | None:
        """The arrays of the four products if the fused step can run now, else None.

        Decode asks this once per block and token, so the answer is kept with a snapshot of every
        object it was derived from (modules, parameters, flags, stacks), compared by identity in
        one pass of C-level iteration. Anything replaced since sends it through the full check."""
        if not (self._seen and all(map(is_, map(dict.get, self._seen[0], self._seen[1]), self._seen[2]))
                and tuple(map(type, self.layers)) == self.kinds):
            self._arrays = self._check()
        arrays = self._arrays
        if arrays is None or arrays[0][1].dtype != dtype:
            return None  # unstackable, or a mixed-dtype call: the projections promote, per projection
        return arrays

    def _check(self) -> tuple | None:
        """The full check behind :meth:`ready`; it records the snapshot the next calls compare."""
        self._seen = None
        for parent, key, module in self.checks:
            if parent.get(key) is not module:
                return None
        for m, kind in zip(self.layers, self.kinds):
            # A layer of another class communicates or computes more than the plan knows.
            if m._stats_on or type(m) is not kind:
                return None
        attn = self.attn
        if (attn.n_heads, attn.n_kv_heads) != self.heads[:2]:
            return None  # sharded in place: the heads were divided
        arrays = (self.qkv.arrays(), self.o.arrays(), self.gate_up.arrays(), self.down.arrays())
        if None in arrays:
            return None
        dtypes = {a[1].dtype for a in arrays}
        if len(dtypes) > 1:
            arrays = None  # mixed: whatever x is, some projection promotes it
        seen = [*self.checks, (attn.__dict__, "n_heads", attn.n_heads), (attn.__dict__, "n_kv_heads", attn.n_kv_heads)]
        for m in self.layers:
            seen += [(m, k, m[k]) for k in ("weight", "scales", "biases")]
            seen += [(m.__dict__, k, m.__dict__.get(k)) for k in ("_stats_on", "_shared")]
        for stack in (self.qkv, self.gate_up):
            group = stack.layers[0]._shared
            if len(stack.layers) > 1 and group is not None:
                d = group.__dict__
                seen += [(d, k, d.get(k)) for k in ("enabled", "_threshold_owner", "weight", "scales", "biases")]
        self._seen = tuple(zip(*seen))
        return arrays

    def run(self, block, x, mask, cache, arrays):
        """The block's output for one token of each of B sequences (x of shape (B, 1, D))."""
        qkv_a, o_a, gu_a, down_a = arrays
        attn = self.attn
        n_heads, n_kv_heads, head_dim = self.heads
        B = x.shape[0]
        x_in, residual = self._split(self.qkv, x)
        qkv = _product(x_in, qkv_a, Prologue.RmsNorm, self.norms[0], None)
        if self.qkv.has_bias:
            qkv = qkv + self.qkv.bias()
        # One reshape and transpose for all heads, then views of q, k and v (mlx-lm splits first).
        heads = qkv.reshape(B, 1, -1, head_dim)
        rope = attn["rope"]
        offset = cache.offset if cache is not None else 0
        if self.qk_norms is None:
            heads = heads.transpose(0, 2, 1, 3)
            # The q and k heads are adjacent, and the rotation is per head at one offset: one
            # rotary kernel for both (a kernel less per block; decode is bound by kernels per token).
            rotated = rope(heads[:, :n_heads + n_kv_heads], offset=offset)
            queries, keys = rotated[:, :n_heads], rotated[:, n_heads:]
            values = heads[:, n_heads + n_kv_heads:]
        else:
            q_norm, k_norm = self.qk_norms
            queries = rope(q_norm(heads[:, :, :n_heads]).transpose(0, 2, 1, 3), offset=offset)
            keys = rope(k_norm(heads[:, :, n_heads:n_heads + n_kv_heads]).transpose(0, 2, 1, 3), offset=offset)
            values = heads[:, :, n_heads + n_kv_heads:].transpose(0, 2, 1, 3)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        out = scaled_dot_product_attention(queries, keys, values, cache=cache, scale=attn.scale, mask=mask)
        # (B, heads, 1, head_dim) to (B, 1, heads * head_dim): with one position the transpose
        # mlx-lm does first changes no element's place.
        out = out.reshape(B, 1, -1)

        h = self._summed(_product(out, o_a, Prologue.Identity, None, residual))
        if self.o.has_bias:
            h = h + self.o.bias()
        h_in, residual = self._split(self.gate_up, h)
        gu = _product(h_in, gu_a, Prologue.RmsNorm, self.norms[1], None)
        if self.gate_up.has_bias:
            gu = gu + self.gate_up.bias()
        y = self._summed(_product(gu, down_a, Prologue.SwiGLU, None, residual))
        if self.down.has_bias:
            y = y + self.down.bias()
        return y

    def _split(self, stack, x):
        """(the input of ``stack``'s product, the residual its block adds). Sharded: gradients of
        the whole input are summed over the group (as mlx's all-to-sharded layers do), and only
        rank 0's partial sum carries the residual."""
        if self.group is None:
            return x, x
        return stack.layers[0]._gradient_sum(x), x if self.group.rank() == 0 else None

    def _summed(self, y):
        """A product's output over the group: the sum of the ranks' partial products."""
        return y if self.group is None else mx.distributed.all_sum(y, group=self.group)


class FusedDecoderBlock:
    """Mixed in before a family's TransformerBlock class by :func:`fuse_blocks`."""

    def __call__(self, x, mask=None, cache=None):
        plan = self._spqt_plan
        if x.ndim == 3 and x.shape[1] == 1 and x.shape[0] <= GEMV_MAX_ROWS:
            arrays = plan.ready(self, x.dtype)
            if arrays is not None:
                return plan.run(self, x, mask, cache, arrays)
        return super().__call__(x, mask, cache)


_fused_classes: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    # Same name and module as the family's class, so messages and structure checks read the same.
    if cls not in _fused_classes:
        _fused_classes[cls] = type(
            cls.__name__, (FusedDecoderBlock, cls), {"__module__": cls.__module__, "_spqt_base": cls}
        )
    return _fused_classes[cls]


def _sharded(projections) -> bool:
    """Whether a block's projections (q/k/v, o, gate/up, down, in that order) are sharded as
    mlx-lm's ``shard()`` does it, over one group: the products of the block's input and of the
    normalized hidden state by output rows, o and down by input columns."""
    rows, columns = ZigzagAllToShardedLinear, ZigzagShardedToAllLinear
    kinds = [type(m) for m in projections]
    if kinds.count(columns) != 2 or kinds[-1] is not columns:
        return False  # o_proj and down_proj, and no other, take input columns
    o_at = kinds.index(columns)
    if not all(k is rows for i, k in enumerate(kinds[:-1]) if i != o_at):
        return False
    return len({id(m.group) for m in projections}) == 1


def _why_not(block: nn.Module) -> str | None:
    """Why ``block`` cannot run fused, or None if it can."""
    family = type(block).__module__.rpartition(".")[2]
    if family not in FAMILIES or type(block).__name__ != "TransformerBlock":
        return "not a known block"
    attn, mlp = block.get("self_attn"), block.get("mlp")
    for name in ("input_layernorm", "post_attention_layernorm"):
        if type(block.get(name)) is not nn.RMSNorm:
            return f"{name} is not an RMSNorm"
    if not isinstance(attn, nn.Module) or not isinstance(mlp, nn.Module):
        return "no self_attn or mlp"
    qkv_names, gate_up_names = _projection_names(attn, mlp)
    qkv, gate_up = [attn.get(n) for n in qkv_names], [mlp.get(n) for n in gate_up_names]
    projections = [*qkv, attn.get("o_proj"), *gate_up, mlp.get("down_proj")]
    if not all(type(m) is ZigzagLinear for m in projections) and not _sharded(projections):
        return "not every projection is a ZigzagLinear (or sharded as the model's shard() does it)"
    first = projections[0]
    if any(m.group_size != first.group_size or m.bits != first.bits for m in projections):
        return "projections of different formats"
    if any(len({"bias" in m for m in stack}) > 1 for stack in (qkv, gate_up)):
        return "some projections of a stack have a bias and others not"
    if "q_norm" in attn and not isinstance(attn["q_norm"], nn.RMSNorm):
        return "an unknown q_norm"
    return None


def fuse_blocks(model: nn.Module, enabled: bool = True) -> int:
    """Install (or with ``enabled=False`` remove) the fused decode step in every decoder
    block of ``model`` whose structure is known and whose projections are all ZigzagLinear layers
    (or sharded ones, as the model's ``shard()`` leaves them). Returns the number of fused blocks.

    :func:`~spqt_mlx.patch.patch_model` calls it; call it again after replacing layers. The q/k/v
    and gate/up weights are stacked on the first fused step (or by :func:`fuse_shared_inputs`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an mlx.nn.Module, got {type(model).__name__}.")
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}.")
    count = 0
    for _, block in model.named_modules():
        if enabled:
            count += _plan(block)
        elif isinstance(block, FusedDecoderBlock):
            _unfuse(block)
    return count


def refresh_fused_blocks(model: nn.Module) -> int:
    """Plan the fused step again for the fused blocks of ``model`` (``model.shard(group)`` replaces
    their projections); a block that no longer qualifies runs its family's forward, and blocks
    that were not fused stay so. Returns the number of fused blocks."""
    return sum(_plan(block) for _, block in model.named_modules() if isinstance(block, FusedDecoderBlock))


def _plan(block: nn.Module) -> bool:
    """Fuse ``block`` with a plan of its current modules if it qualifies, else leave it unfused."""
    if _why_not(block) is not None:
        if isinstance(block, FusedDecoderBlock):
            _unfuse(block)
        return False
    if not isinstance(block, FusedDecoderBlock):
        block.__class__ = _fused_class(type(block))
    block._spqt_plan = _Plan(block)
    return True


def _unfuse(block: nn.Module) -> None:
    block.__class__ = block._spqt_base
    del block._spqt_plan


