"""scripts/distill_ablation.py end to end on a handful of problems: three adapters trained from one recipe,
differing in the setting the ablation names, two second rounds on the first, then one table of the D2F rows."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_ablation_trains_five_adapters_and_prints_one_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    sys.path.insert(0, str(REPO / "scripts"))
    import distill_ablation
    runs, out = tmp_path / "runs", tmp_path / "out"
    res = distill_ablation.main(["--runs", str(runs), "--output-dir", str(out), "--limit", "2", "--no-progress",
                                 f"data.source={tmp_path / 'answers.jsonl'}", "data.teacher_answers=8", "max_steps=2",
                                 "batch_size=2", "log_every=1"])
    saved = {n: (runs / n / "config.yaml").read_text() for n in ("d2f", "uniform-noise", "masked-ce")}
    assert "schedule: monotone" in saved["d2f"] and "targets: teacher" in saved["d2f"]
    assert "schedule: random" in saved["uniform-noise"] and "targets: teacher" in saved["uniform-noise"]
    assert "schedule: monotone" in saved["masked-ce"] and "targets: data" in saved["masked-ce"]
    rows = {r["config"]: r for r in res["report"]["results"]}
    assert set(rows) == {"teacher-vanilla", "no-adapter", "d2f", "uniform-noise", "masked-ce", "states-round",
                         "more-steps"}
    assert all(r["n"] == 2 and r["nfe_mean"] > 0 for r in rows.values())
    assert rows["d2f"]["adapter"].endswith("runs/d2f/adapter") and rows["no-adapter"]["adapter"] is None
    # three distinct adapters: different weights
    from safetensors.torch import load_file
    w = {n: load_file(str(runs / n / "adapter" / "adapter_model.safetensors")) for n in ("d2f", "uniform-noise", "masked-ce")}
    k = next(iter(w["d2f"]))
    assert not w["d2f"][k].equal(w["uniform-noise"][k]) and not w["d2f"][k].equal(w["masked-ce"][k])
    assert set(res["curves"]) == {"d2f", "uniform-noise", "masked-ce", "states-round", "more-steps"}
    # the second rounds continue the d2f adapter; only states-round reads its recorded decoding states
    rounds = {n: (runs / n / "config.yaml").read_text() for n in ("states-round", "more-steps")}
    assert all(f"adapter: {runs / 'd2f' / 'adapter'}" in t for t in rounds.values())
    assert "student_state_frac: 0.5" in rounds["states-round"] and "student_state_frac: 0.0" in rounds["more-steps"]
    assert (runs / "d2f" / "student_states.pt").is_file()
    w.update({n: load_file(str(runs / n / "adapter" / "adapter_model.safetensors")) for n in rounds})
    assert not w["states-round"][k].equal(w["d2f"][k]) and not w["states-round"][k].equal(w["more-steps"][k])
    assert res["curves"]["states-round"]["states_kl"] and res["curves"]["more-steps"]["states_kl"] is None
    assert "KL(teacher || student)" in (out / "training.md").read_text()
