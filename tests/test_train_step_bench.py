"""bench/bench_train_step.py compares like with like: the fused and unfused KARMA steps compute the same losses and
gradients, and its CLI prints the side-by-side table. A tiny shape; asserts nothing about speed."""
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the train-step bench needs transformers (pip install -e '.[hf]')")
pytest.importorskip("pytest_benchmark", reason="bench/conftest.py needs pytest-benchmark (pip install -e '.[bench]')")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench import bench_train_step as bench  # noqa: E402

sys.path.remove(str(REPO))


def gradients(trainer, variant):
    trainer.model.zero_grad(set_to_none=True)
    losses = trainer.losses(variant)
    losses["total"].backward()
    return ({name: loss.detach() for name, loss in losses.items()},
            {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None})


def test_fused_and_unfused_steps_compute_the_same_losses_and_gradients(torch_one_thread):
    trainer = bench.TrainStep(bench.TINY, "cpu")
    batch = trainer.batch
    batch["negatives"][0, 0] = batch["target"][1]   # a false negative: masked by item id in both variants
    batch["negatives"][2, 1] = batch["target"][2]   # a row's own positive shown again
    fused_losses, fused_grads = gradients(trainer, "fused")
    plain_losses, plain_grads = gradients(trainer, "unfused")
    assert set(fused_losses) == {"action", "generation", "reconstruction", "total"}
    for name in fused_losses:
        torch.testing.assert_close(fused_losses[name], plain_losses[name], msg=name)
    assert set(fused_grads) == set(plain_grads)
    # every part of the model is trained: backbone, item tower, interest head, prefix projector
    for part in ("backbone.model.embed_tokens", "item_mlp", "item_to_token", "interest_token", "interest_head",
                 "prefix_projector", "backbone.model.layers.1"):
        assert any(name.startswith(part) for name in fused_grads), part
    for name in fused_grads:  # fp32 sums in another order: error relative to the tensor's scale
        error = (fused_grads[name] - plain_grads[name]).abs().max()
        assert error <= 1e-4 * plain_grads[name].abs().max() + 1e-8, (name, error)
    # the masked false negative matters: without the mask the unfused action loss differs
    trainer.batch["negatives"][0, 0] = (batch["target"][1] + 1) % bench.TINY.catalog
    assert not torch.allclose(trainer.losses("unfused")["action"], plain_losses["action"])
    with pytest.raises(ValueError, match="variant must be one of"):
        trainer.losses("compiled")


def test_step_trains_and_compare_reports_both_variants(torch_one_thread):
    trainer = bench.TrainStep(bench.TINY, "cpu")
    before = trainer.model.interest_head.weight.detach().clone()
    loss = trainer.step("fused")
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert not torch.equal(before, trainer.model.interest_head.weight)
    results = bench.compare(replace(bench.TINY, vocab=300), "cpu", rounds=2)
    for variant in bench.VARIANTS:
        row = results[variant]
        assert row["time_s"] > 0 and row["rounds"] == 2
        assert row["mem_method"] in ("rss_sampler", "unavailable")
        assert row["peak_mem_bytes"] is None or row["peak_mem_bytes"] >= 0


def test_cli_prints_the_markdown_table(capsys, torch_one_thread):
    table = bench.main(["--tiny", "--vocab", "300", "700", "--rounds", "1", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert table in printed
    assert "| shape | variant | step time | peak memory | time vs unfused | memory vs unfused |" in table
    for vocab in (300, 700):
        assert f"| V={vocab},D=32,layers=2,B=6,H=5,L=4 | fused |" in table
        assert f"| V={vocab},D=32,layers=2,B=6,H=5,L=4 | unfused |" in table
    for bad in (["--rounds", "0"], ["--vocab", "2"], ["--hidden", "30", "--heads", "8"], ["--device", "tpu"]):
        with pytest.raises(SystemExit):
            bench.main(bad)


def test_peak_memory_counts_the_steps_own_gradients(torch_one_thread):
    """The step's new gradients are part of its peak: the previous step's are dropped before the reading, so the
    step cannot refill their pages unseen (read in-process, the peak once missed them)."""
    shape = replace(bench.TINY, vocab=40000)   # a 5 MiB embedding / LM head: its gradient is a page-sized fact
    results = bench.compare(shape, "cpu", rounds=2)
    trainer = bench.TrainStep(shape, "cpu")
    gradient_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad)
    for variant in bench.VARIANTS:
        if results[variant]["mem_method"] == "rss_sampler":
            assert results[variant]["peak_mem_bytes"] >= gradient_bytes, variant


def test_live_peak_counts_what_is_live_at_once(torch_one_thread):
    """bench/_mem.live_peak_bytes: the most bytes live at once among the call's own allocations (a free of memory
    made before the call does not count), and the CLI's --live column."""
    from bench._mem import live_peak_bytes

    before = torch.empty(300_000)

    def call():
        nonlocal before
        a = torch.empty(1_000_000)
        b = torch.empty(500_000)
        del a
        before = None                     # freed inside the call, allocated outside it
        c = torch.empty(2_000_000)
        return b.numel() + c.numel()

    result, peak = live_peak_bytes(call)
    assert result == 2_500_000 and peak == 4 * 2_500_000
    results = bench.compare(replace(bench.TINY, vocab=4000), "cpu", rounds=1, live=True)
    for variant in bench.VARIANTS:
        assert results[variant]["live_peak_bytes"] > 0, variant
    table = bench.markdown_table({replace(bench.TINY, vocab=4000): results}, "cpu")
    assert "live peak (profiler) | live vs unfused |" in table and table.count("x |") >= 4
