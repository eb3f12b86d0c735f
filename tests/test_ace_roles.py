import pytest

from lightning_lab.ace.playbook import Delta
from lightning_lab.ace.roles import (
    is_specific,
    parse_answer,
    parse_curation,
    parse_json_lenient,
    parse_reflection,
)
from lightning_lab.ace.tasks import Item

FINANCE = Item("f1", "What was the percent change in revenue from 2022 to 2023?", "12.5",
               "| year | revenue |\n| 2022 | 400 |\n| 2023 | 450 |", "finance")
IOT = Item("i1", "Which sensor shows an anomaly?", "T3", "T1: 21 C, T2: 22 C, T3: 95 C", "iot")


@pytest.mark.parametrize("text, expected", [
    ('{"a": 1, "b": [1, 2]}', {"a": 1, "b": [1, 2]}),
    ('Sure! Here it is:\n```json\n{"a": "x"}\n```\nHope it helps.', {"a": "x"}),
    ("{'a': 'x', 'b': True, 'c': None}", {"a": "x", "b": True, "c": None}),
    ('{"a": [1, 2,], "b": 3,}', {"a": [1, 2], "b": 3}),
    ('{a: 1, b-c: "two"}', {"a": 1, "b-c": "two"}),
    ('{"lessons": ["one", "two"', {"lessons": ["one", "two"]}),  # cut off by max_new_tokens
    ('{"text": "a } inside a string"}', {"text": "a } inside a string"}),
    ("[1, 2]", [1, 2]),
])
def test_parse_json_lenient_reads_what_small_models_write(text, expected):
    assert parse_json_lenient(text) == expected


@pytest.mark.parametrize("text", ["", "no json here", "{{{{", '{"a": }', "{" * 5000])
def test_parse_json_lenient_returns_none_rather_than_raising(text):
    assert parse_json_lenient(text) is None


def test_parse_answer_line_format_keeps_only_shown_ids():
    output = "Reasoning: (450-400)/400 = 0.125.\nBullets used: for-00001, str-00007\nAnswer: 12.5%"
    answer = parse_answer(output, FINANCE, shown_ids=["for-00001", "str-00002"])
    assert (answer.answer, answer.bullet_ids, answer.parsed) == ("12.5%", ["for-00001"], True)


def test_parse_answer_json_and_missing_answer():
    answer = parse_answer('{"reasoning": "r", "bullet_ids": ["iot-00004"], "final_answer": "T3"}', IOT, ["iot-00004"])
    assert (answer.answer, answer.bullet_ids, answer.parsed) == ("T3", ["iot-00004"], True)
    answer = parse_answer("I think the revenue went up a lot, by 12.5 or so", FINANCE, [])
    assert answer.parsed is False
    assert answer.answer == "12.5"  # numeric gold: the last number is still scored


def test_parse_reflection_json_lines_and_garbage():
    shown = ["for-00001", "str-00002"]
    reflection = parse_reflection(
        '{"diagnosis": "divided by the new value", "bullet_tags": {"for-00001": "harmful", "zzz-00009": "helpful",'
        ' "str-00002": "great"}, "lessons": ["Percent change divides by the 2022 revenue, the earlier year."]}', shown)
    assert reflection.parsed and reflection.tags == {"for-00001": "harmful"}
    assert reflection.lessons == ["Percent change divides by the 2022 revenue, the earlier year."]
    # the ACE reference code's list form of tags
    reflection = parse_reflection('{"bullet_tags": [{"id": "str-00002", "tag": "helpful"}]}', shown)
    assert reflection.tags == {"str-00002": "helpful"}
    # no JSON at all: tags and lessons from lines
    reflection = parse_reflection("The model erred.\nfor-00001: helpful\nLesson: T3 above 90 C is an anomaly.", shown)
    assert reflection.parsed and reflection.tags == {"for-00001": "helpful"}
    assert reflection.lessons == ["T3 above 90 C is an anomaly."]
    assert not parse_reflection("blah blah", shown).parsed


def test_parse_curation_json_list_and_lines():
    curation = parse_curation('{"operations": [{"op": "add", "section": "Formulas", "content": "x over y"},'
                              ' {"type": "REMOVE", "id": "str-00002"}, "junk"]}')
    assert curation.parsed and curation.deltas == [Delta("ADD", "x over y", "formulas"), Delta("REMOVE", "", "strategies", "str-00002")]
    curation = parse_curation("ADD [mistakes]: Do not divide by the later year.\nUPDATE str-00003: New wording.\nREMOVE str-00004")
    assert curation.deltas == [Delta("ADD", "Do not divide by the later year.", "mistakes"),
                               Delta("UPDATE", "New wording.", "strategies", "str-00003"),
                               Delta("REMOVE", "", "strategies", "str-00004")]
    assert not parse_curation("I would add a lesson about revenue.").parsed


@pytest.mark.parametrize("lesson, item, specific", [
    ("Always double-check your work before answering.", FINANCE, False),
    ("Read the question carefully and think step by step.", FINANCE, False),
    ("Make sure the final answer is correct and clear.", IOT, False),
    ("Be careful.", IOT, False),  # too short to name anything
    ("Percent change divides the difference by the earlier year's revenue.", FINANCE, True),
    ("A reading far above the other sensors marks the anomaly.", IOT, True),
    ("Answer with the value rounded to 1 decimal.", FINANCE, True),  # a number is specific
    ("Watch out for the trick in this kind of question, it is subtle.", IOT, False),
    ("The correct answer is 10800 for this one.", FINANCE, False),  # a verdict on one reply, not a rule
    ("The model's answer is wrong about the revenue.", FINANCE, False),
    ('The answer to the question "What is the mean of the readings?" is "24"', IOT, False),  # seen from SmolLM2
])
def test_generic_lessons_are_filtered(lesson, item, specific):
    assert is_specific(lesson, item) is specific


@pytest.mark.parametrize("lesson, item, leaks", [
    ("The answer is 12.5 for this table.", FINANCE, True),
    ("Percent change (450 - 400) / 400 gives 12.50 percent.", FINANCE, True),
    ("Percent change divides by the earlier year's revenue.", FINANCE, False),
    ("The faulty sensor here is T3, far above the rest.", IOT, True),
    ("The faulty sensor reads far above the rest.", IOT, False),
    ("For 'Answer anomaly or normal' questions, a reading far above the rest is an anomaly.",
     Item("i2", "Is there an anomaly? Answer anomaly or normal.", "anomaly", "", "iot"), False),  # named by the question
])
def test_lessons_that_state_the_gold_answer_are_caught(lesson, item, leaks):
    from lightning_lab.ace.roles import leaks_answer

    assert leaks_answer(lesson, item) is leaks
