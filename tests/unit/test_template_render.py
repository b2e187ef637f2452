"""Rendering a template: values are data, variables are validated, the sandbox holds."""
from pathlib import Path

import pytest
from jinja2.exceptions import SecurityError

from meshkit.errors import InvalidArgument
from services.template.catalog import TemplateCatalog, load_template_file
from services.template.render import render_template, sandbox_environment
from services.template.settings import shipped_templates_dir


@pytest.fixture(scope="module")
def catalog() -> TemplateCatalog:
    return TemplateCatalog.from_dir(shipped_templates_dir())


def violations_of(raised: pytest.ExceptionInfo) -> dict[str, str]:
    return {v.field: v.description for v in raised.value.violations}


def write_template(folder: Path, body: str) -> Path:
    path = folder / "probe" / "1.0.0.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('id = "probe"\nversion = "1.0.0"\ndescription = "a probe"\n' + body)
    return path


def test_a_value_that_looks_like_jinja_comes_out_literally(catalog):
    value = "{{7*7}} {% if 1 %}x{% endif %}"
    messages = render_template(catalog.resolve("finance_question"), {"question": value})
    assert messages[-1].content == value
    assert "49" not in messages[-1].content


def test_renders_system_and_user_messages_with_the_variables(catalog):
    messages = render_template(
        catalog.resolve("translation"), {"text": "Good morning", "target_language": "French"}
    )
    assert [m.role for m in messages] == ["system", "user"]
    assert "into French" in messages[0].content
    assert "Good morning" in messages[1].content


def test_an_absent_optional_variable_is_omitted(catalog):
    template = catalog.resolve("finance_question", "1.1.0")
    plain = render_template(template, {"question": "What is a bond?"})
    pitched = render_template(template, {"question": "What is a bond?", "audience": "retired teachers"})
    assert "audience" not in plain[0].content
    assert "Pitch the answer to this audience: retired teachers" in pitched[0].content


def test_a_missing_required_variable_is_named(catalog):
    with pytest.raises(InvalidArgument) as raised:
        render_template(catalog.resolve("finance_question"), {})
    assert "question" in violations_of(raised)["template.variables.question"]
    assert "question" in raised.value.message


def test_an_unknown_variable_is_rejected(catalog):
    with pytest.raises(InvalidArgument) as raised:
        render_template(catalog.resolve("finance_question"), {"question": "q", "questoin": "typo"})
    assert list(violations_of(raised)) == ["template.variables.questoin"]


def test_a_value_over_its_size_limit_is_rejected(catalog):
    template = catalog.resolve("finance_question")
    limit = template.variable("question").max_chars
    render_template(template, {"question": "x" * limit})
    with pytest.raises(InvalidArgument) as raised:
        render_template(template, {"question": "x" * (limit + 1)})
    assert str(limit) in violations_of(raised)["template.variables.question"]


@pytest.mark.parametrize("value, kind", [(None, "null"), (["a"], "list"), ({"a": 1}, "struct")])
def test_a_value_of_the_wrong_type_is_rejected(catalog, value, kind):
    with pytest.raises(InvalidArgument) as raised:
        render_template(catalog.resolve("finance_question"), {"question": value})
    assert kind in violations_of(raised)["template.variables.question"]


def test_numbers_and_booleans_are_accepted_and_whole_numbers_render_without_a_decimal(catalog):
    template = catalog.resolve("finance_question", "1.1.0")
    messages = render_template(template, {"question": 42.0, "jurisdiction": 2.5, "audience": True})
    assert messages[-1].content == "42"
    assert "answer for 2.5" in messages[0].content


def test_every_violation_is_reported_at_once(catalog):
    with pytest.raises(InvalidArgument) as raised:
        render_template(catalog.resolve("translation"), {"text": None, "colour": "red"})
    assert set(violations_of(raised)) == {
        "template.variables.text",
        "template.variables.colour",
        "template.variables.target_language",
    }


def test_the_number_of_variables_is_capped(catalog):
    variables = {f"v{i}": "x" for i in range(10)} | {"question": "q"}
    with pytest.raises(InvalidArgument) as raised:
        render_template(catalog.resolve("finance_question"), variables, max_variables=5)
    assert list(violations_of(raised)) == ["template.variables"]


def test_the_sandbox_stops_a_template_reaching_python_internals(tmp_path):
    path = write_template(tmp_path, '[[messages]]\nrole = "user"\ncontent = "{{ \'\'.__class__.__mro__ }}"\n')
    template = load_template_file(path, sandbox_environment())
    with pytest.raises(SecurityError):
        render_template(template, {})


def test_the_sandbox_stops_a_template_mutating_its_values(tmp_path):
    body = (
        '[[variables]]\nname = "words"\nmax_chars = 10\ndescription = "d"\n'
        '[[messages]]\nrole = "user"\n'
        'content = "{{ words.replace(\'a\', \'b\') }}{% set _ = {}.update(a=1) %}"\n'
    )
    template = load_template_file(write_template(tmp_path, body), sandbox_environment())
    with pytest.raises(SecurityError):
        render_template(template, {"words": "aaa"})
