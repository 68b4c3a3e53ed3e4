"""`hope.optim.multi_frequency.MultiFrequency`: parameter groups that step every `period` outer steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hope.optim.multi_frequency import MultiFrequency, cms_level_periods

DT = torch.float64


def grads(seed: int, *shapes) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, dtype=DT, generator=g) for s in shapes]


def run(opt, params, steps, start=0):
    for t in range(start, steps):
        opt.zero_grad()
        for p, g in zip(params, grads(t, *[p.shape for p in params])):
            p.grad = g.clone()
        opt.step()


def make(seed=0):
    torch.manual_seed(seed)
    return [nn.Parameter(torch.randn(3, 2, dtype=DT)), nn.Parameter(torch.randn(4, dtype=DT))]


def test_period_one_is_the_wrapped_optimizer():
    a, b = make(), make()
    run(torch.optim.AdamW(a, lr=0.1), a, 5)
    run(MultiFrequency(torch.optim.AdamW(b, lr=0.1), {b[0]: 1, b[1]: 1}), b, 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_slow_parameter_steps_once_per_period_with_the_mean_gradient():
    fast, slow = make()
    start = slow.detach().clone()
    opt = MultiFrequency(torch.optim.SGD([fast, slow], lr=0.5), {slow: 3})
    run(opt, [fast, slow], 2)
    assert torch.equal(slow, start)  # held for two steps
    run(opt, [fast, slow], 3, start=2)
    mean = sum(grads(t, fast.shape, slow.shape)[1] for t in range(3)) / 3
    assert torch.allclose(slow, start - 0.5 * mean, rtol=0, atol=1e-14)
    ref = make()[0]
    run(torch.optim.SGD([ref], lr=0.5), [ref], 3)  # the fast one stepped every time, as alone
    assert torch.equal(fast, ref)


def test_adamw_leaves_a_held_parameter_and_its_moments_alone():
    fast, slow = make()
    opt = MultiFrequency(torch.optim.AdamW([fast, slow], lr=0.1, weight_decay=0.1), {slow: 4})
    before = slow.detach().clone()
    run(opt, [fast, slow], 3)
    assert torch.equal(slow, before) and not opt.optimizer.state.get(slow)  # no step, no decay, no moments
    run(opt, [fast, slow], 4, start=3)
    assert not torch.equal(slow, before) and int(opt.optimizer.state[slow]["step"]) == 1


def test_resume_in_the_middle_of_a_period_is_exact():
    a = make()
    opt_a = MultiFrequency(torch.optim.AdamW(a, lr=0.1), {a[1]: 4})
    run(opt_a, a, 10)
    b = make()
    opt_b = MultiFrequency(torch.optim.AdamW(b, lr=0.1), {b[1]: 4})
    run(opt_b, b, 6)  # two steps into the second period
    saved = {"params": [p.detach().clone() for p in b], "opt": opt_b.state_dict()}
    c = [nn.Parameter(t.clone()) for t in saved["params"]]
    opt_c = MultiFrequency(torch.optim.AdamW(c, lr=0.1), {c[1]: 4})
    opt_c.load_state_dict(saved["opt"])
    run(opt_c, c, 10, start=6)
    assert all(torch.equal(x, y) for x, y in zip(a, c))


def test_bad_periods_are_named():
    p, q = make()
    with pytest.raises(ValueError, match="period must be an int >= 1, got 0"):
        MultiFrequency(torch.optim.SGD([p], lr=0.1), {p: 0})
    with pytest.raises(ValueError, match=r"shape \[4\] is not in the optimizer"):
        MultiFrequency(torch.optim.SGD([p], lr=0.1), {q: 2})


def test_cms_level_periods_cover_every_block_level():
    from hope import HopeLM, preset

    model = HopeLM(preset("hope_stream", "tiny"))
    periods = cms_level_periods(model, [1, 8, 64])
    names = {id(p): n for n, p in model.named_parameters()}
    by_period = {}
    for p, k in periods.items():
        by_period.setdefault(k, set()).add(names[id(p)].split(".")[3])
    assert by_period == {1: {"0"}, 8: {"1"}, 64: {"2"}}
    per_level = sum(p.numel() for n, p in model.named_parameters() if ".cms.0." in n)
    assert sum(p.numel() for p, k in periods.items() if k == 8) == per_level
    with pytest.raises(ValueError, match="one outer period per CMS level: the model has 3, got \\[1, 8\\]"):
        cms_level_periods(model, [1, 8])
