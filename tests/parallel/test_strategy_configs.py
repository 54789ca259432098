"""Every strategy fragment parses with every recipe and names the strategy class it is for.

Parsed with ``--print_config`` (nothing instantiated): DeepSpeed is not installed here and FSDP1 needs CUDA.
"""

import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FRAGMENTS = sorted((ROOT / "recipes" / "configs" / "strategies").glob("*.yaml"))
EXPECTED = {
    "ddp": "lightning.pytorch.strategies.DDPStrategy",
    "fsdp2": "dllm_zoo.parallel.FSDP2Strategy",
    "fsdp": "dllm_zoo.parallel.BlockFSDPStrategy",
    "deepspeed_zero2": "lightning.pytorch.strategies.DeepSpeedStrategy",
    "deepspeed_zero3": "lightning.pytorch.strategies.DeepSpeedStrategy",
}


def test_every_strategy_has_a_fragment() -> None:
    assert sorted(p.stem for p in FRAGMENTS) == sorted(EXPECTED)


@pytest.mark.parametrize("recipe", ["pretrain", "sdar"])
@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: p.stem)
def test_strategy_fragment_parses_with_every_recipe(
    recipe: str, fragment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main = runpy.run_path(str(ROOT / "recipes" / f"{recipe}.py"))["main"]
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(fragment), "--print_config"])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert f"class_path: {EXPECTED[fragment.stem]}" in printed
