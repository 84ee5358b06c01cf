"""Attention in SVD form: nn.MultiheadAttention (bare and inside nn.TransformerEncoder), a
timm-style block with one qkv Linear, and code that reads `layer.weight`; exact at svd init,
trainable, and exported to plain torch layers with the pruned model's outputs."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import svdtrain
from svdtrain.attention import SVDMultiheadAttention
from svdtrain.models import build_model


def no_svdtrain_class(model: nn.Module) -> bool:
    return not any(type(m).__module__.startswith("svdtrain") for m in model.modules())


def roundtrip(model: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


class TimmBlock(nn.Module):
    """A timm-style ViT block: one qkv Linear, F.scaled_dot_product_attention, an MLP."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        n, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TiedHead(nn.Module):
    """A language-model-style head that reuses the input projection's weight."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 12)
        self.mix = nn.Linear(12, 12)

    def forward(self, x):
        h = torch.tanh(self.mix(self.proj(x)))
        return h @ self.proj.weight  # (.., 12) @ (12, 8)


def encoder(batch_first: bool) -> nn.Module:
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=batch_first).eval()


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_attention_in_svd_form_prunes_and_exports(batch_first):
    torch.manual_seed(0)
    ref = encoder(batch_first)
    svd = svdtrain.decompose(copy.deepcopy(ref), init="svd")
    attn = svd.layers[0].self_attn
    assert isinstance(attn, SVDMultiheadAttention) and isinstance(attn.q_proj, svdtrain.SVDLinear)
    x = torch.randn((3, 6, 16) if batch_first else (6, 3, 16))
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True
    keep = ~pad if batch_first else ~pad.T  # PyTorch's fused path returns zeros at padded tokens
    with torch.no_grad():
        assert torch.allclose(svd(x), ref(x), atol=1e-5)
        assert torch.allclose(svd(x, src_key_padding_mask=pad)[keep], ref(x, src_key_padding_mask=pad)[keep], atol=1e-5)
    svd.train()
    reg = svdtrain.Regularizer(orth=1.0, sparsity="hoyer", strength=0.01)
    (svd(x, src_key_padding_mask=pad).square().mean() + reg(svd)).backward()
    assert attn.k_proj.U.grad is not None and attn.v_proj.s.grad is not None
    svd.eval()
    svdtrain.prune(svd, macs_budget=0.5, example_inputs=(x,))
    assert svdtrain.count_macs(svd, example_inputs=(x,)) <= 0.5 * svdtrain.count_macs(ref, example_inputs=(x,))
    with torch.no_grad():
        want = svd(x, src_key_padding_mask=pad)
        compact = svdtrain.export(svd, example_inputs=(x,))
        assert no_svdtrain_class(compact)
        assert torch.allclose(compact(x, src_key_padding_mask=pad), want, atol=1e-5)
        assert torch.allclose(roundtrip(compact)(x, src_key_padding_mask=pad), want, atol=1e-5)
    # what ships is counted as the SVD form counted it, attention products included
    for shipped in (compact, roundtrip(compact)):
        assert svdtrain.count_macs(shipped, example_inputs=(x,)) == svdtrain.count_macs(svd, example_inputs=(x,))
    program = torch.export.export(compact, (x,), kwargs={"src_key_padding_mask": pad})
    assert torch.allclose(program.module()(x, src_key_padding_mask=pad), want, atol=1e-5)


def test_bare_multihead_attention_masks_weights_kdim_vdim_and_unbatched():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, kdim=8, vdim=12).eval()
    svd = SVDMultiheadAttention.from_mha(mha).eval()
    q, k, v = torch.randn(5, 2, 16), torch.randn(7, 2, 8), torch.randn(7, 2, 12)
    attn_mask = torch.rand(5, 7) > 0.7
    attn_mask[:, 0] = False  # no row fully masked
    per_head = torch.randn(2 * 4, 5, 7)
    pad = torch.tensor([[False] * 7, [False] * 5 + [True] * 2])
    calls = [dict(attn_mask=attn_mask), dict(attn_mask=per_head, average_attn_weights=False),
             dict(key_padding_mask=pad, need_weights=False), dict(key_padding_mask=pad, attn_mask=attn_mask)]
    with torch.no_grad():
        for kw in calls:
            (a, wa), (b, wb) = mha(q, k, v, **kw), svd(q, k, v, **kw)
            assert torch.allclose(a, b, atol=1e-5)
            assert (wa is None and wb is None) or torch.allclose(wa, wb, atol=1e-6)
        (a, wa), (b, wb) = mha(q[:, 0], k[:, 0], v[:, 0]), svd(q[:, 0], k[:, 0], v[:, 0])
        assert torch.allclose(a, b, atol=1e-5) and torch.allclose(wa, wb, atol=1e-6)
    with pytest.raises(RuntimeError, match="is_causal"):
        svd(q, k, v, is_causal=True)
    svdtrain.prune(svd, keep_energy=0.8)
    with torch.no_grad():
        want = svd(q, k, v, attn_mask=attn_mask)
        plain = svdtrain.export(nn.Sequential(svd), trace=False)[0]
        assert no_svdtrain_class(plain)
        got = plain(q, k, v, attn_mask=attn_mask)
    assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1], want[1], atol=1e-6)


def test_attention_that_ships_dense_exports_as_nn_multihead_attention():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    model = svdtrain.decompose(nn.Sequential(copy.deepcopy(mha)))
    plain = svdtrain.export(model, trace=False)[0]  # full rank: every projection ships dense
    assert type(plain) is nn.MultiheadAttention
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.allclose(plain(x, x, x)[0], mha(x, x, x)[0], atol=1e-5)


def test_attention_with_bias_kv_stays_dense_with_a_warning(caplog):
    model = nn.Sequential(nn.MultiheadAttention(16, 4, add_bias_kv=True))
    with caplog.at_level("WARNING", logger="svdtrain"):
        svdtrain.decompose(model)
    assert type(model[0]) is nn.MultiheadAttention and "add_bias_kv" in caplog.text


def test_attention_products_are_counted_in_both_forms():
    torch.manual_seed(0)
    ref = encoder(True)
    x = torch.randn(2, 6, 16)
    svd = svdtrain.decompose(copy.deepcopy(ref))
    products = 2 * 2 * (2 * 6 * 6 * 16)  # 2 layers x batch 2 x (scores + weights @ v)
    dense = svdtrain.count_macs(ref, example_inputs=(x,))
    assert svdtrain.count_macs(svd, example_inputs=(x,), cost="dense") == dense
    linear = sum(2 * 6 * m.in_features * m.out_features for m in svd.modules() if isinstance(m, svdtrain.SVDLinear))
    assert dense == linear + products


def test_timm_style_block_and_weight_reading_head():
    torch.manual_seed(0)
    for ref, x in ((TimmBlock(), torch.randn(2, 5, 16)), (TiedHead(), torch.randn(3, 8))):
        ref.eval()
        svd = svdtrain.decompose(copy.deepcopy(ref))
        with torch.no_grad():
            assert torch.allclose(svd(x), ref(x), atol=1e-5)
        svd.train()
        (svd(x).square().mean() + svdtrain.Regularizer(orth=1.0, sparsity="l1", strength=0.01)(svd)).backward()
        assert all(m.U.grad is not None for _, m in svdtrain.svd_layers(svd))
        svd.eval()
        svdtrain.prune(svd, keep_energy=0.7)
        with torch.no_grad():
            want = svd(x)
            compact = svdtrain.export(svd, example_inputs=(x,))
            assert no_svdtrain_class(compact) and torch.allclose(compact(x), want, atol=1e-5)
        assert torch.allclose(torch.export.export(compact, (x,)).module()(x), want, atol=1e-5)


def test_vit_model_decomposes_exactly():
    torch.manual_seed(0)
    ref = build_model("vit", 10).eval()
    svd = svdtrain.decompose(copy.deepcopy(ref))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(svd(x), ref(x), atol=1e-4)
    assert sum(isinstance(m, SVDMultiheadAttention) for m in svd.modules()) == len(ref.encoder.layers)
