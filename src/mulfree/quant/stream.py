"""The calibration stream through the decoder blocks: block 0's inputs captured once, then advanced
one block at a time, with the FP model's stream beside the quantized one for asymmetric calibration.

`CalibrationStream.collect` runs the current block on every calibration batch with forward hooks
that fill one `HessianStats` per distinct linear input, and reports the linears grouped by shared
input in call order (q/k/v, o, gate/up, down): the true-sequential stages.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from mulfree.quant.base import HessianStats, QuantMethod


class BlockInput(NamedTuple):
    """One calibration batch as a decoder block receives it: hidden states [B, T, D], the other
    positional arguments (None when the hidden states came by keyword) and the keyword arguments."""

    hidden: torch.Tensor
    args: tuple | None
    kwargs: dict


class _Stop(Exception):
    """Raised by the capture hook once block 0's inputs are recorded."""


def _block_output(out):
    return out[0] if isinstance(out, tuple) else out


def run_block(block: nn.Module, hidden: torch.Tensor, args: tuple | None, kwargs: dict) -> torch.Tensor:
    """The block's output hidden states [B, T, D] for one recorded input."""
    if args is None:
        return _block_output(block(hidden_states=hidden, **kwargs))
    return _block_output(block(hidden, *args, **kwargs))


@torch.no_grad()
def capture_inputs(model: nn.Module, block: nn.Module, calib: torch.Tensor, batch_size: int) -> list[BlockInput]:
    """Inputs of `block` for every batch of `batch_size` rows of `calib` [n, T] (the model stops there)."""
    records = []

    def hook(_module, args, kwargs):
        if args:
            records.append(BlockInput(args[0], args[1:], kwargs))
        else:
            kw = dict(kwargs)
            records.append(BlockInput(kw.pop("hidden_states"), None, kw))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, calib.shape[0], batch_size):
            try:
                model(calib[i : i + batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return records


class CalibrationStream:
    """The hidden states entering the current block: `inputs` on the quantized model and, with
    `asymmetric`, `fp_inputs` on the FP model (every earlier block still in full precision).

    Per block: `enter(block)` before any of its linears is replaced, `collect` as often as needed,
    `advance(block)` once it is quantized.
    """

    def __init__(
        self, model: nn.Module, first_block: nn.Module, calib: torch.Tensor, batch_size: int, asymmetric: bool
    ):
        self.inputs = capture_inputs(model, first_block, calib, batch_size)
        self.asymmetric = asymmetric
        self.fp_inputs = list(self.inputs) if asymmetric else []
        self.fp_block: nn.Module | None = None
        self.fp_outputs: list[torch.Tensor] = []

    @torch.no_grad()
    def enter(self, block: nn.Module) -> None:
        """Keep an FP copy of `block` and its outputs on the FP stream (asymmetric only)."""
        if self.asymmetric:
            self.fp_block = copy.deepcopy(block)
            self.fp_outputs = [run_block(self.fp_block, *r) for r in self.fp_inputs]

    @torch.no_grad()
    def fp_targets(self, block: nn.Module) -> list[torch.Tensor]:
        """The FP block's outputs that block tuning fits to: on the FP stream when asymmetric, else
        `block` (not yet quantized) on the quantized stream."""
        return self.fp_outputs if self.asymmetric else [run_block(block, *r) for r in self.inputs]

    @torch.no_grad()
    def collect(
        self, block: nn.Module, linears: dict[str, nn.Module], method: QuantMethod
    ) -> tuple[dict[str, HessianStats], list[list[str]]]:
        """Run `block` on every batch with hooks on `linears`: ({name: stats}, stages). Linears fed the
        same tensor share one stats object; the stages are the linears in call order grouped that way."""
        stats: dict[str, HessianStats] = {}
        stages: list[list[str]] = []
        leaders: set[str] = set()
        last: dict[str, tuple] = {}  # the current batch's last new input: tensor kept alive, (address, shape)
        fp_in: dict[str, torch.Tensor] = {}

        def hook(name: str):
            def fn(module, args, out):
                x = args[0]
                if name not in stats:  # first batch: join the previous stage when fed the same tensor
                    key = (x.data_ptr(), tuple(x.shape))
                    if stages and last.get("key") == key:
                        stages[-1].append(name)
                        stats[name] = stats[stages[-1][0]]
                        return
                    last.update(x=x, key=key)
                    stages.append([name])
                    stats[name] = method.make_stats(module)
                    leaders.add(name)
                if name in leaders:
                    stats[name].add_batch(x, out, fp_in.get(name))

            return fn

        def fp_hook(name: str):
            def fn(_module, args, _out):
                fp_in[name] = args[0]

            return fn

        handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
        if self.fp_block is not None:
            handles += [self.fp_block.get_submodule(n).register_forward_hook(fp_hook(n)) for n in linears]
        try:
            for i, record in enumerate(self.inputs):
                if self.fp_block is not None:
                    run_block(self.fp_block, *self.fp_inputs[i])
                run_block(block, *record)
                last.clear()
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name in linears if name not in stats]
        for name in missing:
            stats[name] = method.make_stats(linears[name])
        if missing:
            stages.append(missing)
        return stats, stages

    @torch.no_grad()
    def advance(self, block: nn.Module) -> None:
        """Move both streams past the current block: the quantized one through `block` as it is now."""
        self.inputs = [r._replace(hidden=run_block(block, *r)) for r in self.inputs]
        if self.asymmetric:
            self.fp_inputs = [r._replace(hidden=out) for out, r in zip(self.fp_outputs, self.fp_inputs)]
        self.fp_block, self.fp_outputs = None, []
