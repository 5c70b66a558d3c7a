"""Loaded files: model configs, weights, tokenizers and checksum manifests of model dirs, quantized dirs, Hugging
Face dirs and GGUF files, with wrong JSON types, missing keys, huge values, lying headers, truncation, bit flips and
pickles (`damage.py` does the damage)."""

from __future__ import annotations

import struct

from hostile import Case
from hostile import damage as d

EVAL = ("eval", "--model", "{tmp}/model", "--data", "{data}")
QEVAL = ("eval", "--model", "{tmp}/q", "--data", "{data}")
GEN_PACKED = ("generate", "--engine", "packed", "--model", "{tmp}/packed", "--prompt", "x", "--max-new-tokens", "1")

M = ("model",)
_CONFIG = [  # (id, what, setup on {tmp}/model, expected error) for `eval --model {tmp}/model`
    ("cfg-not-json", "config.json that is not JSON", d.write("model/config.json", "{not json"), "not valid JSON"),
    ("cfg-empty", "an empty config.json", d.write("model/config.json", ""), "not valid JSON"),
    ("cfg-binary", "config.json of invalid UTF-8 bytes", d.write("model/config.json", b"\xff\xfe\x00garbage"), "not valid JSON"),
    ("cfg-deep", "config.json nested 100000 deep", d.write("model/config.json", "[" * 100000), "not valid JSON"),
    ("cfg-list", "config.json holding a JSON list", d.write("model/config.json", "[1, 2]"), "JSON object"),
    ("cfg-string", "config.json holding a JSON string", d.write("model/config.json", '"mmfree"'), "JSON object"),
    ("cfg-missing", "config.json deleted", d.delete("model/config.json"), "config.json is missing"),
    ("cfg-layers-huge", "num_hidden_layers: 100000000", d.set_json("model/config.json", num_hidden_layers=100_000_000),
     "num_hidden_layers"),
    ("cfg-vocab-float", "vocab_size: 1e11", d.set_json("model/config.json", vocab_size=1e11), "vocab_size"),
    ("cfg-vocab-huge", "vocab_size: 100000000000 (an integer)", d.set_json("model/config.json", vocab_size=10**11),
     "vocab_size"),
    ("cfg-hidden-string", 'hidden_size: "32"', d.set_json("model/config.json", hidden_size="32"), "hidden_size"),
    ("cfg-hidden-zero", "hidden_size: 0", d.set_json("model/config.json", hidden_size=0), "hidden_size"),
    ("cfg-hidden-negative", "hidden_size: -32", d.set_json("model/config.json", hidden_size=-32), "hidden_size"),
    ("cfg-layers-bool", "num_hidden_layers: true", d.set_json("model/config.json", num_hidden_layers=True),
     "num_hidden_layers"),
    ("cfg-layers-null", "num_hidden_layers: null", d.set_json("model/config.json", num_hidden_layers=None),
     "num_hidden_layers"),
    ("cfg-eps-nan", "rms_norm_eps: NaN", d.set_json("model/config.json", rms_norm_eps=float("nan")), "rms_norm_eps"),
    ("cfg-eps-negative", "rms_norm_eps: -1", d.set_json("model/config.json", rms_norm_eps=-1.0), "rms_norm_eps"),
    ("cfg-eps-string", 'rms_norm_eps: "tiny"', d.set_json("model/config.json", rms_norm_eps="tiny"), "rms_norm_eps"),
    ("cfg-intermediate-huge", "intermediate_size: 10^9", d.set_json("model/config.json", intermediate_size=10**9),
     "intermediate_size"),
    ("cfg-positions-negative", "max_position_embeddings: -1", d.set_json("model/config.json", max_position_embeddings=-1),
     "max_position_embeddings"),
    ("cfg-eos-beyond-vocab", "eos_token_id 999999 with vocab_size 300", d.set_json("model/config.json", eos_token_id=999999),
     "eos_token_id"),
    ("cfg-gate-number", "output_gate: 5", d.set_json("model/config.json", output_gate=5), "output_gate"),
    ("cfg-lower-bound-string", 'use_lower_bound: "yes"', d.set_json("model/config.json", use_lower_bound="yes"),
     "use_lower_bound"),
    ("cfg-unknown-field", "an unknown config field", d.set_json("model/config.json", evil=1), "unknown config fields"),
    ("cfg-memory-layers", "4096 layers of width 131072 (within each range, 100s of TiB in all)",
     d.set_json("model/config.json", hidden_size=131072, num_hidden_layers=4096), "memory"),
    ("cfg-memory-vocab", "vocab_size 4194304 x hidden_size 131072", d.set_json("model/config.json", vocab_size=4194304,
                                                                         hidden_size=131072), "memory"),
    ("cfg-model-type-list", "model_type: [1]", d.set_json("model/config.json", model_type=[1]), "cannot read"),
    ("cfg-model-type-unknown", "model_type: gpt5", d.set_json("model/config.json", model_type="gpt5"), "cannot read"),
    ("cfg-layers-lie", "num_hidden_layers 2 beside weights of 1 layer", d.set_json("model/config.json", num_hidden_layers=2),
     "does not match"),
    ("cfg-width-lie", "hidden_size 64 beside weights of width 32", d.set_json("model/config.json", hidden_size=64),
     "has shape"),
    ("cfg-edited-checksum", "a valid edit of a checksummed config.json", d.chain(
        d.manifest(), d.set_json("model/config.json", max_position_embeddings=32)), "checksum"),
]
_WEIGHTS = [
    ("weights-truncated-half", "model.safetensors cut in half", d.truncate("model/model.safetensors", 0.5), "cannot read"),
    ("weights-truncated-7", "model.safetensors cut to 7 bytes", d.truncate("model/model.safetensors", 7), "cannot read"),
    ("weights-empty", "an empty model.safetensors", d.write("model/model.safetensors", b""), "cannot read"),
    ("weights-header-length-lie", "a header length of 2^62 bytes",
     d.chain(d.flip("model/model.safetensors", 7, 6)), "cannot read"),
    ("weights-header-garbage", "a header that is not JSON", d.write("model/model.safetensors",
                                                                   struct.pack("<Q", 16) + b"{{{{{{{{{{{{{{{{"),
     "cannot read"),
    ("weights-offsets-lie", "a tensor whose data offsets run past the file",
     d.st_header("model/model.safetensors", lambda h: d.first_tensor(h).update(data_offsets=[0, 1 << 40])), "cannot read"),
    ("weights-dtype-int", "a float tensor relabelled as I32 (same size)",
     d.st_header("model/model.safetensors", lambda h: d.first_tensor(h).update(dtype="I32")), "floating-point"),
    ("weights-dtype-f16", "a float32 tensor relabelled as F16 (size disagrees)",
     d.st_header("model/model.safetensors", lambda h: d.first_tensor(h).update(dtype="F16")), "cannot read"),
    ("weights-shape-lie", "a tensor's shape reversed (same element count)",
     d.st_header("model/model.safetensors", lambda h: d.first_tensor(h, 2).update(shape=d.first_tensor(h, 2)["shape"][::-1])),
     "has shape"),
    ("weights-dtype-unknown", "an unknown dtype in the header",
     d.st_header("model/model.safetensors", lambda h: d.first_tensor(h).update(dtype="Q9")), "cannot read"),
    ("weights-bitflip", "one payload bit flipped (checksummed dir)", d.chain(d.manifest(), d.flip("model/model.safetensors")),
     "checksum"),
    ("weights-nan", "a weight overwritten with NaN (no checksum)", d.nan_first_weight("model/model.safetensors"), "NaN"),
    ("weights-missing", "model.safetensors deleted", d.delete("model/model.safetensors"), "missing"),
    ("weights-pickle", "model.safetensors replaced by a malicious pickle", d.write("model/model.safetensors", d.EVIL),
     "cannot read"),
    ("weights-extra-tensor", "an extra tensor in the header",
     d.st_header("model/model.safetensors", lambda h: h.update(evil={"dtype": "U8", "shape": [0], "data_offsets": [0, 0]})),
     "unexpected"),
    ("weights-dropped-tensor", "a weights file lacking one tensor", d.st_drop("model/model.safetensors", "o_proj.weight"),
     "missing"),
    ("weights-dropped-header-entry", "a tensor dropped from the header only (payload not covered)",
     d.st_header("model/model.safetensors", lambda h: h.pop(max(k for k in h if k != "__metadata__"))),
     "cannot read"),
]
_TOKENIZER = [
    ("tok-not-json", "tokenizer.json that is not JSON", d.write("model/tokenizer.json", "{oops"), "corrupt"),
    ("tok-list", "tokenizer.json holding a list", d.write("model/tokenizer.json", "[]"), "corrupt"),
    ("tok-empty", "an empty tokenizer.json", d.write("model/tokenizer.json", ""), "corrupt"),
    ("tok-id-beyond-vocab", "a token id 5000 with vocab_size 300", d.tokenizer_extra_id("model/tokenizer.json", 5000),
     "beyond the model's vocab_size"),
    ("tok-edited-checksum", "a checksummed tokenizer.json edited", d.chain(
        d.manifest(), d.tokenizer_extra_id("model/tokenizer.json", 298)), "checksum"),
]
_SUMS = [
    ("sums-not-json", "checksums.json that is not JSON", d.write("model/checksums.json", "{"), "checksums.json"),
    ("sums-list", "checksums.json holding a list", d.write("model/checksums.json", "[1]"), "file name -> digest"),
    ("sums-number", "a digest that is a number", d.write("model/checksums.json", '{"config.json": 5}'),
     "file name -> digest"),
    ("sums-wrong-digest", "a wrong digest for config.json",
     d.write("model/checksums.json", '{"config.json": "xxh3-64:0000000000000000"}'), "checksum"),
    ("sums-other-algorithm", "an md5 digest for the weights",
     d.write("model/checksums.json", '{"model.safetensors": "md5:d41d8cd98f00b204e9800998ecf8427e"}'), "checksum"),
    ("sums-binary", "checksums.json of invalid UTF-8", d.write("model/checksums.json", b"\xff\xfe"), "checksums.json"),
]
CASES = [Case(id_, what, EVAL, expect, copy=M, setup=setup) for id_, what, setup, expect in
         _CONFIG + _WEIGHTS + _TOKENIZER + _SUMS]
CASES += [
    Case("sums-outside-path", "checksums.json naming ../../etc/passwd (never read: model files only)", EVAL, None,
         copy=M, setup=d.write("model/checksums.json", '{"../../etc/passwd": "xxh3-64:0000000000000000"}')),
    Case("sums-valid", "a model dir with its checksums (as save_model writes) loads", EVAL, None, copy=M,
         setup=d.manifest()),
    Case("tok-beyond-vocab-generate", "generate with a tokenizer id beyond the vocabulary",
         ("generate", "--model", "{tmp}/model", "--prompt", "x"), "beyond the model's vocab_size", copy=M,
         setup=d.tokenizer_extra_id("model/tokenizer.json", 5000)),
    Case("tok-beyond-vocab-lmeval", "lm-eval with a tokenizer id beyond the vocabulary",
         ("lm-eval", "--model", "{tmp}/model", "--limit", "1"), "beyond the model's vocab_size", copy=M,
         setup=d.tokenizer_extra_id("model/tokenizer.json", 5000)),
]

_QDIR = [  # (id, what, setup, expected error) for `eval --model {tmp}/q`
    ("qdir-bits-edited", "bits 4 -> 3 everywhere in a checksummed quantized config (consistent edit)",
     d.qdir(d.edit_json("q/config.json", d.all_bits(3))), "checksum"),
    ("qdir-bits-edited-top", "bits 4 -> 3 in mulfree_quant only", d.qdir(d.edit_json(
        "q/config.json", lambda d: d["mulfree_quant"].update(bits=3))), "disagrees"),
    ("qdir-bits-out-of-range", "bits: 9 (no checksum)", d.qdir(d.qquant(bits=9)), "bits"),
    ("qdir-bits-string", 'bits: "4"', d.qdir(d.qquant(bits="4")), "bits"),
    ("qdir-bits-disagree", "a layer's bits 3 under the method's 4", d.qdir(d.qmeta(lambda m: m.update(bits=3))), "disagrees"),
    ("qdir-method-unknown", "quant_method: awq", d.qdir(d.qconf(quant_method="awq")), "quant_method"),
    ("qdir-quant-list", "mulfree_quant: []", d.qdir(d.qconf(mulfree_quant=[])), "mulfree_quant"),
    ("qdir-layers-empty", "no layer descriptions", d.qdir(d.qquant(layers={})), "layers"),
    ("qdir-layers-list", "layers as a list", d.qdir(d.qquant(layers=[1])), "layers"),
    ("qdir-group-size-string", 'group_size: "16"', d.qdir(d.qquant(group_size="16")), "group_size"),
    ("qdir-layer-not-module", "a layer named model.layers.9.mlp.up_proj (no such module)", d.qdir(d.edit_json(
        "q/config.json", lambda d: d["mulfree_quant"]["layers"].update({"model.layers.9.mlp.up_proj": next(iter(
            d["mulfree_quant"]["layers"].values()))})), d.delete("q/checksums.json")), "not a module"),
    ("qdir-layer-norm", "a layer description on a norm, not a linear", d.qdir(d.edit_json(
        "q/config.json", lambda d: d["mulfree_quant"]["layers"].update({"model.norm": next(iter(
            d["mulfree_quant"]["layers"].values()))})), d.delete("q/checksums.json")), "not a linear"),
    ("qdir-in-features-huge", "in_features: 10^9", d.qdir(d.qmeta(lambda m: m.update(in_features=10**9))), "in_features"),
    ("qdir-in-features-lie", "in_features 64 for a 32-wide linear", d.qdir(d.qmeta(lambda m: m.update(in_features=64))),
     "described as"),
    ("qdir-kind-wrong", "a shiftadd layer under rtn", d.qdir(d.qmeta(lambda m: m.update(kind="shiftadd"))), "kind"),
    ("qdir-kind-unknown", "layer kind: awq", d.qdir(d.qmeta(lambda m: m.update(kind="awq"))), "kind"),
    ("qdir-group-zero", "a layer group of 0", d.qdir(d.qmeta(lambda m: m.update(group=0))), "group"),
    ("qdir-group-wide", "a layer group wider than the layer", d.qdir(d.qmeta(lambda m: m.update(group=4096))), "wider"),
    ("qdir-bias-string", 'bias: "yes"', d.qdir(d.qmeta(lambda m: m.update(bias="yes"))), "bias"),
    ("qdir-meta-missing-key", "a layer description without out_features",
     d.qdir(d.qmeta(lambda m: m.pop("out_features"))), "out_features"),
    ("qdir-transform-unknown", "an unknown incoherence transform",
     d.qdir(d.qmeta(lambda m: m.update(incoherence={"transform": "rot", "block": 32, "seed": 0}))), "transform"),
    ("qdir-transform-seed", "an incoherence seed of -1",
     d.qdir(d.qmeta(lambda m: m.update(incoherence={"transform": "hadamard", "block": 32, "seed": -1}))), "seed"),
    ("qdir-transform-block", "a Hadamard block that does not fit the width",
     d.qdir(d.qmeta(lambda m: m.update(incoherence={"transform": "hadamard", "block": 8, "seed": 0}))), "block"),
    ("qdir-weights-truncated", "quantized model.safetensors cut in half",
     d.qdir(d.truncate("q/model.safetensors", 0.5), d.delete("q/checksums.json")), "cannot read"),
    ("qdir-weights-bitflip", "one bit flipped in checksummed quantized weights", d.qdir(d.flip("q/model.safetensors")),
     "checksum"),
    ("qdir-codes-beyond-bits", "a 4-bit code with its top bit set (no checksum)", d.qdir(d.qcodes_flip), "4-bit codes"),
    ("qdir-scale-nan", "a quantization scale of NaN (no checksum)",
     d.qdir(d.nan_first_weight("q/model.safetensors"), d.delete("q/checksums.json")), "NaN"),
    ("qdir-weights-dtype-lie", "codes relabelled I8 (size agrees, loads as another type)",
     d.qdir(d.st_header("q/model.safetensors", lambda h: next(v for k, v in sorted(h.items()) if k.endswith("codes")).update(
         dtype="I8")), d.delete("q/checksums.json")), None),
    ("qdir-weights-missing-tensor", "quantized weights lacking one layer's scales",
     d.qdir(d.st_drop("q/model.safetensors", "scale"), d.delete("q/checksums.json")), "does not match"),
    ("qdir-hidden-huge", "hidden_size 10^9 in the HF part", d.qdir(d.qconf(hidden_size=10**9)), "hidden_size"),
    ("qdir-layers-huge", "num_hidden_layers: 100000000", d.qdir(d.qconf(num_hidden_layers=100_000_000)), "num_hidden_layers"),
    ("qdir-vocab-float", "vocab_size: 1e11", d.qdir(d.qconf(vocab_size=1e11)), "vocab_size"),
    ("qdir-memory", "a config within every range that needs TiBs", d.qdir(d.qconf(hidden_size=65536, intermediate_size=1 << 20,
                                                                             num_hidden_layers=4096)), "memory"),
    ("qdir-config-not-json", "quantized config.json that is not JSON", d.qdir(d.write("q/config.json", "{")), "not valid JSON"),
    ("qdir-tokenizer-beyond", "a tokenizer id 5000 with vocab_size 300",
     d.qdir(d.tokenizer_extra_id("q/tokenizer.json", 5000), d.delete("q/checksums.json")), "beyond the model's vocab_size"),
    ("qdir-sums-list", "a quantized dir whose checksums.json is a list", d.qdir(d.write("q/checksums.json", "[]")),
     "file name -> digest"),
]
CASES += [Case(id_, what, QEVAL, expect, setup=setup) for id_, what, setup, expect in _QDIR]
CASES += [
    Case("qdir-valid", "an intact quantized dir loads and evaluates", QEVAL, None, setup=d.qdir()),
    Case("hf-pickle", "an HF dir with a malicious pytorch_model.bin (nothing is unpickled)",
         ("eval", "--model", "{tmp}/hf", "--data", "{data}"), "never loads pickles", setup=d.hf_pickle),
    Case("hf-weights-truncated", "an HF dir with truncated safetensors",
         ("eval", "--model", "{tmp}/hf", "--data", "{data}"), "cannot load",
         setup=d.qdir(d.truncate("hf/model.safetensors", 0.5), name="hf")),
    Case("hf-config-heads", "an HF config with a width not divisible by its heads",
         ("eval", "--model", "{tmp}/hf", "--data", "{data}"), "cannot read",
         setup=d.qdir(d.set_json("hf/config.json", num_attention_heads=5), name="hf")),
    Case("hf-config-layers-huge", "an HF config with num_hidden_layers 100000000",
         ("eval", "--model", "{tmp}/hf", "--data", "{data}"), "num_hidden_layers",
         setup=d.qdir(d.set_json("hf/config.json", num_hidden_layers=100_000_000), name="hf")),
]

_GGUF = [  # (id, what, setup, expected error) for `eval --model {tmp}/m.gguf`
    ("gguf-junk", "100 random bytes named m.gguf", d.write("m.gguf", bytes(range(100))), "not a GGUF file"),
    ("gguf-empty", "an empty m.gguf", d.write("m.gguf", b""), "not a GGUF file"),
    ("gguf-tensors-lie", "a GGUF header claiming 2^62 tensors", d.gguf_header(3, 1 << 62, 1), "invalid GGUF header"),
    ("gguf-kv-lie", "a GGUF header claiming 2^40 metadata keys", d.gguf_header(3, 1, 1 << 40), "invalid GGUF header"),
    ("gguf-version", "GGUF version 99", d.gguf_header(99, 1, 1), "invalid GGUF header"),
    ("gguf-header-only", "a valid GGUF header and nothing else", d.gguf_header(3, 1, 1), "cannot read"),
    ("gguf-truncated", "SmolLM2's GGUF cut to its first 64 KiB", d.gguf_truncated, "cannot read"),
]
CASES += [Case(id_, what, ("eval", "--model", "{tmp}/m.gguf", "--data", "{data}"), expect, setup=setup)
          for id_, what, setup, expect in _GGUF]
CASES += [
    Case("gguf-missing", "a .gguf path that does not exist", ("eval", "--model", "{tmp}/none.gguf"), "does not exist"),
    Case("gguf-quantize-junk", "quantize from a junk .gguf", ("quantize", "rtn", "--model", "{tmp}/m.gguf", "--bits",
                                                            "4", "--out", "{tmp}/out"), "not a GGUF file",
         setup=d.write("m.gguf", b"GGUX" + bytes(40))),
    Case("gguf-lmul-junk", "lmul eval on a junk .gguf", ("lmul", "eval", "--model", "{tmp}/m.gguf"), "not a GGUF file",
         setup=d.write("m.gguf", b"junk" * 10)),
]

_PACKED = [  # (id, what, config change, expected error) for `generate --engine packed`
    ("packed-layers-huge", "num_hidden_layers: 100000000", {"num_hidden_layers": 100_000_000}, "num_hidden_layers"),
    ("packed-vocab-float", "vocab_size: 1e11", {"vocab_size": 1e11}, "vocab_size"),
    ("packed-hidden-string", 'hidden_size: "32"', {"hidden_size": "32"}, "hidden_size"),
    ("packed-eps-string", 'rms_norm_eps: "x"', {"rms_norm_eps": "x"}, "rms_norm_eps"),
    ("packed-crc-string", 'crc32: "x"', {"crc32": "x"}, "crc32"),
    ("packed-format-number", "format: 2", {"format": 2}, "format"),
    ("packed-version-string", 'format_version: "1"', {"format_version": "1"}, "format_version"),
    ("packed-model-type", "model_type: transformerpp", {"model_type": "transformerpp"}, "model_type"),
    ("packed-memory", "4096 layers of width 131072", {"hidden_size": 131072, "num_hidden_layers": 4096}, "memory"),
    ("packed-lower-bound-string", 'use_lower_bound: "no"', {"use_lower_bound": "no"}, "use_lower_bound"),
    ("packed-eos-beyond", "eos_token_id 999999 with vocab_size 300", {"eos_token_id": 999999}, "eos_token_id"),
    ("packed-crc-null", "crc32: null", {"crc32": None}, "crc32"),
]
CASES += [Case(id_, what, GEN_PACKED, expect, copy=("packed",), setup=d.set_json("packed/config.json", **change))
                for id_, what, change, expect in _PACKED]
CASES += [
    Case("packed-config-list", "a packed config.json holding a list", GEN_PACKED, "JSON object", copy=("packed",),
         setup=d.write("packed/config.json", "[]")),
    Case("packed-tokenizer-beyond", "a packed dir whose tokenizer has id 5000 (vocab_size 300)", GEN_PACKED,
         "beyond the model's vocab_size", copy=("packed",), setup=d.tokenizer_extra_id("packed/tokenizer.json", 5000)),
]
CASES += [  # the packed engine packs an ordinary model dir in memory through the same weights reader
    Case("weights-bitflip-packed-engine", "generate --engine packed from a checksummed model dir with a flipped bit",
         ("generate", "--engine", "packed", "--model", "{tmp}/model", "--prompt", "x", "--max-new-tokens", "1"),
         "checksum", copy=("model",), setup=d.chain(d.manifest(), d.flip("model/model.safetensors"))),
]
