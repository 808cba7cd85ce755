"""The inference API: one config, one `generate`, four decoders.

    from infer.api import DecodeConfig, generate, load, format_prompt
    model, tok = load(None, "d2f")                          # the testbed D2F student
    cfg = DecodeConfig(mode="d2f", max_new_tokens=128, block_size=16)
    [res] = generate(model, tok, [format_prompt(tok, "What is 2 + 3?")], cfg)
    print(res.text, res.nfe, res.tokens_per_s)

Modes (docs/design.md §3): "vanilla" (LLaDA low-confidence remasking), "fast-dllm" (prefix / dual /
no cache x topk / threshold / factor), "d2f" (pipelined block decoding with an exact cache),
"ar" (KV-cached autoregressive decoding of causal models, ours or any HF causal LM).

Throughput = answer tokens up to and including the first EOS / wall time of the generate call
for that batch (prompt processing included); NFE and tokens per forward are reported beside it.
"""
from __future__ import annotations

import dataclasses
import numbers
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from d2f import device as _device
from infer import ar, d2f_decoder, fast_dllm, vanilla
from infer.batch import final_tokens, make_batch
from infer.decode_config import MODES, DecodeConfig, DecodeConfigError
from infer.eval import synchronize
from infer.steps import StepLog

DTYPES = _device.DTYPES  # the dtype names load accepts


@dataclass
class Result:
    text: str
    token_ids: list[int]  # answer up to and including the first EOS
    num_tokens: int
    nfe: int
    tokens_per_forward: float
    wall_time: float  # seconds, the whole generate call for this sample's batch
    tokens_per_s: float
    trace: list[dict] | None = None
    prompt_tokens: int = 0

    def stats(self) -> str:
        return (f"tokens={self.num_tokens} nfe={self.nfe} tokens/forward={self.tokens_per_forward:.2f} "
                f"wall={self.wall_time:.3f}s tokens/s={self.tokens_per_s:.1f}")


# ---- model / mode checks ---------------------------------------------------------------------

def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_model_mode(model, mode: str) -> None:
    from d2f.models.config import ModelConfig
    base = _base(model)
    ours = isinstance(getattr(base, "config", None), ModelConfig)  # our LLaDA / Dream classes
    causal = (not ours) or bool(base.config.is_causal)
    name = getattr(base, "name_or_path", "") or type(base).__name__
    if mode == "ar" and not causal:
        raise DecodeConfigError(f"mode 'ar' needs a causal model, but {name!r} is a diffusion LM "
                                "(config.is_causal is False); use mode 'vanilla', 'fast-dllm' or 'd2f'")
    if mode != "ar" and causal:
        kind = "an HF causal LM" if not ours else "a causal model (config.is_causal is True)"
        raise DecodeConfigError(f"mode {mode!r} needs a diffusion LM (LLaDA / Dream), but {name!r} is {kind}; "
                                "use mode 'ar'")


def special_ids(model, tokenizer) -> tuple[int | None, int | None, int]:
    """(mask_id, eos_id, pad_id) for a model (ours: its config; HF: generation config / tokenizer)."""
    cfg = _base(model).config
    mask_id = getattr(cfg, "mask_token_id", None)
    gen = getattr(_base(model), "generation_config", None)
    eos = getattr(cfg, "eos_token_id", None)
    if gen is not None and getattr(gen, "eos_token_id", None) is not None:
        eos = gen.eos_token_id
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    pad = getattr(cfg, "pad_token_id", None)
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    return mask_id, eos, pad if pad is not None else (eos if eos is not None else 0)


def _token_ids(i: int, p) -> list[int]:
    """A token-id prompt (a list / tuple / 1-D tensor / array of integers) as a list of ints; float or
    other non-integer ids are refused, never truncated."""
    if isinstance(p, torch.Tensor):
        if p.dim() != 1 or p.is_floating_point() or p.is_complex() or p.dtype == torch.bool:
            raise DecodeConfigError(f"prompt {i} is a {p.dim()}-D {p.dtype} tensor; token-id prompts must be 1-D "
                                    "integer tensors or lists of ints")
        return p.tolist()
    try:
        items = list(p)
    except TypeError:
        raise DecodeConfigError(f"prompt {i} is {p!r} ({type(p).__name__}); each prompt must be a string or a list "
                                "of token ids (ints)") from None
    ids = []
    for t in items:
        if isinstance(t, torch.Tensor) and t.dim() == 0 and not (t.is_floating_point() or t.is_complex()
                                                                  or t.dtype == torch.bool):
            t = t.item()
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise DecodeConfigError(f"prompt {i} has token id {t!r} ({type(t).__name__}); token ids must be "
                                    "integers (they are never rounded): convert whole-number floats with int(), or "
                                    "check where the ids come from")
        ids.append(int(t))
    return ids


def encode_prompts(tokenizer, prompts) -> list[list[int]]:
    if isinstance(prompts, str):
        raise DecodeConfigError("prompts is a single string; pass a list of prompts, e.g. [prompt]")
    try:
        prompts = list(prompts)
    except TypeError:
        raise DecodeConfigError(f"prompts is {prompts!r} ({type(prompts).__name__}); pass a list of strings or of "
                                "token-id lists") from None
    if not prompts:
        raise DecodeConfigError("prompts is an empty list: pass at least one prompt (a string or a list of token "
                                "ids)")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise DecodeConfigError("text prompts need a tokenizer; pass one or give prompts as lists of token ids")
            ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        else:
            ids = _token_ids(i, p)
        if not ids:
            raise DecodeConfigError(f"prompt {i} ({p!r}) is empty: diffusion and AR decoding both need at least one "
                             "prompt token")
        out.append(ids)
    return out


def as_decode_config(cfg) -> DecodeConfig:
    """cfg itself (validated) when it is a DecodeConfig; a dict / mapping of DecodeConfig fields (like a
    transformers GenerationConfig dict) becomes DecodeConfig(**cfg), with the same checks."""
    if isinstance(cfg, DecodeConfig):
        cfg.validate()  # it may have been changed since it was built
        return cfg
    if isinstance(cfg, Mapping):
        fields = [f.name for f in dataclasses.fields(DecodeConfig)]
        unknown = [k for k in cfg if k not in fields]
        if unknown:
            raise DecodeConfigError(f"decode config keys {unknown} are not DecodeConfig fields; the fields are "
                                    f"{fields}")
        return DecodeConfig(**cfg)
    raise DecodeConfigError(f"cfg is a {type(cfg).__name__}; pass infer.api.DecodeConfig(...) or a dict of its fields "
                            "(mode, max_new_tokens, block_size, ...)")


def check_vocabulary(model, tokenizer, ids: list[list[int]], mask_id: int | None, mode: str) -> None:
    """The prompts' token ids must be rows of the model's embedding, and a diffusion model's mask id the
    tokenizer's mask token (when the tokenizer has one): otherwise the tokenizer belongs to another model."""
    cfg = getattr(_base(model), "config", None)
    rows = getattr(cfg, "embedding_size", None) or getattr(cfg, "vocab_size", None)
    top = max(max(p) for p in ids)
    if rows is not None and (top >= rows or min(min(p) for p in ids) < 0):
        raise DecodeConfigError(f"the prompt has token id {top}, outside the model's vocabulary of {rows}: the "
                                "tokenizer does not belong to this model; pass the model's own with --tokenizer")
    tok_mask = getattr(tokenizer, "mask_token_id", None) if tokenizer is not None else None
    if mode != "ar" and tok_mask is not None and mask_id is not None and tok_mask != mask_id:
        raise DecodeConfigError(f"the model's mask_token_id is {mask_id} but its tokenizer's mask token "
                                f"{getattr(tokenizer, 'mask_token', None)!r} is id {tok_mask}: fix mask_token_id in "
                                "config.json, or pass the model's own tokenizer")


def max_positions(model) -> int | None:
    cfg = _base(model).config
    return getattr(cfg, "max_position_embeddings", None)


# ---- generate ----------------------------------------------------------------------------

DECODERS = {"vanilla": vanilla.decode, "fast-dllm": fast_dllm.decode, "d2f": d2f_decoder.decode, "ar": ar.decode}

# Every SDPA kernel but cuDNN's. cuDNN attention builds an execution plan for each new pair of query
# and key lengths, and decoding changes them at almost every step: on an H200 at LLaDA-8B shape an
# eager D2F forward took 125 ms with it and 28 ms without (infer.bench, batch 1; README).
DECODE_SDPA_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
                       SDPBackend.OVERRIDEABLE]


def _decoder_kwargs(cfg: DecodeConfig, eos_id) -> dict:
    if cfg.mode == "d2f":
        return {"use_cache": cfg.cache != "none"}
    if cfg.mode == "ar":
        return {"eos_id": eos_id}
    return {}


@torch.no_grad()
def generate(model, tokenizer, prompts, cfg: DecodeConfig | Mapping, *, batch_size: int | None = None,
             on_step: Callable | None = None, trace: bool = False, **decoder_kwargs) -> list[Result]:
    """Decode every prompt (a string, encoded without extra special tokens, or a list of integer token
    ids) with cfg (a DecodeConfig, or a dict of its fields); returns one Result per prompt, in order. An
    empty list of prompts is an error. `on_step(event)` is called after every forward with a dict
    (step, sample_ids, answer (B, G) tensor, committed, active).
    decoder_kwargs go to the mode's decoder (tests: refresh_every_step, use_cache)."""
    cfg = as_decode_config(cfg)
    check_model_mode(model, cfg.mode)
    ids = encode_prompts(tokenizer, prompts)
    mask_id, eos_id, pad_id = special_ids(model, tokenizer)
    check_vocabulary(model, tokenizer, ids, mask_id, cfg.mode)
    limit = max_positions(model)
    for i, p in enumerate(ids):
        if limit is not None and len(p) + cfg.max_new_tokens > limit:
            raise DecodeConfigError(f"prompt {i} has {len(p)} tokens; with max_new_tokens {cfg.max_new_tokens} that is "
                             f"{len(p) + cfg.max_new_tokens} positions, over the model's max_position_embeddings "
                             f"{limit}. Shorten the prompt or lower max_new_tokens.")
    if batch_size is not None and batch_size <= 0:
        raise DecodeConfigError(f"batch_size must be positive, got {batch_size}")
    bs = batch_size or len(ids)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    kwargs = {**_decoder_kwargs(cfg, eos_id), **decoder_kwargs}
    if getattr(model, "static_shapes", False) and cfg.mode != "vanilla":
        kwargs.setdefault("compact", False)  # the batch keeps its size: captured graphs hold its buffers
    results: list[Result] = []
    for s in range(0, len(ids), bs):
        chunk = ids[s:s + bs]
        t0 = time.perf_counter()
        fill = mask_id if cfg.mode != "ar" else pad_id
        batch = make_batch(chunk, cfg.max_new_tokens, fill, pad_id, device)
        # every mode commits at least one token per forward (vanilla: exactly its steps)
        cap = max(cfg.total_steps, cfg.max_new_tokens) + cfg.max_new_tokens // cfg.block_size + 1
        log = StepLog(len(chunk), trace, on_step, list(range(s, s + len(chunk))), max_forwards=cap)
        with sdpa_kernel(DECODE_SDPA_KERNELS):
            DECODERS[cfg.mode](model, batch, cfg, log, generator, **kwargs)
        answers = batch.answer().tolist()
        synchronize(device)
        wall = time.perf_counter() - t0
        nfes = log.nfe
        for i, row in enumerate(answers):
            toks = final_tokens(row, mask_id, eos_id, diffusion=cfg.mode != "ar")
            text = tokenizer.decode(toks, skip_special_tokens=True) if tokenizer is not None else ""
            nfe = nfes[i]
            results.append(Result(text=text, token_ids=toks, num_tokens=len(toks), nfe=nfe,
                                  tokens_per_forward=len(toks) / max(nfe, 1), wall_time=wall,
                                  tokens_per_s=len(toks) / wall if wall > 0 else 0.0,
                                  trace=log.records[i] if trace else None, prompt_tokens=len(chunk[i])))
    return results


# ---- loading -----------------------------------------------------------------------------

def parse_dtype(dtype) -> torch.dtype:
    """A name of DTYPES or a float torch dtype (d2f.device.parse_dtype); anything else is refused."""
    return _device.parse_dtype(dtype, DecodeConfigError)


def check_device(device) -> None:
    """Refuse a device this machine does not have before anything is loaded (d2f.device.check_device)."""
    _device.check_device(device, DecodeConfigError)


def check_hf_checkpoint(path: Path) -> None:
    """Before transformers loads a local checkpoint: its config must be one transformers knows, and its
    weights must be the ones that config builds (transformers would fill missing ones at random, or
    build a default-size model from a config.json written for another architecture)."""
    import transformers
    from d2f.models import CheckpointError
    from d2f.models.io import open_weights
    try:
        conf = transformers.AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"transformers cannot read {str(path / 'config.json')!r}: {str(e).splitlines()[0]}; "
                              "check its model_type") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return  # .bin checkpoints: transformers checks them itself
    found = {}
    for f in files:
        with open_weights(f, torch.device("cpu")) as fh:  # names the file when it is truncated or corrupt
            found.update({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(conf)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    tied = {k for k in expected if k.endswith("lm_head.weight")} if getattr(conf, "tie_word_embeddings", False) else set()
    missing = sorted(k for k in expected if k not in found and k not in tied)
    unexpected = sorted(k for k in found if k not in expected)
    wrong = sorted(k for k in found if k in expected and found[k] != expected[k])
    if missing or unexpected or wrong:
        first = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                 else f"{wrong[0]!r} has shape {found[wrong[0]]}, config.json says {expected[wrong[0]]}")
        raise CheckpointError(f"the weights in {str(path)!r} do not match its config.json (model_type "
                              f"{conf.model_type!r}): {first} ({len(missing)} missing, {len(unexpected)} unexpected, "
                              f"{len(wrong)} mis-shaped tensors); is config.json the one these weights were saved with?")


def merge_adapter(m, adapter: str, model_name: str):
    """Merge a PEFT LoRA adapter into m, after checking that it was trained on m."""
    from peft import PeftModel
    from safetensors import SafetensorError
    from d2f.models import CheckpointError
    from d2f.models.io import check_adapter_base, read_json
    if not (Path(adapter).expanduser() / "adapter_config.json").is_file() and Path(adapter).expanduser().is_dir():
        raise CheckpointError(f"adapter {adapter!r} has no adapter_config.json; pass a PEFT adapter directory")
    check_adapter_base(m, Path(adapter).expanduser(), model_name)
    if Path(adapter).expanduser().is_dir():
        read_json(Path(adapter).expanduser() / "adapter_config.json", "adapter config")
    try:
        return PeftModel.from_pretrained(m, adapter).merge_and_unload()
    except RuntimeError as e:  # size mismatch: an adapter for another architecture or size
        raise CheckpointError(f"adapter {adapter!r} does not fit model {model_name!r}: {str(e).splitlines()[0]} "
                              "(trained on another model?)") from None
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # unreadable or truncated files, offline hub
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load adapter {adapter!r} ({type(e).__name__}: {first}); the files are "
                              "incomplete or not a PEFT adapter") from None


def load(model: str | None = None, mode: str = "d2f", adapter: str | None = None, device="cpu",
         dtype="float32", tokenizer: str | None = None, cuda_graphs: bool = False, compile: bool = False):
    """(model, tokenizer) ready for `generate`. model None = the testbed model for the mode:
    the teacher for vanilla / fast-dllm, the student (teacher + D2F adapter, merged) for d2f,
    the AR baseline for ar. An adapter (PEFT LoRA dir) is merged into the model for speed.
    cuda_graphs: wrap the model in `infer.graphs.StaticForward` (each forward one CUDA-graph replay
    on a GPU; on a CPU the same static shapes run eagerly). Same tokens, fewer kernel launches.
    compile: `torch.compile` the forward (`infer.graphs.compiled`; inside the graphs with cuda_graphs). Same
    tokens; the first forwards of each new shape compile (about a minute on a laptop CPU)."""
    from d2f import testbed
    from d2f.models import load_model, refs

    if mode not in MODES:
        raise DecodeConfigError(f"mode {mode!r} is not one of {MODES}")
    dt = parse_dtype(dtype)
    check_device(device)
    for what, ref in (("model", model), ("tokenizer", tokenizer), ("adapter", adapter)):
        refs.check(what, ref, DecodeConfigError)
    tok_path = tokenizer
    if model is None:
        role = testbed.role_for_mode(mode)
        if role == "student":
            adapter = adapter or str(testbed.model_path("student"))
            model = str(testbed.model_path("teacher"))
        else:
            model = str(testbed.model_path(role))
        tok_path = tok_path or str(testbed.tokenizer_path())
    if refs.is_ours(model):
        m = load_model(model, dtype=dt, device=device)
    else:
        import transformers
        from packaging.version import Version
        if Path(model).expanduser().is_dir():
            check_hf_checkpoint(Path(model).expanduser())
        # transformers renamed torch_dtype to dtype in 4.56
        key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        try:
            m = transformers.AutoModelForCausalLM.from_pretrained(model, **{key: dt}).to(device)
        except OSError as e:  # not in the cache and the hub unreachable, or no such repo
            from d2f.models import CheckpointError
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(f"cannot load model {model!r} ({first}); pass a local checkpoint directory, or "
                                  "check the hub id and the network") from None
    if adapter is not None:
        m = merge_adapter(m, adapter, model)
    m.eval()
    check_model_mode(m, mode)  # before the tokenizer loads and anything is printed
    if cuda_graphs or compile:
        from d2f.models.base import DiffusionLM
        from infer.graphs import StaticForward, compiled
        if not isinstance(m, DiffusionLM):
            what = "cuda_graphs" if cuda_graphs else "compile"
            raise DecodeConfigError(f"{what} needs one of our model classes (LLaDA, Dream, their causal "
                                    f"variants); {model!r} loaded as {type(m).__name__}")
        if compile:
            m = compiled(m)
        if cuda_graphs:
            m = StaticForward(m)
    if tok_path is None:  # the checkpoint's own tokenizer, if it has one
        tok_path = refs.own_tokenizer(model)
    from d2f.models import CheckpointError
    tok = None if tok_path is None else refs.load_tokenizer(
        tok_path, CheckpointError, fix="pass --tokenizer with a directory holding tokenizer.json (or a hub id "
                                       "reachable here)")
    return m, tok


def format_prompt(tokenizer, text: str, chat: bool = True) -> str:
    """The user's text wrapped in the tokenizer's chat template (when it has one and chat=True)."""
    from d2f.data.tokenizer import chat_text
    return chat_text(tokenizer, text, chat)

