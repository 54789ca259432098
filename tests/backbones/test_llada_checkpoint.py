"""save_pretrained / from_pretrained in the original LLaDA file layout, and every refusal of a bad checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dllm_zoo.backbones import LLaDABackbone, LLaDAConfig
from dllm_zoo.backbones.checkpoint import load_state_dict, plan_shards, save_state_dict
from dllm_zoo.tokenizers.layout import TokenLayout


@pytest.fixture
def tiny() -> LLaDABackbone:
    torch.manual_seed(0)
    return LLaDABackbone("tiny").eval()


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 336, (2, 10), generator=torch.Generator().manual_seed(0))


def _logits(model: LLaDABackbone, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _names(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def _shards(path: Path) -> list[str]:
    return sorted(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()))


def test_round_trip_single_file(tiny, ids, tmp_path, original_keys):
    tiny.save_pretrained(tmp_path)
    assert _names(tmp_path) == {"config.json", "model.safetensors"}  # no index, no temp files left
    assert sorted(load_file(tmp_path / "model.safetensors")) == sorted(original_keys(2))
    loaded = LLaDABackbone.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(loaded, ids), _logits(tiny, ids))
    assert loaded.layout == tiny.layout
    assert loaded.config == tiny.config
    assert all(p.requires_grad and p.device.type == "cpu" for p in loaded.parameters())


def test_round_trip_sharded(tiny, ids, tmp_path, original_keys):
    tiny.save_pretrained(tmp_path, max_shard_size=150_000)  # ~210 kB per block: several shards
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert _names(tmp_path) == {"config.json", "model.safetensors.index.json", *shards}
    assert sorted(index["weight_map"]) == sorted(original_keys(2))
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in tiny.parameters())
    loaded = LLaDABackbone.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(loaded, ids), _logits(tiny, ids))


def test_resave_replaces_previous_layout(tiny, ids, tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")  # unrelated files are kept
    tiny.save_pretrained(tmp_path, max_shard_size=60_000)
    tiny.save_pretrained(tmp_path)  # single over sharded: stale shards and index must go
    assert _names(tmp_path) == {"config.json", "model.safetensors", "tokenizer.json"}
    tiny.save_pretrained(tmp_path, max_shard_size=100_000)  # sharded over single
    assert "model.safetensors" not in _names(tmp_path)
    assert torch.equal(_logits(LLaDABackbone.from_pretrained(tmp_path), ids), _logits(tiny, ids))


def test_config_json_is_original_style(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    expected = {
        "model_type": "llada",
        "architectures": ["LLaDAModelLM"],
        "block_type": "llama",
        "activation_type": "silu",
        "layer_norm_type": "rms",
        "rope": True,
        "alibi": False,
        "weight_tying": False,
        "include_bias": False,
        "d_model": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 4,
        "mlp_hidden_size": 192,
        "vocab_size": 336,
        "embedding_size": 336,
        "mask_token_id": 258,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
    }
    assert {k: cfg[k] for k in expected} == expected
    assert cfg["dllm_zoo_layout"]["name"] == "default"
    assert TokenLayout(**cfg["dllm_zoo_layout"]) == tiny.layout


def test_pretrained_init_arg_loads_weights(tiny, ids, tmp_path):
    tiny.save_pretrained(tmp_path)
    via_init = LLaDABackbone(pretrained=str(tmp_path)).eval()  # the YAML form: init_args: {pretrained: dir}
    assert torch.equal(_logits(via_init, ids), _logits(tiny, ids))
    with pytest.raises(ValueError, match="either `config` or `pretrained`"):
        LLaDABackbone("small", pretrained=str(tmp_path))


def test_dtype_and_overrides(tiny, ids, tmp_path):
    tiny.save_pretrained(tmp_path)
    half = LLaDABackbone.from_pretrained(
        tmp_path, dtype=torch.bfloat16, gradient_checkpointing=True, max_sequence_length=64
    )
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.gradient_checkpointing
    assert half.config.max_sequence_length == 64
    with torch.no_grad():
        out = half(ids).logits
    assert out.dtype == torch.bfloat16
    assert (out.float() - _logits(tiny, ids)).abs().max().item() < 0.05
    with pytest.raises(ValueError, match="unknown overrides"):
        LLaDABackbone.from_pretrained(tmp_path, n_layer=3)


def test_original_checkpoint_config_loads_unknown_fields_kept(make_llama_checkpoint, tmp_path):
    _, src = make_llama_checkpoint(4)
    model = LLaDABackbone.from_pretrained(src)
    assert model.config.extra["auto_map"]["AutoModel"] == "modeling_llada.LLaDAModelLM"
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((src / "config.json").read_text())
    assert {k: cfg[k] for k in original} == original  # every original field survives a round trip


def test_mmada_config_loads():
    data = LLaDAConfig.preset("llada-8b").to_json_dict()
    data.update(
        model_type="mmada",
        architectures=["MMadaModelLM"],
        embedding_size=134656,
        new_vocab_size=134656,
        llm_vocab_size=126464,
        codebook_size=8192,
        num_vq_tokens=256,
    )
    cfg = LLaDAConfig.from_json_dict(data)
    assert cfg.num_embeddings == 134656
    assert cfg.model_type == "mmada"
    with torch.device("meta"):
        model = LLaDABackbone(cfg)
    assert model.layout.name == "mmada"
    assert model.transformer.ff_out.weight.shape == (134656, 4096)
    # an MMaDA config without embedding_size still gets its resized rows from new_vocab_size
    del data["embedding_size"]
    assert LLaDAConfig.from_json_dict(data).num_embeddings == 134656


# ------------------------------------------------------------------------------------------------- refusals
def _corrupt_single(tmp_path: Path, edit) -> None:
    state = load_file(tmp_path / "model.safetensors")
    edit(state)
    save_file(state, str(tmp_path / "model.safetensors"))


def test_missing_key_is_refused(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    _corrupt_single(tmp_path, lambda s: s.pop("model.transformer.blocks.1.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing keys \['model.transformer.blocks.1.up_proj.weight'\]") as err:
        LLaDABackbone.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_unexpected_key_is_refused(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    _corrupt_single(tmp_path, lambda s: s.update({"model.transformer.blocks.0.q_norm.weight": torch.ones(16)}))
    with pytest.raises(ValueError, match=r"unexpected keys \['model.transformer.blocks.0.q_norm.weight'\]"):
        LLaDABackbone.from_pretrained(tmp_path)


def test_misshaped_key_is_refused(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    _corrupt_single(tmp_path, lambda s: s.update({"model.transformer.ln_f.weight": torch.ones(65)}))
    with pytest.raises(ValueError, match=r"ln_f.weight: checkpoint \[65\] vs model \[64\] \(in model.safetensors\)"):
        LLaDABackbone.from_pretrained(tmp_path)


def test_all_problems_reported_together(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)

    def edit(s: dict) -> None:
        s.pop("model.transformer.wte.weight")
        s["extra.weight"] = torch.zeros(1)
        s["model.transformer.ln_f.weight"] = torch.ones(3)

    _corrupt_single(tmp_path, edit)
    with pytest.raises(ValueError, match="missing keys.*unexpected keys.*mis-shaped keys"):
        LLaDABackbone.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_shard_names_the_file(tiny, tmp_path, damage):
    tiny.save_pretrained(tmp_path, max_shard_size=60_000)
    name = _shards(tmp_path)[1]
    shard = tmp_path / name
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file at all")
    with pytest.raises(ValueError, match=name):
        LLaDABackbone.from_pretrained(tmp_path)


def test_missing_shard_names_the_file(tiny, tmp_path):
    tiny.save_pretrained(tmp_path, max_shard_size=60_000)
    name = _shards(tmp_path)[-1]
    (tmp_path / name).unlink()
    with pytest.raises(FileNotFoundError, match=name):
        LLaDABackbone.from_pretrained(tmp_path)


def test_index_pointing_at_wrong_shard(tiny, tmp_path):
    tiny.save_pretrained(tmp_path, max_shard_size=60_000)
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.transformer.ln_f.weight"] = _shards(tmp_path)[0]
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="ln_f.weight"):
        LLaDABackbone.from_pretrained(tmp_path)


def test_missing_config_and_weights(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLaDABackbone.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        LLaDABackbone.from_pretrained(tmp_path / "nowhere")
    tiny.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        LLaDABackbone.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("weight_tying", True),
        ("alibi", True),
        ("include_bias", True),
        ("block_type", "sequential"),
        ("activation_type", "gelu"),
        ("attention_layer_norm", True),
        ("rope", False),
    ],
)
def test_math_changing_config_fields_are_refused(tiny, tmp_path, field, value):
    tiny.save_pretrained(tmp_path)
    cfg_file = tmp_path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg[field] = value
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"config.json.*{field}={value!r}"):
        LLaDABackbone.from_pretrained(tmp_path)


def test_unknown_layout_needs_layout_argument(tmp_path):
    cfg = LLaDAConfig.preset("tiny")
    cfg.vocab_size = cfg.embedding_size = 400
    torch.manual_seed(0)
    model = LLaDABackbone(cfg, layout="default")
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    del data["dllm_zoo_layout"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="pass layout="):
        LLaDABackbone.from_pretrained(tmp_path)
    assert LLaDABackbone.from_pretrained(tmp_path, layout="default").layout.vocab_size == 336


# --------------------------------------------------------------------------------------- checkpoint helpers
def test_plan_shards_is_greedy_and_keeps_big_tensors_alone():
    sizes = [("a", 4), ("b", 4), ("c", 10), ("d", 1), ("e", 1)]
    assert plan_shards(sizes, 8) == [["a", "b"], ["c"], ["d", "e"]]
    with pytest.raises(ValueError, match="max_shard_size"):
        plan_shards(sizes, 0)


def test_save_state_dict_refuses_meta_and_copies_shards_to_cpu(tmp_path):
    with pytest.raises(ValueError, match="'w': it is on the meta device"):
        save_state_dict({"w": torch.empty(2, device="meta")}, tmp_path)
    state = {"w": torch.arange(6.0).view(2, 3).t(), "v": torch.ones(2)}  # non-contiguous is fine
    save_state_dict(state, tmp_path)
    loaded = load_state_dict(tmp_path, {"w": (3, 2), "v": (2,)})
    assert torch.equal(loaded["w"], state["w"])
    assert torch.equal(loaded["v"], state["v"])


def test_loading_does_not_allocate_twice(tiny, tmp_path):
    """from_pretrained assigns the loaded tensors as parameters (built on meta): no copy of the weights."""
    tiny.save_pretrained(tmp_path)
    loaded = LLaDABackbone.from_pretrained(tmp_path)
    assert not any(p.is_meta for p in loaded.parameters())
    shutil.rmtree(tmp_path)  # the parameters do not depend on the files staying around
    assert torch.isfinite(loaded.transformer.wte.weight).all()
