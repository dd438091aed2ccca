"""BackpackConfig: presets, HF dict round trip, and errors that name the field."""

import dataclasses

import pytest

from backpack_jax.config import PRESETS, BackpackConfig, get_config


def test_backpack_gpt2_preset_is_the_hf_checkpoint():
    cfg = get_config("backpack_gpt2")
    assert (cfg.vocab_size, cfg.n_positions, cfg.n_embd, cfg.n_layer, cfg.n_head) == (
        50264, 512, 768, 12, 12)
    assert (cfg.num_senses, cfg.sense_intermediate_scale, cfg.n_inner) == (16, 4, None)
    assert cfg.scale_attn_by_inverse_layer_idx and cfg.scale_attn_weights
    assert cfg.sense_head_dim == 48 and cfg.inner_dim == 3072
    assert (cfg.resid_pdrop, cfg.embd_pdrop, cfg.attn_pdrop) == (0.1, 0.1, 0.1)


@pytest.mark.parametrize("name,d,layers,heads", [("small", 768, 12, 12), ("mini", 640, 8, 8),
                                                 ("micro", 384, 6, 6)])
def test_paper_sizes(name, d, layers, heads):
    cfg = get_config(name)
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.num_senses, cfg.vocab_size) == (
        d, layers, heads, 16, 50264)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_dict_round_trip(name):
    cfg = PRESETS[name]
    hf = cfg.to_hf_dict()
    assert hf["model_type"] == "gpt2"
    assert BackpackConfig.from_hf_dict(hf) == cfg


def test_real_config_json_keys_are_accepted():
    hf = dict(get_config("backpack_gpt2").to_hf_dict(), auto_map={"AutoModel": "x"},
              torch_dtype="float32", transformers_version="4.28.0", summary_type="cls_index",
              summary_use_proj=True, use_cache=True, n_ctx=512)
    assert BackpackConfig.from_hf_dict(hf) == get_config("backpack_gpt2")


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match="n_experts"):
        BackpackConfig.from_hf_dict({"n_experts": 4})


def test_n_ctx_must_match_n_positions():
    with pytest.raises(ValueError, match="n_ctx"):
        BackpackConfig.from_hf_dict({"n_positions": 512, "n_ctx": 1024})


@pytest.mark.parametrize("changes,field", [
    ({"n_embd": 100, "n_head": 12}, "n_embd"),
    ({"n_embd": 96, "n_head": 12, "num_senses": 7}, "n_embd"),
    ({"n_layer": 0}, "n_layer"),
    ({"vocab_size": -3}, "vocab_size"),
    ({"activation_function": "relu"}, "activation_function"),
    ({"resid_pdrop": 1.5}, "resid_pdrop"),
    ({"vocab_size": 100}, "bos_token_id"),
    ({"n_inner": 0}, "n_inner"),
])
def test_inconsistent_values_name_the_field(changes, field):
    with pytest.raises(ValueError, match=f"BackpackConfig.{field}="):
        dataclasses.replace(get_config("backpack_gpt2"), **changes)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        get_config("huge")


def test_config_is_hashable_for_jit():
    assert hash(get_config("tiny")) == hash(get_config("tiny").replace())
