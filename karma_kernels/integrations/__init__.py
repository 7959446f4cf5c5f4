"""Adapters that make karma's fused ops a one-line change in the stacks people already train with.

    karma_kernels.integrations.transformers           patch(model) / unpatch(model) / patched(model): a Hugging Face
                                                      causal LM computes its training loss with
                                                      ``linear_cross_entropy`` (no [tokens, vocab] logits)
    karma_kernels.integrations.sentence_transformers  MultipleNegativesRankingLoss / its symmetric variant, computed
                                                      by ``contrastive_loss``
    karma_kernels.integrations.clip                   ClipLoss (open_clip semantics: learnable logit scale,
                                                      local_loss, gather-with-grad across ranks)

Each module imports its library (transformers, sentence-transformers) only when it is itself imported; this
package imports nothing, so ``import karma_kernels`` never pulls them in and nothing is patched at import.
"""
