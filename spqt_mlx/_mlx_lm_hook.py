"""Adds the SpQt options to ``mlx_lm.generate`` (mlx-lm has no plugin hook).

A ``.pth`` file imports this module at interpreter start, so it must stay cheap and harmless: it
imports nothing beyond ``sys``, and only installs a finder that acts when ``mlx_lm.generate`` is
imported. The finder lets mlx-lm load the module as usual, then wraps its ``setup_arg_parser``;
the first call imports ``spqt_mlx.generate``, which swaps in the SpQt ``setup_arg_parser`` and
``load``. For ``python -m mlx_lm.generate``, which runs the module's code as ``__main__``, the
code is recompiled with the same wrapping placed just before its ``if __name__ == "__main__"``
block. Any failure leaves mlx-lm untouched.
"""

import sys

_TARGET = "mlx_lm.generate"
_MARK = "__spqt_hook__"


def _report(error):
    try:
        sys.stderr.write(f"spqt-mlx: the mlx_lm.generate hook is disabled ({type(error).__name__}: {error})\n")
    except Exception:
        pass


def install(namespace):
    """Wrap ``setup_arg_parser`` in mlx_lm.generate's globals; the SpQt code loads on first use."""
    try:
        base = namespace.get("setup_arg_parser")
        if base is None or getattr(base, _MARK, False):
            return

        def setup_arg_parser():
            namespace["setup_arg_parser"] = base
            try:
                from spqt_mlx.generate import install as install_spqt

                install_spqt(namespace)
            except Exception as error:  # never break mlx-lm
                namespace["setup_arg_parser"] = base
                _report(error)
            return namespace["setup_arg_parser"]()

        setup_arg_parser.__doc__ = base.__doc__
        setattr(setup_arg_parser, _MARK, True)
        namespace["setup_arg_parser"] = setup_arg_parser
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


class _Finder:
    """Finds ``mlx_lm.generate`` through the other finders and wraps its loader."""

    _busy = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET or self._busy:
            return None
        self._busy = True
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
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
