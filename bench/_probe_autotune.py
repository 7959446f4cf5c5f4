"""The GPU probe's autotune section (bench/gpu_probe.py): which block configs ``triton.autotune`` settles on at
the headline shapes, and how much faster the tuned op runs than the fixed default the probe timed before.

Discovered, not assumed (the kernels are being rewritten): the op modules whose source reads KARMA_AUTOTUNE are
run in a child process with KARMA_AUTOTUNE=1 (linear_ce reads it at import), under what is left of the probe's
budget; after each op the child prints every autotuned kernel's chosen config (and Triton's per-config timings
when it keeps them) as JSON lines, so a child cut off by the budget still reports the ops it finished.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench._baselines import CONTRASTIVE_SHAPE, LINEAR_CE_SHAPES, TEMPERATURE

REPO = Path(__file__).resolve().parents[1]
OPS = ("contrastive", "linear_ce")  # cheaper first


def autotune_modules() -> list:
    """Op packages whose triton_impl.py reads KARMA_AUTOTUNE."""
    return [path.parent.name for path in sorted((REPO / "karma_kernels").glob("*/triton_impl.py"))
            if "KARMA_AUTOTUNE" in path.read_text()]


def section_autotune(p) -> None:
    found = autotune_modules()
    ops = [op for op in OPS if op in found]
    if not ops:
        p.emit(kind="skip", section="autotune", reason="no op module reads KARMA_AUTOTUNE")
        return
    if p.rehearsal:
        p.emit(kind="skip", section="autotune", ops=ops, reason="no CUDA device: Triton's autotuner needs a GPU "
                                                                 "(found KARMA_AUTOTUNE in these op modules)")
        return
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])  # keeps the carried wheels' folder
    env = dict(os.environ, KARMA_AUTOTUNE="1", PYTHONPATH=path)
    limit = max(p.remaining() - 3, 1)
    try:
        run = subprocess.run([sys.executable, "-m", "bench.gpu_probe", "--autotune-child", ",".join(ops)],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
        lines, tail = run.stdout.splitlines(), run.stderr[-1500:]
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout or b""
        lines = (out.decode() if isinstance(out, bytes) else out).splitlines()
        tail = f"timed out after {limit:.0f} s (the probe's budget)"
    for line in lines:
        if line.startswith("{"):
            p.emit(**dict(json.loads(line), section="autotune"))
    if not any('"kind": "autotune"' in line for line in lines):
        p.emit(kind="skip", section="autotune", reason=f"no tuned config came back: {tail}")


def _emit(**record) -> None:
    print(json.dumps(record, default=str), flush=True)


def _emit_new_choices(seen: set) -> None:
    from triton.runtime.autotuner import Autotuner

    for tuner in (o for o in gc.get_objects() if isinstance(o, Autotuner)):
        name = getattr(getattr(tuner, "fn", None), "__name__", "?")
        timings = getattr(tuner, "configs_timings", None) or {}
        for key, config in list(getattr(tuner, "cache", {}).items()):
            if (name, str(key)) in seen:
                continue
            seen.add((name, str(key)))
            _emit(kind="autotune", kernel=name, key=str(key), best=str(config), configs=len(tuner.configs),
                  timings_ms={str(c): t for c, t in timings.items()} or None)


def autotune_child(ops) -> None:
    """Runs in a fresh process with KARMA_AUTOTUNE=1: each op once (the autotuner benchmarks its configs then),
    then the tuned op's median fwd+bwd time, then the configs chosen."""
    import triton.testing

    from karma_kernels import contrastive_loss, linear_cross_entropy

    seen = set()
    for op in ops:
        start = time.perf_counter()
        if op == "contrastive":
            batch, dim = CONTRASTIVE_SHAPE
            shape = f"B={batch},M={batch},D={dim},softmax"
            q, k = (torch.randn(batch, dim, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(2))
            step = lambda: contrastive_loss(q, k, temperature=TEMPERATURE, backend="triton").backward()  # noqa: E731
        else:
            n, d, v = LINEAR_CE_SHAPES[0]
            shape = f"N={n},D={d},V={v}"
            h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
            w = (torch.randn(v, d, device="cuda") / d**0.5).to(torch.bfloat16).requires_grad_()
            t = torch.randint(0, v, (n,), device="cuda")
            step = lambda: linear_cross_entropy(h, w, t, backend="triton").backward()  # noqa: E731
        step()
        torch.cuda.synchronize()
        tuning_s = time.perf_counter() - start
        _emit(kind="op", op=op, impl="triton_autotuned", shape=shape, dtype="bfloat16", phase="fwd+bwd",
              tuning_s=tuning_s, time_s=triton.testing.do_bench(step, warmup=5, rep=50, return_mode="median") / 1e3,
              time_method="triton.testing.do_bench")
        _emit_new_choices(seen)
        del step
        gc.collect()
        torch.cuda.empty_cache()
