"""Layer 2's pieces on their own: the instruction text, where a wire format puts it, and the detector."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from guardrail.errors import ConfigError
from guardrail.layers.instruction import RefusalDetector, build_instruction
from guardrail.protocols import Conversation, JSONFields, OpenAIChat
from guardrail.scenario import parse_scenario
from guardrail.settings import DEFAULT_INSTRUCTION, DEFAULT_REFUSAL

DOCUMENT = parse_scenario(
    "# Harbour Dental Assistant\n"
    "Answers patients' questions about the Harbour dental practice.\n"
    "Appointments and prices only.\n"
    "## Scenarios\n"
    "- Booking or moving an appointment\n"
    "- Prices of check-ups and treatments\n"
)
INSTRUCTION = "Only talk about dentistry. Otherwise say: No."
QUESTION = {"role": "user", "content": "Can I move my check-up to Friday?"}


# The instruction text -----------------------------------------------------------------------------


def test_the_default_template_names_the_assistant_its_purpose_and_the_refusal() -> None:
    text = build_instruction(DOCUMENT, DEFAULT_INSTRUCTION, DEFAULT_REFUSAL)

    assert text == (
        "You are Harbour Dental Assistant: Answers patients' questions about the Harbour dental practice. "
        "Appointments and prices only. If the user's question is unrelated to this, reply exactly: "
        + DEFAULT_REFUSAL
    )


def test_scenarios_are_listed_one_bullet_a_line_and_braces_stay_literal() -> None:
    template = "{title} {{json}}\nTopics:\n{scenarios}\nElse: {refusal}"

    text = build_instruction(DOCUMENT, template, "Sorry.")

    assert text == (
        "Harbour Dental Assistant {json}\nTopics:\n"
        "- Booking or moving an appointment\n- Prices of check-ups and treatments\nElse: Sorry."
    )


# Injection in the OpenAI format -------------------------------------------------------------------


def inject(payload: dict[str, Any]) -> dict[str, Any]:
    body = orjson.dumps(payload)
    protocol = OpenAIChat()
    sent = protocol.inject(protocol.parse(body), body, INSTRUCTION)
    result: dict[str, Any] = orjson.loads(sent)
    return result


def test_without_a_system_message_one_is_inserted_first() -> None:
    payload = {"model": "m", "temperature": 0.2, "messages": [QUESTION], "stream": True}

    sent = inject(payload)

    assert sent == {**payload, "messages": [{"role": "system", "content": INSTRUCTION}, QUESTION]}


def test_an_existing_system_string_keeps_the_owners_text_first() -> None:
    owner = {"role": "system", "content": "You are Molly, the practice's friendly assistant.", "name": "x"}
    payload = {"model": "m", "messages": [owner, QUESTION]}

    sent = inject(payload)

    merged = {**owner, "content": f"{owner['content']}\n\n{INSTRUCTION}"}
    assert sent["messages"] == [merged, QUESTION]


def test_an_existing_list_of_parts_gets_a_text_part_at_the_end() -> None:
    parts = [{"type": "text", "text": "You are Molly."}, {"type": "text", "text": "Be brief."}]
    payload = {"messages": [{"role": "system", "content": parts}, QUESTION]}

    sent = inject(payload)

    assert sent["messages"][0]["content"] == [*parts, {"type": "text", "text": INSTRUCTION}]
    assert sent["messages"][1:] == [QUESTION]


def test_a_developer_message_is_merged_into_like_a_system_one() -> None:
    developer = {"role": "developer", "content": "Answer in French."}
    payload = {"messages": [QUESTION, developer]}  # not first: it is still the one merged into

    sent = inject(payload)

    assert sent["messages"] == [QUESTION, {**developer, "content": f"Answer in French.\n\n{INSTRUCTION}"}]


def test_only_the_first_system_message_is_merged_into() -> None:
    first = {"role": "system", "content": "One."}
    second = {"role": "system", "content": "Two."}

    sent = inject({"messages": [first, QUESTION, second]})

    assert [m["content"] for m in sent["messages"]] == [f"One.\n\n{INSTRUCTION}", QUESTION["content"], "Two."]


@pytest.mark.parametrize("content", [None, "", "  \n"])
def test_an_empty_system_message_gets_the_instruction_alone(content: str | None) -> None:
    sent = inject({"messages": [{"role": "system", "content": content}, QUESTION]})

    assert sent["messages"][0] == {"role": "system", "content": INSTRUCTION}


def test_a_system_message_with_unusable_content_is_left_for_the_upstream_to_judge() -> None:
    odd = {"role": "system", "content": 42}

    sent = inject({"messages": [odd, QUESTION]})

    assert sent["messages"] == [{"role": "system", "content": INSTRUCTION}, odd, QUESTION]


def test_injection_leaves_the_parsed_conversation_as_the_client_sent_it() -> None:
    system = {"role": "system", "content": "Owner."}
    body = orjson.dumps({"messages": [system, QUESTION]})
    protocol = OpenAIChat()
    conversation = protocol.parse(body)

    protocol.inject(conversation, body, INSTRUCTION)

    assert conversation.payload == {"messages": [system, QUESTION]}


def test_a_conversation_made_by_hand_has_its_body_parsed() -> None:
    body = orjson.dumps({"messages": [QUESTION]})

    sent = OpenAIChat().inject(Conversation(text=QUESTION["content"]), body, INSTRUCTION)

    assert orjson.loads(sent)["messages"][0] == {"role": "system", "content": INSTRUCTION}


def test_the_payload_is_not_part_of_a_conversations_identity() -> None:
    conversation = OpenAIChat().parse(orjson.dumps({"model": "m", "messages": [QUESTION]}))

    assert conversation.payload is not None
    assert conversation == Conversation(text=QUESTION["content"], model="m")
    assert "payload" not in repr(conversation)


def test_a_body_too_deep_to_write_back_goes_on_as_it_came() -> None:
    deep = b"[" * 300 + b"]" * 300
    body = b'{"messages": [{"role": "user", "content": "hi"}], "extra": ' + deep + b"}"
    protocol = OpenAIChat()

    assert protocol.inject(protocol.parse(body), body, INSTRUCTION) is body


def test_a_custom_json_api_has_no_system_message_and_its_body_is_returned_unchanged() -> None:
    protocol = JSONFields("message", "reply")
    body = b'{"message": "Can I move my check-up?"}'

    assert protocol.inject(protocol.parse(body), body, INSTRUCTION) is body


# The refusal detector -----------------------------------------------------------------------------

REFUSAL = "I'm sorry, this question is off-topic. I cannot answer that."


@pytest.mark.parametrize(
    "reply",
    [
        REFUSAL,
        REFUSAL.upper(),
        "i'm SORRY, this question is off-topic. i cannot answer that.",
        "I\u2019m sorry, this question is off-topic. I cannot answer that.",  # curly apostrophe
        "\u201cI\u2019m sorry, this question is off-topic. I cannot answer that.\u201d",
        "\u2018I'm sorry, this question is off-topic. I cannot answer that.\u2019",
        f'"{REFUSAL}"',
        f"'{REFUSAL}'",
        f"`{REFUSAL}`",
        f"**{REFUSAL}**",
        f"_{REFUSAL}_",
        f"  \n\t{REFUSAL}  \n",
        "I'm  sorry,\nthis question is   off-topic.\n\nI cannot answer that.",
        REFUSAL.removesuffix("."),  # its own full stop left off
        REFUSAL.removesuffix(".") + "!",
        f"{REFUSAL} However, I can help you find a flat to rent.",
        f"{REFUSAL}\n\nIs there anything about our listings I can help with?",
        REFUSAL.removesuffix(".") + ", but I can help with viewings.",
    ],
)
def test_the_refusal_is_recognised_however_it_is_written(reply: str) -> None:
    assert RefusalDetector(REFUSAL).matches(reply)


@pytest.mark.parametrize(
    "reply",
    [
        None,
        "",
        "   ",
        f"The assistant would say: {REFUSAL}",  # mentioned mid-text is not a refusal
        f"Sure! Here is the recipe. (If it were off topic I'd say '{REFUSAL}')",
        "I'm sorry, this question is off-topic.",  # only the start of the sentence
        "I'm sorry, this question is off-topic. I cannot answer thatcher's question.",
        "I'm sorry, the flat on Station Road has been let.",
        "Yes, the flat is still available.",
    ],
)
def test_other_replies_are_not_refusals(reply: str | None) -> None:
    assert not RefusalDetector(REFUSAL).matches(reply)


def test_a_long_reply_is_judged_by_its_start() -> None:
    detector = RefusalDetector(REFUSAL)

    assert detector.matches(REFUSAL + " More." * 100_000)
    assert not detector.matches("No. " + "x" * 1_000_000 + REFUSAL)


def test_a_refusal_without_its_own_punctuation_still_matches_one_with_it() -> None:
    assert RefusalDetector("Off topic, sorry").matches("Off topic, sorry. Try another question.")


def test_a_refusal_in_another_script_is_recognised() -> None:
    refusal = "\u7533\u3057\u8a33\u3042\u308a\u307e\u305b\u3093\u3002"  # Japanese, ending in "。"

    detector = RefusalDetector(refusal)

    assert detector.matches(refusal.removesuffix("\u3002") + "\u3000\u4ed6\u306b\u4f55\u304b")
    assert not detector.matches("\u306f\u3044\u3002")


def test_a_refusal_of_only_quotes_and_punctuation_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no words"):
        RefusalDetector('"..."')
