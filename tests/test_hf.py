"""Hugging Face models built from their configs (no weights): GPT-2's Conv1D in SVD form, every
matmul counted against PyTorch's own counter, save/load beside the base model, generate() on the
compact model, and SVD training inside transformers.Trainer."""
import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import svdtrain

T = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def torch_macs(model, *inputs) -> int:
    """PyTorch's own count (math attention backend), FLOPs / 2."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops() // 2


def gpt2():
    cfg = T.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=64, bos_token_id=0,
                       eos_token_id=1, pad_token_id=1)
    return T.GPT2LMHeadModel(cfg).eval()


def small(name):
    torch.manual_seed(0)
    ids = torch.randint(2, 97, (2, 24))
    if name == "gpt2":
        return gpt2(), (ids,)
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                                num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval(), (ids,)
    if name == "bert":
        return T.BertForSequenceClassification(T.BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                                            num_attention_heads=4, vocab_size=97)).eval(), (ids,)
    if name == "falcon":  # its FalconLinear is an nn.Linear subclass with a Linear's forward
        return T.FalconForCausalLM(T.FalconConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                                  vocab_size=97, bos_token_id=0, eos_token_id=1)).eval(), (ids,)
    return T.ViTForImageClassification(T.ViTConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                                   num_attention_heads=4, image_size=32, patch_size=8,
                                                   num_labels=10)).eval(), (torch.randn(2, 3, 32, 32),)


def logits(model, inputs):
    with torch.no_grad():
        return model(*inputs).logits


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "vit", "falcon"])
def test_every_matmul_counted_dense_and_after_prune_and_export(name):
    model, inputs = small(name)
    dense = torch_macs(model, *inputs)
    assert svdtrain.count_macs(model, example_inputs=inputs) == pytest.approx(dense, rel=0.01)
    svd = svdtrain.decompose(copy.deepcopy(model), example_inputs=inputs)
    assert torch.allclose(logits(svd, inputs), logits(model, inputs), atol=1e-4)
    svdtrain.prune(svd, macs_budget=0.6, example_inputs=inputs)
    compact = svdtrain.export(svd, example_inputs=inputs)
    shipped = torch_macs(compact, *inputs)
    assert svdtrain.count_macs(compact, example_inputs=inputs) == pytest.approx(shipped, rel=0.01)
    assert shipped <= 0.6 * dense * 1.01
    assert torch.allclose(logits(compact, inputs), logits(svd, inputs), atol=1e-4)


def test_gpt2_conv1d_is_a_layer_kind():
    model, inputs = small("gpt2")
    n_conv1d = sum(isinstance(m, Conv1D) for m in model.modules())
    svd = svdtrain.decompose(copy.deepcopy(model))
    assert n_conv1d == 8 and not any(isinstance(m, Conv1D) for m in svd.modules())
    c_attn = svd.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, svdtrain.SVDLinear) and (c_attn.in_features, c_attn.out_features) == (64, 192)
    ref = model.transformer.h[0].attn.c_attn
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        assert torch.allclose(c_attn(x), ref(x), atol=1e-5)


def test_save_pretrained_and_from_pretrained_beside_the_base_model(tmp_path):
    model, inputs = small("gpt2")
    svd = svdtrain.decompose(copy.deepcopy(model))
    svdtrain.prune(svd, macs_budget=0.6, example_inputs=inputs)
    svd.transformer.h[1].mlp.c_fc.set_form("factored")
    svdtrain.save_pretrained(svd, tmp_path / "svd")
    torch.manual_seed(1)  # another random base: everything comes from the directory
    loaded = svdtrain.from_pretrained(gpt2(), tmp_path / "svd")
    assert svdtrain.ranks(loaded) == svdtrain.ranks(svd)
    assert loaded.transformer.h[1].mlp.c_fc.plan.form == "factored"
    assert torch.equal(logits(loaded, inputs), logits(svd, inputs))
    assert svdtrain.count_macs(loaded, example_inputs=inputs) == svdtrain.count_macs(svd, example_inputs=inputs)
    with pytest.raises(FileNotFoundError, match="holds no svdtrain model"):
        svdtrain.from_pretrained(gpt2(), tmp_path / "nothing")
    wider = T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=64))
    with pytest.raises(ValueError, match="does not match this model"):
        svdtrain.from_pretrained(wider, tmp_path / "svd")


def test_a_compact_causal_lm_keeps_generate():
    model, (ids,) = small("gpt2")
    svd = svdtrain.decompose(copy.deepcopy(model))
    svdtrain.prune(svd, macs_budget=0.6, example_inputs=(ids,))
    compact = svdtrain.export(svd, example_inputs=(ids,))
    assert not any(type(m).__module__.startswith("svdtrain") for m in compact.modules())
    kw = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(compact.generate(ids[:, :8], **kw), svd.generate(ids[:, :8], **kw))


def _trainer(model, out, steps, ids):
    from svdtrain.hf_trainer import SVDTrainer
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(len(ids))]
    args = T.TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, save_steps=4,
                               learning_rate=1e-3, logging_steps=100, report_to=[], use_cpu=True, seed=0,
                               disable_tqdm=True)
    reg = svdtrain.Regularizer(orth=1.0, sparsity="hoyer", strength=1e-3)
    return SVDTrainer(model=model, args=args, train_dataset=data, regularizer=reg,
                      budget={"target_macs": 0.6, "target_at": 0.5, "mask": True, "every": 1},
                      example_inputs=(ids[:1],))


def test_svd_training_inside_the_trainer_resumes_identically(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(2, 97, (16, 12))
    base = svdtrain.decompose(gpt2().train())
    whole = _trainer(copy.deepcopy(base), tmp_path / "whole", 8, ids)
    whole.train()
    assert svdtrain.count_macs(whole.model, example_inputs=(ids[:1],)) <= 0.6 * svdtrain.count_macs(
        whole.model, example_inputs=(ids[:1],), cost="dense")
    assert any(layer.rank < layer.full_rank for _, layer in svdtrain.svd_layers(whole.model))
    resumed = _trainer(copy.deepcopy(base), tmp_path / "resumed", 8, ids)  # from the checkpoint at step 4
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-4"))
    assert svdtrain.ranks(resumed.model) == svdtrain.ranks(whole.model)
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert (a == b) if not torch.is_tensor(a) else torch.allclose(a, b, atol=1e-6), name


def test_the_core_never_imports_transformers_or_safetensors():
    import subprocess
    import sys
    code = ("import sys, torch, svdtrain; m = svdtrain.decompose(torch.nn.Sequential(torch.nn.Linear(4, 4))); "
            "svdtrain.prune(m, macs_budget=0.9, input_shape=(1, 4)); svdtrain.export(m); "
            "print('transformers' in sys.modules, 'safetensors' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False"], out.stderr[-1000:]


def _one_step(ga: int, reg, out, data):
    """One optimizer step of plain SGD over the same 4 sequences, in 4 / ga micro-batches; the
    change of one layer's singular values."""
    from svdtrain.hf_trainer import SVDTrainer
    torch.manual_seed(0)
    model = svdtrain.decompose(gpt2().train())
    before = model.transformer.h[0].mlp.c_fc.s.detach().clone()
    args = T.TrainingArguments(output_dir=str(out), max_steps=1, per_device_train_batch_size=4 // ga,
                               gradient_accumulation_steps=ga, learning_rate=0.1, optim="sgd",
                               lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], use_cpu=True,
                               save_strategy="no", disable_tqdm=True)
    SVDTrainer(model=model, args=args, train_dataset=data, regularizer=reg).train()
    return model.transformer.h[0].mlp.c_fc.s.detach() - before


def test_the_regularizer_counts_once_per_step_under_gradient_accumulation(tmp_path):
    """GPT-2 normalises its loss by the batch's token count, so transformers does not divide it
    by the accumulation steps: the regularizer's share of an SGD step is -lr * its gradient,
    whatever the number of micro-batches."""
    torch.manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(2, 97, (4, 12))]
    reg, off = svdtrain.Regularizer(orth=1.0, sparsity="hoyer", strength=0.5), svdtrain.Regularizer(orth=0.0, sparsity=None)
    torch.manual_seed(0)
    model = svdtrain.decompose(gpt2().train())
    s = model.transformer.h[0].mlp.c_fc.s
    want = -0.1 * torch.autograd.grad(reg(model), s)[0]
    for ga in (1, 4):
        share = _one_step(ga, reg, tmp_path / f"reg{ga}", data) - _one_step(ga, off, tmp_path / f"off{ga}", data)
        assert torch.allclose(share, want, rtol=1e-3, atol=1e-7), ga


def test_load_best_model_at_end_loads_the_best_checkpoint(tmp_path):
    from safetensors.torch import load_file
    from svdtrain.hf_trainer import SVDTrainer
    torch.manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(2, 97, (8, 12))]
    args = T.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                               eval_strategy="steps", eval_steps=2, save_steps=2, load_best_model_at_end=True,
                               metric_for_best_model="loss", greater_is_better=True, report_to=[], use_cpu=True,
                               logging_steps=100, disable_tqdm=True)
    trainer = SVDTrainer(model=svdtrain.decompose(gpt2().train()), args=args, train_dataset=data,
                         eval_dataset=data[:4], regularizer=svdtrain.Regularizer())
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6")  # the highest loss: an early one
    saved = load_file(f"{best}/svdtrain_model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in trainer.model.state_dict().items() if k in saved)


def test_a_tied_output_head_stays_dense_and_hugging_face_apis_work(caplog):
    """GPT-2's lm_head holds the token embedding's weight: factoring it would untie the two
    (and add parameters); it stays dense, with its reason logged, so tie_weights and
    resize_token_embeddings still work."""
    model, (ids,) = small("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    with caplog.at_level("WARNING", logger="svdtrain"):
        svd = svdtrain.decompose(copy.deepcopy(model))
    assert "tied to another module's" in caplog.text and "lm_head" in caplog.text
    assert type(svd.lm_head) is torch.nn.Linear and svd.lm_head.weight is svd.transformer.wte.weight
    assert isinstance(svd.transformer.h[0].mlp.c_fc, svdtrain.SVDLayer)
    assert torch.allclose(logits(svd, (ids,)), logits(model, (ids,)), atol=1e-4)
    svd.tie_weights()
    svd.resize_token_embeddings(120)
    assert svd.lm_head.weight is svd.transformer.wte.weight and svd.lm_head.weight.shape[0] == 120


def test_the_trainer_keeps_s_undecayed_and_reads_gradients_for_loss_importance(tmp_path):
    from svdtrain.hf_trainer import SVDTrainer
    torch.manual_seed(0)
    ids = torch.randint(2, 97, (8, 12))
    model = svdtrain.decompose(gpt2().train())
    args = T.TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4, weight_decay=0.1,
                               learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = SVDTrainer(model=model, args=args, train_dataset=[{"input_ids": i, "labels": i} for i in ids],
                         regularizer=svdtrain.Regularizer(strength=1e-3), example_inputs=(ids[:1],),
                         budget={"target_macs": 0.8, "target_at": 1.0, "mask": True, "every": 2, "score": "loss"})
    trainer.train()
    decay = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    for name, layer in svdtrain.svd_layers(model):
        assert decay[id(layer.s)] == 0.0 and decay[id(layer.U)] == 0.1, name
    importance = trainer.budget.importance  # step 5's gradients, read after the optimizer step, before zero_grad
    assert importance.count > 0 and all(float(v.sum()) > 0 for v in importance.sums.values())


def test_the_coverage_line_counts_gpt2_conv1d_macs(caplog):
    """GPT-2's Conv1D layers are counted at the op level: the coverage line still gives their
    share of the model's MACs, against PyTorch's own counter and a hand count of the layers
    (per token per block: 64 x 192 + 64 x 64 + 64 x 256 + 256 x 64)."""
    import re
    model, (ids,) = small("gpt2")
    total = torch_macs(model, ids)
    with caplog.at_level("INFO", logger="svdtrain"):
        svdtrain.decompose(copy.deepcopy(model), example_inputs=(ids,))
    share = float(re.search(r"holding ([\d.]+)% of the model's MACs", caplog.text).group(1))
    assert share == pytest.approx(100 * 2 * 49152 * ids.numel() / total, abs=0.05)


def test_mixture_of_experts_matmuls_are_counted_and_the_experts_named(caplog):
    """Mixtral's experts run as one grouped matmul over stacked weights: PyTorch's counter skips
    it; count_macs adds it (by hand: 2 layers x 16 tokens x top-2 x (32 x 256 + 128 x 32)), and
    decompose names the experts it leaves dense."""
    if not hasattr(T, "MixtralConfig"):
        pytest.skip("no Mixtral in this transformers")
    torch.manual_seed(0)
    cfg = T.MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    model, ids = T.MixtralForCausalLM(cfg).eval(), torch.randint(0, 100, (2, 8))
    if not any(p.dim() == 3 for p in model.model.layers[0].mlp.parameters()):
        pytest.skip("this transformers runs Mixtral's experts as separate Linear layers")
    experts = 2 * 16 * 2 * (32 * 256 + 128 * 32)
    assert svdtrain.count_macs(model, example_inputs=(ids,)) == torch_macs(model, ids) + experts
    with caplog.at_level("WARNING", logger="svdtrain"):
        svdtrain.decompose(model, example_inputs=(ids,))
    assert "model.layers.0.mlp.experts: MixtralExperts holds stacked weights" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="svdtrain"):  # no inputs: the share of weights, experts included
        svdtrain.decompose(T.MixtralForCausalLM(cfg).eval())
    svd = 2 * (32 * 32 + 2 * 16 * 32 + 32 * 32)  # per layer q, k, v (2 kv heads of 8), o; the routers are not Linear
    head = 100 * 32
    experts = 2 * 4 * (2 * 128 * 32 + 32 * 128)
    assert f"holding {(svd + head) / (svd + head + experts):.1%} of the weights" in caplog.text
