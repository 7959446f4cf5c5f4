"""karma: the thin KARMA model layer on top of ``karma_kernels``.

An LLM reads a user's history as soft item tokens and emits a next-interest embedding h, trained with an in-batch
contrastive action loss plus semantic regularisers (history-conditioned generation, embedding-conditioned
reconstruction, image flow matching); retrieval runs h against sharded item indexes.

Modules (imported on demand, so ``import karma`` stays light): ``karma.data`` (a package), ``karma.config``,
``karma.workspace``, ``karma.model``, ``karma.losses``, ``karma.train``, ``karma.evaluate``, ``karma.retrieval``,
``karma.cli`` (the ``karma`` command).
"""
__version__ = "0.1.0"
