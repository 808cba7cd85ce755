"""GSM8K k-shot prompts.

    shots = select_shots(4, source="testbed", exclude=[p["question"] for p in problems])
    prompt = build_prompt(tokenizer, problem["question"], shots)   # chat-templated when the tokenizer has one

The k worked examples are GSM8K-format problems ("Question: ...\\nAnswer: <working>\\n#### N") drawn
once, deterministically (seeded), from a *train* split, and the same shots precede every evaluated
question (as in lm-evaluation-harness's gsm8k task with a fixed seed). A shot is never one of the
evaluated problems: `exclude` removes any question that is also being evaluated.

Where shots come from: the testbed and the hub (openai/gsm8k) have their own train split. The 100
real GSM8K questions ("real100") and a local file are test sets only, so their shots come from the
testbed's train split (GSM8K-format problems that cannot overlap them) unless `shots_from` names
another source.

Instruct tokenizers (those with a chat template, chat="auto") get a conversation: each shot is a user
turn (its question) and an assistant turn (its worked answer), then the question as the last user
turn; with k = 0 that is `infer.api.format_prompt(tokenizer, question)`, the testbed's training
format. chat="off" gives the plain lm-evaluation-harness gsm8k text ("Question: ...\nAnswer: ..."
blocks, ending with "Answer:"), used by the public LLaDA / Fast-dLLM / D2F evaluations.
"""
from __future__ import annotations

import random

from d2f.errors import UserError

SOURCES_WITH_TRAIN = ("testbed", "hub")
SHOT_POOL = 512  # draw shots from the first SHOT_POOL train problems (loading the whole split is not needed)
CHAT_CHOICES = ("auto", "on", "off")


def default_shots(source: str) -> int:
    """4 (the D2F paper's GSM8K setting), but 0 on the testbed: its models were trained on the bare
    chat-formatted question, and 4 shots would not fit their 512 positions with the answer."""
    return 0 if source == "testbed" else 4


def shot_source(source: str) -> str:
    """The source whose train split provides the shots for evaluating `source`."""
    return source if source in SOURCES_WITH_TRAIN else "testbed"


def select_shots(k: int, source: str = "testbed", exclude=(), seed: int = 1234,
                 shots_from: str | None = None) -> list[dict]:
    """k train problems, the same for every call with the same arguments."""
    if k < 0:
        raise UserError(f"the number of shots must be >= 0, got {k}")
    if k == 0:
        return []
    from d2f.data.gsm8k import load_gsm8k

    src = shots_from or shot_source(source)
    # A local file named by --shots-from is taken whole (it has no splits); sources get their train split.
    split = "train" if src in SOURCES_WITH_TRAIN else "test"
    pool = load_gsm8k(src, split=split, limit=SHOT_POOL)
    excluded = {_norm(q) for q in exclude}
    pool = [p for p in pool if _norm(p["question"]) not in excluded]
    if len(pool) < k:
        raise UserError(f"cannot draw {k} shots from {src!r} ({split} split): only {len(pool)} problems are "
                         "left after removing the evaluated ones. Use fewer --shots or another --shots-from.")
    return random.Random(seed).sample(pool, k)


def _norm(question: str) -> str:
    return " ".join(question.split())


def format_example(question: str, answer: str | None = None) -> str:
    """One "Question: ...\\nAnswer: ..." block; without an answer it ends with "Answer:" for the model."""
    text = f"Question: {question.strip()}\nAnswer:"
    return text if answer is None else f"{text} {answer.strip()}"


def fewshot_text(question: str, shots: list[dict]) -> str:
    blocks = [format_example(s["question"], s["answer"]) for s in shots]
    return "\n\n".join(blocks + [format_example(question)])


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def use_chat(tokenizer, chat: str | bool) -> bool:
    """chat: "auto" (use the template when the tokenizer has one), "on"/True, "off"/False."""
    if isinstance(chat, bool):
        return chat
    if chat not in CHAT_CHOICES:
        raise UserError(f"chat must be one of {CHAT_CHOICES}, got {chat!r}")
    if chat == "on" and not has_chat_template(tokenizer):
        raise ValueError("chat='on' but the tokenizer has no chat_template; use chat='off' for a base model")
    return has_chat_template(tokenizer) if chat == "auto" else chat == "on"


def chat_messages(question: str, shots: list[dict]) -> list[dict]:
    """Shots as earlier turns of the conversation (lm-evaluation-harness's "fewshot as multiturn"), then the
    question alone, which is exactly what an instruct model saw in training when k = 0."""
    messages = []
    for s in shots:
        messages += [{"role": "user", "content": s["question"].strip()},
                     {"role": "assistant", "content": s["answer"].strip()}]
    return messages + [{"role": "user", "content": question.strip()}]


def build_prompt(tokenizer, question: str, shots: list[dict], chat: str | bool = "auto") -> str:
    if not use_chat(tokenizer, chat):
        return fewshot_text(question, shots)
    if not shots:
        from infer.api import format_prompt

        return format_prompt(tokenizer, question.strip(), chat=True)
    return tokenizer.apply_chat_template(chat_messages(question, shots), tokenize=False, add_generation_prompt=True)


STOP_STRINGS = ("Question:",)  # where a few-shot prompt's next example would start


def cut_at_stop(text: str, stops=STOP_STRINGS) -> str:
    """text up to the first of `stops` (a string or a list; empty ones ignored)."""
    if isinstance(stops, str):
        stops = [stops]
    cut = len(text)
    for s in stops or []:
        i = text.find(s) if s else -1
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]
