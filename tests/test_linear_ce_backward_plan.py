"""The backward's plan (``karma_kernels/linear_ce/backward_plan.py``): fp32 sums kept inside the fp16/bf16 dWeight
output. The planner's invariants over a grid of shapes; parity of the in-place layout (every stage, the shrinking
bands of stage 3 and the final separate scratch) with the fp64 truth and with one full fp32 buffer; the falls
back; and every allocation the backward makes."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from karma_kernels import linear_cross_entropy
from karma_kernels.linear_ce.backward_plan import ALIGN_BYTES, TAIL_ROWS, plan_backward, plan_deterministic
from tests.conftest import TRITON_DEVICE
from tests.linear_ce_cases import check_against_truth, make_inputs

HALF = [torch.float16, torch.bfloat16]


# ------------------------------------------------------------------------------------------------ the planner

def _check_plan(vocab, hidden_rows, dim, band, tile, need_hidden, split=0):
    plan = plan_backward(vocab, hidden_rows, dim, band, tile, elem_bytes=2, need_hidden=need_hidden,
                         need_weight=True, hidden_split=split)
    written = [0] * vocab           # dWeight rows written (cast from their fp32 sums)
    hidden_seen = [0] * vocab       # rows whose dHidden product was added
    acc = plan.hidden_acc_row
    acc_busy = acc is not None
    acc_rows = -(-hidden_rows * (dim - split) * 2 // dim)      # fp32 sums of dHidden's columns [split, D)
    if acc is not None:
        assert plan.hidden_split == split
        assert (acc * dim * 2) % ALIGN_BYTES == 0
        assert 0 <= acc and acc + acc_rows <= vocab
        spare = range(plan.spare_row, plan.spare_row + plan.spare_rows)
        assert plan.spare_rows == 2 * band and spare.start >= acc + acc_rows and spare.stop <= vocab
        assert all(s.v_start + s.v_count <= acc for s in plan.steps if s.stage == 1), "spare rows written early"
    stages = [s.stage for s in plan.steps]
    assert stages == sorted(stages), "stages run in order"
    for step in plan.steps:
        band_rows = range(step.v_start, step.v_start + step.v_count)
        assert step.v_count > 0 and 0 <= step.v_start and band_rows.stop <= vocab
        if step.stage == 3 and acc_busy:
            acc_busy = False        # dHidden is cast out before the first stage-3 step
        if step.need_hidden and need_hidden:
            for r in band_rows:
                hidden_seen[r] += 1
        if step.stage == 2:
            assert step.scratch_row is None
            continue
        if step.scratch_row is None:
            assert plan.layout != "in_place" or step.v_count <= plan.separate_rows <= TAIL_ROWS
        else:
            lo, hi = step.scratch_row, step.scratch_row + 2 * step.v_count
            assert (lo * dim * 2) % ALIGN_BYTES == 0, f"scratch at row {lo} not aligned"
            assert 0 <= lo and hi <= vocab
            assert hi <= step.v_start or lo >= band_rows.stop, "scratch overlaps its band"
            assert not any(written[lo:hi]), "scratch overlaps written rows"
            if acc_busy:
                assert hi <= acc or lo >= acc + acc_rows, "scratch overlaps the dHidden accumulator"
        for r in band_rows:
            assert not written[r]
            if acc_busy:
                assert not acc <= r < acc + acc_rows, "a row written over the live dHidden accumulator"
            written[r] = 1
    assert written == [1] * vocab, "every row written exactly once"
    if need_hidden:
        assert hidden_seen == [1] * vocab, "every row's dHidden product added exactly once"
    separate = plan.separate_rows * dim * 4
    gradients = vocab * dim * 2 + (hidden_rows * dim * 2 if need_hidden else 0)
    hidden_acc = hidden_rows * dim * 4 if need_hidden and acc is None else 0
    if plan.layout == "in_place":
        assert plan.peak_bytes == gradients + separate + hidden_acc
        assert plan.recomputed_rows == (plan.reserved_rows if acc is not None else 0)
        t = acc_rows + 2 * band
        if need_hidden and t + 16 <= vocab:
            assert acc is not None and plan.reserved_rows < t + 16    # t rounded up by at most the alignment
    else:
        assert plan.layout == "bands" and plan.separate_rows == band
        assert plan.peak_bytes == gradients + separate + hidden_acc
    return plan


def test_plan_invariants_over_a_grid_of_shapes():
    layouts = set()
    for vocab, hidden_rows, dim, band, tile, need_hidden, half in itertools.product(
            (7, 100, 481, 3000), (1, 13, 64, 700), (3, 32, 40, 2304), (32, 64, 1792), (16, 32, 128), (True, False),
            (False, True)):
        if band % tile or band >= vocab:
            continue
        plan = _check_plan(vocab, hidden_rows, dim, band, tile, need_hidden, split=dim // 2 // 8 * 8 if half else 0)
        layouts.add((plan.layout, plan.hidden_acc_row is not None))
    assert layouts == {("in_place", True), ("in_place", False), ("bands", False)}


def test_plan_at_the_benchmark_shapes_stays_at_cut_cross_entropys_peak():
    """N=8192, D=2304, V=256000 and N=16384, D=4096, V=128256 bf16 (bands of 16 MiB, GPU tiles of 128 rows, dHidden
    split at D / 2): the peak is the two bf16 gradients + the last few rows' fp32 scratch, at most CCE's dE + dC +
    its 1 MB vocabulary order; the logits of the last t = N + 2 R rows are computed twice."""
    from karma_kernels.linear_ce.triton_configs import backward_launches

    for n, d, v, band, extra in ((8192, 2304, 256000, 1792, 0.046), (16384, 4096, 128256, 1024, 0.144)):
        plan = _check_plan(v, n, d, band, 128, True, split=d // 2)
        launched = backward_launches(n, v, d, "bf16", on_gpu=True, deterministic=False, has_bias=False,
                                     has_softcap=False, filtering=True, need_hidden=True, need_weight=True,
                                     need_bias=False)[0].extra["plan"]
        assert launched == plan
        cce = (v + n) * d * 2 + 4 * v
        assert plan.layout == "in_place" and plan.peak_bytes <= cce
        assert plan.reserved_rows == n + 2 * band
        assert abs(plan.recomputed_rows / v - extra) < 1e-3 and plan.masked_rows < 8 * 128


def test_plan_falls_back_and_rejects_bad_sizes():
    assert plan_backward(100, 4, 8, 64, 32, elem_bytes=2, need_hidden=True, need_weight=True).layout == "bands"
    assert plan_backward(100, 4, 8, 64, 32, elem_bytes=4, need_hidden=True, need_weight=True).layout == "full"
    assert plan_backward(900, 4, 8, 64, 32, elem_bytes=2, need_hidden=True, need_weight=True,
                         full_buffer=True).layout == "full"
    assert plan_backward(900, 4, 8, 64, 32, elem_bytes=2, need_hidden=True, need_weight=True,
                         scattered=True).layout == "bands"
    with pytest.raises(ValueError, match="plan_backward"):
        plan_backward(0, 4, 8, 64, 32, elem_bytes=2, need_hidden=True, need_weight=True)


# ------------------------------------------------------------------------------- the in-place layout, run

# D = 32, bands of 32 rows (4 * 32 * 32 bytes), interpreter tiles of 32 rows, 32 tokens: T = 64 + 64 rows, so
# V = 256 runs stage 1 (4 bands), stage 2, stage 3 (32, 32, 21, 14, 9, 6 rows) and a 14-row separate tail.
# D = 64 (two interpreter D blocks): dHidden's first block keeps its fp32 sums in the dHidden output itself, the
# second in T = 32 + 64 rows: stage 1 (5 bands), stage 2, stage 3 (32, 21, 14, 9, 6 rows) and a 14-row tail.
N, D, V, BAND_BYTES = 32, 32, 256, 4 * 32 * 32
D_SPLIT = 64


@pytest.fixture
def small_bands(monkeypatch):
    """32-row fp32 bands at D = 32 (and, the interpreter's one-tile minimum, at D = 64)."""
    from karma_kernels.linear_ce import triton_configs

    monkeypatch.setattr(triton_configs, "BAND_BYTES", BAND_BYTES)


def _plan_of(n, v, dim=D):
    from karma_kernels.linear_ce.triton_configs import backward_launches

    return backward_launches(n, v, dim, "bf16", on_gpu=TRITON_DEVICE != "cpu", deterministic=False, has_bias=False,
                             has_softcap=False, filtering=False, need_hidden=True, need_weight=True,
                             need_bias=False)[0].extra["plan"]


def _op(**fixed):
    def fn(hidden, weight, target, **options):
        return linear_cross_entropy(hidden, weight, target, backend="triton", **fixed, **options)
    return fn


def _grads(inputs, **options):
    leaves = {k: inputs[k].detach().clone().requires_grad_() for k in ("hidden", "weight")}
    loss = linear_cross_entropy(leaves["hidden"], leaves["weight"], inputs["target"], backend="triton", **options)
    loss.backward()
    return leaves["hidden"].grad, leaves["weight"].grad


def _assert_same_up_to_fp32_rounding(got, want, name):
    """Same fp32 sums, summed in another order: equal, or one rounding step of the output dtype apart, rarely."""
    assert got.dtype == want.dtype
    differ = got != want
    ulp = torch.finfo(got.dtype).eps * want.float().abs().clamp_min(torch.finfo(got.dtype).tiny)
    assert ((got.float() - want.float()).abs() <= ulp)[differ].all(), f"{name}: more than one rounding step apart"
    assert differ.float().mean() <= 0.01, f"{name}: {int(differ.sum())} entries differ"


@pytest.mark.parametrize("filter_eps", ["auto", 0.0])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_in_place_layout_matches_the_truth_and_one_fp32_buffer(dtype, filter_eps, small_bands):
    plan = _plan_of(N, V, D_SPLIT)
    stages = [s.stage for s in plan.steps]
    assert plan.layout == "in_place" and plan.hidden_split == 32 and plan.reserved_rows == 32 + 64
    assert stages.count(1) == 5 and 2 in stages and stages.count(3) >= 5 and plan.separate_rows > 0
    assert any(s.stage == 3 and s.scratch_row is not None and s.v_count < 32 for s in plan.steps)
    inputs = make_inputs(N, D_SPLIT, V, dtype, ignore_every=5, logit_scale=3.0, device=TRITON_DEVICE)
    check_against_truth(_op(filter_eps=filter_eps), inputs, dtype, label=f"in place {filter_eps}")
    in_place = _grads(inputs, filter_eps=filter_eps)
    full = _grads(inputs, filter_eps=filter_eps, accum_dtype="fp32")
    for got, want, name in zip(in_place, full, ("dhidden", "dweight")):
        _assert_same_up_to_fp32_rounding(got, want, name)


def test_in_place_layout_with_bias_softcap_and_smoothing(small_bands):
    """D = 32: dHidden's fp32 sums wholly in the dWeight output (T = 64 + 64 rows)."""
    plan = _plan_of(N, V)
    assert plan.hidden_split == 0 and plan.hidden_acc_row is not None and plan.reserved_rows == 128
    inputs = make_inputs(N, D, V, torch.bfloat16, bias=True, ignore_every=7, device=TRITON_DEVICE)
    check_against_truth(_op(), inputs, torch.bfloat16, label="in place + options", softcap=5.0,
                        label_smoothing=0.1)


@pytest.mark.parametrize("n,v,layout", [(32, 100, "in_place"), (32, 48, "bands")])
def test_too_many_tokens_for_the_vocabulary_falls_back(n, v, layout, small_bands):
    """2 N + 2 R > V: dHidden keeps its own fp32 buffer (the band stays in place while 2 R <= V)."""
    plan = _plan_of(n, v)
    assert plan.layout == layout and plan.hidden_acc_row is None
    inputs = make_inputs(n, D, v, torch.float16, ignore_every=6, device=TRITON_DEVICE)
    check_against_truth(_op(), inputs, torch.float16, label=f"fall back V={v}")
    for got, want, name in zip(_grads(inputs), _grads(inputs, accum_dtype="fp32"), ("dhidden", "dweight")):
        _assert_same_up_to_fp32_rounding(got, want, name)


@pytest.mark.parametrize("wanted", ["hidden", "weight", "both"])
def test_one_gradient_only_and_a_row_index_map(wanted, small_bands):
    """With shift=1 (hidden rows mapped to tokens: N + 1 rows of dHidden in place), against one full fp32 buffer;
    dWeight only: the band alone moves into the gradient; dHidden only: one step, its own fp32 buffer."""
    inputs = make_inputs(N + 1, D, V, torch.bfloat16, ignore_every=5, device=TRITON_DEVICE)
    names = ("hidden", "weight") if wanted == "both" else (wanted,)
    grads = []
    for options in (dict(), dict(accum_dtype="fp32")):
        leaves = {k: inputs[k].detach().clone().requires_grad_(k in names) for k in ("hidden", "weight")}
        linear_cross_entropy(leaves["hidden"], leaves["weight"], inputs["target"], backend="triton", shift=1,
                             **options).backward()
        grads.append([leaves[k].grad for k in names])
    for got, want, name in zip(*grads, names):
        assert got.abs().sum() > 0
        _assert_same_up_to_fp32_rounding(got, want, f"d{name}")


def test_hidden_sums_cast_within_their_own_output_in_chunks():
    """dHidden's columns [0, split) summed in fp32 inside the fp16/bf16 output's own rows, the rest inside the
    dWeight output: the final cast (here in 5 chunks staged through 4 free band rows) gives exactly the cast of
    the fp32 sums."""
    from karma_kernels.linear_ce.triton_impl import _HiddenSums

    plan = plan_backward(64, 40, 8, 2, 1, elem_bytes=2, need_hidden=True, need_weight=True, hidden_split=4)
    assert plan.hidden_split == 4 and plan.spare_rows * 8 // 4 == 8
    gen = torch.Generator().manual_seed(5)
    grad_weight = torch.randn(64, 8, generator=gen).to(torch.bfloat16)
    sums = _HiddenSums(plan, grad_weight, torch.empty(40, 8, dtype=torch.bfloat16))
    assert not sums.first.any() and not sums.second.any()
    sums.first.copy_(torch.randn(40, 4, generator=gen))
    sums.second.copy_(torch.randn(40, 4, generator=gen))
    want = torch.cat([sums.first, sums.second], 1).to(torch.bfloat16)
    got = sums.finish(grad_weight, plan, torch.bfloat16)
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------- allocations

class _Allocations(TorchDispatchMode):
    """Bytes of every new storage an aten op returns (views of existing storages are not allocations)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen and storage.nbytes():
                seen.add(storage.data_ptr())
                self.sizes.append((str(func), storage.nbytes()))
        return out


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


def test_backward_allocates_the_two_gradients_and_nothing_gradient_sized(small_bands):
    """Every allocation of the bf16 backward: the dWeight and dHidden outputs, and otherwise only buffers of
    at most the final scratch (<= TAIL_ROWS fp32 rows) or O(N + V) vectors. Before the in-place layout it also
    allocated an fp32 band (32 rows here) and an fp32 dHidden accumulator (32 rows)."""
    from karma_kernels.linear_ce import triton_impl

    inputs = make_inputs(N, D_SPLIT, V, torch.bfloat16, ignore_every=5, device=TRITON_DEVICE)
    hidden, weight, target = inputs["hidden"], inputs["weight"], inputs["target"]
    _, stats = triton_impl.forward(hidden, weight, target)
    with _Allocations() as log:
        grad_hidden, grad_weight, _ = triton_impl.backward(torch.tensor(0.5), hidden, weight, target, stats,
                                                           filter_eps=0.0)
    small = max(_plan_of(N, V, D_SPLIT).separate_rows * D_SPLIT * 4, 8 * N, 4 * V)   # the tail, O(N + V)
    large = sorted(size for _, size in log.sizes if size > small)
    assert large == sorted([V * D_SPLIT * 2, N * D_SPLIT * 2]), log.sizes
    assert grad_weight.dtype == grad_hidden.dtype == torch.bfloat16
    assert grad_weight.float().abs().sum() > 0 and grad_hidden.float().abs().sum() > 0


# ----------------------------------------------------------------------------------- the deterministic pair

def test_deterministic_plan_invariants_over_a_grid_of_shapes():
    """dHidden's kernel first (its fp32 sums at row 0 while they fit), then dWeight in shrinking bands over the
    whole vocabulary: every row written once, no scratch over its band or a written row, the peak = the two
    gradients + the tail (+ dHidden's own fp32 buffer when it does not fit)."""
    layouts = set()
    for vocab, hidden_rows, dim, band, tile, need_hidden in itertools.product(
            (7, 100, 481, 3000), (1, 13, 64, 700), (3, 32, 2304), (32, 1792), (16, 128), (True, False)):
        plan = plan_deterministic(vocab, hidden_rows, dim, band, tile, elem_bytes=2, need_hidden=need_hidden,
                                  need_weight=True)
        layouts.add((plan.layout, plan.hidden_acc_row is not None))
        stages = [s.stage for s in plan.steps]
        assert stages == ([2] if need_hidden else []) + [3] * (len(stages) - need_hidden)
        if plan.layout == "full":
            assert 2 * band >= vocab and plan.steps[-1] == plan.steps[-1].__class__(3, 0, vocab, None)
            continue
        acc_rows = -(-hidden_rows * dim * 4 // (dim * 2))
        assert (plan.hidden_acc_row == 0) == (need_hidden and acc_rows <= vocab)
        written = [0] * vocab
        for step in plan.steps[need_hidden:]:
            rows = range(step.v_start, step.v_start + step.v_count)
            if step.scratch_row is None:
                assert step.v_count <= plan.separate_rows <= TAIL_ROWS
            else:
                lo, hi = step.scratch_row, step.scratch_row + 2 * step.v_count
                assert (lo * dim * 2) % ALIGN_BYTES == 0 and hi <= rows.start and not any(written[lo:hi])
            assert not any(written[r] for r in rows)
            for r in rows:
                written[r] = 1
        assert written == [1] * vocab
        own_hidden = hidden_rows * dim * 4 if need_hidden and plan.hidden_acc_row is None else 0
        assert plan.peak_bytes == (vocab + (hidden_rows if need_hidden else 0)) * dim * 2 + \
            plan.separate_rows * dim * 4 + own_hidden
    assert layouts == {("in_place", True), ("in_place", False), ("full", False)}
    # CCE's benchmark shape with 16 MiB bands: the two bf16 gradients + a 16-row tail (was one fp32 [V, D] buffer)
    plan = plan_deterministic(256000, 8192, 2304, 1792, 128, elem_bytes=2, need_hidden=True, need_weight=True)
    assert plan.peak_bytes == (256000 + 8192) * 2304 * 2 + plan.separate_rows * 2304 * 4 < 1.22e9


def _deterministic_backward(inputs):
    """The deterministic backward of these inputs (forward run here, outside any allocation log)."""
    from karma_kernels.linear_ce import triton_impl

    hidden, weight, target, bias = inputs["hidden"], inputs["weight"], inputs["target"], inputs.get("bias")
    _, stats = triton_impl.forward(hidden, weight, target, bias=bias)
    return lambda **options: triton_impl.backward(torch.tensor(0.5), hidden, weight, target, stats, bias=bias,
                                                  deterministic=True, filter_eps=0.0, **options)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_deterministic_pair_in_place_matches_one_fp32_buffer(dtype, small_bands):
    """The deterministic kernels with their fp32 sums in the dWeight output (dHidden at row 0, then shrinking
    dWeight bands down to the separate tail) give the same gradients as with one fp32 [V, D] buffer (the same
    per-tile sums in the same order: equal up to the output's rounding), bias included, and allocate nothing
    gradient-sized besides the two gradients."""
    from karma_kernels.linear_ce.triton_configs import backward_launches

    plan = backward_launches(N, V, D, "bf16", on_gpu=False, deterministic=True, has_bias=True, has_softcap=False,
                             filtering=False, need_hidden=True, need_weight=True, need_bias=True)[0].extra["plan"]
    assert plan.layout == "in_place" and plan.hidden_acc_row == 0 and plan.separate_rows > 0
    assert sum(s.stage == 3 and s.scratch_row is not None for s in plan.steps) >= 4
    inputs = make_inputs(N, D, V, dtype, bias=True, ignore_every=5, logit_scale=3.0, device=TRITON_DEVICE)
    backward = _deterministic_backward(inputs)
    with _Allocations() as log:
        got = backward()
    full = backward(accum_dtype="fp32")
    for g, w, name in zip(got, full, ("dhidden", "dweight", "dbias")):
        assert g.abs().sum() > 0, name
        _assert_same_up_to_fp32_rounding(g, w, name)
    small = max(plan.separate_rows * D * 4, 8 * N, 4 * V)
    assert sorted(size for _, size in log.sizes if size > small) == sorted([V * D * 2, N * D * 2]), log.sizes
