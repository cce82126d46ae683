"""RAG with the scripted model: prompt assembly, citation checks, budget, streaming."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import HashingEmbedder

from agentkit import Index, index_folder
from agentkit.errors import ContextBudgetError
from agentkit.prompts import load_messages
from agentkit.rag import NO_ANSWER, RAG, Answer, CitationFilter
from agentkit.settings import Settings
from agentkit.testing import ScriptedChatModel

QUESTION = "Which module needs zlib?"


@pytest.fixture
def index(docs: Path, settings: Settings, embedder: HashingEmbedder):
    index_folder(docs, settings.index, settings=settings, embedder=embedder)
    with Index.open(settings.index, settings=settings, embedder=embedder) as opened:
        yield opened


def test_the_prompt_numbers_the_sources_and_the_answer_cites_them(index: Index) -> None:
    model = ScriptedChatModel(["The aardvark module needs zlib [1]."])
    answer = RAG(index, model, k=3, min_similarity=0.0).ask(QUESTION)
    prompt = model.calls[0].messages[-1]["content"]
    assert prompt.startswith("Sources:") and prompt.endswith(f"Question: {QUESTION}")
    assert "[1] Installing › Installing > Requirements (" in prompt and "install.md:5)" in prompt
    assert "[2] " in prompt and "[3] " in prompt
    assert model.calls[0].kwargs["temperature"] == 0.0
    assert answer.answered and answer.text == "The aardvark module needs zlib [1]."
    assert [(c.number, c.hit.source) for c in answer.citations] == [(1, "guide/install.md")]
    assert answer.citations[0].hit.location.endswith("guide/install.md:5")
    assert answer.usage.completion_tokens > 0 and answer.timings["generate_s"] > 0


def test_citations_to_no_source_are_removed_and_flagged(index: Index) -> None:
    model = ScriptedChatModel(["Zlib is needed [1][7] by aardvark [2, 9]."])
    answer = RAG(index, model, k=2, min_similarity=0.0).ask(QUESTION)
    assert answer.text == "Zlib is needed [1] by aardvark [2]."
    assert answer.invalid_citations == [7, 9] and [c.number for c in answer.citations] == [1, 2]


def test_no_relevant_source_means_no_model_call_and_a_plain_no(index: Index) -> None:
    model = ScriptedChatModel([])
    answer = RAG(index, model, min_similarity=0.99).ask("quantum chromodynamics of bagels")
    assert (answer.text, answer.answered, answer.citations, model.calls) == (
        NO_ANSWER,
        False,
        [],
        [],
    )


def test_the_models_own_no_answer_is_reported_as_unanswered(index: Index) -> None:
    answer = RAG(index, ScriptedChatModel([NO_ANSWER]), min_similarity=0.0).ask(QUESTION)
    assert not answer.answered and answer.sources


def test_sources_that_do_not_fit_are_dropped_lowest_ranked_first(index: Index) -> None:
    full = ScriptedChatModel(["x"], context_length=100_000)
    everything = RAG(index, full, k=3, max_tokens=50, min_similarity=0.0).ask(QUESTION)
    assert len(everything.sources) == 3
    room = full.count_tokens(full.calls[0].messages) + 50 - 1  # one token short
    tight = ScriptedChatModel(["x"], context_length=room)
    answer = RAG(index, tight, k=3, max_tokens=50, min_similarity=0.0).ask(QUESTION)
    assert answer.sources == everything.sources[:2]
    assert answer.dropped_sources == everything.sources[2:]
    assert tight.count_tokens(tight.calls[0].messages) + 50 <= room


def test_a_question_too_long_for_the_context_is_a_clear_error(index: Index) -> None:
    model = ScriptedChatModel(["x"], context_length=300)
    with pytest.raises(ContextBudgetError, match="max-model-len"):
        RAG(index, model, min_similarity=0.0).ask("zlib " * 400)


def test_streaming_gives_the_same_text_and_citations_as_ask(index: Index) -> None:
    reply = "Aardvark needs zlib [1][5], see also [2]."
    asked = RAG(index, ScriptedChatModel([reply]), k=2, min_similarity=0.0).ask(QUESTION)
    items = list(RAG(index, ScriptedChatModel([reply]), k=2, min_similarity=0.0).stream(QUESTION))
    streamed = items[-1]
    assert isinstance(streamed, Answer) and all(isinstance(i, str) for i in items[:-1])
    assert "".join(items[:-1]).strip() == asked.text == streamed.text
    assert streamed.invalid_citations == asked.invalid_citations == [5]


@pytest.mark.parametrize("cut", range(1, 12))
def test_the_citation_filter_handles_brackets_split_across_stream_pieces(cut: int) -> None:
    text = "A [1] b [12] c [2, 3] d [x] e ["
    check = CitationFilter(n_sources=2)
    out = check.feed(text[:cut]) + check.feed(text[cut:]) + check.flush()
    assert out == "A [1] b  c [2] d [x] e ["
    assert check.invalid == [12, 3] and check.cited == [1, 2]


def test_prompt_files_render_and_missing_fields_are_errors() -> None:
    messages = load_messages("rag_answer", sources="[1] S", question="Q?")
    assert messages[0]["role"] == "system" and messages[-1]["content"].endswith("Question: Q?")
    with pytest.raises(Exception, match="question"):
        load_messages("rag_answer", sources="x")


def test_a_prompt_that_surely_fits_needs_no_tokenize_round_trip() -> None:
    from agentkit.budget import fit_prompt, token_upper_bound

    class NoTokenize(ScriptedChatModel):
        def count_tokens(self, messages):
            raise AssertionError("asked the server")

    messages = [{"role": "user", "content": "é" * 100}]
    assert token_upper_bound(messages) >= 200  # bytes, not characters
    fitted = fit_prompt(NoTokenize([], context_length=1000), lambda kept: messages, 0, 100)
    assert fitted.max_tokens == 100 and fitted.prompt_tokens == token_upper_bound(messages)
    with pytest.raises(AssertionError, match="asked the server"):
        fit_prompt(NoTokenize([], context_length=300), lambda kept: messages, 0, 100)
