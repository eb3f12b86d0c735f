"""The ACE playbook: an evolving list of lessons that goes into the generator's prompt.

Each `Entry` has an id (``<section prefix>-<5 digits>``, e.g. ``str-00001``), a section, its content,
helpful and harmful counters and created/updated times. It is rendered, section by section, in the
format of the ACE reference code::

    ## strategies
    [str-00001] helpful=5 harmful=0 :: Percent change is (new - old) / old * 100, not (new - old) / new.

What the public ACE code leaves out, done here by plain code after every update (`Playbook.refine`):

- near-duplicate merging: two entries whose TF-IDF cosine similarity is at least ``merge_threshold``
  are one lesson; the merged entry keeps the first id and content and sums both counters;
- pruning: an entry whose ``helpful - harmful`` falls to ``prune_below`` or less is removed;
- a token budget that holds: while the rendered playbook is longer than ``token_budget`` tokens,
  the entry with the lowest score (``helpful - harmful``; then fewer helpful; then the newest) goes.

Changes come as `Delta` operations (ADD, UPDATE, REMOVE) proposed by the curator and merged by
`Playbook.apply` in an order that does not depend on the order they were proposed in, and as
helpful/harmful/neutral tags from the reflector (`Playbook.tag`).

Persistence is JSONL: a header line ``{"playbook": 1, "next_id": N}`` then one entry per line,
written atomically (a reader sees the old file or the new one, never half of one).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from lightning_lab.data.io import DataError, read_jsonl, write_text_atomic

DEFAULT_SECTION = "strategies"
OPS = ("REMOVE", "UPDATE", "ADD")  # the order `Playbook.apply` runs them in
TAGS = ("helpful", "harmful", "neutral")
ENTRY_ID = re.compile(r"\b[a-z]{1,8}-\d{5}\b")  # how an id looks inside model output


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def section_name(section: str | None) -> str:
    """A section as a lowercase slug ("Formulas & Calculations" -> "formulas_calculations")."""
    slug = re.sub(r"[^a-z0-9]+", "_", (section or "").lower()).strip("_")
    return slug or DEFAULT_SECTION


def section_prefix(section: str) -> str:
    """The id prefix of a section: its first three letters ("formulas" -> "for")."""
    letters = re.sub(r"[^a-z]", "", section)
    return (letters or "sec")[:3]


def word_count(text: str) -> int:
    """The default token count: words and punctuation marks (a close, tokenizer-free over-estimate of
    a BPE count for English; pass the model tokenizer's count for exact budgets)."""
    return len(re.findall(r"\w+|[^\w\s]", text))


@dataclass
class Entry:
    id: str
    section: str
    content: str
    helpful: int = 0
    harmful: int = 0
    created: str = ""
    updated: str = ""

    @property
    def score(self) -> int:
        return self.helpful - self.harmful

    def render(self) -> str:
        return f"[{self.id}] helpful={self.helpful} harmful={self.harmful} :: {self.content}"


@dataclass(frozen=True)
class Delta:
    """One curator operation. ADD needs section and content; UPDATE needs id and content; REMOVE needs id."""

    op: str
    content: str = ""
    section: str = DEFAULT_SECTION
    id: str = ""


@dataclass
class MergeReport:
    """What `Playbook.apply` and `Playbook.refine` did, for the run's counters."""

    added: int = 0
    updated: int = 0
    removed: int = 0
    merged: int = 0  # near-duplicates folded into an earlier entry
    pruned: int = 0  # removed for a low score
    over_budget: int = 0  # removed to hold the token budget
    skipped: list[str] = field(default_factory=list)  # operations that could not apply, and why

    def add(self, other: MergeReport) -> None:
        for name in ("added", "updated", "removed", "merged", "pruned", "over_budget"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.skipped += other.skipped


class Playbook:
    """Entries in insertion order, with retrieval, delta merging and grow-and-refine (module docstring)."""

    def __init__(self, entries: Iterable[Entry] = (), next_id: int = 1, token_budget: int | None = 2000,
                 merge_threshold: float = 0.8, prune_below: int = -3,
                 count_tokens: Callable[[str], int] = word_count):
        self.entries: list[Entry] = list(entries)
        self.next_id = max([next_id] + [int(e.id.rsplit("-", 1)[1]) + 1 for e in self.entries])
        self.token_budget = token_budget
        self.merge_threshold = merge_threshold
        self.prune_below = prune_below
        self.count_tokens = count_tokens

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, entry_id: str) -> Entry | None:
        return next((entry for entry in self.entries if entry.id == entry_id), None)

    @property
    def ids(self) -> list[str]:
        return [entry.id for entry in self.entries]

    # ---- rendering and retrieval ---------------------------------------------------------------

    def render(self, entries: Sequence[Entry] | None = None) -> str:
        """The entries (default: all) grouped by section, sections in order of first appearance."""
        entries = self.entries if entries is None else entries
        sections: dict[str, list[Entry]] = {}
        for entry in entries:
            sections.setdefault(entry.section, []).append(entry)
        return "\n".join(f"## {name}\n" + "\n".join(e.render() for e in group) for name, group in sections.items())

    def tokens(self) -> int:
        return self.count_tokens(self.render()) if self.entries else 0

    def retrieve(self, query: str, k: int, embed: Callable[[list[str]], object] | None = None) -> list[Entry]:
        """The `k` entries most relevant to `query`, in playbook order: TF-IDF cosine similarity, or with
        `embed` (texts -> an array of one vector per text) the cosine of those embeddings.

        Ties (e.g. no word in common) go to the higher score, then the older entry; all entries
        when there are at most k."""
        if len(self.entries) <= k:
            return list(self.entries)
        from sklearn.metrics.pairwise import cosine_similarity

        contents = [e.content for e in self.entries]
        similarity = (tfidf_similarity([query], contents) if embed is None
                      else cosine_similarity(embed([query]), embed(contents)))[0]
        ranked = sorted(range(len(self.entries)),
                        key=lambda i: (-similarity[i], -self.entries[i].score, i))
        chosen = set(ranked[:k])
        return [entry for i, entry in enumerate(self.entries) if i in chosen]

    # ---- changes -------------------------------------------------------------------------------

    def add(self, content: str, section: str = DEFAULT_SECTION, now: str | None = None) -> Entry:
        section = section_name(section)
        stamp = now or now_iso()
        entry = Entry(f"{section_prefix(section)}-{self.next_id:05d}", section, " ".join(content.split()),
                      created=stamp, updated=stamp)
        self.next_id += 1
        self.entries.append(entry)
        return entry

    def tag(self, tags: dict[str, str], now: str | None = None) -> list[str]:
        """Count the reflector's tags: helpful / harmful add one to that counter, neutral changes nothing.
        Returns the ids that are not in the playbook (ignored)."""
        unknown = []
        for entry_id, tag in tags.items():
            entry = self.get(entry_id)
            if entry is None or tag not in TAGS:
                unknown.append(entry_id)
                continue
            if tag != "neutral":
                setattr(entry, tag, getattr(entry, tag) + 1)
                entry.updated = now or now_iso()
        return unknown

    def apply(self, deltas: Iterable[Delta], now: str | None = None) -> MergeReport:
        """Merge curator operations deterministically, then `refine`.

        The result does not depend on the order of `deltas`: duplicates count once; REMOVE runs
        first, then UPDATE (of ids still present; of two updates to one id the one whose content sorts
        first wins), then ADD sorted by (section, content). An operation on an unknown id, or with empty
        content, is skipped and reported."""
        stamp = now or now_iso()
        report = MergeReport()
        unique = sorted(set(deltas), key=lambda d: (OPS.index(d.op) if d.op in OPS else len(OPS), d.id,
                                                    section_name(d.section), d.content))
        removed: set[str] = set()
        updated: set[str] = set()
        for delta in unique:
            content = " ".join(delta.content.split())
            if delta.op not in OPS:
                report.skipped.append(f"unknown operation {delta.op!r}")
            elif delta.op == "ADD":
                if not content:
                    report.skipped.append("ADD with empty content")
                    continue
                self.add(content, delta.section, stamp)
                report.added += 1
            elif (entry := self.get(delta.id)) is None:
                report.skipped.append(f"{delta.op} of unknown id {delta.id!r}" +
                                      (" (removed by this merge)" if delta.id in removed else ""))
            elif delta.op == "REMOVE":
                self.entries.remove(entry)
                removed.add(entry.id)
                report.removed += 1
            elif not content:
                report.skipped.append(f"UPDATE of {delta.id} with empty content")
            elif delta.id in updated:
                report.skipped.append(f"second UPDATE of {delta.id} in one merge")
            else:
                entry.content, entry.updated = content, stamp
                updated.add(delta.id)
                report.updated += 1
        report.add(self.refine())
        return report

    def refine(self) -> MergeReport:
        """Merge near-duplicates, prune low scores, then hold the token budget (module docstring)."""
        report = MergeReport()
        report.merged = self._merge_duplicates()
        before = len(self.entries)
        self.entries = [entry for entry in self.entries if entry.score > self.prune_below]
        report.pruned = before - len(self.entries)
        if self.token_budget is not None:
            while self.entries and self.tokens() > self.token_budget:
                order = sorted(range(len(self.entries)),
                               key=lambda i: (self.entries[i].score, self.entries[i].helpful, -i))
                del self.entries[order[0]]
                report.over_budget += 1
        return report

    def _merge_duplicates(self) -> int:
        """Fold every entry into the first earlier entry it near-duplicates; returns how many were folded."""
        if len(self.entries) < 2:
            return 0
        similarity = tfidf_similarity([e.content for e in self.entries], [e.content for e in self.entries])
        keeper_of: dict[int, int] = {}
        for later in range(len(self.entries)):
            for earlier in range(later):
                if earlier not in keeper_of and similarity[later][earlier] >= self.merge_threshold:
                    keeper_of[later] = earlier
                    break
        for later, earlier in keeper_of.items():
            keeper, duplicate = self.entries[earlier], self.entries[later]
            keeper.helpful += duplicate.helpful
            keeper.harmful += duplicate.harmful
            keeper.updated = max(keeper.updated, duplicate.updated)
        self.entries = [entry for i, entry in enumerate(self.entries) if i not in keeper_of]
        return len(keeper_of)

    # ---- persistence ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the playbook as JSONL, atomically (temporary file in the same directory, then rename)."""
        lines = [json.dumps({"playbook": 1, "next_id": self.next_id})]
        lines += [json.dumps(asdict(entry), ensure_ascii=False) for entry in self.entries]
        write_text_atomic(path, "\n".join(lines) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike, **settings) -> Playbook:
        """Read a playbook written by `save` (or a plain JSONL of entries with id, section and content);
        a malformed line is a DataError naming the file and line."""
        entries, next_id, seen = [], 1, {}
        for line, record in read_jsonl(path):
            if "playbook" in record:
                next_id = int(record.get("next_id", 1))
                continue
            missing = [key for key in ("id", "content") if not isinstance(record.get(key), str)]
            if missing or not ENTRY_ID.fullmatch(record["id"]):
                raise DataError(f"{path}:{line}: a playbook entry needs a string 'content' and an 'id' like "
                                f"str-00001; got {record}")
            if record["id"] in seen:
                raise DataError(f"{path}:{line}: duplicate id {record['id']!r} (first on line {seen[record['id']]})")
            seen[record["id"]] = line
            entries.append(Entry(id=record["id"], section=section_name(record.get("section")),
                                 content=record["content"], helpful=int(record.get("helpful", 0)),
                                 harmful=int(record.get("harmful", 0)), created=str(record.get("created", "")),
                                 updated=str(record.get("updated", ""))))
        return cls(entries, next_id=next_id, **settings)


def tfidf_similarity(queries: Sequence[str], documents: Sequence[str]):
    """Cosine similarity of TF-IDF vectors (word unigrams and bigrams, fitted on queries + documents):
    a (len(queries), len(documents)) array. Texts with no word give similarity 0."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w+\b")
    try:
        matrix = vectorizer.fit_transform(list(queries) + list(documents))
    except ValueError:  # no word in any text
        import numpy as np

        return np.zeros((len(queries), len(documents)))
    return cosine_similarity(matrix[: len(queries)], matrix[len(queries):])
