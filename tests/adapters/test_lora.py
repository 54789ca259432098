"""LoRA through peft on every backbone family: targets, freezing, optimizer, reference policy, checkpointing, export."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from adapter_helpers import EXPECTED_TARGETS, FAMILIES, fixed_batch, randomize_lora, tiny
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors import safe_open
from torch import nn

from dllm_zoo.adapters import (
    LoRA,
    adapter_layers,
    adapter_parameters,
    apply_lora,
    disable_adapter,
    has_adapter,
    lora_targets,
    merge_adapter,
    merge_and_export,
)
from dllm_zoo.backbones import LLaDABackbone, SDARBackbone
from dllm_zoo.backbones.base import Backbone
from dllm_zoo.data import TextDiffusionDataModule
from dllm_zoo.data.synthetic import Arithmetic
from dllm_zoo.samplers import BlockSampler, LLaDASampler
from dllm_zoo.stages import BlockDiffusionSFT, MaskedDiffusionPretraining, OptimConfig
from dllm_zoo.stages.base import ADAPTER_CHECKPOINT_KEY
from dllm_zoo.stages.optim import build_optimizer, param_groups

STAGES = [
    pytest.param(MaskedDiffusionPretraining, LLaDABackbone, id="pretrain-llada"),
    pytest.param(BlockDiffusionSFT, SDARBackbone, id="block_sft-sdar"),
]


def adapted_names(backbone: Backbone) -> list[str]:
    layers = {id(m) for m in adapter_layers(backbone)}
    return [name for name, m in backbone.named_modules() if id(m) in layers]


# ------------------------------------------------------------------------------------------------- targets
@pytest.mark.parametrize("family", FAMILIES)
def test_family_defaults_adapt_exactly_the_block_projections(family: type[Backbone]) -> None:
    backbone = apply_lora(tiny(family)(), LoRA(rank=4))
    assert adapted_names(backbone) == EXPECTED_TARGETS[family]
    head = backbone.output_head()
    assert type(head) is nn.Linear  # never wrapped: LLaDA's head shares the leaf name ff_out with the blocks'
    assert head.weight.requires_grad is False
    assert not [
        k for k in backbone.state_dict() if k.startswith(("model.transformer.ff_out.", "lm_head.")) and "lora" in k
    ]
    assert "model.transformer.ff_out.weight" in backbone.state_dict() or "lm_head.weight" in backbone.state_dict()


def test_user_targets_match_paths_inside_the_blocks_only() -> None:
    sdar = tiny(SDARBackbone)()
    assert lora_targets(sdar, ["mlp.up_proj", "q_proj"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.up_proj",
    ]
    llada = tiny(LLaDABackbone)()
    assert lora_targets(llada, ["ff_out"]) == ["model.transformer.blocks.0.ff_out", "model.transformer.blocks.1.ff_out"]


def test_bad_adapter_settings_name_the_flag_to_fix() -> None:
    llada = tiny(LLaDABackbone)()
    with pytest.raises(ValueError, match=r"--model.adapter.target_modules entry 'qkv'.*matches no module.*'q_proj'"):
        apply_lora(llada, LoRA(target_modules=("q_proj", "qkv")))
    assert not has_adapter(llada)  # validated before anything changed
    with pytest.raises(ValueError, match=r"entry 'mlp'.*SwiGLUMLP\), not a Linear layer.*'mlp.down_proj'"):
        lora_targets(tiny(SDARBackbone)(), ["mlp"])
    with pytest.raises(ValueError, match=r"invalid --model.adapter: rank=0 must be > 0; dropout=1.0"):
        LoRA(rank=0, dropout=1.0)
    with pytest.raises(ValueError, match="quantize='nf8' must be null or 'nf4'"):
        LoRA(quantize="nf8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"target_modules=\[\] adapts nothing"):
        LoRA(target_modules=())
    apply_lora(llada, LoRA())
    with pytest.raises(ValueError, match="already has an adapter"):
        apply_lora(llada, LoRA())


# ------------------------------------------------------------------------------------ training in stages
@pytest.mark.parametrize(("stage_cls", "family"), STAGES)
def test_only_the_adapter_trains_and_the_optimizer_sees_only_it(stage_cls: type, family: type[Backbone]) -> None:
    stage = stage_cls(backbone=tiny(family), adapter=LoRA(rank=4), optim=OptimConfig(warmup_steps=1))
    stage.configure_model()
    stage.configure_model()  # Lightning may call it again: the adapter is applied once
    lora = {id(p) for p in adapter_parameters(stage.net)}
    assert len(lora) == 2 * len(EXPECTED_TARGETS[family])
    assert {id(p) for p in stage.parameters() if p.requires_grad} == lora
    assert {id(p) for g in param_groups(stage, 0.1) for p in g["params"]} == lora
    opt, _ = build_optimizer(stage, stage.optim, max_steps=10)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == lora

    stage.train()
    out = stage.forward_loss(fixed_batch(), batch_idx=0)
    out.loss.backward()
    with_grad = {id(p) for p in stage.parameters() if p.grad is not None}
    assert with_grad == lora
    # B starts at zero, so A gets no gradient at step 0; B must.
    assert all(p.grad.abs().sum() > 0 for n, p in stage.named_parameters() if "lora_B" in n)
    assert stage.hparams["adapter"] == LoRA(rank=4).to_dict()  # plain types in hparams


@pytest.mark.parametrize("family", FAMILIES)
def test_a_fresh_adapter_is_the_base_model_and_disable_adapter_gives_it_back(family: type[Backbone]) -> None:
    base = tiny(family)().eval()
    stage = MaskedDiffusionPretraining(backbone=copy.deepcopy(base), adapter=LoRA(rank=4))
    stage.configure_model()
    net = stage.net.eval()
    x = torch.randint(0, 300, (2, 24))
    expected = base(x).logits
    assert torch.equal(net(x).logits, expected)  # B = 0: exactly the base model before training
    randomize_lora(net)
    assert not torch.allclose(net(x).logits, expected, atol=1e-3)
    flags = [p.requires_grad for p in net.parameters()]
    with stage.disable_adapter():
        assert torch.equal(net(x).logits, expected)  # same kernels as the base model: bitwise equal
        with disable_adapter(net):  # nesting is harmless
            assert torch.equal(net(x).logits, expected)
        assert torch.equal(net(x).logits, expected)
    assert not torch.allclose(net(x).logits, expected, atol=1e-3)
    assert [p.requires_grad for p in net.parameters()] == flags
    with pytest.raises(RuntimeError, match="boom"), disable_adapter(net):
        raise RuntimeError("boom")
    assert not torch.allclose(net(x).logits, expected, atol=1e-3)  # restored after an exception too
    assert [p.requires_grad for p in net.parameters()] == flags

    plain = MaskedDiffusionPretraining(backbone=tiny(family))
    plain.configure_model()
    with pytest.raises(ValueError, match="--model.adapter"), plain.disable_adapter():
        pass


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_the_same_adapter_gradients(family: type[Backbone]) -> None:
    grads = []
    for checkpointing in (False, True):
        net = apply_lora(tiny(family, gradient_checkpointing=checkpointing)(), LoRA(rank=4, dropout=0.1))
        randomize_lora(net)
        net.train()
        calls: list[int] = []
        net.transformer_blocks()[0].register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        torch.manual_seed(5)  # the same LoRA-dropout masks in both runs (checkpoint replays the RNG state)
        x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
        net(x).logits.float().pow(2).mean().backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in backward: checkpointing really ran
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("family", FAMILIES)
def test_merge_and_export_writes_the_original_layout_with_the_adapted_logits(
    family: type[Backbone], tmp_path: Path
) -> None:
    stage = MaskedDiffusionPretraining(backbone=tiny(family), adapter=LoRA(rank=4, alpha=8.0))
    stage.configure_model()
    net = stage.net.eval()
    randomize_lora(net)
    x = torch.randint(0, 300, (2, 24))
    adapted = net(x).logits

    out = merge_and_export(stage, tmp_path / "merged")
    original = tiny(family)()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(original.state_dict())  # original keys, no base_layer/lora_* keys
    config = json.loads((out / "config.json").read_text())
    assert config == original.config.to_json_dict(original.layout) | {
        k: v for k, v in config.items() if k == "torch_dtype"
    }
    reloaded = family.from_pretrained(out).eval()
    torch.testing.assert_close(reloaded(x).logits, adapted, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(reloaded(x).logits, original.eval()(x).logits, atol=1e-3)  # the adapter is in it

    assert has_adapter(net)
    assert torch.equal(net(x).logits, adapted)
    merged = merge_adapter(net)
    assert merged is net
    assert not has_adapter(net)
    assert sorted(net.state_dict()) == sorted(original.state_dict())
    assert all(p.requires_grad for p in net.parameters())
    torch.testing.assert_close(net(x).logits, adapted, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ checkpoints
class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.losses[trainer.global_step] = float(outputs["loss"])


@pytest.mark.parametrize(
    ("quantize", "pretrained", "adapter_only"),
    [
        pytest.param(None, True, True, id="lora-pretrained-base"),  # the base is read back from `pretrained`
        pytest.param(None, False, False, id="lora-fresh-base"),  # nothing could rebuild the base: it is saved
        pytest.param("nf4", False, True, id="qlora-fresh-base"),  # 4-bit storage cannot be reloaded: seed rebuild
    ],
)
def test_adapter_checkpoints_resume_exactly(
    quantize: str | None, pretrained: bool, adapter_only: bool, tmp_path: Path
) -> None:
    if quantize:
        pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install 'dllm_zoo[quant]')")
    base_dir = tmp_path / "base"
    tiny(LLaDABackbone, seed=7)().save_pretrained(base_dir)

    def backbone(seed: int = 0) -> LLaDABackbone:
        return LLaDABackbone(pretrained=str(base_dir)) if pretrained else tiny(LLaDABackbone, seed=seed)()

    def stage(base_seed: int = 0) -> MaskedDiffusionPretraining:
        # dropout 0: LoRA dropout draws from the global RNG, which Lightning checkpoints do not restore
        return MaskedDiffusionPretraining(
            backbone=lambda: backbone(base_seed),
            adapter=LoRA(rank=4, dropout=0.0, quantize=quantize),  # type: ignore[arg-type]
            optim=OptimConfig(lr=1e-2, warmup_steps=2),
            seed=3,
        )

    def trainer(root: Path, callbacks: list) -> L.Trainer:
        return L.Trainer(
            accelerator="cpu",
            max_steps=6,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            default_root_dir=str(root),
            callbacks=callbacks,
        )

    def data() -> TextDiffusionDataModule:
        task = Arithmetic(num_train=64, num_val=8, seed=3)
        return TextDiffusionDataModule(task=task, seq_len=32, batch_size=4, cache_dir=str(tmp_path / "cache"))

    full = LossRecorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer(tmp_path / "a", [full, ckpt]).fit(stage(), datamodule=data())
    path = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    saved = torch.load(path, weights_only=True)
    lora_keys = [k for k in saved["state_dict"] if ".lora_A." in k or ".lora_B." in k]
    assert len(lora_keys) == 2 * len(EXPECTED_TARGETS[LLaDABackbone])
    assert (len(lora_keys) == len(saved["state_dict"])) is adapter_only
    entry = saved[ADAPTER_CHECKPOINT_KEY]
    assert entry["adapter"]["quantize"] == quantize
    assert entry["base"] == (str(base_dir) if pretrained else None)

    resumed = LossRecorder()
    if adapter_only and not pretrained:
        with pytest.warns(UserWarning, match="initialised from the seed"):
            trainer(tmp_path / "b", [resumed]).fit(stage(), datamodule=data(), ckpt_path=str(path))
    else:  # a saved base must win over a differently initialised one
        trainer(tmp_path / "b", [resumed]).fit(stage(base_seed=99), datamodule=data(), ckpt_path=str(path))
    assert sorted(resumed.losses) == [4, 5, 6]
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(full.losses[step], abs=1e-6), step

    wrong = MaskedDiffusionPretraining(backbone=lambda: backbone(0), adapter=LoRA(rank=8, quantize=quantize))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"another adapter: set --model.adapter to match it: rank=4 \(now 8\)"):
        trainer(tmp_path / "c", []).fit(wrong, datamodule=data(), ckpt_path=str(path))


# ---------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize(
    ("family", "make_sampler"),
    [
        pytest.param(
            LLaDABackbone, lambda: LLaDASampler(gen_length=16, block_length=8, steps=8, cache="dual"), id="llada"
        ),
        pytest.param(SDARBackbone, lambda: BlockSampler(gen_length=16, block_length=4, denoising_steps=2), id="sdar"),
    ],
)
def test_samplers_decode_an_adapted_backbone_like_its_merged_export(family, make_sampler, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    net = apply_lora(tiny(family)(), LoRA(rank=4, alpha=8.0)).eval()
    randomize_lora(net, std=0.3)
    prompt = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        adapted = make_sampler().generate(net, prompt).tokens
        merged = make_sampler().generate(family.from_pretrained(merge_and_export(net, tmp_path / "m")).eval(), prompt)
        with disable_adapter(net):
            base = make_sampler().generate(net, prompt).tokens
    assert torch.equal(adapted, merged.tokens)
    assert not torch.equal(adapted, base)  # the adapter changes what is decoded
