"""The catalog: shipped templates load, versions resolve, bad files stop the start."""
import json
from pathlib import Path

import pytest

from meshkit.errors import InvalidArgument, NotFound
from services.template.catalog import TemplateCatalog, TemplateFileError
from services.template.settings import TemplateSettings, shipped_templates_dir

SHIPPED = {"support_answer", "finance_question", "clinical_note_summary", "tutor_explanation", "translation"}

MINIMAL = """
id = "{id}"
version = "{version}"
description = "d"

[[variables]]
name = "question"
required = true
description = "q"
max_chars = 100

[[messages]]
role = "user"
content = "{{{{ question }}}}"
"""
PROBE = MINIMAL.format(id="probe", version="1.0.0")


def write(folder: Path, template_id: str, version: str, text: str | None = None) -> Path:
    path = folder / template_id / f"{version}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text is not None else MINIMAL.format(id=template_id, version=version))
    return path


@pytest.fixture(scope="module")
def catalog() -> TemplateCatalog:
    return TemplateCatalog.from_dir(shipped_templates_dir())


def test_the_settings_default_to_the_shipped_templates():
    assert TemplateSettings().templates_dir == shipped_templates_dir()
    assert (shipped_templates_dir() / "finance_question" / "1.1.0.toml").is_file()


def test_the_five_shipped_templates_load(catalog):
    assert {t.id for t in catalog.templates()} == SHIPPED


def test_an_empty_version_resolves_to_the_newest(catalog):
    assert catalog.resolve("finance_question").version == "1.1.0"
    assert catalog.resolve("finance_question", "").version == "1.1.0"


def test_an_explicit_older_version_resolves_to_itself(catalog):
    old = catalog.resolve("finance_question", "1.0.0")
    assert old.version == "1.0.0"
    assert old.variable("audience") is None
    assert not catalog.is_newest(old)
    assert catalog.is_newest(catalog.resolve("finance_question"))


def test_newest_follows_semantic_version_order_not_string_order(tmp_path):
    for version in ("1.9.0", "1.10.0", "1.2.0"):
        write(tmp_path, "probe", version)
    catalog = TemplateCatalog.from_dir(tmp_path)
    assert catalog.resolve("probe").version == "1.10.0"
    assert [t.version for t in catalog.templates()] == ["1.2.0", "1.9.0", "1.10.0"]


def test_an_unknown_id_is_not_found(catalog):
    with pytest.raises(NotFound, match="no_such_template"):
        catalog.resolve("no_such_template")


def test_an_unknown_version_is_not_found(catalog):
    with pytest.raises(NotFound, match=r"9\.9\.9"):
        catalog.resolve("finance_question", "9.9.9")


def test_an_empty_id_is_an_invalid_argument(catalog):
    with pytest.raises(InvalidArgument) as raised:
        catalog.resolve("")
    assert raised.value.violations[0].field == "template.id"


@pytest.mark.parametrize(
    "text, problem",
    [
        ('id = "probe"\nversion = ', "TOMLDecodeError"),
        (PROBE.replace('role = "user"', 'role = "robot"'), "robot"),
        (PROBE.replace("question }}", "questoin }}"), "questoin"),
        (PROBE.replace("{{ question }}", "{% if %}"), "TemplateSyntaxError"),
        (PROBE.replace("max_chars = 100", "max_chars = 0"), "max_chars"),
        (PROBE.replace("max_chars", "max_char"), "max_char"),
        (MINIMAL.format(id="other", version="1.0.0"), "must match the path"),
    ],
)
def test_a_malformed_file_fails_loudly_naming_the_file(tmp_path, text, problem):
    write(tmp_path, "good", "1.0.0")
    bad = write(tmp_path, "probe", "1.0.0", text)
    with pytest.raises(TemplateFileError) as raised:
        TemplateCatalog.from_dir(tmp_path)
    assert str(bad) in str(raised.value)
    assert problem in str(raised.value)


def test_a_missing_folder_fails_loudly(tmp_path):
    with pytest.raises(TemplateFileError, match="does not exist"):
        TemplateCatalog.from_dir(tmp_path / "absent")


def test_two_files_for_the_same_version_fail_loudly(tmp_path):
    write(tmp_path, "probe", "1.0")
    write(tmp_path, "probe", "1.0.0")
    with pytest.raises(TemplateFileError, match="same version"):
        TemplateCatalog.from_dir(tmp_path)


def test_support_answer_1_1_declares_a_json_schema_and_1_0_stays_free_text(catalog):
    declared = catalog.resolve("support_answer", "1.1.0").response_format
    assert declared is not None and declared.kind == "json_schema"
    assert set(json.loads(declared.value)["required"]) == {"intent", "order_id", "reply"}
    assert catalog.resolve("support_answer", "1.0.0").response_format is None


@pytest.mark.parametrize(("table", "complaint"), [
    ('regex = "(("', "regex"),
    ('json_schema = "{not json"', "JSON Schema"),
    ('choice = []', "choices"),
    ('regex = "a"\nchoice = ["a"]', "exactly one"),
    ('grammar = "x"', "grammar"),
])
def test_a_response_format_guided_decoding_cannot_serve_stops_the_start_naming_the_file(tmp_path, table, complaint):
    path = write(tmp_path, "probe", "1.0.0", PROBE + f"\n[response_format]\n{table}\n")
    with pytest.raises(TemplateFileError) as refused:
        TemplateCatalog.from_dir(tmp_path)
    assert str(path) in str(refused.value) and complaint in str(refused.value)


def test_a_choice_list_in_a_template_loads_as_a_choice_format(tmp_path):
    write(tmp_path, "probe", "1.0.0", PROBE + '\n[response_format]\nchoice = ["yes", "no"]\n')
    declared = TemplateCatalog.from_dir(tmp_path).resolve("probe").response_format
    assert (declared.kind, declared.value) == ("choice", ("yes", "no"))
