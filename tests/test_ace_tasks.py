import json

import pytest

from lightning_lab.ace.tasks import TASKS, extract_answer, load_items, score_answer, task_path
from lightning_lab.data.io import DataError


@pytest.mark.parametrize("name", list(TASKS))
def test_registered_tasks_load_with_their_domain_and_score_their_own_gold(name):
    path, domain = task_path(name)
    items = load_items(path)
    assert len(items) >= 24 and len({item.id for item in items}) == len(items)
    assert {item.domain for item in items} == {domain}
    for item in items:
        assert item.context and item.question.strip()
        assert score_answer(extract_answer(f"Reasoning: ...\nAnswer: {item.answer}.", item.answer), item.answer)


def test_unknown_task_names_the_known_ones():
    with pytest.raises(DataError, match="unknown task 'nope'; known tasks: tatqa_tiny, medqa_tiny, iot_tiny"):
        task_path("nope")


def test_seed_format_is_read_as_it_is_and_errors_name_the_item(tmp_path):
    path = tmp_path / "seed.json"
    path.write_text(json.dumps([{"id": 1, "question": "Q?", "answer": 72, "context": "ctx", "domain": "finance"},
                                {"id": "b", "question": "R?", "answer": "yes"}]))
    items = load_items(path)
    assert [(i.id, i.answer, i.context, i.domain) for i in items] == [("1", "72", "ctx", "finance"), ("b", "yes", "", "")]
    assert {i.domain for i in load_items(path, domain="medical")} == {"medical"}
    path.write_text(json.dumps([{"id": "a", "question": "Q?", "answer": ""}]))
    with pytest.raises(DataError, match=r"seed.json: item 0: missing or empty 'answer'"):
        load_items(path)
    path.write_text('[{"id": "a",\n "question": }]')
    with pytest.raises(DataError, match=r"seed.json:2: malformed JSON"):
        load_items(path)


def test_gsm8k_from_a_path(gsm8k_path):
    items = load_items(gsm8k_path)
    assert items[0].answer == "72" and items[0].domain == "math" and items[0].context == ""
    dev, test = load_items(gsm8k_path, split="dev"), load_items(gsm8k_path, split="test")
    assert len(dev) + len(test) == len(items) and not {i.id for i in dev} & {i.id for i in test}


def test_a_split_of_a_task_file_is_refused(tmp_path):
    with pytest.raises(DataError, match="dataset_split: 'dev' is for JSONL files"):
        load_items(task_path("iot_tiny")[0], split="dev")


@pytest.mark.parametrize("output, gold, correct", [
    ("Answer: 12.5%", "12.5", True),
    ("Answer: 12.46", "12.5", True),  # the same value, rounded by the model
    ("Answer: 12.6", "12.5", False),
    ("Answer: 30.4", "30", False),  # an integer gold is matched exactly
    ("The answer is $1,080.", "1080", True),
    ("First 5 then 7 then 72", "72", True),  # no answer line: the last number
    ("Answer: The Vitamin C.", "vitamin C", True),
    ("Answer: vitamin D", "vitamin C", False),
    ("anomaly\nbecause T3 spikes", "anomaly", True),
    ("**Answer:** T3", "T3", True),
    ('Reasoning: ...\nAnswer: The answer is "spike"', "spike", True),
])
def test_scoring(output, gold, correct):
    assert score_answer(extract_answer(output, gold), gold) is correct
