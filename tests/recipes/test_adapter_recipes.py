"""The LoRA / QLoRA fragments on every recipe: they parse, and a few-step run trains the adapter alone."""

from pathlib import Path

import lightning as L
import pytest
import torch

from dllm_zoo.adapters import adapter_parameters, has_adapter
from dllm_zoo.data import TextDiffusionDataModule
from dllm_zoo.recipe import run_recipe
from dllm_zoo.stages import BlockDiffusionSFT, MaskedDiffusionPretraining
from dllm_zoo.stages.base import ADAPTER_CHECKPOINT_KEY

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "recipes" / "configs"
RECIPES = {"pretrain": MaskedDiffusionPretraining, "sdar": BlockDiffusionSFT}
FRAGMENTS = sorted((CONFIGS / "adapters").glob("*.yaml"))


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: p.stem)
def test_adapter_fragment_parses_with_every_recipe(recipe: str, fragment: Path) -> None:
    cli = run_recipe(
        RECIPES[recipe],
        TextDiffusionDataModule,
        CONFIGS / recipe / "default.yaml",
        ["--config", str(fragment)],
        run=False,
    )
    adapter = cli.model.adapter
    assert adapter is not None
    assert adapter.rank == 16
    assert adapter.quantize == ("nf4" if fragment.stem == "qlora" else None)


class FrozenBaseCheck(L.Callback):
    """Snapshots every non-adapter tensor once the model is built, and compares at the end of training."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        lora = {id(p) for p in adapter_parameters(pl_module)}
        self.lora_before = {n: p.detach().clone() for n, p in pl_module.named_parameters() if id(p) in lora}
        self.base = {n: p.detach().clone() for n, p in pl_module.named_parameters() if id(p) not in lora}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = dict(pl_module.named_parameters())
        self.base_changed = [n for n, v in self.base.items() if not torch.equal(params[n].detach(), v)]
        self.lora_changed = [n for n, v in self.lora_before.items() if not torch.equal(params[n].detach(), v)]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("fragment", ["lora", "qlora"])
def test_adapter_recipe_run_trains_only_the_adapter(recipe: str, fragment: str, tmp_path: Path) -> None:
    if fragment == "qlora":
        pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install 'dllm_zoo[quant]')")
    cli = run_recipe(
        RECIPES[recipe],
        TextDiffusionDataModule,
        CONFIGS / recipe / "default.yaml",
        [
            "--config",
            str(CONFIGS / "adapters" / f"{fragment}.yaml"),
            "--trainer.max_steps=3",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--model.optim.warmup_steps=1",
            "--data.batch_size=4",
        ],
        run=False,
    )
    check = FrozenBaseCheck()
    cli.trainer.callbacks.append(check)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    assert has_adapter(cli.model.net)
    assert check.base
    assert not check.base_changed
    assert sorted(check.lora_changed) == sorted(check.lora_before)  # every factor trained (A from step 2, once B != 0)
    optimized = {id(p) for opt in cli.trainer.optimizers for g in opt.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in adapter_parameters(cli.model)}
    ckpt = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)
    adapter_only = all(".lora_A." in k or ".lora_B." in k for k in ckpt["state_dict"])
    # The recipe default's base is initialised from the seed: LoRA saves it with the adapter; QLoRA cannot reload
    # 4-bit storage, so its checkpoint holds the adapter alone and the base is rebuilt from the seed.
    assert adapter_only is (fragment == "qlora")
    assert ckpt[ADAPTER_CHECKPOINT_KEY]["adapter"]["quantize"] == ("nf4" if fragment == "qlora" else None)
