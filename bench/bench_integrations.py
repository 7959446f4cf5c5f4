"""One training step (forward + backward) of a Hugging Face Llama-config causal LM, unpatched vs patched by
``karma_kernels.integrations.transformers.patch``.

impls:
  unpatched   transformers' own forward: [tokens, vocab] logits, then its ForCausalLMLoss (the baseline)
  karma       the same model after ``patch(model)``: the loss by ``linear_cross_entropy`` from the final states

Target (read off the report, never asserted): CPU, V=128256, hidden 512, 2 layers, batch 4 x 512 tokens: karma's
peak memory <= 1/3 of unpatched's, at the same loss (both losses are recorded in extra_info["loss"]). The memory is
the peak RSS growth of a steady-state step: the previous step's gradients, freed at its start and allocated again,
are part of the baseline, so what is measured is the step's activations and loss intermediates. ``flops`` counts
the LM head's three N x D x V matmuls only.
"""
from __future__ import annotations

import pytest
import torch

from bench.conftest import DEVICE, QUICK, run_case

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")

from karma_kernels.integrations.transformers import patch  # noqa: E402

IMPLS = ("unpatched", "karma")
if QUICK:
    CASES = [dict(vocab=4000, hidden=64, layers=2, batch=2, seq=64)]
else:
    CASES = [dict(vocab=128256, hidden=512, layers=2, batch=4, seq=512)]


def _model(case):
    config = transformers.LlamaConfig(vocab_size=case["vocab"], hidden_size=case["hidden"],
                                      intermediate_size=4 * case["hidden"], num_hidden_layers=case["layers"],
                                      num_attention_heads=8, num_key_value_heads=8,
                                      max_position_embeddings=max(case["seq"], 128), attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(DEVICE).train()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[f"V{c['vocab']}-H{c['hidden']}-L{c['layers']}-{c['batch']}x{c['seq']}"
                                             for c in CASES])
def test_llama_training_step(benchmark, impl, case):
    model = _model(case)
    if impl == "karma":
        patch(model)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, case["vocab"], (case["batch"], case["seq"]), generator=generator).to(DEVICE)

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        return loss.detach()

    tokens = case["batch"] * case["seq"]
    loss = run_case(benchmark, step, op="hf_llama_step", impl=impl,
                    shape=f"N={tokens},D={case['hidden']},V={case['vocab']},L={case['layers']}", dtype=torch.float32,
                    device=DEVICE, flops=6 * tokens * case["hidden"] * case["vocab"], warmup_rounds=1,
                    baseline="unpatched", size=tokens * case["vocab"])
    benchmark.extra_info["loss"] = float(loss)
