"""Save and load SpQt models: an mlx-lm directory whose projections are zigzag-quantized.

Layout of a saved directory:

* ``config.json``: the mlx-lm model config plus an ``spqt`` section (format version, bits, group
  size, per-layer thresholds, sparsity target and method, source, and a sha256 per weight file);
* ``model.safetensors``: every parameter, a zigzag layer's ``weight``/``scales``/``biases`` under
  its path;
* the tokenizer files.

Directories are written atomically, and ``load`` refuses a directory whose files or tensors do
not match what the config records.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .files import atomic_directory, moved_aside, sha256_file

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MLX_LM_HOOK = "spqt_model.py"

# Written beside the weights so that ``mlx_lm.load(path, trust_remote_code=True)`` (and mlx-lm's
# CLIs with --trust-remote-code) can build the model; mlx-lm then loads the weights itself,
# without the checks of spqt_mlx.load.
_MLX_LM_HOOK_SOURCE = '''"""Builds this SpQt model for mlx_lm.load(..., trust_remote_code=True). Needs spqt-mlx installed."""

from spqt_mlx.checkpoint import MlxLmArgs as ModelArgs
from spqt_mlx.checkpoint import mlx_lm_model as Model  # noqa: F401
'''


def _spqt_section(spqt_meta: dict, thresholds: dict[str, float], criterion: str = "teal") -> dict:
    for key in ("bits", "group_size"):
        if not isinstance(spqt_meta.get(key), int) or isinstance(spqt_meta.get(key), bool):
            raise ValueError(f"spqt_meta must give an integer {key!r}.")
    given = spqt_meta.get("thresholds")
    if given is not None:
        # The model's layers hold the thresholds that run; the metadata may only repeat them.
        differ = sorted(p for p in set(given) | set(thresholds)
                        if p not in thresholds or p not in given or float(given[p]) != thresholds[p])
        if differ:
            raise ValueError(
                f"spqt_meta['thresholds'] disagrees with the model's layers at {differ[:3]}; set them on the "
                "model (spqt_mlx.patch.set_thresholds) before saving."
            )
    section = {
        "format_version": FORMAT_VERSION,
        "bits": spqt_meta["bits"],
        "group_size": spqt_meta["group_size"],
        "layers": sorted(thresholds),
        "thresholds": dict(sorted(thresholds.items())),
        "criterion": criterion,
        "sparsity": spqt_meta.get("sparsity"),
        "method": spqt_meta.get("method"),
        "source": spqt_meta.get("source"),
    }
    section.update({k: v for k, v in spqt_meta.items() if k not in section and k != "files"})
    return section


def save(model: nn.Module, tokenizer, config: dict, out_dir, spqt_meta: dict, *, overwrite: bool = False) -> Path:
    """Write a patched model to ``out_dir`` atomically.

    Args:
        model: an mlx-lm model patched with ``spqt_mlx.patch.patch_model``.
        tokenizer: its tokenizer (anything with ``save_pretrained``, e.g. mlx-lm's wrapper).
        config: the mlx-lm model config (as returned by ``mlx_lm.load(..., return_config=True)``).
        out_dir: the directory to create; an existing one is replaced only with ``overwrite``.
        spqt_meta: ``bits`` and ``group_size`` (those of the zigzag layers), plus optional
            ``sparsity``, ``method``, ``source`` and any other JSON-serializable notes. The
            thresholds are read from the model's layers; ``thresholds`` given here must match them.

    Nothing appears at ``out_dir`` unless every file was written.
    """
    from mlx_lm.utils import make_shards

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an mlx.nn.Module, got {type(model).__name__}.")
    if not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"tokenizer must have save_pretrained, got {type(tokenizer).__name__}.")
    if not isinstance(spqt_meta, dict):
        raise TypeError(f"spqt_meta must be a dict, got {type(spqt_meta).__name__}.")
    from .patch import get_criterion, get_thresholds, zigzag_layers

    layers = zigzag_layers(model)
    if not layers:
        raise ValueError("the model has no zigzag layers; patch it with spqt_mlx.patch.patch_model first.")
    kinds = {(m.bits, m.group_size) for m in layers.values()}
    if kinds != {(spqt_meta.get("bits"), spqt_meta.get("group_size"))}:
        raise ValueError(
            f"spqt_meta gives bits/group_size {spqt_meta.get('bits')}/{spqt_meta.get('group_size')} but the "
            f"model's zigzag layers use {sorted(kinds)}."
        )
    section = _spqt_section(spqt_meta, get_thresholds(model), get_criterion(model))
    config = {k: v for k, v in dict(config).items() if k not in ("spqt", "quantization_config", "model_file")}

    weights = dict(tree_flatten(model.parameters()))
    shards = make_shards(weights)
    names = (
        [WEIGHTS_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        files = {}
        for name, shard in zip(names, shards):
            mx.save_safetensors(str(tmp / name), shard, metadata={"format": "mlx"})
            files[name] = {"sha256": sha256_file(tmp / name), "tensors": sorted(shard)}
        tokenizer.save_pretrained(str(tmp))
        (tmp / MLX_LM_HOOK).write_text(_MLX_LM_HOOK_SOURCE)
        config["model_file"] = MLX_LM_HOOK
        section["files"] = files
        config["spqt"] = section
        # config.json last: a directory with a config is a complete one.
        (tmp / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2))
    return Path(out_dir)


def read_spqt_config(path) -> dict:
    """The config of a saved SpQt directory, with its ``spqt`` section checked."""
    path = Path(path)
    if not path.is_dir():
        if aside := moved_aside(path):
            raise FileNotFoundError(
                f"no model directory at {path}: an interrupted replacement left the previous one at {aside[0]}"
                " (the next spqt-convert to this path puts it back)."
            )
        raise FileNotFoundError(f"no model directory at {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from e
    section = config.get("spqt")
    if not isinstance(section, dict):
        raise ValueError(f"{path} is not an SpQt checkpoint (config.json has no 'spqt' section); use mlx_lm.load.")
    version = section.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has SpQt format version {version!r}; this spqt_mlx reads version {FORMAT_VERSION}."
        )
    for key in ("bits", "group_size", "layers", "thresholds", "files"):
        if key not in section:
            raise ValueError(f"{path}: the spqt section lacks {key!r}.")
    _check_section(Path(path), section)
    return config


def _check_section(path: Path, section: dict) -> None:
    """The spqt section's types, and its weight files confined to the checkpoint directory."""
    def kind(value, expected, what):
        if not isinstance(value, expected) or isinstance(value, bool):
            raise ValueError(f"{path}: config.json's spqt {what} has the wrong type ({type(value).__name__}).")

    kind(section["bits"], int, "bits")
    kind(section["group_size"], int, "group_size")
    kind(section["layers"], list, "layers")
    kind(section["thresholds"], dict, "thresholds")
    kind(section["files"], dict, "files")
    for name in section["layers"]:
        kind(name, str, "layer name")
    for name, value in section["thresholds"].items():
        kind(value, (int, float), f"threshold of {name}")
    from .patch.linear import CRITERIA

    if section.get("criterion", "teal") not in CRITERIA:
        raise ValueError(f"{path}: config.json's spqt criterion must be one of {CRITERIA}, "
                         f"got {section.get('criterion')!r}.")
    for name, entry in section["files"].items():
        kind(entry, dict, f"entry of file {name}")
        # Only plain file names in the checkpoint's own directory: a manifest must not make load()
        # read anything else (a path with '..', an absolute path, a link out of the directory).
        inside = (path / name).resolve().is_relative_to(path.resolve())
        if Path(name).name != name or name in (".", "..") or not inside:
            raise ValueError(
                f"{path}: config.json names the weight file {name!r}, which is not a file of this directory."
            )


def is_spqt_checkpoint(path) -> bool:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    try:
        return isinstance(json.loads(config_file.read_text()).get("spqt"), dict)
    except (json.JSONDecodeError, AttributeError):
        return False


def _read_weights(path: Path, files: dict, verify: bool, progress: bool) -> dict:
    weights = {}
    for name, entry in files.items():
        f = path / name
        if not f.is_file():
            raise FileNotFoundError(f"weight file {f} is missing.")
        if verify and sha256_file(f, progress=progress) != entry.get("sha256"):
            raise ValueError(f"weight file {f} does not match the sha256 recorded in config.json (corrupted or modified).")
        try:
            shard = mx.load(str(f))
        except Exception as e:
            raise ValueError(f"weight file {f} cannot be read: {e}") from e
        listed = set(entry.get("tensors", shard))
        if set(shard) != listed:
            raise ValueError(f"weight file {f} does not hold the tensors config.json lists for it.")
        weights.update(shard)
    return weights


def build_model(config: dict, weights: dict | None = None) -> nn.Module:
    """The mlx-lm model described by an SpQt config, with zigzag layers where it had them.

    Parameters are placeholders until weights are loaded into it.
    """
    from mlx_lm.utils import _get_classes

    from .patch import patch_model

    section = config["spqt"]
    model_class, args_class = _get_classes(config=config)
    model = model_class(args_class.from_dict(config))
    layers = set(section["layers"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers that stayed dense were reported at conversion
        patched = patch_model(model, group_size=section["group_size"], bits=section["bits"], allocate_only=True)
    if set(patched) != layers:
        missing = sorted(layers - set(patched))
        raise ValueError(
            f"the model built from config.json does not have the saved zigzag layers {missing[:3]}..."
            if missing
            else f"patch_model replaced layers the checkpoint does not list: {sorted(set(patched) - layers)[:3]}..."
        )
    if (quantization := config.get("quantization")) is not None and weights is not None:
        # Layers left in MLX's own quantization (e.g. embeddings of an already quantized source).
        from mlx_lm.utils import infer_quant_config

        def predicate(p, m):
            if p in layers or not hasattr(m, "to_quantized") or f"{p}.scales" not in weights:
                return False
            return infer_quant_config(p, m, weights)

        nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                    class_predicate=predicate)
    return model


def load(path, *, verify: bool = True, lazy: bool = False, progress: bool = True):
    """Load a directory written by ``save``. Returns ``(model, tokenizer)``.

    Refuses (ValueError/FileNotFoundError) a directory whose format version differs, whose weight
    files are missing or do not match their recorded sha256 (skip that check with
    ``verify=False``), or whose tensors are missing, extra or of the wrong shape. ``progress``
    shows the checksum verification's progress (it reads every byte).
    """
    from mlx_lm.utils import load_tokenizer

    from .patch import fuse_shared_inputs, set_criterion, set_thresholds

    path = Path(path)
    config = read_spqt_config(path)
    section = config["spqt"]
    weights = _read_weights(path, section["files"], verify, progress)
    model = build_model(config, weights)

    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise ValueError(f"{path}: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for name, value in weights.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{path}: tensor {name} has shape {tuple(value.shape)}, expected {tuple(expected[name].shape)}."
            )
    model.load_weights(list(weights.items()), strict=True)
    set_criterion(model, section.get("criterion", "teal"))  # WINA's column norms come from the weights
    set_thresholds(model, section["thresholds"])
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
        fuse_shared_inputs(model)  # stacking evaluates the weights, so a lazy load skips it
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer


class MlxLmArgs:
    """mlx-lm's custom-model hook passes ``ModelArgs.from_dict(config)`` to ``Model``: keep the dict."""

    @staticmethod
    def from_dict(config: dict) -> dict:
        return dict(config)


def mlx_lm_model(config: dict) -> nn.Module:
    """The model for mlx-lm's custom-model hook: built from the config, thresholds set, weights
    left to mlx-lm (the criterion is set once they are loaded: WINA's column norms come from them)."""
    from .patch import set_criterion, set_thresholds

    model = build_model(config)
    set_thresholds(model, config["spqt"]["thresholds"])
    criterion = config["spqt"].get("criterion", "teal")
    if criterion != "teal":
        load_weights = model.load_weights

        def load_then_scale(*args, **kwargs):
            out = load_weights(*args, **kwargs)
            set_criterion(model, criterion)
            return out

        model.load_weights = load_then_scale  # an instance attribute: this model only
    return model
