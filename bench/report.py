"""Turn a pytest-benchmark JSON into side-by-side tables and plots.

    python -m bench.report bench/results/cpu.json [more.json ...] [--out DIR] [--prefix NAME_]
                           [--baseline [OP=]IMPL ...] [--merged-json ALL.json]

Writes DIR/report.md (also printed): one markdown table per op, rows = shapes (and dtype, device, mode), columns =
implementations, each cell = median time · peak memory, then the ratios to the row's baseline (--baseline, else
one a case names in extra_info["baseline"], else reference, or the first present of torch_native / faiss / ...)
and, where the case recorded a FLOP or byte count, the achieved rate and its fraction of the device's ceiling. And DIR/<prefix><op>.png: time and peak memory against
problem size, one line per implementation. Cases lacking the bench.conftest extra_info keys are still shown,
with what can be inferred from their test names; missing implementations are simply absent columns.
Several JSONs (e.g. one per bench file, as bench/gpu_check.sh runs them) are combined into one report, and
``--merged-json`` saves their combination as one pytest-benchmark JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

# What bench.conftest.run_case records in every case's extra_info (the suite's contract, checked by CI).
REQUIRED_EXTRA_INFO = ("op", "impl", "shape", "dtype", "device", "peak_mem_bytes", "mem_method", "time_s")
BASELINE_PREFERENCE = ("reference", "torch_native", "torch_eager", "faiss", "torch_topk")
# our implementations, and the peers a user could pick instead (each of our cells also shows its ratio to the
# fastest peer present in the row)
OURS = ("torch", "triton", "cuda", "cpp", "cpp_select", "threads", "ray")
PEERS = ("torch_native", "torch_eager", "torch_compile", "liger", "cce", "inf_cl", "faiss", "torch_topk")
# Our implementations first, then peers, in a stable order; unknown names go last alphabetically.
IMPL_ORDER = ("reference", "torch", "triton", "cuda", "cpp", "cpp_select", "threads", "ray", "torch_native",
              "torch_eager", "torch_compile", "liger", "cce", "inf_cl", "faiss", "torch_topk")


def merge_json(json_paths) -> dict:
    """One pytest-benchmark document from several: run metadata of the first, every file's benchmarks."""
    merged, unreadable = None, []
    for path in json_paths:
        try:
            data = json.loads(Path(path).read_text())
        except ValueError as error:  # a bench run killed while writing: report the others, and say so
            unreadable.append({"nodeid": Path(path).name, "reason": f"unreadable JSON ({error})"})
            continue
        if merged is None:
            merged = dict(data, benchmarks=[], karma_skipped=[])
        merged["benchmarks"].extend(data.get("benchmarks", []))
        merged["karma_skipped"].extend(data.get("karma_skipped", []))
    merged = merged or {"benchmarks": [], "karma_skipped": []}
    merged["karma_skipped"].extend(unreadable)
    return merged


def _bench_file(nodeid: str) -> str:
    return nodeid.split("::")[0].rsplit("/", 1)[-1]


def skipped_by_op(data: dict, cases: list[dict]) -> dict:
    """Skipped cases (recorded by bench/conftest.py) grouped by op, then by reason: {op: {reason: count}}.
    A bench file none of whose cases ran is keyed by its file name."""
    op_of_file = {_bench_file(c["extra"].get("_nodeid", "")): c["op"] for c in cases}
    grouped = defaultdict(lambda: defaultdict(int))
    for skip in data.get("karma_skipped", []):
        file_name = _bench_file(skip["nodeid"])
        reason = skip["reason"] if "::" in skip["nodeid"] else f"the whole file: {skip['reason']}"
        grouped[op_of_file.get(file_name, file_name)][reason] += 1
    return grouped


def skip_lines(reasons: dict) -> list[str]:
    return [f"- not run ({count} case{'s' if count > 1 else ''}): {reason}" for reason, count in sorted(reasons.items())]


def load_cases(json_paths) -> tuple[list[dict], dict]:
    if isinstance(json_paths, (str, Path)):
        json_paths = [json_paths]
    data = merge_json(json_paths)
    cases = [_case(bench) for bench in data.get("benchmarks", [])]
    return [c for c in cases if c is not None], data


def _case(bench: dict) -> dict | None:
    info = dict(bench.get("extra_info") or {})
    params = bench.get("params") or {}
    name = bench.get("name", "")
    fullname = bench.get("fullname", name)
    function = name.split("[")[0]
    file_match = re.search(r"bench_(\w+)\.py", fullname)
    stats = bench.get("stats") or {}
    time_s = info.get("time_s") or stats.get("median")
    if time_s is None:
        return None
    shape = info.get("shape") or ",".join(f"{k}={v}" for k, v in params.items() if k not in ("impl", "dtype"))
    return {
        "op": info.get("op") or (file_match.group(1) if file_match else function),
        "impl": str(info.get("impl") or params.get("impl") or function.removeprefix("test_")),
        "shape": shape or "-",
        "size": info.get("size") or _shape_size(shape),
        "dtype": str(info.get("dtype") or params.get("dtype") or "-").replace("torch.", ""),
        "device": info.get("device") or "-",
        "mode": str(info.get("mode") or ""),
        "function": function,
        "time_s": float(time_s),
        "time_method": info.get("time_method") or "wall_clock",
        "peak_mem_bytes": info.get("peak_mem_bytes"),
        "flop_per_s": info.get("flop_per_s"),
        "flop_fraction": info.get("flop_fraction_of_peak"),
        "bytes_per_s": info.get("bytes_per_s"),
        "bytes_fraction": info.get("bytes_fraction_of_peak"),
        "extra": dict(info, _nodeid=fullname),
    }


def _shape_size(shape: str) -> float:
    numbers = [int(n) for n in re.findall(r"=(\d+)", shape or "")]
    return float(math.prod(numbers)) if numbers else float("nan")


def _disambiguate_modes(cases: list[dict]) -> None:
    """Two cases of one op with the same impl, shape, dtype, device and mode (e.g. a fwd test and a fwd+bwd
    test that both left ``mode`` unset) would overwrite each other: tell them apart by test function."""
    seen = defaultdict(set)
    for case in cases:
        seen[(case["op"], case["impl"], case["shape"], case["dtype"], case["device"], case["mode"])].add(
            case["function"])
    for case in cases:
        key = (case["op"], case["impl"], case["shape"], case["dtype"], case["device"], case["mode"])
        if len(seen[key]) > 1:
            case["mode"] = (case["mode"] + " " if case["mode"] else "") + case["function"].removeprefix("test_")


def _impl_sort_key(impl: str):
    return (IMPL_ORDER.index(impl), "") if impl in IMPL_ORDER else (len(IMPL_ORDER), impl)


def format_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def format_bytes(count) -> str:
    if count is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{int(count)} B"


def format_si(value: float, unit: str) -> str:
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def format_rate(case: dict) -> str:
    """Achieved FLOP/s and bytes/s (with the fraction of the device's ceiling), and any other ``*_per_s`` rate a
    bench file recorded (candidates_per_s, queries_per_s, ...)."""
    parts = []
    for rate_key, fraction_key, unit in (("flop_per_s", "flop_fraction", "FLOP/s"),
                                         ("bytes_per_s", "bytes_fraction", "B/s")):
        if case[rate_key]:
            text = format_si(case[rate_key], unit)
            if case[fraction_key]:
                text += f" ({100 * case[fraction_key]:.0f}% of peak)"
            parts.append(text)
    for key, value in sorted(case["extra"].items()):
        if key.endswith("_per_s") and key not in ("flop_per_s", "bytes_per_s") and isinstance(value, (int, float)):
            parts.append(format_si(value, key.removesuffix("_per_s") + "/s"))
    return ", ".join(parts)


def _ratio(value, base) -> str:
    if value is None or base is None or base == 0:
        return "n/a"
    ratio = value / base
    return f"{ratio:.2f}×" if ratio >= 0.1 else f"{ratio:.2g}×"


def op_table(op: str, cases: list[dict], baseline: str | None = None) -> str:
    impls = sorted({c["impl"] for c in cases}, key=_impl_sort_key)
    rows = defaultdict(dict)
    for case in cases:
        rows[(case["size"], case["shape"], case["dtype"], case["device"], case["mode"])][case["impl"]] = case
    show_mode = any(key[4] for key in rows)
    header = ["shape", "dtype", "device"] + (["mode"] if show_mode else []) + impls
    lines = [f"### {op}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    baselines_used = set()
    for key in sorted(rows, key=lambda k: (k[4], k[2], k[3], _nan_last(k[0]), k[1])):
        size, shape, dtype, device, mode = key
        row = rows[key]
        # a baseline named on the command line, else one a case declares (extra_info["baseline"]), else the default
        declared = [c["extra"]["baseline"] for c in row.values() if c["extra"].get("baseline")]
        preference = ([baseline] if baseline else []) + declared + list(BASELINE_PREFERENCE)
        row_baseline = next((impl for impl in preference if impl in row), None)
        if row_baseline:
            baselines_used.add(row_baseline)
        peers = [impl for impl in PEERS if impl in row and impl != row_baseline]
        best_peer = min(peers, key=lambda impl: row[impl]["time_s"]) if peers else None
        cells = [shape, dtype, device] + ([mode or "-"] if show_mode else [])
        for impl in impls:
            case = row.get(impl)
            if case is None:
                cells.append("–")
                continue
            cell = f"{format_time(case['time_s'])} · {format_bytes(case['peak_mem_bytes'])}"
            if impl == row_baseline:
                cell += "<br>(baseline)"
            elif row_baseline:
                base = row[row_baseline]
                cell += (f"<br>{_ratio(case['time_s'], base['time_s'])} time · "
                         f"{_ratio(case['peak_mem_bytes'], base['peak_mem_bytes'])} mem")
            if best_peer and impl in OURS:
                peer = row[best_peer]
                cell += (f"<br>vs best peer {best_peer}: {_ratio(case['time_s'], peer['time_s'])} time · "
                         f"{_ratio(case['peak_mem_bytes'], peer['peak_mem_bytes'])} mem")
            rate = format_rate(case)
            if rate:
                cell += f"<br>{rate}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    methods = sorted({c["time_method"] for c in cases})
    mem_methods = sorted({str(c["extra"].get("mem_method", "n/a")) for c in cases})
    lines += ["", f"Cells: median time · peak memory; ratios are against "
                  f"{' / '.join(sorted(baselines_used)) or 'no baseline (none present)'} in the same row "
                  f"(< 1× is better); ours also against the fastest other peer in the row. "
                  f"Timing: {', '.join(methods)}; memory: {', '.join(mem_methods)}."
                  + (" % of peak: against the ceiling of the math the kernel runs (bench/_ceilings.py: vendor "
                     "datasheet, dense; bf16/fp16 tensor cores, fp32 = IEEE FMA, not TF32)."
                     if any(c["flop_fraction"] or c["bytes_fraction"] for c in cases) else ""), ""]
    return "\n".join(lines)


def _nan_last(value):
    return float("inf") if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _shape_params(shape: str) -> dict:
    return dict(re.findall(r"(\w+)=([^,]+)", shape or ""))


def _shape_keys_outside_size(cases: list[dict]) -> list[str]:
    """Shape parameters that can change while the size stays the same (two cases of one implementation equal in
    everything else and in size): points that differ in them must not be joined into one line."""
    parsed = [(c["impl"], c["dtype"], c["device"], c["mode"], c["size"], _shape_params(c["shape"])) for c in cases]
    keys = sorted({k for *_, params in parsed for k in params})
    outside = []
    for key in keys:
        for i, a in enumerate(parsed):
            if any(a[:5] == b[:5] and a[5].get(key) != b[5].get(key)
                   and {k: v for k, v in a[5].items() if k != key} == {k: v for k, v in b[5].items() if k != key}
                   for b in parsed[i + 1:]):
                outside.append(key)
                break
    return outside


def plot_op(op: str, cases: list[dict], path: Path) -> bool:
    """Write the op's plot; False (and no file) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # colour = implementation, line style and marker = variant (dtype, device, mode: only those that vary, and
    # shape parameters that the size does not count, e.g. the shard count S of a search of fixed size)
    sized = [c for c in cases if _nan_last(c["size"]) != float("inf")]
    varying = [field for field in ("dtype", "device", "mode") if len({c[field] for c in sized}) > 1]
    extra_keys = _shape_keys_outside_size(sized)

    def variant_of(case):
        params = _shape_params(case["shape"])
        return " ".join([str(case[field]) for field in varying] + [f"{k}={params.get(k)}" for k in extra_keys])

    series = defaultdict(list)
    for case in sized:
        series[(case["impl"], variant_of(case))].append(case)
    impls = sorted({impl for impl, _ in series}, key=_impl_sort_key)
    variants = sorted({variant for _, variant in series})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers, line_styles = "osD^v<>", ("-", "--", ":", "-.")
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (impl, variant), points in sorted(series.items(), key=lambda item: (_impl_sort_key(item[0][0]), item[0][1])):
        v = variants.index(variant)
        style = dict(color=colors[impls.index(impl) % len(colors)], marker=markers[v % len(markers)],
                     linestyle=line_styles[v % len(line_styles)], label=f"{impl} {variant}".strip())
        points.sort(key=lambda c: c["size"])
        ax_time.plot([c["size"] for c in points], [c["time_s"] for c in points], **style)
        mem = [(c["size"], c["peak_mem_bytes"]) for c in points if c["peak_mem_bytes"]]
        if mem:
            ax_mem.plot([m[0] for m in mem], [m[1] / 2**20 for m in mem], **style)
    for ax, ylabel in ((ax_time, "median time (s)"), (ax_mem, "peak memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("problem size (extra_info size; default: product of the shape numbers)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.set_title(f"{op}: time")
    ax_mem.set_title(f"{op}: peak memory")
    handles, labels = ax_time.get_legend_handles_labels()
    if handles:
        columns = min(len(labels), 4)
        fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize="small")
        fig.tight_layout(rect=(0, 0.045 * (1 + (len(labels) - 1) // columns) + 0.02, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def build_report(json_paths, out_dir: Path, prefix: str = "", baselines=(), probe=None) -> tuple[str, list[Path]]:
    """``baselines``: "IMPL" (every op) or "OP=IMPL" entries; the last that applies to an op wins. ``probe``: a
    bench/gpu_probe.py JSON-lines file whose tables go first."""
    cases, data = load_cases(json_paths)
    _disambiguate_modes(cases)
    machine = data.get("machine_info") or {}
    commit = (data.get("commit_info") or {}).get("id", "")
    device = machine.get("karma_device") or "-"
    cpu = (machine.get("cpu") or {}).get("brand_raw", "")
    quick = " (quick mode: small shapes)" if machine.get("karma_quick") else ""
    parts = ["# karma benchmark report", "",
             f"Run {data.get('datetime', '?')} · device: {device}{f' · CPU: {cpu}' if cpu else ''}"
             f" · torch {machine.get('torch_version', '?')}"
             f"{f' · ' + machine['karma_versions'] if machine.get('karma_versions') else ''}"
             f"{f' · commit {commit[:10]}' if commit else ''}{quick}", ""]
    by_op = defaultdict(list)
    for case in cases:
        by_op[case["op"]].append(case)
    if not by_op:
        parts.append("No benchmark results in this file.")
    if probe is not None:
        from bench._probe_summary import read_records, summarize

        parts[4:4] = [summarize(read_records(probe)) if Path(probe).is_file() else f"## GPU probe\n\nno {probe}\n", ""]
    skipped = skipped_by_op(data, cases)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = []
    for op in sorted(by_op):
        png = out_dir / f"{prefix}{op}.png"
        plotted = plot_op(op, by_op[op], png)
        if plotted:
            pngs.append(png)
        baseline = None
        for entry in baselines:
            target_op, _, impl = entry.rpartition("=")
            if target_op in ("", op):
                baseline = impl
        parts += [op_table(op, by_op[op], baseline)] + skip_lines(skipped.pop(op, {}))
        parts += ["", f"![{op}: time and memory against size]({png.name})" if plotted
                  else "(no plot: matplotlib is not installed)", ""]
    for name, reasons in sorted(skipped.items()):  # bench files of which nothing ran
        parts += [f"### {name}", ""] + skip_lines(reasons) + [""]
    markdown = "\n".join(parts)
    (out_dir / "report.md").write_text(markdown)
    return markdown, pngs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("json_paths", type=Path, nargs="*", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: beside the JSON)")
    parser.add_argument("--prefix", default="", help="prefix of the PNG file names")
    parser.add_argument("--baseline", action="append", default=[], metavar="[OP=]IMPL",
                        help="implementation the ratios are against where present (repeatable; OP= for one op)")
    parser.add_argument("--merged-json", type=Path, default=None, help="also save the inputs combined here")
    parser.add_argument("--probe", type=Path, default=None, help="bench.gpu_probe JSON lines: tables at the top")
    args = parser.parse_args(argv)
    if not args.json_paths and args.probe is None:
        parser.error("give a benchmark JSON, a --probe file, or both")
    for path in args.json_paths:
        if not path.is_file():
            parser.error(f"no such file: {path}")
    out_dir = args.out if args.out is not None else (args.json_paths or [args.probe])[0].parent
    if args.merged_json is not None:
        args.merged_json.write_text(json.dumps(merge_json(args.json_paths), indent=1))
    markdown, pngs = build_report(args.json_paths, out_dir, args.prefix, args.baseline, args.probe)
    print(markdown)
    print(f"\nwrote {out_dir / 'report.md'} and {len(pngs)} plot(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
