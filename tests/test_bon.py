"""Best-of-N: config checks, records and pass@k, resume after a kill, distill, analyze, predict."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_lab.bon import collect as bon
from lightning_lab.bon.analyze import AnalyzeConfig, analyze
from lightning_lab.bon.cli import COMMANDS
from lightning_lab.bon.distill import DistillConfig, distill
from lightning_lab.bon.predict import EmergencePredictor, PredictConfig, build_dataset, load_predictor, predict
from lightning_lab.cli import main as lab
from lightning_lab.data.benchmarks import Sample
from lightning_lab.data.io import DataError, JsonlWriter
from lightning_lab.errors import UserError
from lightning_lab.loops import parse_loop

REPO = Path(__file__).resolve().parents[1]


def load_config(path: Path, *overrides: str) -> bon.CollectConfig:
    """A collect config as `lab bon collect --config path --key value ...` reads it."""
    return parse_loop("lab bon", COMMANDS, ["collect", "--config", str(path), *overrides])[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def fake_completion(text: str, logprob: float = -5.0, num_tokens: int = 10, seconds: float = 0.1):
    return SimpleNamespace(text=text, token_ids=list(range(num_tokens)), finish_reason="stop",
                           logprobs=[logprob / num_tokens] * num_tokens, seconds=seconds)


def write_synthetic_run(path: Path, success_probabilities, n: int, seed: int, adapter: str | None = None,
                        k_values=(1, 2, 4, 8, 16), planned: int | None = None) -> Path:
    """A run file in the collector's format, built by `bon.prompt_record` from fake completions,
    and its telemetry CSV (one prompt per batch)."""
    rng = np.random.default_rng(seed)
    config = bon.CollectConfig(k_values=list(k_values), samples_per_prompt=n, scorer="numeric",
                               adapter_name=adapter, adapter_path=f"adapters/{adapter}" if adapter else None)
    with JsonlWriter(path) as writer:
        writer.write({"kind": "header", "config": vars(config), "model": config.base_model,
                      "adapter": {"name": adapter, "path": config.adapter_path} if adapter else None, "seed": seed,
                      "planned_prompts": planned or len(success_probabilities)})
        for i, p in enumerate(success_probabilities):
            sample = Sample(f"q{i}", f"question {i}", "42")
            texts = ["42" if rng.random() < p else str(rng.integers(0, 30)) for _ in range(n)]
            completions = [fake_completion(t, logprob=-rng.uniform(1, 20), num_tokens=int(rng.integers(5, 40)))
                           for t in texts]
            writer.write(bon.prompt_record(sample, completions, config, seconds=0.5))
    telemetry = bon.TelemetryWriter(bon.telemetry_path(path))
    for i in range(len(success_probabilities)):
        telemetry.write(batch=i, prompt_ids=f"q{i}", num_prompts=1, num_samples=n, queue_wait_s=0.01 * rng.random(),
                        prefill_s=0.05, decode_s=rng.uniform(0.5, 1.0), new_tokens=20 * n)
    telemetry.close()
    return path


# ---- config and prompts ---------------------------------------------------------------------------


def test_shipped_configs_are_valid():
    for path in (REPO / "configs" / "bon").glob("collect*"):
        config = load_config(path)
        assert max(config.k_values) <= config.samples_per_prompt
    for name in ("collector_base.json", "collector_adapter.json", "gsm8k_dev.json"):
        load_config(REPO / "configs" / "bon" / name)  # the JSON configs of before keep working
    assert load_config(REPO / "configs/bon/collector_adapter.json").adapter_name == "sft-bon"
    assert load_config(REPO / "configs/bon/collector_base.json", "--samples_per_prompt", "4",
                       "--k_values", "[1, 4]").k_values == [1, 4]


def test_unknown_config_key_is_named(tmp_path):
    config = write_jsonl(tmp_path / "c.json", [])
    config.write_text(json.dumps({"base_model": "x", "sampels_per_prompt": 4, "k_values": [1]}))
    with pytest.raises(UserError, match="'sampels_per_prompt'") as error:
        load_config(config)
    assert str(config) in str(error.value)


def test_k_above_the_sample_count_is_refused_at_config_time():
    with pytest.raises(UserError, match="samples_per_prompt=4"):
        bon.CollectConfig(k_values=[1, 8], samples_per_prompt=4)
    with pytest.raises(UserError, match="scorer: 'regex'"):
        bon.CollectConfig(scorer="regex")


def test_missing_answer_field_names_the_line_and_field(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"question": "1+1?", "answer": 2},
                                                 {"question": "2+2?", "solution": 4}])
    config = bon.CollectConfig(prompts_file=str(prompts), answer_field="answer")
    with pytest.raises(DataError, match=r"p\.jsonl:2: answer_field 'answer'"):
        bon.load_prompts(config)


def test_answer_field_picks_the_reference(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "question": "1+1?", "target": "wrong", "gold": 2}])
    config = bon.CollectConfig(prompts_file=str(prompts), answer_field="gold")
    assert [(s.id, s.reference) for s in bon.load_prompts(config)] == [("a", "2")]


def test_shards_partition_the_prompts_of_a_run():
    config = {"prompts_file": str(REPO / "data/prompts/arithmetic.jsonl"), "limit": 10}
    everything = [sample.id for sample in bon.load_prompts(bon.CollectConfig(**config))]
    shards = [[sample.id for sample in bon.load_prompts(bon.CollectConfig(**config, shard=f"{i}/3"))]
              for i in (1, 2, 3)]
    assert sorted(sum(shards, [])) == sorted(everything) and len(everything) == 10
    assert shards[0] == everything[0::3]
    for bad in ("0/2", "3/2", "2", "a/b"):
        with pytest.raises(UserError, match=f"shard: must .* got {bad!r}"):
            bon.CollectConfig(**config, shard=bad)


def test_shipped_prompt_set_is_well_formed():
    config = load_config(REPO / "configs/bon/collector_base.json")
    samples = bon.load_prompts(config)
    assert 30 <= len(samples) <= 60
    for sample in samples:
        assert int(sample.reference) > 0
        assert eval(sample.metadata["expression"]) == int(sample.reference)  # the answer is the stated arithmetic


# ---- one prompt's record --------------------------------------------------------------------------


def test_record_pass_at_k_matches_brute_force():
    config = bon.CollectConfig(k_values=[1, 2, 3, 4, 6], samples_per_prompt=6, scorer="gsm8k")
    texts = ["The answer is 42.", "41", "so 42", "I think 7", "#### 42", "no idea"]
    record = bon.prompt_record(Sample("p", "q", "42"), [fake_completion(t) for t in texts], config, seconds=1.0)
    correct = [s["score"] == 1.0 for s in record["samples"]]
    assert correct == [True, False, True, False, True, False] and record["num_correct"] == 3
    for k in config.k_values:
        subsets = list(itertools.combinations(correct, k))
        assert record["pass_at_k"][str(k)] == pytest.approx(np.mean([any(s) for s in subsets]))
    assert record["diversity"]["distinct_answers"] == 4  # 42, 41, 7, none
    assert [s["answer"] for s in record["samples"]] == ["42", "41", "42", "7", "42", None]
    assert record["samples"][0]["logprob"] == pytest.approx(-5.0)


def test_diversity_of_identical_and_different_texts():
    same = bon.diversity(["a b c"] * 3, ["1"] * 3)
    assert same["mean_pairwise_similarity"] == 1.0 and same["answer_entropy"] == 0.0
    different = bon.diversity(["a b", "c d", "e f"], ["1", "2", "3"])
    assert different["mean_pairwise_similarity"] == 0.0 and different["distinct_2"] == 1.0


# ---- distill, analyze, predict on synthetic runs ----------------------------------------------


def test_distill_keeps_the_best_sample_as_rows_sft_reads(tmp_path):
    from lightning_lab.data.benchmarks import load_benchmark
    from lightning_lab.training.sft import completion_text

    config = bon.CollectConfig(k_values=[1], samples_per_prompt=3, scorer="numeric")
    run = tmp_path / "run.jsonl"
    with JsonlWriter(run) as writer:
        writer.write({"kind": "header", "config": vars(config), "model": "m", "adapter": None})
        completions = [fake_completion("41", logprob=-1.0), fake_completion("42", logprob=-9.0),
                       fake_completion("42", logprob=-3.0)]
        writer.write(bon.prompt_record(Sample("solved", "q1", "42"), completions, config, 1.0))
        completions = [fake_completion("1", logprob=-4.0), fake_completion("2", logprob=-2.0), fake_completion("3")]
        writer.write(bon.prompt_record(Sample("unsolved", "q2", "42"), completions, config, 1.0))

    out = tmp_path / "sft.jsonl"
    counts = distill(DistillConfig(runs=[str(run)], out=str(out)))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert counts["written"] == 1 and counts["unsolved"] == 1
    assert rows == [{"id": "solved", "prompt": "q1", "completion": "42", "solved": True, "score": 1.0,
                     "logprob": pytest.approx(-3.0), "reference": "42", "run": "run"}]
    # lab sft reads the rows as they are: the prompt, and the completion as the text to learn
    (sample,) = load_benchmark(out, split="all")
    assert (sample.id, sample.prompt, completion_text(sample)) == ("solved", "q1", "42")

    distill(DistillConfig(runs=[str(tmp_path)], out=str(tmp_path / "all.jsonl"), keep_unsolved=True))
    rows = {row["id"]: row for row in map(json.loads, (tmp_path / "all.jsonl").read_text().splitlines())}
    assert rows["unsolved"]["solved"] is False and rows["unsolved"]["completion"] == "2"  # tie on score: best logprob


def test_distill_refuses_to_overwrite_its_input_or_any_existing_file(tmp_path):
    """Issue 22, harm 3: `lab bon distill --out` could overwrite the run it reads."""
    run = write_synthetic_run(tmp_path / "runs" / "base.jsonl", [0.5] * 4, n=4, seed=0, k_values=(1, 2, 4))
    before = run.read_bytes()
    for out, message in [(run, "is one of the input runs"), (tmp_path / "runs", "is a directory")]:
        assert lab(["bon", "distill", "--runs", str(tmp_path / "runs"), "--out", str(out)]) == 2
        assert run.read_bytes() == before
    other = write_jsonl(tmp_path / "keep.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(UserError, match="already exists"):
        distill(DistillConfig(runs=[str(run)], out=str(other)))
    assert other.read_text() == '{"prompt": "p", "completion": "c"}\n'


def test_analyze_and_predict_on_synthetic_runs(tmp_path):
    rng = np.random.default_rng(0)
    hard = rng.beta(0.3, 3.0, size=40)
    write_synthetic_run(tmp_path / "base.jsonl", hard, n=16, seed=1)
    write_synthetic_run(tmp_path / "adapter.jsonl", np.clip(hard * 2, 0, 1), n=16, seed=2, adapter="sft")

    summary = analyze(AnalyzeConfig(runs=[str(tmp_path)], out=str(tmp_path / "summary.json"), resamples=200))
    assert set(summary["adapters"]) == {"base", "sft"}
    base = summary["adapters"]["base"]
    assert base["k"] == [1, 2, 4, 8, 16]
    assert all(lo <= m <= hi for lo, m, hi in zip(base["lower"], base["pass_at_k"], base["upper"]))
    assert np.all(np.diff(base["pass_at_k"]) >= 0)
    assert summary["adapters"]["sft"]["pass_at_k"][0] > base["pass_at_k"][0]
    difference = summary["adapters"]["sft"]["minus_base"]  # paired over the 40 shared prompts
    assert difference["num_prompts"] == 40 and difference["k"] == base["k"]
    assert np.allclose(difference["difference"],
                       np.array(summary["adapters"]["sft"]["pass_at_k"]) - np.array(base["pass_at_k"]))
    assert all(lo <= d <= hi for lo, d, hi in zip(difference["lower"], difference["difference"], difference["upper"]))
    assert difference["lower"][0] > 0  # doubled success probabilities: a clear paired gain at k=1
    assert Path(summary["plot"]).stat().st_size > 1000
    assert summary["runs"]["base"]["telemetry"]["batches"] == 40 and summary["runs"]["base"]["complete"] is True
    assert json.loads((tmp_path / "summary.json").read_text())["runs"]["base"]["num_prompts"] == 40

    config = PredictConfig(runs=[str(tmp_path)], out=str(tmp_path / "predictor.json"), threshold=0.4,
                           feature_samples=4, n_splits=3, extrapolate_k=[64])
    report = predict(config)
    assert report["num_prompts"] == 80 and 0 < report["num_emergent"] < 80
    assert report["cross_validation"]["roc_auc"] is not None
    assert Path(report["calibration_plot"]).is_file()
    assert [(fit["adapter"], fit["budget"], fit["num_prompts"]) for fit in report["beta_binomial"]] == [
        ("base", 4, 40), ("sft", 4, 40)]
    assert report["model"]["feature_names"][-2:] == ["decode_s_per_token", "queue_wait_s"]

    model = load_predictor(tmp_path / "predictor.json")
    dataset = build_dataset(bon.read_runs([tmp_path]), config)
    refit = EmergencePredictor.fit(dataset.features, dataset.labels, dataset.feature_names)
    assert np.array_equal(model.predict_proba(dataset.features), refit.predict_proba(dataset.features))


def test_the_shards_of_one_collection_pool_into_one_dataset(tmp_path):
    probabilities = np.random.default_rng(0).beta(0.5, 2.0, size=30)
    write_synthetic_run(tmp_path / "base_1of2.jsonl", probabilities[:15], n=16, seed=1)
    write_synthetic_run(tmp_path / "base_2of2.jsonl", probabilities[15:], n=16, seed=2)
    write_synthetic_run(tmp_path / "sft.jsonl", probabilities, n=16, seed=3, adapter="sft")
    pooled = bon.records_by_adapter(bon.read_runs([tmp_path]))
    assert list(pooled) == ["base", "sft"] and [len(records) for records in pooled.values()] == [30, 30]
    summary = analyze(AnalyzeConfig(runs=[str(tmp_path)], out=str(tmp_path / "summary.json"), resamples=50))
    assert summary["adapters"]["base"]["runs"] == 2 and summary["adapters"]["base"]["num_prompts"] == 30


def test_analyze_says_how_many_planned_prompts_a_stopped_run_holds(tmp_path, capsys):
    write_synthetic_run(tmp_path / "early.jsonl", [0.5] * 3, n=4, seed=0, k_values=(1, 2, 4), planned=10)
    assert lab(["bon", "analyze", "--runs", str(tmp_path), "--out", str(tmp_path / "s.json"),
                "--resamples", "20"]) == 0
    assert "run early: 3 of the 10 planned prompts (stopped early" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["runs"]["early"]["complete"] is False


@pytest.mark.parametrize("argv, culprit", [
    (["collect", "--samples_per_prompt", "0"], "samples_per_prompt: must be an integer >= 1; got 0"),
    (["collect", "--max_new_tokens", "-3"], "max_new_tokens"),
    (["collect", "--batch_size", "0"], "batch_size"),
    (["collect", "--limit", "0"], "limit"),
    (["collect", "--temperature", "-0.5"], "temperature: must be a finite number in [0, inf]"),
    (["collect", "--temperature", "nan"], "temperature"),
    (["collect", "--top_p", "0"], "top_p: must be a finite number in (0, 1]"),
    (["collect", "--top_p", "1.5"], "top_p"),
    (["collect", "--k_values", "[1, 16]"], "k_values: [1, 16] include k > samples_per_prompt=8"),
    (["collect", "--k_values", "[0, 1]"], "k_values: must be an integer >= 1"),
    (["collect", "--k_values", "[1.5]"], "k_values"),
    (["collect", "--k_values", "[]"], "k_values: must list at least one k"),
    (["collect", "--scorer", "regex"], "scorer: 'regex' is not one of"),
    (["collect", "--split", "validation"], "split"),
    (["collect", "--device", "tpu"], "device"),
    (["collect", "--dtype", "fp8"], "dtype"),
    (["collect", "--prompts_file", "nowhere.jsonl"], "prompts_file nowhere.jsonl: no such file"),
    (["collect", "--adapter_path", "no/adapter"], "adapter_path no/adapter: no such directory"),
    (["collect", "--resume", "true"], "resume: needs the run to continue"),
    (["collect", "--samples_per_prompt", "x"], "samples_per_prompt"),
    (["collect", "--set", "limit=3"], "--set"),
    (["analyze", "--resamples", "0"], "resamples: must be an integer >= 1"),
    (["analyze", "--confidence", "1.5"], "confidence"),
    (["analyze", "--runs", "nowhere"], "nowhere: no such run file or directory"),
    (["predict", "--n_splits", "1"], "n_splits: must be an integer >= 2"),
    (["predict", "--threshold", "0"], "threshold"),
    (["predict", "--group_by", "day"], "group_by"),
    (["distill", "--runs", "[runs, nowhere]", "--out", "x.jsonl"], "runs: no such run file"),
])
def test_bad_input_is_one_line_exit_2_before_anything_loads_or_is_written(argv, culprit, tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "prompts").mkdir(parents=True)
    (tmp_path / "data" / "prompts" / "arithmetic.jsonl").write_bytes((REPO / "data/prompts/arithmetic.jsonl")
                                                                      .read_bytes())
    assert lab(["bon", *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"lab bon {argv[0]}: error: ") and error.count("\n") == 1 and culprit in error
    assert not (tmp_path / "runs").exists()  # nothing claimed, nothing written


# ---- collect with the tiny model ----------------------------------------------------------------


@pytest.fixture
def one_thread():
    """The tiny model gains nothing from two threads, and on a busy 2-core machine OpenMP's spin-waiting
    makes two threads up to 20x slower than one."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(tmp_path: Path, model_dir: Path, prompts: int, **overrides) -> Path:
    prompts_file = write_jsonl(tmp_path / "prompts.jsonl",
                               [{"id": f"p{i:02d}", "question": f"What is {i} + 1?", "answer": i + 1}
                                for i in range(prompts)])
    config = {"base_model": str(model_dir), "prompts_file": str(prompts_file), "k_values": [1, 2],
              "samples_per_prompt": 2, "max_new_tokens": 12, "output_dir": str(tmp_path / "runs"),
              "device": "cpu", "dtype": "fp32", "progress": False, **overrides}
    path = tmp_path / "collect.json"
    path.write_text(json.dumps(config))
    return path


def prompt_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[1:]]


def test_collect_writes_a_run_directory_and_refuses_to_overwrite(tmp_path, tiny_llama_dir, one_thread, monkeypatch,
                                                                  caplog):
    config = load_config(tiny_config(tmp_path, tiny_llama_dir, prompts=3, batch_size=2), "--telemetry", "true",
                         "--name", "first")
    run = bon.collect(config)
    assert run.directory == tmp_path / "runs" / "first" and run.exit_status == 0
    assert {path.name for path in run.directory.iterdir()} >= {"config.yaml", "samples.jsonl", "telemetry.csv",
                                                              "_run_tracker"}
    name, header, records, telemetry = bon.read_run(run.results_path)
    assert name == "first" and header["method"] == "bon" and header["planned_prompts"] == 3
    assert header["config"]["samples_per_prompt"] == 2 and header["versions"]["torch"] and header["threads"] == 1
    assert header["engine"]["threads"] == 1 and header["engine"]["engine"] in ("decoder", "transformers")
    assert [r["id"] for r in records] == ["p00", "p01", "p02"]
    for record in records:
        assert record["n"] == 2 and set(record["pass_at_k"]) == {"1", "2"}
        assert all(0 < s["num_tokens"] <= 12 and s["logprob"] < 0 for s in record["samples"])
        assert set(record["latency"]) == {"mean", "p50", "p95", "p99"}
    assert set(telemetry) == {"p00", "p01", "p02"} and telemetry["p00"]["num_prompts"] == 2  # batches of 2
    heartbeat = json.loads((run.directory / "_run_tracker" / "heartbeat.json").read_text())
    assert heartbeat["status"] == "completed" and heartbeat["step"] == 3 and heartbeat["stage"] == "bon"

    with pytest.raises(UserError, match="--resume true"):
        bon.collect(config)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    with caplog.at_level("WARNING", logger="lightning_lab.bon.collect"):
        bon.collect(load_config(run.directory / "config.yaml", "--resume", "true"))  # nothing left to do
    assert len(prompt_lines(run.results_path)) == 3
    assert "resumed with 2 torch threads, the run started with 1" in caplog.text


def test_a_collect_that_fails_before_its_first_prompt_leaves_nothing(tmp_path, tiny_llama_dir, capsys):
    config_path = tiny_config(tmp_path, tiny_llama_dir, prompts=2, base_model=str(tmp_path / "missing-model"))
    assert lab(["bon", "collect", "--config", str(config_path), "--name", "doomed"]) == 2
    assert "missing-model" in capsys.readouterr().err
    assert list((tmp_path / "runs").iterdir()) == []  # no header-only run that blocks the rerun


def test_temperature_zero_collects_the_greedy_answer_once(tmp_path, tiny_llama_dir, one_thread):
    from lightning_lab.models.loading import load_causal_lm
    from lightning_lab.sampling.sampler import Sampler

    with pytest.raises(UserError, match="samples_per_prompt to 1"):
        load_config(tiny_config(tmp_path, tiny_llama_dir, prompts=2, temperature=0))
    config = load_config(tiny_config(tmp_path, tiny_llama_dir, prompts=2, temperature=0, samples_per_prompt=1,
                                     k_values=[1], batch_size=2))
    records = bon.read_run(bon.collect(config).results_path)[2]
    sampler = Sampler(load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="fp32"))
    greedy = sampler.generate([f"What is {i} + 1?" for i in range(2)], greedy=True, max_new_tokens=12)
    assert [record["samples"][0]["text"] for record in records] == [c[0].text for c in greedy.completions]


def test_collect_with_an_adapter_is_labelled_in_the_analysis(tmp_path, tiny_llama_dir, one_thread):
    from lightning_lab.models.loading import load_causal_lm
    from lightning_lab.models.lora import LoraSettings, add_lora, save_adapter

    loaded = load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="fp32")
    adapter_dir = save_adapter(add_lora(loaded.model, LoraSettings(rank=2)), loaded.tokenizer,
                               tmp_path / "sft" / "distilled" / "adapters" / "final", base_spec=loaded.spec)
    config_path = tiny_config(tmp_path, tiny_llama_dir, prompts=2, max_new_tokens=4)
    bon.collect(load_config(config_path, "--name", "base"))
    adapted = bon.collect(load_config(config_path, "--name", "adapted", "--adapter_path", str(adapter_dir)))
    assert bon.read_run(adapted.results_path)[1]["adapter"] == {"name": "distilled/final", "path": str(adapter_dir)}
    summary = analyze(AnalyzeConfig(runs=[str(tmp_path / "runs")], out=str(tmp_path / "summary.json"), resamples=50))
    assert list(summary["adapters"]) == ["base", "distilled/final"] and set(summary["runs"]) == {"base", "adapted"}


def run_collect_subprocess(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "lightning_lab.cli", "bon", "collect", *args], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_prompt_lines(path: Path, process: subprocess.Popen, count: int, timeout_s: float = 120.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if path.exists() and path.read_text().count("\n") >= 1 + count:
            return
        if process.poll() is not None:
            pytest.fail(f"collect exited early ({process.returncode}): {process.stderr.read()}")
        time.sleep(0.005)
    process.kill()
    pytest.fail(f"collect wrote fewer than {count} prompt lines in {timeout_s} s")


def test_collect_killed_midway_then_resumed_has_each_prompt_once(tmp_path, tiny_llama_dir, one_thread):
    config_path = tiny_config(tmp_path, tiny_llama_dir, prompts=24, max_new_tokens=8)
    out = tmp_path / "runs" / "killed" / "samples.jsonl"
    process = run_collect_subprocess(["--config", str(config_path), "--name", "killed"], tmp_path)
    wait_for_prompt_lines(out, process, 2)
    # Issue 22, harm 2: a second process given the same run is refused while the first writes it, naming it
    with pytest.raises(DataError, match=f"being written by pid {process.pid} on "):
        bon.collect(load_config(out.parent / "config.yaml", "--resume", "true"))
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    written_before = [r["id"] for r in prompt_lines(out)]
    assert 2 <= len(written_before) < 24

    assert lab(["bon", "collect", "--config", str(out.parent / "config.yaml"), "--resume", "true"]) == 0
    ids = [r["id"] for r in prompt_lines(out)]
    assert sorted(ids) == [f"p{i:02d}" for i in range(24)]  # each prompt exactly once
    assert ids[:len(written_before)] == written_before

    # the resumed prompts got exactly the samples a fresh run gives them (seeds depend on the prompt id only)
    resumed = {r["id"]: [s["text"] for s in r["samples"]] for r in prompt_lines(out) if r["id"] not in written_before}
    some = sorted(resumed)[:3]
    prompts = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    subset = write_jsonl(tmp_path / "subset.jsonl", [p for p in prompts if p["id"] in some])
    fresh = bon.collect(load_config(config_path, "--prompts_file", str(subset), "--name", "fresh"))
    assert {r["id"]: [s["text"] for s in r["samples"]] for r in prompt_lines(fresh.results_path)} == {
        i: resumed[i] for i in some}


def test_ctrl_c_stops_after_the_current_prompt_exits_3_and_keeps_what_was_written(tmp_path, tiny_llama_dir,
                                                                                  one_thread):
    config_path = tiny_config(tmp_path, tiny_llama_dir, prompts=24, max_new_tokens=8)
    out = tmp_path / "runs" / "paused" / "samples.jsonl"
    process = run_collect_subprocess(["--config", str(config_path), "--name", "paused"], tmp_path)
    wait_for_prompt_lines(out, process, 1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 3, stderr  # paused, not finished
    assert "paused" in stderr and f"--config {out.parent / 'config.yaml'} --resume true" in stderr
    lines = out.read_text().splitlines()
    assert 2 <= len(lines) < 25 and all(json.loads(line) for line in lines)  # no torn line
    heartbeat = json.loads((out.parent / "_run_tracker" / "heartbeat.json").read_text())
    assert heartbeat["status"] == "paused"

    # a different config cannot continue this run
    other = tiny_config(tmp_path, tiny_llama_dir, prompts=24, max_new_tokens=8, temperature=0.5)
    assert lab(["bon", "collect", "--config", str(other), "--name", "paused", "--resume", "true"]) == 2
    assert out.read_text().splitlines() == lines


def test_the_loop_closes_collect_distill_sft_recollect(tmp_path, tiny_llama_dir, one_thread, capsys):
    """The shipped loop (configs/bon/loop.yaml, sft_distill.yaml) on the tiny model: distilled rows train as they
    are, and the adapter is collected and compared with base. (The tiny random model solves nothing, so the
    collected run is synthetic: one solved and one unsolved prompt.)"""
    train = write_synthetic_run(tmp_path / "runs" / "loop" / "train.jsonl", [1.0, 0.0], n=4, seed=0, k_values=(1, 2))
    distilled = tmp_path / "distill.jsonl"
    assert lab(["bon", "distill", "--runs", str(train.parent), "--out", str(distilled)]) == 0
    assert [json.loads(line)["id"] for line in distilled.read_text().splitlines()] == ["q0"]  # only the solved
    assert lab(["sft", "fit", "--config", str(REPO / "configs/bon/sft_distill.yaml"), "--model.model",
                str(tiny_llama_dir), "--data.path", str(distilled), "--run.root", str(tmp_path / "runs"),
                "--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar",
                "false"]) == 0
    adapter = tmp_path / "runs" / "sft" / "sft_distill" / "adapters" / "final"
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "question": f"{i} + 1?", "answer": i + 1}
                                                       for i in range(2)])
    common = ["--config", str(REPO / "configs/bon/loop.yaml"), "--base_model", str(tiny_llama_dir), "--prompts_file",
              str(prompts), "--split", "all", "--samples_per_prompt", "2", "--k_values", "[1, 2]",
              "--max_new_tokens", "4", "--output_dir", str(tmp_path / "runs" / "eval"), "--device", "cpu",
              "--dtype", "fp32", "--progress", "false"]
    assert lab(["bon", "collect", *common, "--name", "base"]) == 0
    assert lab(["bon", "collect", *common, "--name", "sft", "--adapter_path", str(adapter)]) == 0
    capsys.readouterr()
    assert lab(["bon", "analyze", "--runs", str(tmp_path / "runs" / "eval"), "--out", str(tmp_path / "s.json"),
                "--resamples", "20"]) == 0
    assert "sft_distill/final - base on 2 shared prompts" in capsys.readouterr().out


@pytest.mark.slow
def test_collect_with_smollm2(tmp_path, one_thread):
    config = bon.CollectConfig(base_model="smollm2-135m", prompts_file=str(REPO / "data/prompts/arithmetic.jsonl"),
                               limit=2, samples_per_prompt=4, k_values=[1, 2, 4], max_new_tokens=48,
                               output_dir=str(tmp_path), device="cpu", telemetry=True, progress=False)
    run = bon.collect(config)
    _, header, records, telemetry = bon.read_run(run.results_path)
    assert header["model"] == "smollm2-135m" and len(records) == 2 and set(telemetry) == {r["id"] for r in records}
    for record in records:
        assert record["n"] == 4 and 0.0 <= record["pass_at_k"]["4"] <= 1.0
        assert all(s["text"].strip() and s["num_tokens"] <= 48 and s["score"] in (0.0, 1.0) for s in record["samples"])
        assert all(s["finish_reason"] in ("eos", "length") for s in record["samples"])
    summary = analyze(AnalyzeConfig(runs=[str(run.directory)], out=str(tmp_path / "summary.json"), resamples=100))
    assert summary["adapters"]["base"]["num_prompts"] == 2
