"""backpack_jax.config: the presets (model + recipe), the HF dict round trip, errors that name
the field."""

import dataclasses

import pytest

from backpack_jax.config import PRESETS, BackpackConfig, get_config, get_model_config

RECIPE_FIELDS = ("steps", "batch_size", "seq_len", "lr", "warmup_steps", "weight_decay",
                 "grad_clip_norm", "b1", "b2", "eps")


def test_gpt2_small_is_the_hf_checkpoint():
    cfg = get_model_config("gpt2_small")
    assert cfg == BackpackConfig()
    assert (cfg.vocab_size, cfg.n_positions, cfg.n_embd, cfg.n_layer, cfg.n_head) == (
        50264, 512, 768, 12, 12)
    assert (cfg.num_senses, cfg.sense_intermediate_scale, cfg.n_inner) == (16, 4, None)
    assert cfg.scale_attn_by_inverse_layer_idx and cfg.scale_attn_weights
    assert cfg.sense_head_dim == 48 and cfg.inner_dim == 3072
    assert (cfg.resid_pdrop, cfg.embd_pdrop, cfg.attn_pdrop) == (0.1, 0.1, 0.1)


def test_gpt2_small_is_the_papers_recipe():
    cfg = get_config("gpt2_small")
    assert (cfg.steps, cfg.batch_size, cfg.seq_len) == (100_000, 1024, 512)
    assert cfg.batch_size * cfg.seq_len == 524_288
    assert (cfg.b1, cfg.b2, cfg.eps) == (0.9, 0.999, 1e-8)
    assert (cfg.lr, cfg.warmup_steps, cfg.weight_decay, cfg.grad_clip_norm) == (
        6e-4, 5_000, 0.1, 1.0)


@pytest.mark.parametrize("name,d,layers,heads", [("gpt2_small", 768, 12, 12),
                                                 ("gpt2_mini", 640, 8, 8),
                                                 ("gpt2_micro", 384, 6, 6)])
def test_paper_sizes_share_the_recipe(name, d, layers, heads):
    model = get_model_config(name)
    assert (model.n_embd, model.n_layer, model.n_head, model.num_senses, model.vocab_size) == (
        d, layers, heads, 16, 50264)
    cfg, small = get_config(name), get_config("gpt2_small")
    for field in RECIPE_FIELDS:
        assert cfg[field] == small[field], field


def test_tiny_has_no_dropout():
    model = get_model_config("tiny")
    assert (model.resid_pdrop, model.embd_pdrop, model.attn_pdrop) == (0.0, 0.0, 0.0)
    assert get_config("tiny").data is None  # The embedded corpus.


def test_presets_are_fresh_copies():
    get_config("tiny").model.n_layer = 7
    assert get_config("tiny").model.n_layer == 2


def test_n_inner_placeholder_is_type_checked():
    cfg = get_config("tiny")
    cfg.model.n_inner = 96
    assert get_model_config(cfg).inner_dim == 96
    with pytest.raises(TypeError):
        cfg.model.n_inner = "wide"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_dict_round_trip(name):
    cfg = get_model_config(name)
    hf = cfg.to_hf_dict()
    assert hf["model_type"] == "gpt2"
    assert BackpackConfig.from_hf_dict(hf) == cfg


def test_real_config_json_keys_are_accepted():
    hf = dict(get_model_config("gpt2_small").to_hf_dict(), auto_map={"AutoModel": "x"},
              torch_dtype="float32", transformers_version="4.28.0", summary_type="cls_index",
              summary_use_proj=True, use_cache=True, n_ctx=512, reorder_and_upcast_attn=False)
    assert BackpackConfig.from_hf_dict(hf) == get_model_config("gpt2_small")


def test_reorder_and_upcast_attn_other_than_false_is_an_error():
    with pytest.raises(ValueError, match="reorder_and_upcast_attn=True is not implemented"):
        BackpackConfig.from_hf_dict({"reorder_and_upcast_attn": True})


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
        dataclasses.replace(get_model_config("gpt2_small"), **changes)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown config 'huge'; choose from"):
        get_config("huge")


def test_config_is_hashable_for_jit():
    assert hash(get_model_config("tiny")) == hash(get_model_config("tiny").replace())
