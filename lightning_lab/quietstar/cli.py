"""`lab quietstar`: the baking stage (fit | validate | predict, a LightningCLI) and the whole pipeline (bake).

    lab quietstar fit --config configs/quietstar/quietstar_tiny.yaml      # baking.py's module docstring
    lab quietstar bake --model smollm2-135m --out runs/quietstar/bake --eval_dataset PATH   # pipeline.py
"""

from __future__ import annotations


def main(argv: list[str]) -> int:
    if argv[:1] == ["bake"]:
        from lightning_lab.quietstar.pipeline import bake_main

        return bake_main(argv[1:])
    from lightning_lab.quietstar.baking import fit_main

    fit_main(argv)
    return 0
