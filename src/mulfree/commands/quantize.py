"""`mulfree quantize {rtn,gptq,shiftadd}`: post-training quantization of a pretrained HF causal LM.
Flags come from `quant.config.QuantizeConfig` and `WalkOptions`.

A model is quantized block by block (`quant.blockwise`: one decoder block in memory at a time; a .gguf file or
'smollm2' from its safetensors cache, converted on first use); an interrupted run continues when the same command
runs again. --distill-epochs loads the whole model (`quant.walker`)."""

from __future__ import annotations

import argparse

from mulfree.commands.flags import add_flags, from_args
from mulfree.quant.config import BITS_RANGE, QuantizeConfig, WalkOptions

CALIBRATED = ("calib_data", "calib_samples", "calib_seqlen", "incoherence")  # flags of gptq and shiftadd
SHIFTADD = ("mode", "rounds", "apot_terms", "mixed_bits")  # flags of shiftadd only


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="post-training quantization of a pretrained model (RTN, GPTQ, ShiftAddLLM)",
        description="Quantize the linear layers of a Hugging Face causal LM (model dir, .gguf file or "
        "'smollm2') and write a reloadable quantized model dir.",
    )
    methods = parser.add_subparsers(dest="method", metavar="METHOD")
    for name, text in (
        ("rtn", "round-to-nearest on a uniform grid (no calibration)"),
        ("gptq", "GPTQ: uniform grid with Hessian error compensation"),
        ("shiftadd", "ShiftAddLLM: binary-coding planes with power-of-two scales, GPTQ-compensated"),
    ):
        p = methods.add_parser(name, help=text, description=text)
        skip = (*CALIBRATED, *SHIFTADD) if name == "rtn" else SHIFTADD if name == "gptq" else ()
        defaults = {"incoherence": "hadamard-io"} if name == "shiftadd" else {}
        add_flags(p, QuantizeConfig, skip=skip, defaults=defaults, required=("model", "bits", "out"))
        if name != "rtn":
            add_flags(p, WalkOptions, skip=("batch_size", "progress"))
        p.set_defaults(func=run_quantize)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def build_method(name: str, cfg: QuantizeConfig, walk: WalkOptions):
    """The walker method `name` with `cfg`'s settings; ConfigError on out-of-range settings."""
    import math

    from mulfree.errors import ConfigError

    lo, hi = BITS_RANGE[name]
    if not lo <= cfg.bits <= hi:
        raise ConfigError(f"--bits {cfg.bits} is out of range for {name}", f"use {lo}..{hi}")
    if cfg.group_size == 0 or not -1 <= cfg.group_size <= 1 << 20:
        raise ConfigError(f"--group-size {cfg.group_size} is invalid", "use a positive size (up to 2^20) or -1")
    if not 0 <= cfg.seed < 1 << 63:
        raise ConfigError(f"--seed {cfg.seed} is out of range", "use 0..2^63-1")
    if name == "rtn":
        from mulfree.quant.rtn import RTN

        return RTN(cfg.bits, cfg.group_size)
    if not (1 <= cfg.calib_samples <= 1 << 16 and 2 <= cfg.calib_seqlen <= 1 << 20):
        raise ConfigError("calibration needs 1..65536 windows of 2..2^20 tokens", "fix --calib-samples/--calib-seqlen")
    for flag, epochs, lr, example in (("tune", walk.tune_epochs, walk.tune_lr, "--tune-epochs 4 --tune-lr 1e-3"),
                                      ("distill", walk.distill_epochs, walk.distill_lr, "--distill-epochs 2 --distill-lr 1e-4")):
        if not 0 <= epochs <= 10_000 or not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"--{flag}-epochs must be >= 0 and --{flag}-lr > 0", f"e.g. {example}")
    if name == "gptq":
        from mulfree.quant.gptq import GPTQ

        return GPTQ(cfg.bits, cfg.group_size, incoherence=cfg.incoherence, seed=cfg.seed)
    from mulfree.quant.shiftadd import ShiftAdd

    if not 0 <= cfg.rounds <= 10_000 or not 1 <= cfg.apot_terms <= 4:
        raise ConfigError("--rounds must be in 0..10000 and --apot-terms in 1..4", "e.g. --rounds 10 --apot-terms 3")
    if cfg.mixed_bits is not None and not cfg.bits <= cfg.mixed_bits <= cfg.bits + 1:
        raise ConfigError(f"--mixed-bits {cfg.mixed_bits} must lie in [bits, bits+1]", "e.g. --bits 2 --mixed-bits 2.2")
    return ShiftAdd(cfg.bits, cfg.group_size, cfg.mode, cfg.rounds, cfg.apot_terms, mixed_bits=cfg.mixed_bits,
                    incoherence=cfg.incoherence, seed=cfg.seed)


def run_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from mulfree.atomic import check_not_inside, prepare_output
    from mulfree.models.pretrained import hf_dir, load_hf_causal_lm, load_hf_tokenizer
    from mulfree.quant.blockwise import load_config, quantize_blockwise, skeleton
    from mulfree.quant.walker import calibration_ids, decoder_blocks, quantize_model, save_quantized

    cfg, walk = from_args(QuantizeConfig, args), from_args(WalkOptions, args)
    method = build_method(args.method, cfg, walk)
    check_not_inside(cfg.model, cfg.out)
    prepare_output(cfg.out, "quantized model", cfg.overwrite)  # before any work
    torch.manual_seed(cfg.seed)
    text = None
    if method.needs_stats:  # read (and check) the calibration text before the model
        from mulfree.data.text import load_corpus

        text = load_corpus(cfg.calib_data).train_text
    blockwise = not walk.distill_epochs
    if blockwise:
        src = hf_dir(cfg.model)
        check_not_inside(src, cfg.out, f"the dir {cfg.model} is read from")  # e.g. smollm2's converted cache
        model = None
        config = load_config(src)
        decoder_blocks(skeleton(config))  # fail fast on unsupported architectures
        tokenizer = load_hf_tokenizer(src, config.vocab_size)
    else:
        model, tokenizer = load_hf_causal_lm(cfg.model)
        config = model.config
        decoder_blocks(model)
    calib, extra = None, {}
    if text is not None:
        # fp32 block inputs and outputs of every window, for the FP and the quantized stream (blockwise: a
        # scratch file beyond quant.spill.SPILL_BYTES, so only the whole-model walk must hold them)
        if not blockwise:
            from mulfree.models.schema import check_memory

            check_memory(4 * 4 * cfg.calib_samples * cfg.calib_seqlen * config.hidden_size,
                         "--calib-samples x --calib-seqlen", "the calibration activations",
                         "lower --calib-samples or --calib-seqlen (without --distill-epochs a model is quantized "
                         "block by block, its activations spilled to disk)")
        calib = calibration_ids(tokenizer, text, cfg.calib_samples, cfg.calib_seqlen, cfg.seed)
        extra["calibration"] = {"samples": cfg.calib_samples, "seqlen": cfg.calib_seqlen, "seed": cfg.seed,
                                "data": cfg.calib_data or "bundled", "true_sequential": walk.true_sequential,
                                "tune_epochs": walk.tune_epochs, "tune_lr": walk.tune_lr,
                                "asymmetric": walk.asymmetric, "precision": walk.calib_precision,
                                "distill_epochs": walk.distill_epochs, "distill_lr": walk.distill_lr}
    if blockwise:
        out = Path(cfg.out)
        metas = quantize_blockwise(src, out, method, calib, walk, tokenizer=tokenizer, extra=extra,
                                   overwrite=cfg.overwrite)
    else:
        metas = quantize_model(model, method, calib, walk)
        out = save_quantized(model, tokenizer, cfg.out, method, metas, extra, overwrite=cfg.overwrite)
    print(f"wrote {out} ({len(metas)} quantized layers, {method.name} {cfg.bits}-bit)")
    return 0
