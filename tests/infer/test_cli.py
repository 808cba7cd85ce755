"""`python -m infer.generate` end to end on a tiny model and a tiny tokenizer made here."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import random_model
from infer.generate import main

ROOT = Path(__file__).resolve().parents[2]


def make_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<|pad|>": 0, "<|eos|>": 1}
    for i in range(2, 127):
        vocab[f"w{i}"] = i
    vocab["<|mask|>"] = 127
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w2"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|eos|>", pad_token="<|pad|>",
                                  mask_token="<|mask|>")
    tok.chat_template = "{% for m in messages %}w3 {{ m['content'] }} w4{% endfor %}"
    tok.save_pretrained(path)
    return tok


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    random_model("tiny-llada", seed=21).save_pretrained(d / "dllm")
    random_model("tiny-ar", seed=21).save_pretrained(d / "ar")
    make_tokenizer(d / "tok")
    return d


@pytest.mark.parametrize("mode,extra", [("d2f", ["--tau-conf", "0.5"]), ("fast-dllm", ["--cache", "dual"]),
                                        ("vanilla", ["--steps", "8"]), ("ar", [])])
def test_cli_stats_and_trace(tiny_dir, tmp_path, capsys, mode, extra):
    model = tiny_dir / ("ar" if mode == "ar" else "dllm")
    trace = tmp_path / "trace.jsonl"
    blocks = [] if mode == "ar" else ["--block-size", "8"]  # ar has no blocks (and refuses the option)
    rc = main(["--model", str(model), "--tokenizer", str(tiny_dir / "tok"), "--mode", mode,
               "--max-new-tokens", "16", *blocks, "--dtype", "float64",
               "--prompt", "w10 w11 w12", "--prompt", "w20", "--trace", str(trace), *extra])
    assert rc == 0
    out = capsys.readouterr().out
    stats = [line for line in out.splitlines() if line.startswith("[request ")]
    assert len(stats) == 2
    for line in stats:
        fields = dict(kv.split("=") for kv in line.split("] ")[1].split())
        assert set(fields) == {"tokens", "nfe", "tokens/forward", "wall", "tokens/s"}
        assert 0 < int(fields["tokens"]) <= 16 and int(fields["nfe"]) >= 1
    assert "### request 0: w10 w11 w12" in out and "[total] requests=2" in out
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    done = [r for r in rows if r.get("done")]
    steps = [r for r in rows if not r.get("done")]
    assert [r["request"] for r in done] == [0, 1]
    assert done[0]["prompt"] == "w3 w10 w11 w12 w4"  # chat template applied
    for req in (0, 1):
        mine = [r for r in steps if r["request"] == req]
        assert len(mine) == done[req]["nfe"]
        committed = sorted(p for r in mine for p in r["committed"])
        assert len(committed) == len(set(committed)) >= done[req]["num_tokens"]
    if mode == "d2f":
        assert all("blocks" in r for r in steps)
    # the streamed text ends with the final answer text
    assert done[0]["text"] in out


def test_cli_input_file_batch_and_no_chat(tiny_dir, tmp_path, capsys):
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"question": "w5 w6"}) + "\n" + json.dumps({"prompt": "w7"}) + "\n")
    rc = main(["--model", str(tiny_dir / "dllm"), "--tokenizer", str(tiny_dir / "tok"), "--mode", "d2f",
               "--max-new-tokens", "8", "--block-size", "4", "--input-file", str(f), "--batch-size", "2",
               "--no-chat-template"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "### request 0: w5 w6" in out and "### request 1: w7" in out


def test_cli_errors_are_clear(tiny_dir, capsys):
    from d2f.errors import run_main
    rc = run_main(main, ["--model", str(tiny_dir / "dllm"), "--tokenizer", str(tiny_dir / "tok"), "--mode", "d2f",
               "--max-new-tokens", "10", "--block-size", "4"])
    assert rc == 2
    assert "max_new_tokens 10 is not a multiple of block_size 4" in capsys.readouterr().err
    rc = run_main(main, ["--model", str(tiny_dir / "ar"), "--tokenizer", str(tiny_dir / "tok"), "--mode", "d2f",
               "--max-new-tokens", "8", "--block-size", "4"])
    assert rc == 2 and "use mode 'ar'" in capsys.readouterr().err


def test_cli_without_testbed_names_the_missing_dir(tmp_path):
    env = {"D2F_TESTBED": str(tmp_path / "nowhere"), "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-m", "infer.generate"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 2
    assert "nowhere" in p.stderr and "testbed" in p.stderr


@pytest.fixture
def fake_testbed(tmp_path, monkeypatch):
    """A testbed directory with the contract's layout, made of tiny random models."""
    from peft import LoraConfig, get_peft_model

    from d2f import testbed
    make_tokenizer(tmp_path / "tokenizer")
    random_model("tiny-llada", seed=41).save_pretrained(tmp_path / "teacher")
    random_model("tiny-ar", seed=41).save_pretrained(tmp_path / "ar")
    student = get_peft_model(random_model("tiny-llada", seed=41),
                             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    student.save_pretrained(tmp_path / "student")
    monkeypatch.setattr(testbed, "TESTBED_DIR", tmp_path)
    return tmp_path


def test_load_testbed_roles(fake_testbed):
    from infer.api import load
    teacher, tok = load(None, "vanilla", dtype="float64")
    student, _ = load(None, "d2f", dtype="float64")
    ar, _ = load(None, "ar", dtype="float64")
    assert tok.mask_token_id == 127 and ar.config.is_causal and not teacher.config.is_causal
    x = torch.tensor([[5, 6, 7, 127]])
    assert not torch.allclose(student(x), teacher(x))  # the adapter was applied
    assert not any("lora" in n for n, _ in student.named_parameters())


def test_cli_defaults_to_testbed(fake_testbed, capsys):
    assert main(["--max-new-tokens", "32", "--block-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "### request 0: Natalia sold clips" in out and "[request 0] tokens=" in out


def test_cli_show_masks(tiny_dir, capsys):
    rc = main(["--model", str(tiny_dir / "dllm"), "--tokenizer", str(tiny_dir / "tok"), "--mode", "d2f",
               "--max-new-tokens", "16", "--block-size", "4", "--dtype", "float64", "--prompt", "w9",
               "--tau-conf", "0.5", "--show-masks"])
    assert rc == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[ ") and "] " in line]
    nfe = int(out.split("nfe=")[1].split()[0])
    assert len(lines) == nfe >= 2  # one rendered line per forward
    assert any("_" in line for line in lines[:-1])  # masked positions shown mid-way
