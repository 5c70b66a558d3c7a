"""`LlamaLM`, our forward of transformers' Llama (and of Mistral and Qwen2 without a sliding window): its logits
equal the transformers model's (prefill, cached decode, batched decode of rows' own caches); on a Llama whose projections are all Latency-mode ShiftAdd layers the native
one-call decode step (`_cpu.ShiftAddLlama`) equals the torch forward step after step, through KV buffer growth,
forks from older states and states it did not make."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mulfree.infer.kv_batch import decode_kv_batch
from mulfree.kernels import available_backends
from mulfree.models.llama import LlamaLM, supports
from mulfree.ops.hadamard import RandomHadamard
from mulfree.ops.powers import apot_round
from mulfree.quant.qlinear import ShiftAddLinear

PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
               ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def _llama(layers: int = 2, arch: str = "llama", **extra):
    """A tiny random Llama, Mistral or Qwen2 (its q, k, v biases made non-zero, so a dropped bias shows)."""
    torch.manual_seed(0)
    config, model = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                     "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
                     "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    kwargs = {"sliding_window": None} if arch == "mistral" else {}
    hf = model(config(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.2, **{**kwargs, **extra})).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.5)
    return hf


def _lut_llama(group: int, incoherent: bool, arch: str = "llama"):
    """A tiny Llama (or Qwen2: biased q, k, v) whose 7 projections per block are random Latency-mode ShiftAdd
    layers."""
    hf = _llama(arch=arch)
    gen = torch.Generator().manual_seed(1)
    for layer in hf.model.layers:
        for part, name in PROJECTIONS:
            old = getattr(getattr(layer, part), name)
            k, n = old.in_features, old.out_features
            new = ShiftAddLinear(k, n, old.bias is not None, bits=3, group=group, col_group=8, terms=3)
            if old.bias is not None:
                new.bias.copy_(old.bias)
            c, ng = -(-k // 8), -(-n // group)
            new.planes.copy_(torch.randint(0, 256, (3, n, c), dtype=torch.uint8, generator=gen))
            _, exps, signs = apot_round(torch.rand(c, ng, 3, generator=gen) * 0.2 + 0.05, 3)
            new.exps.copy_(exps), new.signs.copy_(signs)
            if incoherent:
                new.rht, new.rht_out = RandomHadamard(k, 7), RandomHadamard(n, 8)
            setattr(getattr(layer, part), name, new)
    return hf


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_lean_forward_equals_transformers_in_prefill_decode_and_batches_of_rows(arch):
    hf = _llama(arch=arch)
    model = LlamaLM(hf)
    assert supports(hf) and model.native is None  # dense projections: the torch forward
    x = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        ref = hf(x).logits
        logits, cache = model(x[:, :6])
        torch.testing.assert_close(logits, ref[:, :6], rtol=1e-5, atol=1e-5)
        for t in range(6, 11):
            logits, cache = model(x[:, t : t + 1], cache)
            torch.testing.assert_close(logits[:, 0], ref[:, t], rtol=1e-5, atol=1e-5)
        assert cache[0][0].shape == (2, 2, 11, 8)
        prompts = [torch.randint(0, 300, (n,)) for n in (3, 9, 1)]
        caches = [model(p[None])[1] for p in prompts]
        batched, grown = decode_kv_batch(model, [5, 17, 250], caches)
        again, _ = decode_kv_batch(model, [7, 7, 7], grown)  # the rows' caches now grow in place
        for b, (p, n) in enumerate(zip(prompts, [5, 17, 250])):
            full = hf(torch.cat([p, torch.tensor([n, 7])])[None]).logits[0]
            torch.testing.assert_close(batched[b], full[-2], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(again[b], full[-1], rtol=1e-5, atol=1e-5)
            assert torch.isfinite(batched[b]).all()


def test_other_architectures_and_sliding_windows_are_not_taken():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    assert not supports(gpt2)
    with pytest.raises(ValueError, match="LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        LlamaLM(gpt2)
    assert not supports(_llama(1, "mistral", sliding_window=8))  # a window: transformers' forward runs it
    assert not supports(_llama(1, "qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0))
    assert supports(_llama(1, "qwen2")) and any(p.endswith("q_proj.bias") for p, _ in _llama(1, "qwen2").named_parameters())


@pytest.mark.skipif("scalar" not in available_backends(), reason="extension not built")
@pytest.mark.parametrize("group,incoherent,arch", [(16, True, "llama"), (16, False, "llama"), (128, True, "llama"),
                                                   (16, True, "qwen2")])
def test_native_decode_equals_the_torch_step(group, incoherent, arch):
    hf = _lut_llama(group, incoherent, arch)
    native = LlamaLM(hf)
    ref = LlamaLM(hf)
    ref.native = None
    assert native.native is not None
    ids = torch.randint(0, 300, (1, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, sa = native(ids[:, :5])
        b, sb = ref(ids[:, :5])
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # prefill: the same torch forward
        for t in range(5, 80):  # past the first buffer (64 positions): one growth
            a, sa = native(ids[:, t : t + 1], sa)
            b, sb = ref(ids[:, t : t + 1], sb)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        for (ka, va), (kb, vb) in zip(sa, sb):
            assert ka.shape == kb.shape == (1, 2, 80, 8)
            torch.testing.assert_close(ka, kb, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif("scalar" not in available_backends(), reason="extension not built")
def test_native_decode_forks_and_foreign_states():
    """Stepping twice from the same state (a retry, a fork) gives the same logits and leaves the newer state's
    cache as it was; a state made by another model instance is copied in, not written through."""
    hf = _lut_llama(16, True)
    model = LlamaLM(hf)
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        _, s0 = model(ids[:, :8])
        first, s1 = model(ids[:, 8:9], s0)
        kept = [(k.clone(), v.clone()) for k, v in s1]
        again, _ = model(ids[:, 8:9], s0)
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        for (k, v), (kk, vv) in zip(s1, kept):
            assert torch.equal(k, kk) and torch.equal(v, vv)
        other = LlamaLM(hf)
        theirs, _ = other(ids[:, 8:9], s0)
        torch.testing.assert_close(theirs, first, rtol=0, atol=0)
        assert s0[0][0].shape[2] == 8


@pytest.mark.skipif("scalar" not in available_backends(), reason="extension not built")
def test_threads_decoding_through_one_model_get_their_own_sequences():
    """The native decoder's KV buffers are one model's: four threads generating at once took each other's (and
    wrote the others' keys) before steps took turns."""
    import threading

    from mulfree.generation import generate

    model = LlamaLM(_lut_llama(16, False))
    prompts = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 9, 17, 30)]
    alone = [generate(model, p, 24) for p in prompts]
    together: list[list[torch.Tensor]] = [[] for _ in prompts]

    def run(i: int) -> None:
        for _ in range(3):
            together[i].append(generate(model, prompts[i], 24))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, outs in zip(alone, together):
        assert len(outs) == 3 and all(torch.equal(o, a) for o in outs)


@pytest.mark.skipif("scalar" not in available_backends(), reason="extension not built")
def test_native_decoder_rejects_shapes_that_do_not_fit():
    from mulfree.kernels import cpu_module

    hf = _lut_llama(16, True)
    blocks = [[getattr(getattr(layer, part), name).kernel_weights().handle() for part, name in PROJECTIONS]
              for layer in hf.model.layers]
    norms = [[layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()]
             for layer in hf.model.layers]
    make = cpu_module().ShiftAddLlama
    make(blocks, norms, 32, 4, 2, 8, 1e-6, 8**-0.5)  # the model's own shape
    for shape, message in (((32, 3, 2, 8), "kv_heads must divide"), ((32, 4, 4, 8), "output width"),
                           ((40, 4, 2, 8), "width")):
        with pytest.raises(ValueError, match=message):
            make(blocks, norms, *shape, 1e-6, 0.1)
    with pytest.raises(ValueError, match="7 projections"):
        make([b[:6] for b in blocks], norms, 32, 4, 2, 8, 1e-6, 0.1)
