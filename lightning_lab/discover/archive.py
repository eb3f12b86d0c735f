"""State reuse: an archive of solutions found so far, and PUCT to choose where new rollouts start.

A state is an answer the model produced for the task (its token ids and text) with its reward; the
root is the empty answer. A rollout started from a state continues a prefix of that answer (ttt.py
picks the cut), and its full answer becomes a child of the state. Each state keeps only its
`max_children` best children (a dropped child takes its own subtree with it).

Selection scores every state by

    score(s) = Q(s) + c * P(s) * sqrt(1 + T) / (1 + n(s))

Q(s) the best reward among s's children (its own reward while it has none), P(s) a rank prior
(the best of N states gets N, the next N - 1, ..., normalised to sum to 1), n(s) the times s was
chosen as a start and T the total over all states. `select(k)` returns the k distinct states of
highest score (ties: the earlier state). The archive round-trips through plain dicts
(`to_dict`/`from_dict`) so a run can save it beside its checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class State:
    id: int
    parent: int | None
    token_ids: list[int]
    text: str
    reward: float
    visits: int = 0
    children: list[int] = field(default_factory=list)


class Archive:
    def __init__(self, exploration: float = 1.0, max_children: int = 4):
        self.exploration = exploration
        self.max_children = max_children
        self.states: dict[int, State] = {0: State(0, None, [], "", 0.0)}
        self.next_id = 1

    @property
    def root(self) -> State:
        return self.states[0]

    def q_value(self, state: State) -> float:
        """The best reward among the state's children, or its own reward while it has none."""
        return max((self.states[child].reward for child in state.children), default=state.reward)

    def priors(self) -> dict[int, float]:
        """Rank prior: the best-rewarded of N states gets weight N, the worst 1 (ties by id), summing to 1."""
        ranked = sorted(self.states.values(), key=lambda s: (-s.reward, s.id))
        total = len(ranked) * (len(ranked) + 1) / 2
        return {state.id: (len(ranked) - rank) / total for rank, state in enumerate(ranked)}

    def scores(self) -> dict[int, float]:
        """The PUCT score of every state (module docstring)."""
        priors = self.priors()
        total_visits = sum(state.visits for state in self.states.values())
        return {state.id: self.q_value(state)
                + self.exploration * priors[state.id] * math.sqrt(1 + total_visits) / (1 + state.visits)
                for state in self.states.values()}

    def select(self, k: int) -> list[State]:
        """The `k` distinct states of highest score (fewer if the archive holds fewer)."""
        scores = self.scores()
        chosen = sorted(self.states, key=lambda state_id: (-scores[state_id], state_id))[:k]
        return [self.states[state_id] for state_id in chosen]

    def visit(self, state: State) -> None:
        state.visits += 1

    def add(self, parent: State, token_ids: list[int], text: str, reward: float) -> State | None:
        """Add a child of `parent`; None when it does not make the parent's best `max_children` or repeats a
        sibling's text. A child pushed out of the top takes its subtree with it."""
        siblings = [self.states[child] for child in parent.children]
        if any(sibling.text == text for sibling in siblings):
            return None
        if len(siblings) >= self.max_children and reward <= min(sibling.reward for sibling in siblings):
            return None
        child = State(self.next_id, parent.id, list(token_ids), text, float(reward))
        self.states[child.id] = child
        self.next_id += 1
        parent.children.append(child.id)
        if len(parent.children) > self.max_children:
            worst = min(siblings, key=lambda sibling: (sibling.reward, -sibling.id))
            self._remove(worst)
        return child

    def _remove(self, state: State) -> None:
        for child in list(state.children):
            self._remove(self.states[child])
        self.states[state.parent].children.remove(state.id)
        del self.states[state.id]

    def to_dict(self) -> dict:
        return {"exploration": self.exploration, "max_children": self.max_children, "next_id": self.next_id,
                "states": [asdict(state) for state in self.states.values()]}

    @classmethod
    def from_dict(cls, data: dict) -> Archive:
        archive = cls(data["exploration"], data["max_children"])
        archive.states = {state["id"]: State(**state) for state in data["states"]}
        archive.next_id = data["next_id"]
        return archive
