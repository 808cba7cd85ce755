"""The distillation ablation in one command: train the adapters it compares, then print the table.

    python scripts/distill_ablation.py                          # configs/d2f_tiny.yaml, 500 held-out problems
    python scripts/distill_ablation.py --limit 50 max_steps=100 # quicker (distill overrides after the options)

Three LoRA adapters on the testbed teacher, from the same recipe (`--config`) and data, differing in one
setting each: `d2f` (as configured: monotone per-block noise, the teacher's soft targets), `uniform-noise`
(noise.schedule=random) and `masked-ce` (targets=data: plain masked-token cross-entropy on the data instead
of the teacher's distribution). Then two second rounds that continue the `d2f` adapter (`--round-config`):
`states-round` (half of each batch from the states its own D2F decoding visits, train/student_states.py) and
`more-steps` (the same round without them, data.student_state_frac=0: what the extra steps alone give).
Each is trained in <runs>/<name>/ (skipped when its adapter exists; an interrupted one resumes). Then
`python -m infer.compare --config configs/ablation_testbed.yaml` decodes
the held-out problems with the teacher's weights under D2F with no adapter and with each adapter, beside
the teacher's vanilla decoding: accuracy, tokens per forward, NFE and answer length. Last, the training
curves: distillation loss and KL(teacher || student) at the first and last logged step of each run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from d2f.errors import UserError  # noqa: E402

VARIANTS = {"d2f": [], "uniform-noise": ["noise.schedule=random"], "masked-ce": ["targets=data"]}
ROUNDS = {"states-round": [], "more-steps": ["data.student_state_frac=0"]}  # continue the d2f adapter
FIXED = ("output_dir", "targets", "noise.schedule", "model.adapter", "data.student_states", "data.student_state_frac")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/d2f_tiny.yaml", help="the distillation recipe of every adapter")
    ap.add_argument("--round-config", default="configs/d2f_tiny_states.yaml",
                    help="the second rounds' recipe (they continue the d2f adapter)")
    ap.add_argument("--compare-config", default="configs/ablation_testbed.yaml")
    ap.add_argument("--runs", default="runs/ablation", help="where the adapters are trained")
    ap.add_argument("--output-dir", default="outputs/ablation")
    ap.add_argument("--limit", type=int, default=None, help="first N held-out problems (default: the compare "
                                                            "config's, 500)")
    ap.add_argument("--overwrite", action="store_true", help="discard earlier predictions in --output-dir")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="distill key=value overrides for every adapter, e.g. max_steps=100")
    return ap.parse_args(argv)


def train_adapter(args, name: str) -> Path:
    out = Path(args.runs) / name
    adapter = out / "adapter"
    if (adapter / "adapter_model.safetensors").is_file():
        print(f"[ablation] {name}: adapter exists in {adapter}, not retrained", flush=True)
        return adapter
    if name in ROUNDS:
        first = Path(args.runs) / "d2f"
        config, setting = args.round_config, [f"model.adapter={first / 'adapter'}",
                                              f"data.student_states={first / 'student_states.pt'}", *ROUNDS[name]]
    else:
        config, setting = args.config, VARIANTS[name]
    print(f"[ablation] {name}: training ({' '.join(setting) or 'the recipe as configured'})", flush=True)
    cmd = [sys.executable, str(REPO / "train" / "distill.py"), "--config", config, f"output_dir={out}",
           "eval.every=0", *setting, *args.overrides]
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise UserError(f"training the {name!r} adapter failed (see the lines above); fix it and run again: "
                        "finished adapters are kept, an interrupted one resumes")
    return adapter


def curve(run_dir: Path) -> dict:
    """First and last logged train/loss and train/kl of a run (its metrics.jsonl), and train/states_kl (the KL
    on its recorded decoding states) when it trained on them."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "train/loss" in r]
    first, last = rows[0], rows[-1]
    return {"first_step": first["step"], "last_step": last["step"], "loss": (first["train/loss"], last["train/loss"]),
            "kl": (first["train/kl"], last["train/kl"]),
            "states_kl": (first["train/states_kl"], last["train/states_kl"]) if "train/states_kl" in first else None}


def main(argv=None) -> dict:
    args = parse_args(argv)
    for o in args.overrides:
        if o.split("=", 1)[0] in FIXED:
            raise UserError(f"override {o!r} would change what the ablation compares; the script sets it per adapter")
    adapters = {name: train_adapter(args, name) for name in [*VARIANTS, *ROUNDS]}
    from infer import compare
    cmp_args = ["--config", args.compare_config, "--output-dir", args.output_dir]
    cmp_args += ["--limit", str(args.limit)] if args.limit is not None else []
    cmp_args += ["--overwrite"] if args.overwrite else []
    cmp_args += ["--no-progress"] if args.no_progress else []
    cmp_args += [f"configs.{name}.adapter={path}" for name, path in adapters.items()]
    report = compare.main(cmp_args)
    curves = {name: curve(Path(args.runs) / name) for name in adapters}
    lines = ["", "| adapter | steps | loss (first -> last) | KL(teacher || student) (first -> last) | "
                 "KL on its decoding states (first -> last) |", "|---|---:|---:|---:|---:|"]
    for name, c in curves.items():
        skl = f"{c['states_kl'][0]:.4f} -> {c['states_kl'][1]:.4f}" if c["states_kl"] else "-"
        lines.append(f"| {name} | {c['first_step']}-{c['last_step']} | {c['loss'][0]:.4f} -> {c['loss'][1]:.4f} | "
                     f"{c['kl'][0]:.4f} -> {c['kl'][1]:.4f} | {skl} |")
    text = "\n".join(lines)
    print(text)
    (Path(args.output_dir) / "training.md").write_text(text.lstrip() + "\n")
    return {"report": report, "curves": curves}


if __name__ == "__main__":
    from d2f.errors import run_main
    raise SystemExit(run_main(main))
