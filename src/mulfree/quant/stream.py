"""The calibration stream through the decoder blocks: block 0's inputs captured once, then advanced
one block at a time, with the FP model's stream beside the quantized one for asymmetric calibration.

`CalibrationStream.collect` runs the current block on every calibration batch with forward hooks
that fill one `HessianStats` per distinct linear input, and reports the linears grouped by shared
input in call order (q/k/v, o, gate/up, down): the true-sequential stages.

With a `spill.Spill` the hidden states of every calibration batch (the stream's one large state, n x T x D
floats per stream) move to a scratch file once they outgrow its threshold and are read back one batch at a
time; the other block arguments (masks, rotary tables) stay in memory.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn

from mulfree.quant.base import HessianStats, QuantMethod
from mulfree.quant.spill import Sink, Spill


class BlockInput(NamedTuple):
    """One calibration batch as a decoder block receives it: hidden states [B, T, D], the other
    positional arguments (None when the hidden states came by keyword) and the keyword arguments."""

    hidden: torch.Tensor
    args: tuple | None
    kwargs: dict


class _Stop(Exception):
    """Raised by a hook once the rest of a forward pass is not needed (block 0's inputs are recorded, or
    every linear a `collect` asks for has seen this batch)."""


def _block_output(out):
    return out[0] if isinstance(out, tuple) else out


def run_block(block: nn.Module, hidden: torch.Tensor, args: tuple | None, kwargs: dict) -> torch.Tensor:
    """The block's output hidden states [B, T, D] for one recorded input."""
    if args is None:
        return _block_output(block(hidden_states=hidden, **kwargs))
    return _block_output(block(hidden, *args, **kwargs))


@torch.no_grad()
def iter_inputs(model: nn.Module, block: nn.Module, calib: torch.Tensor, batch_size: int) -> Iterator[BlockInput]:
    """Inputs of `block` for each batch of `batch_size` rows of `calib` [n, T] in turn (the model stops there)."""
    records: list[BlockInput] = []

    def hook(_module, args, kwargs):
        if args:
            records.append(BlockInput(args[0], args[1:], kwargs))
        else:
            kw = dict(kwargs)
            records.append(BlockInput(kw.pop("hidden_states"), None, kw))
        raise _Stop

    for i in range(0, calib.shape[0], batch_size):
        handle = block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            model(calib[i : i + batch_size], use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        if records:
            yield records.pop()


def capture_inputs(model: nn.Module, block: nn.Module, calib: torch.Tensor, batch_size: int) -> list[BlockInput]:
    """Inputs of `block` for every batch of `batch_size` rows of `calib` [n, T] (the model stops there)."""
    return list(iter_inputs(model, block, calib, batch_size))


class Records(Sequence[BlockInput]):
    """Block inputs with the hidden states in `hidden` (a list, or a scratch file when spilled) and the
    other arguments in `rest` [(args, kwargs)] (shared, unchanged, from block to block)."""

    def __init__(self, hidden: Sequence[torch.Tensor], rest: list[tuple[tuple | None, dict]]):
        self.hidden, self.rest = hidden, rest

    def __len__(self) -> int:
        return len(self.rest)

    def __getitem__(self, i: int) -> BlockInput:  # type: ignore[override]
        return BlockInput(self.hidden[i], *self.rest[i])

    def __iter__(self) -> Iterator[BlockInput]:
        return (self[i] for i in range(len(self)))

    def with_hidden(self, hidden: Sequence[torch.Tensor]) -> Records:
        """The same batches with new hidden states."""
        return Records(hidden, self.rest)


class CalibrationStream:
    """The hidden states entering the current block: `inputs` on the quantized model and, with
    `asymmetric`, `fp_inputs` on the FP model (every earlier block still in full precision).

    Per block: `enter(block)` before any of its linears is replaced, `collect` as often as needed,
    `advance(block)` once it is quantized. With `spill`, hidden states beyond its threshold live on disk.
    """

    def __init__(
        self, model: nn.Module, first_block: nn.Module, calib: torch.Tensor, batch_size: int, asymmetric: bool,
        spill: Spill | None = None,
    ):
        self._spill = spill
        rest: list[tuple[tuple | None, dict]] = []

        def hidden():
            for record in iter_inputs(model, first_block, calib, batch_size):
                rest.append((record.args, record.kwargs))
                yield record.hidden

        self.inputs = Records(self.keep(hidden()), rest)
        self.asymmetric = asymmetric
        self.fp_inputs = self.inputs if asymmetric else Records([], [])
        self.fp_block: nn.Module | None = None
        self.fp_outputs: Sequence[torch.Tensor] | None = None

    def keep(self, tensors: Iterable[torch.Tensor]) -> Sequence[torch.Tensor]:
        """Every tensor of `tensors` in order: in memory, or on disk past the spill threshold when there is one."""
        return self._spill.keep(tensors) if self._spill is not None else list(tensors)

    def sink(self) -> Sink:
        """An accumulator of tensors kept as `keep` keeps them, for a pass that makes several streams at once."""
        return Sink(self._spill)

    @torch.no_grad()
    def enter(self, block: nn.Module) -> None:
        """Keep an FP copy of `block` (asymmetric only); its outputs on the FP stream are kept by the first
        pass that runs it whole (the first `collect`, else `fp_targets` or `advance`)."""
        if self.asymmetric:
            self.fp_block = copy.deepcopy(block)
            self.fp_outputs = None

    @torch.no_grad()
    def fp_targets(self, block: nn.Module) -> Sequence[torch.Tensor]:
        """The FP block's outputs that block tuning fits to: on the FP stream when asymmetric, else
        `block` (not yet quantized) on the quantized stream."""
        if not self.asymmetric:
            return self.keep(run_block(block, *r) for r in self.inputs)
        if self.fp_outputs is None:
            self.fp_outputs = self.keep(run_block(self.fp_block, *r) for r in self.fp_inputs)
        return self.fp_outputs

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

        seen: set[str] = set()  # the targets that have run on the current batch (quantized block)
        fp_seen: set[str] = set()

        def stop_when_done(name: str, done: set[str]) -> None:
            done.add(name)  # the rest of the block's forward cannot change what is collected
            if len(done) == len(linears):
                raise _Stop

        def fp_hook(name: str):
            def fn(_module, args, _out):
                fp_in[name] = args[0]
                if self.fp_outputs is not None:  # the FP outputs are kept: only the inputs are needed
                    stop_when_done(name, fp_seen)

            return fn

        def counted(name: str):
            inner = hook(name)

            def fn(module, args, out):
                inner(module, args, out)
                stop_when_done(name, seen)

            return fn

        def run(block: nn.Module, record: BlockInput, done: set[str]):
            done.clear()
            try:
                return run_block(block, *record)
            except _Stop:
                return None

        def batches():  # one calibration batch at a time: FP block first (it fills fp_in), then `block`
            for i, record in enumerate(self.inputs):
                out = None if self.fp_block is None else run(self.fp_block, self.fp_inputs[i], fp_seen)
                run(block, record, seen)
                last.clear()
                yield out

        handles = [m.register_forward_hook(counted(name)) for name, m in linears.items()]
        if self.fp_block is not None:
            handles += [self.fp_block.get_submodule(n).register_forward_hook(fp_hook(n)) for n in linears]
        try:
            if self.fp_block is not None and self.fp_outputs is None:
                self.fp_outputs = self.keep(batches())  # the FP block runs whole once, its outputs kept
            else:
                for _ in batches():
                    pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name in linears if name not in stats]
        for name in missing:
            stats[name] = method.make_stats(linears[name])
        if missing:
            stages.append(missing)
        return stats, stages

    def drop_fp_block(self) -> None:
        """Free the FP copy of the current block once no collect will run it (its outputs are kept)."""
        if self.fp_block is not None and self.fp_outputs is not None:
            self.fp_block = None

    @torch.no_grad()
    def advance(self, block: nn.Module) -> None:
        """Move both streams past the current block: the quantized one through `block` as it is now."""
        self.advance_to(self.keep(run_block(block, *r) for r in self.inputs), block)

    def advance_to(self, outputs: Sequence[torch.Tensor], block: nn.Module) -> None:
        """Move both streams past the current block, the quantized one to `outputs` (`block`'s, computed by the
        caller)."""
        self.inputs = self.inputs.with_hidden(outputs)
        if self.asymmetric:
            self.fp_inputs = self.fp_inputs.with_hidden(self.fp_targets(block))
        self.fp_block, self.fp_outputs = None, None
