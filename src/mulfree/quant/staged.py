"""The true-sequential statistics of a Llama-family decoder block (Llama, Mistral, Qwen2) in one pass per
stream.

The generic walk (`CalibrationStream.collect`) reruns the block from its input for every stage, because hooks
can stop a forward but not resume one: q/k/v, o, gate/up and down cost about 4 block forwards on the
quantized stream and 3 on the FP one, then `advance` runs the quantized block once more. A Llama-family block's
stages are known, so here each stage starts from what the previous one left: the o_proj input (attention
over the quantized q/k/v), the residual after o_proj, the MLP product. The FP block runs once, keeping its
linears' inputs. Every tensor is computed with the block's own modules and the same operations as
`LlamaDecoderLayer.forward`, so the statistics and the stream are bit-identical to the generic walk's
(`tests/test_quant_staged.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from mulfree.quant.base import HessianStats, QuantMethod
from mulfree.quant.stream import BlockInput, CalibrationStream, _Stop, run_block

# The linears of a Llama block by stage, in call order (the generic walk finds the same grouping by tracing).
STAGES = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
# Decoder blocks whose forward is h = x + self_attn(input_layernorm(x)), then h + mlp(post_attention_layernorm(h)),
# with the MLP down(act(gate(a)) * up(a)): transformers' Llama and the families that copy its block and MLP.
BLOCK_TYPES = {
    "LlamaDecoderLayer": "LlamaMLP",
    "MistralDecoderLayer": "MistralMLP",
    "Qwen2DecoderLayer": "Qwen2MLP",
}


def supports(block: nn.Module, linears: dict[str, nn.Module]) -> bool:
    """Whether `block` is a Llama-family decoder block with exactly the staged linears and the standard MLP."""
    mlp = BLOCK_TYPES.get(type(block).__name__)
    return (
        mlp is not None
        and sorted(linears) == sorted(name for stage in STAGES for name in stage)
        and type(getattr(block, "mlp", None)).__name__ == mlp
    )


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

    def __init__(self, block: nn.Module, stream: CalibrationStream, method: QuantMethod):
        self.block, self.stream, self.method = block, stream, method
        self._tail: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None = None

    def _fp_inputs(self) -> dict[str, Sequence[torch.Tensor]]:
        """{first linear of each stage: its inputs on the FP stream} from one whole run of the FP block, whose
        outputs the stream keeps (they are the FP stream's next inputs). The inputs are kept as the stream keeps its
        own, each list moving to disk as it passes the spill threshold."""
        stream, leaders = self.stream, [stage[0] for stage in STAGES]
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
        block, stream = self.block, self.stream
        fp = self._fp_inputs() if stream.asymmetric else {}
        stream.drop_fp_block()
        keep, records = stream.keep, stream.inputs
        qkv, o, gate_up, down = STAGES

        xs = (_input_of(block, qkv[0], r) for r in records)  # input norm only: read once, not kept
        yield list(qkv), self._stats(qkv, xs, fp.get(qkv[0]))
        xs = keep(_input_of(block, o[0], r) for r in records)  # attention over the quantized q/k/v
        yield list(o), self._stats(o, xs, fp.get(o[0]))
        o_proj, norm = block.get_submodule(o[0]), block.post_attention_layernorm
        resid = keep(r.hidden + o_proj(x) for r, x in zip(records, xs, strict=True))
        xs = None
        yield list(gate_up), self._stats(gate_up, (norm(h) for h in resid), fp.get(gate_up[0]))
        mlp = block.mlp
        xs = keep(mlp.act_fn(mlp.gate_proj(a)) * mlp.up_proj(a) for a in (norm(h) for h in resid))
        yield list(down), self._stats(down, xs, fp.get(down[0]))
        self._tail = resid, xs

    @torch.no_grad()
    def outputs(self) -> Sequence[torch.Tensor]:
        """The quantized stream's block outputs, from the residual and MLP product the last stage left (after
        `stages()` is exhausted; a walk that tunes the block runs it again instead)."""
        resid, xs = self._tail
        down_proj = self.block.mlp.down_proj
        return self.stream.keep(h + down_proj(x) for h, x in zip(resid, xs, strict=True))
