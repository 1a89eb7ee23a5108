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
            for s in self.stop:
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe -= k
                        break
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
