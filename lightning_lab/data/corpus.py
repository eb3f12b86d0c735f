"""Synthetic pretraining corpus: question/answer lines for small verifiable tasks, mixed with prose.

A small GPT pretrained on this corpus learns the easy task families well, the hard ones partly
or not at all; the discovery suite (test-time training vs best-of-N) asks questions in the very
same grammar, so it can find tasks the model solves, nearly solves, and cannot solve.
`make_task` is the one generator of questions; `solve` re-derives the answer from the question
text alone, so an answer is a function of its question (tests check every task line with it).

Grammar (one line per document; INT is a decimal integer without sign or leading zeros,
WORD a word from `WORDS`, LETTERS lowercase a-z, L a single lowercase letter):

    line        ::= task_line | prose_line
    task_line   ::= "Q: " question " A: " answer
    question    ::= "what is " INT " plus " INT "?"                      (add)
                  | "what is " INT " minus " INT "?"                     (sub: first >= second)
                  | "what is " INT " times " INT "?"                     (mul)
                  | "sort the digits " DIGIT (" " DIGIT)*                (sort_digits)
                  | "sort the words " WORD (" " WORD)*                   (sort_words: distinct words)
                  | "reverse " '"' LETTERS '"'                           (reverse)
                  | "count the letter " '"' L '" in "' LETTERS '"'       (count)
                  | "uppercase " '"' LETTERS '"'                         (uppercase)
                  | "replace " '"' L '" with "' L '" in "' LETTERS '"'   (replace)
                  | "drop the vowels from " '"' LETTERS '"'              (drop_vowels: vowels are aeiou)
    answer      ::= INT | DIGIT (" " DIGIT)* | WORD (" " WORD)* | LETTERS in the case the task asks
    prose_line  ::= sentence (" " sentence)*      -- 1 to 3 template sentences, never starting "Q:"

A model is prompted with `prompt_for(question)` = ``Q: <question> A:`` and should continue with
`` <answer>`` and end the line (EOS once packed). The answer is never empty.

Difficulty 1..3 sets the operand size or list/string length per family (`DIFFICULTY_SIZES`).
`CorpusConfig.families` / `.difficulties` choose what the corpus contains, so families or the
hardest level can be held out of pretraining on purpose.

    lab data corpus --seed 0 --train-lines 200000 --val-lines 2000 \\
        --train-out data/corpus/train.txt --val-out data/corpus/val.txt

Same config -> byte-identical files (the generator is `random.Random` seeded from a string,
which Python hashes with SHA-512, so PYTHONHASHSEED does not matter).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lightning_lab.data.io import DataError

TASK_FAMILIES: tuple[str, ...] = (
    "add", "sub", "mul", "sort_digits", "sort_words",
    "reverse", "count", "uppercase", "replace", "drop_vowels",
)
DIFFICULTIES: tuple[int, ...] = (1, 2, 3)

# family -> size at difficulty (1, 2, 3): digits per operand, digits of each factor, or list/string length
DIFFICULTY_SIZES: dict[str, tuple] = {
    "add": (1, 2, 3),
    "sub": (1, 2, 3),
    "mul": ((1, 1), (2, 1), (2, 2)),
    "sort_digits": (3, 5, 8),
    "sort_words": (2, 4, 6),
    "reverse": (3, 5, 8),
    "count": (4, 7, 10),
    "uppercase": (3, 5, 8),
    "replace": (4, 7, 10),
    "drop_vowels": (4, 7, 10),
}

LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOWELS = "aeiou"
# count draws its string from few letters so that counts above 1 are common
COUNT_ALPHABET = "abcdef"
WORDS = (
    "apple", "bird", "cloud", "dog", "egg", "fish", "garden", "hat", "island", "jam",
    "kite", "lamp", "moon", "nest", "orange", "pencil", "queen", "river", "stone", "tree",
    "umbrella", "violin", "window", "yarn", "zebra", "boat", "candle", "door", "forest", "honey",
)

# Prose: template sentences filled from small word lists.
NAMES = ("Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jill")
NOUNS = ("fox", "teacher", "robot", "farmer", "cat", "child", "sailor", "baker", "owl", "painter")
OBJECTS = ("letter", "basket", "map", "song", "book", "cake", "lantern", "ball", "key", "picture")
ADJECTIVES = ("quiet", "happy", "small", "old", "bright", "busy", "clever", "tired", "kind", "brave")
VERBS = ("finds", "carries", "reads", "paints", "drops", "opens", "sells", "hides", "brings", "likes")
PLACES = ("near the river", "in the kitchen", "at the market", "under the bridge", "on the hill",
          "by the window", "in the garden", "at school", "in the old town", "on the boat")
TIMES = ("every morning", "after lunch", "at night", "on sunday", "in the spring", "before dinner")
TEMPLATES = (
    "The {adjective} {noun} {verb} the {object} {place}.",
    "{name} {verb} a {object} {time}.",
    "A {noun} is {adjective} when the {object} is {adjective2}.",
    "{name} and {name2} walk {place} {time}.",
    "The {object} {place} belongs to {name}.",
    "{name} says the {noun} {verb} the {object}.",
)


@dataclass
class CorpusConfig:
    seed: int = 0
    train_lines: int = 200_000
    val_lines: int = 2_000
    filler_fraction: float = 0.3  # share of prose lines; the rest are task lines
    families: tuple[str, ...] = TASK_FAMILIES
    difficulties: tuple[int, ...] = DIFFICULTIES

    def __post_init__(self) -> None:
        self.families = tuple(self.families)
        self.difficulties = tuple(int(d) for d in self.difficulties)
        unknown = [f for f in self.families if f not in TASK_FAMILIES]
        if unknown:
            raise DataError(f"unknown task families {unknown}; choose from {list(TASK_FAMILIES)}")
        bad = [d for d in self.difficulties if d not in DIFFICULTIES]
        if bad:
            raise DataError(f"difficulties must be in {list(DIFFICULTIES)}, got {bad}")
        for name, value in (("train_lines", self.train_lines), ("val_lines", self.val_lines)):
            if not isinstance(value, int) or value < 0:
                raise DataError(f"{name} must be an integer >= 0, got {value!r}")
        if not 0.0 <= self.filler_fraction <= 1.0:
            raise DataError(f"filler_fraction must be in [0, 1], got {self.filler_fraction}")
        if self.filler_fraction < 1.0 and not (self.families and self.difficulties):
            raise DataError("task lines need at least one family and one difficulty")


# ---------------------------------------------------------------------------------------------
# Tasks


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _letters(rng: random.Random, length: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(length))


def make_task(family: str, difficulty: int, rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair of `family` at `difficulty` (1..3), drawn with `rng`."""
    if family not in DIFFICULTY_SIZES:
        raise ValueError(f"unknown task family {family!r}; choose from {list(TASK_FAMILIES)}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {list(DIFFICULTIES)}, got {difficulty!r}")
    size = DIFFICULTY_SIZES[family][difficulty - 1]

    if family == "add":
        a, b = _number(rng, size), _number(rng, size)
        return f"what is {a} plus {b}?", str(a + b)
    if family == "sub":
        a, b = sorted((_number(rng, size), _number(rng, size)), reverse=True)
        return f"what is {a} minus {b}?", str(a - b)
    if family == "mul":
        a, b = _number(rng, size[0]), _number(rng, size[1])
        return f"what is {a} times {b}?", str(a * b)
    if family == "sort_digits":
        digits = [str(rng.randint(0, 9)) for _ in range(size)]
        return "sort the digits " + " ".join(digits), " ".join(sorted(digits))
    if family == "sort_words":
        words = rng.sample(WORDS, size)
        return "sort the words " + " ".join(words), " ".join(sorted(words))
    if family == "reverse":
        text = _letters(rng, size)
        return f'reverse "{text}"', text[::-1]
    if family == "count":
        text, letter = _letters(rng, size, COUNT_ALPHABET), rng.choice(COUNT_ALPHABET)
        return f'count the letter "{letter}" in "{text}"', str(text.count(letter))
    if family == "uppercase":
        text = _letters(rng, size)
        return f'uppercase "{text}"', text.upper()
    if family == "replace":
        text = _letters(rng, size)
        old = rng.choice(text)  # a letter that occurs, so the edit changes something
        new = rng.choice([c for c in LETTERS if c != old])
        return f'replace "{old}" with "{new}" in "{text}"', text.replace(old, new)
    # drop_vowels: redraw until a consonant remains, so the answer is never empty
    text = _letters(rng, size)
    while all(c in VOWELS for c in text):
        text = _letters(rng, size)
    return f'drop the vowels from "{text}"', "".join(c for c in text if c not in VOWELS)


# question pattern -> answer, computed from the question text alone
_SOLVERS: tuple[tuple[re.Pattern, Callable[..., str]], ...] = (
    (re.compile(r"what is (\d+) plus (\d+)\?"), lambda a, b: str(int(a) + int(b))),
    (re.compile(r"what is (\d+) minus (\d+)\?"), lambda a, b: str(int(a) - int(b))),
    (re.compile(r"what is (\d+) times (\d+)\?"), lambda a, b: str(int(a) * int(b))),
    (re.compile(r"sort the digits (\d(?: \d)*)"), lambda s: " ".join(sorted(s.split()))),
    (re.compile(r"sort the words ([a-z]+(?: [a-z]+)*)"), lambda s: " ".join(sorted(s.split()))),
    (re.compile(r'reverse "([a-z]+)"'), lambda s: s[::-1]),
    (re.compile(r'count the letter "([a-z])" in "([a-z]+)"'), lambda c, s: str(s.count(c))),
    (re.compile(r'uppercase "([a-z]+)"'), lambda s: s.upper()),
    (re.compile(r'replace "([a-z])" with "([a-z])" in "([a-z]+)"'), lambda o, n, s: s.replace(o, n)),
    (re.compile(r'drop the vowels from "([a-z]+)"'), lambda s: "".join(c for c in s if c not in VOWELS)),
)


def solve(question: str) -> str:
    """The answer to a question written in the grammar above; ValueError if it is not one."""
    for pattern, answer in _SOLVERS:
        match = pattern.fullmatch(question)
        if match:
            return answer(*match.groups())
    raise ValueError(f"not a question of the corpus grammar: {question!r}")


def prompt_for(question: str) -> str:
    """The prompt a model answers: the task line up to and including 'A:'."""
    return f"Q: {question} A:"


def format_line(question: str, answer: str) -> str:
    return f"{prompt_for(question)} {answer}"


def parse_line(line: str) -> tuple[str, str] | None:
    """(question, answer) of a task line; None for a prose line."""
    if not line.startswith("Q: "):
        return None
    question, separator, answer = line[3:].rpartition(" A: ")
    if not separator:
        raise ValueError(f"task line without ' A: ': {line!r}")
    return question, answer


# ---------------------------------------------------------------------------------------------
# Prose and the corpus


def make_prose(rng: random.Random) -> str:
    """One to three template sentences."""
    sentences = []
    for _ in range(rng.randint(1, 3)):
        name, name2 = rng.sample(NAMES, 2)
        adjective, adjective2 = rng.sample(ADJECTIVES, 2)
        sentence = rng.choice(TEMPLATES).format(
            name=name, name2=name2, noun=rng.choice(NOUNS), object=rng.choice(OBJECTS),
            adjective=adjective, adjective2=adjective2, verb=rng.choice(VERBS),
            place=rng.choice(PLACES), time=rng.choice(TIMES),
        )
        sentences.append(sentence)
    return " ".join(sentences)


def generate_lines(config: CorpusConfig, split: str, num_lines: int) -> Iterator[str]:
    """`num_lines` corpus lines for `split` ("train" / "val"); each split has its own random stream."""
    rng = random.Random(f"lightning_lab.corpus:{config.seed}:{split}")
    for _ in range(num_lines):
        if rng.random() < config.filler_fraction:
            yield make_prose(rng)
        else:
            family = rng.choice(config.families)
            difficulty = rng.choice(config.difficulties)
            yield format_line(*make_task(family, difficulty, rng))


def write_corpus(config: CorpusConfig, train_out: str | Path, val_out: str | Path) -> dict[str, Path]:
    """Write the train and val splits, one line per document (newline-terminated, UTF-8)."""
    outputs = {"train": (Path(train_out), config.train_lines), "val": (Path(val_out), config.val_lines)}
    for split, (path, num_lines) in outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")  # renamed when complete: never half a corpus
        try:
            with temporary.open("w", encoding="utf-8", newline="\n") as f:
                for line in generate_lines(config, split, num_lines):
                    f.write(line + "\n")
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    return {split: path for split, (path, _) in outputs.items()}
