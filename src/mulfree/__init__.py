"""mulfree: language models that avoid multiplication (MatMul-free LM, ShiftAddLLM, L-Mul,
positional arithmetic), trained, converted and run on ordinary CPUs.

Importing mulfree also lets transformers load `mulfree quantize` dirs (`quant.hf_quantizer`). transformers takes
seconds to import and is optional, so the quantizer is registered when transformers' quantizer registry
(`transformers.quantizers.auto`) is first imported, or at once if it already is.
"""

import sys
from importlib import import_module
from importlib.machinery import ModuleSpec, PathFinder
from types import ModuleType

from mulfree.errors import MulfreeError

__version__ = "0.1.0"
__all__ = ["MulfreeError", "__version__"]

_HF_REGISTRY = "transformers.quantizers.auto"


def _register_hf_quantizer() -> None:
    """Import `quant.hf_quantizer`, which registers itself (a no-op while that module is the one importing transformers:
    it registers when it finishes)."""
    import_module("mulfree.quant.hf_quantizer")


class _AfterHfRegistry:
    """A `sys.meta_path` finder that finds no module itself: asked for transformers' quantizer registry, it leaves
    `sys.meta_path` and returns the registry's own spec (found on its package's path), its loader made to register
    the mulfree quantizer right after the module has run. (Not an `importlib.abc` subclass: that import alone
    costs ~30 ms.)"""

    def find_spec(self, name: str, path=None, target: ModuleType | None = None) -> ModuleSpec | None:
        if name != _HF_REGISTRY:
            return None
        sys.meta_path.remove(self)
        spec = PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module  # a fresh loader per spec: the patch touches this import only

            def run_then_register(module: ModuleType) -> None:
                run(module)
                _register_hf_quantizer()

            spec.loader.exec_module = run_then_register
        return spec


if _HF_REGISTRY in sys.modules:
    _register_hf_quantizer()
else:
    sys.meta_path.insert(0, _AfterHfRegistry())
