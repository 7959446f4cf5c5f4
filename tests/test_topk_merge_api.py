"""topk_merge as an API: the errors bad inputs get (wrapper and direct op calls), op registration (opcheck,
torch.compile), the missing-extension fall-back. Parity lives in tests/test_topk_merge.py."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from karma_kernels import topk_merge
from tests.test_topk_merge import compiled_extension  # noqa: F401 (an autouse fixture: the built extension)
from tests.test_topk_merge import ROOT, make_shards


def test_bad_inputs_raise_clear_errors():
    d = np.zeros((2, 3, 4), np.float32)
    i = np.zeros((2, 3, 4), np.int64)
    bad = [
        (dict(distances=d, ids=i[:, :, :3]), ValueError, r"ids has shape \(2, 3, 3\) but distances has shape"),
        (dict(distances=list(d), ids=list(i[:, :, :3])), ValueError, r"ids\[0\] has shape"),
        (dict(distances=d, ids=i[:1]), ValueError, "distances has 2 shards but ids has 1"),
        (dict(distances=[d[0], d[1][:2]], ids=[i[0], i[1][:2]]), ValueError, "same number of queries"),
        (dict(k=0), ValueError, "k must be >= 1"),
        (dict(k=-3), ValueError, "k must be >= 1"),
        (dict(k=2.0), TypeError, "k must be an int"),
        (dict(k=True), TypeError, "k must be an int"),
        (dict(k=2**63), ValueError, r"k must be <= 2\^31-1, got 9223372036854775808"),
        (dict(k=2**62), ValueError, r"k must be <= 2\^31-1"),
        (dict(k=2**40), ValueError, r"k must be <= 2\^31-1"),
        (dict(k=2**31 - 1), ValueError, r"k = 2147483647 exceeds the 8 candidates per query"),
        (dict(distances=list(d), ids=list(i), k=2**30), ValueError, r"k = 1073741824 exceeds the 8 candidates"),
        (dict(distances=d.astype(np.longdouble)), TypeError, r"distances must be float32.*got numpy (float128|longdouble|float96)"),
        (dict(distances=list(d.astype(np.longdouble))), TypeError, r"distances\[0\] must be float32"),
        (dict(distances=d.astype(object)), TypeError, r"distances must be float32.*got numpy object"),
        (dict(ids=i.astype(np.int32)), TypeError, r"ids must be int64"),
        (dict(distances=d.astype(np.int64)), TypeError, r"distances must be float32"),
        (dict(distances=list(d), ids=list(i.astype(np.int32))), TypeError, r"ids\[0\] must be int64"),
        (dict(distances=list(d.astype(np.int64)), ids=list(i)), TypeError, r"distances\[0\] must be float32"),
        (dict(distances=[d[0], d[1].astype(np.float64)], ids=list(i)), TypeError, "use one dtype"),
        (dict(ids=torch.from_numpy(i)), TypeError, "distances is numpy but ids is torch"),
        (dict(distances=[d[0], torch.from_numpy(d[1])]), TypeError, "mixes numpy arrays and torch tensors"),
        (dict(distances=d[0], ids=i[0]), ValueError, "must be 3-D"),
        (dict(distances=[d], ids=[i]), ValueError, r"distances\[0\] must be 2-D"),
        (dict(distances=[], ids=[]), ValueError, "at least one shard"),
        (dict(distances=d[:0], ids=i[:0]), ValueError, "at least one shard"),
        (dict(distances="x"), TypeError, "distances must be a numpy array"),
        (dict(id_offsets=[0, 1, 2]), ValueError, r"id_offsets must have one entry per shard, shape \(2,\)"),
        (dict(id_offsets=[0.0, 1.5]), TypeError, "id_offsets must hold integers"),
        (dict(id_offsets=np.array([0.0, 1.5])), TypeError, "id_offsets must hold integers"),
        (dict(id_offsets="01"), TypeError, "id_offsets must be a list of ints"),
        (dict(id_offsets=torch.tensor([0.0, 1.0])), TypeError, "id_offsets must hold integers"),
        (dict(metric="cosine"), ValueError, "metric must be one of"),
        (dict(sorted="yes"), TypeError, "sorted must be a bool"),
        (dict(dedup=1), TypeError, "dedup must be a bool"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ]
    for overrides, error, message in bad:
        kwargs = dict(distances=d, ids=i, k=2)
        kwargs.update(overrides)
        with pytest.raises(error, match=message):
            topk_merge(kwargs.pop("distances"), kwargs.pop("ids"), kwargs.pop("k"), **kwargs)


def test_compiled_op_direct_call_checks_inputs_too():
    d = [torch.zeros(3, 4)]
    with pytest.raises(ValueError, match="k must be >= 1"):
        torch.ops.karma.topk_merge(d, [torch.zeros(3, 4, dtype=torch.int64)], 0, False, None, True, False)
    with pytest.raises(TypeError, match="must be int64"):
        torch.ops.karma.topk_merge(d, [torch.zeros(3, 4, dtype=torch.int32)], 2, False, None, True, False)
    # The stacked form: one (S, Q, k_s) tensor each.
    stacked = [torch.zeros(2, 3, 4)]
    with pytest.raises(ValueError, match=r"ids\[0\] has shape"):
        torch.ops.karma.topk_merge(stacked, [torch.zeros(2, 3, 5, dtype=torch.int64)], 2, False, None, True, False)
    with pytest.raises(ValueError, match=r"id_offsets must have shape \(2,\)"):
        torch.ops.karma.topk_merge(stacked, [torch.zeros(2, 3, 4, dtype=torch.int64)], 2, False,
                                   torch.zeros(3, dtype=torch.int64), True, False)
    with pytest.raises(ValueError, match="at least one shard"):
        torch.ops.karma.topk_merge([torch.zeros(0, 3, 4)], [torch.zeros(0, 3, 4, dtype=torch.int64)], 2, False,
                                   None, True, False)


@pytest.mark.parametrize("op", ["topk_merge", "topk_merge_warp_emulated"])
def test_compiled_op_direct_call_caps_k(op):
    """The Python wrapper's caps on k hold for a direct torch.ops call (no huge allocation, no overflow), in the
    CPU op and in the argument code the CUDA binding shares with the host build."""
    call = getattr(torch.ops.karma, op)
    stacked, stacked_ids = [torch.zeros(2, 3, 4)], [torch.zeros(2, 3, 4, dtype=torch.int64)]
    for k in (2**62, 2**40, 2**31):
        with pytest.raises(ValueError, match=rf"k must be <= 2\^31-1, got {k}"):
            call(stacked, stacked_ids, k, False, None, True, False)
    with pytest.raises(ValueError, match=r"k = 2147483647 exceeds the 8 candidates per query"):
        call(stacked, stacked_ids, 2**31 - 1, False, None, True, False)
    shards, shard_ids = [torch.zeros(3, 4), torch.zeros(3, 2)], [torch.zeros(3, 4, dtype=torch.int64)] * 2
    with pytest.raises(ValueError, match=r"k = 1073741824 exceeds the 6 candidates per query"):
        call(shards, [shard_ids[0], shard_ids[1][:, :2]], 2**30, False, None, True, False)
    out_distances, out_ids = call(stacked, stacked_ids, 20, False, None, True, False)  # past the 8: padded
    assert out_distances.shape == (3, 20) and (out_ids[:, 8:] == -1).all()


def test_opcheck_and_torch_compile():
    rng = np.random.default_rng(7)
    distances, ids = make_shards(rng, 3, 6, [4, 2, 5], tie_levels=3, padding_rate=0.2)
    d = [torch.from_numpy(x) for x in distances]
    i = [torch.from_numpy(x) for x in ids]
    offsets = torch.tensor([0, 5000, 10000])
    stacked_d = [torch.from_numpy(np.stack([x[:, :2] for x in distances]))]  # the stacked form
    stacked_i = [torch.from_numpy(np.stack([x[:, :2] for x in ids]))]
    for args in ((d, i, 7, False, offsets, True, False), (d, i, 3, True, None, False, True),
                 (stacked_d, stacked_i, 4, False, offsets, True, False)):
        torch.library.opcheck(torch.ops.karma.topk_merge.default, args)

    def merge(a, b, c, ia, ib, ic):
        out_distances, out_ids = torch.ops.karma.topk_merge([a, b, c], [ia, ib, ic], 7, False, offsets, True, False)
        return out_distances * 1, out_ids

    compiled = torch.compile(merge, fullgraph=True, backend="aot_eager")
    got = compiled(*d, *i)
    want = topk_merge(d, i, 7, id_offsets=offsets)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_missing_extension_warns_once_and_falls_back_to_the_reference():
    script = textwrap.dedent("""
        import sys, warnings
        import numpy as np
        sys.modules["karma_kernels._C"] = None  # as if the extension were not built
        from karma_kernels import topk_merge
        from karma_kernels.topk_merge import topk_merge_reference
        d = np.array([[[0.3, 0.1]], [[0.2, 0.4]]], np.float32)
        i = np.array([[[1, 2]], [[3, 4]]])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = topk_merge(d, i, 3, sorted=False)
            second = topk_merge(d, i, 3, sorted=False)
        runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(runtime) == 1, [str(w.message) for w in caught]
        assert "pip install --no-build-isolation -e ." in str(runtime[0].message)
        assert first[1].tolist() == [[2, 3, 1]] and second[1].tolist() == [[2, 3, 1]]
        try:
            topk_merge(d, i, 3, backend="compiled")
        except ValueError as error:
            assert "not built" in str(error)
        else:
            raise AssertionError("backend='compiled' without the extension must raise")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_the_python_wrapper_compiles_with_fullgraph():
    """torch.compile(fullgraph=True) of topk_merge itself (not only of the op), on a fresh interpreter so that
    the extension is loaded inside the traced call."""
    code = textwrap.dedent("""
        import torch
        from karma_kernels import topk_merge
        d = [torch.tensor([[0.1, 0.3], [0.2, 0.4]]), torch.tensor([[0.0, 0.5], [0.3, 0.6]])]
        i = [torch.tensor([[1, 2], [3, 4]]), torch.tensor([[5, 6], [7, 8]])]
        compiled = torch.compile(lambda a, b: topk_merge([a, d[1]], [b, i[1]], 3, id_offsets=[0, 10]),
                                 fullgraph=True, backend="aot_eager")
        out_d, out_i = compiled(d[0], i[0])
        want_d, want_i = topk_merge(d, i, 3, id_offsets=[0, 10])
        assert torch.equal(out_i, want_i) and torch.equal(out_d, want_d), (out_i, want_i)
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
