"""Fused linear + cross-entropy (the LM-head loss) and the embedding-prefix reconstruction loss built on it.

reference.py (the semantics), torch_impl.py (chunked CPU path), triton_impl.py (kernels), op.py (public API),
arguments.py (argument checks), custom_ops.py (custom ops + autograd), vocab_parallel.py (process_group=).
"""
