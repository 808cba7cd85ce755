"""lm-evaluation-harness model `d2f`: our decoders behind the harness's `generate_until`.

    pip install -e ".[eval]"            # lm-eval is optional
    python -m infer.lm_eval_adapter --model d2f \\
        --model_args model=GSAI-ML/LLaDA-8B-Instruct,mode=d2f,adapter=<d2f lora dir>,max_new_tokens=512,block_size=64,dtype=bfloat16 \\
        --tasks gsm8k --num_fewshot 4 --batch_size 1 --device cuda:0

`python -m infer.lm_eval_adapter` takes exactly the `lm_eval` command's arguments: it is that command
with this module imported first, and importing it is what registers the name `d2f`
(`lm_eval.api.registry.register_model`; the `lm_eval` console script has no plug-in hook that would
find a model outside its package). From Python: `import infer.lm_eval_adapter`, then
`lm_eval.simple_evaluate(model="d2f", model_args="...", tasks=["gsm8k"])`.

model_args: `model` (hub id / checkpoint dir; default the testbed model for the mode), `mode`,
`adapter`, `dtype`, `cuda_graphs` and `compile` (true/false: `infer.api.load`'s speed-ups, the same
tokens), and any `infer.api.DecodeConfig` field (`max_new_tokens`,
`block_size`, `steps`, `cache`, `rule`, `threshold`, `tau_add`, ...). The device and batch size are
lm_eval's own `--device` (its default cuda:0 falls back to the CPU when there is no GPU) and
`--batch_size` (an integer; "auto" is not supported).

Generation length: a dLLM decodes a fixed canvas of `max_new_tokens` (a decoding hyper-parameter that
changes its answers), so that is what we decode; a request's `max_gen_toks` then caps the returned
continuation (at most that many answer tokens), and the continuation is cut before the first of the
request's `until` strings. Likelihood requests (multiple-choice tasks, perplexity) raise
NotImplementedError: a diffusion LM has no exact sequence likelihood, only a bound.
"""
from __future__ import annotations

import dataclasses
import sys

try:  # lm-eval is optional: without it the class still works on request objects with `.args`
    from lm_eval.api.model import LM as _Base
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - exercised when lm-eval is not installed
    _Base, register_model = object, None

from d2f.yaml_config import from_dict, parse_bool
from d2f.errors import UserError
from infer.prompts import cut_at_stop

LOGLIKELIHOOD_ERROR = ("the d2f model does not support loglikelihood requests: diffusion LMs (LLaDA, Dream) have "
                       "no exact sequence likelihood, only an ELBO. Use generation tasks (e.g. --tasks gsm8k).")


def _decode_cls():
    from infer.decode_config import DecodeConfig

    return DecodeConfig




def resolve_device(device: str | None) -> str:
    """lm_eval passes its --device (default "cuda:0") to every model; without a GPU we say so and use the CPU."""
    import torch

    device = str(device or "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"d2f: device {device!r} requested but CUDA is not available; using the CPU (pass --device cpu)",
              file=sys.stderr)
        return "cpu"
    return device


class D2FLM(_Base):
    """model: a hub id / checkpoint dir / None (testbed), or an already loaded model with `tokenizer=`."""

    def __init__(self, model=None, mode: str = "d2f", adapter: str | None = None, device: str = "cpu",
                 dtype: str = "float32", batch_size=1, tokenizer=None, max_batch_size=None, cuda_graphs=False,
                 compile=False, **decode):
        super().__init__()
        # lm-eval passes booleans; a string may come from Python callers
        cuda_graphs, compile = parse_bool(cuda_graphs, "d2f cuda_graphs"), parse_bool(compile, "d2f compile")
        if isinstance(batch_size, str):
            if not batch_size.isdigit():
                raise UserError(f"d2f: batch_size must be a positive integer, got {batch_size!r} "
                                 "('auto' is not supported)")
            batch_size = int(batch_size)
        if batch_size < 1:
            raise UserError(f"d2f: batch_size must be >= 1, got {batch_size}")
        self.batch_size_ = batch_size
        self.cfg = from_dict(_decode_cls(), {"mode": mode, **decode}, where="d2f model_args")
        device = resolve_device(device)
        if model is None or isinstance(model, str):
            from infer.api import load

            self.model, self.tokenizer = load(model, self.cfg.mode, adapter=adapter, device=device, dtype=dtype,
                                              cuda_graphs=cuda_graphs, compile=compile)
        else:
            if tokenizer is None:
                raise UserError("d2f: pass tokenizer= together with an already loaded model")
            if cuda_graphs or compile:
                raise UserError("d2f: cuda_graphs and compile apply when the adapter loads the model; wrap an "
                                "already loaded one yourself (infer.graphs.StaticForward, infer.graphs.compiled)")
            self.model, self.tokenizer = model, tokenizer
        self.model_name = model if isinstance(model, str) else "testbed"

    # -- what the harness asks of a model

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "d2f")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The tokenizer's template when the harness runs with --apply_chat_template, else none."""
        if not chat_template:
            return ""
        return chat_template if isinstance(chat_template, str) else getattr(self.tokenizer, "chat_template", "")

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(LOGLIKELIHOOD_ERROR)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(LOGLIKELIHOOD_ERROR)

    def request_config(self, gen_kwargs: dict):
        """The DecodeConfig of one request: ours, with the request's sampling temperature."""
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        if not gen_kwargs.get("do_sample", temperature > 0):
            temperature = 0.0
        return dataclasses.replace(self.cfg, temperature=temperature)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """requests: objects whose `.args` is (context, gen_kwargs). Requests with the same gen_kwargs are
        decoded together in batches of `batch_size`; answers come back in the order of the requests."""
        from infer.api import generate

        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            groups.setdefault(repr(sorted((gen_kwargs or {}).items(), key=str)), []).append(i)
        for idx in groups.values():
            gen_kwargs = dict(requests[idx[0]].args[1] or {})
            until = gen_kwargs.get("until", [])
            max_gen_toks = int(gen_kwargs.get("max_gen_toks", self.cfg.max_new_tokens))
            cfg = self.request_config(gen_kwargs)
            for s in range(0, len(idx), self.batch_size_):
                chunk = idx[s:s + self.batch_size_]
                results = generate(self.model, self.tokenizer, [requests[i].args[0] for i in chunk], cfg,
                                   batch_size=len(chunk))
                for i, res in zip(chunk, results, strict=True):
                    text = res.text
                    if len(res.token_ids) > max_gen_toks:
                        text = self.tokenizer.decode(list(res.token_ids[:max_gen_toks]), skip_special_tokens=True)
                    out[i] = cut_at_stop(text, until)
                    if hasattr(self, "cache_hook"):
                        self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out  # type: ignore[return-value]


if register_model is not None:
    try:
        register_model("d2f")(D2FLM)
    except ValueError:  # already registered by an earlier import of this module under another name
        pass


def main(argv: list[str] | None = None) -> None:
    """The lm_eval command line, with the `d2f` model registered."""
    if register_model is None:
        raise UserError("lm-eval is not installed: pip install -e '.[eval]' (or pip install lm-eval)")
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    from d2f.errors import run_main
    raise SystemExit(run_main(main))
