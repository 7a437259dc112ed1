"""Draft tokens for speculative decoding, looked up in the episode's own context.

Prompt lookup decoding (Saxena, 2023; vLLM's "ngram" speculator): an agent's next tokens
often repeat something already in its context (an action it took before, an item name the
observation just listed), so the tokens that followed the latest earlier occurrence of the
context's last n tokens are a good guess for what comes next. The rollout engine feeds such
a guess after the token it has just sampled and keeps the longest prefix the model agrees
with; the guess never changes which tokens are produced, only how many come from one forward.

The index maps every n-gram (n <= `max_ngram`) to the latest position it ended at, so a
lookup costs a few dictionary probes, not a scan of the context.
"""

from __future__ import annotations


class PromptLookup:
    def __init__(self, max_ngram: int = 3) -> None:
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self._last_end: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram + 1)]

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, ids: list[int]) -> None:
        """Append tokens to the context."""
        for token in ids:
            # An n-gram is indexed once a token follows it, so the context's own last n-gram
            # never matches itself.
            end = len(self.tokens) - 1
            for n in range(1, min(self.max_ngram, end + 1) + 1):
                self._last_end[n][tuple(self.tokens[end - n + 1 : end + 1])] = end
            self.tokens.append(token)

    def draft(self, after: int, limit: int) -> list[int]:
        """Up to `limit` tokens to follow the context and then the token `after`: those that
        followed the latest earlier occurrence of the longest matching suffix (n-grams ending
        in `after`, n = max_ngram down to 1); [] when nothing matches."""
        if limit <= 0:
            return []
        for n in range(min(self.max_ngram, len(self.tokens) + 1), 0, -1):
            end = self._last_end[n].get((*self.tokens[len(self.tokens) - n + 1 :], after))
            if end is not None:
                return self.tokens[end + 1 : end + 1 + limit]
        return []
