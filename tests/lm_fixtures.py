"""A tiny random Llama and BPE tokenizer that mlx-lm loads offline, for the patch-layer tests."""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models.llama import Model, ModelArgs

TEXT = (
    "the quick brown fox jumps over the lazy dog. a stitch in time saves nine. "
    "all that glitters is not gold. the early bird catches the worm. "
    "where there is smoke there is fire. actions speak louder than words. "
)

CONFIG = {
    "model_type": "llama",
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 320,
    "tie_word_embeddings": False,
    "max_position_embeddings": 1024,
}


def tiny_llama(seed: int = 0, **overrides) -> Model:
    """A float32 2-layer Llama with random weights (outlier-free but not trivially Gaussian)."""
    mx.random.seed(seed)
    model = Model(ModelArgs(**{**CONFIG, **overrides}))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def train_tokenizer(vocab_size: int = CONFIG["vocab_size"]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT] * 20, trainer)
    return tok


# A minimal chat template, for the tools that need one (mlx_lm.chat, the server's chat endpoint).
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def write_model_dir(path: Path, seed: int = 0, *, chat_template: bool = False) -> Path:
    """Save the tiny Llama and its tokenizer so that ``mlx_lm.load(path)`` works offline."""
    from mlx_lm.utils import save_config, save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "model_max_length": 1024,
                **({"chat_template": CHAT_TEMPLATE} if chat_template else {}),
            }
        )
    )
    model = tiny_llama(seed)
    save_model(path, model)
    save_config({**CONFIG, "eos_token_id": tok.token_to_id("</s>"), "bos_token_id": tok.token_to_id("<s>")}, path / "config.json")
    return path


def random_tokens(n: int, seed: int = 0, vocab_size: int = CONFIG["vocab_size"]) -> mx.array:
    """``n`` token ids, shape (1, n), avoiding the special tokens 0-2."""
    return mx.random.randint(3, vocab_size, (1, n), key=mx.random.key(seed))


# Small configs of other mlx-lm families: (model_type, extra ModelArgs, expected projection names).
OTHER_FAMILIES = {
    "qwen2": ({}, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "gemma2": ({"head_dim": 32, "query_pre_attn_scalar": 32.0}, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "phi3": ({"max_position_embeddings": 512, "original_max_position_embeddings": 512}, ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "phi": ({"max_position_embeddings": 512, "num_key_value_heads": 4}, ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")),
    "qwen3": ({"head_dim": 32, "rope_theta": 10000.0}, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    # Mixture of experts: the attention and the experts are patched, the router (mlp.gate) is not.
    "qwen3_moe": ({"head_dim": 32, "rope_theta": 10000.0, "num_experts": 4, "num_experts_per_tok": 2,
                   "decoder_sparse_step": 1, "mlp_only_layers": [], "moe_intermediate_size": 64,
                   "norm_topk_prob": True},
                  ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
}


def tiny_model(model_type: str, seed: int = 0):
    """A float32 2-layer random model of another mlx-lm family."""
    import importlib

    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    extra, _ = OTHER_FAMILIES[model_type]
    fields = module.ModelArgs.__dataclass_fields__
    args = {k: v for k, v in {**CONFIG, **extra, "model_type": model_type}.items() if k in fields}
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs(**args))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def free_ports() -> int:
    """A port p with p and p + 1 free: the ring backend listens on one port per rank."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            try:
                with socket.socket() as b:
                    b.bind(("127.0.0.1", p + 1))
                    return p
            except OSError:
                continue
    pytest.skip("no two adjacent free ports")


def launcher() -> str:
    """This environment's ``mlx.launch``."""
    exe = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
    if not Path(exe).exists():
        pytest.skip("mlx.launch not found")
    return exe
