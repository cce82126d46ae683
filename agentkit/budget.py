"""Token budgeting: a prompt never exceeds the served model's context.

Sources are dropped lowest-ranked first until the prompt plus the room for the answer fits;
with every source gone, the answer's room shrinks down to ``min_answer_tokens``, and below that
we refuse with a clear error rather than let the server answer 400.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agentkit.errors import ContextBudgetError
from agentkit.llm import ChatModel, Message


@dataclass
class Fitted:
    messages: list[Message]
    kept: int  # how many of the sources made it into the prompt
    prompt_tokens: int  # exact, or an upper bound when the bound alone showed it fits
    max_tokens: int  # room left for the answer (may be less than asked, never more)


TEMPLATE_TOKENS = 64  # chat-template markers and a default system prompt, generously
MESSAGE_TOKENS = 16


def token_upper_bound(messages: list[Message]) -> int:
    """No tokenizer we serve makes more tokens than UTF-8 bytes (byte-level BPE, and
    SentencePiece with byte fallback), so bytes plus the template overhead bound the count."""
    return TEMPLATE_TOKENS + sum(
        len(m.get("content", "").encode()) + MESSAGE_TOKENS for m in messages
    )


def fit_prompt(
    model: ChatModel,
    build: Callable[[int], list[Message]],
    n_sources: int,
    max_tokens: int,
    *,
    min_answer_tokens: int = 64,
) -> Fitted:
    """The prompt ``build(kept)`` with the most sources (a prefix of them) that fits."""
    context = model.context_length()
    kept = n_sources
    while True:
        messages = build(kept)
        bound = token_upper_bound(messages)
        if bound + max_tokens <= context:  # certainly fits: no round trip to /tokenize
            return Fitted(messages, kept, bound, max_tokens)
        used = model.count_tokens(messages)
        room = context - used
        if room >= max_tokens:
            return Fitted(messages, kept, used, max_tokens)
        if kept == 0:
            break
        kept -= 1
    if room >= min_answer_tokens:
        return Fitted(messages, 0, used, room)
    raise ContextBudgetError(
        f"the question alone takes {used} of the model's {context} tokens of context: shorten "
        "it, or serve the model with a larger --max-model-len"
    )
