"""train/loop.py's RunLog: what a recipe's metrics.jsonl gets, and what its throughput measures."""
import json
from types import SimpleNamespace

from train import loop


def test_an_evaluation_is_logged_with_its_time_and_left_out_of_the_throughput(tmp_path, monkeypatch):
    clock = iter([100.0, 110.0, 140.0, 150.0])  # start; eval starts; eval ends; throughput read
    monkeypatch.setattr(loop, "time", SimpleNamespace(time=lambda: next(clock)))  # RunLog's clock only
    acc = SimpleNamespace(is_main_process=True, is_local_main_process=False)
    log = loop.RunLog(acc, tmp_path, total=10, initial=0, desc="t", log_every=5)
    log.step(tokens=2000)
    log.evaluate(1, lambda a, b: {"eval/accuracy": a / b}, 1, 4)
    # 20 s since the start, 30 of them the evaluation: 2000 tokens in the other 20 s
    assert log.tokens_per_s() == 100.0
    log.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row == {"step": 1, "eval/accuracy": 0.25, "eval/seconds": 30.0}
