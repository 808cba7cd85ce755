"""Bad input through every command's entry point: exit status 2 and one line naming the bad value.

Each case runs the command's `main` in-process through `d2f.errors.run_main`, exactly what
`python -m ...` runs, and asserts the exit status, the key words of the message and that stderr is one
line (no traceback). The cases fail before a model would decode or train, so the table stays fast.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from d2f.errors import run_main

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "testbed" / "teacher"


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Path:
    """Broken inputs, made once: checkpoints, input files, output locations."""
    d = tmp_path_factory.mktemp("bad")

    def checkpoint(name: str, edit=None, truncate: bool = False):
        out = d / name
        shutil.copytree(TEACHER, out)
        if edit is not None:
            cfg = json.loads((out / "config.json").read_text())
            edit(cfg)
            (out / "config.json").write_text(json.dumps(cfg))
        if truncate:
            data = (out / "model.safetensors").read_bytes()
            (out / "model.safetensors").write_bytes(data[: len(data) // 2])

    checkpoint("truncated", truncate=True)
    checkpoint("no_rope", lambda c: c.pop("rope_theta"))
    checkpoint("llama_cfg", lambda c: c.update(model_type="llama"))
    checkpoint("unknown_type", lambda c: c.update(model_type="foobar"))
    checkpoint("bad_mask", lambda c: c.update(mask_token_id=5000))
    checkpoint("str_layers", lambda c: c.update(n_layers="six"))
    checkpoint("mask_eos", lambda c: c.update(mask_token_id=1))
    checkpoint("mask_ordinary", lambda c: c.update(mask_token_id=100))
    checkpoint("bad_json")
    (d / "bad_json" / "config.json").write_text('{"model_type": "llada",')
    checkpoint("list_json")
    (d / "list_json" / "config.json").write_text("[1, 2]")
    (d / "empty_dir").mkdir()
    shutil.copytree(REPO / "testbed" / "tokenizer", d / "broken_tok")
    (d / "broken_tok" / "tokenizer.json").write_text("{not json")
    shutil.copytree(REPO / "testbed" / "student", d / "bad_adapter")
    (d / "bad_adapter" / "adapter_config.json").write_text("{oops")
    shutil.copytree(REPO / "testbed" / "student", d / "trunc_adapter")
    data = (d / "trunc_adapter" / "adapter_model.safetensors").read_bytes()
    (d / "trunc_adapter" / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    shutil.copytree(REPO / "testbed" / "student", d / "unrecorded_adapter")  # another tool's: no d2f_base.json
    (d / "unrecorded_adapter" / "d2f_base.json").unlink()
    (d / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    (d / "empty.jsonl").write_text("\n")
    (d / "list.jsonl").write_text(json.dumps(["a question"]) + "\n")
    (d / "broken.jsonl").write_text('{"prompt": "x"\n')
    (d / "noprompt.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    (d / "preds").mkdir()
    (d / "preds" / "predictions.jsonl").write_text(json.dumps({"index": 0}) + "\n")
    (d / "afile").write_text("x")
    (d / "dir.jsonl").mkdir()  # a directory where a data file is expected
    (d / "bad_run").mkdir()
    (d / "bad_run" / "predictions.jsonl").write_text(json.dumps({"index": 0}) + "\n")
    (d / "bad_run" / "run.json").write_text("[1]")
    (d / "bad.yaml").write_text("lr: [1, 2\n")
    (d / "compare.yaml").write_text("configs:\n  a: {mode: vanilla, max_new_tokens: 32, block_size: 32}\n"
                                    "baseline: teacher-vanila\n")
    return d


def _cmd(name: str):
    if name == "generate":
        from infer.generate import main
    elif name == "eval":
        from infer.eval import main
    elif name == "compare":
        from infer.compare import main
    elif name == "distill":
        from train.distill import main
    elif name == "pretrain":
        from train.pretrain import main
    elif name == "make_distill_data":
        sys.path.insert(0, str(REPO / "scripts"))
        from make_distill_data import main
    else:
        raise KeyError(name)
    return main


DISTILL = ["--config", "configs/d2f_tiny.yaml"]
PRETRAIN = ["--config", "configs/testbed_teacher.yaml"]
GEN = ["--prompt", "What is 2 + 3?", "--max-new-tokens", "32", "--block-size", "32"]

CASES = [
    # ---- infer.generate: decoding values
    ("generate", GEN + ["--temperature", "inf"], ["temperature", "finite"]),
    ("generate", GEN + ["--temperature", "nan"], ["temperature", "finite"]),
    ("generate", GEN + ["--temperature", "-1"], ["temperature must be >= 0"]),
    ("generate", GEN + ["--threshold", "1.5"], ["threshold must be in [0, 1]", "1.5"]),
    ("generate", GEN + ["--tau-conf", "-0.1"], ["tau_conf must be in [0, 1]"]),
    ("generate", GEN + ["--tau-add", "nan"], ["tau_add", "finite"]),
    ("generate", GEN + ["--factor", "inf"], ["factor", "finite"]),
    ("generate", ["--block-size", "0"], ["block_size must be a positive integer"]),
    ("generate", ["--max-new-tokens", "100", "--block-size", "32"], ["100 is not a multiple of block_size 32"]),
    ("generate", ["--mode", "vanilla", "--max-new-tokens", "64", "--block-size", "32", "--steps", "7"],
     ["steps 7 is not a multiple of the number of blocks 2"]),
    ("generate", ["--mode", "fast"], ["mode 'fast' is not one of"]),
    ("generate", ["--seed", "abc"], ["seed", "expected int", "abc"]),
    ("generate", ["--max-new-tokens", "2.5"], ["max_new_tokens", "expected int"]),
    ("generate", ["--max-new-tokens", "1024", "--block-size", "32"], ["max_position_embeddings 512", "lower"]),
    ("generate", GEN + ["--batch-size", "0"], ["--batch-size must be positive"]),
    # ---- infer.generate: paths, devices, files
    ("generate", GEN + ["--model", "/nonexistent/model"], ["'/nonexistent/model' does not exist"]),
    ("generate", GEN + ["--model", "./relative/missing"], ["does not exist"]),
    ("generate", GEN + ["--model", str(TEACHER / "config.json")], ["is a file"]),
    ("generate", GEN + ["--tokenizer", "/no/tokenizer"], ["tokenizer '/no/tokenizer' does not exist"]),
    ("generate", GEN + ["--adapter", "/no/adapter"], ["adapter '/no/adapter' does not exist"]),
    ("generate", GEN + ["--device", "tpu"], ["device 'tpu'"]),
    ("generate", GEN + ["--dtype", "float8"], ["dtype 'float8' is not one of"]),
    ("generate", GEN + ["--trace", "/nonexistent_dir/t.jsonl"], ["--trace", "'/nonexistent_dir' does not exist"]),
    ("generate", GEN + ["--trace", "{fx}"], ["--trace", "is a directory"]),
    ("generate", ["--input-file", "{fx}/missing.jsonl"], ["missing.jsonl' does not exist"]),
    ("generate", ["--input-file", "{fx}/dir.jsonl"], ["--input-file", "dir.jsonl' is a directory", "pass a .jsonl file"]),
    ("generate", ["--input-file", "{fx}/empty.jsonl"], ["holds no prompts"]),
    ("generate", ["--input-file", "{fx}/list.jsonl"], ["list.jsonl:1", "a JSON list"]),
    ("generate", ["--input-file", "{fx}/broken.jsonl"], ["broken.jsonl:1", "not a JSON line"]),
    ("generate", ["--input-file", "{fx}/noprompt.jsonl"], ["noprompt.jsonl:1", "'prompt' or 'question'"]),
    ("generate", ["--prompt", "  "], ["prompt 0 is empty"]),
    ("generate", ["--show-masks", "--batch-size", "2"], ["--show-masks needs --batch-size 1"]),
    # ---- infer.generate: checkpoints that cannot load correctly
    ("generate", GEN + ["--mode", "vanilla", "--model", "{fx}/truncated", "--tokenizer", "testbed/tokenizer"],
     ["model.safetensors", "truncated or corrupt"]),
    ("generate", GEN + ["--mode", "vanilla", "--model", "{fx}/no_rope"], ["missing rope_theta"]),
    ("generate", GEN + ["--mode", "vanilla", "--model", "{fx}/llama_cfg"], ["do not match its config.json", "llama"]),
    ("generate", GEN + ["--mode", "vanilla", "--model", "{fx}/unknown_type"], ["cannot read", "foobar"]),
    ("generate", GEN + ["--mode", "vanilla", "--model", "{fx}/bad_mask"], ["mask_token_id 5000 is outside"]),
    ("generate", GEN + ["--mode", "vanilla", "--model", "{fx}/str_layers"], ["num_layers must be a positive integer"]),
    ("generate", ["--mode", "ar", "--model", "testbed/ar", "--adapter", "testbed/student"],
     ["adapter 'testbed/student' was trained on", "different model"]),
    ("generate", ["--mode", "ar", "--model", "testbed/teacher"], ["needs a causal model"]),
    ("generate", ["--mode", "ar", "--block-size", "8"], ["block_size does not apply to mode 'ar'"]),
    ("generate", ["--mode", "d2f", "--steps", "8"], ["steps does not apply to mode 'd2f'"]),
    ("generate", ["--mode", "d2f", "--rule", "topk", "--threshold", "0.1"], ["rule, threshold do not apply"]),
    ("generate", ["--mode", "d2f", "--cache", "dual"], ["cache 'dual' does not apply to mode 'd2f'"]),
    ("generate", ["--mode", "vanilla", "--max-new-tokens", "32", "--block-size", "32", "--steps", "64"],
     ["steps 64 is more than max_new_tokens 32"]),
    ("generate", ["--seed", str(2**70)], ["seed must be an integer in [0, 2**63)"]),
    ("generate", ["--input-file", "{fx}/latin1.jsonl"], ["is not UTF-8 text"]),
    ("generate", GEN + ["--mode", "vanilla", "--model", "{fx}/bad_json"], ["config", "is not valid JSON"]),
    ("generate", GEN + ["--mode", "vanilla", "--model", "{fx}/list_json"], ["holds a JSON list"]),
    ("generate", GEN + ["--mode", "vanilla", "--model", "{fx}/mask_eos"], ["mask_token_id 1 is also the eos_token_id"]),
    ("generate", GEN + ["--mode", "vanilla", "--model", "{fx}/mask_ordinary"],
     ["mask_token_id is 100 but its tokenizer's mask token", "id 2"]),
    ("generate", GEN + ["--mode", "vanilla", "--model", "tiny-llada", "--tokenizer", "testbed/tokenizer"],
     ["token id", "outside the model's vocabulary of 128"]),
    ("generate", GEN + ["--mode", "vanilla", "--tokenizer", "{fx}/empty_dir"], ["cannot load the tokenizer"]),
    ("generate", GEN + ["--mode", "vanilla", "--tokenizer", "{fx}/broken_tok"], ["cannot load the tokenizer"]),
    ("generate", GEN + ["--adapter", "{fx}/bad_adapter"], ["adapter config", "is not valid JSON"]),
    ("generate", GEN + ["--adapter", "{fx}/trunc_adapter"], ["cannot load adapter", "incomplete"]),
    ("generate", ["--mode", "ar", "--model", "testbed/ar", "--adapter", "{fx}/unrecorded_adapter"],
     ["was trained on 'testbed/teacher'", "different model"]),
    # ---- infer.eval
    ("eval", ["--limit", "0"], ["--limit must be a positive integer"]),
    ("eval", ["--batch-size", "-1"], ["--batch-size must be a positive integer"]),
    ("eval", ["--shots", "-1"], ["--shots must be >= 0"]),
    ("eval", ["--data", "/no/such.jsonl", "--output-dir", "{fx}/out_nodata"], ["/no/such.jsonl"]),
    ("eval", ["--data", "{fx}/list.jsonl", "--output-dir", "{fx}/out_list"], ["list.jsonl:1", "a JSON list, expected an object"]),
    ("eval", ["--limit", "2", "--output-dir", "{fx}/afile"],
     ["afile' is a file; --output-dir must be a directory (or a path that does not exist yet)"]),
    ("eval", ["--limit", "2", "--output-dir", "{fx}/afile/sub"], ["afile' is a file, so no directory can be created"]),
    ("eval", ["--data", "{fx}/dir.jsonl", "--output-dir", "{fx}/out_datadir"], ["dir.jsonl' is a directory",
                                                                                 ".jsonl or .parquet file"]),
    ("eval", ["--limit", "2", "--output-dir", "/proc/d2f-out"], ["/proc/d2f-out"]),
    ("eval", ["--mode", "vanilla", "--max-new-tokens", "32", "--limit", "1", "--no-progress", "--output-dir",
              "{fx}/preds"], ["no run.json", "--overwrite"]),
    ("eval", ["--threshold", "2"], ["threshold must be in [0, 1]"]),
    ("eval", ["--split", "validation", "--output-dir", "{fx}/out_split"],
     ["'validation' must be 'train', 'test' or 'dev'"]),
    ("eval", ["--data", "real100", "--split", "dev", "--output-dir", "{fx}/out_dev"],
     ["split 'dev' exists only for source 'testbed'", "'real100'"]),
    ("eval", ["--mode", "vanilla", "--max-new-tokens", "32", "--block-size", "32", "--limit", "1", "--no-progress",
              "--output-dir", "{fx}/bad_run"], ["run.json", "not a run record", "--overwrite"]),
    # ---- infer.compare
    ("compare", ["--config", "/no/compare.yaml"], ["'/no/compare.yaml' does not exist"]),
    ("compare", ["--config", "{fx}/bad.yaml"], ["not valid YAML", "line"]),
    ("compare", ["--config", "{fx}/empty_dir"], ["config file", "is a directory; pass a YAML file"]),
    ("compare", ["--limit", "1", "--output-dir", "{fx}/afile"],
     ["afile' is a file; --output-dir must be a directory (or a path that does not exist yet)"]),
    ("compare", ["--config", "{fx}/compare.yaml", "--output-dir", "{fx}/cmp"], ["baseline 'teacher-vanila'"]),
    ("compare", ["--only", "nope", "--output-dir", "{fx}/cmp2"], ["--only names unknown configs ['nope']"]),
    ("compare", ["limitt=3", "--output-dir", "{fx}/cmp3"], ["unknown config key 'limitt'", "limit"]),
    ("compare", ["configs=fo", "--output-dir", "{fx}/cmp4"], ["'configs'", "expected a mapping"]),
    ("compare", ["threads=0", "--output-dir", "{fx}/cmp7"], ["threads must be a positive integer"]),
    ("compare", ["--only", "student-d2f", "configs.student-d2f.adapter={fx}/no_adapter_here", "--limit", "1",
                 "--output-dir", "{fx}/cmp8"], ["every config was skipped", "student-d2f"]),
    ("compare", ["configs.ar.enabled=maybe", "--output-dir", "{fx}/cmp5"], ["configs.ar.enabled", "true/false"]),
    ("compare", ["configs.ar=fast", "--output-dir", "{fx}/cmp6"], ["configs.ar must be a mapping"]),
    # ---- train/distill.py
    ("distill", DISTILL + ["optim.grad_clip=-1"], ["optim.grad_clip must be > 0", "-1"]),
    ("distill", DISTILL + ["optim.lr=nan"], ["optim.lr", "finite"]),
    ("distill", DISTILL + ["optim.lr=0"], ["optim.lr must be > 0"]),
    ("distill", DISTILL + ["optim.betas=[0.9,1.5]"], ["optim.betas", "[0, 1)"]),
    ("distill", DISTILL + ["optim.warmup_steps=-3"], ["optim.warmup_steps must be >= 0"]),
    ("distill", DISTILL + ["noise.p_min=0.8", "noise.p_max=0.2"], ["p_min <= p_max"]),
    ("distill", DISTILL + ["noise.block_size=0"], ["noise.block_size=0"]),
    ("distill", DISTILL + ["lora.dropout=1.5"], ["lora.dropout must be in [0, 1)"]),
    ("distill", DISTILL + ["max_steps=0"], ["max_steps must be > 0"]),
    ("distill", DISTILL + ["optim.lrr=1"], ["unknown config key 'lrr'", "lr"]),
    ("distill", DISTILL + ["max_steps=ten"], ["max_steps", "expected int"]),
    ("distill", DISTILL + ["model.base=/no/such/teacher"], ["'/no/such/teacher' does not exist"]),
    ("distill", ["--config", "/no/config.yaml"], ["'/no/config.yaml' does not exist"]),
    ("distill", ["--config", "{fx}/bad.yaml"], ["not valid YAML"]),
    ("distill", ["--config", "{fx}/empty_dir"], ["config file", "empty_dir' is a directory; pass a YAML file"]),
    ("distill", DISTILL + ["output_dir={fx}/afile"],
     ["afile' is a file; output_dir must be a directory (or a path that does not exist yet)"]),
    ("distill", DISTILL + ["data.teacher_answers=0", "data.source={fx}/dir.jsonl", "output_dir={fx}/dist_dir"],
     ["data file", "dir.jsonl' is a directory", "a .jsonl file"]),
    ("distill", DISTILL + ["data.teacher_answers=2", "data.source={fx}/dir.jsonl", "output_dir={fx}/dist_ta"],
     ["data.source", "dir.jsonl' is a directory", "data.teacher_answers=2", "set data.source to a file path"]),
    ("distill", DISTILL + ["resume=/no/checkpoint"], ["resume='/no/checkpoint' is not a complete checkpoint"]),
    # ---- train/pretrain.py
    ("pretrain", PRETRAIN + ["grad_clip=-1"], ["grad_clip must be > 0"]),
    ("pretrain", PRETRAIN + ["lr=0"], ["lr must be > 0"]),
    ("pretrain", PRETRAIN + ["lr=inf"], ["'lr'", "finite"]),
    ("pretrain", PRETRAIN + ["warmup_steps=-5"], ["warmup_steps must be >= 0"]),
    ("pretrain", PRETRAIN + ["beta2=1.0"], ["beta2 must be in [0, 1)"]),
    ("pretrain", PRETRAIN + ["min_lr_ratio=2"], ["min_lr_ratio must be in [0, 1]"]),
    ("pretrain", PRETRAIN + ["mask_eps=0"], ["mask_eps must be in (0, 1)"]),
    ("pretrain", PRETRAIN + ["objective=mlm"], ["objective 'mlm' is not one of"]),
    ("pretrain", PRETRAIN + ["semi_ar_frac=0.5", "clean_prefix_frac=0.75"], ["must be <= 1"]),
    ("pretrain", PRETRAIN + ["mixed_precision=fp8"], ["mixed_precision 'fp8'"]),
    ("pretrain", PRETRAIN + ["data.num_problems=0"], ["data.num_problems and data.answer_len must be > 0"]),
    ("pretrain", PRETRAIN + ["model.max_position_embeddings=16", "data.num_problems=4", "output_dir={fx}/pt"],
     ["max_position_embeddings 16 is shorter than the longest training sequence"]),
    ("pretrain", PRETRAIN + ["decode_order_frac=0.5", "semi_ar_frac=0", "decode_orders={fx}/afile",
                             "data.num_problems=4"],
     ["is not a decode_orders file"]),
    ("pretrain", ["--config", "{fx}/empty_dir"], ["config file", "empty_dir' is a directory; pass a YAML file"]),
    ("pretrain", PRETRAIN + ["output_dir={fx}/afile"],
     ["afile' is a file; output_dir must be a directory (or a path that does not exist yet)"]),
    ("pretrain", PRETRAIN + ["batch_size=0", "output_dir={fx}/pt_b0"],
     ["batch_size must be an integer >= 1, got 0"]),
    ("pretrain", PRETRAIN + ["init_from=testbed/ar", "model.num_layers=4", "data.num_problems=4",
                             "output_dir={fx}/pt_init"],
     ["init_from 'testbed/ar' does not match the configured model", "36 tensor(s) differ",
      "'model.transformer.blocks.4.attn_norm.weight' (model: absent, checkpoint: (192,))",
      "model.num_layers=8 (configured: 4)", "drop init_from"]),
    # ---- scripts/make_distill_data.py
    ("make_distill_data", ["--model", "testbed/teacher", "--source", "testbed", "--out", "{fx}/x.jsonl"],
     ["needs --n"]),
    ("make_distill_data", ["--model", "testbed/teacher", "--source", "testbed", "--n", "2", "--out", "{fx}/dir.jsonl"],
     ["--out", "dir.jsonl' is a directory"]),
]


@pytest.mark.parametrize("cmd,argv,words", CASES, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_bad_input_is_one_clear_line_and_exit_2(cmd, argv, words, fx, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("D2F_DEBUG", raising=False)
    if "tpu" in argv and torch.cuda.is_available():
        pass  # the device check does not depend on the machine for an unknown name
    argv = [a.replace("{fx}", str(fx)) for a in argv]
    rc = run_main(_cmd(cmd), argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    last = err.splitlines()[-1] if err else ""
    assert "Traceback" not in err and last.startswith("error: "), err
    for w in words:
        assert w in last, (w, last)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_on_a_cpu_machine_is_refused_before_loading(capsys):
    rc = run_main(_cmd("generate"), GEN + ["--device", "cuda"])
    assert rc == 2 and "no CUDA GPU" in capsys.readouterr().err


def test_debug_env_shows_the_traceback(monkeypatch):
    from d2f.errors import UserError
    monkeypatch.setenv("D2F_DEBUG", "1")
    with pytest.raises(UserError, match="temperature"):
        run_main(_cmd("generate"), GEN + ["--temperature", "inf"])


def test_a_bug_is_not_hidden():
    def broken(argv):
        raise KeyError("internal")
    with pytest.raises(KeyError):
        run_main(broken, [])


@pytest.mark.parametrize("source", ["{fx}/dir.jsonl", "{fx}/afile/answers.jsonl"])
def test_distill_checks_where_teacher_answers_go_before_writing_them(source, fx, capsys, monkeypatch):
    """data.teacher_answers decodes the teacher's answers (minutes at the shipped 800) before training: a
    data.source they cannot be written to is refused first, before any model loads."""
    import d2f.models
    import train.distill as distill

    def never(*args, **kwargs):
        raise AssertionError("work started before data.source was checked")
    monkeypatch.setattr(distill, "make_teacher_answers", never)
    monkeypatch.setattr(d2f.models, "load_model", never)
    monkeypatch.chdir(REPO)
    rc = run_main(distill.main, DISTILL + ["data.teacher_answers=2", f"data.source={source.format(fx=fx)}",
                                           f"output_dir={fx}/dist_ta2"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: data.source" in err, err
    assert ("is a directory" if "dir.jsonl" in source else "is a file, so no directory can be created") in err
