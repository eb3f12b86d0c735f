"""The results registry: every number comes from the artifacts, and the claims follow the claim-safety rules."""

from __future__ import annotations

import json
from pathlib import Path

from lightning_lab.reports.registry import write_registry


def metric(a: float, b: float, low: float, high: float) -> dict:
    return {"a": a, "b": b, "difference": a - b, "low": low, "high": high}


def write(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def retention(ratio_low: float, ratio_high: float) -> dict:
    import math

    ratio = (ratio_low + ratio_high) / 2
    return {"windows": 16, "base_perplexity": 4.0, "updated_perplexity": 4.0 * ratio, "delta_nll": math.log(ratio),
            "delta_nll_interval": [math.log(ratio_low), math.log(ratio_high)], "perplexity_ratio": ratio,
            "perplexity_ratio_interval": [ratio_low, ratio_high], "confidence": 0.95}


def test_the_registry_reads_every_number_from_the_artifacts_and_follows_the_claim_rules(tmp_path):
    root = tmp_path
    rows = [{"comparison": "ttt vs bestofn@samples", "family": "all", "items": 33,
             "reward": metric(0.612, 0.534, 0.021, 0.135), "exact": metric(0.30, 0.27, -0.06, 0.12)},
            {"comparison": "ttt vs bestofn@samples", "family": "add", "items": 3,
             "reward": metric(0.7, 0.6, -0.1, 0.3), "exact": metric(0.3, 0.3, 0.0, 0.0)},
            {"comparison": "ttt vs bestofn@flops", "family": "all", "items": 33, "short": 29, "samples": 153,
             "reward": metric(0.612, 0.501, 0.05, 0.17), "exact": metric(0.30, 0.21, 0.01, 0.18)},
            {"comparison": "ttt-nokl vs ttt", "family": "all", "items": 33,
             "reward": metric(0.5, 0.612, -0.2, -0.03), "exact": metric(0.2, 0.3, -0.2, 0.01)}]
    write(root / "discover" / "heldout" / "compare.json", {"rows": rows})
    for arm in ("sdft", "sft"):
        write(root / "sdft" / arm / "sdft_eval_report.json", {"gate": {"max_rise": 0.05}})
    write(root / "retention" / "sdft.json", retention(1.01, 1.04))
    write(root / "retention" / "sft.json", retention(1.03, 1.09))
    write(root / "pipeline.json", {"phases": {"A": {"seconds": 22.6}}})
    paths = write_registry(root)
    text = (root / "results.md").read_text()
    assert "0.612" in text and "+0.078 [+0.021, +0.135]" in text and "| A | 22.6 |" in text
    assert "ttt vs bestofn@samples (reward, 33 items): ttt is better" in text
    assert "ttt vs bestofn@samples (exact, 33 items): no winner between ttt and bestofn@samples" in text
    assert "ttt-nokl vs ttt (reward, 33 items): ttt is better" in text
    # a FLOP-matched best-of-N that drew too few samples supports no claim, whatever its interval says
    assert "ttt vs bestofn@flops: no claim (best-of-N ran short of samples on 29 of 33 items" in text
    assert "--samples 153" in text and "bestofn@flops (reward" not in text and "bestofn@flops (exact" not in text
    assert "sdft retention: no forgetting beyond the gate's bound" in text
    assert "sft retention: no \"no forgetting\" claim" in text
    assert "mHC: no claim about mHC: no mHC-off control arm was pretrained" in text
    assert "discover/post/sdft-bestofn-s0" in text  # missing artifacts are listed, not estimated
    assert {p.name for p in paths} >= {"pipeline.png", "bestofn_vs_ttt.png", "ablations.png", "retention.png",
                                       "results.md", "results.tex"}
    assert all(p.stat().st_size > 0 for p in paths)
    assert "+0.078 [+0.021, +0.135]" in (root / "results.tex").read_text()

    # change an artifact: the registry follows
    write(root / "retention" / "sdft.json", retention(1.02, 1.08))
    rows[0]["reward"] = metric(0.55, 0.534, -0.04, 0.07)
    write(root / "discover" / "heldout" / "compare.json", {"rows": rows})
    write_registry(root)
    changed = (root / "results.md").read_text()
    assert "0.612 | 0.534" not in changed and "0.550 | 0.534" in changed
    assert "ttt vs bestofn@samples (reward, 33 items): no winner" in changed
    assert "sdft retention: no \"no forgetting\" claim" in changed


def test_the_mhc_claim_needs_an_on_and_an_off_arm_and_reads_their_comparison(tmp_path):
    root = tmp_path
    write(root / "pretrain" / "pretrain" / "model_config.json", {"mhc": {"enabled": True}})
    write_registry(root)
    assert "mHC: no claim about mHC: no mHC-off control arm was pretrained" in (root / "results.md").read_text()
    assert "the pipeline's model has mHC on" in (root / "results.md").read_text()

    write(root / "pretrain" / "pretrain_plain" / "model_config.json", {"mhc": {"enabled": True}})
    write_registry(root)
    assert ("mHC: no claim about mHC: pretrain/pretrain has mHC on and pretrain/pretrain_plain mHC on: not an on / "
            "off pair") in (root / "results.md").read_text()

    write(root / "pretrain" / "pretrain_plain" / "model_config.json", {"mhc": {"enabled": False}})
    write_registry(root)
    assert "pretrain/mhc_on_vs_off.json, both arms' perplexity on the same windows, is missing" in \
           (root / "results.md").read_text()

    write(root / "pretrain" / "mhc_on_vs_off.json", retention(0.95, 0.99))
    write_registry(root)
    text = (root / "results.md").read_text()
    assert "| 16 | 4.000 | 3.880 | 0.9700 [0.9500, 0.9900] |" in text
    assert ("mHC on vs off (perplexity ratio on / off on 16 validation windows, 0.9700 [0.9500, 0.9900]): mHC on has "
            "the lower validation perplexity") in text
    assert "mHC on / off (ppl ratio) & 16 & 0.9700 [0.9500, 0.9900]" in (root / "results.tex").read_text()

    write(root / "pretrain" / "mhc_on_vs_off.json", retention(0.98, 1.03))
    write_registry(root)
    assert "0.9700" not in (root / "results.md").read_text()
    assert "no winner between mHC on and off (the interval spans 1)" in (root / "results.md").read_text()
