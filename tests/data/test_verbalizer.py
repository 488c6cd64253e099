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


def test_fields_can_be_restricted():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['label'\]"):
        Verbalizer.parse("{{label}} x", ["input"])


def test_requests_fill_input_or_a_json_object_of_fields():
    assert Verbalizer.parse("Q: {{input}}").render_request("why") == "Q: why"
    multi = Verbalizer.parse("C: {{context}} Q: {{question}}")
    assert multi.render_request('{"context": "sky", "question": "color?"}') == "C: sky Q: color?"
    with pytest.raises(ValueError, match="send `text` as a JSON object"):
        multi.render_request("plain text")
    with pytest.raises(ValueError, match=r"no string field\(s\) \['question'\]"):
        multi.render_request('{"context": "sky"}')
