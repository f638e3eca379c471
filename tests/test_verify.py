"""The checker itself: a test that cannot fail is a defect, so show that wrong answers fail."""

import pytest
import torch

from pykernels.harness import verify
from pykernels.kernels import AttentionProblem, DecodeProblem, GemmProblem

CASES = [
    GemmProblem(33, 65, 127),
    AttentionProblem(1, 4, 2, 65, 64, causal=True),
    DecodeProblem(3, 8, 2, 50, 64, paged=True, block_size=16, ragged=True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("problem", CASES, ids=lambda p: p.family)
def test_wrong_answers_fail(problem, dtype):
    x = problem.make_inputs(dtype)
    exp = verify.expected(problem, x)
    good = exp.reference.to(dtype)
    assert exp.check(good)[1]
    assert not exp.check(torch.zeros_like(good))[1]
    assert not exp.check(good * 1.05)[1]
    bad = good.clone()
    bad.view(-1)[-1] += 0.1 * exp.reference.abs().max().item()  # one element off: the last row or column
    assert not exp.check(bad)[1]
    nan = good.clone()
    nan.view(-1)[0] = float("nan")
    assert not exp.check(nan)[1]


def test_causal_flag_matters():
    p = AttentionProblem(1, 2, 1, 40, 64, causal=True)
    x = p.make_inputs(torch.float32)
    exp = verify.expected(p, x)
    non_causal = verify.FAMILIES["attention"].reference(**x, causal=False)
    assert not exp.check(non_causal)[1]


def test_inputs_are_seeded():
    p = GemmProblem(8, 8, 8)
    assert torch.equal(p.make_inputs(torch.float32, seed=1)["a"], p.make_inputs(torch.float32, seed=1)["a"])
    assert not torch.equal(p.make_inputs(torch.float32, seed=1)["a"], p.make_inputs(torch.float32, seed=2)["a"])


def test_flop_and_byte_counts():
    assert GemmProblem(2, 3, 4).flops() == 2 * 2 * 3 * 4
    assert GemmProblem(2, 3, 4).bytes(torch.bfloat16) == 2 * (8 + 12 + 6)
    assert AttentionProblem(1, 2, 1, 4, 8).flops() == 4 * 2 * 8 * 16
    assert AttentionProblem(1, 2, 1, 4, 8, causal=True).flops() == 4 * 2 * 8 * 10
    d = DecodeProblem(2, 4, 2, 10, 8, ragged=True)
    assert d.context_lens() == [10, 5]
    assert d.bytes(torch.float32) == 4 * (2 * 2 * 8 * 15 + 2 * 2 * 4 * 8)
