"""MAC and parameter counts against hand counts."""
import pytest
import torch.nn.functional as F
from torch import nn

import svdtrain


class Known(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4, bias=False)
        self.fc = nn.Linear(8 * 5 * 5, 10)

    def forward(self, x):
        x = self.grouped(F.relu(self.conv(x)))
        return self.fc(x.flatten(1))


def test_known_model_macs_and_params():
    model = Known()
    conv = 10 * 10 * (3 * 3 * 3) * 8
    grouped = 5 * 5 * (2 * 3 * 3) * 8
    fc = 200 * 10
    assert svdtrain.count_macs(model, (1, 3, 10, 10)) == conv + grouped + fc
    assert svdtrain.count_macs(model, (3, 3, 10, 10)) == 3 * (conv + grouped + fc)
    assert svdtrain.count_params(model) == (8 * 27 + 8) + 8 * 2 * 9 + (200 * 10 + 10)


def test_factored_macs_follow_the_cost_formulas():
    model = svdtrain.decompose(Known(), mode="spatial")
    shape = (1, 3, 10, 10)
    assert svdtrain.count_macs(model, shape, cost="dense") == svdtrain.count_macs(Known(), shape)
    # conv: matrix (8*3) x (3*3), rank 9; 1x3 first over all 10 input rows, then 3x1
    conv_spatial = 10 * 10 * (3 * 3 * 9) + 10 * 10 * (3 * 9 * 8)
    fc_factored = 10 * (200 + 10)
    grouped = 5 * 5 * (2 * 3 * 3) * 8
    assert svdtrain.count_macs(model, shape, cost="factored") == conv_spatial + grouped + fc_factored
    svdtrain.prune(model, keep_energy=1.0)
    model.conv.set_active(model.conv.active & (model.conv.s.abs() >= model.conv.s.abs().sort().values[-2]))
    model.fc.set_active(model.fc.active & (model.fc.s.abs() >= model.fc.s.abs().max()))
    conv2 = 10 * 10 * (3 * 3 * 2) + 10 * 10 * (3 * 2 * 8)
    assert svdtrain.count_macs(model, shape) == conv2 + grouped + 1 * (200 + 10)


def test_strided_spatial_and_channel_costs():
    layer = svdtrain.SVDConv2d.from_conv(nn.Conv2d(4, 6, (3, 5), stride=2, padding=(1, 2)), mode="spatial")
    dense, factored = layer.macs((9, 11), rank=3)
    ho, wo = 5, 6
    assert dense == ho * wo * 15 * 4 * 6
    assert factored == 9 * wo * (5 * 4 * 3) + ho * wo * (3 * 3 * 6)
    layer = svdtrain.SVDConv2d.from_conv(nn.Conv2d(4, 6, 3, stride=2, padding=1))
    assert layer.macs((9, 11), rank=3) == (5 * 6 * 36 * 6, 5 * 6 * (36 * 3 + 3 * 6))


def test_bad_cost_name():
    with pytest.raises(ValueError, match="cost"):
        svdtrain.count_macs(Known(), (1, 3, 10, 10), cost="flops")


def test_linear_on_feature_maps_counts_every_position():
    # A Linear applied to N x H x W x C tensors (ConvNeXt/Swin style) runs once per position.
    model = nn.Sequential(nn.Linear(8, 6))
    dense = 2 * 3 * 3 * 8 * 6
    assert svdtrain.count_macs(model, (2, 3, 3, 8)) == dense
    svdtrain.decompose(model)
    assert svdtrain.count_macs(model, (2, 3, 3, 8), cost="dense") == dense
    assert svdtrain.count_macs(model, (2, 3, 3, 8), cost="factored") == 2 * 3 * 3 * 6 * (8 + 6)


class Audio(nn.Module):
    """Conv1d front end, an LSTM, a head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 8, 5, stride=2, padding=2)
        self.rnn = nn.LSTM(8, 6, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = self.conv(x).transpose(1, 2)          # (N, T, 8)
        out, _ = self.rnn(h)
        return self.head(out[:, -1])


def test_conv1d_and_lstm_are_counted_by_hand():
    x_len = 40
    t = 20  # conv output length
    conv = t * 8 * (2 * 5)
    lstm = t * (2 * 4 * 6 * (8 + 6) + 2 * 4 * 6 * (12 + 6))  # 2 directions, layer 1 input 8, layer 2 input 12
    head = 3 * 12
    assert svdtrain.count_macs(Audio(), (1, 2, x_len)) == conv + lstm + head
    assert svdtrain.count_macs(Audio(), (4, 2, x_len)) == 4 * (conv + lstm + head)


def test_conv_transpose_and_attention_are_counted_by_hand():
    up = nn.ConvTranspose2d(4, 3, 2, stride=2)
    assert svdtrain.count_macs(nn.Sequential(up), (1, 4, 5, 5)) == (4 * 5 * 5) * (3 * 2 * 2)
    attn = nn.MultiheadAttention(16, 4, batch_first=True)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    n, length, e = 2, 7, 16
    expected = n * (4 * length * e * e + 2 * length * length * e)  # q, k, v, out + two products
    assert svdtrain.count_macs(Block(), (n, length, e)) == expected


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, ids):
        return self.fc2(F.relu(self.fc1(self.embed(ids)))).mean(1)


def test_token_model_counts_prunes_and_exports_with_example_inputs():
    import torch
    ids = torch.randint(0, 50, (2, 9))
    model = Tokens()
    dense = 2 * 9 * (16 * 32 + 32 * 4)
    assert svdtrain.count_macs(model, example_inputs=ids) == dense
    svdtrain.decompose(model, init="svd")
    svdtrain.prune(model, macs_budget=0.5, example_inputs=ids)
    assert svdtrain.count_macs(model, example_inputs=ids) <= 0.5 * dense
    compact = svdtrain.export(model, example_inputs=ids)
    with torch.no_grad():
        assert torch.allclose(compact(ids), model(ids), atol=1e-5)
    with pytest.raises(ValueError, match="example_inputs"):
        svdtrain.count_macs(model)


class _TiedHead(nn.Module):
    """The output reuses the first layer's weight (a tied head): F.linear(..., a.weight.T)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 64, bias=False), nn.Linear(64, 64)

    def forward(self, x):
        return F.linear(self.b(self.a(x)), self.a.weight.T)


def test_a_tied_weight_read_is_not_counted_as_the_models_work(caplog):
    """Reading an SVD layer's .weight rebuilds U diag(s) V^T: that product is not the model's
    work (the dense model stores the weight, and the layer ships dense). By hand: a 32 x 64,
    b 64 x 64 + 64 x 64 bias-free product, tied 64 x 32, per row: 2048 + 4096 + 2048."""
    import torch
    torch.manual_seed(0)
    x = torch.randn(4, 32)
    dense = 4 * (2048 + 4096 + 2048)
    model = _TiedHead()
    assert svdtrain.count_macs(model, example_inputs=x) == dense
    svd = svdtrain.decompose(_TiedHead(), example_inputs=x)
    assert svdtrain.count_macs(svd, example_inputs=x, cost="dense") == dense
    assert svdtrain.count_macs(svd, example_inputs=x) == dense  # b's pair at full rank costs more: dense
    svdtrain.prune(svd, macs_budget=0.6, example_inputs=x)  # b alone can bring it there
    assert svdtrain.count_macs(svd, example_inputs=x) <= 0.6 * dense
    assert svdtrain.count_macs(svdtrain.export(svd, example_inputs=x), example_inputs=x) == \
        svdtrain.count_macs(svd, example_inputs=x)
    with caplog.at_level("WARNING", logger="svdtrain"):
        svdtrain.export(svdtrain.decompose(_TiedHead()))
    assert "no forward pass was profiled" in caplog.text


class _DtypeCheck(nn.Module):
    """Reads its layer's .weight for its dtype (as T5's feed-forward blocks do): the exported
    layer must keep a .weight, so it ships dense; decompose says so."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        return self.b(self.a(x.to(self.a.weight.dtype)))


def test_a_layer_whose_weight_is_read_ships_dense_and_is_named(caplog):
    import torch
    x = torch.randn(4, 32)
    with caplog.at_level("WARNING", logger="svdtrain"):
        svd = svdtrain.decompose(_DtypeCheck(), example_inputs=x)
    assert "1 SVD layers ship dense at any rank" in caplog.text and ": a" in caplog.text
    with pytest.raises(ValueError, match="1 SVD layers ship dense since other code reads their .weight"):
        svdtrain.prune(svd, macs_budget=0.2, example_inputs=x)
    svdtrain.prune(svd, macs_budget=0.6, example_inputs=x)
    compact = svdtrain.export(svd, example_inputs=x)
    assert type(compact.a) is nn.Linear and svdtrain.count_macs(compact, example_inputs=x) <= 0.6 * 2 * 4 * 1024


def test_tied_parameters_count_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(50, 16), nn.Linear(16, 50, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.embed(ids))

    assert svdtrain.count_params(Tied()) == 50 * 16


@pytest.mark.parametrize("extra", [{"add_bias_kv": True}, {"add_zero_attn": True}])
def test_attention_with_appended_keys_counts_them(extra):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, **extra)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    length, n, e = 5, 2, 16
    expected = n * (4 * length * e * e + 2 * length * (length + 1) * e)  # one key/value more
    assert svdtrain.count_macs(Block().eval(), (length, n, e)) == expected


def test_an_encoder_with_a_padding_mask_is_counted_in_eval():
    # PyTorch's fast path would run on nested tensors; counting turns it off for its pass only
    import torch
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2)

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = enc

        def forward(self, x, pad):
            return self.enc(x, src_key_padding_mask=pad)

    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, -2:] = True
    n, length, e, ff = 2, 5, 16, 32
    per_layer = n * (4 * length * e * e + 2 * length * length * e + 2 * length * e * ff)
    assert svdtrain.count_macs(Enc().eval(), example_inputs=(torch.randn(n, length, e), pad)) == 2 * per_layer
    assert torch.backends.mha.get_fastpath_enabled()


def test_a_pinned_pair_whose_weight_other_code_reads_ships_dense():
    import torch

    class TiedRead(nn.Module):  # reads its head's .weight, as a tied output head is read
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.head(self.fc(x)) + x @ self.head.weight

    model = svdtrain.decompose(TiedRead(), input_shape=(2, 8))
    model.head.set_form("factored")
    svdtrain.count_macs(model, (2, 8))
    compact = svdtrain.export(model, input_shape=(2, 8))
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x))
