"""The D2F distillation recipe end to end on a tiny model: bad input, exact resume (also after a
real SIGKILL), adapter round trip, and 2-process DeepSpeed ZeRO-2 on the CPU where the loss falls."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from d2f.yaml_config import ConfigError
from d2f.errors import UserError
from d2f.losses import d2f_distill_loss
from d2f.masks import block_causal
from d2f.models import load_model, save_pretrained
from d2f.noise import add_block_noise

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
ACCELERATE = str(Path(PY).parent / "accelerate")


def _reset_accelerate():
    """main() builds an Accelerator; in-process reruns need accelerate's singletons cleared."""
    from accelerate.state import AcceleratorState, GradientState, PartialState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_main(args):
    from train.distill import main
    _reset_accelerate()
    try:
        return main(args)
    finally:
        _reset_accelerate()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A non-degenerate tiny LLaDA teacher, pre-tokenized data and a config."""
    d = tmp_path_factory.mktemp("distill")
    teacher = load_model("tiny-llada")
    g = torch.Generator().manual_seed(1)
    for _, p in teacher.named_parameters():  # attention must matter for the student to differ
        p.data.fill_(1.0) if p.dim() == 1 else p.data.normal_(0, 0.2, generator=g)
    save_pretrained(teacher, d / "teacher")
    gen = torch.Generator().manual_seed(0)
    with open(d / "data.jsonl", "w") as f:
        for _ in range(64):
            n = int(torch.randint(4, 9, (1,), generator=gen))
            p = torch.randint(2, 120, (n,), generator=gen).tolist()
            a = [(x * 3 + 7) % 118 + 2 for x in p] * 2
            f.write(json.dumps({"prompt_ids": p, "answer_ids": a}) + "\n")
    (d / "cfg.yaml").write_text(f"""
model: {{base: {d / 'teacher'}, dtype: float32}}
lora: {{r: 8, alpha: 16, dropout: 0.1}}
data: {{source: {d / 'data.jsonl'}, max_length: 32}}
noise: {{block_size: 8}}
optim: {{lr: 1.0e-2}}
max_steps: 6
batch_size: 4
grad_accum: 2
save_every: 2
keep_checkpoints: 0
log_every: 1
""")
    return d


def losses_by_step(out_dir):
    """step -> loss from metrics.jsonl (a resumed run appends; the last entry of a step wins)."""
    out = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            out[rec["step"]] = rec["train/loss"]
    return out


def fixed_batch_kl(student, teacher_dir, data_file, seed=123):
    """Mean KL(teacher || student) at masked tokens of all data under one fixed noise draw."""
    recs = [json.loads(x) for x in Path(data_file).read_text().splitlines()]
    L = 32
    ids = torch.tensor([(r["prompt_ids"] + r["answer_ids"] + [1] * L)[:L] for r in recs])
    plen = torch.tensor([len(r["prompt_ids"]) for r in recs])
    nz = add_block_noise(ids, plen, 8, 127, torch.Generator().manual_seed(seed))
    teacher = load_model(str(teacher_dir))
    with torch.no_grad():
        t = teacher(nz.noisy_ids)
        s = student(nz.noisy_ids, mask=block_causal(plen, 8))
    return d2f_distill_loss(s, t, nz.masked, nz.ratio)["kl"].item()


# ---- bad input: each a clear error before anything runs -------------------------------------

@pytest.mark.parametrize("override,message", [
    ("model.base=/no/such/teacher", "model.base '/no/such/teacher' does not exist"),
    ("lora.target_modules=[q_proj,qkv]", r"lora.target_modules \['qkv'\] match no linear module"),
    ("noise.block_size=32", "noise.block_size=32 does not fit data.max_length=32"),
    ("data.source={d}/bad.jsonl", "has no prompt field: expected one of \\['prompt', 'question'\\]"),
    ("data.source={d}/noanswer.jsonl", "has no answer field: expected one of \\['answer', 'response'\\]"),
    ("data.prompt_field=instruction", "expected one of \\['instruction'\\]"),
    ("model.base=tiny-ar", "is a causal \\(AR\\) model"),
    ("data.max_length=11", "every prompt is longer than data.max_length - noise.block_size = 11 - 8"),
])
def test_bad_input_fails_before_compute(work, tmp_path, override, message):
    (work / "bad.jsonl").write_text(json.dumps({"text": "hello", "answer": "x"}) + "\n")
    (work / "noanswer.jsonl").write_text(json.dumps({"question": "q?", "reply": "x"}) + "\n")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message):
        run_main(["--config", str(work / "cfg.yaml"), override.format(d=work), f"output_dir={out}"])
    assert not out.exists()  # nothing was written: the error came before any work


def test_unknown_config_key_is_rejected(work, tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'max_step'.*Did you mean 'max_steps'"):
        run_main(["--config", str(work / "cfg.yaml"), "max_step=3", f"output_dir={tmp_path}"])


# ---- exact resume, adapter round trip --------------------------------------------------------

@pytest.fixture(scope="module")
def full_run(work):
    out = work / "full"
    res = run_main(["--config", str(work / "cfg.yaml"), f"output_dir={out}"])
    return out, res


def test_adapter_reloads_with_identical_logits_and_config_is_saved(work, full_run):
    out, res = full_run
    assert res["step"] == 6 and sorted(losses_by_step(out)) == [1, 2, 3, 4, 5, 6]
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(work / "teacher")
    assert sorted(cfg["target_modules"]) == ["attn_out", "k_proj", "q_proj", "v_proj"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    for d in (out, out / "checkpoint-2", out / "checkpoint-6"):
        assert "max_steps: 6" in (d / "config.yaml").read_text()
    trained = res["model"].eval()
    reloaded = PeftModel.from_pretrained(load_model(cfg["base_model_name_or_path"]), str(out / "adapter")).eval()
    ids = torch.randint(2, 120, (2, 24))
    mask = block_causal(torch.tensor([5, 7]), 8)
    with torch.no_grad():
        a, b = trained(ids, mask=mask), reloaded(ids, mask=mask)
        base = reloaded.get_base_model()
        with reloaded.disable_adapter():
            c = reloaded(ids, mask=mask)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-4  # the adapter is not a no-op
    assert base.config.arch == "llada"


def test_resume_from_checkpoint_is_exact(work, full_run, tmp_path):
    out, _ = full_run
    # a run "killed" after its step-2 checkpoint, in the middle of writing the step-4 one
    out2 = tmp_path / "resumed"
    out2.mkdir()
    shutil.copytree(out / "checkpoint-2", out2 / "checkpoint-2")
    (out2 / ".tmp-checkpoint-4").mkdir()
    (out2 / ".tmp-checkpoint-4" / "optimizer.pt").write_bytes(b"half-written")
    res = run_main(["--config", str(work / "cfg.yaml"), f"output_dir={out2}"])
    assert res["step"] == 6
    want, got = losses_by_step(out), losses_by_step(out2)
    assert sorted(got) == [3, 4, 5, 6]
    for s in (3, 4, 5, 6):
        assert got[s] == want[s], (s, got[s], want[s])
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out2 / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (out2 / ".tmp-checkpoint-4").exists()  # replaced by the real one


def test_resume_refuses_a_different_setup(work, full_run, tmp_path):
    out, _ = full_run
    out2 = tmp_path / "other"
    shutil.copytree(out / "checkpoint-2", out2 / "checkpoint-2")
    with pytest.raises(ConfigError, match=r"cannot resume .* with a different setup \(lora.r: 8 -> 4\)"):
        run_main(["--config", str(work / "cfg.yaml"), f"output_dir={out2}", "lora.r=4"])
    with pytest.raises(ConfigError, match="already holds checkpoints and resume=none"):
        run_main(["--config", str(work / "cfg.yaml"), f"output_dir={out2}", "resume=none"])


def test_resume_applies_a_changed_lr_and_keeps_one_metrics_line_per_step(work, full_run, tmp_path):
    """A run stopped after step 4 whose newest checkpoint is step 2 redoes steps 3-4: metrics.jsonl keeps one
    line per step. A changed optim.lr reaches the optimizer (not only config.yaml): schedule x new lr."""
    from train.schedule import lr_factor
    out, _ = full_run
    out2 = tmp_path / "lr"
    shutil.copytree(out / "checkpoint-2", out2 / "checkpoint-2")
    old = [x for x in (out / "metrics.jsonl").read_text().splitlines() if json.loads(x)["step"] <= 4]
    (out2 / "metrics.jsonl").write_text("\n".join(old) + "\n")
    run_main(["--config", str(work / "cfg.yaml"), f"output_dir={out2}", "optim.lr=0.005", "optim.schedule=cosine",
              "optim.warmup_steps=1"])
    rows = [json.loads(x) for x in (out2 / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    lrs = {r["step"]: r["train/lr"] for r in rows if "train/loss" in r}
    assert lrs[1] == lrs[2] == pytest.approx(1e-2)  # before the resume
    for s in (3, 4, 5, 6):  # optimizer step s-1 (0-based) of the new schedule at the new rate
        assert lrs[s] == pytest.approx(0.005 * lr_factor(s - 1, 1, 6, "cosine")), s


def test_sigkill_mid_run_then_resume_matches_uninterrupted(work, full_run, tmp_path):
    """A real `kill -9` of a long run, then resume from its step-4 checkpoint to step 6."""
    out, _ = full_run
    out3 = tmp_path / "killed"
    proc = subprocess.Popen([PY, str(REPO / "train/distill.py"), "--config", str(work / "cfg.yaml"),
                             f"output_dir={out3}", "max_steps=100000", "save_every=2"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out3 / "checkpoint-4" / "trainer_state.json").is_file():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint-4 within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    res = run_main(["--config", str(work / "cfg.yaml"), f"output_dir={tmp_path / 'cont'}",
                    f"resume={out3 / 'checkpoint-4'}", "max_steps=6"])
    assert res["step"] == 6
    want, got = losses_by_step(out), losses_by_step(tmp_path / "cont")
    assert got == {5: want[5], 6: want[6]}


# ---- 2 processes, DeepSpeed ZeRO-2, CPU ------------------------------------------------------

def test_deepspeed_zero2_two_cpu_processes_loss_falls(work, tmp_path):
    out = tmp_path / "ds"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [ACCELERATE, "launch", "--config_file", str(REPO / "configs/accelerate/cpu_zero2.yaml"),
           "--main_process_port", "29533", str(REPO / "train/distill.py"), "--config", str(work / "cfg.yaml"),
           f"output_dir={out}", "max_steps=10", "save_every=5", "grad_accum=1", "optim.lr=2e-2",
           "lora.dropout=0.0", "merge=true"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    assert sorted(losses_by_step(out)) == list(range(1, 11))
    assert (out / "checkpoint-5" / "pytorch_model").is_dir()  # DeepSpeed's own state files
    teacher = work / "teacher"
    student = PeftModel.from_pretrained(load_model(str(teacher)), str(out / "adapter")).eval()
    untrained = PeftModel.from_pretrained(load_model(str(teacher)), str(out / "adapter")).eval()
    for n, p in untrained.named_parameters():
        if "lora_B" in n:
            p.data.zero_()  # the student at step 0
    kl_before = fixed_batch_kl(untrained, teacher, work / "data.jsonl")
    kl_after = fixed_batch_kl(student, teacher, work / "data.jsonl")
    print(f"fixed-batch KL(teacher || student): step 0 {kl_before:.4f}, step 10 {kl_after:.4f}")
    assert kl_after < 0.8 * kl_before, (kl_before, kl_after)
    # merged full weights = base + adapter
    merged = load_model(str(out / "merged"))
    ids = torch.randint(2, 120, (2, 24))
    mask = block_causal(torch.tensor([5, 7]), 8)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids, mask=mask), student(ids, mask=mask), rtol=1e-4, atol=1e-4)


def test_periodic_eval_decodes_with_the_d2f_pipeline(work, tmp_path):
    pytest.importorskip("infer.api")
    out = tmp_path / "ev"
    run_main(["--config", str(work / "cfg.yaml"), f"output_dir={out}", "max_steps=4", "grad_accum=1",
              "eval.every=2", "eval.num_prompts=2", "eval.max_new_tokens=16"])
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if "eval/nfe" in e]
    assert [e["step"] for e in evals] == [2, 4]
    for e in evals:
        assert e["eval/nfe"] >= 1 and e["eval/tokens_per_forward"] > 0


def _tiny_tokenizer(path):
    """A word-level tokenizer whose ids fit tiny-llada (vocab 128, EOS 1, mask 127)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast
    words = ["<|pad|>", "<|eos|>", "<unk>", "<|user|>", "<|assistant|>", "<|eot|>", "what", "is", "plus",
             "the", "answer"] + [str(i) for i in range(40)]
    vocab = {w: i for i, w in enumerate(words)}
    vocab["<|mask|>"] = 127
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|pad|>",
                                   unk_token="<unk>", mask_token="<|mask|>")
    fast.chat_template = ("{% for m in messages %}<|user|> {{ m['content'] }}{% endfor %}"
                          "{% if add_generation_prompt %} <|assistant|>{% endif %}")
    fast.save_pretrained(str(path))
    return vocab


def test_text_data_is_chat_templated_tokenized_and_eos_padded(work, tmp_path):
    from d2f.data.records import read_records, resolve_fields
    from train.distill import build_sequences, load_tokenizer, tokenize
    v = _tiny_tokenizer(tmp_path / "tok")
    data = tmp_path / "text.jsonl"
    rows = [{"question": f"what is {a} plus {b}", "response": f"the answer is {a + b}"}
            for a in range(6) for b in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = read_records(str(data))
    pf, af = resolve_fields(recs, str(data), None, None)
    assert (pf, af) == ("question", "response")
    tok = load_tokenizer(str(tmp_path / "tok"))
    pairs = tokenize(recs, pf, af, tok, chat_template=True, answer_end="<|eot|>")
    p, a = pairs[3 * 6 + 4]  # 3 plus 4
    assert p == [v["<|user|>"], v["what"], v["is"], v["3"], v["plus"], v["4"], v["<|assistant|>"]]
    assert a == [v["the"], v["answer"], v["is"], v["7"], v["<|eot|>"]]
    ids, plen, dropped = build_sequences(pairs, 16, 4, eos_id=1)
    assert dropped == 0 and ids.shape == (36, 16) and plen[22] == 7
    assert ids[22].tolist() == p + a + [1] * 4
    # and the recipe trains on it (text path + tokenizer from model.tokenizer)
    res = run_main(["--config", str(work / "cfg.yaml"), f"output_dir={tmp_path / 'run'}", f"data.source={data}",
                    f"model.tokenizer={tmp_path / 'tok'}", "data.max_length=16", "noise.block_size=4",
                    "data.answer_end=<|eot|>", "max_steps=2", "grad_accum=1"])
    assert res["step"] == 2 and all(h["train/masked_tokens"] > 0 for h in res["history"])


def test_dream_teacher_distills_with_logit_shift(tmp_path, work):
    teacher = load_model("tiny-dream")
    g = torch.Generator().manual_seed(2)
    for n, p in teacher.named_parameters():
        p.data.fill_(1.0) if "norm" in n else p.data.normal_(0, 0.2, generator=g)
    save_pretrained(teacher, tmp_path / "dream")
    res = run_main(["--config", str(work / "cfg.yaml"), f"output_dir={tmp_path / 'run'}",
                    f"model.base={tmp_path / 'dream'}", "lora.target_modules=null", "max_steps=2", "grad_accum=1",
                    "model.gradient_checkpointing=true"])
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]  # Dream's defaults
    assert res["model"].get_base_model().config.logits_shift == 1
    assert res["history"][0]["train/kl"] > 0


def test_make_distill_data_writes_teacher_answers(work, tmp_path):
    pytest.importorskip("infer.api")
    sys.path.insert(0, str(REPO / "scripts"))
    import make_distill_data
    _tiny_tokenizer(tmp_path / "tok")
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"question": f"what is {a} plus 2", "answer": str(a + 2)}) + "\n"
                           for a in range(5)))
    out = tmp_path / "distill.jsonl"
    make_distill_data.main(["--model", str(work / "teacher"), "--tokenizer", str(tmp_path / "tok"), "--source",
                            str(src), "--out", str(out), "--max-new-tokens", "8", "--block-size", "8",
                            "--batch-size", "2"])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["question"] for r in rows] == [f"what is {a} plus 2" for a in range(5)]
    assert [r["reference"] for r in rows] == [str(a + 2) for a in range(5)]
    assert all(0 < r["num_tokens"] <= 8 and isinstance(r["answer"], str) for r in rows)
    # the file feeds the recipe as is
    res = run_main(["--config", str(work / "cfg.yaml"), f"output_dir={tmp_path / 'run'}", f"data.source={out}",
                    f"model.tokenizer={tmp_path / 'tok'}", "data.max_length=24", "noise.block_size=4",
                    "max_steps=1", "grad_accum=1"])
    assert res["step"] == 1
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(UserError, match=r"has no prompt field.*\(set --prompt-field\)"):
        make_distill_data.main(["--model", str(work / "teacher"), "--source", str(tmp_path / "bad.jsonl"),
                                "--out", str(tmp_path / "x.jsonl")])


def test_make_distill_data_resumes_an_interrupted_run(work, tmp_path, capsys):
    """A run stopped mid-way leaves <out>.tmp; the next run keeps its complete lines (not the one cut off,
    not another run's problems) and decodes only the rest, to the same file a single run writes."""
    pytest.importorskip("infer.api")
    sys.path.insert(0, str(REPO / "scripts"))
    import make_distill_data
    _tiny_tokenizer(tmp_path / "tok")
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"question": f"what is {a} plus 2"}) + "\n" for a in range(5)))
    args = ["--model", str(work / "teacher"), "--tokenizer", str(tmp_path / "tok"), "--source", str(src),
            "--max-new-tokens", "8", "--block-size", "8", "--batch-size", "1"]
    full = tmp_path / "full.jsonl"
    make_distill_data.main(args + ["--out", str(full)])
    lines = full.read_text().splitlines(keepends=True)
    out = tmp_path / "resumed.jsonl"
    tmp = tmp_path / "resumed.jsonl.tmp"
    fake = json.dumps({"question": "what is 9 plus 2", "answer": "MARK", "num_tokens": 1, "finished": True}) + "\n"
    tmp.write_text(lines[0] + fake + lines[2][:10])  # line 2 is not this problem's: everything from it is redone
    assert make_distill_data.resume_lines(tmp, make_distill_data.load_prompts(
        make_distill_data.parse_args(args + ["--out", str(out)]))) == [(lines[0], json.loads(lines[0]))]
    tmp.write_text(lines[0] + lines[1] + lines[2][:10])  # cut off while writing line 3
    settings = tmp_path / "resumed.jsonl.tmp.json"
    settings.write_text(json.dumps({"model": "another"}))  # written by a run with other settings
    capsys.readouterr()
    make_distill_data.main(args + ["--out", str(out), "--max-new-tokens", "4", "--block-size", "4"])
    assert "starting over" in capsys.readouterr().out
    assert all(json.loads(x)["num_tokens"] <= 4 for x in out.read_text().splitlines())
    tmp.write_text(lines[0] + lines[1] + lines[2][:10])
    settings.write_text(json.dumps(make_distill_data.settings_of(make_distill_data.parse_args(args + ["--out", "x"]))))
    make_distill_data.main(args + ["--out", str(out)])
    assert "resuming: 2 answers" in capsys.readouterr().out
    assert out.read_text() == full.read_text() and not tmp.exists() and not settings.exists()


def test_ddp_two_processes_step_the_lr_schedule_once_per_optimizer_step(work, tmp_path):
    """Under plain DDP the schedule advances once per optimizer step, not once per process (accelerate's
    scheduler wrapper would step a cosine schedule twice per step with 2 processes, reaching its floor
    halfway); with grad_accum 2 it does not advance on the micro-batches that only accumulate."""
    from train.schedule import lr_factor
    out = tmp_path / "ddp"
    cmd = [ACCELERATE, "launch", "--config_file", str(REPO / "configs/accelerate/cpu_ddp.yaml"),
           "--main_process_port", "29543", str(REPO / "train/distill.py"), "--config", str(work / "cfg.yaml"),
           f"output_dir={out}", "max_steps=4", "save_every=0", "optim.schedule=cosine", "optim.warmup_steps=1"]
    r = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [row["train/lr"] for row in rows if "train/loss" in row]
    assert lrs == pytest.approx([1e-2 * lr_factor(s, 1, 4, "cosine") for s in range(4)])


@pytest.mark.slow
def test_ddp_and_deepspeed_two_processes_train_identically(work, tmp_path):
    """Plain DDP (configs/accelerate/cpu_ddp.yaml) and ZeRO-2 see the same data and noise per rank
    and both average gradients over the 2 processes, so their losses agree step by step (a run
    whose processes did not synchronise would drift apart after step 1)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    losses = {}
    for name, port in (("cpu_ddp", "29541"), ("cpu_zero2", "29542")):
        out = tmp_path / name
        cmd = [ACCELERATE, "launch", "--config_file", str(REPO / f"configs/accelerate/{name}.yaml"),
               "--main_process_port", port, str(REPO / "train/distill.py"), "--config", str(work / "cfg.yaml"),
               f"output_dir={out}", "max_steps=5", "save_every=0", "grad_accum=1", "lora.dropout=0.0"]
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "2 process(es)" in r.stdout
        assert (out / "checkpoint-5").is_dir()
        losses[name] = losses_by_step(out)
    assert sorted(losses["cpu_ddp"]) == [1, 2, 3, 4, 5]
    for s in range(1, 6):
        assert losses["cpu_ddp"][s] == pytest.approx(losses["cpu_zero2"][s], rel=1e-4), s


@pytest.mark.parametrize("name", ["d2f_llada", "d2f_dream", "d2f_tiny", "d2f_tiny_states"])
def test_shipped_configs_parse_and_follow_the_public_recipe(name):
    import yaml
    from d2f.yaml_config import load_config
    from train.distill import DEFAULT_TARGETS, DistillConfig, validate
    cfg = load_config(DistillConfig, REPO / f"configs/{name}.yaml", ["max_steps=7", "output_dir=/tmp/x"])
    validate(cfg)
    assert cfg.max_steps == 7 and cfg.output_dir == "/tmp/x"
    assert (cfg.noise.block_size, cfg.noise.schedule, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == \
        (16, "monotone", 32, 32, 0.1)
    assert (cfg.optim.betas, cfg.optim.weight_decay, cfg.optim.grad_clip) == ([0.9, 0.95], 0.05, 1.0)
    if not name.startswith("d2f_tiny"):
        arch = "llada" if "llada" in name else "dream"
        assert cfg.lora.target_modules == DEFAULT_TARGETS[arch]
        assert (cfg.optim.lr, cfg.data.max_length, cfg.model.dtype) == (1e-5, 512, "bfloat16")
        assert cfg.model.base == {"llada": "GSAI-ML/LLaDA-8B-Instruct", "dream": "Dream-org/Dream-v0-Base-7B"}[arch]
        assert cfg.data.source == "Lansechen/bs17k_collection_filtered_hard_maxlength600"
    for acc in ("deepspeed_zero2", "cpu_zero2", "cpu_ddp"):
        a = yaml.safe_load((REPO / f"configs/accelerate/{acc}.yaml").read_text())
        assert a["num_processes"] >= 2
        if "zero2" in acc:
            assert a["distributed_type"] == "DEEPSPEED" and a["deepspeed_config"]["zero_stage"] == 2


def test_student_rounds_chain():
    """The states round continues configs/d2f_tiny.yaml's adapter with the same LoRA, noise and data, records its
    states under that run, and scripts/build_testbed.sh ships the round's adapter as testbed/student."""
    from d2f.yaml_config import load_config
    from train.distill import DistillConfig
    first, second = (load_config(DistillConfig, REPO / f"configs/{n}.yaml") for n in ("d2f_tiny", "d2f_tiny_states"))
    assert second.model.adapter == f"{first.output_dir}/adapter" and not first.model.adapter
    assert Path(second.data.student_states).parent == Path(first.output_dir) and second.data.student_state_frac == 0.5
    assert (second.lora, second.noise, second.model.base) == (first.lora, first.noise, first.model.base)
    assert (second.data.source, second.data.max_length) == (first.data.source, first.data.max_length)
    build = (REPO / "scripts" / "build_testbed.sh").read_text()
    assert "--config configs/d2f_tiny_states.yaml output_dir=runs/d2f_tiny_states" in build
    assert "cp runs/d2f_tiny_states/adapter/{adapter_config.json,adapter_model.safetensors" in build


def test_loss_on_eos_blocks_switch_drops_padding_blocks_from_the_loss():
    from peft import LoraConfig, get_peft_model
    from train.distill import NoiseSection, distill_step
    peft_model = get_peft_model(load_model("tiny-llada"), LoraConfig(r=2, target_modules=["q_proj"]))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 1, 1, 1, 1, 1, 1, 1, 1]])  # prompt 2, blocks of 4: [2,6) [6,10) [10,14)
    plen = torch.tensor([2])
    counts = {}
    for on in (True, False):
        noise = NoiseSection(block_size=4, p_min=1.0, p_max=1.0, loss_on_eos_blocks=on)  # mask everything
        parts = distill_step(peft_model, peft_model, ids, plen, noise, 127, 1, 0, torch.Generator().manual_seed(0))
        counts[on] = parts["masked_tokens"].item()
    assert counts == {True: 12.0, False: 4.0}  # only block 0 holds real answer tokens


def test_checkpoint_listing_ignores_partial_saves_and_prunes_oldest(tmp_path):
    from train.checkpoint import latest_checkpoint, list_checkpoints, prune_checkpoints
    for s in (2, 4, 10):
        (tmp_path / f"checkpoint-{s}").mkdir()
        (tmp_path / f"checkpoint-{s}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-12").mkdir()  # no trainer_state.json: incomplete
    (tmp_path / ".tmp-checkpoint-14").mkdir()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 10]
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"
    prune_checkpoints(tmp_path, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 10]


def test_d2f_tiny_writes_the_teacher_answers_it_needs_on_first_use(tmp_path):
    """configs/d2f_tiny.yaml on a fresh clone: data.source does not exist yet, so the recipe first writes
    the teacher's answers (data.teacher_answers of them), then trains on them."""
    data = tmp_path / "answers.jsonl"
    res = run_main(["--config", str(REPO / "configs/d2f_tiny.yaml"), f"output_dir={tmp_path / 'run'}",
                    f"data.source={data}", "data.teacher_answers=4", "max_steps=1", "batch_size=2", "eval.every=0"])
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    assert len(rows) == 4 and all(r["answer"] and "question" in r for r in rows)
    assert res["step"] == 1 and (tmp_path / "run" / "adapter" / "d2f_base.json").is_file()


# ---- a round on the student's own decoding states (data.student_states) -----------------------

def states_round(work, out, states, *extra):
    """A 4-step round continuing full_run's adapter, half of each batch from its recorded decoding states."""
    return run_main(["--config", str(work / "cfg.yaml"), f"output_dir={out}",
                     f"model.adapter={work / 'full' / 'adapter'}", f"data.student_states={states}", "data.student_state_frac=0.5", "eval.max_new_tokens=16",
                     "max_steps=4", *extra])


def states_kl(peft_model, states_file, mask_id=127):
    """KL(teacher || student) at the in-flight masked slots of 32 fixed recorded states."""
    from d2f.masks import full
    from train.student_states import StudentStates, load_student_states
    s = StudentStates(load_student_states(states_file), mask_id, 32, 8)
    x, plen, kv, at = s.sample(32, torch.Generator().manual_seed(7))
    with torch.no_grad():
        student = peft_model(x, mask=block_causal(plen, 8, kv))
        with peft_model.disable_adapter():
            teacher = peft_model(x, mask=full(kv))
    return d2f_distill_loss(student, teacher, at, at.float())["kl"].item()


def test_states_round_records_on_first_use_continues_the_adapter_and_fits_the_states(work, full_run, tmp_path):
    states = tmp_path / "states.pt"
    res = states_round(work, tmp_path / "round", states)
    d = torch.load(states, weights_only=True)
    assert len(d["prompts"]) == 64 and d["gen_len"] == 16 and d["block_size"] == 8 and d["adapter"].endswith("adapter")
    rec = [json.loads(x) for x in (tmp_path / "round" / "metrics.jsonl").read_text().splitlines()]
    assert all("train/states_kl" in r and "train/kl" in r for r in rec if "train/loss" in r)
    # the round starts from the adapter: with lr ~0 its weights stay the adapter's
    frozen = states_round(work, tmp_path / "frozen", states, "optim.lr=1e-12")
    a = load_file(str(work / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "frozen" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    before = states_kl(frozen["model"].eval(), states)
    after = states_kl(res["model"].eval(), states)
    assert after < 0.8 * before, (before, after)  # the round pulls the student to the teacher on its states


def test_states_round_resumes_exactly(work, full_run, tmp_path):
    states = tmp_path / "states.pt"
    states_round(work, tmp_path / "a", states)
    out2 = tmp_path / "b"
    out2.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", out2 / "checkpoint-2")
    states_round(work, out2, states)
    want, got = losses_by_step(tmp_path / "a"), losses_by_step(out2)
    assert sorted(got) == [3, 4] and all(got[s] == want[s] for s in (3, 4)), (got, want)


@pytest.mark.parametrize("override,message", [
    ("data.student_state_frac=0.5", "data.student_state_frac > 0 needs data.student_states"),
    ("data.student_state_frac=1.0", r"data.student_state_frac must be in \[0, 1\)"),
    ("data.student_states={d}/none.pt data.student_state_frac=0.5", "does not exist and model.adapter is empty"),
    ("data.student_states={d}/none.pt data.student_state_frac=0.1", "rounds to 0 states per micro-batch"),
    ("model.adapter={d}/none", r"model.adapter '.*/none' is not a LoRA adapter directory"),
    ("model.adapter={d}/full/adapter lora.r=4", r"has r=8, alpha=16, .* but lora is r=4"),
    ("model.adapter={d}/full/adapter data.student_states={d}/none.pt data.student_state_frac=0.5 targets=data",
     "targets=data trains on clean tokens"),
])
def test_states_round_bad_input_fails_before_compute(work, full_run, tmp_path, override, message):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message):
        run_main(["--config", str(work / "cfg.yaml"), *override.format(d=work).split(), f"output_dir={out}"])
    assert not out.exists()
