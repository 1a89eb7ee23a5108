"""Generated token ids -> streamed text, and stop strings.

Text is re-decoded from all generated ids (byte-level BPE can split a character across tokens), and a
chunk holds back an incomplete character and any tail that could still become a stop string, so the
streamed text is always a prefix of the final text.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StopHit:
    token_count: int  # generated tokens up to and including the one that completed the stop string
    text_end: int  # the final text is text[:text_end]


class TextStream:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.emitted = ""
        # Per stop string, for each character, the prefix lengths k (longest first, k < len) whose last
        # character it is: a held-back tail must end with one of them, so only those are compared.
        self._ends: list[dict[str, list[int]]] = []
        for stop_string in self.stop:
            ends: dict[str, list[int]] = {}
            for k in range(len(stop_string) - 1, 0, -1):
                ends.setdefault(stop_string[k - 1], []).append(k)
            self._ends.append(ends)

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

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def find_stop(self, generated: list[int], first_new: int) -> StopHit | None:
        """The earliest stop string completed by a token at index >= first_new, if any."""
        if not self.stop:
            return None
        text = self.decode(generated)
        hits = [(text.find(s), s) for s in self.stop if s in text]
        if not hits:
            return None
        # The smallest token count whose text contains a stop string.
        for count in range(max(1, first_new), len(generated) + 1):
            prefix_text = self.decode(generated[:count])
            found = [i for i in (prefix_text.find(s) for s in self.stop) if i >= 0]
            if found:
                return StopHit(count, min(found))
        return None

    def delta(self, text: str, final: bool) -> str:
        """The not-yet-emitted part of `text` that is safe to stream now."""
        safe = len(text)
        if not final:
            if text.endswith("\ufffd"):
                safe = len(text.rstrip("\ufffd"))
            safe -= self._held_back(text, safe)
        if not text.startswith(self.emitted):
            # Decoding is not prefix-stable for this tokenizer here; never re-send what was sent.
            common = 0
            while common < min(len(text), len(self.emitted)) and text[common] == self.emitted[common]:
                common += 1
            self.emitted = text[:common]
        if safe <= len(self.emitted):
            return ""
        piece = text[len(self.emitted):safe]
        self.emitted += piece
        return piece
