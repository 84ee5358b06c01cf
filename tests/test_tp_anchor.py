"""benchmarks/tp_anchor.py: Torch-Pruning's channel-pruned models of the four deploy families
(tiny configs) run, keep their output shape, sit at the MACs level by svdtrain's count and by
PyTorch's FLOP counter, decode with a KV cache (Llama) and export to ONNX Runtime's outputs."""
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import svdtrain

pytest.importorskip("torch_pruning")
T = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from deploy import Logits, decode_step  # noqa: E402
from tp_anchor import torch_pruned  # noqa: E402


def tiny(name):
    torch.manual_seed(0)
    ids = torch.randint(2, 97, (2, 24))
    if name == "vit":
        return T.ViTForImageClassification(T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                       intermediate_size=128, image_size=32, patch_size=8,
                                                       num_labels=10)), (torch.randn(2, 3, 32, 32),)
    if name == "bert":  # 8 heads: whole-head steps fine enough for the 0.5 +- 0.02 window
        return T.BertForSequenceClassification(T.BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                                            num_attention_heads=8, vocab_size=97)), (ids,)
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                                num_attention_heads=8, num_key_value_heads=8, vocab_size=97,
                                                max_position_embeddings=64)), (ids,)
    return T.ResNetForImageClassification(T.ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256],
                                                         depths=[1, 1, 1, 1], layer_type="bottleneck",
                                                         num_labels=10)), (torch.randn(2, 3, 32, 32),)


def torch_macs(model, inputs) -> int:
    """PyTorch's own count (math attention backend), FLOPs / 2."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        Logits(model)(*inputs)
    return counter.get_total_flops() // 2


@pytest.fixture(scope="module")
def pruned():
    """name -> (dense, inputs, pruned, MACs ratio), each pruned to half the dense MACs."""
    out = {}
    for name in ("vit", "bert", "llama", "resnet"):
        model, inputs = tiny(name)
        out[name] = (model.eval(), inputs, *torch_pruned(name, model.eval(), inputs, 0.5))
    return out


@pytest.mark.parametrize("name", ["vit", "bert", "llama", "resnet"])
def test_pruned_runs_at_the_level_by_both_counts(pruned, name):
    dense, inputs, small, ratio = pruned[name]
    assert small is not dense and abs(ratio - 0.5) <= 0.02
    with torch.no_grad():
        assert Logits(small)(*inputs).shape == Logits(dense)(*inputs).shape
    ours = svdtrain.count_macs(small, example_inputs=inputs), svdtrain.count_macs(dense, example_inputs=inputs)
    theirs = torch_macs(small, inputs), torch_macs(dense, inputs)
    assert ours[0] / ours[1] == pytest.approx(ratio)
    assert ours[0] == pytest.approx(theirs[0], rel=0.01) and ours[1] == pytest.approx(theirs[1], rel=0.01)
    assert theirs[0] / theirs[1] == pytest.approx(ratio, rel=0.01)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in dense.parameters())


def test_pruned_llama_decodes_with_a_kv_cache(pruned):
    _, (ids,), small, _ = pruned["llama"]
    with torch.no_grad():
        step = decode_step(small, ids)
        token = small(ids, use_cache=False).logits[:, -1:].argmax(-1)
        want = small(torch.cat([ids, token], 1), use_cache=False).logits[:, -1:]
        assert torch.allclose(step(), want, atol=1e-4) and torch.allclose(step(), want, atol=1e-4)


@pytest.mark.parametrize("name", ["vit", "bert", "llama", "resnet"])
def test_pruned_exports_to_onnx_runtime(pruned, name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    _, inputs, small, _ = pruned[name]
    path = svdtrain.export_onnx(Logits(small), inputs, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = torch.from_numpy(session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})[0])
    with torch.no_grad():
        assert (got - Logits(small)(*inputs)).abs().max() < 1e-4
