"""`mulfree quantize {rtn,gptq,shiftadd}`: post-training quantization of a pretrained HF causal LM."""

from __future__ import annotations

import argparse

BITS_RANGE = {"rtn": (2, 8), "gptq": (2, 8), "shiftadd": (1, 4)}


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
        p.add_argument("--model", required=True, help="HF model dir, .gguf file, or 'smollm2'")
        lo, hi = BITS_RANGE[name]
        p.add_argument("--bits", type=int, required=True, help=f"weight bits ({lo}..{hi})")
        p.add_argument("--group-size", type=int, default=128,
                       help="weights per scale set (-1 = whole row/column; default 128). RTN/GPTQ: input columns "
                       "of one row; shiftadd acc: output rows of one column; lat: 8 columns x group/8 rows")
        p.add_argument("--out", required=True, help="output dir for the quantized model")
        p.add_argument("--seed", type=int, default=0, help="seed for calibration sampling and Hadamard signs")
        if name != "rtn":
            p.add_argument("--calib-data", nargs="*", default=None,
                           help="local text files for calibration (default: bundled corpus, train split)")
            p.add_argument("--calib-samples", type=int, default=128,
                           help="calibration windows (default 128; fewer windows overfit the calibration text)")
            p.add_argument("--calib-seqlen", type=int, default=512, help="tokens per window (default 512)")
            default = "hadamard-io" if name == "shiftadd" else "none"
            p.add_argument("--incoherence", choices=("none", "hadamard", "hadamard-out", "hadamard-io"), default=default,
                           help="randomized block Walsh-Hadamard transforms (adds only, undone online): hadamard = "
                           "input side (W T^-1 against T H T^T), hadamard-out = output side, hadamard-io = both "
                           f"(default {default})")
            p.add_argument("--no-true-sequential", dest="true_sequential", action="store_false",
                           help="take every linear's Hessian from the FP block instead of stage by stage "
                           "(q/k/v, o, gate/up, down) through the linears already quantized")
            p.add_argument("--asymmetric", action=argparse.BooleanOptionalAction, default=True,
                           help="asymmetric calibration (GPTAQ): fit each linear to the FP model's output on the FP "
                           "model's inputs, not to its own FP output on the quantized model's inputs (default on)")
            p.add_argument("--tune-epochs", type=int, default=0,
                           help="norm tweaking: Adam epochs per block fitting its norm weights and biases to the FP "
                           "block's outputs on the calibration data (default 0 = off; quantized weights unchanged)")
            p.add_argument("--tune-lr", type=float, default=1e-3, help="learning rate of --tune-epochs (default 1e-3)")
            p.add_argument("--distill-epochs", type=int, default=0,
                           help="after all blocks: Adam epochs fitting every norm weight and bias end to end to the "
                           "FP model's next-token distribution on the calibration data (KL; default 0 = off)")
            p.add_argument("--distill-lr", type=float, default=1e-4,
                           help="learning rate of --distill-epochs (default 1e-4)")
        if name == "shiftadd":
            p.add_argument("--mode", choices=("acc", "lat"), default="acc",
                           help="acc: scales per column; lat: scales shared by 8 columns for the LUT kernel")
            p.add_argument("--rounds", type=int, default=10, help="ALS refinement rounds per fit (default 10)")
            p.add_argument("--apot-terms", type=int, default=3, help="signed powers of two per scale (default 3)")
            p.add_argument("--mixed-bits", type=float, default=None,
                           help="average bits with mixed widths by sensitivity (e.g. 2.2 with --bits 2)")
        p.set_defaults(func=run_quantize)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def build_method(args: argparse.Namespace):
    """The walker method for the parsed arguments; ConfigError on out-of-range settings."""
    from mulfree.errors import ConfigError

    lo, hi = BITS_RANGE[args.method]
    if not lo <= args.bits <= hi:
        raise ConfigError(f"--bits {args.bits} is out of range for {args.method}", f"use {lo}..{hi}")
    if args.group_size == 0 or args.group_size < -1:
        raise ConfigError(f"--group-size {args.group_size} is invalid", "use a positive size or -1")
    if args.method == "rtn":
        from mulfree.quant.rtn import RTN

        return RTN(args.bits, args.group_size)
    if args.calib_samples < 1 or args.calib_seqlen < 2:
        raise ConfigError("calibration needs at least 1 window of 2+ tokens", "raise --calib-samples/--calib-seqlen")
    if args.tune_epochs < 0 or not args.tune_lr > 0:
        raise ConfigError("--tune-epochs must be >= 0 and --tune-lr > 0", "e.g. --tune-epochs 4 --tune-lr 1e-3")
    if args.distill_epochs < 0 or not args.distill_lr > 0:
        raise ConfigError("--distill-epochs must be >= 0 and --distill-lr > 0", "e.g. --distill-epochs 2 --distill-lr 1e-4")
    if args.method == "gptq":
        from mulfree.quant.gptq import GPTQ

        return GPTQ(args.bits, args.group_size, incoherence=args.incoherence, seed=args.seed)
    from mulfree.quant.shiftadd import ShiftAdd

    if args.rounds < 0 or not 1 <= args.apot_terms <= 4:
        raise ConfigError("--rounds must be >= 0 and --apot-terms in 1..4", "e.g. --rounds 10 --apot-terms 3")
    if args.mixed_bits is not None and not args.bits <= args.mixed_bits <= args.bits + 1:
        raise ConfigError(f"--mixed-bits {args.mixed_bits} must lie in [bits, bits+1]", "e.g. --bits 2 --mixed-bits 2.2")
    return ShiftAdd(args.bits, args.group_size, args.mode, args.rounds, args.apot_terms, mixed_bits=args.mixed_bits,
                    incoherence=args.incoherence, seed=args.seed)


def run_quantize(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    from mulfree.models.pretrained import load_hf_causal_lm
    from mulfree.quant.walker import calibration_ids, decoder_blocks, quantize_model, save_quantized

    torch.manual_seed(args.seed)
    method = build_method(args)
    model, tokenizer = load_hf_causal_lm(args.model)
    decoder_blocks(model)  # fail fast on unsupported architectures
    calib, extra = None, {}
    if method.needs_hessian:
        from mulfree.data.text import load_corpus

        text = load_corpus(args.calib_data).train_text
        calib = calibration_ids(tokenizer, text, args.calib_samples, args.calib_seqlen, args.seed)
        extra["calibration"] = {"samples": args.calib_samples, "seqlen": args.calib_seqlen, "seed": args.seed,
                                "data": args.calib_data or "bundled", "true_sequential": args.true_sequential,
                                "tune_epochs": args.tune_epochs, "tune_lr": args.tune_lr,
                                "asymmetric": args.asymmetric,
                                "distill_epochs": args.distill_epochs, "distill_lr": args.distill_lr}
        metas = quantize_model(model, method, calib, true_sequential=args.true_sequential,
                               tune_epochs=args.tune_epochs, tune_lr=args.tune_lr, asymmetric=args.asymmetric,
                               distill_epochs=args.distill_epochs, distill_lr=args.distill_lr)
    else:
        metas = quantize_model(model, method)
    out = save_quantized(model, tokenizer, args.out, method, metas, extra)
    print(f"wrote {out} ({len(metas)} quantized layers, {method.name} {args.bits}-bit)")
    return 0
