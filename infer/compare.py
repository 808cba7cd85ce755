"""Side-by-side comparison: several models x decoding modes on the same GSM8K problems, in one run.

    python -m infer.compare                                  # the testbed: configs/compare_testbed.yaml
    python -m infer.compare --limit 20 --output-dir outputs/compare
    python -m infer.compare --config my.yaml device=cuda dtype=bfloat16 configs.student-d2f.tau_add=0.5
    python -m infer.compare --only teacher-vanilla,student-d2f

The YAML (loaded with `d2f.yaml_config.load_config` into `CompareConfig`, `key=value` overrides after it)
holds the shared settings (data, shots, limit, device, dtype, batch size) and `configs`: one entry per
row of the table, mapping a name to the DecodeConfig fields of that row plus optional `model`,
`adapter`, `tokenizer` (default: the testbed model for the mode, see `infer.api.load`), `enabled`, and `sweep`
({param: tau_conf, values: [0.95, 0.9, 0.85]}; `param` may join several fields with "+", e.g.
"tau_conf+tau_act", which then take the same value): one row per value, drawn as a curve on the plot.

Every row is a `infer.eval.evaluate` run in <output-dir>/<row>/ (predictions.jsonl, summary.json),
so an interrupted comparison resumes where it stopped. Before each row's timed problems, one short
untimed decode warms the model up; the clock is read after synchronising the device. A row whose
model or adapter is missing (e.g. the testbed student before it is trained) is skipped with the
reason printed and recorded, and the other rows still run.

Outputs in --output-dir: results.md (the table), results.json (every figure, the settings and the
machine: device, dtype, CPU, cores, torch/transformers versions), pareto.png (accuracy vs tokens/s).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from d2f.yaml_config import ConfigError, from_dict, load_config, parse_bool
from d2f.errors import check_output_dir
from d2f.errors import UserError
from d2f.models import refs
from d2f.testbed import role_for_mode
from infer.decode_config import check_fields_apply
from infer import eval as E
from infer import prompts as P

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "compare_testbed.yaml"


@dataclass
class CompareConfig:
    data: str = "testbed"  # testbed | real100 | hub | a .jsonl/.parquet path
    split: str = "test"
    limit: int | None = None  # first N problems
    shots: int = 4
    shots_from: str | None = None
    shot_seed: int = 1234
    chat: str = "auto"  # auto | on | off
    batch_size: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None  # torch CPU threads; None = torch's default (one per core)
    warmup: bool = True
    compile: bool = False  # every model under torch.compile (infer.graphs.compiled); the first batch compiles
    baseline: str | None = None  # the row the speed-ups are relative to; default: the first vanilla row
    configs: dict = field(default_factory=dict)  # row name -> {model?, adapter?, sweep?, DecodeConfig fields}


@dataclass
class Row:
    name: str  # unique, also the output sub-directory
    group: str  # the config entry it comes from (a sweep's rows share it)
    model: str | None
    adapter: str | None
    decode: Any  # infer.api.DecodeConfig
    sweep: dict | None = None  # {"param": "tau_conf", "value": 0.9} for a sweep row
    tokenizer: str | None = None  # default: the model's own, else the testbed's


# ----------------------------------------------------------------------------- config -> rows

def _decode_cls():
    from infer.decode_config import DecodeConfig

    return DecodeConfig


def expand_rows(configs: dict, only: list[str] | None = None) -> list[Row]:
    """Config entries -> table rows (a sweep entry gives one row per value), validated up front so that a
    typo fails before an hour of decoding and not after."""
    if not configs:
        raise ConfigError("the comparison config has no `configs` entries")
    unknown = sorted(set(only or []) - set(configs))
    if unknown:
        raise ConfigError(f"--only names unknown configs {unknown}; known: {sorted(configs)}")
    rows = []
    for name, entry in configs.items():
        if only and name not in only:
            continue
        where = f"configs.{name}"
        if entry is not None and not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a mapping of decoding settings, got {entry!r}")
        entry = dict(entry or {})
        enabled = parse_bool(entry.pop("enabled", True), f"{where}.enabled")
        if not enabled and not only:
            continue
        model, adapter, sweep = entry.pop("model", None), entry.pop("adapter", None), entry.pop("sweep", None)
        tokenizer = entry.pop("tokenizer", None)
        base = from_dict(_decode_cls(), entry, where=where)
        if sweep is None:
            check_fields_apply(base.mode, set(entry), where=f"{where}: ")
            rows.append(Row(name, name, model, adapter, base, tokenizer=tokenizer))
            continue
        if not isinstance(sweep, dict) or set(sweep) != {"param", "values"}:
            raise ConfigError(f"{where}.sweep must be a mapping with keys `param` and `values`, got {sweep!r}")
        params = sweep["param"] if isinstance(sweep["param"], list) else str(sweep["param"]).split("+")
        check_fields_apply(base.mode, set(entry) | {p.strip() for p in params if p.strip()}, where=f"{where}: ")
        values = sweep["values"]
        if isinstance(values, str):
            values = [v for v in values.strip("[]").split(",") if v.strip()]
        if not values:
            raise ConfigError(f"{where}.sweep.values is empty")
        for v in values:
            decode = from_dict(_decode_cls(), {**entry, **{p.strip(): v for p in params}}, where=f"{where}.sweep")
            value = getattr(decode, params[0].strip())
            label = "+".join(p.strip() for p in params)
            rows.append(Row(f"{name}[{label}={value}]", name, model, adapter, decode,
                            sweep={"param": label, "value": value}, tokenizer=tokenizer))
    if not rows:
        raise ConfigError("every config is disabled; enable one or name it with --only")
    return rows


def row_dir(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / re.sub(r"[^A-Za-z0-9._=+-]", "_", name)


# ----------------------------------------------------------------------------- models

class OneModel:
    """Keeps the model of the current row only (an 8B teacher and its student need not share memory),
    reusing it for consecutive rows that need the same one."""

    def __init__(self, load_fn: Callable, device: str, dtype: str, compile: bool = False):
        self.load_fn, self.device, self.dtype = load_fn, device, dtype
        self.compile = compile
        self.key, self.value = None, None

    def get(self, row: Row):
        key = (row.model, row.adapter, row.tokenizer, role_for_mode(row.decode.mode))
        if key != self.key:
            self.release()
            for what, name in (("model", row.model), ("adapter", row.adapter)):
                msg = refs.problem(what, name)
                if msg is not None:
                    raise FileNotFoundError(f"config {row.name!r}: {msg}")
            kw = {"tokenizer": row.tokenizer} if row.tokenizer is not None else {}
            if self.compile:
                kw["compile"] = True
            self.value = self.load_fn(row.model, row.decode.mode, adapter=row.adapter, device=self.device,
                                      dtype=self.dtype, **kw)
            self.key = key
        return self.value

    def release(self):
        self.key, self.value = None, None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


# ----------------------------------------------------------------------------- machine facts

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str, dtype: str) -> dict:
    import torch
    import transformers

    info = {
        "device": device,
        "dtype": dtype,
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    try:  # read-only: which code produced the figures
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


# ----------------------------------------------------------------------------- the run

def run_compare(cc: CompareConfig, out_dir, *, only: list[str] | None = None, overwrite: bool = False,
                progress: bool = True, load_fn: Callable | None = None, generate_fn: Callable | None = None) -> dict:
    """Evaluate every row on the same problems; write results.md/.json and pareto.png; return results.json's dict."""
    if load_fn is None:
        from infer.api import load as load_fn
    check_settings(cc)
    rows = expand_rows(cc.configs, only)
    check_baseline(cc.baseline, rows, cc.configs)
    if cc.threads is not None:
        import torch

        torch.set_num_threads(cc.threads)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, "--output-dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    problems = E.load_problems(cc.data, cc.split, cc.limit)
    print(f"comparing {len(rows)} configs on {len(problems)} problems from {cc.data!r} ({cc.split}) "
          f"on {cc.device} ({cc.dtype})", file=sys.stderr)
    # the same shots for every row (drawn from a train split, never from `problems`)
    shots = P.select_shots(cc.shots, source=cc.data, exclude=[p["question"] for p in problems], seed=cc.shot_seed,
                           shots_from=cc.shots_from)
    models = OneModel(load_fn, cc.device, cc.dtype, cc.compile)
    results, skipped = [], []
    for row in rows:
        try:
            model, tokenizer = models.get(row)
        except FileNotFoundError as err:  # e.g. the testbed student adapter before it is trained
            reason = str(err)
            print(f"SKIPPED {row.name}: {reason}", file=sys.stderr)
            skipped.append({"config": row.name, "mode": row.decode.mode, "reason": reason})
            continue
        prompts = [P.build_prompt(tokenizer, p["question"], shots, chat=cc.chat) for p in problems]
        meta = {"model": row.model, "adapter": row.adapter, "tokenizer": row.tokenizer, "data": cc.data,
                "split": cc.split, "shots": cc.shots, "shots_from": cc.shots_from, "shot_seed": cc.shot_seed,
                "chat": P.use_chat(tokenizer, cc.chat), "device": cc.device, "dtype": cc.dtype}
        out = row_dir(out_dir, row.name)
        if cc.compile and (overwrite or E.unfinished(out, len(problems))):
            E.compile_warmup(model, tokenizer, prompts, row.decode, cc.batch_size, generate_fn=generate_fn)
        elif cc.warmup and (overwrite or E.unfinished(out, len(problems))):
            E.warmup(model, tokenizer, prompts[0], row.decode, generate_fn=generate_fn)
        summary = E.evaluate(model, tokenizer, problems, prompts, row.decode, out, batch_size=cc.batch_size,
                             meta=meta, overwrite=overwrite, progress=progress, desc=row.name,
                             generate_fn=generate_fn)
        results.append({"config": row.name, "group": row.group, "mode": row.decode.mode, "model": row.model,
                        "adapter": row.adapter, "sweep": row.sweep, "decode": dataclasses.asdict(row.decode),
                        **summary})
    models.release()
    if not results:
        raise NothingRan("every config was skipped: " + "; ".join(f"{s['config']}: {s['reason']}" for s in skipped))
    baseline = pick_baseline(results, cc.baseline)
    for r in results:
        base = baseline["tokens_per_s"] if baseline else None
        r["speedup"] = r["tokens_per_s"] / base if base else None
    report = {"settings": {**dataclasses.asdict(cc), "n_problems": len(problems)},
              "machine": machine_info(cc.device, cc.dtype),
              "baseline": baseline["config"] if baseline else None,
              "results": results, "skipped": skipped}
    report["matched"] = matched_speedups(results)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    table = markdown_table(report)
    (out_dir / "results.md").write_text(table)
    data_name = cc.data if cc.data in ("testbed", "real100", "hub") else Path(cc.data).name
    plot_pareto(results, out_dir / "pareto.png", title=f"GSM8K ({data_name}, {len(problems)} problems, "
                                                         f"{cc.shots}-shot), {report['machine'].get('gpu') or cc.device}")
    return report


class NothingRan(UserError, RuntimeError):
    """Every row was skipped (its model or adapter is missing)."""


def check_settings(cc: CompareConfig) -> None:
    for name in ("limit", "threads", "batch_size"):
        v = getattr(cc, name)
        if v is not None and v <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {v}")
    if cc.shots < 0:
        raise ConfigError(f"shots must be >= 0, got {cc.shots}")


def check_baseline(name: str | None, rows: list[Row], configs: dict) -> None:
    """A named baseline must be a row of the config (a typo fails before an hour of decoding, not after);
    one that --only leaves out just gives no speed-ups."""
    if name is None or name in [r.name for r in rows] or name.split("[")[0] in configs:
        return
    import difflib
    names = sorted(set(configs) | {r.name for r in rows})
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"baseline {name!r} is not a row of the config ({', '.join(names)}).{hint} Fix `baseline`")


def pick_baseline(results: list[dict], name: str | None) -> dict | None:
    if name is not None:
        for r in results:
            if r["config"] == name:
                return r
        print(f"baseline {name!r} did not run; speed-ups are not given", file=sys.stderr)
        return None
    return next((r for r in results if r["mode"] == "vanilla"), None)


# ----------------------------------------------------------------------------- table and plot

COLUMNS = ["config", "accuracy", "tokens/s", "speed-up vs vanilla", "NFE", "tokens/forward", "answer length",
           "latency p50 (s)", "latency p95 (s)"]


def table_cells(r: dict) -> list[str]:
    return [r["config"], f"{100 * r['accuracy']:.1f}% ({r['correct']}/{r['n']})", f"{r['tokens_per_s']:.1f}",
            f"{r['speedup']:.2f}x" if r.get("speedup") else "n/a", f"{r['nfe_mean']:.1f}",
            f"{r['tokens_per_forward']:.2f}", f"{r['answer_tokens_mean']:.1f}", f"{r['latency_p50_s']:.3f}",
            f"{r['latency_p95_s']:.3f}"]


def markdown_table(report: dict) -> str:
    s, m = report["settings"], report["machine"]
    hw = m.get("gpu") or f"{m['cpu']} ({m['cpu_cores']} cores, {m['torch_threads']} torch threads)"
    lines = [f"GSM8K {s['data']} ({s['split']}), {s['n_problems']} problems, {s['shots']}-shot, batch {s['batch_size']}; "
             f"{s['device']} {s['dtype']} on {hw}; torch {m['torch']}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    lines += ["| " + " | ".join(table_cells(r)) + " |" for r in report["results"]]
    lines.append("")
    lines.append("tokens/s: answer tokens up to and including the first EOS / wall time of the generate calls "
                 "(prompt included); NFE: forward passes per problem; answer length: tokens per answer.")
    if report.get("matched"):
        lines += ["", matched_table(report["matched"]).rstrip("\n")]
    reasons: dict[str, list[str]] = {}
    for sk in report["skipped"]:
        reasons.setdefault(sk["reason"], []).append(sk["config"])
    for reason, names in reasons.items():
        lines.append(f"\nSkipped {', '.join(names)}: {reason}")
    return "\n".join(lines) + "\n"


def plot_pareto(results: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["group"], []).append(r)
    for group, rs in groups.items():
        if any(r["sweep"] for r in rs):  # a sweep: one curve, each point labelled with its value
            rs = sorted(rs, key=lambda r: r["tokens_per_s"])
            ax.plot([r["tokens_per_s"] for r in rs], [100 * r["accuracy"] for r in rs], "o-",
                    label=f"{group} ({rs[0]['sweep']['param']} sweep)")
            for r in rs:
                ax.annotate(f"{r['sweep']['value']}", (r["tokens_per_s"], 100 * r["accuracy"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
        else:
            for r in rs:
                ax.plot([r["tokens_per_s"]], [100 * r["accuracy"]], "s", label=r["config"])
    front = pareto_front(results)
    if len(front) > 1:
        ax.plot([r["tokens_per_s"] for r in front], [100 * r["accuracy"] for r in front], ":", color="gray",
                label="Pareto front")
    ax.set_xlabel("tokens/s (answer tokens up to EOS)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def interpolate_speed(curve: list[dict], accuracy: float) -> float | None:
    """tokens/s of a sweep curve at `accuracy`, linear between the two points of its Pareto front that
    bracket it (the front: the curve's points that none of its others beats on both axes); None
    outside the accuracies the front spans."""
    front = sorted(pareto_front(curve), key=lambda r: r["accuracy"])
    for lo, hi in zip(front, front[1:] + front[-1:]):
        if lo["accuracy"] <= accuracy <= hi["accuracy"]:
            if hi["accuracy"] == lo["accuracy"]:
                return max(lo["tokens_per_s"], hi["tokens_per_s"])
            w = (accuracy - lo["accuracy"]) / (hi["accuracy"] - lo["accuracy"])
            return lo["tokens_per_s"] + w * (hi["tokens_per_s"] - lo["tokens_per_s"])
    return None


def matched_speedups(results: list[dict]) -> list[dict]:
    """Each D2F sweep against each other sweep: D2F's tokens/s over the other's at the same accuracy
    (interpolated on the other's curve) and at the same threshold value (the same sweep value)."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        if r.get("sweep"):
            groups.setdefault(r["group"], []).append(r)
    out = []
    for g, curve in groups.items():
        if curve[0]["mode"] != "d2f":
            continue
        for h, other in groups.items():
            if h == g or other[0]["mode"] == "d2f":
                continue
            by_value = {o["sweep"]["value"]: o for o in other}
            for r in sorted(curve, key=lambda r: r["sweep"]["value"], reverse=True):
                at_acc = interpolate_speed(other, r["accuracy"])
                same = by_value.get(r["sweep"]["value"])
                out.append({"d2f": r["config"], "against": h, "value": r["sweep"]["value"], "accuracy": r["accuracy"],
                            "tokens_per_s": r["tokens_per_s"],
                            "other_tokens_per_s_at_accuracy": at_acc,
                            "speedup_at_accuracy": r["tokens_per_s"] / at_acc if at_acc else None,
                            "speedup_at_value": r["tokens_per_s"] / same["tokens_per_s"] if same else None,
                            "other_accuracy_at_value": same["accuracy"] if same else None})
    return out


def matched_table(matched: list[dict]) -> str:
    if not matched:
        return ""

    def fmt(v, spec: str, scale: float = 1.0, suffix: str = "") -> str:
        return "-" if v is None else f"{scale * v:{spec}}{suffix}"

    lines = ["D2F against the other sweeps: at equal accuracy (the other's tokens/s interpolated on its curve's "
             "Pareto front at D2F's accuracy; '-' outside the accuracies it reaches) and at the same threshold value.",
             "", "| D2F point | against | D2F accuracy | D2F tokens/s | other at that accuracy | speed-up at equal "
             "accuracy | other's accuracy at the same value | speed-up at the same value |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for m in matched:
        lines.append(f"| {m['d2f']} | {m['against']} | {fmt(m['accuracy'], '.1f', 100, '%')} | "
                     f"{fmt(m['tokens_per_s'], '.1f')} | {fmt(m['other_tokens_per_s_at_accuracy'], '.1f')} | "
                     f"{fmt(m['speedup_at_accuracy'], '.2f', suffix='x')} | "
                     f"{fmt(m['other_accuracy_at_value'], '.1f', 100, '%')} | {fmt(m['speedup_at_value'], '.2f', suffix='x')} |")
    return "\n".join(lines) + "\n"


def pareto_front(results: list[dict]) -> list[dict]:
    """Rows that no other row beats on both accuracy and tokens/s, sorted by tokens/s."""
    front = [r for r in results
             if not any(o["accuracy"] >= r["accuracy"] and o["tokens_per_s"] >= r["tokens_per_s"]
                        and (o["accuracy"] > r["accuracy"] or o["tokens_per_s"] > r["tokens_per_s"]) for o in results)]
    return sorted(front, key=lambda r: r["tokens_per_s"])


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infer.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="comparison YAML (default: %(default)s)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the YAML, e.g. device=cuda "
                                                 "configs.student-d2f.tau_add=0.5")
    p.add_argument("--limit", type=int, default=None, help="first N problems (overrides the YAML's limit)")
    p.add_argument("--output-dir", default="outputs/compare")
    p.add_argument("--only", default=None, help="comma-separated config names to run (others are left out)")
    p.add_argument("--overwrite", action="store_true", help="discard earlier predictions in --output-dir")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None, *, load_fn: Callable | None = None) -> dict:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides) + ([f"limit={args.limit}"] if args.limit is not None else [])
    cc = load_config(CompareConfig, args.config, overrides)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    report = run_compare(cc, args.output_dir, only=only, overwrite=args.overwrite, progress=not args.no_progress,
                         load_fn=load_fn)
    print(markdown_table(report))
    print(f"wrote {args.output_dir}/results.md, results.json, pareto.png")
    return report


if __name__ == "__main__":
    from d2f.errors import run_main
    raise SystemExit(run_main(main))
