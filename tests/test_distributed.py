"""Cross-rank negatives on 2 real processes (gloo on CPU) against the single-process loss on the whole batch.

One spawn runs every case: each rank computes its loss and gradients on its slice of a global batch and saves
them; the parent compares, case by case, with ``contrastive_loss`` on the concatenated batch (float64 reference
as the truth, tests/tolerances.py as the bound).
"""
import os
import socket
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from karma_kernels.contrastive.distributed import distributed_contrastive_loss, gather_keys
from karma_kernels.contrastive.op import contrastive_loss
from tolerances import assert_close_to_truth

WORLD = 2
DIM = 8
QUERY_COUNTS = (5, 3)  # unequal per-rank batches
KEY_COUNTS = (7, 4)  # and unequal key counts (extra keys are hard negatives)
# a float64 tensor: a python float would reach the reference as a float32 tensor
DDP_TEMPERATURE = torch.tensor(0.3, dtype=torch.float64)

CASES = {
    "softmax": dict(mode="softmax"),
    "softmax_ids_logq": dict(mode="softmax", key_ids=True, logq=True),
    "softmax_targets_f32": dict(mode="softmax", target=True, logq=True, dtype=torch.float32),
    "pairwise": dict(mode="pairwise"),
    "pairwise_ids_logq_targets": dict(mode="pairwise", key_ids=True, logq=True, target=True),
    "symmetric_ids_logq": dict(mode="softmax", symmetric=True, key_ids=True, logq=True, square=True),
    "sigmoid_ids_logq": dict(mode="sigmoid", key_ids=True, logq=True),  # SigLIP across ranks: gathered keys
}
BACKENDS = ("torch", "reference")
REDUCTIONS = ("sum", "mean", "none")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _case_inputs(name: str, spec: dict) -> dict:
    """The global batch of one case (every rank slices its part), float64 leaves."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    queries = QUERY_COUNTS
    keys = QUERY_COUNTS if spec.get("square") else KEY_COUNTS  # symmetric needs M_r == B_r
    total_q, total_k = sum(queries), sum(keys)
    inputs = {
        "query_counts": queries,
        "key_counts": keys,
        "query": torch.nn.functional.normalize(torch.randn(total_q, DIM, generator=generator, dtype=torch.float64), dim=1),
        "keys": torch.nn.functional.normalize(torch.randn(total_k, DIM, generator=generator, dtype=torch.float64), dim=1),
        "temperature": torch.tensor(0.2, dtype=torch.float64),
        # upstream gradient for reduction="none": distinct per row so a misplaced row shows
        "row_weights": torch.rand(total_q, generator=generator, dtype=torch.float64) + 0.5,
    }
    if spec.get("key_ids"):
        # few distinct ids so that positives repeat on the other rank (false negatives across ranks)
        inputs["key_ids"] = torch.randint(0, 4, (total_k,), generator=generator)
    if spec.get("logq"):
        inputs["logq"] = torch.log(torch.rand(total_k, generator=generator, dtype=torch.float64) * 0.9 + 0.05)
    if spec.get("target"):
        inputs["target"] = torch.cat([torch.randint(0, m, (b,), generator=generator)
                                      for b, m in zip(queries, keys)])  # local indices
    return inputs


def _slices(counts):
    starts = [sum(counts[:r]) for r in range(len(counts))]
    return [slice(s, s + c) for s, c in zip(starts, counts)]


def _leaf(x, dtype):
    return x.detach().to(dtype).requires_grad_(True)


def _run_rank_case(rank, inputs, spec, backend, reduction, process_group=None, loss_fn=None):
    dtype = spec.get("dtype", torch.float64)
    qs = _slices(inputs["query_counts"])[rank]
    ks = _slices(inputs["key_counts"])[rank]
    query = _leaf(inputs["query"][qs], dtype)
    keys = _leaf(inputs["keys"][ks], dtype)
    temperature = _leaf(inputs["temperature"], dtype)
    logq = _leaf(inputs["logq"][ks], dtype) if "logq" in inputs else None
    key_ids = inputs["key_ids"][ks] if "key_ids" in inputs else None
    target = inputs["target"][qs] if "target" in inputs else None
    loss_fn = loss_fn or distributed_contrastive_loss
    loss = loss_fn(query, keys, target, process_group=process_group, temperature=temperature, key_ids=key_ids,
                   logq=logq, mode=spec["mode"], symmetric=spec.get("symmetric", False), reduction=reduction,
                   backend=backend)
    if reduction == "none":
        loss.backward(inputs["row_weights"][qs].to(loss.dtype))
    else:
        loss.backward()
    return {"loss": loss.detach(), "query": query.grad, "keys": keys.grad, "temperature": temperature.grad,
            "logq": None if logq is None else logq.grad}


def _ddp_case(rank):
    """A shared two-tower projection under DDP: its averaged gradient must be the global-mean gradient."""
    from karma.distributed import average_gradients, wrap_ddp

    torch.manual_seed(0)
    model = torch.nn.Linear(DIM, DIM, dtype=torch.float64)
    ddp = wrap_ddp(model)
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(WORLD * 4, DIM, generator=generator, dtype=torch.float64)
    y = torch.randn(WORLD * 4, DIM, generator=generator, dtype=torch.float64)
    rows = slice(rank * 4, rank * 4 + 4)
    out = ddp(torch.cat([x[rows], y[rows]]))  # one forward: DDP expects one per backward
    loss = distributed_contrastive_loss(out[:4], out[4:], process_group=None, temperature=DDP_TEMPERATURE,
                                        mode="softmax", reduction="mean", backend="torch")
    loss.backward()
    # the same step without DDP: plain module, gradients averaged by hand
    torch.manual_seed(0)
    plain = torch.nn.Linear(DIM, DIM, dtype=torch.float64)
    out = plain(torch.cat([x[rows], y[rows]]))
    distributed_contrastive_loss(out[:4], out[4:], process_group=None, temperature=DDP_TEMPERATURE,
                                 mode="softmax", reduction="mean", backend="torch").backward()
    average_gradients(plain.parameters(), bucket_bytes=8 * DIM * 8)  # several buckets
    return {"ddp_type": type(ddp).__name__, "weight": model.weight.grad.clone(), "bias": model.bias.grad.clone(),
            "averaged": (plain.weight.grad.clone(), plain.bias.grad.clone())}


def _worker(rank, port, out_dir, cases):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from karma.distributed import cleanup, init_from_env, is_main, shard_indices

    env = init_from_env(timeout_s=120)
    results = {"env": (env.rank, env.world_size, env.backend, is_main()),
               "shard": shard_indices(11, env.rank, env.world_size, seed=3)}
    for key, (inputs, spec, backend, reduction) in cases.items():
        results[key] = _run_rank_case(rank, inputs, spec, backend, reduction)
    results["ddp"] = _ddp_case(rank)
    # an explicit group (not the default one) is honoured
    group = dist.new_group(ranks=list(range(WORLD)))
    inputs, spec, backend, reduction = cases[("softmax_ids_logq", "torch", "none")]
    results["explicit_group"] = _run_rank_case(rank, inputs, spec, backend, reduction, process_group=group)
    # the public op delegates here when given a process group
    results["via_contrastive_loss"] = _run_rank_case(rank, inputs, spec, backend, reduction,
                                                     process_group=dist.group.WORLD, loss_fn=contrastive_loss)
    # gather_keys on its own: rows in rank order, offset, and gradients routed back to the owner
    mine = torch.full((rank + 1, 2), float(rank + 1), dtype=torch.float64, requires_grad=True)
    ids = torch.arange(rank + 1) + 100 * rank
    all_keys, all_ids, all_logq, offset = gather_keys(mine, ids)
    weights = torch.arange(all_keys.shape[0] * 2, dtype=torch.float64).view(-1, 2) * (rank + 1)
    (all_keys * weights).sum().backward()
    results["gather"] = {"keys": all_keys.detach(), "ids": all_ids, "logq": all_logq, "offset": offset,
                         "grad": mine.grad}
    try:
        gather_keys(mine.detach(), key_counts=[5, 5])
    except ValueError as exc:
        results["bad_counts"] = str(exc)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    cleanup()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("dist"))
    cases = {}
    for name, spec in CASES.items():
        inputs = _case_inputs(name, spec)
        for backend in BACKENDS:
            for reduction in REDUCTIONS:
                cases[(name, backend, reduction)] = (inputs, spec, backend, reduction)
    mp.spawn(_worker, args=(_free_port(), out_dir, cases), nprocs=WORLD, join=True)
    ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    return cases, ranks


def _single_process(inputs, spec, backend, dtype, reduction):
    """Per-row loss and gradients of the whole batch in one process (targets shifted to global indices)."""
    query = _leaf(inputs["query"], dtype)
    keys = _leaf(inputs["keys"], dtype)
    temperature = _leaf(inputs["temperature"], dtype)
    logq = _leaf(inputs["logq"], dtype) if "logq" in inputs else None
    key_ids = inputs.get("key_ids")
    target = None
    if "target" in inputs:
        offsets = torch.cat([torch.full((b,), sum(inputs["key_counts"][:r]))
                             for r, b in enumerate(inputs["query_counts"])])
        target = inputs["target"] + offsets
    elif not spec.get("square"):
        # target=None on each rank pairs local query i with local key i
        target = torch.cat([torch.arange(b) + sum(inputs["key_counts"][:r])
                            for r, b in enumerate(inputs["query_counts"])])
    rows = contrastive_loss(query, keys, target, temperature=temperature, key_ids=key_ids, logq=logq,
                            mode=spec["mode"], symmetric=spec.get("symmetric", False), reduction="none",
                            backend=backend)
    # the upstream gradient that each rank's reduction applies to its own rows
    if reduction == "none":
        weights = inputs["row_weights"]
    elif reduction == "sum":
        weights = torch.ones(rows.shape[0], dtype=torch.float64)
    else:
        weights = torch.cat([torch.full((b,), 1.0 / b, dtype=torch.float64) for b in inputs["query_counts"]])
    rows.backward(weights.to(rows.dtype))
    return {"rows": rows.detach(), "query": query.grad, "keys": keys.grad, "temperature": temperature.grad,
            "logq": None if logq is None else logq.grad}


def _rank_view(ranks, key, reduction):
    """What the ranks produced, in the single-process layout."""
    per_rank = [r[key] for r in ranks]
    if reduction == "sum":
        loss = sum(p["loss"] for p in per_rank)
    elif reduction == "mean":
        loss = torch.stack([p["loss"] for p in per_rank])
    else:
        loss = torch.cat([p["loss"] for p in per_rank])
    view = {"loss": loss, "query": torch.cat([p["query"] for p in per_rank]),
            "keys": torch.cat([p["keys"] for p in per_rank]),
            "temperature": sum(p["temperature"] for p in per_rank)}
    if per_rank[0]["logq"] is not None:
        view["logq"] = torch.cat([p["logq"] for p in per_rank])
    return view


def _expected_loss(single, reduction, query_counts):
    rows = single["rows"]
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return torch.stack([rows[s].mean() for s in _slices(query_counts)])
    return rows


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_single_process(two_rank_results, case, backend, reduction):
    cases, ranks = two_rank_results
    inputs, spec, _, _ = cases[(case, backend, reduction)]
    dtype = spec.get("dtype", torch.float64)
    truth = _single_process(inputs, spec, "reference", torch.float64, reduction)
    same_dtype = _single_process(inputs, spec, backend, dtype, reduction)
    got = _rank_view(ranks, (case, backend, reduction), reduction)
    assert_close_to_truth(f"{case}/{backend}/{reduction} loss", got["loss"],
                          _expected_loss(truth, reduction, inputs["query_counts"]),
                          _expected_loss(same_dtype, reduction, inputs["query_counts"]), dtype)
    names = ["query", "keys", "temperature"] + (["logq"] if "logq" in inputs else [])
    for name in names:
        assert got[name] is not None, f"{name} received no gradient"
        assert_close_to_truth(f"{case}/{backend}/{reduction} d{name}", got[name], truth[name], same_dtype[name],
                              dtype)
    # the gradient really crossed ranks: every key got some, including keys no local query points at
    assert (got["keys"].abs().sum(dim=1) > 0).all()


def test_ddp_gradient_equals_global_mean_gradient(two_rank_results):
    _, ranks = two_rank_results
    assert ranks[0]["ddp"]["ddp_type"] == "DistributedDataParallel"
    torch.manual_seed(0)
    model = torch.nn.Linear(DIM, DIM, dtype=torch.float64)
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(WORLD * 4, DIM, generator=generator, dtype=torch.float64)
    y = torch.randn(WORLD * 4, DIM, generator=generator, dtype=torch.float64)
    loss = contrastive_loss(model(x), model(y), temperature=DDP_TEMPERATURE, reduction="mean", backend="reference")
    loss.backward()
    for rank in ranks:
        torch.testing.assert_close(rank["ddp"]["weight"], model.weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(rank["ddp"]["bias"], model.bias.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(rank["ddp"]["averaged"][0], model.weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(rank["ddp"]["averaged"][1], model.bias.grad, rtol=1e-10, atol=1e-12)


def test_explicit_group_and_public_op_give_the_same_result(two_rank_results):
    _, ranks = two_rank_results
    for result in ranks:
        default = result[("softmax_ids_logq", "torch", "none")]
        for other in ("explicit_group", "via_contrastive_loss"):
            for name in ("loss", "query", "keys", "temperature", "logq"):
                torch.testing.assert_close(result[other][name], default[name], rtol=0, atol=0,
                                           msg=lambda m: f"{other} {name}: {m}")


def test_gather_keys_order_offset_and_gradient_routing(two_rank_results):
    _, ranks = two_rank_results
    want_keys = torch.tensor([[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]], dtype=torch.float64)
    weights = torch.arange(6, dtype=torch.float64).view(3, 2)
    for rank, result in enumerate(ranks):
        gathered = result["gather"]
        torch.testing.assert_close(gathered["keys"], want_keys, rtol=0, atol=0)
        assert gathered["ids"].tolist() == [0, 100, 101]
        assert gathered["logq"] is None
        assert gathered["offset"] == [0, 1][rank]
        # d/d(mine) of sum_r sum(all_keys * weights * (r + 1)) = 3 * weights[own rows]
        own = slice(0, 1) if rank == 0 else slice(1, 3)
        torch.testing.assert_close(gathered["grad"], 3 * weights[own], rtol=0, atol=0)
        assert "key_counts must list every rank's row count" in result["bad_counts"]


def test_env_helpers_under_two_ranks(two_rank_results):
    _, ranks = two_rank_results
    assert [r["env"] for r in ranks] == [(0, 2, "gloo", True), (1, 2, "gloo", False)]
    shards = [r["shard"] for r in ranks]
    assert len(shards[0]) == len(shards[1]) == 6  # padded to ceil(11 / 2) each
    assert set(shards[0]) | set(shards[1]) == set(range(11))


def test_single_process_is_a_pass_through():
    assert not dist.is_initialized()
    keys = torch.randn(4, 3)
    ids = torch.arange(4)
    out_keys, out_ids, out_logq, offset = gather_keys(keys, ids)
    assert out_keys is keys and out_ids is ids and out_logq is None and offset == 0
    query = torch.randn(4, 3, dtype=torch.float64)
    keys = torch.randn(6, 3, dtype=torch.float64)
    torch.testing.assert_close(distributed_contrastive_loss(query, keys, backend="reference"),
                               contrastive_loss(query, keys, backend="reference"), rtol=0, atol=0)


def test_bad_inputs_raise_clear_errors():
    keys = torch.randn(4, 3)
    with pytest.raises(ValueError, match="keys must be 2-D"):
        gather_keys(keys[0])
    with pytest.raises(ValueError, match="key_ids must have one entry per key"):
        gather_keys(keys, torch.arange(3))
    with pytest.raises(TypeError, match="key_ids must be an integer"):
        gather_keys(keys, torch.zeros(4))
    with pytest.raises(ValueError, match="logq must have one entry per key"):
        gather_keys(keys, logq=torch.zeros(5))
    with pytest.raises(TypeError, match="keys must be a torch.Tensor"):
        gather_keys(keys.numpy())


def test_shard_indices_and_single_process_env(monkeypatch):
    from karma.distributed import batch_slice, cleanup, init_from_env, is_main, shard_indices, unwrap, wrap_ddp

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = init_from_env()
    assert (env.rank, env.world_size, env.backend) == (0, 1, None) and not dist.is_initialized()
    assert is_main()
    module = torch.nn.Linear(2, 2)
    assert wrap_ddp(module) is module and unwrap(module) is module
    cleanup()  # nothing to tear down: must not raise
    assert shard_indices(5, 0, 1) == [0, 1, 2, 3, 4]
    # strided, equal lengths, padded by wrapping (or cut with drop_last), covering every example
    parts = [shard_indices(10, r, 4) for r in range(4)]
    assert parts == [[0, 4, 8], [1, 5, 9], [2, 6, 0], [3, 7, 1]]
    assert [shard_indices(10, r, 4, drop_last=True) for r in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    shuffled = [shard_indices(10, r, 3, seed=1) for r in range(3)]
    assert set(sum(shuffled, [])) == set(range(10)) and len({len(p) for p in shuffled}) == 1
    assert shuffled == [shard_indices(10, r, 3, seed=1) for r in range(3)]  # same seed, same split
    with pytest.raises(ValueError, match="rank must be in"):
        shard_indices(10, 4, 4)
    # batch_slice: contiguous parts of a shared draw, in rank order, sizes within one
    assert [batch_slice(10, r, 4) for r in range(4)] == [slice(0, 3), slice(3, 6), slice(6, 8), slice(8, 10)]
    assert batch_slice(8, 1, 2) == slice(4, 8) and batch_slice(5, 0, 1) == slice(0, 5)
    with pytest.raises(ValueError, match="batch_slice"):
        batch_slice(8, 2, 2)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        init_from_env()
