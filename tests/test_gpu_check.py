"""bench/gpu_check.sh, the one script for a lent GPU machine: its worst-case budget (stage limits plus kill-after,
read off ``--plan``) stays within 6 minutes, and on this CPU machine it runs end to end in its quick rehearsal
mode, every GPU stage skipping with a reason, leaving at most 8 files (what the device tool brings back).
Also the pieces the report relies on: the probe's summary of a cut-off file, the best-peer ratios, a missing
matplotlib."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
BUDGET_S = 360
STAGE_ORDER = ["env", "wheels", "install", "install_cpu", "probe", "karma_train", "probe_topk", "tests",
               "bench_contrastive", "bench_linear_ce", "bench_topk_merge", "report"]
LANES = {"install": "build", "install_cpu": "build", "probe": "probe", "karma_train": "probe"}  # side by side


def _env(**extra):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO), **extra)
    env.pop("TRITON_INTERPRET", None)  # the script must see the machine as a user's shell does
    return env


def _plan(**extra):
    run = subprocess.run(["bash", str(SCRIPT), "--plan"], cwd=REPO, env=_env(**extra), capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    stages = [(m[0], int(m[1]), int(m[2]), m[3] or None) for m in
              re.findall(r"^stage (\S+)\s+limit=(\d+) kill_after=(\d+)(?: lane=(\w+))?$", run.stdout, re.MULTILINE)]
    worst = int(re.search(r"^worst_case_s=(\d+) budget_s=(\d+)", run.stdout, re.MULTILINE).group(1))
    return stages, worst, run.stdout


def test_plan_budget_fits_six_minutes_and_orders_the_stages():
    stages, worst, text = _plan()
    assert [name for name, *_ in stages] == STAGE_ORDER
    assert {name: lane for name, _, _, lane in stages if lane} == LANES
    serial = sum(limit + kill for _, limit, kill, lane in stages if lane is None)
    lanes = {}
    for _, limit, kill, lane in stages:
        if lane:
            lanes[lane] = lanes.get(lane, 0) + limit + kill
    assert worst == serial + max(lanes.values())
    assert worst <= BUDGET_S, text
    assert "OVER BUDGET" not in text
    assert 'tests/test_topk_merge.py' in text.split("gpu tests:")[1].split("\n")[0]  # the CUDA top-K first
    assert "cuda_matches_reference" in text


def test_plan_counts_an_overridden_limit_and_flags_an_overrun():
    stages, worst, _ = _plan()
    limits = {name: limit for name, limit, *_ in stages}
    _, raised, text = _plan(LIMIT_TESTS=str(limits["tests"] + BUDGET_S))
    assert raised == worst + BUDGET_S
    assert "OVER BUDGET" in text
    # a lane counts by its longest: the probe lane takes over once it is longer than the build lane
    kill = 3
    build_lane = limits["install"] + limits["install_cpu"] + 2 * kill
    probe = build_lane + 100
    _, probe_longest, _ = _plan(LIMIT_PROBE=str(probe))
    assert probe_longest == worst - build_lane + (probe + kill) + (limits["karma_train"] + kill)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the script's real run is the check, not the CPU rehearsal")
    out = tmp_path_factory.mktemp("gpu_check")
    run = subprocess.run(["bash", str(SCRIPT), "--quick", str(out)], cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=400)
    return out, run


def test_quick_rehearsal_runs_every_stage_on_cpu(rehearsal):
    out, run = rehearsal
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert run.returncode == 0, f"{run.stdout[-4000:]}\n{run.stderr[-2000:]}\n{log[-4000:]}"
    lines = (out / "summary.txt").read_text().splitlines()
    names = [line.split()[0] for line in lines]
    assert sorted(names) == sorted(STAGE_ORDER)  # the build lane's lines land while the probe runs
    serial = [name for name in names if name not in LANES]
    assert serial == [name for name in STAGE_ORDER if name not in LANES]
    for line in lines:
        name, status = line.split()[:2]
        assert status in ("ok", "SKIPPED"), line
        if status == "SKIPPED":
            assert len(line.split("s  ", 1)[-1].strip()) > 10, f"{name} skipped without a reason: {line}"
    assert "no CUDA device" in next(line for line in lines if line.startswith("tests"))
    # the GPU test selection still names existing tests: the CUDA top-K parity and the bf16 Triton parity ones
    collected = (out / "gpu_check.log").read_text().split("===== tests", 1)[1].split("=====", 1)[0]
    assert "test_topk_merge.py::test_cuda_matches_reference[" in collected
    assert re.search(r"test_contrastive.py::test_triton_path\[", collected)
    assert re.search(r"test_linear_ce.py::test_triton_path\w*\[.*bfloat16", collected)
    assert len(list(out.iterdir())) <= 8, sorted(p.name for p in out.iterdir())


def test_rehearsal_probe_records_are_json_lines_with_reasons(rehearsal):
    out, _ = rehearsal
    records = [json.loads(line) for line in (out / "probe.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert {"env", "ceiling", "op", "kernel", "grad_check", "skip", "done"} <= kinds, kinds
    assert not [r for r in records if r["kind"] == "error"], [r for r in records if r["kind"] == "error"]
    assert all(r.get("rehearsal") is True for r in records)
    assert all(r["reason"] for r in records if r["kind"] == "skip")
    ops = {(r["op"], r["phase"]) for r in records if r["kind"] == "op"}
    assert {("contrastive", "fwd"), ("contrastive", "bwd"), ("linear_ce", "fwd+bwd"), ("topk_merge", "merge")} <= ops
    checks = [r for r in records if r["kind"] == "grad_check"]
    assert {r["tensor"] for r in checks} >= {"d_query", "d_keys", "d_hidden", "d_weight"}
    assert all(r["ok"] for r in checks), checks  # the torch path in fp16 against the float64 truth


def test_rehearsal_report_holds_the_probe_and_the_skip_reasons(rehearsal):
    out, _ = rehearsal
    report = (out / "report.md").read_text()
    assert "## GPU probe" in report and "| grad check |" in report
    document = json.loads((out / "bench.json").read_text())
    reasons = {skip["reason"] for skip in document["karma_skipped"]}
    assert any("KARMA_BENCH_GPU_ONLY=1 and no CUDA device" in reason for reason in reasons), reasons


def test_probe_summary_ignores_a_line_cut_off_by_a_kill(tmp_path):
    from bench._probe_summary import read_records, summarize

    path = tmp_path / "probe.jsonl"
    record = {"kind": "op", "op": "linear_ce", "impl": "triton", "shape": "N=8192,D=2304,V=256000",
              "dtype": "bfloat16", "phase": "fwd", "time_s": 0.012, "flop_per_s": 8.0e14,
              "fraction_of_ceiling": 0.81, "peak_mem_bytes": 2**30}
    path.write_text(json.dumps(record) + "\n" + '{"kind": "op", "op": "contr')
    records = read_records(path)
    assert records == [record]
    assert "| linear_ce | triton | N=8192,D=2304,V=256000 | bfloat16 | fwd | 12 ms | 800 TFLOP/s | 81% | 1024 MiB |" \
        in summarize(records)


def _bench(impl, time_s, mem, baseline=None):
    info = {"op": "linear_ce", "impl": impl, "shape": "N=8192,D=2304,V=256000", "dtype": "bfloat16",
            "device": "cuda", "peak_mem_bytes": mem, "mem_method": "cuda_allocator", "time_s": time_s}
    if baseline:
        info["baseline"] = baseline
    return {"name": f"test_linear_ce_fwd_bwd[{impl}]", "fullname": f"bench/bench_linear_ce.py::{impl}",
            "extra_info": info, "stats": {"median": time_s}}


def test_report_ratios_against_eager_baseline_and_best_peer(tmp_path, monkeypatch):
    from bench import report

    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"benchmarks": [_bench("triton", 0.030, 100, "torch_eager"),
                                               _bench("torch_eager", 0.060, 800, "torch_eager"),
                                               _bench("liger", 0.040, 300), _bench("cce", 0.050, 200)]}))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # a machine without matplotlib: tables, no plots
    markdown, pngs = report.build_report([path], tmp_path)
    assert pngs == [] and "(no plot: matplotlib is not installed)" in markdown
    triton_cell = next(line for line in markdown.splitlines() if line.startswith("| N=8192")).split(" | ")[3]
    assert "0.50× time · 0.12× mem" in triton_cell  # against torch_eager
    assert "vs best peer liger: 0.75× time · 0.33× mem" in triton_cell


def test_report_survives_a_bench_json_cut_off_by_a_kill(tmp_path, monkeypatch):
    from bench import report

    good, cut = tmp_path / "bench_linear_ce.json", tmp_path / "bench_topk_merge.json"
    good.write_text(json.dumps({"benchmarks": [_bench("triton", 0.030, 100)]}))
    cut.write_text('{"benchmarks": [{"name": "test_topk')
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    markdown, _ = report.build_report([good, cut], tmp_path)
    assert "### linear_ce" in markdown
    assert "### bench_topk_merge.json" in markdown and "unreadable JSON" in markdown
