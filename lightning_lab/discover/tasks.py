"""Discovery tasks: small verifiable problems for test-time training, their splits, verifier and files.

A discovery task is a question of the synthetic corpus's grammar (`lightning_lab.data.corpus`: the
model pretrained in phase B reads exactly this format) plus its exact answer:

    Q: sort the digits 7 1 4 A: 1 4 7
    Q: remove repeated letters from "abcabd" A: abcd                  (dedup: never in the corpus)

Families are the corpus's ten (add, sub, mul, sort_digits, sort_words, reverse, count, uppercase,
replace, drop_vowels) plus ``dedup``, which only the held-out split has. Difficulty 1..3 sets operand
size or length (`corpus.DIFFICULTY_SIZES`); by default the train split stops at difficulty 2, so both
a family and a difficulty are seen only at test time.

Verifier (`verify`): the model's answer is its completion up to the first newline, stripped. It is
*exact* when it equals the reference character for character (order matters: "3 1 2" is not "1 2 3").
The partial-credit reward is ``1 - levenshtein(answer, reference) / max(len(answer), len(reference))``
in [0, 1]: 1.0 only for the exact answer, lower the more edits it is away. Echoing the question's input
cannot score 1.0: a task whose answer appears verbatim among the question's words (``0 plus 5``, digits
already sorted, a palindrome to reverse) is never drawn.

Files (`write_task_files`, `read_tasks`): JSONL, one task per line with ``id``, ``family``, ``difficulty``,
``question``, ``answer`` (``prompt`` is derived: `prompt_for`). Reading checks every line and names
``file:line`` for a malformed one, including an answer that does not solve its question.

    lab data discovery-tasks --seed 0 --out-train data/discover/train.jsonl --out-heldout data/discover/heldout.jsonl
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from lightning_lab.data import corpus
from lightning_lab.data.io import DataError, read_jsonl
from lightning_lab.errors import UserError, check_new_output_file

HELDOUT_ONLY_FAMILIES: tuple[str, ...] = ("dedup",)
FAMILIES: tuple[str, ...] = corpus.TASK_FAMILIES + HELDOUT_ONLY_FAMILIES
DIFFICULTIES: tuple[int, ...] = corpus.DIFFICULTIES
DEDUP_LENGTHS = (4, 7, 10)  # string length per difficulty, drawn from few letters so repeats are common
DEDUP_PATTERN = re.compile(r'remove repeated letters from "([a-z]+)"')
MAX_DRAWS = 10_000  # redraws per task before a split is declared impossible (too many tasks asked for)


@dataclass
class SplitConfig:
    """What `make_splits` draws: every (family, difficulty) cell of each split gets `per_cell` tasks."""

    seed: int = 0
    train_per_cell: int = 4
    heldout_per_cell: int = 2
    train_families: tuple[str, ...] = corpus.TASK_FAMILIES
    train_difficulties: tuple[int, ...] = (1, 2)
    heldout_families: tuple[str, ...] = FAMILIES
    heldout_difficulties: tuple[int, ...] = DIFFICULTIES

    def __post_init__(self) -> None:
        for key in ("train_families", "heldout_families"):
            unknown = [family for family in getattr(self, key) if family not in FAMILIES]
            if unknown:
                raise UserError(f"{key}: unknown families {unknown}; choose from {list(FAMILIES)}")
        for key in ("train_difficulties", "heldout_difficulties"):
            unknown = [level for level in getattr(self, key) if level not in DIFFICULTIES]
            if unknown:
                raise UserError(f"{key}: difficulties must be in {list(DIFFICULTIES)}, got {unknown}")
        if self.train_per_cell < 0 or self.heldout_per_cell < 1:
            raise UserError(f"train_per_cell={self.train_per_cell}, heldout_per_cell={self.heldout_per_cell}: "
                            "need train >= 0 and held-out >= 1 tasks per cell")


@dataclass(frozen=True)
class DiscoveryTask:
    id: str
    family: str
    difficulty: int
    question: str
    answer: str

    @property
    def prompt(self) -> str:
        """The text both arms of a comparison give the model (``Q: <question> A:``)."""
        return corpus.prompt_for(self.question)


# ---- generating -----------------------------------------------------------------------------------


def make_question(family: str, difficulty: int, rng: random.Random) -> tuple[str, str]:
    """One (question, answer) of `family` at `difficulty`: the corpus's generator, plus ``dedup``."""
    if family != "dedup":
        return corpus.make_task(family, difficulty, rng)
    while True:  # redraw until a letter repeats, so the input itself is a wrong answer
        text = "".join(rng.choice(corpus.COUNT_ALPHABET) for _ in range(DEDUP_LENGTHS[difficulty - 1]))
        if len(set(text)) < len(text):
            return f'remove repeated letters from "{text}"', dedup(text)


def dedup(text: str) -> str:
    """Each letter at its first occurrence, in order."""
    return "".join(dict.fromkeys(text))


def solve(question: str) -> str:
    """The exact answer of a discovery question (ValueError when it is not one)."""
    match = DEDUP_PATTERN.fullmatch(question)
    return dedup(match.group(1)) if match else corpus.solve(question)


def answer_in_question(question: str, answer: str) -> bool:
    """True when the answer's words appear in a row among the question's words (quotes and '?' removed):
    copying that part of the question would solve the task."""
    words, target = question.replace('"', " ").replace("?", " ").split(), answer.split()
    return any(words[start:start + len(target)] == target for start in range(len(words) - len(target) + 1))


def make_splits(config: SplitConfig) -> dict[str, list[DiscoveryTask]]:
    """{"train": [...], "heldout": [...]}: disjoint questions (held-out first, so its cells are always full)."""
    rng = random.Random(f"lightning_lab.discover.tasks:{config.seed}")
    seen: set[str] = set()
    splits: dict[str, list[DiscoveryTask]] = {}
    plan = {"heldout": (config.heldout_families, config.heldout_difficulties, config.heldout_per_cell),
            "train": (config.train_families, config.train_difficulties, config.train_per_cell)}
    for split, (families, difficulties, per_cell) in plan.items():
        tasks = []
        for family in families:
            for difficulty in difficulties:
                for index in range(per_cell):
                    question, answer = draw_new(family, difficulty, rng, seen)
                    tasks.append(DiscoveryTask(f"{split}-{family}-d{difficulty}-{index}", family, difficulty,
                                               question, answer))
        splits[split] = tasks
    return {"train": splits["train"], "heldout": splits["heldout"]}


def draw_new(family: str, difficulty: int, rng: random.Random, seen: set[str]) -> tuple[str, str]:
    """A question not in `seen` whose answer is not a copy of part of it; adds it to `seen`."""
    for _ in range(MAX_DRAWS):
        question, answer = make_question(family, difficulty, rng)
        if question not in seen and not answer_in_question(question, answer):
            seen.add(question)
            return question, answer
    raise UserError(f"cannot draw another distinct {family} task at difficulty {difficulty}: "
                    "ask for fewer tasks per cell")


# ---- verifying --------------------------------------------------------------------------------------


def extract_answer(completion: str) -> str:
    """The answer a completion gives: its first line, stripped."""
    return completion.split("\n", 1)[0].strip()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions) between two strings; no dependency has it here."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def verify(completion: str, reference: str) -> tuple[bool, float]:
    """(exact, reward) of a completion against the reference answer (module docstring)."""
    answer = extract_answer(completion)
    if answer == reference:
        return True, 1.0
    return False, 1.0 - levenshtein(answer, reference) / max(len(answer), len(reference), 1)


# ---- files and pretraining text ------------------------------------------------------------------------


def pretraining_text(task: DiscoveryTask) -> str:
    """The task as one line of the pretraining corpus (``Q: ... A: <answer>``)."""
    return corpus.format_line(task.question, task.answer)


def write_task_files(config: SplitConfig, out_train: str | Path, out_heldout: str | Path) -> dict[str, int]:
    """Write both splits as JSONL (neither file may exist); returns the task count per split."""
    paths = {"train": check_new_output_file(out_train, "--out-train"),
             "heldout": check_new_output_file(out_heldout, "--out-heldout")}
    if paths["train"].absolute() == paths["heldout"].absolute():
        raise UserError(f"--out-train and --out-heldout are the same file {paths['train']}")
    splits = make_splits(config)
    for split, path in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("x", encoding="utf-8") as f:
            for task in splits[split]:
                f.write(json.dumps(asdict(task)) + "\n")
    return {split: len(tasks) for split, tasks in splits.items()}


def read_tasks(path: str | Path) -> list[DiscoveryTask]:
    """The tasks of a JSONL file, every line checked (DataError naming file:line)."""
    tasks, ids = [], set()
    for line, record in read_jsonl(path):
        where = f"{path}:{line}"
        missing = [key for key in ("id", "family", "difficulty", "question", "answer") if key not in record]
        if missing:
            raise DataError(f"{where}: missing {', '.join(missing)}")
        if not all(isinstance(record[key], str) for key in ("id", "family", "question", "answer")) \
                or isinstance(record["difficulty"], bool) or not isinstance(record["difficulty"], int):
            raise DataError(f"{where}: id, family, question and answer must be strings, difficulty an integer")
        if record["family"] not in FAMILIES:
            raise DataError(f"{where}: unknown family {record['family']!r}; choose from {list(FAMILIES)}")
        if record["difficulty"] not in DIFFICULTIES:
            raise DataError(f"{where}: difficulty {record['difficulty']} is not one of {list(DIFFICULTIES)}")
        try:
            expected = solve(record["question"])
        except ValueError:
            raise DataError(f"{where}: {record['question']!r} is not a discovery question") from None
        if expected != record["answer"]:
            raise DataError(f"{where}: answer {record['answer']!r} does not solve {record['question']!r} "
                            f"(expected {expected!r})")
        if record["id"] in ids:
            raise DataError(f"{where}: duplicate id {record['id']!r}")
        ids.add(record["id"])
        tasks.append(DiscoveryTask(record["id"], record["family"], record["difficulty"], record["question"],
                                   record["answer"]))
    if not tasks:
        raise DataError(f"{path}: no tasks")
    return tasks
