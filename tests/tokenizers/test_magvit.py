import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dllm_zoo.tokenizers import ImageTokenizer, MagvitV2Tokenizer
from dllm_zoo.tokenizers.magvit import AttnBlock, LookupFreeQuantizer

# Parameters of the released showlab/magvitv2 architecture (fp32: 381.97 MB with the LFQ buffers, matching the
# 382 MB pytorch_model.safetensors).
DEFAULT_PARAMETERS = 95_387_004

TINY = {
    "base_channels": 16,
    "ch_mult": (1, 2, 2, 4, 4),
    "num_res_blocks": (1, 2, 1, 1, 1),
    "decoder_ch_mult": (1, 1, 2, 2, 4),
    "decoder_num_res_blocks": (2, 1, 1, 1, 1),
    "num_groups": 8,
    "bits": 13,
}


def _tiny(seed: int = 0, **overrides: object) -> MagvitV2Tokenizer:
    torch.manual_seed(seed)
    return MagvitV2Tokenizer(**{**TINY, **overrides})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny() -> MagvitV2Tokenizer:
    return _tiny()


@pytest.fixture(scope="module")
def default_meta() -> MagvitV2Tokenizer:
    with torch.device("meta"):
        return MagvitV2Tokenizer()


# ------------------------------------------------------------------------------------------------- shapes / coding
@pytest.mark.parametrize("side", [32, 64])
def test_encode_decode_shapes(tiny: MagvitV2Tokenizer, side: int) -> None:
    assert isinstance(tiny, ImageTokenizer)
    assert (tiny.codebook_size, tiny.downsample) == (8192, 16)
    torch.manual_seed(1)
    images = torch.rand(2, 3, side, side)
    codes = tiny.encode(images)
    assert codes.shape == (2, side // 16, side // 16)
    assert codes.dtype == torch.int64
    assert int(codes.min()) >= 0
    assert int(codes.max()) < 8192
    out = tiny.decode(codes)
    assert out.shape == (2, 3, side, side)
    assert out.dtype == torch.float32
    assert float(out.min()) >= 0.0
    assert float(out.max()) <= 1.0
    # non-square grids work too
    assert tiny.decode(codes[:, :1]).shape == (2, 3, 16, side)


def test_encode_is_lfq_of_latents(tiny: MagvitV2Tokenizer) -> None:
    torch.manual_seed(2)
    images = torch.rand(1, 3, 32, 32)
    z = tiny.encode_latents(images)
    assert z.shape == (1, 13, 2, 2)
    q, idx = tiny.quantize_latents(z)
    assert torch.equal(idx, tiny.encode(images))
    assert torch.equal(q, torch.where(z > 0, 1.0, -1.0))
    assert torch.equal(tiny.decode_code(idx), q)


def test_encode_refuses_bad_images_and_decode_bad_codes(tiny: MagvitV2Tokenizer) -> None:
    with pytest.raises(ValueError, match="multiple of the tokenizer's downsample 16"):
        tiny.encode(torch.rand(1, 3, 24, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny.encode(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="codes must lie in"):
        tiny.decode(torch.full((1, 2, 2), 8192))
    with pytest.raises(ValueError, match=r"\[B, h, w\]"):
        tiny.decode_code(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"latents must be \[B, 13"):
        tiny.quantize_latents(torch.zeros(1, 12, 2, 2))


def test_frozen_by_default_and_trainable_on_request() -> None:
    tok = _tiny()
    assert not tok.training
    assert not any(p.requires_grad for p in tok.parameters())
    free = _tiny(frozen=False)
    assert free.training
    assert all(p.requires_grad for p in free.parameters())


# ---------------------------------------------------------------------------------------------------------- LFQ
def test_lfq_index_math_channel0_is_msb_and_zero_is_negative() -> None:
    lfq = LookupFreeQuantizer(4)
    # z [1, 4, 1, 5]: positions (columns) hand-computed below
    z = torch.tensor(
        [
            [0.5, -1.0, 0.0, 2.0, 1e-6],  # channel 0 -> bit 8
            [-0.1, -1.0, 0.0, 2.0, -0.0],  # channel 1 -> bit 4
            [-0.2, -1.0, 0.0, 2.0, 0.0],  # channel 2 -> bit 2
            [0.3, -1.0, 0.0, 2.0, 3.0],  # channel 3 -> bit 1
        ]
    ).view(1, 4, 1, 5)
    q, idx = lfq(z)
    assert idx.tolist() == [[[8 + 1, 0, 0, 15, 8 + 1]]]
    expected_q = torch.tensor([[1.0, -1, -1, 1, 1], [-1, -1, -1, 1, -1], [-1, -1, -1, 1, -1], [1, -1, -1, 1, 1]]).view(
        1, 4, 1, 5
    )
    assert torch.equal(q, expected_q)
    assert lfq.power_vals.tolist() == [8, 4, 2, 1]
    assert lfq.power_vals.dtype == torch.int64
    assert lfq.embedding.shape == (16, 4)
    assert lfq.embedding[0].tolist() == [-1, -1, -1, -1]
    assert lfq.embedding[9].tolist() == [1, -1, -1, 1]
    assert lfq.embedding[15].tolist() == [1, 1, 1, 1]


def test_lfq_straight_through_gradient() -> None:
    lfq = LookupFreeQuantizer(3)
    z = torch.randn(2, 3, 2, 2, requires_grad=True)
    q, _ = lfq(z)
    (q * torch.arange(24.0).view(2, 3, 2, 2)).sum().backward()
    assert z.grad is not None
    assert torch.equal(z.grad, torch.arange(24.0).view(2, 3, 2, 2))


def test_embedding_rows_are_index_bits_for_13_bits() -> None:
    emb, power = LookupFreeQuantizer.codebook(13)
    assert emb.shape == (8192, 13)
    assert power.tolist() == [2 ** (12 - k) for k in range(13)]
    # every row reads back as its own index
    rows = emb.t().reshape(1, 13, 1, 8192)
    assert torch.equal(LookupFreeQuantizer(13).indices(rows)[0, 0], torch.arange(8192))
    assert emb[1].tolist() == [-1.0] * 12 + [1.0]
    assert emb[4096].tolist() == [1.0] + [-1.0] * 12


def test_decode_code_inverts_the_index_math(tiny: MagvitV2Tokenizer) -> None:
    torch.manual_seed(3)
    codes = torch.randint(0, 8192, (3, 4, 5))
    vec = tiny.decode_code(codes)
    assert vec.shape == (3, 13, 4, 5)
    assert set(vec.unique().tolist()) <= {-1.0, 1.0}
    bits = (vec > 0).long()
    manual = sum(bits[:, k] * 2 ** (12 - k) for k in range(13))
    assert torch.equal(manual, codes)
    _, again = tiny.quantize_latents(vec)
    assert torch.equal(again, codes)


def test_attention_is_single_head_softmax_over_positions() -> None:
    torch.manual_seed(4)
    attn = AttnBlock(16, num_groups=4)
    x = torch.randn(2, 16, 3, 5)
    n = attn.norm(x)
    q, k, v = (conv(n).flatten(2) for conv in (attn.q, attn.k, attn.v))  # [B, C, N]
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(16), dim=-1)
    ref = x + attn.proj_out(torch.einsum("bij,bcj->bci", w, v).view(2, 16, 3, 5))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ default architecture
EXPECTED_KEYS = [
    "encoder.conv_in.weight",
    "encoder.down.0.block.3.conv2.weight",
    "encoder.down.0.block.0.norm1.weight",
    "encoder.down.1.block.0.nin_shortcut.weight",
    "encoder.down.1.block.2.norm2.bias",
    "encoder.down.3.block.0.nin_shortcut.weight",
    "encoder.down.4.block.3.norm1.weight",
    "encoder.down.0.downsample.conv.weight",
    "encoder.down.3.downsample.conv.weight",
    "encoder.mid.block_1.conv1.weight",
    "encoder.mid.attn_1.norm.weight",
    "encoder.mid.attn_1.q.weight",
    "encoder.mid.attn_1.k.weight",
    "encoder.mid.attn_1.v.weight",
    "encoder.mid.attn_1.proj_out.weight",
    "encoder.mid.block_2.conv2.bias",
    "encoder.norm_out.weight",
    "encoder.conv_out.weight",
    "encoder.quant_conv.weight",
    "decoder.post_quant_conv.weight",
    "decoder.conv_in.weight",
    "decoder.mid.attn_1.proj_out.bias",
    "decoder.up.0.block.3.conv2.weight",
    "decoder.up.1.block.0.nin_shortcut.weight",
    "decoder.up.1.block.3.conv1.weight",
    "decoder.up.1.upsample.conv.weight",
    "decoder.up.3.block.0.nin_shortcut.weight",
    "decoder.up.4.block.2.conv2.weight",
    "decoder.up.4.upsample.conv.weight",
    "decoder.norm_out.weight",
    "decoder.conv_out.weight",
    "quantize.embedding",
    "quantize.power_vals",
]


def test_default_state_dict_keys_and_shapes(default_meta: MagvitV2Tokenizer) -> None:
    sd = default_meta.state_dict()
    assert all(t.is_meta for t in sd.values())
    missing = [k for k in EXPECTED_KEYS if k not in sd]
    assert not missing
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert shapes["encoder.conv_out.weight"] == (13, 512, 3, 3)
    assert shapes["encoder.quant_conv.weight"] == (13, 13, 1, 1)
    assert shapes["decoder.post_quant_conv.weight"] == (13, 13, 1, 1)
    assert shapes["decoder.conv_in.weight"] == (512, 13, 3, 3)
    assert shapes["decoder.conv_out.weight"] == (3, 128, 3, 3)
    assert shapes["decoder.up.4.upsample.conv.weight"] == (512, 512, 3, 3)
    assert shapes["decoder.up.3.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
    assert shapes["decoder.up.1.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert shapes["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["quantize.embedding"] == (8192, 13)
    assert shapes["quantize.power_vals"] == (13,)

    # exact families: no resampling on the last encoder level / decoder level 0, no attention inside levels
    assert not [k for k in sd if k.startswith("encoder.down.4.downsample")]
    assert not [k for k in sd if k.startswith("decoder.up.0.upsample")]
    assert not [k for k in sd if ".attn." in k or "temb" in k or "conv_shortcut" in k]
    nin = sorted({k.rsplit(".nin_shortcut", 1)[0] for k in sd if "nin_shortcut" in k})
    assert nin == [
        "decoder.up.1.block.0",
        "decoder.up.3.block.0",
        "encoder.down.1.block.0",
        "encoder.down.3.block.0",
    ]
    blocks = {}
    for k in sd:
        parts = k.split(".")
        if parts[1] in ("down", "up") and parts[3] == "block":
            key = (parts[0], int(parts[2]))
            blocks[key] = max(blocks.get(key, 0), int(parts[4]) + 1)
    assert [blocks["encoder", lvl] for lvl in range(5)] == [4, 3, 4, 3, 4]
    assert [blocks["decoder", lvl] for lvl in range(5)] == [4, 4, 3, 4, 3]
    widths = [sd[f"decoder.up.{lvl}.block.0.conv2.weight"].shape[0] for lvl in range(5)]
    assert widths == [128, 128, 256, 256, 512]
    prefixes = {k.split(".")[0] for k in sd}
    assert prefixes == {"encoder", "decoder", "quantize"}
    assert len(sd) == 382


def test_default_parameter_count(default_meta: MagvitV2Tokenizer) -> None:
    assert sum(p.numel() for p in default_meta.parameters()) == DEFAULT_PARAMETERS
    assert sum(b.numel() for b in default_meta.buffers()) == 8192 * 13 + 13
    assert (default_meta.codebook_size, default_meta.downsample) == (8192, 16)


# ------------------------------------------------------------------------------------------------- checkpoints
def _write_original(tmp_path: Path, state: dict[str, torch.Tensor], config: object = None) -> None:
    """A checkpoint written by hand in the original layout: pytorch_model.safetensors + a tiny config.json."""
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "pytorch_model.safetensors"))
    cfg = {"_class_name": "MAGViTv2", "_diffusers_version": "0.30.1"} if config is None else config
    (tmp_path / "config.json").write_text(json.dumps(cfg))


def test_save_load_round_trip(tmp_path) -> None:
    tok = _tiny(seed=5)
    tok.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "pytorch_model.safetensors"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["_class_name"] == "MAGViTv2"
    assert cfg["num_res_blocks"] == [1, 2, 1, 1, 1]
    again = MagvitV2Tokenizer.from_pretrained(tmp_path)
    assert again.config == tok.config
    assert again.pretrained_from == str(tmp_path)
    a, b = tok.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert not again.training
    assert not any(p.requires_grad for p in again.parameters())
    assert not any(t.is_meta for t in b.values())
    torch.manual_seed(6)
    images = torch.rand(2, 3, 32, 48)
    assert torch.equal(tok.encode(images), again.encode(images))
    codes = tok.encode(images)
    torch.testing.assert_close(tok.decode(codes), again.decode(codes), rtol=0, atol=0)


def test_from_pretrained_dtype_and_trainable(tmp_path) -> None:
    _tiny(seed=5).save_pretrained(tmp_path)
    half = MagvitV2Tokenizer.from_pretrained(tmp_path, dtype=torch.bfloat16, frozen=False)
    assert half.encoder.conv_in.weight.dtype == torch.bfloat16
    assert half.quantize.power_vals.dtype == torch.int64
    assert half.encoder.conv_in.weight.requires_grad
    assert half.decode(torch.zeros(1, 1, 1, dtype=torch.long)).shape == (1, 3, 16, 16)


def test_loads_handwritten_original_layout(tmp_path) -> None:
    ref = _tiny(seed=7)
    _write_original(tmp_path, dict(ref.state_dict()), config={**TINY, "_class_name": "MAGViTv2"})
    tok = MagvitV2Tokenizer.from_pretrained(tmp_path)
    assert all(torch.equal(v, tok.state_dict()[k]) for k, v in ref.state_dict().items())


def test_loads_without_buffers_and_with_minimal_config_plus_overrides(tmp_path) -> None:
    ref = _tiny(seed=8)
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("quantize.")}
    _write_original(tmp_path, state)  # config holds only _class_name / _diffusers_version
    tok = MagvitV2Tokenizer.from_pretrained(tmp_path, **TINY)
    assert torch.equal(tok.quantize.embedding, ref.quantize.embedding)
    assert torch.equal(tok.quantize.power_vals, ref.quantize.power_vals)
    images = torch.rand(1, 3, 32, 32)
    assert torch.equal(tok.encode(images), ref.encode(images))


@pytest.mark.parametrize("name", ["model.safetensors", "diffusion_pytorch_model.safetensors"])
def test_accepts_alternative_weight_names(tmp_path, name: str) -> None:
    ref = _tiny(seed=9)
    save_file(dict(ref.state_dict()), str(tmp_path / name))
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    tok = MagvitV2Tokenizer.from_pretrained(tmp_path)
    assert torch.equal(tok.decoder.conv_out.weight, ref.decoder.conv_out.weight)


def test_missing_weights_names_every_file_tried(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="pytorch_model.safetensors, model.safetensors or diffusion_py"):
        MagvitV2Tokenizer.from_pretrained(tmp_path)


def test_unknown_config_keys(tmp_path) -> None:
    _write_original(tmp_path, dict(_tiny().state_dict()), config={**TINY, "_anything": 1, "resolution": 256})
    with pytest.warns(UserWarning, match=r"ignoring unknown MAGVIT-v2 config keys \['resolution'\]"):
        MagvitV2Tokenizer.from_pretrained(tmp_path)


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path) -> None:
    state = dict(_tiny().state_dict())
    (tmp_path / "missing").mkdir()
    _write_original(
        tmp_path / "missing", {k: v for k, v in state.items() if k != "decoder.up.1.block.0.conv1.bias"}, TINY
    )
    with pytest.raises(ValueError, match=r"missing keys \['decoder.up.1.block.0.conv1.bias'\]"):
        MagvitV2Tokenizer.from_pretrained(tmp_path / "missing")

    (tmp_path / "unexpected").mkdir()
    _write_original(tmp_path / "unexpected", {**state, "encoder.down.4.downsample.conv.weight": torch.zeros(1)}, TINY)
    with pytest.raises(ValueError, match=r"unexpected keys \['encoder.down.4.downsample.conv.weight'\]"):
        MagvitV2Tokenizer.from_pretrained(tmp_path / "unexpected")

    (tmp_path / "shape").mkdir()
    _write_original(tmp_path / "shape", {**state, "encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, TINY)
    with pytest.raises(ValueError, match=r"encoder.conv_in.weight: checkpoint \[8, 3, 3, 3\] vs model \[16, 3, 3, 3\]"):
        MagvitV2Tokenizer.from_pretrained(tmp_path / "shape")

    # default widths against a tiny file: every family reported in one error
    with pytest.raises(ValueError, match="mis-shaped keys") as info:
        MagvitV2Tokenizer.from_pretrained(tmp_path / "shape", num_res_blocks=(4, 3, 4, 3, 4))
    assert "missing keys" in str(info.value)


def test_wrong_lfq_buffers_are_refused(tmp_path) -> None:
    state = dict(_tiny().state_dict())
    flipped = state["quantize.embedding"].flip(-1)  # channel 0 = LSB: the wrong bit order
    _write_original(tmp_path, {**state, "quantize.embedding": flipped}, TINY)
    with pytest.raises(ValueError, match="quantize.embedding differs from the 13-bit LFQ codebook"):
        MagvitV2Tokenizer.from_pretrained(tmp_path)


def test_corrupt_files_raise_clearly(tmp_path) -> None:
    (tmp_path / "pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    with pytest.raises(ValueError, match="cannot read safetensors file .*pytorch_model.safetensors"):
        MagvitV2Tokenizer.from_pretrained(tmp_path)

    trunc = tmp_path / "truncated"
    _tiny().save_pretrained(trunc)
    data = (trunc / "pytorch_model.safetensors").read_bytes()
    (trunc / "pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read safetensors file"):
        MagvitV2Tokenizer.from_pretrained(trunc)

    bad_cfg = tmp_path / "badcfg"
    _tiny().save_pretrained(bad_cfg)
    (bad_cfg / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        MagvitV2Tokenizer.from_pretrained(bad_cfg)


def test_bad_architecture_arguments() -> None:
    with pytest.raises(ValueError, match="one num_res_blocks entry per level"):
        MagvitV2Tokenizer(ch_mult=(1, 2), num_res_blocks=(1,), decoder_ch_mult=(1, 2), decoder_num_res_blocks=(1, 1))
    with pytest.raises(ValueError, match="same number of levels"):
        MagvitV2Tokenizer(
            base_channels=8, ch_mult=(1, 2), num_res_blocks=(1, 1), decoder_ch_mult=(1,), decoder_num_res_blocks=(1,)
        )
    with pytest.raises(ValueError, match="num_groups 32 must divide every width"):
        MagvitV2Tokenizer(base_channels=16)
    with pytest.raises(ValueError, match="bits must be a positive int"):
        MagvitV2Tokenizer(bits=0)
    with pytest.raises(ValueError, match="ch_mult must be a non-empty sequence"):
        MagvitV2Tokenizer(ch_mult=())
