from __future__ import annotations

from pathlib import Path

import pytest

from guardrail.errors import GuardrailError, ScenarioError
from guardrail.scenario import ScenarioDocument, load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(
    p
    for p in [*(ROOT / "scenarios").glob("*.md"), *(ROOT / "benchmarks" / "hwu64" / "bots").glob("*.md")]
    if p.name != "README.md"
)

FULL = """\
# Garden Centre Helper
Answers questions about plants, tools and opening hours
of our garden centre.

## Scenarios
- Choosing plants for a sunny or shady garden
- Opening hours and directions to the shop
  for customers coming by car
* Ordering tools online and delivery times

## Examples
- which roses grow well in shade?
+ are you open on bank holidays

## Off-topic examples
- what's the score in the cricket
- write me a poem about the sea
"""


def error_for(text: str, path: str = "bot.md") -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, path)
    return info.value


def test_shipped_documents_are_found() -> None:
    names = {p.name for p in SHIPPED}
    assert {"real_estate.md", "online_bank.md", "telecom_support.md", "alarm.md", "weather.md"} <= names
    assert len(SHIPPED) >= 16


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_document_parses(path: Path) -> None:
    document = load_scenario(path)
    assert document.title
    assert document.description
    assert len(document.scenarios) >= 5
    assert all(item.strip() == item and item for item in document.scenarios + document.examples)
    assert document.path == str(path)
    assert document.name == path.stem


def test_real_estate_document_contents() -> None:
    document = load_scenario(ROOT / "scenarios" / "real_estate.md")
    assert document.title == "Real Estate Agency Assistant"
    assert document.description.startswith("Helps buyers, sellers, landlords and tenants")
    assert "Booking, rescheduling or cancelling a property viewing or open house" in document.scenarios
    assert (
        document.examples[0]
        == "do you have any 2 bed flats for rent near the city centre under 1200 a month?"
    )
    assert document.off_topic == ()


def test_all_parts_are_extracted() -> None:
    document = parse_scenario(FULL, "garden.md")
    assert document.title == "Garden Centre Helper"
    assert document.description == (
        "Answers questions about plants, tools and opening hours of our garden centre."
    )
    assert document.scenarios == (
        "Choosing plants for a sunny or shady garden",
        "Opening hours and directions to the shop for customers coming by car",
        "Ordering tools online and delivery times",
    )
    assert document.examples == ("which roses grow well in shade?", "are you open on bank holidays")
    assert document.off_topic == ("what's the score in the cricket", "write me a poem about the sea")
    assert document.name == "garden"
    assert len(document.digest) == 16


def test_parse_without_path_is_named_by_title() -> None:
    document = parse_scenario("# Tiny Bot\n## Scenarios\n- one thing\n")
    assert document.path == "<string>"
    assert document.name == "Tiny Bot"
    assert document.description == ""


def test_section_names_are_case_insensitive_and_allow_a_colon() -> None:
    document = parse_scenario("# T\n## SCENARIOS:\n- a\n## off-topic EXAMPLES\n- b\n")
    assert document.scenarios == ("a",)
    assert document.off_topic == ("b",)


def test_html_comments_and_blank_lines_are_ignored() -> None:
    document = parse_scenario("\n<!-- draft -->\n# T\n\n<!-- note -->\n## Scenarios\n\n- a\n\n- b\n")
    assert document.scenarios == ("a", "b")


def test_continuation_lines_join_the_bullet_above() -> None:
    text = "# T\n## Scenarios\n- first part\n  second part\n\tthird part\n- next\n"
    assert parse_scenario(text).scenarios == ("first part second part third part", "next")


def test_indented_line_after_a_blank_line_is_not_a_continuation() -> None:
    error = error_for("# T\n## Scenarios\n- a\n\n  b\n")
    assert error.line == 5
    assert str(error).startswith("bot.md:5: ")


def test_digest_follows_the_text() -> None:
    a = parse_scenario("# T\n## Scenarios\n- a\n")
    b = parse_scenario("# T\n## Scenarios\n- b\n")
    assert a.digest != b.digest
    assert a.digest == parse_scenario("# T\n## Scenarios\n- a\n").digest


def test_document_is_frozen() -> None:
    document = parse_scenario("# T\n## Scenarios\n- a\n")
    assert isinstance(document, ScenarioDocument)
    with pytest.raises(AttributeError):
        document.title = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        pytest.param("Just some text\n# T\n## Scenarios\n- a\n", 1, "title", id="no-title"),
        pytest.param("\n\n#Title\n## Scenarios\n- a\n", 3, "title", id="title-without-space"),
        pytest.param("", 1, "empty", id="empty-document"),
        pytest.param("\n   \n<!-- only a comment -->\n", 1, "empty", id="blank-document"),
        pytest.param("# T\n## Scenarios\n- a\n-\n", 4, "empty bullet", id="empty-bullet"),
        pytest.param("# T\n## Scenarios\n- a\n-    \n", 4, "empty bullet", id="empty-bullet-spaces"),
        pytest.param("# T\n## Scenarios\n- a\n## FAQ\n- b\n", 4, "unknown section", id="unknown-section"),
        pytest.param(
            "# T\n## Scenarios\n- a\n## Examples\n- b\n## Scenarios\n- c\n",
            6,
            "twice",
            id="duplicate-section",
        ),
        pytest.param(
            "# T\n## Scenarios\n- Book a Viewing\n- other\n- book a viewing\n",
            5,
            "duplicate bullet",
            id="duplicate-bullet",
        ),
        pytest.param(
            "# T\n## Scenarios\n- a\nnot a bullet\n", 4, "expected a '- ' bullet", id="not-a-bullet"
        ),
        pytest.param("# T\n## Scenarios\n-a\n", 3, "expected a '- ' bullet", id="bullet-without-space"),
        pytest.param("# T\n## Scenarios\n- a\n### Details\n- b\n", 4, "unexpected heading", id="h3-heading"),
        pytest.param(
            "# T\nabout\n# Another title\n## Scenarios\n- a\n", 3, "unexpected heading", id="second-title"
        ),
    ],
)
def test_errors_name_file_and_line(text: str, line: int, words: str) -> None:
    error = error_for(text)
    assert isinstance(error, GuardrailError)
    assert error.path == "bot.md"
    assert error.line == line
    assert str(error).startswith(f"bot.md:{line}: ")
    assert words in str(error)


def test_duplicate_bullet_names_the_first_occurrence() -> None:
    error = error_for("# T\n## Scenarios\n- Book a Viewing\n- other\n- book a viewing\n")
    assert "first on line 3" in str(error)


def test_same_bullet_in_two_sections_is_allowed() -> None:
    document = parse_scenario("# T\n## Scenarios\n- booking a viewing\n## Examples\n- booking a viewing\n")
    assert document.scenarios == document.examples == ("booking a viewing",)


def test_unknown_section_lists_the_known_ones() -> None:
    message = str(error_for("# T\n## Scenarios\n- a\n## FAQ\n"))
    assert "'## Scenarios'" in message
    assert "'## Examples'" in message


def test_missing_scenarios_section_names_the_file_and_its_end() -> None:
    error = error_for("# T\nSome description\n## Examples\n- a\n")
    assert str(error).startswith("bot.md:4:")
    assert error.line == 4
    assert "'## Scenarios'" in str(error)


def test_empty_scenarios_section_is_an_error() -> None:
    error = error_for("# T\n## Scenarios\n\n## Examples\n- a\n")
    assert str(error).startswith("bot.md")
    assert "at least one" in str(error)


def test_empty_scenarios_section_names_the_heading_line() -> None:
    error = error_for("# T\n## Scenarios\n\n## Examples\n- a\n")
    assert error.line == 2


def test_duplicate_bullet_written_over_two_lines_is_rejected() -> None:
    error_for("# T\n## Scenarios\n- Booking a viewing on Saturday\n- Booking a viewing\n  on Saturday\n")


def test_bullets_that_differ_only_after_a_continuation_are_not_duplicates() -> None:
    document = parse_scenario("# T\n## Scenarios\n- Booking a viewing\n  on Saturday\n- Booking a viewing\n")
    assert document.scenarios == ("Booking a viewing on Saturday", "Booking a viewing")


def test_load_scenario_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "garden.md"
    path.write_text(FULL, encoding="utf-8")
    document = load_scenario(path)
    assert document == parse_scenario(FULL, str(path))
    assert document.name == "garden"


def test_load_scenario_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.md"
    path.write_text("# T\n## Scenarios\n- a\n## Nope\n", encoding="utf-8")
    with pytest.raises(ScenarioError, match=r"broken\.md:4: unknown section"):
        load_scenario(path)


def test_load_scenario_missing_file_is_a_scenario_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.md"
    with pytest.raises(ScenarioError) as info:
        load_scenario(missing)
    assert not isinstance(info.value, OSError)
    assert isinstance(info.value.__cause__, OSError)
    assert str(info.value).startswith(str(missing))
    assert "cannot read" in str(info.value)


def test_load_scenario_on_a_directory_is_a_scenario_error(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path)


def test_load_scenario_invalid_utf8_is_a_scenario_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.md"
    path.write_bytes("# Caf\xe9 bot\n## Scenarios\n- coffee\n".encode("latin-1"))
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(path)


def test_load_scenario_accepts_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.md"
    path.write_bytes(b"\xef\xbb\xbf# Bot\n## Scenarios\n- a\n")
    assert load_scenario(path).title == "Bot"
