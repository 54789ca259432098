"""LLaDABackbone behaviour: presets, shapes of the 8B models, masks, logits_at, checkpointing, resizing, pins."""

from __future__ import annotations

import pytest
import torch

from dllm_zoo.backbones import Backbone, LLaDABackbone, LLaDAConfig
from dllm_zoo.backbones.attention import padding_pair_mask
from dllm_zoo.tokenizers.layout import TokenLayout


@pytest.fixture
def tiny() -> LLaDABackbone:
    torch.manual_seed(0)
    return LLaDABackbone("tiny").eval()


def _ids(b: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 336, (b, seq), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- pins
def test_pinned_logits_of_the_tiny_preset():
    """Catches silent math or init changes: seed 0, tiny preset, fixed input."""
    torch.manual_seed(0)
    model = LLaDABackbone("tiny").eval()
    ids = (torch.arange(32).view(2, 16) * 7) % 336
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.sum().item() == pytest.approx(PINNED_SUM, abs=1e-3)
    torch.testing.assert_close(logits[0, 0, :4], torch.tensor(PINNED_FIRST), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1, -1, -3:], torch.tensor(PINNED_LAST), atol=1e-5, rtol=0)


PINNED_SUM = 29.925629
PINNED_FIRST = [-0.01002547, 0.05438286, 0.16951731, 0.20677584]
PINNED_LAST = [0.04901129, -0.35574937, -0.01622650]


def test_init_is_deterministic_and_as_documented():
    torch.manual_seed(3)
    a = LLaDABackbone("tiny")
    torch.manual_seed(3)
    b = LLaDABackbone("tiny")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
        if name.endswith("norm.weight") or "ln_f" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(p.std().item() - 0.02) < 0.002, name
            assert abs(p.mean().item()) < 0.002, name


# -------------------------------------------------------------------------------------------------- presets
def test_presets_and_backbone_contract(tiny):
    assert isinstance(tiny, Backbone)
    assert tiny.layout == TokenLayout.preset("default")
    assert tiny.vocab_size == 336
    assert len(tiny.transformer_blocks()) == 2
    assert tiny.transformer_blocks() is tiny.model.transformer.blocks
    small = LLaDAConfig.preset("small")
    assert (small.d_model, small.n_layers, small.n_heads, small.ffn_hidden_size, small.vocab_size) == (
        512,
        8,
        8,
        1536,
        336,
    )
    assert (small.rope_theta, small.rms_norm_eps) == (10000.0, 1e-5)
    with pytest.raises(ValueError, match="unknown LLaDA preset 'huge'"):
        LLaDABackbone("huge")


def _expected_8b_shapes(rows: int) -> dict[str, tuple[int, ...]]:
    """research/tracerl_llada.md §4.2, written out independently of the module."""
    shapes: dict[str, tuple[int, ...]] = {"model.transformer.wte.weight": (rows, 4096)}
    for i in range(32):
        p = f"model.transformer.blocks.{i}."
        shapes |= {p + "attn_norm.weight": (4096,), p + "ff_norm.weight": (4096,)}
        shapes |= {p + n + ".weight": (4096, 4096) for n in ("q_proj", "k_proj", "v_proj", "attn_out")}
        shapes |= {p + "ff_proj.weight": (12288, 4096), p + "up_proj.weight": (12288, 4096)}
        shapes |= {p + "ff_out.weight": (4096, 12288)}
    shapes |= {"model.transformer.ln_f.weight": (4096,), "model.transformer.ff_out.weight": (rows, 4096)}
    return shapes


@pytest.mark.parametrize(
    ("preset", "rows", "n_params"),
    [("llada-8b", 126464, 8_015_581_184), ("mmada-8b", 134656, 8_082_690_048)],
)
def test_8b_presets_on_meta(preset, rows, n_params):
    with torch.device("meta"):
        model = LLaDABackbone(preset)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == _expected_8b_shapes(rows)
    assert sum(p.numel() for p in model.parameters()) == n_params
    # LLaDA-8B in bf16 is 16,031,162,368 bytes (6 shards on the hub, research/tracerl_llada.md §4.2)
    assert preset != "llada-8b" or n_params * 2 == 16_031_162_368
    assert model.layout.name == preset.split("-")[0]
    cfg = model.config.to_json_dict(model.layout)
    assert (cfg["rope_theta"], cfg["rms_norm_eps"], cfg["mask_token_id"], cfg["eos_token_id"]) == (
        500000.0,
        1e-5,
        126336,
        126081,
    )
    assert cfg["architectures"] == (["MMadaModelLM"] if preset == "mmada-8b" else ["LLaDAModelLM"])


def test_layout_must_fit_config():
    with pytest.raises(ValueError, match=r"336 embedding rows < layout vocab_size=126464"):
        LLaDABackbone(LLaDAConfig.preset("tiny"), layout="llada")
    cfg = LLaDAConfig.preset("tiny")
    cfg.mask_token_id = 5
    with pytest.raises(ValueError, match="config mask_token_id=5 != layout mask_id=258"):
        LLaDABackbone(cfg, layout="default")
    odd = LLaDAConfig.preset("tiny")
    odd.vocab_size = odd.embedding_size = 512
    with pytest.raises(ValueError, match="pass `layout=`"):
        LLaDABackbone(odd)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight_tying": True}, "weight_tying=True"),
        ({"include_bias": True}, "include_bias=True"),
        ({"n_heads": 5}, "not divisible by n_heads=5"),
        ({"n_kv_heads": 3}, "not a multiple of n_kv_heads=3"),
    ],
)
def test_config_refusals(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLaDAConfig(
            **{
                "d_model": 64,
                "n_heads": 4,
                "n_layers": 1,
                "vocab_size": 336,
                "mask_token_id": 1,
                "eos_token_id": 2,
                "pad_token_id": 2,
                **kwargs,
            }
        )


def test_config_json_round_trip():
    cfg = LLaDAConfig.preset("llada-8b")
    assert LLaDAConfig.from_json_dict(cfg.to_json_dict(TokenLayout.preset("llada"))) == cfg
    gqa = LLaDAConfig(
        d_model=64,
        n_heads=4,
        n_kv_heads=None,
        vocab_size=336,
        mask_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        mlp_hidden_size=None,
    )
    data = gqa.to_json_dict()
    assert (data["n_kv_heads"], data["mlp_hidden_size"]) == (4, 256)  # resolved like the released configs
    mqa = dict(data, n_kv_heads=None, multi_query_attention=True)
    assert LLaDAConfig.from_json_dict(mqa).num_kv_heads == 1


# ------------------------------------------------------------------------------------------------- forward
def test_cache_must_be_a_kv_cache(tiny):
    with pytest.raises(TypeError, match="KVCache"):
        tiny(_ids(), cache=object(), position_ids=torch.arange(_ids().shape[1]).expand_as(_ids()))


def test_all_ones_mask_takes_the_unmasked_path(tiny):
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(tiny(ids).logits, tiny(ids, attention_mask=torch.ones_like(ids)).logits)


def test_pair_mask_equals_key_padding_at_real_positions(tiny):
    ids = _ids(2, 10)
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[0, :3] = False
    keep[1, 7:] = False
    with torch.no_grad():
        a = tiny(ids, attention_mask=keep).logits
        b = tiny(ids, attention_mask=padding_pair_mask(keep)).logits
        c = tiny(ids, attention_mask=padding_pair_mask(keep).long()).logits  # integer 0/1 works too
    assert torch.isfinite(b).all()
    torch.testing.assert_close(a[keep], b[keep], atol=1e-6, rtol=0)
    torch.testing.assert_close(b, c, atol=0, rtol=0)


def test_padding_gives_finite_gradients(tiny):
    tiny.train()
    ids = _ids(2, 8)
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[0, :5] = False
    keep[1] = False  # a row of padding only
    logits = tiny(ids, attention_mask=keep).logits
    loss = torch.nn.functional.cross_entropy(logits[keep], ids[keep])
    loss.backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in tiny.parameters())


def test_bad_masks_and_shapes_are_refused(tiny):
    ids = _ids(2, 6)
    with pytest.raises(ValueError, match="must be bool"):
        tiny(ids, attention_mask=torch.zeros(2, 1, 6, 6))
    with pytest.raises(ValueError, match=r"must have shape \(2, 6\)"):
        tiny(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"input_ids must be \[B, L\]"):
        tiny(ids[0])
    with pytest.raises(ValueError, match="position_ids"):
        tiny(ids, position_ids=torch.arange(5)[None])


def test_logits_at_bool_and_index(tiny):
    ids = _ids(3, 10)
    with torch.no_grad():
        full = tiny(ids).logits
        where = ids % 3 == 0
        sel = tiny(ids, logits_at=where).logits
        idx = torch.tensor([[0, 9], [4, 4], [7, 1]])
        gathered = tiny(ids, logits_at=idx).logits
    assert sel.shape == (int(where.sum()), 336)
    torch.testing.assert_close(sel, full[where], atol=1e-6, rtol=0)
    assert gathered.shape == (3, 2, 336)
    torch.testing.assert_close(gathered, full[torch.arange(3)[:, None], idx], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="logits_at"):
        tiny(ids, logits_at=torch.zeros(3, 10))


def test_hidden_and_no_logits(tiny):
    ids = _ids()
    with torch.no_grad():
        out = tiny(ids, return_hidden=True)
        bare = tiny(ids, return_logits=False, return_hidden=True)
    assert bare.logits is None
    assert out.hidden is not None
    assert out.hidden.shape == (2, 12, 64)
    torch.testing.assert_close(tiny.transformer.ff_out(out.hidden), out.logits)
    torch.testing.assert_close(bare.hidden, out.hidden, atol=0, rtol=0)


def test_gradient_checkpointing_matches(tiny):
    ids = _ids(2, 16)
    targets = _ids(2, 16, seed=5)

    def loss_and_grads(model: LLaDABackbone) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.train()
        model.zero_grad(set_to_none=True)
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    base_loss, base_grads = loss_and_grads(tiny)
    tiny.set_gradient_checkpointing(True)
    ck_loss, ck_grads = loss_and_grads(tiny)
    assert abs(base_loss.item() - ck_loss.item()) <= 1e-6
    for name, g in base_grads.items():
        torch.testing.assert_close(ck_grads[name], g, atol=1e-6, rtol=0, msg=name)


def test_gradient_checkpointing_really_recomputes(tiny, monkeypatch):
    calls = []
    block = tiny.transformer_blocks()[0]
    original = block.forward
    monkeypatch.setattr(block, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    tiny.train()
    tiny.set_gradient_checkpointing(True)
    tiny(_ids()).logits.sum().backward()
    assert len(calls) == 2  # forward + recomputation in backward
    calls.clear()
    with torch.no_grad():
        tiny(_ids())  # no recomputation without grad
    assert len(calls) == 1


def test_resize_token_embeddings_keeps_rows_and_uses_the_mean(tiny):
    old_wte = tiny.transformer.wte.weight.detach().clone()
    old_head = tiny.transformer.ff_out.weight.detach().clone()
    ids = _ids()
    with torch.no_grad():
        before = tiny(ids).logits
    tiny.resize_token_embeddings(400)
    wte, head = tiny.transformer.wte.weight, tiny.transformer.ff_out.weight
    assert wte.shape == head.shape == (400, 64)
    assert wte.requires_grad
    assert torch.equal(wte[:336], old_wte)
    assert torch.equal(head[:336], old_head)
    torch.testing.assert_close(wte[336:], old_wte.mean(0).expand(64, -1))
    torch.testing.assert_close(head[336:], old_head.mean(0).expand(64, -1))
    assert (tiny.config.vocab_size, tiny.config.embedding_size) == (400, 400)
    with torch.no_grad():
        after = tiny(ids).logits
    torch.testing.assert_close(after[..., :336], before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="only grows"):
        tiny.resize_token_embeddings(300)


def test_resize_then_save_and_load(tiny, tmp_path):
    layout = TokenLayout.preset("default").replace(name="bigger", vocab_size=400)
    tiny.resize_token_embeddings(400, layout=layout)
    assert tiny.layout.vocab_size == 400
    tiny.save_pretrained(tmp_path)
    loaded = LLaDABackbone.from_pretrained(tmp_path)
    assert loaded.layout == layout
    assert loaded.transformer.wte.num_embeddings == 400
