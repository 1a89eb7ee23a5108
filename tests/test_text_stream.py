"""Streaming text with stop strings: what is held back is exactly what could still become a stop string."""

from __future__ import annotations

import random

from orchestrator.text_stream import TextStream


def held_back_reference(text: str, stops: list[str]) -> int:
    """The slow, obvious rule: the earliest position from which the rest of the text could still grow into
    a stop string, as a count of held-back characters."""
    for start in range(max(0, len(text) - max(map(len, stops)) + 1), len(text)):
        if any(s.startswith(text[start:]) and len(text) - start < len(s) for s in stops):
            return len(text) - start
    return 0


def test_the_held_back_tail_is_the_longest_that_could_still_become_a_stop_string():
    rng = random.Random(0)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
        stream = TextStream(tokenizer=None, stop=stops)
        assert stream._held_back(text, len(text)) == held_back_reference(text, stops), (text, stops)


def test_streamed_pieces_add_up_to_the_text_and_never_show_a_stop_string_prefix_early():
    stream = TextStream(tokenizer=None, stop=["</end>"])
    text, pieces = "", []
    for part in ["Hello", " wor", "ld <", "/en", "d"]:
        text += part
        pieces.append(stream.delta(text, final=False))
    assert pieces == ["Hello", " wor", "ld ", "", ""]
    assert "".join(pieces) + stream.delta(text, final=True) == text
