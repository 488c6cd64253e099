"""Verbalizer templates: "Review: {{input}} Sentiment:" rendered from a record's fields."""

from __future__ import annotations

import json
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
    def parse(cls, template: str, allowed_fields: Iterable[str] | None = None) -> Verbalizer:
        """Check `template`; placeholders may name any record field (or only
        `allowed_fields` when given) except `output`."""
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
        unknown = [] if allowed_fields is None else [n for n in fields if n not in allowed_fields]
        if unknown:
            raise ValueError(
                f"`verbalizer` names unknown field(s) {unknown}; valid fields are {list(allowed_fields)}."
            )
        return cls(template=template, fields=fields)

    def render_request(self, text: str) -> str:
        """The model input for an inference request: `text` fills {{input}}; a template
        naming other fields takes `text` as a JSON object of them."""
        if self.fields == ("input",):
            return self.render({"input": text})
        try:
            values = json.loads(text)
        except json.JSONDecodeError:
            values = None
        if not isinstance(values, dict):
            raise ValueError(
                f"this model's verbalizer names {list(self.fields)}: send `text` as a JSON object "
                f"with those fields, e.g. {json.dumps(dict.fromkeys(self.fields, '...'))}."
            )
        missing = [name for name in self.fields if not isinstance(values.get(name), str)]
        if missing:
            raise ValueError(f"`text` has no string field(s) {missing} that the verbalizer names.")
        return self.render(values)

    def render(self, record: Mapping[str, str]) -> str:
        def fill(match: re.Match) -> str:
            value = record.get(match.group(1))
            if value is None:
                raise ValueError(f"record has no `{match.group(1)}` for the verbalizer: {record!r}")
            return str(value)

        return _PLACEHOLDER.sub(fill, self.template)
