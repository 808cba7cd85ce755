"""infer.api: input validation with clear errors, load() with presets / checkpoints / adapters."""
import pytest
import torch

from helpers import random_model
from infer.api import DecodeConfig, DecodeConfigError, format_prompt, generate, load


@pytest.mark.parametrize("kw,needle", [
    (dict(threshold=1.5), "threshold must be in [0, 1], got 1.5"),
    (dict(tau_conf=-0.1), "tau_conf must be in [0, 1], got -0.1"),
    (dict(tau_add=2), "tau_add must be in [0, 1], got 2"),
    (dict(tau_act=1.01), "tau_act must be in [0, 1], got 1.01"),
    (dict(mode="vanilla", max_new_tokens=20, block_size=8), "max_new_tokens 20 is not a multiple of block_size 8"),
    (dict(mode="vanilla", max_new_tokens=32, block_size=8, steps=6), "steps 6 is not a multiple of the number of blocks 4"),
    (dict(mode="nope"), "mode 'nope'"),
    (dict(cache="full"), "cache 'full'"),
    (dict(rule="greedy"), "rule 'greedy'"),
    (dict(factor=0), "factor must be > 0, got 0"),
    (dict(temperature=-1.0), "temperature must be >= 0, got -1.0"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer, got 0"),
])
def test_bad_config(kw, needle):
    with pytest.raises(DecodeConfigError) as e:
        DecodeConfig(**kw)
    assert needle in str(e.value)


def test_bad_inputs_name_the_value():
    model = random_model("tiny-llada")  # max_position_embeddings 512
    cfg = DecodeConfig(mode="d2f", max_new_tokens=32, block_size=8)
    with pytest.raises(ValueError, match=r"prompt 1 .* is empty"):
        generate(model, None, [[3, 4], []], cfg)
    with pytest.raises(ValueError, match=r"prompt 0 has 500 tokens; with max_new_tokens 32 .* 532 .* 512"):
        generate(model, None, [[3] * 500], cfg)
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(model, None, ["hello"], cfg)
    with pytest.raises(DecodeConfigError, match="mode 'ar' needs a causal model"):
        generate(model, None, [[3]], DecodeConfig(mode="ar"))
    causal = random_model("tiny-ar")
    for mode in ("vanilla", "fast-dllm", "d2f"):
        with pytest.raises(DecodeConfigError, match=f"mode '{mode}' needs a diffusion LM"):
            generate(causal, None, [[3]], DecodeConfig(mode=mode, max_new_tokens=32, block_size=8))


@pytest.mark.parametrize("kw", [dict(temperature=float("inf")), dict(temperature=float("nan")),
                                dict(factor=float("inf")), dict(tau_act=float("nan")), dict(seed=1.5),
                                dict(block_size=True)])
def test_non_finite_and_mistyped_values_are_refused(kw):
    with pytest.raises(DecodeConfigError, match=next(iter(kw))):
        DecodeConfig(**kw)


@pytest.mark.parametrize("mode", ["d2f", "fast-dllm", "vanilla"])
def test_a_model_that_never_commits_stops_with_an_error(mode, monkeypatch):
    """Every decode loop is capped: a model whose predictions commit nothing (here every prediction is the
    mask token, what inf temperature used to produce) ends with DecodeStalled, not a hang."""
    import infer.d2f_decoder
    import infer.fast_dllm
    import infer.sampling
    import infer.vanilla
    from infer.steps import DecodeStalled
    model = random_model("tiny-llada")
    calls = []

    def mask_everywhere(logits, temperature=0.0, generator=None, exclude=None):
        calls.append(1)
        tokens = torch.full(logits.shape[:-1], model.config.mask_token_id, dtype=torch.long)
        return tokens, torch.ones(logits.shape[:-1], dtype=torch.float64)
    for mod in (infer.d2f_decoder, infer.fast_dllm, infer.vanilla, infer.sampling):
        if hasattr(mod, "predict"):
            monkeypatch.setattr(mod, "predict", mask_everywhere)
    cfg = DecodeConfig(mode=mode, max_new_tokens=16, block_size=8)
    if mode == "vanilla":  # a fixed number of steps: it ends, with the masks cut from the answer
        [res] = generate(model, None, [[3, 4, 5]], cfg)
        assert res.nfe == 16 and res.token_ids == []
        return
    with pytest.raises(DecodeStalled, match="no progress"):
        generate(model, None, [[3, 4, 5]], cfg)
    assert len(calls) == 16 + 2 + 1 + 1  # the cap, max(steps, gen) + blocks + 1 forwards, and the one past it


def test_load_checkpoint_with_merged_lora_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model
    base = random_model("tiny-llada", seed=31)
    base.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(random_model("tiny-llada", seed=31),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "attn_out"],
                                           init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    model, tok = load(str(tmp_path / "base"), "d2f", adapter=str(tmp_path / "adapter"), dtype="float64")
    assert tok is None  # the checkpoint has no tokenizer files
    assert not any("lora" in n for n, _ in model.named_parameters())  # merged
    x = torch.tensor([[5, 6, 7, 127, 127]])
    with torch.no_grad():
        assert torch.allclose(model(x), peft_model(x), atol=1e-9)
        assert not torch.allclose(model(x), base(x), atol=1e-3)
    cfg = DecodeConfig(mode="d2f", max_new_tokens=8, block_size=4, tau_conf=0.5)
    assert generate(model, None, [[5, 6, 7]], cfg)[0].token_ids == generate(peft_model, None, [[5, 6, 7]], cfg)[0].token_ids


def test_load_preset_and_errors():
    model, tok = load("tiny-dream", "fast-dllm", dtype="bf16")
    assert model.dtype == torch.bfloat16 and model.config.arch == "dream"
    with pytest.raises(ValueError, match="dtype 'int3'"):
        load("tiny-dream", "fast-dllm", dtype="int3")
    with pytest.raises(DecodeConfigError, match="mode 'foo'"):
        load("tiny-dream", "foo")


def test_load_refuses_a_dtype_that_cannot_hold_weights():
    with pytest.raises(DecodeConfigError, match="dtype torch.int8 cannot hold model weights"):
        load("tiny-dream", "fast-dllm", dtype=torch.int8)
    model, _ = load("tiny-dream", "fast-dllm", dtype=torch.float64)
    assert model.dtype == torch.float64


@pytest.mark.parametrize("loader", ["from_pretrained", "load_model"])
def test_from_pretrained_and_load_model_check_dtype_device_and_name(loader):
    """d2f.models.from_pretrained / load_model take dtype names and torch dtypes as infer.api.load does, and
    refuse what load refuses, with UserErrors (not torch tracebacks)."""
    import d2f.models
    from d2f.errors import UserError
    fn = getattr(d2f.models, loader)
    teacher = "testbed/teacher" if loader == "from_pretrained" else "tiny-llada"
    assert fn(teacher, dtype="float32").dtype == torch.float32
    assert fn(teacher, dtype="bf16").dtype == torch.bfloat16
    assert fn(teacher, dtype=torch.float16).dtype == torch.float16
    with pytest.raises(UserError, match=r"dtype torch.int64 cannot hold model weights; use one of torch.float32"):
        fn(teacher, dtype=torch.int64)
    with pytest.raises(UserError, match=r"dtype 'int8' is not one of \['bf16'"):
        fn(teacher, dtype="int8")
    with pytest.raises(UserError, match=r"name_or_path None is not a model: pass a checkpoint directory"):
        fn(None)
    with pytest.raises(UserError, match="device 'tpu' is not a device name"):
        fn(teacher, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"device 'cuda': this machine has no CUDA GPU .* use device='cpu'"):
            fn(teacher, device="cuda")


def test_generate_prompt_list_checks():
    model = random_model("tiny-llada")
    cfg = DecodeConfig(mode="d2f", max_new_tokens=8, block_size=4)
    with pytest.raises(DecodeConfigError, match="prompts is an empty list: pass at least one prompt"):
        generate(model, None, [], cfg)
    with pytest.raises(DecodeConfigError, match=r"prompt 0 has token id 2.5 \(float\); token ids must be integers"):
        generate(model, None, [[3, 2.5]], cfg)
    with pytest.raises(DecodeConfigError, match=r"prompt 1 has token id 4.0 \(float\)"):  # whole floats too
        generate(model, None, [[3], [4.0]], cfg)
    with pytest.raises(DecodeConfigError, match="prompt 0 is a 1-D torch.float32 tensor"):
        generate(model, None, [torch.tensor([3.0, 4.0])], cfg)
    with pytest.raises(DecodeConfigError, match=r"prompt 0 is 5 \(int\); each prompt must be a string or a list"):
        generate(model, None, [5], cfg)
    with pytest.raises(DecodeConfigError, match="prompts is a single string; pass a list of prompts"):
        generate(model, None, "hello", cfg)
    # integer tensors and numpy ints are token ids like ints
    import numpy as np
    want = generate(model, None, [[3, 4]], cfg)[0].token_ids
    assert generate(model, None, [torch.tensor([3, 4])], cfg)[0].token_ids == want
    assert generate(model, None, [np.array([3, 4])], cfg)[0].token_ids == want


def test_generate_takes_a_dict_of_decode_config_fields():
    model = random_model("tiny-llada")
    want = generate(model, None, [[3, 4]], DecodeConfig(mode="d2f", max_new_tokens=8, block_size=4))[0].token_ids
    assert generate(model, None, [[3, 4]], {"mode": "d2f", "max_new_tokens": 8, "block_size": 4})[0].token_ids == want
    with pytest.raises(DecodeConfigError, match="max_new_tokens must be a positive integer, got 0"):
        generate(model, None, [[3, 4]], {"mode": "d2f", "max_new_tokens": 0})
    with pytest.raises(DecodeConfigError, match=r"decode config keys \['max_new_tokns'\] are not DecodeConfig fields"):
        generate(model, None, [[3, 4]], {"max_new_tokns": 8})
    with pytest.raises(DecodeConfigError, match=r"cfg is a str; pass infer.api.DecodeConfig\(...\) or a dict"):
        generate(model, None, [[3, 4]], "d2f")


def test_format_prompt():
    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return "<u>" + messages[0]["content"] + "</u><a>"
    assert format_prompt(Tok(), "hi") == "<u>hi</u><a>"
    assert format_prompt(Tok(), "hi", chat=False) == "hi"


def test_load_hf_causal_checkpoint(tmp_path):
    from test_ar import PROMPTS, hf_model
    from test_cli import make_tokenizer
    hf = hf_model("qwen2")
    hf.save_pretrained(tmp_path / "qwen")
    make_tokenizer(tmp_path / "qwen")
    model, tok = load(str(tmp_path / "qwen"), "ar", dtype="float64")
    assert type(model).__name__ == "Qwen2ForCausalLM" and tok is not None
    cfg = DecodeConfig(mode="ar", max_new_tokens=6)
    assert generate(model, tok, PROMPTS, cfg)[0].token_ids == generate(hf, None, PROMPTS, cfg)[0].token_ids
    with pytest.raises(DecodeConfigError, match="mode 'd2f' needs a diffusion LM .* HF causal LM"):
        generate(model, tok, PROMPTS, DecodeConfig(mode="d2f", max_new_tokens=8, block_size=4))
