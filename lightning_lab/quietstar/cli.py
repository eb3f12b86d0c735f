"""`lab quietstar`: the baking stage (fit | validate | predict, a LightningCLI) and the whole pipeline (bake).

    lab quietstar fit --config configs/quietstar/quietstar_tiny_gpt.yaml    # the stage: baking.py's docstring
    lab quietstar predict --config ... --ckpt_path last                    # the baked model's answers
    lab quietstar bake --config configs/quietstar/bake_smollm2.yaml         # inject -> A/B -> bake -> A/B
    lab quietstar fit --help | lab quietstar bake --help                   # every option
"""

from __future__ import annotations


def main(argv: list[str]) -> int:
    if argv[:1] in ([], ["-h"], ["--help"]):
        print(__doc__)
        return 0
    if argv[:1] == ["bake"]:
        from lightning_lab.quietstar.pipeline import bake_main

        return bake_main(argv[1:])
    from lightning_lab.quietstar.baking import fit_main

    fit_main(argv)
    return 0
