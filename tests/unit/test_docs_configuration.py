"""docs/configuration.md is what docs/gen/configuration.py makes of the settings classes now, and every
variable the code reads is on it."""
from __future__ import annotations

import re
from pathlib import Path

from docs.gen import configuration

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("cli", "meshkit", "services", "gateway", "promptcache", "modelfiles")
SERVICES = ("gateway", "template", "tokenizer", "cache", "inference")


def _documented_names() -> set[str]:
    names = {name for name, _, _ in configuration.OTHER_VARIABLES}
    for title, cls in configuration.settings_classes():
        for row in configuration.rows(title, cls):
            for name in row.variables:
                if "<SERVICE>" in name:
                    names |= {name.replace("<SERVICE>", service.upper()) for service in SERVICES}
                else:
                    names.add(name)
    return names


def _names_read_by_the_code() -> set[str]:
    """Every NLPMESH_* name in the code's text, and every name it reads through os.environ; a name ending
    in `_` is a prefix the code completes (an f-string)."""
    found = set()
    for folder in SOURCE_DIRS:
        for path in (REPO_ROOT / folder).rglob("*.py"):
            text = path.read_text()
            found |= set(re.findall(r"NLPMESH_[A-Z0-9_]*", text))
            found |= set(re.findall(r"environ(?:\.get)?[\[(]\s*\"([A-Z][A-Z0-9_]*)\"", text))
    return found


def _pattern(documented: str) -> str:
    """`NLPMESH_REDIS_<USER>_PASSWORD` as a regular expression."""
    return "".join("[A-Z0-9_]+" if part.startswith("<") else re.escape(part)
                   for part in re.split(r"(<[A-Z]+>)", documented))


def _covers(documented: str, name: str) -> bool:
    if name.endswith("_"):  # a prefix the code completes
        return documented.startswith(name)
    return re.fullmatch(_pattern(documented), name) is not None


def _is_read(documented: str, read: set[str]) -> bool:
    if "<" in documented and documented.split("<")[0] in read:
        return True
    return any(re.fullmatch(_pattern(documented), name) for name in read)


def test_the_committed_page_is_what_the_generator_makes_of_the_settings_now():
    assert configuration.PAGE.read_text() == configuration.render(), (
        "docs/configuration.md is stale: run `make docs` (or python -m docs.gen.configuration)")


def test_every_setting_is_on_the_page_with_a_meaning():
    page = configuration.PAGE.read_text()
    for title, cls in configuration.settings_classes():
        rows = configuration.rows(title, cls)
        assert [row.config_key.split("`")[-2] for row in rows] == configuration.declared_fields(cls)
        for row in rows:
            assert row.meaning, f"{cls.__name__}.{row.config_key}: no description, comment or MEANINGS entry"
            for name in row.variables:
                assert f"`{name}`" in page


def test_each_variable_is_listed_once():
    """Once per setting it sets: REDIS_URL, read by three services, is on each of their rows."""
    seen = []
    for title, cls in configuration.settings_classes():
        seen += [(name, cls.service) for row in configuration.rows(title, cls) for name in row.variables]
    seen += [(name, "") for name, _, _ in configuration.OTHER_VARIABLES]
    assert len(seen) == len(set(seen)), sorted(name for name in seen if seen.count(name) > 1)
    names = [name for name, _ in seen]
    shared = {name for name in names if names.count(name) > 1}
    assert shared == {"REDIS_URL"}, shared


def test_meanings_kept_in_the_generator_are_only_for_fields_the_code_does_not_explain():
    classes = {cls.__name__: cls for _, cls in configuration.settings_classes()}
    engine = configuration.engine_comments()
    for class_name, meanings in configuration.MEANINGS.items():
        cls = classes[class_name]
        comments = configuration.field_comments(cls)
        for name in meanings:
            assert name in configuration.declared_fields(cls), f"{class_name}.{name} no longer exists"
            assert not cls.model_fields[name].description, f"{class_name}.{name} has a description now"
            assert name not in comments, f"{class_name}.{name} has a comment now: drop it from MEANINGS"
            if class_name == "InferenceSettings":
                assert name not in engine, f"EngineOptions explains {name}: drop it from MEANINGS"


def test_every_variable_the_code_reads_is_documented_and_the_hand_kept_ones_are_read():
    documented = _documented_names()
    read = _names_read_by_the_code()
    missing = sorted(name for name in read if not any(_covers(doc, name) for doc in documented))
    assert not missing, f"read by the code, not in docs/configuration.md: {missing}"
    for name, _, _ in configuration.OTHER_VARIABLES:
        assert _is_read(name, read), f"{name} is documented but no code reads it"


def test_defaults_name_no_path_of_this_machine():
    page = configuration.PAGE.read_text()
    assert str(REPO_ROOT) not in page
    assert str(Path.home()) not in page
