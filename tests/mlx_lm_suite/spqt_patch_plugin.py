"""pytest plugin for mlx-lm's own model tests: every mlx-lm model is patched with SpQt before its
first forward pass (zigzag 4-bit, group size 32), as a user would after loading it.

``SPQT_TEST_THRESHOLD`` (default 0) is the activation threshold of every patched layer: 0 runs the
dense zigzag GEMV, a small positive value the sparse one (decode steps skip small inputs).
``SPQT_TEST_SHARD=1`` (under ``mlx.launch``) then shards every model with ``model.shard(group)``
over the launched processes, and skips the tests of families without ``shard()``.
Loaded with ``-p spqt_patch_plugin`` by tests/test_mlx_lm_models.py.
"""

import importlib.abc
import os
import sys
import unittest
import warnings

from spqt_mlx._mlx_lm_hook import spec_from_other_finders
from spqt_mlx.patch import patch_model

THRESHOLD = float(os.environ.get("SPQT_TEST_THRESHOLD", "0"))
# "mlx": quantize the same projections with MLX's own nn.QuantizedLinear instead, to tell the tests
# that fail for any quantized model from those that fail for SpQt.
# "none": leave the layers as they are (with SPQT_TEST_SHARD: the unpatched model, sharded).
PATCH = os.environ.get("SPQT_TEST_PATCH", "spqt")
SHARD = os.environ.get("SPQT_TEST_SHARD") == "1"
PATCHED = []  # model types patched in this run, for the report
SHARDED = set()  # model types sharded in this run


if SHARD:
    import copy

    import mlx.core as mx

    # Tests deep-copy models; a copy of a sharded model shares the group (a communicator handle).
    copy._deepcopy_dispatch[type(mx.distributed.init())] = lambda group, memo: group


def pytest_runtest_setup(item):
    if SHARD:
        # Every rank must build the same weights and inputs: a rank's shard is a slice of them.
        import mlx.core as mx
        import numpy as np

        mx.random.seed(0)
        np.random.seed(0)


def _patching(call):
    def __call__(self, *args, **kwargs):
        if not getattr(self, "_spqt_patched", False):
            self._spqt_patched = True
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # layers that cannot be zigzag-quantized stay dense
                if PATCH == "none":
                    paths = []
                elif PATCH == "mlx":
                    import mlx.nn as nn

                    from spqt_mlx.patch import projections

                    chosen = set(projections(self))
                    paths = []

                    def predicate(path, module):
                        ok = path in chosen and module.weight.shape[-1] % 32 == 0
                        paths.extend([path] if ok else [])
                        return ok

                    nn.quantize(self, group_size=32, bits=4, class_predicate=predicate)
                else:
                    paths = patch_model(self, group_size=32, bits=4, thresholds=THRESHOLD if THRESHOLD else None)
            model_type = getattr(self, "model_type", type(self).__module__)
            PATCHED.append((model_type, len(paths)))
            if SHARD:
                if not callable(getattr(self, "shard", None)):
                    # Inside a subTest this skips that subtest only.
                    raise unittest.SkipTest(f"{model_type} has no shard()")
                import mlx.core as mx

                self.shard(mx.distributed.init())
                SHARDED.add(model_type)
        return call(self, *args, **kwargs)

    __call__.__wrapped__ = call
    return __call__


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Wraps each model family's ``Model`` as its module is imported: importing every family up
    front would run the import-time checks of families with optional dependencies."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("mlx_lm.models.") or fullname.count(".") != 2:
            return None
        spec = spec_from_other_finders(self, fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module):
            exec_module(module)
            model = getattr(module, "Model", None)
            if isinstance(model, type) and model.__module__ == module.__name__ and "__call__" in vars(model):
                model.__call__ = _patching(model.__call__)

        spec.loader.exec_module = exec_and_wrap
        return spec


sys.meta_path.insert(0, _PatchOnImport())
for name in [m for m in sys.modules if m.startswith("mlx_lm.models.") and m.count(".") == 2]:
    module = sys.modules[name]  # imported before this plugin
    model = getattr(module, "Model", None)
    if isinstance(model, type) and model.__module__ == name and "__call__" in vars(model):
        model.__call__ = _patching(model.__call__)


def pytest_terminal_summary(terminalreporter):
    patched = sum(1 for _, n in PATCHED if n)
    terminalreporter.write_line(f"spqt: {patched} model instances patched ({len(PATCHED)} seen), threshold {THRESHOLD}")
    if SHARD:
        terminalreporter.write_line(f"spqt: sharded {' '.join(sorted(SHARDED))}")
