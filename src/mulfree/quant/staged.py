"""The true-sequential statistics of a decoder block in one pass per stream, for the blocks whose forward is
known: Llama, Mistral, Qwen2, OPT and GPT-2.

The generic walk (`CalibrationStream.collect`) reruns the block from its input for every stage, because hooks
can stop a forward but not resume one: attention inputs, attention output, MLP inputs and MLP output cost about
4 block forwards on the quantized stream and 3 on the FP one, then `advance` runs the quantized block once more.
For a known block each stage starts from what the previous one left: the attention output linear's input
(attention over the quantized q/k/v), the residual after it, the MLP's hidden activations. The FP block runs
once, keeping its linears' inputs. Every tensor is computed with the block's own modules and the operations of
its transformers `forward` (a `Layout` per block type), so the statistics and the stream are bit-identical to the
generic walk's (`tests/test_quant_staged.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from mulfree.quant.base import HessianStats, QuantMethod
from mulfree.quant.stream import BlockInput, CalibrationStream, _Stop, run_block

Tensor = torch.Tensor


@dataclass(frozen=True)
class Layout:
    """Where a block type's linears sit, by stage in call order (attention inputs, attention output, MLP inputs,
    MLP output: the grouping the generic walk finds by tracing), and how its forward goes on after the attention
    output linear: each function takes the block first."""

    stages: tuple[tuple[str, ...], ...]
    mlp: str | None  # the class name of the block's `mlp` submodule these functions assume (None: inline MLP)
    residual: Callable[[nn.Module, Tensor, Tensor], Tensor]  # (block input, attention output linear's input)
    mlp_input: Callable[[nn.Module, Tensor], Tensor]  # (residual) -> the MLP's first linears' input
    mlp_hidden: Callable[[nn.Module, Tensor], Tensor]  # (MLP input) -> the MLP output linear's input
    output: Callable[[nn.Module, Tensor, Tensor], Tensor]  # (residual, MLP hidden) -> the block output


def _llama_mlp_hidden(block: nn.Module, a: Tensor) -> Tensor:
    mlp = block.mlp
    return mlp.act_fn(mlp.gate_proj(a)) * mlp.up_proj(a)


# h = x + o_proj(attn(input_layernorm(x))); out = h + down(act(gate(a)) * up(a)), a = post_attention_layernorm(h)
LLAMA = Layout(
    stages=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
            ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    mlp="LlamaMLP",
    residual=lambda block, x, o_in: x + block.self_attn.o_proj(o_in),
    mlp_input=lambda block, h: block.post_attention_layernorm(h),
    mlp_hidden=_llama_mlp_hidden,
    output=lambda block, h, hidden: h + block.mlp.down_proj(hidden),
)


def _opt_residual(block: nn.Module, x: Tensor, o_in: Tensor) -> Tensor:
    h = x + block.self_attn.out_proj(o_in)  # attention dropout: none in eval mode
    return h if block.do_layer_norm_before else block.self_attn_layer_norm(h)


def _opt_mlp_input(block: nn.Module, h: Tensor) -> Tensor:
    flat = h.reshape(-1, h.size(-1))  # OPT's MLP runs on [B·T, D]
    return block.final_layer_norm(flat) if block.do_layer_norm_before else flat


def _opt_output(block: nn.Module, h: Tensor, hidden: Tensor) -> Tensor:
    out = (h.reshape(-1, h.size(-1)) + block.fc2(hidden)).view(h.shape)
    return out if block.do_layer_norm_before else block.final_layer_norm(out)


# Pre-norm (125m, 1.3b, ...) or post-norm (350m) by `do_layer_norm_before`, as OPTDecoderLayer.forward.
OPT = Layout(
    stages=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",),
            ("fc2",)),
    mlp=None,
    residual=_opt_residual,
    mlp_input=_opt_mlp_input,
    mlp_hidden=lambda block, a: block.activation_fn(block.fc1(a)),
    output=_opt_output,
)

# h = attn(ln_1(x)) + x, the attention ending in resid_dropout(c_proj(.)); out = h + mlp(ln_2(h)).
GPT2 = Layout(
    stages=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    mlp="GPT2MLP",
    residual=lambda block, x, o_in: block.attn.resid_dropout(block.attn.c_proj(o_in)) + x,
    mlp_input=lambda block, h: block.ln_2(h),
    mlp_hidden=lambda block, a: block.mlp.act(block.mlp.c_fc(a)),
    output=lambda block, h, hidden: h + block.mlp.dropout(block.mlp.c_proj(hidden)),
)

# Decoder blocks by class name: transformers' Llama, the families that copy its block and MLP, OPT and GPT-2.
LAYOUTS = {
    "LlamaDecoderLayer": LLAMA,
    "MistralDecoderLayer": replace(LLAMA, mlp="MistralMLP"),
    "Qwen2DecoderLayer": replace(LLAMA, mlp="Qwen2MLP"),
    "OPTDecoderLayer": OPT,
    "GPT2Block": GPT2,
}


def layout_of(block: nn.Module, linears: dict[str, nn.Module]) -> Layout | None:
    """The block's `Layout` when it is a known block type with exactly the staged linears and the expected MLP
    (a GPT-2 block with cross-attention, or a customised MLP, is not), else None."""
    layout = LAYOUTS.get(type(block).__name__)
    if layout is None or sorted(linears) != sorted(name for stage in layout.stages for name in stage):
        return None
    if layout.mlp is not None and type(getattr(block, "mlp", None)).__name__ != layout.mlp:
        return None
    return layout


def _input_of(block: nn.Module, name: str, record: BlockInput) -> torch.Tensor:
    """The input of linear `name` when `block` runs on `record`, the forward stopped there."""
    seen: list[torch.Tensor] = []

    def stop(_module, args):
        seen.append(args[0])
        raise _Stop

    handle = block.get_submodule(name).register_forward_pre_hook(stop)
    try:
        run_block(block, *record)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0]


class StagedWalk:
    """Per block: `stages()` yields (linear names, {name: stats}) stage by stage; the caller quantizes a stage's
    linears into the block before asking for the next. After the last, `outputs()` gives the quantized stream's
    block outputs, and the stream's FP outputs are set (asymmetric)."""

    def __init__(self, block: nn.Module, layout: Layout, stream: CalibrationStream, method: QuantMethod):
        self.block, self.layout, self.stream, self.method = block, layout, stream, method
        self._tail: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None = None

    def _fp_inputs(self) -> dict[str, Sequence[torch.Tensor]]:
        """{first linear of each stage: its inputs on the FP stream} from one whole run of the FP block, whose
        outputs the stream keeps (they are the FP stream's next inputs). The inputs are kept as the stream keeps its
        own, each list moving to disk as it passes the spill threshold."""
        stream, leaders = self.stream, [stage[0] for stage in self.layout.stages]
        fp_block = stream.fp_block
        current: dict[str, torch.Tensor] = {}

        def remember(name: str):
            def fn(_module, args):
                current[name] = args[0]

            return fn

        handles = [fp_block.get_submodule(n).register_forward_pre_hook(remember(n)) for n in leaders]
        kept = {n: stream.sink() for n in leaders}

        def outputs():
            for r in stream.fp_inputs:
                out = run_block(fp_block, *r)
                for n in leaders:
                    kept[n].append(current.pop(n))
                yield out

        try:
            stream.fp_outputs = stream.keep(outputs())
        finally:
            for handle in handles:
                handle.remove()
        return {n: kept[n].kept() for n in leaders}

    def _stats(
        self, names: tuple[str, ...], xs: Iterable[torch.Tensor], fp: Sequence[torch.Tensor] | None
    ) -> dict[str, HessianStats]:
        """One stats object for the stage's linears (they share their input), filled with `xs` (and `fp`)."""
        stats = self.method.make_stats(self.block.get_submodule(names[0]))
        for i, x in enumerate(xs):
            stats.add_batch(x, None, None if fp is None else fp[i])
        return {name: stats for name in names}

    @torch.no_grad()
    def stages(self) -> Iterator[tuple[list[str], dict[str, HessianStats]]]:
        block, layout, stream = self.block, self.layout, self.stream
        fp = self._fp_inputs() if stream.asymmetric else {}
        stream.drop_fp_block()
        keep, records = stream.keep, stream.inputs
        attn_in, attn_out, mlp_in, mlp_out = layout.stages

        xs = (_input_of(block, attn_in[0], r) for r in records)  # the input norm only: read once, not kept
        yield list(attn_in), self._stats(attn_in, xs, fp.get(attn_in[0]))
        xs = keep(_input_of(block, attn_out[0], r) for r in records)  # attention over the quantized q/k/v
        yield list(attn_out), self._stats(attn_out, xs, fp.get(attn_out[0]))
        resid = keep(layout.residual(block, r.hidden, x) for r, x in zip(records, xs, strict=True))
        xs = None
        yield list(mlp_in), self._stats(mlp_in, (layout.mlp_input(block, h) for h in resid), fp.get(mlp_in[0]))
        xs = keep(layout.mlp_hidden(block, layout.mlp_input(block, h)) for h in resid)
        yield list(mlp_out), self._stats(mlp_out, xs, fp.get(mlp_out[0]))
        self._tail = resid, xs

    @torch.no_grad()
    def outputs(self) -> Sequence[torch.Tensor]:
        """The quantized stream's block outputs, from the residual and MLP hidden activations the last stage left
        (after `stages()` is exhausted; a walk that tunes the block runs it again instead)."""
        resid, xs = self._tail
        return self.stream.keep(self.layout.output(self.block, h, x) for h, x in zip(resid, xs, strict=True))
