"""README.md stands alone and stays true: its configuration reference is the schema's, it names no
file outside the repository, and its first lines are the two commands a newcomer runs."""

from __future__ import annotations

import re
from pathlib import Path

from butterfly import configdoc
from butterfly.config import Config

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def test_the_configuration_reference_is_generated_from_the_schema() -> None:
    assert configdoc.render(README) == README, "README.md is stale: run `python -m butterfly.configdoc`"
    assert configdoc.main(["--check"]) == 0


def test_the_reference_names_every_key_with_its_default_and_meaning() -> None:
    import dataclasses

    reference = configdoc.reference()
    for section in dataclasses.fields(Config):
        table = section.metadata.get("table")
        if table is None:
            continue
        assert f"### [{section.name}]" in reference
        for key in dataclasses.fields(table):
            if "check" in key.metadata:
                row = next(line for line in reference.splitlines() if line.startswith(f"| `{key.name}` |"))
                cells = [c.strip() for c in row.strip("|").split(" | ")]
                assert len(cells) == 4 and all(cells), row  # accepts, default and meaning all filled in


def test_a_changed_schema_makes_the_readme_stale(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(configdoc, "reference", lambda: "### [cluster]\n\nsomething else\n")
    assert configdoc.render(README) != README


def test_no_paths_outside_the_repository() -> None:
    assert "../" not in README
    assert "/work/" not in README
    # Every repository path it names exists.
    for path in set(
        re.findall(r"`((?:scripts|examples|packaging|tests|butterfly|bench|systemd|csrc)/[^`\s]*)", README)
    ):
        assert (REPO / path.rstrip("/")).exists() or any(REPO.glob(path)), path


def test_the_first_lines_are_the_two_commands() -> None:
    first_block = README.split("```")[1]
    assert "scripts/demo.sh" in first_block and "scripts/test.sh" in first_block
    assert README.index("```") < 40
