"""Category outputs: map generated text to one of a fixed set of labels (Ludwig's
category extractor), for classification-style models."""

from __future__ import annotations

from dataclasses import dataclass

import re2

MATCHES = ("contains", "exact", "regex")
MAX_LABELS = 64
MAX_LABEL_CHARS = 256


def _compile(pattern: str):
    """A case-insensitive RE2 pattern: linear-time matching, so no pattern can make a
    request (or the server) wait on backtracking."""
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error as err:
        raise ValueError(
            f"`labels` pattern {pattern!r} is not a valid RE2 regular expression "
            f"({_reason(err)}); RE2 has no backreferences or lookaround."
        ) from None


def _reason(err: Exception) -> str:
    reason = err.args[0] if err.args else err
    return reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)


@dataclass(frozen=True)
class LabelRule:
    """How generated text becomes a label.

    exact: the whole text (stripped, case-insensitive) is the label; contains: the
    label mentioned first in the text; regex: entries are `label=pattern` and the label
    whose pattern matches first wins. `fallback` when nothing matches (else "").
    """

    labels: tuple[str, ...]
    patterns: tuple  # compiled RE2 patterns, with label_match regex
    match: str
    fallback: str

    @classmethod
    def parse(cls, labels, match: str | None, fallback: str | None) -> LabelRule | None:
        if not labels:
            if match or fallback:
                raise ValueError("`label_match` and `label_fallback` need `labels`.")
            return None
        if isinstance(labels, str):
            raise TypeError("`labels` must be a list of strings, got a single string.")
        match = (match or "contains").lower()
        if match not in MATCHES:
            raise ValueError(f"`label_match` must be one of {list(MATCHES)}, got {match!r}.")
        if len(labels) > MAX_LABELS:
            raise ValueError(f"`labels` may hold at most {MAX_LABELS} entries, got {len(labels)}.")
        names, patterns = [], []
        for entry in labels:
            if not isinstance(entry, str) or not entry:
                raise ValueError(f"`labels` entries must be non-empty strings, got {entry!r}.")
            if len(entry) > MAX_LABEL_CHARS:
                raise ValueError(
                    f"`labels` entries may be at most {MAX_LABEL_CHARS} characters, got one "
                    f"of {len(entry)}."
                )
            if match == "regex":
                name, sep, pattern = entry.partition("=")
                if not sep or not name or not pattern:
                    raise ValueError(
                        f"with label_match regex, `labels` entries are label=pattern, got {entry!r}."
                    )
                patterns.append(_compile(pattern))
                names.append(name)
            else:
                names.append(entry)
        return cls(tuple(names), tuple(patterns), match, fallback or "")

    def extract(self, text: str) -> str:
        if self.match == "exact":
            wanted = text.strip().lower()
            return next((label for label in self.labels if label.lower() == wanted), self.fallback)
        if self.match == "regex":
            found = [(m.start(), i) for i, p in enumerate(self.patterns) if (m := p.search(text))]
        else:
            lowered = text.lower()
            found = [(lowered.find(label.lower()), i) for i, label in enumerate(self.labels)]
            found = [(position, i) for position, i in found if position >= 0]
        return self.labels[min(found)[1]] if found else self.fallback
