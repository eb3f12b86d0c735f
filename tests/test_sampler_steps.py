"""Step-wise decoding for controllers, each feature against plain decoding: per-call sampling parameters, stop
strings, top-k candidates, fork / select and rollback / append on forks; argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from test_sampler import PROMPTS, count_model_inputs, full_pass, sampler, tiny, tiny_qwen2  # noqa: F401 (fixtures)

from lightning_lab.sampling.sampler import SamplingParams, Sampler

PROMPT = PROMPTS[1]


def ids_of(outputs) -> list[int]:
    return [output.token_id for output in outputs]


def greedy_continuation(sampler: Sampler, tokens: list[int], steps: int) -> list[int]:
    """Greedy tokens after the prompt and `tokens`, from a fresh state."""
    state = sampler.start(PROMPT, greedy=True, chat=False)
    if tokens:
        sampler.append(state, tokens)
    return ids_of(sampler.step(state) for _ in range(steps))


def test_greedy_steps_equal_generate(sampler):
    state = sampler.start(PROMPT, greedy=True, chat=False)
    stepped = ids_of(sampler.step(state) for _ in range(12))
    generated = sampler.generate(PROMPT, greedy=True, max_new_tokens=12, ignore_eos=True, chat=False)
    assert stepped == generated.prompts[0].completions[0].token_ids == state.token_ids


def test_per_call_parameters_change_only_that_step(sampler):
    state = sampler.start(PROMPT, greedy=True, seed=3, chat=False)
    first = ids_of(sampler.step(state) for _ in range(3))
    thought = ids_of(sampler.step(state, temperature=1.5, top_p=0.95) for _ in range(4))
    after = ids_of(sampler.step(state) for _ in range(3))
    assert state.params == SamplingParams(greedy=True)  # the state's own parameters are untouched
    assert first == greedy_continuation(sampler, [], 3)
    # the sampled steps are what a state sampling at that temperature and top-p draws (same seed, same draws)
    sampling = sampler.start(PROMPT, temperature=1.5, top_p=0.95, seed=3, chat=False)
    sampler.append(sampling, first)
    assert thought == ids_of(sampler.step(sampling) for _ in range(4))
    assert thought != greedy_continuation(sampler, first, 4)  # they really were sampled
    assert after == greedy_continuation(sampler, first + thought, 3)  # and greedy again on the same state


def test_stop_strings_in_step_mode(tiny, sampler):
    tokens = greedy_continuation(sampler, [], 16)
    text = tiny.tokenizer.decode(tokens, skip_special_tokens=True)
    stop = text[5:8]
    # the first token whose text completes the stop string
    first = next(j for j in range(len(tokens)) if stop in tiny.tokenizer.decode(tokens[:j + 1], skip_special_tokens=True))
    state = sampler.start(PROMPT, greedy=True, stop=[stop, "never there"], chat=False)
    outputs = [sampler.step(state) for _ in range(first + 1)]
    assert ids_of(outputs) == tokens[:first + 1]
    assert [o.finish_reason for o in outputs] == [None] * first + ["stop"] and outputs[-1].stop == stop
    assert sampler.step(state, stop=["never there"]).finish_reason is None  # the step's stop strings replace them
    eos = next(iter(sampler.eos_ids))
    assert sampler.append(state, [eos])[0].finish_reason == "eos"


def test_top_k_candidates_equal_a_full_pass(tiny, sampler):
    state = sampler.start(PROMPT, greedy=True, chat=False)
    outputs = [sampler.step(state, candidates=4) for _ in range(5)] + sampler.append(state, [5, 17], candidates=4)
    logits, _ = full_pass(tiny.model, state.prompt_ids + state.token_ids)
    logprobs = torch.log_softmax(logits[len(state.prompt_ids) - 1:-1], dim=-1)
    for j, output in enumerate(outputs):
        best = logprobs[j].topk(4)
        assert [token for token, _ in output.candidates] == best.indices.tolist()
        assert [value for _, value in output.candidates] == pytest.approx(best.values.tolist(), abs=1e-4)
    assert all(o.candidates[0] == (o.token_id, pytest.approx(o.logprob)) for o in outputs[:5])  # greedy: the best
    assert sampler.step(state).candidates is None


def test_fork_then_greedy_equals_independent_decodes_in_one_pass_per_step(tiny, sampler):
    state = sampler.start(PROMPT, greedy=True, chat=False)
    prefix = ids_of(sampler.step(state) for _ in range(2))
    branches = sampler.fork(state, 3)
    with count_model_inputs(tiny.model) as shapes:
        steps = [sampler.step(branches) for _ in range(5)]
    assert shapes == [(3, 1)] * 5  # one batched forward pass per step, the prompt not recomputed
    expected = greedy_continuation(sampler, prefix, 5)
    assert all(len(step) == 3 for step in steps)
    assert [row.token_ids for row in branches.rows] == [prefix + expected] * 3
    assert ids_of(sampler.step(state) for _ in range(5)) == expected  # the forked state is left as it was
    assert sampler.select(branches, 1).token_ids == prefix + expected


def test_sampled_branches_differ_and_each_has_its_own_signals(tiny, sampler):
    state = sampler.start(PROMPT, temperature=1.0, seed=11, chat=False)
    branches = sampler.fork(state, 4)
    steps = [sampler.step(branches) for _ in range(6)]
    assert len({tuple(row.token_ids) for row in branches.rows}) > 1
    for r, row in enumerate(branches.rows):
        logits, _ = full_pass(tiny.model, branches.prompt_ids + row.token_ids)
        reference = torch.log_softmax(logits[len(branches.prompt_ids) - 1:-1], dim=-1)
        expected = reference.gather(-1, torch.tensor(row.token_ids)[:, None]).squeeze(-1)
        assert [step[r].logprob for step in steps] == pytest.approx(expected.tolist(), abs=1e-4)
        assert torch.allclose(branches.logits[-1][r], logits[-1], atol=1e-4)


def test_rollback_and_append_on_forks(tiny, sampler):
    branches = sampler.fork(sampler.start(PROMPT, greedy=True, chat=False), 2)
    stepped = [sampler.step(branches) for _ in range(4)]
    tokens = [row.token_ids[:] for row in branches.rows]
    with count_model_inputs(tiny.model) as shapes:
        sampler.rollback(branches, 3)
    assert shapes == [] and branches.tokens == 1 and branches.cache.get_seq_length() == branches.length
    restepped = [sampler.step(branches) for _ in range(3)]  # rollback then re-step == never having rolled back
    assert [row.token_ids for row in branches.rows] == tokens
    assert [o.logprob for step in restepped for o in step] == pytest.approx(
        [o.logprob for step in stepped[1:] for o in step], abs=1e-5)
    forced = sampler.append(branches, [5, 17, 42])
    assert [ids_of(row) for row in forced] == [[5, 17, 42]] * 2
    for r, row in enumerate(branches.rows):
        logits, _ = full_pass(tiny.model, branches.prompt_ids + row.token_ids)
        assert torch.allclose(branches.logits[-1][r], logits[-1], atol=1e-4)
    with pytest.raises(ValueError, match="rows"):
        branches.token_ids  # noqa: B018  (a fork's tokens are per row)


def test_fork_on_a_dynamic_cache(tiny):
    """A model with a sliding-window layer keeps transformers' DynamicCache: fork copies it all the same."""
    sampler = Sampler(tiny_qwen2(tiny, use_sliding_window=True, sliding_window=4, max_window_layers=1))
    state = sampler.start(PROMPT, greedy=True, chat=False)
    sampler.step(state)
    branches = sampler.fork(state, 2)
    forked = [ids_of(sampler.step(branches)) for _ in range(4)]
    alone = ids_of(sampler.step(state) for _ in range(4))
    assert [[step[r] for step in forked] for r in range(2)] == [alone, alone]


def test_bad_arguments_name_what_is_wrong(sampler):
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="temperature=.*finite"):
            SamplingParams(temperature=value)
        with pytest.raises(ValueError, match="top_p=.*finite"):
            sampler.generate(PROMPT, top_p=value, chat=False)
    for name, bad in (("n", 0), ("n", 1.5), ("n", True), ("max_new_tokens", 0), ("batch_size", 0)):
        with pytest.raises(ValueError, match=f"{name}=.*integer >= 1"):
            sampler.generate(PROMPT, chat=False, **{name: bad})
    with pytest.raises(ValueError, match="top_k=.*integer"):
        SamplingParams(top_k=2.5)
    state = sampler.start(PROMPT, greedy=True, chat=False)
    with pytest.raises(ValueError, match="n=0"):
        sampler.fork(state, 0)
    with pytest.raises(ValueError, match="candidates=-1"):
        sampler.step(state, candidates=-1)
    with pytest.raises(ValueError, match="temperature=nan"):
        sampler.step(state, temperature=math.nan)
    with pytest.raises(ValueError, match="rollback"):
        sampler.rollback(state, 1)
    with pytest.raises(ValueError, match="select"):
        sampler.select(state, 1)


def test_ragged_rows_step_idle_and_roll_back_each_as_alone(sampler):
    """Rows after prompts of different lengths in one cache, each fed, idling and rolled back on its own (holes in
    the shared cache): each row's tokens, signals and captured a_{i,i-1} (on its previous *valid* token) are those of
    a one-row state doing the same alone."""
    heads = [(1, 3), (0, 0)]
    state = sampler.start_rows(PROMPTS, capture_heads=heads, chat=False)
    alone = [sampler.start(prompt, greedy=True, capture_heads=heads, chat=False) for prompt in PROMPTS]
    for step in range(12):
        if step in (5, 9):  # rows roll back by different amounts, each on its own
            for r, k in enumerate((2, 1, 0) if step == 5 else (0, 3, 1)):
                sampler.rollback_row(state, r, k)
                sampler.rollback(alone[r], k)
        active = [(step + r) % 3 != 0 for r in range(len(PROMPTS))]  # each row idles every third step
        tokens = [int(state.logits[r][-1].argmax()) if active[r] else None for r in range(len(PROMPTS))]
        outputs = sampler.step_rows(state, tokens)
        for r, output in enumerate(outputs):
            if not active[r]:
                assert output is None
                continue
            expected = sampler.step(alone[r])
            assert output.token_id == expected.token_id and output.text == expected.text
            assert [output.logprob, output.entropy, output.margin] == pytest.approx(
                [expected.logprob, expected.entropy, expected.margin], rel=1e-4, abs=1e-5)
            assert output.attention == pytest.approx(expected.attention, rel=1e-4, abs=1e-6)
    for r, one in enumerate(alone):
        assert state.rows[r].token_ids == one.token_ids
        torch.testing.assert_close(state.logits[r][-1], one.logits[-1][0], rtol=1e-4, atol=1e-4)
    forked = sampler.select_rows(state, [2, 0, 0])  # a fork of rows as they are, holes and all
    assert [row.token_ids for row in forked.rows] == [state.rows[2].token_ids] + [state.rows[0].token_ids] * 2
    out = sampler.step_rows(forked, [None, int(forked.logits[1][-1].argmax()), 7])
    assert out[0] is None and out[1].token_id == sampler.step(alone[0]).token_id


def test_ragged_rollback_is_checked(sampler):
    state = sampler.start_rows(PROMPTS[:2], chat=False)
    sampler.step_rows(state, [5, None])
    with pytest.raises(ValueError, match=r"rollback_row\(k=1\): must be an integer in 0..0 \(row 1"):
        sampler.rollback_row(state, 1, 1)
    with pytest.raises(ValueError, match=r"select_rows\(rows=\[2\]\): this state has rows 0..1"):
        sampler.select_rows(state, [2])
