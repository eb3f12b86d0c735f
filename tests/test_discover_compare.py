"""`lab discover compare` on hand-built runs: sample- and FLOP-matched best-of-N, ablations, pairing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_lab.cli import main as lab
from lightning_lab.discover.compare import CompareConfig, arm_label, compare

TTT_DEFAULTS = {"mode": "ttt", "seed": 0, "steps": 2, "rollouts": 2, "objective": "entropic", "reuse": True,
                "adaptive_beta": True, "kl_coef": 0.1}


def write_run(directory: Path, config: dict, results: list[dict]) -> Path:
    (directory / "tasks").mkdir(parents=True)
    lines = [{"kind": "header", "config": config}]
    for result in results:
        (directory / "tasks" / result["id"]).mkdir()
        (directory / "tasks" / result["id"] / "result.json").write_text(json.dumps(result))
        lines.append({"id": result["id"]})
    (directory / "summary.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return directory


def result(task_id: str, family: str, rewards: list[float], flops: int, backward: int = 0) -> dict:
    exacts = [r == 1.0 for r in rewards]
    return {"id": task_id, "family": family, "reward": max(rewards), "exact": any(exacts), "rewards": rewards,
            "exacts": exacts, "samples": len(rewards), "seconds": 1.5,
            "flops": {"forward": flops, "backward": backward}}


def test_arm_labels_name_what_an_ablation_turns_off():
    assert arm_label({"mode": "bestofn"}) == "bestofn"
    assert arm_label(TTT_DEFAULTS) == "ttt"
    assert arm_label({**TTT_DEFAULTS, "reuse": False, "kl_coef": 0.0}) == "ttt-noreuse-nokl"
    assert arm_label({**TTT_DEFAULTS, "objective": "expected"}) == "ttt-expected"


def test_compare_matches_samples_and_flops_and_pairs_items(tmp_path, capsys):
    # best-of-N drew 8 samples per task at 10 FLOPs each; TTT used 4 samples (2 steps x 2) and 60 FLOPs
    bon = write_run(tmp_path / "bon", {"mode": "bestofn", "seed": 0}, [
        result("a", "add", [0.1, 0.2, 0.3, 0.4, 0.5, 1.0, 0.1, 0.1], 80),
        result("b", "sort", [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.9], 80),
        result("c", "sort", [0.2, 0.2], 20),  # short: drew 2 samples, no exact
    ])
    ttt = write_run(tmp_path / "ttt", TTT_DEFAULTS, [
        result("a", "add", [0.6, 0.6, 0.7, 0.8], 40, 20),
        result("b", "sort", [0.6, 1.0, 1.0, 1.0], 40, 20),
        result("c", "sort", [0.3, 0.3, 0.3, 0.3], 40, 20),
    ])
    nokl = write_run(tmp_path / "nokl", {**TTT_DEFAULTS, "kl_coef": 0.0}, [
        result("a", "add", [0.9, 0.9, 0.9, 0.9], 40, 20),
    ])
    out = tmp_path / "compare.json"
    assert compare(CompareConfig(runs=[str(bon), str(ttt), str(nokl)], out=str(out), resamples=200)) == 0
    rows = {(row["comparison"], row["family"]): row for row in json.loads(out.read_text())["rows"]}
    by_samples = rows[("ttt vs bestofn@samples", "all")]  # best-of-N's first 4 samples: 0.4, 0.5, 0.2
    assert by_samples["reward"]["a"] == pytest.approx((0.8 + 1.0 + 0.3) / 3)
    assert by_samples["reward"]["b"] == pytest.approx((0.4 + 0.5 + 0.2) / 3)
    assert by_samples["exact"]["a"] == pytest.approx(1 / 3) and by_samples["exact"]["b"] == 0.0
    assert by_samples["reward"]["low"] <= by_samples["reward"]["difference"] <= by_samples["reward"]["high"]
    by_flops = rows[("ttt vs bestofn@flops", "all")]  # 60 FLOPs buy 6 samples: 1.0 (exact), 0.5, 0.2 (short)
    assert by_flops["reward"]["b"] == pytest.approx((1.0 + 0.5 + 0.2) / 3) and by_flops["exact"]["b"] == pytest.approx(1 / 3)
    assert by_flops["short"] == 1
    assert rows[("ttt vs bestofn@samples", "sort")]["items"] == 2
    ablation = rows[("ttt-nokl vs ttt", "all")]
    assert ablation["items"] == 1 and ablation["reward"]["difference"] == pytest.approx(0.9 - 0.8)
    table = capsys.readouterr().out
    assert "ttt vs bestofn@flops" in table and "wall-clock s: bestofn 4.5, ttt 4.5, ttt-nokl 1.5" in table


def test_compare_refuses_what_it_cannot_compare(tmp_path, capsys):
    bon = write_run(tmp_path / "bon", {"mode": "bestofn", "seed": 0}, [result("a", "add", [0.1], 10)])
    assert lab(["discover", "compare", "--runs", f"[{bon}]"]) == 2
    assert "nothing to compare" in capsys.readouterr().err
    assert lab(["discover", "compare", "--runs", f"[{tmp_path}]"]) == 2
    assert "not a discover run" in capsys.readouterr().err
    assert lab(["discover", "compare", "--runs", f"[{bon},{bon}]"]) == 2
    assert "repeats 1" in capsys.readouterr().err
