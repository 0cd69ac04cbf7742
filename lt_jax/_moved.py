"""Old module paths of lt-jax 0.1, kept importable for one release with a DeprecationWarning."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {"lt_jax.mask": "lt_jax.attention", **{f"lt_jax.{name}": f"lt_jax.eval.{name}" for name in
                                                ("bench", "evaluate", "longbench", "plots")}}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}; the old path goes away in the next release.",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        sys.modules[module.__spec__.name if module.__spec__ else module.__name__] = module


def install():
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
