"""Settings of post-training quantization as dataclasses, from which `mulfree quantize` generates its
flags (`commands/flags.py`): `WalkOptions` for the layer walk, `QuantizeConfig` for the method and
its calibration data. Kept free of torch imports so `mulfree --help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

BITS_RANGE = {"rtn": (2, 8), "gptq": (2, 8), "shiftadd": (1, 4)}  # method -> allowed weight bits


@dataclass
class WalkOptions:
    """How `walker.quantize_model` walks the decoder blocks (defaults as `mulfree quantize`)."""

    true_sequential: bool = field(default=True, metadata={
        "help": "take every linear's Hessian from the FP block instead of stage by stage (q/k/v, o, gate/up, down) "
        "through the linears already quantized"})
    asymmetric: bool = field(default=True, metadata={"negatable": True, "help": (
        "asymmetric calibration (GPTAQ): fit each linear to the FP model's output on the FP model's inputs, not to "
        "its own FP output on the quantized model's inputs")})
    tune_epochs: int = field(default=0, metadata={"help": (
        "norm tweaking: Adam epochs per block fitting its norm weights and biases to the FP block's outputs on the "
        "calibration data (0 = off; quantized weights unchanged)")})
    tune_lr: float = field(default=1e-3, metadata={"help": "learning rate of --tune-epochs"})
    distill_epochs: int = field(default=0, metadata={"help": (
        "after all blocks: Adam epochs fitting every norm weight and bias end to end to the FP model's next-token "
        "distribution on the calibration data (KL; 0 = off)")})
    distill_lr: float = field(default=1e-4, metadata={"help": "learning rate of --distill-epochs"})
    calib_precision: Literal["fp32", "bf16"] = field(default="fp32", metadata={"help": (
        "bf16: the calibration forwards and the Hessian sums multiply bf16-rounded inputs with fp32 accumulation "
        "(PyTorch's oneDNN fp32_precision 'bf16'), several times faster on AMX / AVX512-BF16 CPUs; the solves keep "
        "the caller's precision, and the quantized weights differ slightly from fp32 calibration")})
    batch_size: int = 4  # calibration windows per forward pass
    progress: bool = True  # a progress bar over the blocks


@dataclass
class QuantizeConfig:
    """What `mulfree quantize METHOD` quantizes, how, and on which calibration data."""

    model: str = field(metadata={"help": "HF model dir, .gguf file, or 'smollm2'"})
    bits: int = field(metadata={"help": "weight bits (rtn, gptq: 2..8; shiftadd: 1..4)"})
    out: str = field(metadata={"help": "output dir for the quantized model"})
    group_size: int = field(default=128, metadata={"help": (
        "weights per scale set (-1 = whole row/column). RTN/GPTQ: input columns of one row; shiftadd acc: output "
        "rows of one column; lat: 8 columns x group/8 rows")})
    seed: int = field(default=0, metadata={"help": "seed for calibration sampling and Hadamard signs"})
    calib_data: list[str] | None = field(default=None, metadata={
        "nargs": "*", "help": "local text files for calibration (default: bundled corpus, train split)"})
    calib_samples: int = field(default=128, metadata={
        "help": "calibration windows (fewer windows overfit the calibration text)"})
    calib_seqlen: int = field(default=512, metadata={"help": "tokens per window"})
    incoherence: Literal["none", "hadamard", "hadamard-out", "hadamard-io"] = field(default="none", metadata={
        "help": "randomized block Walsh-Hadamard transforms (adds only, undone online): hadamard = input side "
        "(W T^-1 against T H T^T), hadamard-out = output side, hadamard-io = both"})
    mode: Literal["acc", "lat"] = field(default="acc", metadata={
        "help": "acc: scales per column; lat: scales shared by 8 columns for the LUT kernel"})
    rounds: int = field(default=10, metadata={"help": "ALS refinement rounds per fit"})
    apot_terms: int = field(default=3, metadata={"help": "signed powers of two per scale"})
    mixed_bits: float | None = field(default=None, metadata={
        "help": "average bits with mixed widths by sensitivity (e.g. 2.2 with --bits 2)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty --out dir (kept until the new "
                                                             "one is complete)"})
