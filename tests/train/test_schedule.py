"""The learning-rate schedule shared by train/pretrain.py and train/distill.py."""
import math

import pytest
import torch

from train.schedule import lr_factor, warmup_then_decay


def test_warmup_is_linear_up_to_the_base_lr():
    assert [lr_factor(s, 4, 100) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("kind, mid", [("cosine", 0.5), ("linear", 0.5), ("constant", 1.0)])
def test_decay_reaches_min_ratio_at_total_steps_and_stays(kind, mid):
    # warmup 10, decay over steps 10..110: halfway (step 60) both cosine and linear are at 0.5
    assert lr_factor(10, 10, 110, kind) == 1.0
    assert lr_factor(60, 10, 110, kind) == pytest.approx(mid)
    end = 1.0 if kind == "constant" else 0.1
    assert lr_factor(110, 10, 110, kind, min_ratio=0.1) == pytest.approx(end)
    assert lr_factor(500, 10, 110, kind, min_ratio=0.1) == pytest.approx(end)


def test_cosine_with_min_ratio_by_hand():
    # quarter of the way: 0.1 + 0.9 * (1 + cos(pi/4)) / 2
    assert lr_factor(25, 0, 100, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)


def test_scheduler_drives_the_optimizer_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_then_decay(opt, 2, 6, "linear")
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 2.0, 2.0, 1.5, 1.0, 0.5, 0.0])


def test_unknown_kind_is_an_error():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="'cosin' is not one of"):
        warmup_then_decay(opt, 0, 10, "cosin")
