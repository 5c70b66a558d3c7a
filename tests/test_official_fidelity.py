"""Converted official checkpoints against an independent reference of the official hgrn_bit forward.

The reference below is plain torch written from the official code (`mmfreelm` master: FusedBitLinear,
HGRNBitAttention, HGRNBitMLP, HGRNBitBlock, HGRNBitModel); it imports nothing from mulfree. The fixture has
the quirks a faithful loader must reproduce: `rms_norm_eps` 1e-5 (BitLinears still normalise at 1e-6),
two heads, and a batch with right padding and a hole in the mask.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mulfree.models.io import load_model
from mulfree.models.official import convert_official

VOCAB, D, LAYERS, INTER, HEADS, EPS = 67, 32, 3, 48, 2, 1e-5
CONFIG = {
    "model_type": "hgrn_bit", "architectures": ["HGRNBitForCausalLM"], "vocab_size": VOCAB, "hidden_size": D,
    "num_hidden_layers": LAYERS, "hidden_ratio": 4, "intermediate_size": INTER, "attn_mode": "fused_recurrent",
    "num_heads": HEADS, "expand_ratio": 1, "use_short_conv": False, "conv_size": 4, "share_conv_kernel": True,
    "use_lower_bound": True, "hidden_act": "swish", "max_position_embeddings": 16, "rms_norm_eps": EPS,
    "use_cache": True, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    "initializer_range": 0.02, "fuse_cross_entropy": True, "torch_dtype": "bfloat16", "transformers_version": "4.40.2",
}


# ---- independent reference of the official forward (fp32) --------------------------------------------
def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def bit_linear(sd, name, x):
    """FusedBitLinear: RMSNorm at the kernel's default eps 1e-6 (never the config's), per-token absmax int8
    activations, per-tensor absmean ternary weights, then F.linear(q / s_a, t / s_w). The product is summed
    here as integers, (q · tᵀ) / (s_a · s_w): the exact value of that F.linear, free of summation-order noise."""
    x = rms(x, sd[name + ".norm.weight"], 1e-6)
    s_a = 127.0 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    q = (x * s_a).round().clamp(-128, 127)
    w = sd[name + ".weight"]
    s_w = 1.0 / w.abs().mean().clamp(min=1e-5)
    t = (w * s_w).round().clamp(-1, 1)
    return (q @ t.T) / (s_a * s_w)


def hgrn_bit_attention(sd, p, x, layer, lower_bound, mask):
    f = torch.sigmoid(bit_linear(sd, p + "f_proj", x))
    if lower_bound is not None and layer > 0:
        f = lower_bound + (1 - lower_bound) * f
    i = F.silu(bit_linear(sd, p + "i_proj", x)) * (1 - f)  # swiglu(i, 1 - f)
    if mask is not None:
        i = i * mask.unsqueeze(-1)  # the official layer masks the input gate only
    B, T, _ = x.shape
    i, f = (t.view(B, T, HEADS, D // HEADS).transpose(1, 2) for t in (i, f))  # b l (h d) -> b h l d
    h = torch.zeros(B, HEADS, D // HEADS)
    outs = []
    for t in range(T):  # fused_recurrent_hgrn: h_t = f_t * h_{t-1} + i_t
        h = f[:, :, t] * h + i[:, :, t]
        outs.append(h)
    o = torch.stack(outs, 2).transpose(1, 2).reshape(B, T, D)
    g = bit_linear(sd, p + "g_proj", x)
    o = rms(g, sd[p + "g_norm.weight"], EPS) * o * torch.sigmoid(o)  # FusedRMSNormSwishGate(g, o)
    return bit_linear(sd, p + "o_proj", o)


def official_forward(sd, ids, mask=None):
    h = sd["model.embeddings.weight"][ids]
    lb = sd["model.lower_bounds"].softmax(0)
    lb = lb.cumsum(0) - lb[0]
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        residual = h
        a = hgrn_bit_attention(sd, p + "attn.", rms(h, sd[p + "attn_norm.weight"], EPS), layer, lb[layer], mask)
        residual = residual + a  # mlp_norm(hidden, residual, prenorm=True): add, then normalise
        gate, up = bit_linear(sd, p + "mlp.gate_proj", rms(residual, sd[p + "mlp_norm.weight"], EPS)).chunk(2, -1)
        h = residual + bit_linear(sd, p + "mlp.down_proj", F.silu(gate) * up)
    return bit_linear(sd, "lm_head", rms(h, sd["model.norm.weight"], EPS))


# ---- the fixture ----------------------------------------------------------------------------------------
def official_state(seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    sd = {"model.embeddings.weight": randn(VOCAB, D, std=0.02), "model.lower_bounds": randn(LAYERS, D),
          "model.norm.weight": 1 + randn(D, std=0.2), "lm_head.weight": randn(VOCAB, D, std=0.02),
          "lm_head.norm.weight": 1 + randn(D, std=0.2)}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        sd[p + "attn_norm.weight"] = 1 + randn(D, std=0.2)
        sd[p + "mlp_norm.weight"] = 1 + randn(D, std=0.2)
        sd[p + "attn.g_norm.weight"] = 1 + randn(D, std=0.2)
        for name, (n, k) in {"attn.i_proj": (D, D), "attn.f_proj": (D, D), "attn.g_proj": (D, D), "attn.o_proj": (D, D),
                             "mlp.gate_proj": (2 * INTER, D), "mlp.down_proj": (D, INTER)}.items():
            sd[p + name + ".weight"] = randn(n, k, std=0.02)
            sd[p + name + ".norm.weight"] = 1 + randn(k, std=0.2)
    # Released weights are bf16: round once, and let both sides compute from the same fp32 values.
    return {k: v.to(torch.bfloat16) for k, v in sd.items()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    src = root / "src"
    src.mkdir()
    state = official_state()
    save_file(state, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(CONFIG))
    convert_official(src, root / "ours")
    model, _ = load_model(root / "ours")
    return model, {k: v.float() for k, v in state.items()}


def _batch():
    ids = torch.randint(3, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 12)
    mask[0, 9:] = 0  # right padding
    mask[1, 4:6] = 0  # a hole
    mask[2, :3] = 0  # left padding
    return ids, mask


@torch.no_grad()
def test_converted_model_matches_the_official_forward(converted):
    model, sd = converted
    ids, mask = _batch()
    assert model.config.bitlinear_eps == 1e-6 and model.config.rms_norm_eps == EPS
    unmasked = (model(ids)[0] - official_forward(sd, ids)).abs().max().item()
    masked = (model(ids, mask=mask.bool())[0] - official_forward(sd, ids, mask)).abs().max().item()
    print(f"max |logits - official| unmasked {unmasked:.2e}, right padding + hole + left padding {masked:.2e}")
    assert unmasked <= 1e-5 and masked <= 1e-5


@torch.no_grad()
def test_the_fixture_detects_the_old_behaviour(converted):
    """The BitLinear eps and the mask rule both show in this fixture (so the test above can fail)."""
    model, sd = converted
    ids, mask = _batch()
    ref = official_forward(sd, ids, mask)
    for module in model.modules():
        if hasattr(module, "mask_mode"):
            module.mask_mode = "skip"  # the old rule: padding also freezes the forget gate
    try:
        assert (model(ids, mask=mask.bool())[0] - ref).abs().max() > 1e-3
    finally:
        for module in model.modules():
            if hasattr(module, "mask_mode"):
                module.mask_mode = "official"
    norms = [m for name, m in model.named_modules() if name.endswith("_proj.norm") or name == "lm_head.norm"]
    for m in norms:
        m.eps = EPS  # the old behaviour: rms_norm_eps in every BitLinear
    try:
        assert (model(ids)[0] - official_forward(sd, ids)).abs().max() > 1e-3
    finally:
        for m in norms:
            m.eps = 1e-6


@torch.no_grad()
def test_state_after_padding_and_holes_continues_as_the_official_layer(converted):
    """Decoding after a right-padded or holed prompt carries the official (decayed) state."""
    model, sd = converted
    ids, mask = _batch()
    _, state = model(ids, mask=mask.bool())
    nxt = torch.randint(3, VOCAB, (3, 2), generator=torch.Generator().manual_seed(2))
    step = model(nxt, state=state)[0]
    full = official_forward(sd, torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones(3, 2)], 1))[:, -2:]
    assert (step - full).abs().max().item() <= 1e-5


@torch.no_grad()
def test_skip_mode_makes_padding_invisible(converted):
    """mask_mode "skip" (the option): a holed or right-padded sequence computes what the sequence without the
    padded tokens computes, state included."""
    model, _ = converted
    for module in model.modules():
        if hasattr(module, "mask_mode"):
            module.mask_mode = "skip"
    try:
        ids, mask = _batch()
        logits, state = model(ids[1:2], mask=mask[1:2].bool())
        keep = mask[1].bool()
        plain, plain_state = model(ids[1:2, keep])
        torch.testing.assert_close(logits[:, keep], plain, rtol=0, atol=1e-5)
        for a, b in zip(state, plain_state):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    finally:
        for module in model.modules():
            if hasattr(module, "mask_mode"):
                module.mask_mode = "official"


def test_transformers_wrapper_applies_the_official_mask(converted):
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from mulfree.models.hf import to_hf

    model, sd = converted
    ids, mask = _batch()
    with torch.no_grad():
        logits = to_hf(model)(ids, attention_mask=mask.long()).logits
        assert (logits - official_forward(sd, ids, mask)).abs().max().item() <= 1e-5
