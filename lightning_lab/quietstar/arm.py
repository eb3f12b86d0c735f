"""The Quiet-STaR arm of the A/B harness: answers decoded with injected thoughts (`lab ab --b thoughts.yaml`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lightning_lab.eval.ab import PlainArm
from lightning_lab.quietstar.injector import InjectorConfig, ThoughtInjector
from lightning_lab.quietstar.quality import gold_ids, trace_quality
from lightning_lab.quietstar.tokens import END_THOUGHT, START_THOUGHT, add_thought_tokens


@dataclass
class ThoughtArm(PlainArm):
    """An A/B arm (`lightning_lab.eval.ab`) that answers with thoughts injected, and scores each trace's quality.

    YAML: ``class_path: lightning_lab.quietstar.arm.ThoughtArm`` and under ``init_args:`` the keys of
    `PlainArm` plus ``thoughts:`` (the keys of `InjectorConfig`) and the marker strings. Each answer records
    its thoughts (position, text) and its trace quality (quality.py) beside its text.
    """

    decodes_thoughts = True

    thoughts: InjectorConfig = field(default_factory=InjectorConfig)
    start_token: str = START_THOUGHT
    end_token: str = END_THOUGHT

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.thoughts, dict):
            self.thoughts = InjectorConfig(**self.thoughts)

    def prepare(self, loaded):
        self.thought_tokens = add_thought_tokens(loaded.model, loaded.tokenizer, self.start_token, self.end_token)
        return loaded

    def answers(self, samples: list, seed: int) -> list[dict]:
        injector = ThoughtInjector(self.sampler, self.thought_tokens, self.thoughts)
        answers = []
        for index, sample in enumerate(samples):
            trace = injector.generate(sample.prompt, self.max_new_tokens, self.temperature, self.top_p, self.greedy,
                                      self.stop, seed=seed * 1_000_003 + index, chat=self.chat)
            gold = gold_ids(self.sampler.tokenizer, sample.reference)
            quality = trace_quality(self.loaded.model, trace, self.thought_tokens, gold)
            answers.append({"text": trace.text, "quality": quality.mean,
                            "thoughts": [{"position": t.position, "text": t.text, "injected": t.injected}
                                         for t in trace.thoughts]})
        return answers
