"""The decoders' host-side work per forward (`infer.bench.HostWork`): what the bookkeeping around the model's
forwards launches and how often it waits for the device. On a GPU whose forwards are CUDA-graph replays these
launches and syncs are most of a step's host time (docs/bench.md), so their counts are pinned here: a change
that adds kernels or syncs to a decode step fails, on any machine."""
from __future__ import annotations

import json

import pytest
import torch

from infer import bench
from tests.infer.helpers import random_model


class Doubler(torch.nn.Module):
    def forward(self, x):
        return (x * 2 + 1).sum(-1)  # three kernels, none counted: they are the model's


def test_host_work_counts_launches_and_syncs_outside_the_forward():
    model, x = Doubler(), torch.arange(6.0).view(2, 3)
    with bench.HostWork(model) as work:
        x + 1  # before the first forward: setup
        torch.tensor([1, 2])
        y = model(x)  # not counted
        z = y + 1  # 1 launch
        z.tolist()  # 1 sync
        bool(z.any())  # 1 launch (any), 1 sync (the read)
        x[x > 2]  # 2 launches (gt, the indexing), 1 sync (a boolean mask's size is read on the host)
        torch.tensor([3.0])  # 1 sync: Python data, copied to the device on a GPU
        z.view(2, 1).t()  # views: nothing
        model(x)
    assert (work.forwards, work.launches, work.syncs) == (2, 4, 4)
    assert (work.setup_launches, work.setup_syncs) == (1, 1)
    assert torch.Tensor.tolist(torch.ones(1)) == [1.0]  # the patched tolist is restored
    model(x)
    assert work.forwards == 2  # the hooks are gone


@pytest.fixture(scope="module")
def trace():
    return json.loads(bench.TRACES.read_text())


# Per forward, at most: (kernels launched by the bookkeeping, host syncs), on replayed testbed schedules at
# tiny-llada shape, batch 1 and 4, eager and under static shapes, from the first forward on. A step syncs once;
# the rest are the end of the call (the results) and, eagerly, dropping finished samples. Before the decode
# steps were made lean (29 Nov 2026) the same rows measured d2f 125-131 launches and 6.1-8.4 syncs per forward,
# fast-dllm-dual 60-62 and 5.6-6.3, ar 34-37 and 6.1-8.3, vanilla 50 and 3.1.
BOUNDS = {"d2f": (72, 1.5), "fast-dllm-dual": (54, 1.5), "fast-dllm-prefix": (54, 1.5), "ar": (25, 1.2),
          "vanilla": (48, 1.1)}
CASES = [(name, static) for name in BOUNDS for static in (False, True) if not (static and name == "vanilla")]


@pytest.mark.parametrize("name, static", CASES)  # vanilla has no cache: no static-shape variant
@pytest.mark.parametrize("batch", [1, 4])
def test_decode_step_host_work(trace, name, static, batch):
    model = random_model("tiny-llada", dtype=torch.float32)
    if name == "ar":
        model = bench.share_weights(model, causal=True)
    row = bench.run_mode(model, trace, name, batch, 4, 40, "static" if static else None, warmup=False)
    assert row["replay_ok"]
    launches, syncs = BOUNDS[name]
    assert row["launches_per_forward"] <= launches, row
    assert row["syncs_per_forward"] <= syncs, row


@pytest.mark.parametrize("batch", [1, 4])
def test_per_sample_windows_read_the_device_once_per_step_plus_their_window_starts(batch):
    """D2F with windows="rows" (the server's): the step's read, plus its window starts made from the host's
    bounds (on a GPU a pinned, asynchronous copy: `infer.batch.to_device`); the keys the windows reach come from
    the host too. Before: 3.0 (batch 1) and 3.4 (batch 4) syncs per forward, the keys read back from the device."""
    from infer.api import DecodeConfig, generate
    model = random_model("tiny-llada", dtype=torch.float32, std=0.3)
    cfg = DecodeConfig(mode="d2f", max_new_tokens=32, block_size=8, tau_add=0.3, tau_act=0.5, tau_conf=0.3)
    prompts = [[5, 9, 17, 33], [40, 8, 21, 7, 3, 11, 19], [12, 14], [6, 60, 61, 62, 63, 64]][:batch]
    with bench.HostWork(model) as work:
        got = generate(model, None, prompts, cfg, windows="rows")
    assert [r.token_ids for r in got] == [r.token_ids for r in generate(model, None, prompts, cfg)]
    assert work.syncs / work.forwards <= 2.5, (work.syncs, work.forwards)
    assert work.launches / work.forwards <= 110, (work.launches, work.forwards)


def test_to_device_makes_the_same_long_tensor():
    from infer.batch import to_device
    t = to_device([3, 0, 7], "cpu")
    assert t.dtype == torch.long and t.tolist() == [3, 0, 7]
    if torch.cuda.is_available():
        assert to_device([3, 0, 7], "cuda").cpu().tolist() == [3, 0, 7]


@pytest.mark.parametrize("cfg", [
    dict(mode="d2f", max_new_tokens=32, block_size=8, tau_add=0.5, tau_act=0.8, tau_conf=0.5),
    dict(mode="fast-dllm", max_new_tokens=32, block_size=8, cache="dual", threshold=0.5),
    dict(mode="fast-dllm", max_new_tokens=32, block_size=8, cache="prefix", threshold=0.5),
])
def test_static_forward_adds_launches_but_no_sync(cfg):
    """What `StaticForward` does around each graph replay (filling the static inputs and the pattern) runs on the
    host before the replay: no reads of the device, no copies of Python data (an int prompt length was one)."""
    from infer.api import generate
    from infer.graphs import StaticForward

    model = random_model("tiny-llada", dtype=torch.float32)
    static = StaticForward(model)
    prompts = [[5, 9, 17, 3, 44, 8, 2], [21, 22, 23]]
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    generate(static, None, prompts, cfg)  # first call: the static inputs are made
    forwards.clear()
    with bench.HostWork(static) as outside:  # the decoder's work
        generate(static, None, prompts, cfg)
    n = len(forwards)
    with bench.HostWork(model) as around_model:  # the decoder's and StaticForward's
        generate(static, None, prompts, cfg)
    assert len(forwards) == 2 * n > 0
    assert around_model.syncs == outside.syncs
    assert 0 < (around_model.launches - outside.launches) / n <= 7  # 11-15 before the inputs were filled in place
