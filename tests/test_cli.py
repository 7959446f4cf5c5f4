"""The ``karma`` command end to end on tiny data: train, eval, resume, ablate, on the generated log and on a
MovieLens-layout directory written here; bad configs and malformed files give exit code 2 and a message that
names the field or the file and line."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from karma.cli import VARIANTS, build_parser, command_eval, main  # noqa: E402
from karma.baselines import BASELINES  # noqa: E402
from karma.train import ExperimentConfig  # noqa: E402

QUIET = ["--quiet", "--threads", "1"]


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def write_config(path, **sections):
    ExperimentConfig.tiny().replace(**sections).save(str(path))
    return str(path)


def write_movielens(directory, num_items=30, num_users=12, seed=0):
    """A tiny MovieLens-100k layout: u.item with genre flags, u.data with timestamps (out of order in the file)."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "u.item"), "w", encoding="latin-1") as handle:
        for item in range(1, num_items + 1):
            flags = ["0"] * 19
            flags[item % 19] = "1"
            flags[(3 * item) % 19] = "1"
            handle.write(f"{item}|Movie number {item} ({1980 + item % 20})|01-Jan-{1980 + item % 20}||http://x|"
                         + "|".join(flags) + "\n")
    with open(os.path.join(directory, "u.data"), "w", encoding="latin-1") as handle:
        for user in range(1, num_users + 1):
            items = rng.choice(np.arange(1, num_items + 1), size=8, replace=False)
            for step in rng.permutation(8):
                handle.write(f"{user}\t{items[step]}\t{rng.integers(1, 6)}\t{880000000 + 60 * step}\n")
    return str(directory)


def test_train_then_eval_reproduces_the_metrics(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", "--config", write_config(tmp_path / "c.json"), "--out", run] + QUIET) == 0
    for name in ("config.json", "tokenizer.json", "model.safetensors", "optimizer.safetensors", "metrics.json"):
        assert os.path.exists(os.path.join(run, name)), name
    with open(os.path.join(run, "metrics.json")) as handle:
        saved = json.load(handle)
    assert len(saved["history"]) == ExperimentConfig.tiny().train.steps
    assert set(saved["history"][0]) >= {"action", "generation", "reconstruction", "image", "total"}
    with open(os.path.join(run, "baselines.json")) as handle:   # the rows printed beside karma's
        assert [r["variant"] for r in json.load(handle)["results"]] == [f"baseline: {n}" for n in BASELINES]
    metrics = command_eval(build_parser().parse_args(["eval", "--run", run]), say=lambda *a: None)
    for name in ("HR@10", "HR@50", "HR@200", "NDCG@10", "AUC", "decodability", "sink_ratio"):
        assert metrics[name] == pytest.approx(saved["test"][name], rel=1e-5, abs=1e-7), name
    assert main(["eval", "--run", run, "--split", "valid"]) == 0
    assert "HR@200" in capsys.readouterr().out


def test_resume_through_the_cli(tmp_path):
    config = write_config(tmp_path / "c.json", train={"pretrain_steps": 0, "log_every": 1})
    run = str(tmp_path / "run")
    assert main(["train", "--config", config, "--out", run, "--steps", "2"] + QUIET) == 0
    assert main(["train", "--config", config, "--out", run, "--steps", "4", "--resume"] + QUIET) == 0
    with open(os.path.join(run, "trainer_state.json")) as handle:
        state = json.load(handle)
    assert state["step"] == 4 and len(state["history"]) == 4


def test_ablate_on_generated_data(tmp_path, capsys):
    out = str(tmp_path / "ablate")
    assert main(["ablate", "--preset", "tiny", "--out", out, "--action-mode", "pairwise"] + QUIET) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(out, "ablation.md")) as handle:
        table = handle.read()
    assert table.strip() in printed
    assert "variants are cumulative" in printed
    first = table.split("### per slice")[0]
    rows = [line for line in first.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [row.split("|")[1].strip() for row in rows] == list(VARIANTS) + [
        "baseline: popularity", "baseline: item-kNN", "baseline: Markov", "baseline: SASRec"]
    assert "HR@10 cold" in table and "paired differences" in table
    assert os.path.getsize(os.path.join(out, "ablation.png")) > 10_000
    # every variant keeps a checkpoint that karma eval reads
    run = os.path.join(out, "full-karma-image", "seed0")
    assert main(["eval", "--run", run, "--no-baselines"]) == 0
    with open(os.path.join(out, "ablation.json")) as handle:
        results = json.load(handle)["results"]
    assert results[0]["objectives"] == {"action": 1.0, "generation": 0.0, "reconstruction": 0.0, "image": 0.0}
    assert all(0.0 <= r["metrics"]["HR@10"] <= 1.0 for r in results)


def test_ablate_over_seeds_reports_mean_and_spread(tmp_path):
    out = str(tmp_path / "ablate")
    assert main(["ablate", "--preset", "tiny", "--out", out, "--seeds", "2", "--variants", "+generation"] + QUIET) == 0
    with open(os.path.join(out, "ablation.json")) as handle:
        (result,) = json.load(handle)["results"]
    assert [run["seed"] for run in result["runs"]] == [0, 1]
    per_seed = np.array([run["metrics"]["probe_decodability"] for run in result["runs"]])
    assert result["metrics"]["probe_decodability"] == pytest.approx(per_seed.mean())
    assert result["metrics_std"]["probe_decodability"] == pytest.approx(per_seed.std(ddof=1))
    with open(os.path.join(out, "ablation.md")) as handle:
        assert " ± " in handle.read()


def test_movielens_layout_end_to_end(tmp_path, capsys):
    data = write_movielens(tmp_path / "ml")
    run = str(tmp_path / "run")
    assert main(["train", "--preset", "tiny", "--data-path", data, "--out", run] + QUIET) == 0
    assert "has no image features" in capsys.readouterr().out
    out = str(tmp_path / "ablate")
    assert main(["ablate", "--preset", "tiny", "--data-path", data, "--out", out] + QUIET) == 0
    with open(os.path.join(out, "ablation.json")) as handle:
        results = json.load(handle)["results"]
    assert [r["variant"] for r in results] == list(VARIANTS)[:3]   # the +image variant needs image features
    assert all(r["metrics"]["AUC"] != r["metrics"]["AUC"] for r in results)  # no impressions: AUC is NaN
    assert main(["eval", "--run", run, "--no-baselines"]) == 0
    printed = capsys.readouterr().out
    assert "AUC: n/a (the data has no impressions" in printed and "image_cos: n/a (the data has no image" in printed
    with open(os.path.join(run, "config.json")) as handle:   # no synthetic-only fields in a MovieLens run
        assert "num_users" not in json.load(handle)["data"]


def test_baselines_command_both_protocols(tmp_path, capsys):
    out = str(tmp_path / "b")
    assert main(["baselines", "--preset", "tiny", "--out", out, "--names", "popularity", "Markov"] + QUIET) == 0
    printed = capsys.readouterr().out
    assert "protocol kept" in printed and "protocol masked" in printed
    with open(os.path.join(out, "baselines.json")) as handle:
        results = json.load(handle)["results"]
    assert [(r["variant"], r["protocol"]) for r in results] == [
        ("baseline: popularity", "kept"), ("baseline: Markov", "kept"),
        ("baseline: popularity", "masked"), ("baseline: Markov", "masked")]


def test_python_dash_m_and_console_script():
    done = subprocess.run([sys.executable, "-m", "karma", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ablate" in done.stdout
    script = shutil.which("karma", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the karma console script is not installed (pip install -e .)")
    done = subprocess.run([script, "ablate", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--variants" in done.stdout


def test_two_process_torchrun_trains_like_one_process(tmp_path):
    # Same global batch split over 2 gloo ranks, cross-rank negatives, averaged gradients: the loss curve must be
    # the single-process one (the image objective is off: its noise is drawn per rank).
    config = write_config(tmp_path / "c.json", objectives={"image": 0},
                          train={"batch_size": 16, "pretrain_steps": 2, "log_every": 1, "steps": 4})
    single, double = str(tmp_path / "one"), str(tmp_path / "two")
    assert main(["train", "--config", config, "--out", single] + QUIET) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "karma",
                           "train", "--config", config, "--out", double] + QUIET,
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stdout
    histories = []
    for run in (single, double):
        with open(os.path.join(run, "metrics.json")) as handle:
            histories.append(json.load(handle)["history"])
    for a, b in zip(*histories):
        for name in ("action", "generation", "reconstruction", "total"):
            assert b[name] == pytest.approx(a[name], rel=1e-4), (a["step"], name)


@pytest.mark.parametrize("args, message", [
    (["--set", "model.hiden_size=3"], "model.hiden_size: unknown field"),
    (["--set", "train.batch_size=0"], "train.batch_size must be a positive integer"),
    (["--set", "train.steps=-1"], "train.steps must be an integer >= 0"),
    (["--set", "hidden_size=3"], "expected section.field=value"),
    (["--set", "objectives.action_mode=listwise"], "objectives.action_mode"),
    (["--data", "movielens"], "data.path is required"),
])
def test_bad_configs_exit_2_naming_the_field(tmp_path, capsys, args, message):
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "run")] + QUIET + args) == 2
    assert message in capsys.readouterr().err


def test_bad_files_exit_2_naming_the_line(tmp_path, capsys):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"train": {"steps": 3},\n "model": {hidden_size: 4}}\n')
    assert main(["train", "--config", str(bad_json), "--out", str(tmp_path / "r")] + QUIET) == 2
    assert f"{bad_json}:2: not valid JSON" in capsys.readouterr().err

    data = write_movielens(tmp_path / "ml")
    with open(os.path.join(data, "u.data"), "a", encoding="latin-1") as handle:
        handle.write("5\t7\n")
    lines = sum(1 for _ in open(os.path.join(data, "u.data"), encoding="latin-1"))
    assert main(["ablate", "--preset", "tiny", "--data-path", data, "--out", str(tmp_path / "a")] + QUIET) == 2
    assert f"u.data:{lines}: expected 4 tab-separated fields" in capsys.readouterr().err

    assert main(["eval", "--run", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "fresh"), "--resume"] + QUIET) == 2
    assert "--resume: no checkpoint" in capsys.readouterr().err
