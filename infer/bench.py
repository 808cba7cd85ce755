"""Decoding speed at the scale users run: every mode at LLaDA-8B / Dream-7B shapes, no download.

    python -m infer.bench                                     # GPU: llada-8b and dream-7b shapes, bf16
    python -m infer.bench --shapes tiny-llada,tiny-dream      # any machine, seconds (CI runs this)
    python -m infer.bench --record                            # re-record the replayed schedules

Random weights decode nothing worth timing: their confidences are flat, so D2F and Fast-dLLM would
commit one token per forward. Instead each run *replays* a commit schedule recorded from the testbed
models (`infer/bench_traces.json`, written by `--record` from `generate(..., trace=True)`): which
answer positions each forward committed, and with which token. `Replay` wraps the random-weight model;
its forward costs exactly what the real one costs (the same layers, cache, attention backend and
output head), and then it rewrites the logits so that the unchanged decoder, with its own commit rule,
commits what the recorded run committed at that step. Tokens per forward, window sizes, NFE and answer
length are therefore those of real decoding, at 8B cost; the run checks that every replayed answer and
NFE equals the trace (`replay_ok`).

Per shape, mode and batch size it reports tokens/s (answer tokens up to the first EOS / wall time of
the whole generate call, device synchronised), the time per forward, and that time as a multiple of
the weight-read floor (weight bytes / measured device copy bandwidth: no decode step can be faster
than reading the weights once). The D2F rows are repeated per attention backend (sdpa, flex, triton)
inside the decode loop. The AR row runs our KV-cached AR decoder; `hf-generate` runs transformers'
own `generate` (Llama / Qwen2 classes) on the same weights for the same number of tokens, so our AR
baseline is measured against the reference implementation, not a straw man.

Writes `results.json` and `results.md` to --output-dir (default outputs/bench).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from d2f.errors import UserError
from infer.decode_config import TESTBED
from infer.eval import synchronize

TRACES = Path(__file__).with_name("bench_traces.json")

# The replayed rows: name -> DecodeConfig fields. The recording used the testbed's settings
# (configs/compare_testbed.yaml), and replay must use the same ones so the decoder's commit rule
# picks exactly the recorded positions.
MODES = {
    "vanilla": dict(TESTBED["vanilla"]),
    "fast-dllm-prefix": dict(mode="fast-dllm", max_new_tokens=128, block_size=32, cache="prefix",
                             rule="threshold", threshold=0.9),
    "fast-dllm-dual": dict(mode="fast-dllm", max_new_tokens=128, block_size=32, cache="dual",
                           rule="threshold", threshold=0.9),
    "fast-dllm-dual-0.99": dict(mode="fast-dllm", max_new_tokens=128, block_size=32, cache="dual",
                                rule="threshold", threshold=0.99),
    "d2f": dict(TESTBED["d2f"]),
    "ar": dict(TESTBED["ar"]),
}
SHAPES = ("llada-8b", "dream-7b", "tiny-llada", "tiny-dream")
BACKENDS = ("sdpa", "triton", "flex")
MARGIN = 30.0  # logit of a replayed commit over every other token: confidence 1 - V e^-30 > 0.9999


# ---- recording ----------------------------------------------------------------------------

def trace_to_schedule(records: list[dict], gen_len: int) -> tuple[list[int], list[int]]:
    """A sample's trace -> (order, tokens): order[j] = the forward (0-based) that committed answer
    position j, -1 if none did; tokens[j] = the token committed there, -1 if none."""
    order, tokens = [-1] * gen_len, [-1] * gen_len
    for step, rec in enumerate(records):
        for j, t in zip(rec["committed"], rec["tokens"]):
            order[j], tokens[j] = step, t
    return order, tokens


def record(out: Path, n_problems: int, modes=tuple(MODES)) -> dict:
    """Decode the first n held-out testbed problems with each mode's testbed model, keep the schedules."""
    from d2f.data.gsm8k import load_gsm8k
    from d2f.data.tokenizer import prompt_ids
    from infer.api import DecodeConfig, generate, load, special_ids

    problems = load_gsm8k("testbed", split="test", limit=n_problems)
    data = {"source": "testbed models (d2f.testbed), first held-out test problems, batch 1, temperature 0",
            "modes": {}}
    for name in modes:
        cfg = DecodeConfig(**MODES[name])
        model, tok = load(None, cfg.mode)
        mask_id, eos_id, pad_id = special_ids(model, tok)
        data.update(mask_id=mask_id, eos_id=eos_id, pad_id=pad_id)
        samples = []
        for p in problems:
            [res] = generate(model, tok, [prompt_ids(tok, p["question"])], cfg, trace=True)
            order, tokens = trace_to_schedule(res.trace, cfg.max_new_tokens)
            samples.append({"nfe": res.nfe, "num_tokens": res.num_tokens, "order": order, "tokens": tokens})
        data["modes"][name] = {"config": MODES[name], "samples": samples}
        print(f"recorded {name}: NFE {[s['nfe'] for s in samples]}", file=sys.stderr)
    out.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    return data


# ---- replay -------------------------------------------------------------------------------

def free_ids(cfg) -> list[int]:
    """Token ids of the benchmarked model that are none of its special tokens (the first 4096)."""
    special = {cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id}
    return [i for i in range(min(cfg.vocab_size, 4096)) if i not in special]


def map_tokens(tokens: list[int], trace: dict, cfg) -> list[int]:
    """Testbed token ids -> ids of the benchmarked model: EOS to its EOS, everything else onto
    `free_ids` (-1, never committed, stays -1)."""
    free = free_ids(cfg)
    return [-1 if t < 0 else cfg.eos_token_id if t == trace["eos_id"] else free[t % len(free)] for t in tokens]


class Replay(nn.Module):
    """A model that costs what `model` costs and whose logits make a decoder commit a recorded schedule.

    Each sample of a run gets its own prompt length (`prompt_lens`, all distinct): a row of any forward
    is recognised by it (the position id its first answer slot has), also after a decoder dropped
    finished rows. The step a row is at is the number of answer positions it has committed, which the
    input shows: every position before the forwarded range is committed (finished blocks), every
    committed one inside it is not a mask. Everything is computed on the device, without a host sync.
    """

    def __init__(self, model, orders: list[list[int]], tokens: list[list[int]], prompt_lens: list[int],
                 causal: bool = False):
        super().__init__()
        if len(set(prompt_lens)) != len(prompt_lens):
            raise ValueError(f"replay needs a distinct prompt length per sample, got {prompt_lens}")
        self.model, self.config, self.causal = model, model.config, causal
        dev = next(model.parameters()).device
        self.order = torch.tensor(orders, device=dev)  # (N, G) forward that commits each position, -1 never
        self.tokens = torch.tensor(tokens, device=dev).clamp_min(0)  # (N, G)
        steps = int(self.order.max()) + 1
        counts = torch.stack([(self.order == s).sum(-1) for s in range(steps)], -1)  # (N, steps)
        self.cum = torch.cat([torch.zeros_like(counts[:, :1]), counts.cumsum(-1)], -1)  # (N, steps + 1)
        self.lookup = torch.full((max(prompt_lens) + 1,), -1, dtype=torch.long, device=dev)
        self.lookup[torch.tensor(prompt_lens, device=dev)] = torch.arange(len(prompt_lens), device=dev)
        self.prompt_len = max(prompt_lens)  # P of a batch holding these samples (set by `batch_of`)
        self.forwards = 0
        if hasattr(model, "make_cache"):  # infer.graphs.StaticForward: its cache, its batch rules
            self.make_cache, self.static_shapes = model.make_cache, model.static_shapes

    def batch_of(self, prompt_lens: list[int]) -> None:
        """Before each generate call: the batch's P (its longest prompt) places every answer."""
        self.prompt_len = max(prompt_lens)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None, mask=None, cache=None,
                offset: int = 0) -> Tensor:
        logits = self.model(input_ids, position_ids=position_ids, mask=mask, cache=cache, offset=offset)
        self.forwards += 1
        B, T = input_ids.shape
        P, G = self.prompt_len, self.order.shape[1]
        # the last column is never padding (prompts are left-padded): its position id places the row
        sample = self.lookup[position_ids[:, -1] + (P - (offset + T - 1))]  # (B,) real prompt length -> sample
        logits.zero_()
        if self.causal:  # the last row predicts buffer index offset + T
            a = offset + T - P
            if 0 <= a < G:
                logits[:, -1].scatter_(-1, self.tokens[sample, a][:, None], MARGIN)
            return logits
        shift = self.config.logits_shift
        a0 = max(offset, P)
        done = (a0 - P) + (input_ids[:, a0 - offset:] != self.config.mask_token_id).sum(-1)  # (B,)
        step = (self.cum[sample] <= done[:, None]).sum(-1) - 1  # (B,) forwards this sample has had
        j0 = max(P, offset + shift)  # first answer index this call predicts
        if j0 >= offset + T:
            return logits
        order = self.order[sample, j0 - P:offset + T - P]  # (B, n)
        val = torch.where(order == step[:, None], MARGIN, 0.0).to(logits.dtype)
        rows = logits[:, j0 - shift - offset:offset + T - shift - offset]  # (B, n, V) view
        rows.scatter_(-1, self.tokens[sample, j0 - P:offset + T - P][..., None], val[..., None])
        return logits


# ---- the decoder's host-side work per step ----------------------------------------------------

class HostWork(TorchDispatchMode):
    """Counts what a decoder does around the model's forwards: the kernels its bookkeeping launches (every
    aten op that is not a view or a Python number wrapped as a tensor) and its host synchronisations (a
    device tensor read on the host: `.tolist()`, `.item()`, `bool()`, `int()`, `nonzero`, boolean-mask
    indexing; and a tensor made from Python data, `torch.tensor(...)`, which a GPU run copies to the device
    with a blocking copy). On a GPU each launch costs the host 5-40 us whatever the kernel's size (the H200
    machine of docs/bench.md was launch-bound), and each sync waits for every kernel queued before it, so
    both count against a step that CUDA graphs have made one replay. The model's forward, and whatever
    wraps it (`Replay`, `StaticForward`), is left out, and so is the setup before the first forward (the
    batch layout: made on the host, copied once). The ops are the same on a CPU, so the counts are those a
    GPU run makes.

        with HostWork(model) as work:
            generate(model, tok, prompts, cfg)
        work.launches / work.forwards, work.syncs / work.forwards
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self._depth, self._hooks = model, 0, []
        self.forwards = self.launches = self.syncs = 0  # from the first forward on
        self.setup_launches = self.setup_syncs = 0  # before it

    def __enter__(self):
        def enter(*_):
            self._depth += 1

        def leave(*_):
            self._depth -= 1
            self.forwards += self._depth == 0
        self._hooks = [self.model.register_forward_pre_hook(enter), self.model.register_forward_hook(leave)]
        self._tolist = Tensor.tolist
        work = self

        def tolist(t):  # not an aten op: it reads the storage directly
            work._count(sync=True)
            return work._tolist(t)
        Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        Tensor.tolist = self._tolist
        for h in self._hooks:
            h.remove()
        return super().__exit__(*exc)

    def _count(self, launch: bool = False, sync: bool = False) -> None:
        if self._depth:
            return
        if self.forwards:
            self.launches, self.syncs = self.launches + launch, self.syncs + sync
        else:
            self.setup_launches, self.setup_syncs = self.setup_launches + launch, self.setup_syncs + sync

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        sync = func in _SYNCS or (func is torch.ops.aten.index.Tensor
                                  and any(i is not None and i.dtype == torch.bool for i in args[1]))
        self._count(not func.is_view and func not in _NOT_LAUNCHES, sync)
        return func(*args, **(kwargs or {}))


# lift_fresh: a tensor made from Python data, which a GPU run then copies to the device, blocking the host
_SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default, torch.ops.aten.lift_fresh.default}
_NOT_LAUNCHES = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.scalar_tensor.default}


# ---- models with random weights -------------------------------------------------------------

def random_model(shape: str, device, dtype, causal: bool = False, seed: int = 0):
    """Our model class at a preset's shape with N(0, 0.02) weights made on the device (no 32 GB fp32
    copy on the host for 8B)."""
    from d2f.models import preset_config
    from d2f.models.io import model_class
    cfg = preset_config(shape).replace(is_causal=causal)
    with torch.device("meta"):
        model = model_class(cfg)(cfg).to(dtype)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        model.init_weights(generator=g)
    return model.eval()


def share_weights(src, causal: bool):
    """The same tensors under a model whose config differs only in is_causal (the same-shape AR
    model of a dLLM shape costs no second copy of the weights)."""
    from d2f.models.io import model_class
    cfg = src.config.replace(is_causal=causal)
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    model.load_state_dict(src.state_dict(), assign=True)
    model.tie_weights()
    return model.eval()


HF_NAMES = {  # our LLaDA names -> transformers' Llama names (Dream already uses Qwen2's)
    "model.transformer.wte.": "model.embed_tokens.", "model.transformer.ln_f.": "model.norm.",
    "model.transformer.ff_out.": "lm_head.", "model.transformer.blocks.": "model.layers.",
    ".attn_norm.": ".input_layernorm.", ".ff_norm.": ".post_attention_layernorm.",
    ".q_proj.": ".self_attn.q_proj.", ".k_proj.": ".self_attn.k_proj.", ".v_proj.": ".self_attn.v_proj.",
    ".attn_out.": ".self_attn.o_proj.", ".ff_proj.": ".mlp.gate_proj.", ".up_proj.": ".mlp.up_proj.",
    ".ff_out.": ".mlp.down_proj.",
}


def hf_causal_lm(model):
    """transformers' Llama (LLaDA shape) or Qwen2 (Dream shape) sharing `model`'s weight tensors."""
    import transformers
    c = model.config
    common = dict(vocab_size=c.embedding_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                  num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                  num_key_value_heads=c.num_kv_heads, rms_norm_eps=c.rms_norm_eps,
                  max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
                  eos_token_id=None, pad_token_id=c.pad_token_id, bos_token_id=None)
    rope = {"rope_theta": c.rope_theta}
    if c.arch == "llada":
        hf_cfg = transformers.LlamaConfig(attention_bias=c.qkv_bias, head_dim=c.head_dim, **common, **rope)
        cls = transformers.LlamaForCausalLM
    else:
        hf_cfg = transformers.Qwen2Config(**common, **rope)
        cls = transformers.Qwen2ForCausalLM
    if getattr(hf_cfg, "rope_parameters", None) is not None:  # transformers >= 5 keeps theta here
        hf_cfg.rope_parameters["rope_theta"] = c.rope_theta
    p = next(model.parameters())
    default = torch.get_default_dtype()
    torch.set_default_dtype(p.dtype)  # build in the model's dtype: no fp32 copy of 8B weights
    try:
        with torch.device(p.device):
            hf = cls(hf_cfg)  # its rotary buffers are made here; the weights are replaced below
    finally:
        torch.set_default_dtype(default)
    state = {}
    for k, v in model.state_dict().items():
        if c.arch == "llada":
            for a, b in HF_NAMES.items():
                k = k.replace(a, b)
        state[k] = v
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"weight names do not map onto {cls.__name__}: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}")
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = c.pad_token_id
    return hf.eval()


# ---- timing ---------------------------------------------------------------------------------

def copy_gbps(device, nbytes: int) -> float:
    """Device copy bandwidth (bytes read + written per second / 1e9), median of 5."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    return 2 * nbytes / times[len(times) // 2] / 1e9


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def prompt_tokens(cfg, n: int, seed: int) -> list[int]:
    """n random non-special token ids (the prompt's content does not change the cost)."""
    free = free_ids(cfg)
    g = torch.Generator().manual_seed(seed)
    return [free[i] for i in torch.randint(0, len(free), (n,), generator=g).tolist()]


def run_mode(model, trace: dict, name: str, batch: int, n_samples: int, base_prompt: int, backend: str | None,
             warmup: bool = True, compile: bool = False) -> dict:
    """Replay `name`'s recorded schedules at `batch`; returns one row of the table. backend: an
    attention backend name, or "static" (SDPA under `infer.graphs.StaticForward`: CUDA graphs on a GPU).
    compile: the forward under `infer.graphs.compiled` (compiled in the untimed warm-up pass)."""
    from infer.api import DecodeConfig, generate
    from infer.batch import cut_at_eos
    from infer.graphs import StaticForward, compiled
    from d2f_kernels import set_backend

    rec = trace["modes"][name]
    cfg = DecodeConfig(**rec["config"])
    samples = rec["samples"][:n_samples]
    causal = cfg.mode == "ar"
    orders = [s["order"] for s in samples]
    tokens = [map_tokens(s["tokens"], trace, model.config) for s in samples]
    lens = [base_prompt + i for i in range(len(samples))]
    prompts = [prompt_tokens(model.config, n, seed=i) for i, n in enumerate(lens)]
    static = backend == "static"
    if backend is not None:
        set_backend(model, "sdpa" if static else backend)
    inner = compiled(model) if compile else model
    replay = Replay(StaticForward(inner) if static else inner, orders, tokens, lens, causal=causal)
    if warmup:  # compile / autotune / graph capture / allocator warm-up on the first batch, untimed
        replay.batch_of(lens[:batch])
        generate(replay, None, prompts[:batch], cfg)
    results, wall, forwards = [], 0.0, 0
    for s in range(0, len(prompts), batch):
        replay.batch_of(lens[s:s + batch])
        replay.forwards = 0
        res = generate(replay, None, prompts[s:s + batch], cfg)
        results += res
        wall += res[0].wall_time
        forwards += replay.forwards
    # One more pass over the first batch, untimed (counting slows the host): the decoder's own work per forward.
    replay.batch_of(lens[:batch])
    with HostWork(replay) as work:
        generate(replay, None, prompts[:batch], cfg)
    counted = max(work.forwards, 1)
    if backend is not None:
        set_backend(model, "sdpa")
    want = [cut_at_eos([t for t in tk if t >= 0], model.config.eos_token_id) for tk in tokens]
    ok = all(r.token_ids == w and r.nfe == s["nfe"] for r, w, s in zip(results, want, samples))
    n_tok = sum(r.num_tokens for r in results)
    label = ("sdpa+graphs" if replay.model.graphs else "sdpa+static") if static else backend or "sdpa"
    label += "+compile" if compile else ""
    return {"mode": name, "backend": label, "batch": batch, "samples": len(samples),
            "tokens_per_s": n_tok / wall, "step_ms": 1e3 * wall / max(forwards, 1), "forwards": forwards,
            "nfe": sum(r.nfe for r in results) / len(results), "answer_len": n_tok / len(results),
            "tokens_per_forward": n_tok / max(sum(r.nfe for r in results), 1), "wall_s": wall,
            "replay_ok": ok, "launches_per_forward": work.launches / counted,
            "syncs_per_forward": work.syncs / counted}


def run_hf_generate(model, trace: dict, batch: int, n_samples: int, base_prompt: int) -> dict:
    """transformers' generate on the same weights, for the AR rows' answer lengths (no EOS: exactly
    that many tokens), against our AR decoder on the same prompts and lengths."""
    from infer.batch import make_batch

    samples = trace["modes"]["ar"]["samples"][:n_samples]
    hf = hf_causal_lm(model)
    dev = next(model.parameters()).device
    n_new = round(sum(s["num_tokens"] for s in samples) / len(samples))
    wall, n_tok = 0.0, 0
    for s in range(0, len(samples), batch):
        lens = [base_prompt + i for i in range(s, min(s + batch, len(samples)))]
        P = max(lens)
        pad = model.config.pad_token_id
        b = make_batch([prompt_tokens(model.config, n, seed=s + i) for i, n in enumerate(lens)], 0, pad, pad, dev)
        ids = b.x  # left-padded, as our decoders' batches
        attn = b.key_valid.long() if b.key_valid is not None else torch.ones_like(ids)
        kw = dict(attention_mask=attn, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        if s == 0:
            hf.generate(ids[:1], attention_mask=attn[:1], max_new_tokens=4, do_sample=False)  # warm-up
        synchronize(dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(ids, **kw)
        synchronize(dev)
        wall += time.perf_counter() - t0
        n_tok += (out.shape[1] - P) * len(lens)
    del hf
    return {"mode": "hf-generate", "backend": "transformers", "batch": batch, "samples": len(samples),
            "tokens_per_s": n_tok / wall, "step_ms": 1e3 * wall / (n_new * -(-len(samples) // batch)),
            "forwards": n_new * -(-len(samples) // batch), "nfe": n_new, "answer_len": n_tok / len(samples),
            "tokens_per_forward": 1.0, "wall_s": wall, "replay_ok": None}


# ---- report ---------------------------------------------------------------------------------

def markdown(rows: list[dict]) -> str:
    head = ["shape", "mode", "attention", "batch", "tokens/s", "ms / forward", "x floor", "NFE",
            "tokens/forward", "answer length", "host launches / forward", "syncs / forward", "replay"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['mode']} | {r['backend']} | {r['batch']} | failed: "
                         f"{r['error'][:80]} |" + " |" * (len(head) - 5))
            continue
        ok = {True: "exact", False: "MISMATCH", None: "-"}[r["replay_ok"]]
        lines.append(f"| {r['shape']} | {r['mode']} | {r['backend']} | {r['batch']} | {r['tokens_per_s']:.1f} | "
                     f"{r['step_ms']:.2f} | {r['x_floor']:.2f} | {r['nfe']:.1f} | {r['tokens_per_forward']:.2f} | "
                     f"{r['answer_len']:.1f} | {_count(r, 'launches_per_forward')} | "
                     f"{_count(r, 'syncs_per_forward')} | {ok} |")
    return "\n".join(lines)


def _count(row: dict, key: str) -> str:
    return f"{row[key]:.1f}" if key in row else "-"  # hf-generate: not our decoder


def ratios(rows: list[dict]) -> list[str]:
    """The comparisons the D2F paper makes, from this run's rows: each mode at its fastest
    attention path (so a mode with CUDA graphs is compared with the others' graphed rows)."""
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for b in dict.fromkeys(r["batch"] for r in rows):
            best: dict[str, dict] = {}
            for r in rows:
                if r["shape"] == shape and r["batch"] == b and "error" not in r:
                    if r["mode"] not in best or r["tokens_per_s"] > best[r["mode"]]["tokens_per_s"]:
                        best[r["mode"]] = r
            if "d2f" not in best:
                continue
            d2f = best["d2f"]
            parts = [f"{d2f['tokens_per_s'] / best[m]['tokens_per_s']:.2f}x {m} ({best[m]['backend']})"
                     for m in ("vanilla", "fast-dllm-dual", "fast-dllm-dual-0.99", "ar") if m in best]
            if "ar" in best and "hf-generate" in best:
                parts.append(f"our AR ({best['ar']['backend']}) "
                             f"{best['ar']['tokens_per_s'] / best['hf-generate']['tokens_per_s']:.2f}x transformers generate")
            out.append(f"- {shape}, batch {b}: D2F ({d2f['backend']}, {d2f['x_floor']:.1f}x the weight-read floor "
                       "per forward) " + ", ".join(parts))
    return out


def parse_list(text: str, allowed, what: str) -> list[str]:
    items = [x for x in text.split(",") if x]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise UserError(f"unknown {what} {bad or text!r}; choose from {', '.join(allowed)}")
    return items


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m infer.bench", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help=f"comma-separated from {SHAPES} (default: the 8B/7B shapes on "
                                                   "CUDA, the tiny ones elsewhere)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated from {list(MODES)}")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--samples", type=int, default=8, help="schedules replayed at the largest batch size")
    ap.add_argument("--samples-b1", type=int, default=2, help="schedules replayed at batch size 1")
    ap.add_argument("--prompt-len", type=int, default=256, help="prompt length of the first sample (+1 each next)")
    ap.add_argument("--backends", default="sdpa,triton,flex", help="attention backends timed on the d2f rows")
    ap.add_argument("--no-static", action="store_true", help="skip the rows under infer.graphs.StaticForward "
                                                            "(CUDA graphs on a GPU)")
    ap.add_argument("--compile", action="store_true", help="also time every mode with its forward under torch.compile "
                                                           "(infer.graphs.compiled), eager and static (compiling "
                                                           "is untimed but takes a while)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 elsewhere")
    ap.add_argument("--traces", default=str(TRACES))
    ap.add_argument("--output-dir", default="outputs/bench")
    ap.add_argument("--record", action="store_true", help="re-record --traces from the testbed models and exit")
    ap.add_argument("--record-problems", type=int, default=8)
    return ap


def bench_shape(shape: str, args, trace: dict, modes, backends, batches, device, dtype, gbps: float, add) -> None:
    """Every row of one model shape; `add(row)` records each row as soon as it is measured."""
    t_shape = time.perf_counter()
    model = random_model(shape, device, dtype)
    floor_ms = 1e3 * weight_bytes(model) / (gbps * 1e9)
    ar_model = share_weights(model, causal=True) if ("ar" in modes or not args.no_hf) else None
    n_max = min(len(trace["modes"][m]["samples"]) for m in modes)
    for b in batches:
        n = min(args.samples_b1 if b == 1 else args.samples, n_max)
        for name in modes:
            m = ar_model if name == "ar" else model
            paths = [(be, False) for be in (backends if name == "d2f" else [None])]
            if not args.no_static:  # vanilla has no cache but a static shape already: its graph is captured as is
                paths.append(("static", False))
            if args.compile:
                paths += [(None, True)] + ([("static", True)] if not args.no_static else [])
            for be, comp in paths:
                try:
                    row = run_mode(m, trace, name, b, n, args.prompt_len, be, compile=comp)
                    row["x_floor"] = row["step_ms"] / floor_ms
                except Exception as e:  # one backend failing must not lose the rest of the run
                    row = {"mode": name, "backend": (be or "sdpa") + ("+compile" if comp else ""), "batch": b,
                           "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                add({"shape": shape, **row})
                print(f"{shape} {name} {row['backend']} b{b}: " +
                      (row["error"] if "error" in row else
                       f"{row['tokens_per_s']:.1f} tok/s, {row['step_ms']:.2f} ms/forward, "
                       f"NFE {row['nfe']:.1f}, replay {row['replay_ok']}"), file=sys.stderr, flush=True)
        if not args.no_hf:
            try:
                row = run_hf_generate(ar_model, trace, b, n, args.prompt_len)
                row["x_floor"] = row["step_ms"] / floor_ms
            except Exception as e:
                row = {"mode": "hf-generate", "backend": "transformers", "batch": b,
                       "error": f"{type(e).__name__}: {e}"}
            add({"shape": shape, **row})
            print(f"{shape} hf-generate b{b}: {row.get('tokens_per_s', row.get('error'))}", file=sys.stderr)
    print(f"{shape}: {time.perf_counter() - t_shape:.0f} s, weights {weight_bytes(model) / 1e9:.2f} GB, "
          f"floor {floor_ms:.3f} ms", file=sys.stderr)
    del model, ar_model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.record:
        record(Path(args.traces), args.record_problems)
        print(f"wrote {args.traces}")
        return 0
    from infer.api import parse_dtype
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} but torch sees no CUDA device; use --device cpu")
    dtype = parse_dtype(args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    shapes = parse_list(args.shapes or ("llada-8b,dream-7b" if device.startswith("cuda") else "tiny-llada,tiny-dream"),
                        SHAPES, "shape")
    modes = parse_list(args.modes, MODES, "mode")
    backends = parse_list(args.backends, BACKENDS, "backend")
    try:
        batches = sorted({int(b) for b in args.batch_sizes.split(",") if b})
    except ValueError:
        raise UserError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not batches or batches[0] <= 0:
        raise UserError(f"--batch-sizes must be positive integers, got {args.batch_sizes!r}")
    path = Path(args.traces)
    if not path.is_file():
        raise UserError(f"no trace file {str(path)!r}; record one with `python -m infer.bench --record`")
    trace = json.loads(path.read_text())

    gbps = copy_gbps(device, 2 ** 30 if device.startswith("cuda") else 2 ** 26)
    meta = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
            "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "copy_gbps": gbps,
            "date": time.strftime("%Y-%m-%d"), "args": vars(args), "trace_source": trace.get("source")}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []

    def add(row: dict):  # saved after every row, so an interrupted run keeps what it measured
        rows.append(row)
        (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    for shape in shapes:
        bench_shape(shape, args, trace, modes, backends, batches, device, dtype, gbps, add)

    text = (f"device {meta['device']}, {meta['dtype']}, torch {meta['torch']}, copy {gbps:.0f} GB/s, "
            f"{meta['date']}\n\n{markdown(rows)}\n\n" + "\n".join(ratios(rows)) + "\n")
    (out / "results.md").write_text(text)
    print(text)
    bad = [r for r in rows if r.get("replay_ok") is False]
    if bad:
        print(f"error: {len(bad)} row(s) did not replay their schedule exactly: {[r['mode'] for r in bad]}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from d2f.errors import run_main
    raise SystemExit(run_main(main))
