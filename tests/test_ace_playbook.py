import random

import pytest

from lightning_lab.ace.playbook import Delta, Entry, Playbook, word_count
from lightning_lab.data.io import DataError

NOW = "2026-12-04T00:00:00+00:00"


def sample_playbook(**settings) -> Playbook:
    playbook = Playbook(**settings)
    playbook.add("Percent change is (new - old) / old times 100.", "formulas", NOW)
    playbook.add("Sensor T3 above 90 C means overheating.", "iot facts", NOW)
    playbook.add("Vitamin C deficiency causes scurvy.", "strategies", NOW)
    return playbook


def test_render_uses_the_reference_format_grouped_by_section():
    playbook = sample_playbook()
    playbook.tag({"for-00001": "helpful", "iot-00002": "harmful"}, NOW)
    assert playbook.render() == (
        "## formulas\n[for-00001] helpful=1 harmful=0 :: Percent change is (new - old) / old times 100.\n"
        "## iot_facts\n[iot-00002] helpful=0 harmful=1 :: Sensor T3 above 90 C means overheating.\n"
        "## strategies\n[str-00003] helpful=0 harmful=0 :: Vitamin C deficiency causes scurvy.")


def test_save_load_round_trip_keeps_entries_counters_and_next_id(tmp_path):
    playbook = sample_playbook()
    playbook.tag({"str-00003": "helpful"})
    playbook.apply([Delta("REMOVE", id="iot-00002")], NOW)
    path = tmp_path / "pb" / "playbook.jsonl"
    playbook.save(path)
    loaded = Playbook.load(path)
    assert loaded.entries == playbook.entries
    assert loaded.next_id == 4  # a removed id is never handed out again
    assert loaded.add("new lesson about ratios", now=NOW).id == "str-00004"
    assert [p.name for p in path.parent.iterdir()] == ["playbook.jsonl"]  # no temporary file left


def test_load_names_file_and_line_of_a_bad_entry(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"playbook": 1, "next_id": 2}\n{"id": "str-00001", "content": "x"}\n{"id": "bad", "content": "y"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:3: a playbook entry needs"):
        Playbook.load(path)
    path.write_text('{"id": "str-00001", "content": "x"}\n{"id": "str-00001", "content": "y"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: duplicate id 'str-00001' \(first on line 1\)"):
        Playbook.load(path)


def test_near_duplicates_merge_into_the_first_id_and_sum_counters_distinct_entries_stay():
    playbook = Playbook(entries=[
        Entry("str-00001", "strategies", "Percent change is the difference divided by the old value.", 2, 1),
        Entry("str-00002", "strategies", "Scurvy comes from a lack of vitamin C.", 1, 0),
        Entry("str-00003", "strategies", "Percent change is the difference divided by the old value!", 3, 2),
        Entry("for-00004", "formulas", "percent change is the difference divided by the old value", 1, 0),
    ])
    report = playbook.refine()
    assert report.merged == 2
    assert playbook.ids == ["str-00001", "str-00002"]
    first = playbook.get("str-00001")
    assert (first.helpful, first.harmful) == (6, 3)
    assert first.content == "Percent change is the difference divided by the old value."


def test_prune_removes_entries_whose_helpful_minus_harmful_is_low():
    playbook = sample_playbook(prune_below=-2)
    for _ in range(2):
        playbook.tag({"iot-00002": "harmful"})
    playbook.tag({"iot-00002": "helpful", "str-00003": "harmful"})  # iot: 1 - 2 = -1 stays
    assert playbook.refine().pruned == 0
    playbook.tag({"iot-00002": "harmful"})  # 1 - 3 = -2
    assert playbook.refine().pruned == 1
    assert playbook.ids == ["for-00001", "str-00003"]


def test_token_budget_holds_after_many_updates():
    rng = random.Random(0)
    words = ["revenue", "sensor", "dose", "margin", "vibration", "ratio", "kidney", "battery", "equity", "voltage",
             "fever", "drift", "asset", "quarter", "threshold", "infection"]
    playbook = Playbook(token_budget=120, merge_threshold=0.9)
    for step in range(200):
        deltas = [Delta("ADD", " ".join(rng.choices(words, k=8)) + f" case {step}", rng.choice(["a", "b"]))]
        if playbook.entries and step % 3 == 0:
            deltas.append(Delta("UPDATE", " ".join(rng.choices(words, k=12)), id=rng.choice(playbook.ids)))
        playbook.apply(deltas, NOW)
        playbook.tag({rng.choice(playbook.ids): rng.choice(["helpful", "harmful"])})
        assert word_count(playbook.render()) <= 120
    assert len(playbook) >= 3  # the budget trims, it does not empty the playbook
    # what stays is what scored best: the over-budget rule drops the lowest helpful - harmful first
    assert min(e.score for e in playbook.entries) >= -1


def test_budget_drops_lowest_score_first_and_uses_the_given_token_count():
    playbook = sample_playbook(token_budget=10**6)
    playbook.tag({"for-00001": "helpful", "str-00003": "helpful"})
    playbook.token_budget = len(playbook.render()) - 1  # count characters: one entry must go
    playbook.count_tokens = len
    assert playbook.refine().over_budget == 1
    assert playbook.ids == ["for-00001", "str-00003"]


def test_delta_merge_is_deterministic_whatever_the_order():
    deltas = [Delta("ADD", "Convert thousands to millions before comparing.", "formulas"),
              Delta("ADD", "A stuck sensor repeats the same value for hours.", "iot"),
              Delta("UPDATE", "Percent change: (new - old) / old * 100, rounded to one decimal.", id="for-00001"),
              Delta("UPDATE", "A later second update of the same id.", id="for-00001"),
              Delta("REMOVE", id="iot-00002"),
              Delta("UPDATE", "Update of a removed id.", id="iot-00002"),
              Delta("REMOVE", id="str-00099"),
              Delta("ADD", "Convert thousands to millions before comparing.", "formulas"),  # duplicate: once
              Delta("MOVE", "unknown op")]
    results = []
    for seed in range(5):
        shuffled = deltas[:]
        random.Random(seed).shuffle(shuffled)
        playbook = sample_playbook()
        report = playbook.apply(shuffled, NOW)
        results.append((playbook.render(), report.added, report.updated, report.removed, sorted(report.skipped)))
    assert all(result == results[0] for result in results)
    render, added, updated, removed, skipped = results[0]
    assert (added, updated, removed) == (2, 1, 1)
    assert len(skipped) == 4  # second update, update of a removed id, unknown id, unknown op
    assert "[for-00001] helpful=0 harmful=0 :: A later second update of the same id." in render
    assert "iot-00002" not in render


def test_counters_update_from_reflector_tags_and_unknown_ids_are_returned():
    playbook = sample_playbook()
    unknown = playbook.tag({"for-00001": "helpful", "iot-00002": "neutral", "str-00003": "harmful",
                            "xyz-00009": "helpful", "for-00001x": "helpful"})
    assert [(e.helpful, e.harmful) for e in playbook.entries] == [(1, 0), (0, 0), (0, 1)]
    assert unknown == ["xyz-00009", "for-00001x"]


def test_retrieve_ranks_by_relevance_and_keeps_playbook_order():
    playbook = sample_playbook()
    playbook.add("Revenue growth percent uses the earlier year as the base.", "formulas", NOW)
    chosen = playbook.retrieve("What is the percent change in revenue from 2022 to 2023?", k=2)
    assert [e.id for e in chosen] == ["for-00001", "for-00004"]
    assert len(playbook.retrieve("anything", k=10)) == 4


def test_retrieve_by_a_given_embedding():
    playbook = sample_playbook()
    vectors = {"query": [1.0, 0.0], "Percent change is (new - old) / old times 100.": [0.0, 1.0],
               "Sensor T3 above 90 C means overheating.": [0.9, 0.1], "Vitamin C deficiency causes scurvy.": [0.5, 0.5]}
    chosen = playbook.retrieve("query", k=2, embed=lambda texts: [vectors[t] for t in texts])
    assert [e.id for e in chosen] == ["iot-00002", "str-00003"]
