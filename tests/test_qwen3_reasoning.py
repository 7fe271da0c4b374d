"""The <think> splitter: streaming in any chunking gives the same split as the whole text."""

from __future__ import annotations

import pytest

from ragserve.engines.reasoning import ReasoningSplitter, prompt_opens_reasoning

QWEN3_THINKING = "<think>\nThe user asks about France.\n\nIts capital is Paris.\n</think>\n\nParis is the capital."


def stream(text: str, size: int, **kwargs) -> tuple[str, str, int]:
    splitter = ReasoningSplitter(**kwargs)
    reasoning, content, pieces = "", "", 0
    for start in range(0, len(text), size):
        r, c = splitter.feed(text[start:start + size])
        reasoning, content, pieces = reasoning + r, content + c, pieces + bool(r or c)
    r, c = splitter.flush()
    return reasoning + r, content + c, pieces


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 1000])
def test_stream_split_matches_any_chunking(size):
    reasoning, content, _ = stream(QWEN3_THINKING, size)
    assert reasoning == "The user asks about France.\n\nIts capital is Paris."
    assert content == "Paris is the capital."


def test_streaming_is_incremental():
    # Reasoning must reach the client while it is being written, not only at </think>.
    splitter = ReasoningSplitter()
    assert splitter.feed("<think>\nstep one") == ("step one", "")
    assert splitter.feed(" and two</th") == (" and two", "")
    assert splitter.feed("ink>\n\nAnswer") == ("", "Answer")
    assert splitter.feed(" here.") == ("", " here.")
    assert splitter.flush() == ("", "")


def test_thinking_off_output_is_all_content():
    # enable_thinking=False: the template wrote an empty think block; the model writes only the answer.
    assert stream("Paris is the capital.", 1000)[:2] == ("", "Paris is the capital.")
    reasoning, content, _ = stream("Paris <b>is</b> the capital.", 1)
    assert (reasoning, content) == ("", "Paris <b>is</b> the capital.")


def test_tag_inside_the_answer_stays_content():
    text = "Use the <think> tag to mark reasoning."
    assert stream(text, 1000)[:2] == ("", text)
    assert stream(text, 1)[:2] == ("", text)


def test_prompt_opened_think_block():
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert prompt_opens_reasoning(prompt)
    assert not prompt_opens_reasoning(prompt + "\n</think>\n\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n")
    output = "Short thought.\n</think>\n\nThe answer."
    for size in (1, 4, 100):
        assert stream(output, size, start_in_reasoning=True)[:2] == ("Short thought.", "The answer.")


def test_unfinished_reasoning_and_partial_tags():
    assert stream("<think>cut off by max_tokens", 1000)[:2] == ("cut off by max_tokens", "")
    assert stream("<thi", 1000)[:2] == ("", "<thi")
    assert stream("<think>a</thin", 1)[:2] == ("a</thin", "")


def test_whitespace_inside_reasoning_is_kept_but_not_around_it():
    reasoning, content, _ = stream("<think>  a\n\n  b  \n</think>\n\n  c d ", 1)
    assert reasoning == "a\n\n  b"
    assert content == "c d "
