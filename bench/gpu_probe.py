"""GPU probe: the few numbers that matter, first, in about a minute on an H200, one JSON line each as it goes.

    python -m bench.gpu_probe [--out probe.jsonl] [--budget 90] [--rep 10] [--only S,..] [--skip S,..]
    python -m bench.gpu_probe --summarize probe.jsonl        # the markdown tables of a finished (or cut) run

Everything goes through the public API (``contrastive_loss``, ``linear_cross_entropy``, ``topk_merge`` with
backend="triton" / "compiled"), so kernels can be rewritten without touching this file. Sections, in order;
one that does not fit the remaining budget is skipped with the reason, one that raises is recorded and the next
runs:
  env          device, driver, torch / triton / CUDA versions (beside every figure, in the same file)
  ceilings     the spec table (bench/_ceilings.py, with its source) and measured ceilings: a large bf16 matmul
               and a device-to-device copy
  contrastive  bf16 B=65536 D=256 (Inf-CL's shape): ours and eager bf16 torch; forward and backward timed
               apart with CUDA events (fresh forward before each timed backward), TFLOP/s against the bf16
               ceiling, peak memory, the time of each kernel (torch.profiler)
  linear_ce    bf16 N=8192 D=2304 V=256000 (CCE's shape): the same
  topk_merge   the CUDA merge, Q=10000 S=16 k=100, against torch.topk over the concatenation: time and GB/s
  grad_check   fp16 gradients at B = N = 8192 against a float64 truth, beside eager fp16 torch's, with the test
               tolerance rule (tests/tolerances.py: err <= K * err(torch fp16) + EPS)
  autotune     a child process with KARMA_AUTOTUNE=1 runs each op at its headline shape and reports the config
               every ``triton.autotune`` kernel settled on (and its timings when Triton keeps them); skipped
               when no op module reads KARMA_AUTOTUNE
Records: {"kind": "env" | "ceiling" | "op" | "kernel" | "grad_check" | "autotune" | "skip" | "error" | "done",
"section": ..., "t": seconds since start, ...}. FLOPs are the model's (fwd 2MNK per matmul, bwd twice that);
recomputation inside a kernel is not counted. Without CUDA the probe runs a rehearsal: the same code at tiny
shapes on the CPU (torch / C++ backends, perf_counter timing), records marked "rehearsal": true.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from bench._baselines import (CONTRASTIVE_SHAPE, LINEAR_CE_SHAPES, TEMPERATURE, TOPK_SHAPE, eager_contrastive,
                              eager_linear_ce)
from bench._ceilings import SOURCE, device_ceilings, flop_ceiling
from bench._mem import peak_memory
from bench._probe_autotune import autotune_child, section_autotune
from bench._probe_gradcheck import section_grad_check
from bench._probe_summary import read_records, summarize

# (section, seconds it needs on an H200, Triton compilation included): a section starts only if that much is left
SECTION_COST_S = {"env": 0, "ceilings": 4, "contrastive": 15, "linear_ce": 20, "topk_merge": 4, "grad_check": 15,
                  "autotune": 20}


class Probe:
    def __init__(self, out, budget_s: float, rep: int, rehearsal: bool):
        self.out, self.rehearsal, self.start = out, rehearsal, time.perf_counter()
        self.deadline = self.start + budget_s
        self.device = torch.device("cpu" if rehearsal else "cuda")
        self.rep, self.warmup = (2, 1) if rehearsal else (rep, 2)
        self.ceilings = device_ceilings(self.device)

    def emit(self, **record):
        record = dict(record, t=round(time.perf_counter() - self.start, 2))
        if self.rehearsal:
            record["rehearsal"] = True
        line = json.dumps(record, default=str)
        self.out.write(line + "\n")
        self.out.flush()
        print(line, flush=True)

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, name, fn):
        need = 0 if self.rehearsal else SECTION_COST_S[name]
        if self.remaining() < need:
            self.emit(kind="skip", section=name, reason=f"probe budget: {self.remaining():.0f} s left, "
                                                         f"the section needs about {need} s")
            return
        try:
            fn(self)
        except Exception as error:  # one broken op must not hide the others' numbers
            self.emit(kind="error", section=name, error=f"{type(error).__name__}: {error}"[:2000],
                      traceback=traceback.format_exc()[-3000:])
        finally:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # --- timing -------------------------------------------------------------------------------------------------
    def _stamp(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _elapsed(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.device.type == "cuda" else b - a

    def time_fwd_bwd(self, forward, params):
        """Median forward and backward seconds: events before the forward, between, after the backward."""
        flush = torch.empty(256 * 2**20, dtype=torch.int8, device=self.device) if self.device.type == "cuda" else None
        stamps = []
        for i in range(self.warmup + self.rep):
            for p in params:
                p.grad = None
            if flush is not None:
                flush.zero_()  # a cold L2 for every call
            a = self._stamp()
            loss = forward()
            b = self._stamp()
            loss.backward()
            c = self._stamp()
            if i >= self.warmup:
                stamps.append((a, b, c))
        self.sync()
        fwd = statistics.median(self._elapsed(a, b) for a, b, _ in stamps)
        bwd = statistics.median(self._elapsed(b, c) for _, b, c in stamps)
        return fwd, bwd

    def time_call(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        stamps = []
        for _ in range(self.rep):
            a = self._stamp()
            fn()
            stamps.append((a, self._stamp()))
        self.sync()
        return statistics.median(self._elapsed(a, b) for a, b in stamps)

    def measure_op(self, op, impl, shape, dtype, forward, params, fwd_flops):
        """Forward, backward and fwd+bwd records (time, TFLOP/s, fraction of the dtype's ceiling), the peak
        memory of one step and the per-kernel times of one step."""
        fwd, bwd = self.time_fwd_bwd(forward, params)

        def step():
            for p in params:
                p.grad = None
            forward().backward()

        _, peak, mem_method = peak_memory(step, self.device)
        dtype_name = str(dtype).removeprefix("torch.")
        ceiling = flop_ceiling(self.ceilings, dtype_name)
        for phase, seconds, flops in (("fwd", fwd, fwd_flops), ("bwd", bwd, 2 * fwd_flops),
                                      ("fwd+bwd", fwd + bwd, 3 * fwd_flops)):
            rate = flops / seconds if seconds > 0 else None
            self.emit(kind="op", section=op, op=op, impl=impl, shape=shape, dtype=dtype_name, phase=phase,
                      time_s=seconds, flops=flops, flop_per_s=rate, flop_ceiling=ceiling,
                      fraction_of_ceiling=rate / ceiling if rate and ceiling else None,
                      ceiling_source=SOURCE if ceiling else None, peak_mem_bytes=peak, mem_method=mem_method,
                      time_method="cuda_events" if self.device.type == "cuda" else "perf_counter", rep=self.rep)
        self.kernel_times(op, impl, step, dtype, gemm_flops=fwd_flops)

    def kernel_times(self, op, impl, step, dtype=None, gemm_flops=None, step_bytes=None, steps=3):
        """Device time of each kernel per step, averaged over ``steps`` profiled steps (torch.profiler / CUPTI;
        CPU ops' self time in a rehearsal). ``gemm_flops``: 2MNK of one logits-sized matmul; a kernel named like a
        forward kernel is credited one, a gradient kernel two (it recomputes the logits tile, then multiplies by
        it): the executed FLOPs of a recomputing kernel, labelled as assumed. ``step_bytes``: bytes a step must
        move (the merge): GB/s of the kernel named like a merge."""
        from torch.profiler import ProfilerActivity, profile

        on_gpu = self.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        try:
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    step()
                self.sync()
        except Exception as error:  # the profiler is a bonus: the op's own figures stand without it
            self.emit(kind="skip", section=op, op=op, impl=impl,
                      reason=f"per-kernel times unavailable: torch.profiler raised {type(error).__name__}: {error}")
            return
        rows = []
        for event in prof.key_averages():
            if on_gpu:
                seconds = (getattr(event, "self_device_time_total", None)
                           or getattr(event, "self_cuda_time_total", 0) or 0) / 1e6
                if "CUDA" not in str(getattr(event, "device_type", "")):
                    continue
            else:
                seconds = event.self_cpu_time_total / 1e6
            if seconds > 0:
                rows.append((seconds / steps, event.key, event.count / steps))
        if not rows:
            self.emit(kind="skip", section=op, op=op, impl=impl, reason="torch.profiler returned no kernel times")
            return
        total = sum(r[0] for r in rows)
        ceiling = flop_ceiling(self.ceilings, str(dtype).removeprefix("torch.")) if dtype is not None else None
        for seconds, name, calls in sorted(rows, reverse=True)[:8]:
            record = dict(kind="kernel", section=op, op=op, impl=impl, name=name[:160], time_s=seconds,
                          calls_per_step=calls, share=seconds / total, time_method=f"profiler, mean of {steps} steps")
            lowered = name.lower()
            gemms = 2 if "grad" in lowered or "backward" in lowered or "bwd" in lowered else (
                1 if "forward" in lowered or "fwd" in lowered else 0)
            if gemm_flops and gemms and impl in ("triton", "cuda"):
                flops = gemms * gemm_flops
                record.update(flops_assumed=flops, gemms_assumed=gemms, flop_per_s=flops / seconds,
                              fraction_of_ceiling=flops / seconds / ceiling if ceiling else None)
            if step_bytes and impl in ("cuda", "cpp") and "merge" in lowered:  # the merge kernel, not a memset
                record.update(bytes_per_s=step_bytes / seconds, fraction_of_ceiling=(
                    step_bytes / seconds / self.ceilings["bytes_per_s"] if self.ceilings else None))
            self.emit(**record)


# --- sections ----------------------------------------------------------------------------------------------------

def section_env(p: Probe):
    import platform

    import triton

    record = dict(kind="env", section="env", python=platform.python_version(), torch=torch.__version__,
                  torch_cuda=torch.version.cuda, triton=triton.__version__, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        record.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                      sm_count=props.multi_processor_count, memory_bytes=props.total_memory)
        try:
            record["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                              capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError) as error:
            record["driver"] = f"unknown ({type(error).__name__})"
    p.emit(**record)


def section_ceilings(p: Probe):
    p.emit(kind="ceiling", section="ceilings", source=SOURCE, ceilings=p.ceilings,
           note=None if p.ceilings else "no spec ceilings for this device: fractions are omitted")
    n = 512 if p.rehearsal else 8192
    dtype = torch.float32 if p.rehearsal else torch.bfloat16
    a, b = (torch.randn(n, n, device=p.device).to(dtype) for _ in range(2))
    seconds = p.time_call(lambda: a @ b)
    p.emit(kind="ceiling", section="ceilings", what=f"matmul {n}^3 {str(dtype).removeprefix('torch.')}",
           flop_per_s=2 * n**3 / seconds, time_s=seconds)
    src = torch.randn((2**18 if p.rehearsal else 2**29) // 4, device=p.device)
    dst = torch.empty_like(src)
    seconds = p.time_call(lambda: dst.copy_(src))
    p.emit(kind="ceiling", section="ceilings", what=f"device copy {src.numel() * 4 / 2**30:.3g} GiB",
           bytes_per_s=2 * src.numel() * 4 / seconds, time_s=seconds)


def section_contrastive(p: Probe):
    from karma_kernels import contrastive_loss

    batch, dim = (256, 32) if p.rehearsal else CONTRASTIVE_SHAPE
    dtype = torch.float32 if p.rehearsal else torch.bfloat16
    backend = "torch" if p.rehearsal else "triton"
    q = F.normalize(torch.randn(batch, dim, device=p.device), dim=1).to(dtype).requires_grad_()
    k = F.normalize(torch.randn(batch, dim, device=p.device), dim=1).to(dtype).requires_grad_()
    shape = f"B={batch},M={batch},D={dim},softmax"
    for impl, loss in ((backend, lambda: contrastive_loss(q, k, temperature=TEMPERATURE, backend=backend)),
                       ("torch_eager", lambda: eager_contrastive(q, k))):
        p.measure_op("contrastive", impl, shape, dtype, loss, (q, k), 2.0 * batch * batch * dim)


def section_linear_ce(p: Probe):
    from karma_kernels import linear_cross_entropy

    n, d, v = (128, 32, 500) if p.rehearsal else LINEAR_CE_SHAPES[0]
    dtype = torch.float32 if p.rehearsal else torch.bfloat16
    backend = "torch" if p.rehearsal else "triton"
    h = torch.randn(n, d, device=p.device).to(dtype).requires_grad_()
    w = (torch.randn(v, d, device=p.device) / d**0.5).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), device=p.device)
    for impl, loss in ((backend, lambda: linear_cross_entropy(h, w, t, backend=backend)),
                       ("torch_eager", lambda: eager_linear_ce(h, w, t))):
        p.measure_op("linear_ce", impl, f"N={n},D={d},V={v}", dtype, loss, (h, w), 2.0 * n * d * v)


def section_topk_merge(p: Probe):
    from karma_kernels import topk_merge

    shards, queries, k = (4, 100, 10) if p.rehearsal else TOPK_SHAPE
    distances = torch.rand(shards, queries, k, device=p.device).sort(dim=2).values
    ids = torch.randint(0, 2**40, (shards, queries, k), device=p.device)
    flat_d = distances.permute(1, 0, 2).reshape(queries, shards * k)
    flat_i = ids.permute(1, 0, 2).reshape(queries, shards * k)

    def concat_topk():
        values, positions = torch.topk(flat_d, k, dim=1, largest=False)
        return values, flat_i.gather(1, positions)

    backend = "auto" if p.rehearsal else "compiled"
    merged_bytes = queries * (2 * k + shards) * 12  # read about k + S candidates per query, write k (fp32 + int64)
    all_bytes = (shards + 1) * queries * k * 12  # read every candidate, write k
    ours = lambda: topk_merge(distances, ids, k, backend=backend)  # noqa: E731
    for impl, fn, moved in (("cpp" if p.rehearsal else "cuda", ours, merged_bytes),
                            ("torch_topk", concat_topk, all_bytes)):
        try:
            seconds = p.time_call(fn)
            _, peak, mem_method = peak_memory(fn, p.device)
        except Exception as error:  # e.g. the extension was built without CUDA: the baseline still runs
            p.emit(kind="error", section="topk_merge", impl=impl, error=f"{type(error).__name__}: {error}"[:2000])
            continue
        ceiling = p.ceilings["bytes_per_s"] if p.ceilings else None
        p.emit(kind="op", section="topk_merge", op="topk_merge", impl=impl, shape=f"S={shards},Q={queries},k={k}",
               dtype="float32", phase="merge", time_s=seconds, bytes=moved, bytes_per_s=moved / seconds,
               bytes_ceiling=ceiling, fraction_of_ceiling=moved / seconds / ceiling if ceiling else None,
               bytes_if_all_read_per_s=all_bytes / seconds, peak_mem_bytes=peak, mem_method=mem_method, rep=p.rep)
        p.kernel_times("topk_merge", impl, fn, step_bytes=moved)


SECTIONS = (("env", section_env), ("ceilings", section_ceilings), ("contrastive", section_contrastive),
            ("linear_ce", section_linear_ce), ("topk_merge", section_topk_merge), ("grad_check", section_grad_check),
            ("autotune", section_autotune))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("probe.jsonl"), help="JSON lines, appended as they come")
    parser.add_argument("--budget", type=float, default=90.0, help="seconds; sections that no longer fit skip")
    parser.add_argument("--rep", type=int, default=10, help="timed repetitions per measurement (GPU)")
    parser.add_argument("--only", default="", help="comma-separated sections to run (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated sections not to run (gpu_check.sh runs "
                                                   "topk_merge apart, once the extension is built)")
    parser.add_argument("--summarize", type=Path, default=None, help="print the tables of a probe.jsonl and exit")
    parser.add_argument("--autotune-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.autotune_child:
        autotune_child(args.autotune_child.split(","))
        return 0
    if args.summarize:
        print(summarize(read_records(args.summarize)))
        return 0
    names = [name for name, _ in SECTIONS]
    only, skip = (set(filter(None, value.split(","))) for value in (args.only, args.skip))
    if only - set(names) or skip - set(names):
        parser.error(f"unknown section in {sorted((only | skip) - set(names))}: the sections are {names}")
    rehearsal = not torch.cuda.is_available()
    with open(args.out, "a") as out:
        probe = Probe(out, args.budget, args.rep, rehearsal)
        if rehearsal and not only:
            probe.emit(kind="skip", section="gpu", reason="no CUDA device (torch.cuda.is_available() is False): "
                                                          "rehearsal at tiny shapes on the CPU, no GPU figures")
        for name, fn in SECTIONS:
            if (not only or name in only) and name not in skip:
                probe.run(name, fn)
        probe.emit(kind="done", section="done", elapsed_s=round(time.perf_counter() - probe.start, 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
