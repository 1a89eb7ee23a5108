"""Streaming text with stop strings, detokenised incrementally: what is held back is exactly what could still
become a stop string, the text is exactly the tokenizer's decode, and a round decodes a few ids, not all."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from orchestrator.text_stream import TextStream

SPECIAL = "<|endoftext|>"
BYTE_OF_CHAR = {c: b for b, c in bytes_to_unicode().items()}  # byte-level BPE spells bytes as these


@pytest.fixture(scope="module")
def byte_level():
    return AutoTokenizer.from_pretrained("models/target")


def metaspace_tokenizer() -> Tokenizer:
    """A tiny SentencePiece-style tokenizer: the first token of a text loses its leading space, so a token
    decodes differently at the start of a window than in context."""
    words = ["▁Hello", "Hello", "▁world", "▁", "▁中", "文", "字", "😀", "▁😀", "👍🏽", "é", "▁é", "x", "▁x",
             "'", "▁'", ".", "▁.", "<", "▁<", "/", "end", ">", "ab", "▁ab"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + words)},
                                           unk_token="<unk>"))
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    return tokenizer


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def tokenizer(request, byte_level):
    return byte_level if request.param == "byte_level" else metaspace_tokenizer()


def vocab_size(tokenizer) -> int:
    return len(tokenizer.get_vocab())


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def special_ids(tokenizer) -> list[int]:
    return [i for t, i in tokenizer.get_vocab().items() if t in (SPECIAL, "<s>", "</s>")]


def text_runs(tokenizer) -> list[list[int]]:
    """Ids of text with emojis, CJK and accents (byte-level BPE splits these characters over several ids)."""
    if isinstance(tokenizer, Tokenizer):
        runs = [["▁Hello", "▁world"], ["▁中", "文", "字"], ["▁😀", "👍🏽"], ["▁é", "x"], ["▁<", "/", "end", ">"],
                ["'", "."]]
        return [[tokenizer.token_to_id(t) for t in run] for run in runs]
    texts = ["中文字符", " 😀👍🏽", " é", " Hello world", " </end>", "'."]
    return [tokenizer.encode(text, add_special_tokens=False) for text in texts]


def random_ids(tokenizer, rng: random.Random, n: int) -> list[int]:
    """Random ids (in a byte-level vocabulary many are single bytes, splitting or breaking multi-byte
    characters), runs of text, and special tokens."""
    runs, specials = text_runs(tokenizer), special_ids(tokenizer)
    ids: list[int] = []
    while len(ids) < n:
        kind = rng.random()
        if kind < 0.6:
            ids.append(rng.randrange(vocab_size(tokenizer)))
        elif kind < 0.9:
            ids.extend(rng.choice(runs))
        else:
            ids.append(rng.choice(specials))
    return ids[:n]


def stream_in_rounds(stream: TextStream, ids: list[int], rng: random.Random, on_round=None):
    """Append ids in rounds of 1-9 as the round loop does, taking a chunk after each (calling
    on_round(streamed so far)); returns (chunks, how many ids were kept, the StopHit), the last two None when
    no stop string was hit."""
    chunks: list[str] = []
    at = 0
    while at < len(ids):
        size = rng.randint(1, 9)
        hit = stream.append(ids[at:at + size])
        if hit is not None:
            return chunks + [stream.take(final=True)], at + hit.kept, hit
        at += size
        chunks.append(stream.take(final=False))
        if on_round:
            on_round("".join(chunks))
    return chunks + [stream.take(final=True)], None, None


def prefix_of(final: str):
    """An on_round check: what was streamed is never taken back."""
    def check(streamed: str) -> None:
        assert final.startswith(streamed), (streamed[-20:], final[len(streamed) - 20:len(streamed)])
    return check


class CountingTokenizer:
    """Records how many ids each decode is passed: the work, without timing."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.sizes: list[int] = []

    def decode(self, ids, skip_special_tokens):
        self.sizes.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def assert_linear(counting: CountingTokenizer, n: int) -> None:
    """One full decode, for the final text; every other decode is a small window."""
    assert sum(counting.sizes) < 30 * n
    assert [size for size in counting.sizes if size >= 100] == [n]


def held_back_reference(text: str, stops: list[str]) -> int:
    """The slow, obvious rule: the earliest position from which the rest of the text could still grow into
    a stop string, as a count of held-back characters."""
    for start in range(max(0, len(text) - max(map(len, stops)) + 1), len(text)):
        if any(s.startswith(text[start:]) and len(text) - start < len(s) for s in stops):
            return len(text) - start
    return 0


def stop_reference(tokenizer, ids: list[int], stops: list[str]):
    """The slow, obvious rule: the smallest id count whose decode contains a stop string, and where the
    earliest stop string starts in it."""
    for count in range(1, len(ids) + 1):
        text = decode(tokenizer, ids[:count])
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        if found:
            return count, min(found)
    return None


def test_the_held_back_tail_is_the_longest_that_could_still_become_a_stop_string():
    rng = random.Random(0)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
        stream = TextStream(tokenizer=None, stop=stops)
        assert stream._held_back(text, len(text)) == held_back_reference(text, stops), (text, stops)


def test_streamed_pieces_add_up_to_the_text_and_never_show_a_stop_string_prefix_early(byte_level):
    stream = TextStream(byte_level, stop=["</end>"])
    pieces, hit = [], None
    for part in ["Hello", " wor", "ld <", "/en", "d> more"]:
        hit = stream.append(byte_level.encode(part, add_special_tokens=False))
        pieces.append(stream.take(final=hit is not None))
    assert pieces == ["Hello", " wor", "ld ", "", ""]
    assert hit is not None and hit.text_end == len("Hello world ")
    assert "".join(pieces) == stream.text == "Hello world "


def test_a_long_generation_streams_exactly_the_full_decode(tokenizer):
    rng = random.Random(1)
    stops = ["\x00\x01never", "😀😀😀😀😀", "<</end"]  # never completed; their prefixes come and go
    for _ in range(3):
        ids = random_ids(tokenizer, rng, 4000)
        final = decode(tokenizer, ids)
        assert not any(s in final for s in stops)
        stream = TextStream(tokenizer, stops)
        chunks, kept, _ = stream_in_rounds(stream, ids, rng, on_round=prefix_of(final))
        assert kept is None and stream.token_ids == ids
        assert "".join(chunks) == stream.text == final


def test_stop_strings_end_where_a_full_decode_of_each_prefix_says(tokenizer):
    """Stop strings cut from the decoded text at random points (across token boundaries, ending inside
    characters split over several ids, holding U+FFFD), or absent, against decoding every prefix."""
    rng = random.Random(2)
    hits = 0
    for _ in range(400):
        ids = random_ids(tokenizer, rng, rng.randint(1, 80))
        full = decode(tokenizer, ids)
        stops = []
        for _ in range(rng.randint(1, 3)):
            if full and rng.random() < 0.8:
                at = rng.randrange(len(full))
                stops.append(full[at:at + rng.randint(1, 6)])
            else:
                stops.append(rng.choice(["zzz", "中中", "<//"]))
        expected = stop_reference(tokenizer, ids, stops)
        stream = TextStream(tokenizer, stops)
        chunks, kept, hit = stream_in_rounds(stream, ids, rng)
        if expected is None:
            assert kept is None and "".join(chunks) == stream.text == full
            continue
        hits += 1
        count, text_end = expected
        assert (kept, hit.text_end) == (count, text_end), (ids, stops)
        assert stream.token_ids == ids[:count]
        assert "".join(chunks) == stream.text == decode(tokenizer, ids[:count])[:text_end]
    assert hits > 200


def test_decoding_work_grows_linearly_with_the_generation(byte_level):
    """The old stream decoded every id every round (~n^2 / (2 * round) ids); now a round decodes a window of
    a few rounds, and the full text is decoded once."""
    rng = random.Random(3)
    ids = random_ids(byte_level, rng, 4000)
    counting = CountingTokenizer(byte_level)
    stream = TextStream(counting, ["\x00\x01never", "<</end"])
    chunks, kept, _ = stream_in_rounds(stream, ids, rng)
    assert kept is None and "".join(chunks) == decode(byte_level, ids)
    assert_linear(counting, len(ids))


def test_a_run_of_invalid_bytes_does_not_widen_the_window(byte_level):
    """Text that keeps ending in U+FFFD (bytes that never form a character, now and then a character's
    first byte) must not make each round decode everything since the last complete character (~47 n ids
    here if it did)."""
    rng = random.Random(4)
    id_of_byte = {BYTE_OF_CHAR[t]: i for t, i in byte_level.get_vocab().items() if t in BYTE_OF_CHAR}
    continuation, lead = range(0x80, 0xC0), range(0xC2, 0xF5)
    ids = [id_of_byte[rng.choice(continuation if rng.random() < 0.95 else lead)] for _ in range(4000)]
    counting = CountingTokenizer(byte_level)
    stream = TextStream(counting, ["\x00\x01never"])
    final = decode(byte_level, ids)
    chunks, kept, _ = stream_in_rounds(stream, ids, rng, on_round=prefix_of(final))
    assert kept is None and "".join(chunks) == final
    assert_linear(counting, len(ids))


def test_a_decoding_that_is_not_prefix_stable_still_ends_in_the_full_decode():
    """transformers' clean-up of tokenization spaces rewrites "a ' b" as "a'b": a token changes text decoded
    before it. The final text is still exactly the tokenizer's decode (cut before the stop string)."""
    words = ["<unk>", "a", "b", "'", ".", "n't", "stop"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.decoder = decoders.WordPiece(cleanup=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=True)
    rng = random.Random(5)
    for _ in range(300):
        ids = [rng.randrange(1, len(words)) for _ in range(rng.randint(1, 40))]
        stream = TextStream(tokenizer, ["stop"])
        chunks, kept, hit = stream_in_rounds(stream, ids, rng)
        assert (hit is None) == (stop_reference(tokenizer, ids, ["stop"]) is None)
        full = decode(tokenizer, stream.token_ids)
        expected = full[:full.find("stop")] if "stop" in full else full
        assert stream.text == expected
        assert hit is None or hit.text_end == len(expected)
