"""Discovery tasks, verifier, entropic objective maths and the PUCT archive (no model)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from lightning_lab.cli import main as lab
from lightning_lab.data.corpus import parse_line
from lightning_lab.data.io import DataError
from lightning_lab.discover import objectives
from lightning_lab.discover.archive import Archive
from lightning_lab.discover.tasks import (FAMILIES, HELDOUT_ONLY_FAMILIES, DiscoveryTask, SplitConfig, make_splits,
                                         pretraining_text, read_tasks, solve, verify)

# ---- tasks and splits ----------------------------------------------------------------------------------


def test_splits_are_disjoint_and_hold_out_a_family_and_a_difficulty():
    splits = make_splits(SplitConfig(seed=3))
    train, heldout = splits["train"], splits["heldout"]
    assert {t.question for t in train}.isdisjoint({t.question for t in heldout})
    assert {t.family for t in heldout} == set(FAMILIES)
    assert set(HELDOUT_ONLY_FAMILIES) <= {t.family for t in heldout} - {t.family for t in train}
    assert 3 in {t.difficulty for t in heldout} - {t.difficulty for t in train}
    assert len(train) == 10 * 2 * 4 and len(heldout) == 11 * 3 * 2
    for task in train + heldout:
        assert solve(task.question) == task.answer
        assert verify(task.answer, task.answer) == (True, 1.0)
    assert make_splits(SplitConfig(seed=3)) == splits  # same seed, same tasks
    assert make_splits(SplitConfig(seed=4)) != splits


def test_no_task_is_solved_by_echoing_its_input():
    for task in make_splits(SplitConfig(seed=0, train_per_cell=20, heldout_per_cell=20))["heldout"]:
        operand = task.question.rsplit('"', 2)[-2] if '"' in task.question else task.question.split(" ", 3)[-1]
        assert verify(operand, task.answer)[1] < 1.0, task


def test_pretraining_text_is_a_corpus_line():
    task = DiscoveryTask("x", "dedup", 1, 'remove repeated letters from "abca"', "abc")
    assert pretraining_text(task) == 'Q: remove repeated letters from "abca" A: abc'
    assert parse_line(pretraining_text(task)) == (task.question, task.answer)
    assert task.prompt == 'Q: remove repeated letters from "abca" A:'


# ---- the verifier ------------------------------------------------------------------------------------------


def test_verifier_rejects_the_replica_failure_cases():
    # sort: the unsorted input, or the right digits in another order, is not the answer
    assert verify("7 1 4", "1 4 7") == (False, pytest.approx(1 - 3 / 5))  # three substitutions
    assert not verify("4 1 7", "1 4 7")[0] and verify("4 1 7", "1 4 7")[1] < 1
    # reverse: a scrambled reversal, and the input echoed back
    assert not verify("cabd", "dcba")[0] and verify("cabd", "dcba")[1] < 1
    assert not verify("abcd", "dcba")[0] and verify("abcd", "dcba")[1] < 1
    # dedup: the input echoed back
    assert not verify("abcabd", "abcd")[0] and verify("abcabd", "abcd")[1] < 1
    # exact, with what the model adds after the line, is accepted; anything else on the line is not
    assert verify(" 1 4 7\nQ: what is", "1 4 7") == (True, 1.0)
    assert not verify("1 4 7 .", "1 4 7")[0]
    assert verify("", "1 4 7") == (False, 0.0)


def test_partial_credit_is_monotone_in_edits_and_never_one_when_wrong():
    rng = random.Random(0)
    reference = "abcdefghij"
    previous = 1.0
    answer = list(reference)
    for position in range(len(reference)):  # one more substitution each time
        answer[position] = "z"
        exact, reward = verify("".join(answer), reference)
        assert not exact and 0.0 <= reward < previous
        previous = reward
    for _ in range(200):
        guess = "".join(rng.choice("abcz ") for _ in range(rng.randint(0, 12)))
        exact, reward = verify(guess, reference)
        assert 0.0 <= reward <= 1.0 and (reward == 1.0) == exact == (guess.strip() == reference)


# ---- task files ----------------------------------------------------------------------------------------


def test_discovery_tasks_command_writes_files_that_read_back(tmp_path, capsys):
    train, heldout = tmp_path / "t.jsonl", tmp_path / "h.jsonl"
    args = ["data", "discovery-tasks", "--seed", "1", "--out-train", str(train), "--out-heldout", str(heldout),
            "--train-per-cell", "1", "--heldout-per-cell", "1"]
    assert lab(args) == 0
    assert [t.id for t in read_tasks(heldout)] == [t.id for t in make_splits(
        SplitConfig(seed=1, train_per_cell=1, heldout_per_cell=1))["heldout"]]
    assert len(read_tasks(train)) == 20
    assert lab(args) == 2  # nothing is overwritten
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("line, message", [
    ("{not json", "malformed JSON"),
    ('{"id": "a", "family": "add", "difficulty": 1, "question": "what is 2 plus 3?"}', "missing answer"),
    ('{"id": "a", "family": "add", "difficulty": 1, "question": "what is 2 plus 3?", "answer": "6"}',
     "does not solve"),
    ('{"id": "a", "family": "nope", "difficulty": 1, "question": "what is 2 plus 3?", "answer": "5"}',
     "unknown family"),
    ('{"id": "a", "family": "add", "difficulty": "1", "question": "what is 2 plus 3?", "answer": "5"}',
     "difficulty an integer"),
])
def test_malformed_task_file_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "tasks.jsonl"
    good = json.dumps({"id": "g", "family": "reverse", "difficulty": 1, "question": 'reverse "abc"', "answer": "cba"})
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(DataError, match=f"{path}:3: .*{message}"):
        read_tasks(path)


# ---- entropic objective ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rewards", [[0.0, 0.2, 0.5, 1.0], [0.1, 0.1, 0.3, 0.9, 0.4, 0.0, 0.0, 0.7],
                                     [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
def test_adaptive_beta_hits_ln2_and_ignores_shift_and_scale(rewards):
    beta = objectives.adaptive_beta(rewards)
    assert abs(objectives.kl_to_uniform(rewards, beta) - math.log(2)) < 1e-4
    weights = objectives.entropic_weights(rewards, beta)
    for shift, scale in [(5.0, 1.0), (-3.0, 0.01), (0.0, 250.0)]:
        moved = [shift + scale * r for r in rewards]
        moved_beta = objectives.adaptive_beta(moved)
        assert abs(objectives.kl_to_uniform(moved, moved_beta) - math.log(2)) < 1e-4
        assert moved_beta == pytest.approx(beta / scale, rel=1e-6)
        assert torch.allclose(objectives.entropic_weights(moved, moved_beta), weights, rtol=1e-6)


def test_adaptive_beta_edge_cases():
    assert objectives.adaptive_beta([0.3, 0.3, 0.3]) == 0.0
    # three of four tied at the best: KL never exceeds ln(4/3) < ln 2, so beta is as large as allowed
    beta = objectives.adaptive_beta([0.0, 0.5, 0.5, 0.5])
    assert beta == objectives.MAX_NORMALISED_BETA / 0.5
    assert objectives.entropic_weights([0.0, 0.5, 0.5, 0.5], beta)[0] == 0.0


def test_leave_one_out_weights_match_brute_force():
    rewards, beta = [0.2, 0.9, 0.5, 0.5, 0.0], 3.7
    brute = []
    for i, r in enumerate(rewards):
        others = [math.exp(beta * r_j) for j, r_j in enumerate(rewards) if j != i]
        brute.append(math.exp(beta * r) / (sum(others) / len(others)))
    assert torch.allclose(objectives.entropic_weights(rewards, beta), torch.tensor(brute, dtype=torch.float64))
    # large rewards do not overflow (exponents are shifted by their max)
    shifted = objectives.entropic_weights([r + 1000.0 for r in rewards], beta)
    assert torch.allclose(shifted, torch.tensor(brute, dtype=torch.float64))
    advantages, used = objectives.group_advantages(rewards, "entropic", beta=None)
    assert used == objectives.adaptive_beta(rewards)
    assert advantages.argmax() == 1 and advantages.argmin() == 4


def test_expected_advantages_and_kl_term():
    rewards = [1.0, 0.0, 0.5]
    assert objectives.expected_advantages(rewards).tolist() == pytest.approx([0.75, -0.75, 0.0])
    assert objectives.group_advantages(rewards, "expected", None)[1] == 0.0
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]])
    base = torch.tensor([[-1.5, -2.0], [-0.5, -1.1]])
    tokens = objectives.token_advantages(torch.tensor([0.5, -0.5]), logprobs, base, kl_coef=0.1)
    assert torch.allclose(tokens, torch.tensor([[0.5 - 0.05, 0.5], [-0.5, -0.5 - 0.1]]))
    assert objectives.token_advantages(torch.tensor([0.5, -0.5]), logprobs, None, 0.1).tolist() == \
        [[0.5, 0.5], [-0.5, -0.5]]


# ---- the archive -------------------------------------------------------------------------------------------


def test_puct_selection_on_a_hand_built_archive():
    archive = Archive(exploration=1.0, max_children=2)
    root = archive.root
    a = archive.add(root, [1], "a", 0.5)
    b = archive.add(root, [2], "b", 0.2)
    a1 = archive.add(a, [3], "a1", 0.9)
    for state, visits in ((root, 3), (a, 1), (b, 0), (a1, 0)):
        state.visits = visits
    # T = 4; ranks by reward: a1 (4), a (3), b (2), root (1) of 10
    expected = {root.id: 0.5 + 0.1 * math.sqrt(5) / 4, a.id: 0.9 + 0.3 * math.sqrt(5) / 2,
                b.id: 0.2 + 0.2 * math.sqrt(5), a1.id: 0.9 + 0.4 * math.sqrt(5)}
    scores = archive.scores()
    assert scores == pytest.approx(expected)
    assert [s.id for s in archive.select(2)] == [a1.id, a.id]
    a1.visits = 10  # T = 14: a well-explored state gives way
    assert archive.select(1)[0].id == a.id


def test_archive_keeps_the_top_children_and_round_trips():
    archive = Archive(max_children=2)
    root = archive.root
    low = archive.add(root, [1], "x", 0.1)
    archive.add(low, [5], "x5", 0.3)
    archive.add(root, [2], "y", 0.4)
    assert archive.add(root, [3], "z", 0.05) is None  # below both kept children
    assert archive.add(root, [2], "y", 0.4) is None  # the same answer again
    best = archive.add(root, [4], "w", 0.8)  # pushes out "x" and its child
    assert sorted(archive.states[c].text for c in root.children) == ["w", "y"]
    assert {s.text for s in archive.states.values()} == {"", "y", "w"}
    copy = Archive.from_dict(json.loads(json.dumps(archive.to_dict())))
    assert copy.scores() == archive.scores() and copy.states[best.id] == best
