"""Shared fixtures: an INDEPENDENT reference (transformers' Llama run bidirectionally) saved in LLaDA's layout.

The checkpoint is written here by hand (safetensors shards + index + an original-style config.json), not by
dllm_zoo's writer, so a loader bug cannot hide behind a matching writer bug.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

# Llama name -> LLaDA name (research/tracerl_llada.md §4.2), applied to keys under "model." / "lm_head".
_BLOCK_RENAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "q_proj",
    "self_attn.k_proj": "k_proj",
    "self_attn.v_proj": "v_proj",
    "self_attn.o_proj": "attn_out",
    "post_attention_layernorm": "ff_norm",
    "mlp.gate_proj": "ff_proj",
    "mlp.up_proj": "up_proj",
    "mlp.down_proj": "ff_out",
}


def llama_to_llada_key(key: str) -> str:
    """Rename one HF Llama key to the original LLaDA key."""
    if key == "model.embed_tokens.weight":
        return "model.transformer.wte.weight"
    if key == "model.norm.weight":
        return "model.transformer.ln_f.weight"
    if key == "lm_head.weight":
        return "model.transformer.ff_out.weight"
    prefix, i, rest = key.split(".", 3)[1:]
    assert prefix == "layers", key
    module, _, param = rest.rpartition(".")
    return f"model.transformer.blocks.{i}.{_BLOCK_RENAMES[module]}.{param}"


def _original_llada_keys(n_layers: int) -> list[str]:
    """The original LLaDA state-dict key list, written out from the research notes (not from our module)."""
    names = ["attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out"]
    keys = ["model.transformer.wte.weight"]
    keys += [f"model.transformer.blocks.{i}.{n}.weight" for i in range(n_layers) for n in names]
    keys += ["model.transformer.ln_f.weight", "model.transformer.ff_out.weight"]
    return keys


def llada_config_json(*, d_model: int, n_layers: int, n_heads: int, n_kv_heads: int, ffn: int, vocab: int) -> dict:
    """An original-style LLaDA config.json (field names of LLaDA-8B-Instruct, incl. fields we ignore)."""
    return {
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModel": "modeling_llada.LLaDAModelLM",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        },
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": d_model,
        "embedding_dropout": 0.0,
        "embedding_size": vocab,
        "eos_token_id": 257,
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": 258,
        "max_sequence_length": 128,
        "mlp_hidden_size": ffn,
        "mlp_ratio": 4,
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "n_layers": n_layers,
        "pad_token_id": 257,
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": 10000.0,
        "scale_logits": False,
        "transformers_version": "4.46.3",
        "use_cache": False,
        "vocab_size": vocab,
        "weight_tying": False,
    }


def write_sharded(state: dict[str, torch.Tensor], path: Path, tensors_per_shard: int) -> list[str]:
    """Write HF-style shards + model.safetensors.index.json by hand."""
    keys = list(state)
    chunks = [keys[i : i + tensors_per_shard] for i in range(0, len(keys), tensors_per_shard)]
    n = len(chunks)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for name, chunk in zip(names, chunks):
        save_file({k: state[k].contiguous() for k in chunk}, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return names


LlamaCheckpoint = tuple[LlamaForCausalLM, Path]


@pytest.fixture(scope="module")
def make_llama_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], LlamaCheckpoint]:
    """Factory: a tiny random Llama (hidden 64, 2 layers, 4 heads, ffn 192, vocab 336) and its LLaDA-layout dir."""
    cache: dict[int, LlamaCheckpoint] = {}

    def build(n_kv_heads: int = 4) -> LlamaCheckpoint:
        if n_kv_heads in cache:
            return cache[n_kv_heads]
        torch.manual_seed(1234)
        cfg = LlamaConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=n_kv_heads,
            intermediate_size=192,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            vocab_size=336,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            hidden_act="silu",
            max_position_embeddings=128,
        )
        llama = LlamaForCausalLM(cfg).eval()
        with torch.no_grad():  # the default init leaves norms at 1; randomise them so the norm weights are tested
            for name, p in llama.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
        path = tmp_path_factory.mktemp(f"llama_as_llada_kv{n_kv_heads}")
        state = {llama_to_llada_key(k): v.detach().clone() for k, v in llama.state_dict().items()}
        write_sharded(state, path, tensors_per_shard=7)
        config = llada_config_json(d_model=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, ffn=192, vocab=336)
        (path / "config.json").write_text(json.dumps(config, indent=2))
        cache[n_kv_heads] = (llama, path)
        return cache[n_kv_heads]

    return build


def _llama_logits(
    llama: LlamaForCausalLM, ids: torch.Tensor, keep: torch.Tensor | None = None, **kw: object
) -> torch.Tensor:
    """Run the HF Llama BIDIRECTIONALLY.

    transformers 5.x returns an explicit 4-D mask unchanged (``create_causal_mask``: "an already prepared 4D mask
    ... is returned as-is"), and SDPA only turns causal when no mask is given. So an additive float mask of zeros
    (``finfo.min`` at padded keys) gives full bidirectional attention with key padding.
    """
    b, seq = ids.shape
    bias = torch.zeros(b, 1, seq, seq)
    if keep is not None:
        bias = bias.masked_fill(~keep.bool()[:, None, None, :], torch.finfo(torch.float32).min)
    with torch.no_grad():
        return llama(input_ids=ids, attention_mask=bias, **kw).logits


@pytest.fixture(scope="session")
def llama_logits() -> Callable[..., torch.Tensor]:
    """The bidirectional Llama runner (see :func:`_llama_logits`)."""
    return _llama_logits


@pytest.fixture(scope="session")
def original_keys() -> Callable[[int], list[str]]:
    """The original LLaDA key list for ``n_layers`` blocks."""
    return _original_llada_keys


@pytest.fixture(scope="session")
def llada_config() -> Callable[..., dict]:
    """Factory of original-style config.json dicts."""
    return llada_config_json
