"""mulfree: language models that avoid multiplication (MatMul-free LM, ShiftAddLLM, L-Mul,
positional arithmetic), trained, converted and run on ordinary CPUs."""

from mulfree.errors import MulfreeError

__version__ = "0.1.0"
__all__ = ["MulfreeError", "__version__"]
