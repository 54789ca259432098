"""SDARBackbone: parity with the original modeling semantics, checkpoints, block-causal attention, exact KV cache.

The reference is transformers' ``Qwen3ForCausalLM``: SDAR's ``modeling_sdar.py`` is Qwen3 with the causal mask
replaced by a block mask (research/tracerl_llada.md §3.1), and its remote code cannot be fetched offline. So "an
SDAR-layout checkpoint written by the original modeling code" is, as far as we can get offline, a tiny random Qwen3
saved with transformers' own ``save_pretrained`` (same keys as SDAR) whose config.json is rewritten into SDAR's form
(``model_type: sdar``, ``architectures``, ``auto_map``, ``block_size``, ``mask_token_id``). The reference logits come
from that Qwen3 run with the block-causal mask given as an additive 4-D float mask, which transformers 5.x passes to
attention unchanged (checked below: the result differs from Qwen3's own causal result).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from dllm_zoo.backbones import Backbone, KVCache, SDARBackbone, SDARConfig
from dllm_zoo.backbones.attention import block_causal_mask
from dllm_zoo.backbones.transformer import infer_layout
from dllm_zoo.tokenizers.layout import TokenLayout

V = 336  # the default layout's rows (tiny preset)
BLOCK = 4
TOL = 1e-5


def _qwen3_keys(n_layers: int) -> list[str]:
    """HF Qwen3 / SDAR state-dict keys, written out from the research notes (not from our module)."""
    per_layer = [
        "input_layernorm",
        "post_attention_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "self_attn.q_norm",
        "self_attn.k_norm",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    keys = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    keys += [f"model.layers.{i}.{n}.weight" for i in range(n_layers) for n in per_layer]
    return sorted(keys)


def _to_sdar_config(path: Path, **changes: object) -> dict:
    """Rewrite transformers' Qwen3 config.json in ``path`` into SDAR's form (ids of the default layout)."""
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(
        model_type="sdar",
        architectures=["SDARForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_sdar.SDARConfig",
            "AutoModel": "modeling_sdar.SDARModel",
            "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
        },
        block_size=BLOCK,
        mask_token_id=258,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=257,
        fuse_cross_entropy=True,  # SDAR-only training field: must be kept, not refused
    )
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return cfg


QwenCheckpoint = tuple[Qwen3ForCausalLM, Path]


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> QwenCheckpoint:
    """A tiny random Qwen3 (explicit head_dim 24 != 64/4, GQA 4/2, θ=1e6) saved by transformers, as SDAR."""
    torch.manual_seed(1234)
    cfg = Qwen3Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        intermediate_size=160,
        vocab_size=V,
        tie_word_embeddings=False,
        attention_bias=False,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        attn_implementation="eager",  # the plainest path: scores + additive mask, softmax, values
    )
    qwen = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # the default init leaves norms at 1; randomise them so every norm weight is tested
        for name, p in qwen.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("qwen3_as_sdar")
    qwen.save_pretrained(path)
    _to_sdar_config(path)
    return qwen, path


def _qwen_logits(
    qwen: Qwen3ForCausalLM, ids: torch.Tensor, allow: torch.Tensor, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Qwen3 logits with a bool ``[B, 1, L, L]`` mask (True = may attend) turned into an additive float mask."""
    bias = torch.zeros(allow.shape, dtype=torch.float32).masked_fill(~allow, torch.finfo(torch.float32).min)
    with torch.no_grad():
        return qwen(input_ids=ids, attention_mask=bias, position_ids=position_ids).logits


def _ids(b: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny() -> SDARBackbone:
    torch.manual_seed(0)
    return SDARBackbone("tiny").eval()


# ---------------------------------------------------------------------------------------------------- parity
def test_logits_match_qwen3_with_block_mask(qwen_checkpoint):
    qwen, path = qwen_checkpoint
    model = SDARBackbone.from_pretrained(path).eval()
    assert sorted(model.state_dict()) == _qwen3_keys(2)  # strict load succeeded with exactly these keys
    assert model.layout.name == "default"  # inferred: 336 rows and mask id 258
    assert (model.config.head_dim, model.config.rope_theta, model.config.block_size) == (24, 1e6, BLOCK)
    assert model.config.extra["fuse_cross_entropy"] is True
    ids = _ids(2, 14)
    pos = torch.arange(14).expand(2, 14)
    allow = block_causal_mask(pos, BLOCK)
    with torch.no_grad():
        ours = model(ids).logits
        causal = qwen(input_ids=ids).logits
        full = _qwen_logits(qwen, ids, torch.ones(2, 1, 14, 14, dtype=torch.bool))
    ref = _qwen_logits(qwen, ids, allow)
    assert ours.shape == ref.shape == (2, 14, V)
    assert (ours - ref).abs().max().item() <= 1e-4
    # The 4-D mask really reached Qwen3's attention: block-causal differs from causal and from bidirectional.
    assert (ref - causal).abs().max().item() > 1e-2
    assert (ref - full).abs().max().item() > 1e-2


def test_left_padded_batch_matches_qwen3_and_unpadded_rows(qwen_checkpoint):
    qwen, path = qwen_checkpoint
    model = SDARBackbone.from_pretrained(path).eval()
    lengths, seq = [14, 9, 6], 14
    rows = [_ids(1, n, seed=n)[0] for n in lengths]
    ids = torch.full((3, seq), model.layout.pad_id)
    keep = torch.zeros(3, seq, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, seq - len(row) :] = row
        keep[i, seq - len(row) :] = 1
    pos = (keep.cumsum(1) - 1).clamp(min=0)  # real tokens start at 0: each row sees its batch-1 block grid
    with torch.no_grad():
        ours = model(ids, attention_mask=keep, position_ids=pos).logits
    ref = _qwen_logits(qwen, ids, block_causal_mask(pos, BLOCK, keep), position_ids=pos)
    real = keep.bool()
    assert torch.isfinite(ours).all()
    assert (ours[real] - ref[real]).abs().max().item() <= 1e-4
    with torch.no_grad():
        for i, row in enumerate(rows):
            single = model(row[None]).logits[0]
            assert (ours[i, seq - len(row) :] - single).abs().max().item() <= TOL


def test_our_checkpoint_loads_into_qwen3(tiny, tmp_path):
    """The other direction: what save_pretrained writes has Qwen3's keys, shapes and config field names."""
    tiny.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "qwen3"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    qwen = Qwen3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert qwen.config.head_dim == 16
    assert qwen.config.num_key_value_heads == 2
    ids = _ids(2, 10, seed=4)
    with torch.no_grad():
        ours = tiny(ids).logits
    ref = _qwen_logits(qwen, ids, block_causal_mask(torch.arange(10)[None], BLOCK).expand(2, 1, 10, 10))
    assert (ours - ref).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------------------------ checkpoints
def _corrupt(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_unexpected_and_misshaped_keys_are_listed(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    _corrupt(tmp_path, lambda s: s.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(ValueError, match=r"missing keys \['model.layers.1.self_attn.k_norm.weight'\]"):
        SDARBackbone.from_pretrained(tmp_path)
    tiny.save_pretrained(tmp_path)
    _corrupt(tmp_path, lambda s: s.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(ValueError, match=r"unexpected keys \['model.layers.0.self_attn.q_proj.bias'\]"):
        SDARBackbone.from_pretrained(tmp_path)
    tiny.save_pretrained(tmp_path)
    _corrupt(tmp_path, lambda s: s.update({"lm_head.weight": torch.zeros(V, 65)}))
    with pytest.raises(ValueError, match=r"lm_head.weight: checkpoint \[336, 65\] vs model \[336, 64\]"):
        SDARBackbone.from_pretrained(tmp_path)


def test_round_trip_single_file_and_sharded(tiny, tmp_path):
    ids = _ids(2, 10, seed=1)
    with torch.no_grad():
        expected = tiny(ids).logits
    tiny.save_pretrained(tmp_path / "single")
    assert {p.name for p in (tmp_path / "single").iterdir()} == {"config.json", "model.safetensors"}
    assert sorted(load_file(tmp_path / "single" / "model.safetensors")) == _qwen3_keys(2)
    tiny.save_pretrained(tmp_path / "sharded", max_shard_size=60_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert sorted(index["weight_map"]) == _qwen3_keys(2)
    for sub in ("single", "sharded"):
        loaded = SDARBackbone.from_pretrained(tmp_path / sub).eval()
        assert loaded.config == tiny.config
        assert loaded.layout == tiny.layout
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, expected)
    half = SDARBackbone.from_pretrained(tmp_path / "single", dtype=torch.bfloat16, block_size=8)
    assert half.lm_head.weight.dtype == torch.bfloat16
    assert half.config.block_size == 8
    with pytest.raises(ValueError, match="unknown overrides"):
        SDARBackbone.from_pretrained(tmp_path / "single", blocksize=8)


def test_config_json_is_sdar_style(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    expected = {
        "model_type": "sdar",
        "architectures": ["SDARForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_sdar.SDARConfig",
            "AutoModel": "modeling_sdar.SDARModel",
            "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
        },
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": V,
        "hidden_act": "silu",
        "rope_theta": 1e6,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "rope_scaling": None,
        "block_size": 4,
        "mask_token_id": 258,
        "bos_token_id": 256,
        "eos_token_id": 257,
        "torch_dtype": "float32",
    }
    assert {k: cfg[k] for k in expected} == expected
    assert cfg["dllm_zoo_layout"]["name"] == "default"
    assert list(cfg) == sorted(cfg)


def test_released_config_round_trip_and_layout_inference(tmp_path):
    cfg = SDARConfig.preset("sdar-4b")
    data = cfg.to_json_dict()
    assert (data["hidden_size"], data["intermediate_size"], data["torch_dtype"]) == (2560, 9728, "bfloat16")
    assert SDARConfig.from_json_dict(data) == cfg
    kept = dict(data, attn_implementation="flex_attention", fuse_cross_entropy=True)
    again = SDARConfig.from_json_dict(kept)
    assert again.extra == {"attn_implementation": "flex_attention", "fuse_cross_entropy": True}
    assert SDARConfig.from_json_dict(again.to_json_dict()) == again
    # No dllm_zoo_layout: 151936 rows -> the "sdar" layout; the config's mask id is checked against it.
    assert infer_layout(cfg) == TokenLayout.preset("sdar")
    (tmp_path / "config.json").write_text(json.dumps(data))
    _, lay = SDARBackbone._pretrained_config(tmp_path, None, {})
    assert lay.name == "sdar"
    (tmp_path / "config.json").write_text(json.dumps(dict(data, mask_token_id=151670)))
    with pytest.raises(ValueError, match="config mask_token_id=151670 != layout mask_id=151669"):
        SDARBackbone._pretrained_config(tmp_path, None, {})
    # Old-style configs: no head_dim -> hidden / heads; no num_key_value_heads -> heads.
    old = {k: v for k, v in data.items() if k not in ("head_dim", "num_key_value_heads")}
    assert (SDARConfig.from_json_dict(old).head_dim, SDARConfig.from_json_dict(old).num_kv_heads) == (80, 32)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tie_word_embeddings", True),
        ("attention_bias", True),
        ("hidden_act", "gelu"),
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
        ("rope_parameters", {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}),
        ("use_sliding_window", True),
        ("layer_types", ["full_attention", "sliding_attention"]),
        ("attention_dropout", 0.1),
        ("model_type", "qwen3"),
    ],
)
def test_math_changing_config_fields_are_refused(tiny, tmp_path, field, value):
    tiny.save_pretrained(tmp_path)
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps(dict(json.loads(cfg_file.read_text()), **{field: value})))
    with pytest.raises(ValueError, match=rf"config.json.*{field}="):
        SDARBackbone.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tie_word_embeddings": True}, "tie_word_embeddings=True"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
        ({"head_dim": 15}, "head_dim=15 must be even"),
        ({"block_size": 0}, "block_size=0"),
        ({"mask_token_id": 400}, "mask_token_id=400 is outside"),
    ],
)
def test_config_refusals(kwargs, message):
    ids = {"vocab_size": V, "mask_token_id": 258, "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 257}
    with pytest.raises(ValueError, match=message):
        SDARConfig(**{**ids, **kwargs})


# ------------------------------------------------------------------------------------------------ presets
def _released_shapes(width: int, ffn: int) -> dict[str, tuple[int, ...]]:
    """research/tracerl_llada.md §3.1, written out independently of the module."""
    rows, layers, q, kv = 151936, 36, 32 * 128, 8 * 128
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (rows, width)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (width,), p + "post_attention_layernorm.weight": (width,)}
        shapes |= {p + "self_attn.q_proj.weight": (q, width), p + "self_attn.o_proj.weight": (width, q)}
        shapes |= {p + "self_attn.k_proj.weight": (kv, width), p + "self_attn.v_proj.weight": (kv, width)}
        shapes |= {p + "self_attn.q_norm.weight": (128,), p + "self_attn.k_norm.weight": (128,)}
        shapes |= {p + "mlp.gate_proj.weight": (ffn, width), p + "mlp.up_proj.weight": (ffn, width)}
        shapes |= {p + "mlp.down_proj.weight": (width, ffn)}
    shapes |= {"model.norm.weight": (width,), "lm_head.weight": (rows, width)}
    return shapes


@pytest.mark.parametrize(
    ("preset", "width", "ffn", "n_params"),
    [("sdar-4b", 2560, 9728, 4_411_424_256), ("sdar-8b", 4096, 12288, 8_190_735_360)],
)
def test_released_presets_on_meta(preset, width, ffn, n_params):
    with torch.device("meta"):
        model = SDARBackbone(preset)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == _released_shapes(width, ffn)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert preset != "sdar-4b" or n_params * 2 == 8_822_848_512  # "8.82 GB bf16" (research §3.1)
    assert model.layout == TokenLayout.preset("sdar")
    cfg = model.config.to_json_dict(model.layout)
    assert (cfg["rope_theta"], cfg["rms_norm_eps"], cfg["mask_token_id"], cfg["block_size"]) == (1e6, 1e-6, 151669, 4)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["max_position_embeddings"]) == (151643, 151643, 32768)


def test_tiny_preset_contract(tiny):
    assert isinstance(tiny, Backbone)
    assert tiny.layout == TokenLayout.preset("default")
    assert tiny.vocab_size == V
    assert tiny.transformer_blocks() is tiny.model.layers
    assert tiny.output_head() is tiny.lm_head
    small = SDARConfig.preset("small")
    assert (small.hidden_size, small.num_hidden_layers, small.num_attention_heads, small.head_dim) == (512, 8, 8, 64)
    with pytest.raises(ValueError, match="unknown SDAR preset 'huge'"):
        SDARBackbone("huge")


def test_pinned_logits_of_the_tiny_preset():
    """Catches silent math or init changes: seed 0, tiny preset, fixed input."""
    torch.manual_seed(0)
    model = SDARBackbone("tiny").eval()
    ids = (torch.arange(32).view(2, 16) * 7) % V
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.sum().item() == pytest.approx(PINNED_SUM, abs=1e-3)
    torch.testing.assert_close(logits[0, 0, :4], torch.tensor(PINNED_FIRST), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1, -1, -3:], torch.tensor(PINNED_LAST), atol=1e-5, rtol=0)


PINNED_SUM = -15.368389
PINNED_FIRST = [0.02966806, 0.19083922, 0.06353940, 0.01209639]
PINNED_LAST = [0.12736291, -0.01634901, -0.35158125]


# ------------------------------------------------------------------------------------------ block semantics
def test_block_causal_semantics(tiny):
    ids = _ids(1, 12, seed=2)
    later = ids.clone()
    later[0, 8:] = (later[0, 8:] + 1) % 256  # block 2 changes
    same_block = ids.clone()
    same_block[0, 7] = (same_block[0, 7] + 1) % 256  # last token of block 1 changes
    with torch.no_grad():
        base, a, b = (tiny(x).logits[0] for x in (ids, later, same_block))
    assert (a[:8] - base[:8]).abs().max().item() <= 1e-6  # blocks 0-1 never see block 2
    assert (a[8:] - base[8:]).abs().max().item() > 1e-3
    assert (b[:4] - base[:4]).abs().max().item() <= 1e-6  # block 0 never sees block 1
    assert (b[4:7] - base[4:7]).abs().max().item() > 1e-3  # bidirectional inside block 1
    assert (b[8:] - base[8:]).abs().max().item() > 1e-3  # later blocks see earlier ones
    # The grid is absolute: positions 2..13 put the block boundaries at columns 2, 6, 10.
    pos = torch.arange(2, 14)[None]
    shifted = ids.clone()
    shifted[0, 2] = (shifted[0, 2] + 1) % 256
    with torch.no_grad():
        p0, p1 = tiny(ids, position_ids=pos).logits[0], tiny(shifted, position_ids=pos).logits[0]
    assert (p1[:2] - p0[:2]).abs().max().item() <= 1e-6
    assert (p1[3:6] - p0[3:6]).abs().max().item() > 1e-3


def test_explicit_4d_mask_is_used_as_is(tiny):
    ids = _ids(2, 8, seed=3)
    pos = torch.arange(8).expand(2, 8)
    with torch.no_grad():
        default = tiny(ids).logits
        given = tiny(ids, attention_mask=block_causal_mask(pos, BLOCK)).logits
        bidirectional = tiny(ids, attention_mask=torch.ones(2, 1, 8, 8, dtype=torch.bool)).logits
    torch.testing.assert_close(given, default, atol=1e-6, rtol=0)
    assert (bidirectional - default).abs().max().item() > 1e-3


# ------------------------------------------------------------------------------------------------ KV cache
def test_prefill_then_blocks_with_cache_is_exact(tiny):
    ids = _ids(2, 16, seed=5)
    pos = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        full = tiny(ids, position_ids=pos, return_cache=True)
        prefill = tiny(ids[:, :8], position_ids=pos[:, :8], return_cache=True)  # two blocks, block-causal
        blk = tiny(ids[:, 8:12], position_ids=pos[:, 8:12], cache=prefill.cache, return_cache=True)
        ctx = KVCache.cat([prefill.cache, blk.cache])
        last = tiny(ids[:, 12:16], position_ids=pos[:, 12:16], cache=ctx)
        multi = tiny(ids[:, 4:16], position_ids=pos[:, 4:16], cache=prefill.cache.select(slice(0, 4)))
    assert (prefill.logits - full.logits[:, :8]).abs().max().item() <= TOL
    assert (blk.logits - full.logits[:, 8:12]).abs().max().item() <= TOL
    assert (last.logits - full.logits[:, 12:16]).abs().max().item() <= TOL
    assert (multi.logits - full.logits[:, 4:16]).abs().max().item() <= TOL  # a multi-block window stays causal
    for i in range(2):  # cached keys of clean blocks are exactly the full forward's
        torch.testing.assert_close(ctx.keys[i], full.cache.keys[i][:, :, :12], atol=TOL, rtol=0)
        torch.testing.assert_close(ctx.values[i], full.cache.values[i][:, :, :12], atol=TOL, rtol=0)


def test_padded_batch_with_cache_equals_batch_one(tiny):
    """Left padding by whole blocks keeps every row's cut on its own block boundary (what the cache needs to be
    exact: a cached key must have seen its whole block); the last row's prefill is padding only."""
    lengths, seq = [16, 12, 4], 16
    rows = [_ids(1, n, seed=10 + n)[0] for n in lengths]
    ids = torch.full((3, seq), tiny.layout.pad_id)
    keep = torch.zeros(3, seq, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, seq - len(row) :] = row
        keep[i, seq - len(row) :] = True
    pos = (keep.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = tiny(ids, attention_mask=keep, position_ids=pos).logits
        prefill = tiny(ids[:, :8], attention_mask=keep[:, :8], position_ids=pos[:, :8], return_cache=True)
        assert torch.equal(prefill.cache.key_mask, keep[:, :8])
        w1 = tiny(
            ids[:, 8:12],
            attention_mask=keep[:, 8:12],
            position_ids=pos[:, 8:12],
            cache=prefill.cache,
            return_cache=True,
        )
        ctx = KVCache.cat([prefill.cache, w1.cache])
        w2 = tiny(ids[:, 12:], attention_mask=keep[:, 12:], position_ids=pos[:, 12:], cache=ctx)
        cached = torch.cat([prefill.logits, w1.logits, w2.logits], dim=1)
        blind = tiny(ids[:, 12:], position_ids=pos[:, 12:], cache=KVCache(ctx.keys, ctx.values, None)).logits
        for i, row in enumerate(rows):
            single = tiny(row[None]).logits[0]
            n = len(row)
            assert (plain[i, seq - n :] - single).abs().max().item() <= TOL
            assert (cached[i, seq - n :] - single).abs().max().item() <= TOL
    # Ignoring the context's padding changes the padded rows: the cache's key_mask matters.
    assert (blind[1:] - w2.logits[1:]).abs().max().item() > 1e-3


def test_cache_refusals(tiny):
    ids = _ids(2, 8)
    with torch.no_grad():
        c = tiny(ids, return_cache=True).cache
    pos = torch.arange(8, 12).expand(2, 4)
    with pytest.raises(ValueError, match="needs position_ids"):
        tiny(ids[:, :4], cache=c)
    with pytest.raises(ValueError, match="does not fit"):
        tiny(ids[:1, :4], position_ids=pos[:1], cache=c)
    with pytest.raises(ValueError, match="4-D attention_mask must have shape"):
        tiny(ids[:, :4], position_ids=pos, cache=c, attention_mask=torch.ones(2, 1, 4, 11, dtype=torch.bool))


# -------------------------------------------------------------------------------------- outputs, training
def test_logits_at_bool_and_index_and_hidden(tiny):
    ids = _ids(3, 10, seed=6)
    with torch.no_grad():
        full = tiny(ids, return_hidden=True)
        where = ids % 3 == 0
        sel = tiny(ids, logits_at=where).logits
        idx = torch.tensor([[0, 9], [4, 4], [7, 1]])
        gathered = tiny(ids, logits_at=idx).logits
        bare = tiny(ids, return_logits=False, return_hidden=True)
    assert sel.shape == (int(where.sum()), V)
    torch.testing.assert_close(sel, full.logits[where], atol=1e-6, rtol=0)
    assert gathered.shape == (3, 2, V)
    torch.testing.assert_close(gathered, full.logits[torch.arange(3)[:, None], idx], atol=1e-6, rtol=0)
    assert bare.logits is None
    torch.testing.assert_close(tiny.lm_head(bare.hidden), full.logits, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="logits_at"):
        tiny(ids, logits_at=torch.zeros(3, 10))


def test_gradient_checkpointing_matches():
    torch.manual_seed(0)
    model = SDARBackbone("tiny")
    ids, targets = _ids(2, 12), _ids(2, 12, seed=5)

    def loss_and_grads() -> tuple[float, dict[str, torch.Tensor]]:
        model.train()
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(ids).logits.flatten(0, 1), targets.flatten())
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    base_loss, base_grads = loss_and_grads()
    model.set_gradient_checkpointing(True)
    ck_loss, ck_grads = loss_and_grads()
    assert abs(base_loss - ck_loss) <= 1e-6
    assert set(ck_grads) == set(base_grads)
    for name, g in base_grads.items():
        torch.testing.assert_close(ck_grads[name], g, atol=1e-6, rtol=0, msg=name)


def test_resize_token_embeddings(tmp_path):
    torch.manual_seed(0)
    model = SDARBackbone("tiny").eval()
    ids = _ids(1, 8)
    with torch.no_grad():
        before = model(ids).logits
    layout = TokenLayout.preset("default").replace(name="bigger", vocab_size=400)
    model.resize_token_embeddings(400, layout=layout)
    assert model.model.embed_tokens.weight.shape == model.lm_head.weight.shape == (400, 64)
    assert model.config.vocab_size == 400
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[..., :V], before, atol=0, rtol=0)
    model.save_pretrained(tmp_path)
    assert SDARBackbone.from_pretrained(tmp_path).layout == layout
