"""CI smoke test of the benchmark suite: every bench file runs in quick mode and records the common extra_info,
and bench.report turns the JSON into tables and plots. Asserts nothing about speed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install -e '.[bench]')")

REPO = Path(__file__).resolve().parents[1]
BENCH_FILES = sorted((REPO / "bench").glob("bench_*.py"))
QUICK_BENCH_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def quick_bench_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    env = dict(os.environ, KARMA_BENCH_QUICK="1", PYTHONPATH=str(REPO))
    # The tests' conftest sets TRITON_INTERPRET=1 without CUDA; the bench must see the machine as users do.
    env.pop("TRITON_INTERPRET", None)
    command = [sys.executable, "-m", "pytest", "bench", "--benchmark-only", f"--benchmark-json={out}",
               "-q", "-rs", "-p", "no:cacheprovider"]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=QUICK_BENCH_TIMEOUT_S)
    assert run.returncode == 0, f"quick bench failed ({run.returncode}):\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
    return out


def test_bench_files_exist():
    assert BENCH_FILES, "no bench/bench_*.py files"


def test_every_bench_file_records_the_common_extra_info(quick_bench_json):
    from bench.report import REQUIRED_EXTRA_INFO

    document = json.loads(quick_bench_json.read_text())
    benchmarks = document["benchmarks"]
    assert isinstance(document.get("karma_skipped"), list), "bench/conftest.py did not record skipped cases"
    for bench_file in BENCH_FILES:
        cases = [b for b in benchmarks if f"{bench_file.name}::" in b["fullname"]]
        assert cases, f"{bench_file.name} produced no benchmark case in quick mode"
        for case in cases:
            info = case["extra_info"]
            missing = [key for key in REQUIRED_EXTRA_INFO if key not in info]
            assert not missing, f"{case['fullname']}: extra_info lacks {missing}"
            assert info["time_s"] and info["time_s"] > 0, f"{case['fullname']}: time_s={info['time_s']!r}"
            assert isinstance(info["peak_mem_bytes"], int) and info["peak_mem_bytes"] >= 0, \
                f"{case['fullname']}: peak_mem_bytes={info['peak_mem_bytes']!r} ({info['mem_method']})"


def test_report_writes_tables_and_plots(quick_bench_json, tmp_path):
    out_dir = tmp_path / "report"
    run = subprocess.run([sys.executable, "-m", "bench.report", str(quick_bench_json), "--out", str(out_dir)],
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    markdown = (out_dir / "report.md").read_text()
    assert markdown.strip() in run.stdout
    ops = {b["extra_info"].get("op") for b in json.loads(quick_bench_json.read_text())["benchmarks"]}
    for op in filter(None, ops):
        assert f"### {op}" in markdown, f"no table for {op}"
        png = out_dir / f"{op}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"


def test_topk_merge_vs_faiss_script_runs_and_checks_its_arguments(capsys):
    pytest.importorskip("faiss", reason="faiss is not installed (pip install faiss-cpu)")
    sys.path.insert(0, str(REPO))
    try:
        from bench.topk_merge_vs_faiss import main
    finally:
        sys.path.remove(str(REPO))
    main(["--shards", "3", "--queries", "40", "--k", "5", "--calls", "2", "--warmup", "1", "--threads", "1"])
    printed = capsys.readouterr().out
    assert "S=3 Q=40 k=5, 1 thread(s), 2 alternating calls" in printed
    assert "faiss / karma:" in printed and "(medians)" in printed
    main(["--shards", "3", "--queries", "1", "--k", "5", "--calls", "2", "--warmup", "1", "--threads", "1", "--torch"])
    assert "ours on torch tensors" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--k", "0"])
