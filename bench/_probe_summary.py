"""Markdown tables of a GPU probe's JSON lines (bench/gpu_probe.py): ``python -m bench.gpu_probe --summarize``
prints them, and ``python -m bench.report --probe probe.jsonl`` puts them at the top of the report. No torch
import: a probe file can be read anywhere."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path


def _si(value: float, unit: str) -> str:
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def read_records(path) -> list:
    """The records of a probe file; a line cut off by a killed probe is ignored."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def summarize(records) -> str:
    """Markdown tables of a probe's records (the report's "GPU probe" section)."""
    env = next((r for r in records if r["kind"] == "env"), {})
    lines = ["## GPU probe", "", f"device {env.get('device', 'cpu (rehearsal)')} · driver {env.get('driver', '-')} · "
             f"torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda')}) · triton {env.get('triton', '?')}", "",
             "| op | impl | shape | dtype | phase | time | rate | of ceiling | peak mem |", "|---" * 9 + "|"]
    for r in (r for r in records if r["kind"] == "op" and "time_s" in r):
        rate = (_si(r["flop_per_s"], "FLOP/s") if r.get("flop_per_s")
                else _si(r["bytes_per_s"], "B/s") if r.get("bytes_per_s") else "-")
        frac = f"{100 * r['fraction_of_ceiling']:.0f}%" if r.get("fraction_of_ceiling") else "-"
        mem = f"{r['peak_mem_bytes'] / 2**20:.0f} MiB" if r.get("peak_mem_bytes") is not None else "-"
        lines.append(f"| {r.get('op')} | {r.get('impl')} | {r.get('shape', '-')} | {r.get('dtype', '-')} | "
                     f"{r.get('phase', '-')} | {r['time_s'] * 1e3:.3g} ms | {rate} | {frac} | {mem} |")
    for r in (r for r in records if r["kind"] == "ceiling" and r.get("what")):
        rate = _si(r["flop_per_s"], "FLOP/s") if r.get("flop_per_s") else _si(r["bytes_per_s"], "B/s")
        lines += ["", f"- measured ceiling: {r['what']}: {rate}"]
    kernels = [r for r in records if r["kind"] == "kernel"]
    if kernels:
        lines += ["", "| kernels per step | impl | kernel (top 4) | time | share | rate (assumed FLOPs) | of ceiling |",
                  "|---" * 7 + "|"]
        shown = Counter()
        for r in kernels:  # the probe writes them longest first
            shown[r["op"], r["impl"]] += 1
            if shown[r["op"], r["impl"]] <= 4:
                rate = (_si(r["flop_per_s"], "FLOP/s") if r.get("flop_per_s")
                        else _si(r["bytes_per_s"], "B/s") if r.get("bytes_per_s") else "-")
                frac = f"{100 * r['fraction_of_ceiling']:.0f}%" if r.get("fraction_of_ceiling") else "-"
                lines.append(f"| {r['op']} | {r['impl']} | `{r['name'][:70]}` | {r['time_s'] * 1e3:.3g} ms | "
                             f"{100 * r['share']:.0f}% | {rate} | {frac} |")
    checks = [r for r in records if r["kind"] == "grad_check"]
    if checks:
        lines += ["", "| grad check | tensor | err | err torch fp16 | bound | ok |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['op']} {r['shape']} | {r['tensor']} | {r['err']:.2e} | {r['err_torch_fp16']:.2e} | "
                  f"{r['bound']:.2e} | {r['ok']} |" if r.get("bound") is not None else
                  f"| {r['op']} {r['shape']} | {r['tensor']} | {r['err']:.2e} | {r['err_torch_fp16']:.2e} | - | - |"
                  for r in checks]
    lines += [f"- autotune {r['kernel']}: {r['best']}" for r in records if r["kind"] == "autotune"]
    lines += [f"- {r['kind']} {r.get('section')}: {r.get('reason') or r.get('error')}"
              for r in records if r["kind"] in ("skip", "error")]
    return "\n".join(lines) + "\n"
