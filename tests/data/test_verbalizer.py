import pytest

from caikit_tuning.data import Verbalizer


def test_renders_input_into_template():
    verbalizer = Verbalizer.parse("Review: {{input}} Sentiment:")
    assert verbalizer.fields == ("input",)
    assert verbalizer.render({"input": "a fine film"}) == "Review: a fine film Sentiment:"


def test_whitespace_inside_braces_and_repeats():
    verbalizer = Verbalizer.parse("{{ input }} / {{input}}")
    assert verbalizer.render({"input": "x"}) == "x / x"


def test_multi_field_template_when_fields_are_allowed():
    verbalizer = Verbalizer.parse("Q: {{question}} C: {{context}}", ["question", "context"])
    assert verbalizer.render({"question": "why", "context": "because"}) == "Q: why C: because"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("no placeholder here", "names no field"),
        ("{{label}} x", "unknown field"),
        ("{{output}} {{input}}", "may not use {{output}}"),
        ("{{input}} {{oops", "malformed braces"),
        ("", "non-empty template"),
    ],
)
def test_bad_templates_are_refused_with_the_reason(template, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        Verbalizer.parse(template)


def test_missing_field_at_render_time():
    verbalizer = Verbalizer.parse("{{input}}")
    with pytest.raises(ValueError, match="no `input`"):
        verbalizer.render({"other": "x"})
