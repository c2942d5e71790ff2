"""Adds the SpQt options to mlx-lm's generate, chat, benchmark and server CLIs (mlx-lm has no
plugin hook).

A ``.pth`` file imports this module at interpreter start, so it must stay cheap and harmless: it
imports nothing beyond ``sys``, and only installs a finder that acts when one of those modules is
imported. The finder lets mlx-lm load the module as usual, then wraps its ``setup_arg_parser``
(or, for the server, which builds its parser in ``main``, its ``main``); the first call imports
``spqt_mlx.generate``, which swaps in the SpQt argument parser and ``load``. For ``python -m
mlx_lm.generate`` and the like, which run the module's code as ``__main__``, the code is
recompiled with the same wrapping placed just before its ``if __name__ == "__main__"`` block. Any
failure leaves mlx-lm untouched.
"""

import sys

_TARGETS = ("mlx_lm.generate", "mlx_lm.chat", "mlx_lm.benchmark", "mlx_lm.server")
_MARK = "__spqt_hook__"


def _report(error):
    try:
        sys.stderr.write(f"spqt-mlx: the mlx-lm hook is disabled ({type(error).__name__}: {error})\n")
    except Exception:
        pass


def install(namespace):
    """Wrap ``setup_arg_parser`` (else ``main``) in an mlx-lm CLI module's globals; the SpQt code
    loads on first use."""
    try:
        name = "setup_arg_parser" if "setup_arg_parser" in namespace else "main"
        base = namespace.get(name)
        if base is None or getattr(base, _MARK, False):
            return

        def first_call(*args, **kwargs):
            namespace[name] = base
            try:
                from spqt_mlx.generate import install as install_spqt

                install_spqt(namespace)
            except Exception as error:  # never break mlx-lm
                namespace[name] = base
                _report(error)
            return namespace[name](*args, **kwargs)

        first_call.__doc__ = base.__doc__
        first_call.__name__ = name
        setattr(first_call, _MARK, True)
        namespace[name] = first_call
    except Exception as error:
        _report(error)


class _Loader:
    """Delegates to mlx-lm's own loader and wraps the module once it has run."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        install(module.__dict__)

    def get_code(self, fullname):
        code = self._loader.get_code(fullname)
        try:
            return _with_install_before_main(self._loader, fullname) or code
        except Exception as error:
            _report(error)
            return code


def _with_install_before_main(loader, fullname):
    """The module's code with ``install(globals())`` just before ``if __name__ == "__main__":``."""
    import ast

    source = loader.get_source(fullname)
    filename = loader.get_filename(fullname)
    if source is None:
        return None
    tree = ast.parse(source, filename)
    for i, node in enumerate(tree.body):
        test = getattr(node, "test", None)
        if (
            isinstance(node, ast.If)
            and isinstance(test, ast.Compare)
            and isinstance(test.left, ast.Name)
            and test.left.id == "__name__"
        ):
            call = ast.parse(f"__import__('sys').modules[{__name__!r}].install(globals())").body
            for stmt in call:
                ast.copy_location(stmt, node)
                ast.fix_missing_locations(stmt)
            tree.body[i:i] = call
            return compile(tree, filename, "exec", dont_inherit=True)
    return None


def spec_from_other_finders(skip, fullname, path=None, target=None):
    """The module spec the finders of ``sys.meta_path`` other than ``skip`` give, or None."""
    for finder in sys.meta_path:
        if finder is skip or not hasattr(finder, "find_spec"):
            continue
        spec = finder.find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None


class _Finder:
    """Finds the target modules through the other finders and wraps their loaders."""

    _busy = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _TARGETS or self._busy:
            return None
        self._busy = True
        try:
            spec = spec_from_other_finders(self, fullname, path, target)
            if spec is None:
                return None
            if spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            spec.loader = _Loader(spec.loader)
            return spec
        except Exception as error:
            _report(error)
            return None
        finally:
            self._busy = False

    def invalidate_caches(self):
        pass


if not any(type(f).__name__ == "_Finder" and getattr(f, "_spqt", False) for f in sys.meta_path):
    _finder = _Finder()
    _finder._spqt = True
    sys.meta_path.insert(0, _finder)
