"""The testbed tokenizer: a small byte-level BPE trained on the generated problems.

    tok = train_tokenizer(texts, vocab_size=1024)      # or build_testbed_tokenizer("testbed/tokenizer")
    tok.save_pretrained("testbed/tokenizer")
    tok = load_tokenizer("testbed/tokenizer")          # = PreTrainedTokenizerFast.from_pretrained
    ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)

Design choices, and why:
- byte-level BPE: any text round-trips exactly (newlines, "$", "<<", the real GSM8K questions), there is
  no unknown token.
- every digit is its own token (a `Split(" ?\\d")` pre-tokenizer before the byte-level one; a digit
  after a space keeps the space, " 29" -> "Ġ2" "9", which saves a token per number): a small model then
  learns arithmetic digit by digit instead of memorising one token per number. Inside GSM8K's
  calculator annotations ("<<29-12=17>>17") every digit is a bare digit token.
- special tokens: `<|pad|>` (id 0), `<|eos|>` (1), `<|mask|>` (2, the diffusion [MASK]), chat markers
  `<|user|>`, `<|assistant|>`, `<|system|>`. The chat template renders
  `<|user|>\\n{question}\\n<|assistant|>\\n{answer}<|eos|>`, so the testbed looks like an instruct model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, EOS, MASK = "<|pad|>", "<|eos|>", "<|mask|>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = [PAD, EOS, MASK, USER, ASSISTANT, SYSTEM]  # ids 0..5 in this order

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}<|eos|>\n"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train the byte-level, digit-splitting BPE on `texts` and wrap it as a HF fast tokenizer."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
                         f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?\d"), behavior="isolated"),  # one digit per token (+ its leading space)
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, mask_token=MASK,
                                   additional_special_tokens=[USER, ASSISTANT, SYSTEM])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1024
    return fast


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved with `save_pretrained` (the testbed's, or any HF fast tokenizer), through
    the one loader, `d2f.models.refs.load_tokenizer`, with the hint for the testbed's."""
    from d2f.models.refs import load_tokenizer as load
    return load(path, fix="build the testbed tokenizer with `python -m d2f.data.tokenizer --out testbed/tokenizer`")


def build_testbed_tokenizer(out_dir: str | Path | None = None, n_problems: int = 20000, vocab_size: int = 1024,
                            seed: int = 0) -> PreTrainedTokenizerFast:
    """Train on `n_problems` generated train problems (questions and answers); save if `out_dir` given."""
    from d2f.data.gsm import make_problems
    problems = make_problems("train", n_problems, seed=seed)
    texts = [p["question"] for p in problems] + [p["answer"] for p in problems]
    tok = train_tokenizer(texts, vocab_size=vocab_size)
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


def chat_text(tokenizer, text: str, chat: bool = True) -> str:
    """`text` as the user's turn of the tokenizer's chat template, ending with the generation prompt
    (when the tokenizer has a template and chat=True); else `text` unchanged. The one place prompts
    are chat-formatted: decoding, evaluation and distillation data all go through it."""
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text


def prompt_ids(tokenizer, question: str, chat: bool = True) -> list[int]:
    """Token ids of the chat-formatted question, ending with the assistant marker (the generation prompt);
    chat=False: of the question as it is."""
    return tokenizer(chat_text(tokenizer, question, chat), add_special_tokens=False)["input_ids"]


def encode_problems(problems: list[dict], tokenizer, answer_len: int,
                    length_flag: str = "data.answer_len") -> list[tuple[list[int], int]]:
    """(prompt ids + answer ids + EOS padding to answer_len, prompt length) per problem: the testbed's
    training sequences. train/pretrain.py trains on them and train/decode_orders.py records decoding
    states on a prefix of them, so both encode through this one function.
    length_flag: the caller's name for answer_len, for the error on an answer that does not fit."""
    from d2f.yaml_config import ConfigError
    eos = tokenizer.eos_token_id
    out = []
    for p in problems:
        prompt = prompt_ids(tokenizer, p["question"])
        answer = tokenizer(p["answer"], add_special_tokens=False)["input_ids"] + [eos]
        if len(answer) > answer_len:
            raise ConfigError(f"an answer has {len(answer)} tokens (with EOS), more than {length_flag}="
                             f"{answer_len}; raise {length_flag}")
        out.append((prompt + answer + [eos] * (answer_len - len(answer)), len(prompt)))
    return out


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Train and save the testbed tokenizer.")
    ap.add_argument("--out", default="testbed/tokenizer")
    ap.add_argument("--n-problems", type=int, default=20000)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t = build_testbed_tokenizer(a.out, a.n_problems, a.vocab_size, a.seed)
    print(f"saved a {len(t)}-token tokenizer to {a.out}")
