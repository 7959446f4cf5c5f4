"""The transformers patch on tiny random-weight causal LMs built locally (no hub): loss and every parameter gradient
equal to the unpatched model's within the tolerance table, the forward's other behaviours unchanged, and a short
Trainer run with gradient accumulation whose loss curve matches the unpatched one.

Truth: the unpatched model in float64 with the loss taken in float64 from its logits (transformers' own loss
casts logits to float32, so its float64 model is not a float64 truth). Torch in the same dtype: the unpatched
model's own loss in the dtype under test.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from karma_kernels.integrations.transformers import is_patched, patch, patched, unpatch  # noqa: E402
from tolerances import assert_close_to_truth  # noqa: E402

VOCAB = 97
BATCH, SEQ = 2, 9
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.2, attn_implementation="eager")


def _configs():
    t = transformers
    return {
        "llama": (t.LlamaConfig(**COMMON), t.LlamaForCausalLM),
        "llama_tied_bias": (t.LlamaConfig(**COMMON, tie_word_embeddings=True), t.LlamaForCausalLM),
        "qwen2": (t.Qwen2Config(**COMMON), t.Qwen2ForCausalLM),
        "qwen3": (t.Qwen3Config(**COMMON, head_dim=8), t.Qwen3ForCausalLM),
        "mistral": (t.MistralConfig(**COMMON), t.MistralForCausalLM),
        # a small cap so that the soft-capping really bends these logits
        "gemma2": (t.Gemma2Config(**COMMON, head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=0.5,
                                  sliding_window=4), t.Gemma2ForCausalLM),
        "gemma3": (t.Gemma3TextConfig(**COMMON, head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=0.5,
                                      sliding_window=4), t.Gemma3ForCausalLM),
        "gpt2": (t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                              initializer_range=0.2, attn_implementation="eager"), t.GPT2LMHeadModel),
    }


def _model(name):
    config, cls = _configs()[name]
    torch.manual_seed(0)
    model = cls(config)
    if name == "llama_tied_bias":  # a head with a bias as well as tied weights
        model.lm_head.bias = torch.nn.Parameter(torch.randn(VOCAB) * 0.5)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    # tied heads (GPT-2, Gemma, llama_tied_bias; the others are untied) really share the embedding parameter
    assert tied == bool(config.tie_word_embeddings), f"{name}: tied={tied}"
    return model.train()


def _batch(seed=1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -2:] = 0  # right padding on the second row
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, 2:4] = -100  # a masked prompt span
    return input_ids, attention_mask, labels


def _shifted(labels):
    return F.pad(labels, (0, 1), value=-100)[..., 1:]


def _truth(model, input_ids, attention_mask, labels, num_items_in_batch=None, **forward_kwargs):
    """Unpatched float64 model, loss in float64 from its logits, with the same reduction rule as transformers."""
    model64 = copy.deepcopy(model).double()
    logits = model64(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs).logits
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), _shifted(labels).reshape(-1), ignore_index=-100,
                           reduction=reduction)
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model64.named_parameters()}


def _loss_and_grads(model, autocast, **kwargs):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        output = model(**kwargs)
    output.loss.backward()
    return output, {n: p.grad for n, p in model.named_parameters()}


def _compare(name, model, dtype_key, autocast, **kwargs):
    truth_loss, truth_grads = _truth(model, **kwargs)
    unpatched = copy.deepcopy(model)
    patched_model = patch(copy.deepcopy(model))
    torch_out, torch_grads = _loss_and_grads(unpatched, autocast, **kwargs)
    ours, our_grads = _loss_and_grads(patched_model, autocast, **kwargs)
    assert ours.logits is None
    assert ours.loss.dtype == torch.float32
    assert_close_to_truth(f"{name} loss", ours.loss, truth_loss, torch_out.loss, dtype_key)
    assert set(our_grads) == set(truth_grads)
    for param, truth in truth_grads.items():
        assert our_grads[param] is not None, f"{name}: {param} received no gradient"
        assert_close_to_truth(f"{name} d{param}", our_grads[param], truth, torch_grads[param], dtype_key)
    return ours, torch_out


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("name", list(_configs()))
def test_loss_and_every_gradient_match_unpatched(torch_one_thread, name, autocast):
    input_ids, attention_mask, labels = _batch()
    _compare(name, _model(name), torch.bfloat16 if autocast else torch.float32, autocast,
             input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def test_num_items_in_batch_normalises_like_transformers(torch_one_thread):
    input_ids, attention_mask, labels = _batch()
    num_items = torch.tensor(23)  # e.g. the token count of a whole gradient-accumulation window
    ours, theirs = _compare("num_items_in_batch", _model("llama"), torch.float32, False, input_ids=input_ids,
                            attention_mask=attention_mask, labels=labels, num_items_in_batch=num_items)
    # really the sum over tokens / num_items, not a mean
    mean = patch(_model("llama"))(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    valid = int((_shifted(labels) != -100).sum())
    torch.testing.assert_close(ours.loss.detach(), mean.detach() * valid / 23, rtol=1e-5, atol=0)


def test_logits_to_keep_and_shift_labels(torch_one_thread):
    model = _model("gemma2")
    input_ids, attention_mask, labels = _batch()
    keep = 4  # labels for the last `keep` positions only, as transformers requires then
    _compare("logits_to_keep", model, torch.float32, False, input_ids=input_ids, attention_mask=attention_mask,
             labels=labels[:, -keep:], logits_to_keep=keep)
    # already-shifted labels (sequence-parallel style) replace the shift
    shift = _shifted(labels)
    reference = patch(copy.deepcopy(model))(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    ours = patch(copy.deepcopy(model))(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                       shift_labels=shift).loss
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_forward_contract(torch_one_thread):
    model = _model("llama")
    input_ids, attention_mask, labels = _batch()
    plain = copy.deepcopy(model).eval()
    patch(model).eval()
    assert is_patched(model) and not is_patched(plain)
    # positional labels, return_dict=False, return_logits
    loss = model(input_ids, attention_mask, None, None, None, labels).loss
    as_tuple = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, return_dict=False)
    torch.testing.assert_close(as_tuple[0], loss, rtol=0, atol=0)
    assert not any(isinstance(x, torch.Tensor) and x.shape[-1:] == (VOCAB,) for x in as_tuple[1:])
    expected = plain(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    unpatch(model)
    with patched(model, return_logits=True):
        with_logits = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(with_logits.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(with_logits.loss, expected.loss, rtol=1e-5, atol=0)
    assert not is_patched(model) and "forward" not in model.__dict__
    # no labels: the original forward, bit for bit, and generate is unchanged
    patch(model)
    torch.testing.assert_close(model(input_ids=input_ids, attention_mask=attention_mask).logits,
                               plain(input_ids=input_ids, attention_mask=attention_mask).logits, rtol=0, atol=0)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(input_ids[:, :5], **kwargs), plain.generate(input_ids[:, :5], **kwargs))
    with pytest.raises(ValueError, match="already patched"):
        patch(model)
    # a deep copy (e.g. a reference model for distillation) is patched too, and runs its own weights
    twin = copy.deepcopy(model)
    assert is_patched(twin) and twin.forward.args[0] is twin
    with torch.no_grad():
        twin.lm_head.weight.mul_(2.0)
    assert not torch.equal(twin(input_ids=input_ids, labels=labels).loss, model(input_ids=input_ids, labels=labels).loss)
    unpatch(model)
    with pytest.raises(ValueError, match="not patched"):
        unpatch(model)


def test_refuses_what_it_cannot_reproduce():
    t = transformers
    with pytest.raises(TypeError, match="linear LM head"):
        patch(t.LlamaModel(t.LlamaConfig(**COMMON)))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        patch("model")
    granite = t.GraniteForCausalLM(t.GraniteConfig(**COMMON, logits_scaling=4.0))
    with pytest.raises(ValueError, match="logits_scaling"):
        patch(granite)
    with pytest.raises(TypeError, match="return_logits"):
        patch(_model("llama"), return_logits="yes")
    with pytest.raises(ValueError, match="backend"):
        patch(_model("llama"), backend="cuda")
    model = patch(_model("llama"))
    input_ids, attention_mask, labels = _batch()
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=input_ids, labels=labels, logits_to_keep=3)


def test_importing_the_ops_imports_no_integration_library():
    code = ("import sys, karma_kernels, karma_kernels.integrations; "
            "print(sorted(m for m in ('transformers', 'sentence_transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


class _TokenDataset(torch.utils.data.Dataset):
    def __init__(self, count=8, seq=12):
        generator = torch.Generator().manual_seed(5)
        self.ids = torch.randint(0, VOCAB, (count, seq), generator=generator)

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[: 1 + i % 4] = -100  # uneven label counts per example: num_items_in_batch matters
        return {"input_ids": self.ids[i], "labels": labels}


def _train(tmp_path, fused, bf16):
    model = _model("llama")
    if fused:
        patch(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"run_{fused}_{bf16}"), use_cpu=True, bf16=bf16, max_steps=3,
        per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1,
        report_to=[], save_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True,
        lr_scheduler_type="constant")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_TokenDataset())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, model


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_trainer_with_gradient_accumulation_gives_the_same_loss_curve(torch_one_thread, tmp_path, bf16):
    pytest.importorskip("accelerate")
    theirs, plain_model = _train(tmp_path, fused=False, bf16=bf16)
    ours, fused_model = _train(tmp_path, fused=True, bf16=bf16)
    assert len(ours) == len(theirs) == 3
    # the Trainer passes num_items_in_batch and does not rescale the loss itself: had the patch ignored it, the
    # logged loss (summed over the 2 micro-batches) would be about twice the unpatched one
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=2e-2 if bf16 else 1e-4, atol=0)
    assert is_patched(fused_model)
    if not bf16:  # in bf16, Adam's normalised steps amplify rounding differences of near-zero gradients
        for (name, mine), (_, reference) in zip(fused_model.named_parameters(), plain_model.named_parameters()):
            torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
