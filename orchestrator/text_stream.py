"""Generated token ids -> streamed text, and stop strings, detokenised incrementally.

Re-decoding every generated id each round made a generation O(n^2). As TGI and vLLM do, a round decodes
only a small window: ids[prefix:], with ids[prefix:read] as context (a tokenizer decodes a token
differently at the start of a text, e.g. SentencePiece drops its leading space), and the text the new ids
add is the difference of the two decodes. While that text ends with U+FFFD a character may be incomplete
(byte-level BPE splits characters across tokens), so the read offset waits; the context then moves up to
the ids last read. The window stays a few rounds wide, except over a run of ids that produce no text
(special tokens), which it keeps so that the next text is decoded in context.

The stop-string search looks only at the text the round's ids add plus the (longest stop string - 1)
characters before it; only when that holds a stop string are the round's ids decoded one by one, to find
the earliest that completes one. A chunk holds back an incomplete character and any tail that could still
become a stop string.

The final text is one full decode (`text`), so it is exactly the tokenizer's decode, cut before the stop
string. Where decoding is prefix-stable away from an incomplete last character (byte-level BPE, Metaspace),
the incremental text equals it and the streamed text is always a prefix of it. Where it is not (clean-up
of spaces before punctuation, byte fallback over invalid bytes), streaming and the stop search follow the
incremental text, which may repeat what a later token rewrote, and the final chunk resumes where the
streamed text and the final text agree.
"""

from __future__ import annotations

from dataclasses import dataclass

INCOMPLETE = "\ufffd"
# Past this many ids, a window that still ends in U+FFFD is checked for invalid bytes that will never
# complete a character.
MAX_WINDOW = 32


@dataclass
class StopHit:
    kept: int  # of the ids just appended, how many were kept: up to the one that completed the stop string
    text_end: int  # the length of the final text, which ends just before the stop string


class TextStream:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.token_ids: list[int] = []
        # Per stop string, for each character, the prefix lengths k (longest first, k < len) whose last
        # character it is: a held-back tail must end with one of them, so only those are compared.
        self._ends: list[dict[str, list[int]]] = []
        for stop_string in self.stop:
            ends: dict[str, list[int]] = {}
            for k in range(len(stop_string) - 1, 0, -1):
                ends.setdefault(stop_string[k - 1], []).append(k)
            self._ends.append(ends)
        self._longest = max(map(len, self.stop), default=0)
        # A U+FFFD standing for an incomplete character can vanish a token later, so a stop string holding
        # one can match after one of the round's ids and not after the last: check each id.
        self._check_each_id = any(INCOMPLETE in s for s in self.stop)
        self._prefix = self._read = 0  # the window is ids[prefix:], its context ids[prefix:read]
        self._context_text = ""  # decode(ids[prefix:read])
        self._head: list[str] = []  # the text of ids[:read], in pieces
        self._head_len = 0
        self._tail = ""  # the text of ids[read:] in context; waiting, it ends with U+FFFD or is empty
        self._sent = 0  # characters streamed
        self._full: tuple[int, str] | None = None  # (id count, full decode), see `text`
        self._stopped = False

    def append(self, token_ids: list[int]) -> StopHit | None:
        """Add newly committed ids. If they complete a stop string, keep only the ids up to and including
        the one that completed the earliest, and say how many of these were kept."""
        start = len(self.token_ids)
        self.token_ids.extend(token_ids)
        window_text = self._decode(self.token_ids[self._prefix:])
        tail = self._after_context(window_text)
        if self.stop:
            hit = self._find_stop(start, tail)
            if hit is not None:
                return hit
        if tail and not tail.endswith(INCOMPLETE):
            self._advance(len(self.token_ids), tail, rest="")
        else:
            self._tail = tail
            if len(self.token_ids) - self._prefix > MAX_WINDOW:
                self._advance_before_last(window_text)
        return None

    def take(self, final: bool) -> str:
        """The text not yet streamed that is safe to stream now (all of it when final, or once a stop
        string was hit)."""
        if final or self._stopped:
            return self._take_rest()
        visible = self._head_suffix(self._head_len - self._sent + self._longest) + self._tail
        begin = self._sent - (self._head_len + len(self._tail) - len(visible))
        safe = len(visible.rstrip(INCOMPLETE))
        safe -= self._held_back(visible, safe)
        if safe <= begin:
            return ""
        self._sent += safe - begin
        return visible[begin:safe]

    @property
    def text(self) -> str:
        """The full text so far (cut before the stop string once one was hit): one full decode, cached
        until more ids come, so it is exact for any tokenizer; meant for the end of a generation."""
        if self._full is None or self._full[0] != len(self.token_ids):
            self._full = (len(self.token_ids), self._decode(self.token_ids))
        return self._full[1]

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _after_context(self, window_text: str) -> str:
        """The text the ids after the context add. Where decoding is not prefix-stable, the window's text
        may not start with the context's: then all that follows their common start counts as new, so that
        a stop string the new ids complete is still seen (text is sent again, as it was before)."""
        context = self._context_text
        if window_text.startswith(context):
            return window_text[len(context):]
        return window_text[_common_prefix_len(context, window_text):]

    def _advance(self, read: int, tail: str, rest: str) -> None:
        """Take ids[:read] as decoded for good, their text ending in `tail`, and `rest` as the text of the
        ids after them. The ids just read become the context: they produced text, so the next ids are not
        decoded as the start of a text."""
        self._head.append(tail)
        self._head_len += len(tail)
        self._prefix, self._read = self._read, read
        self._context_text = self._decode(self.token_ids[self._prefix:read])
        self._tail = rest

    def _advance_before_last(self, window_text: str) -> None:
        """Invalid bytes end the text in U+FFFD for good and would widen the window every round. The ids
        before the last are done when the last decodes, apart from them, to text and both texts join into
        the window's: the last then does not continue a character they began."""
        last = len(self.token_ids) - 1
        before = self._decode(self.token_ids[self._prefix:last])
        after = self._decode(self.token_ids[last:])
        tail = self._after_context(before)
        if tail and after and before + after == window_text:
            self._advance(last, tail, rest=after)

    def _find_stop(self, start: int, tail: str) -> StopHit | None:
        """The earliest of the ids from `start` on whose text completes a stop string. Earlier text was
        searched already, so only the new text and the (longest - 1) characters before it are."""
        before = self._head_suffix(self._longest - 1)
        if not self._check_each_id and not self._has_stop(before + tail):
            return None
        for end in range(start + 1, len(self.token_ids) + 1):
            text = self._after_context(self._decode(self.token_ids[self._prefix:end]))
            if self._has_stop(before + text):
                return self._stop_at(start, end)
        return None

    def _has_stop(self, text: str) -> bool:
        return any(s in text for s in self.stop)

    def _stop_at(self, start: int, end: int) -> StopHit:
        """Keep ids[:end] and cut their full decode before its earliest stop string (one full decode, once
        a generation, so the text end is exact for any tokenizer)."""
        del self.token_ids[end:]
        text = self._decode(self.token_ids)
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        self._full = (end, text[:min(found)] if found else text)
        self._stopped = True
        return StopHit(kept=end - start, text_end=len(self._full[1]))

    def _take_rest(self) -> str:
        """The rest of the final text. Where the final text does not extend what was streamed (decoding not
        prefix-stable), it resumes where the two agree; the stream's text is the final text from here on."""
        final_text = self.text
        streamed = ("".join(self._head) + self._tail)[:self._sent]
        begin = len(streamed) if final_text.startswith(streamed) else _common_prefix_len(streamed, final_text)
        self._head, self._head_len, self._tail, self._sent = [final_text], len(final_text), "", len(final_text)
        return final_text[begin:]

    def _head_suffix(self, n: int) -> str:
        """The last n characters of the text of ids[:read], joining only the pieces they span."""
        if n <= 0:
            return ""
        pieces, size = [], 0
        for piece in reversed(self._head):
            pieces.append(piece)
            size += len(piece)
            if size >= n:
                break
        return "".join(reversed(pieces))[-n:]

    def _held_back(self, text: str, safe: int) -> int:
        """How many characters before `safe` could still become a stop string (the longest suffix of
        text[:safe] that is a proper prefix of one): compared in C over a tail sliced once, only at the
        prefix lengths that end with the tail's last character (a 1000-character stop string used to
        cost ~3 ms of the orchestrator's CPU a round)."""
        if safe == 0:
            return 0
        held = 0
        for stop_string, ends in zip(self.stop, self._ends):
            tail = text[max(0, safe - len(stop_string) + 1):safe]
            for k in ends.get(tail[-1], ()) if tail else ():
                if k <= held:
                    break
                if tail.endswith(stop_string[:k]):
                    held = k
                    break
        return held


def _common_prefix_len(a: str, b: str) -> int:
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    return common
