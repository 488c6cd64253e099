"""Verbalizer templates: "Review: {{input}} Sentiment:" rendered from a record's fields."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_PLACEHOLDER = re.compile(r"{{\s*([A-Za-z_][A-Za-z0-9_]*)\s*}}")
_BRACES = re.compile(r"{{|}}")


@dataclass(frozen=True)
class Verbalizer:
    """A validated template. `fields` are the placeholders it names, in order."""

    template: str
    fields: tuple[str, ...]

    @classmethod
    def parse(cls, template: str, allowed_fields: Iterable[str] = ("input",)) -> Verbalizer:
        allowed = tuple(allowed_fields)
        if not isinstance(template, str) or not template:
            raise ValueError(f"`verbalizer` must be a non-empty template string, got {template!r}.")
        fields = tuple(dict.fromkeys(_PLACEHOLDER.findall(template)))
        # Every "{{" / "}}" must belong to a well-formed placeholder.
        if len(_BRACES.findall(_PLACEHOLDER.sub("", template))) > 0:
            raise ValueError(
                f"`verbalizer` {template!r} has unbalanced or malformed braces; placeholders "
                "look like {{input}}."
            )
        if not fields:
            raise ValueError(
                f"`verbalizer` {template!r} names no field; include a placeholder such as "
                "{{input}} so the record's text reaches the model."
            )
        if "output" in fields:
            raise ValueError(
                "`verbalizer` may not use {{output}}: the output is what the model learns to "
                "generate and is unknown at inference."
            )
        unknown = [name for name in fields if name not in allowed]
        if unknown:
            raise ValueError(
                f"`verbalizer` names unknown field(s) {unknown}; valid fields are {list(allowed)}."
            )
        return cls(template=template, fields=fields)

    def render(self, record: Mapping[str, str]) -> str:
        def fill(match: re.Match) -> str:
            value = record.get(match.group(1))
            if value is None:
                raise ValueError(f"record has no `{match.group(1)}` for the verbalizer: {record!r}")
            return str(value)

        return _PLACEHOLDER.sub(fill, self.template)
