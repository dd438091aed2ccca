"""HF <-> Flax conversion: every layout, bit-exact round trips, the CLIs, and every bad input."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

import convert
from backpack_jax import checkpoint, hf, model
from backpack_jax.config import get_model_config
from backpack_jax.hf import ConversionError, from_state_dict, load_hf, to_state_dict, write_hf
from backpack_jax.hf.files import read_tensors
from convert import export, flax_to_hf, hf_to_flax
from tests.hf_checkpoints import (
    LAYOUTS,
    TEST_CONFIGS,
    attention_buffers,
    write_config_json,
    write_hf_checkpoint,
)
from tests.torch_reference import Reference, random_tensors

CONFIG = TEST_CONFIGS["odd"]


@pytest.fixture(scope="module")
def tensors():
    """Canonical HF tensors with real spread."""
    return random_tensors(CONFIG, seed=7)


def assert_trees_equal(a, b):
    leaves_a = jax.tree_util.tree_flatten_with_path(a)[0]
    leaves_b = jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
    for (path, x), (_, y) in zip(leaves_a, leaves_b, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype == np.float32, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


# --- every layout reads to the same parameters ---------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_the_same_params(layout, tensors, tmp_path):
    write_hf_checkpoint(tmp_path, tensors, CONFIG, layout)
    params, config = load_hf(tmp_path)
    assert config == CONFIG
    assert_trees_equal(params, from_state_dict(tensors, CONFIG))


def test_name_and_layout_mapping(tensors):
    params = from_state_dict(tensors, CONFIG)
    p = params["backpack"]
    np.testing.assert_array_equal(p["gpt2_model"]["h_2"]["attn"]["c_attn"]["kernel"],
                                  tensors["backpack.gpt2_model.h.2.attn.c_attn.weight"])
    np.testing.assert_array_equal(p["gpt2_model"]["h_0"]["ln_1"]["scale"],
                                  tensors["backpack.gpt2_model.h.0.ln_1.weight"])
    np.testing.assert_array_equal(p["gpt2_model"]["wte"]["embedding"],
                                  tensors["backpack.gpt2_model.wte.weight"])
    # nn.Linear [out, in] -> Flax kernel [in, out].
    np.testing.assert_array_equal(p["sense_weight_net"]["c_attn"]["kernel"],
                                  tensors["backpack.sense_weight_net.c_attn.weight"].T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_become_float32(dtype, tensors, tmp_path):
    write_hf_checkpoint(tmp_path, tensors, CONFIG, "safetensors", dtype=dtype)
    params, _ = load_hf(tmp_path)
    rounded = {k: torch.from_numpy(v).to(dtype).float().numpy() for k, v in tensors.items()}
    assert_trees_equal(params, from_state_dict(rounded, CONFIG))


def test_convert_reexports_the_conversion_api():
    for name in set(convert.__all__) - {"save_hf"}:
        assert getattr(convert, name) is getattr(hf, name), name
    assert convert.save_hf is export.save_hf  # hf.write_hf plus what transformers needs.


def test_checkpoint_load_reads_hf_directories(tensors, tmp_path):
    write_hf_checkpoint(tmp_path, tensors, CONFIG, "bin_aliases")
    params, config = checkpoint.load(tmp_path)
    assert config == CONFIG
    assert_trees_equal(params, from_state_dict(tensors, CONFIG))


# --- round trips -------------------------------------------------------------------------------

def test_flax_hf_flax_round_trip_is_bit_exact(tmp_path):
    params = model.init(CONFIG, jax.random.PRNGKey(0))
    write_hf(params, CONFIG, tmp_path / "hf")
    again, config = load_hf(tmp_path / "hf")
    assert config == CONFIG
    assert_trees_equal(again, params)


def test_saved_files_are_in_the_hf_layout(tensors, tmp_path):
    write_hf(from_state_dict(tensors, CONFIG), CONFIG, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" not in hf_config
    assert hf_config["architectures"] == ["BackpackGPT2LMHeadModel"]
    with safetensors.safe_open(str(tmp_path / "model.safetensors"), framework="np") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses files without it.
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert saved.keys() == tensors.keys()  # Tied tensors once, canonical names, no aliases.
    for name, value in tensors.items():
        np.testing.assert_array_equal(saved[name], value, err_msg=name)


def test_saved_files_load_into_the_hf_module_tree(tmp_path):
    """The independent reference reads what write_hf wrote (exactly the checkpoint's names and
    shapes) and agrees with apply."""
    params = model.init(CONFIG, jax.random.PRNGKey(1))
    write_hf(params, CONFIG, tmp_path)
    ref = Reference(CONFIG, safetensors.torch.load_file(str(tmp_path / "model.safetensors")))
    ids = np.random.RandomState(0).randint(0, CONFIG.vocab_size, (2, 6))
    with torch.no_grad():
        want, _ = ref(torch.as_tensor(ids))
    got = model.apply(params, jnp.asarray(ids), CONFIG).logits
    assert np.abs(np.asarray(got) - want.numpy()).max() <= 1e-4 * np.abs(want.numpy()).max()


def test_write_hf_refuses_to_overwrite(tmp_path):
    params = model.init(CONFIG, jax.random.PRNGKey(0))
    write_hf(params, CONFIG, tmp_path)
    with pytest.raises(FileExistsError, match="model.safetensors already exists"):
        write_hf(params, CONFIG, tmp_path)


def test_clis_round_trip_bit_exact(tensors, tmp_path, capsys):
    write_hf_checkpoint(tmp_path / "src", tensors, CONFIG, "bin_aliases")
    hf_to_flax.main([str(tmp_path / "src"), str(tmp_path / "flax")])
    flax_to_hf.main([str(tmp_path / "flax"), str(tmp_path / "hf")])
    assert "parameters" in capsys.readouterr().out
    original, _ = load_hf(tmp_path / "src")
    assert_trees_equal(checkpoint.load(tmp_path / "flax")[0], original)
    assert_trees_equal(load_hf(tmp_path / "hf")[0], original)


def test_cli_reports_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for main, src in ((hf_to_flax.main, "empty"), (flax_to_hf.main, "missing")):
        with pytest.raises(SystemExit) as e:
            main([str(tmp_path / src), str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "does not exist" in err


def test_checkpoint_of_another_shape_is_one_error_naming_the_parameters(tmp_path, capsys):
    params = model.init(CONFIG, jax.random.PRNGKey(0))
    checkpoint.save(tmp_path / "flax", params, CONFIG)
    hf.write_config(tmp_path / "flax", CONFIG.replace(n_embd=2 * CONFIG.n_embd))
    with pytest.raises(ValueError, match=r"does not hold the model its config.json describes "
                                         r"\(\d+ parameter\(s\) differ\): backpack/"):
        checkpoint.load(tmp_path / "flax")
    with pytest.raises(SystemExit) as e:
        flax_to_hf.main([str(tmp_path / "flax"), str(tmp_path / "hf")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "the config needs" in err


@pytest.mark.slow
def test_clis_as_modules(tensors, tmp_path):
    write_hf_checkpoint(tmp_path / "src", tensors, CONFIG, "sharded")
    for cli, src, out in [("convert.hf_to_flax", "src", "flax"), ("convert.flax_to_hf", "flax",
                                                                   "hf")]:
        run = subprocess.run([sys.executable, "-m", cli, str(tmp_path / src), str(tmp_path / out)],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
    assert_trees_equal(load_hf(tmp_path / "hf")[0], load_hf(tmp_path / "src")[0])


# --- bad checkpoints ---------------------------------------------------------------------------

def test_all_tensor_problems_are_listed_at_once(tensors):
    bad = dict(tensors)
    del bad["backpack.gpt2_model.h.1.mlp.c_fc.bias"]
    del bad["backpack.sense_network.ln.weight"]
    bad["backpack.gpt2_model.h.0.attn.c_proj.weight"] = np.zeros((48, 47), np.float32)
    bad["backpack.sense_network.extra.weight"] = np.zeros(3, np.float32)
    bad["backpack.gpt2_model.ln_f.bias"] = np.zeros(48, np.int32)
    with pytest.raises(ConversionError) as info:
        from_state_dict(bad, CONFIG)
    message = str(info.value)
    assert len(info.value.problems) == 5, message
    for expected in ["missing tensor backpack.gpt2_model.h.1.mlp.c_fc.bias with shape [192]",
                     "missing tensor backpack.sense_network.ln.weight",
                     "misshaped tensor backpack.gpt2_model.h.0.attn.c_proj.weight: shape "
                     "[48, 47], expected [48, 48]",
                     "unexpected tensor backpack.sense_network.extra.weight",
                     "backpack.gpt2_model.ln_f.bias has dtype int32"]:
        assert expected in message


def test_missing_tied_tensor_names_its_aliases(tensors):
    bad = {k: v for k, v in tensors.items() if k != "backpack.gpt2_model.wte.weight"}
    with pytest.raises(ConversionError, match=r"missing tensor backpack.gpt2_model.wte.weight "
                                              r"\(or its alias backpack.word_embeddings.weight"):
        from_state_dict(bad, CONFIG)


def test_unequal_tied_copies_are_an_error(tensors):
    bad = dict(tensors)
    bad["lm_head.weight"] = tensors["backpack.gpt2_model.wte.weight"] + 1.0
    with pytest.raises(ConversionError, match="tied tensors differ: lm_head.weight"):
        from_state_dict(bad, CONFIG)


def test_buffers_are_ignored_only_for_existing_layers(tensors):
    buffers = {k: v.numpy() for k, v in attention_buffers(CONFIG).items()}
    assert_trees_equal(from_state_dict(tensors | buffers, CONFIG),
                       from_state_dict(tensors, CONFIG))
    stray = {"backpack.gpt2_model.h.7.attn.masked_bias": np.float32(-1e4)}
    with pytest.raises(ConversionError, match="n_layer=3 but the tensors hold layers h.0..h.7"):
        from_state_dict(tensors | stray, CONFIG)


@pytest.mark.parametrize("field,value,match", [
    ("n_layer", 2, "config n_layer=2 but the tensors hold layers h.0..h.2 \\(3 layers\\)"),
    ("vocab_size", 98, "config vocab_size=98 but backpack.gpt2_model.wte.weight has shape "
                       "\\[97, 48\\], which means vocab_size=97"),
    ("num_senses", 4, "config num_senses=4 .* which means num_senses=6"),
    ("n_positions", 64, "config n_positions=64 .* which means n_positions=40"),
    ("n_inner", 100, "config n_inner=100 .* which means n_inner=192"),
    ("sense_intermediate_scale", 2, "which means sense_intermediate_scale=4"),
])
def test_config_json_contradicting_the_tensors_names_the_field(field, value, match, tensors,
                                                               tmp_path):
    write_hf_checkpoint(tmp_path, tensors, CONFIG, "safetensors")
    write_config_json(tmp_path, CONFIG, **{field: value})
    with pytest.raises(ConversionError, match=match):
        load_hf(tmp_path)


def test_truncated_safetensors_names_the_file(tensors, tmp_path):
    write_hf_checkpoint(tmp_path, tensors, CONFIG, "safetensors")
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(ConversionError, match=f"cannot read {file}.*truncated or corrupt"):
        load_hf(tmp_path)


def test_corrupt_bin_names_the_file(tmp_path):
    write_config_json(tmp_path, CONFIG)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a zip archive")
    with pytest.raises(ConversionError, match="cannot read .*pytorch_model.bin"):
        load_hf(tmp_path)


def test_bin_without_torch_says_how_to_get_it(tensors, tmp_path, monkeypatch):
    write_hf_checkpoint(tmp_path, tensors, CONFIG, "bin")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ConversionError, match="needs PyTorch: pip install torch==2.13.0"):
        load_hf(tmp_path)


def test_missing_shard_names_the_file(tensors, tmp_path):
    write_hf_checkpoint(tmp_path, tensors, CONFIG, "sharded")
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ConversionError, match="model-00002-of-00003.safetensors does not exist"):
        load_hf(tmp_path)


def test_shard_index_claiming_absent_tensors(tensors, tmp_path):
    write_hf_checkpoint(tmp_path, tensors, CONFIG, "sharded")
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["backpack.ghost.weight"] = "model-00001-of-00003.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="shards do not hold:\n  backpack.ghost.weight"):
        load_hf(tmp_path)


def test_directory_without_weights(tmp_path):
    write_config_json(tmp_path, CONFIG)
    with pytest.raises(ConversionError, match="no weights in .*found \\['config.json'\\]"):
        load_hf(tmp_path)


def test_directory_without_config(tensors, tmp_path):
    write_hf_checkpoint(tmp_path, tensors, CONFIG, "safetensors")
    (tmp_path / "config.json").unlink()
    with pytest.raises(ConversionError, match="no config.json"):
        load_hf(tmp_path)


def test_nonexistent_path(tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        load_hf(tmp_path / "nowhere")


def test_to_state_dict_checks_the_tree():
    params = model.init(CONFIG, jax.random.PRNGKey(0))
    with pytest.raises(ConversionError, match="missing parameter backpack/gpt2_model/h_3"):
        to_state_dict(params, CONFIG.replace(n_layer=4))


# --- the real checkpoint, when a local snapshot is given ------------------------------------

REAL_CHECKPOINT = os.environ.get("BACKPACK_GPT2_PATH")


@pytest.mark.skipif(not REAL_CHECKPOINT, reason="set BACKPACK_GPT2_PATH to a local snapshot of "
                                                "stanfordnlp/backpack-gpt2 to run")
def test_real_backpack_gpt2():
    from backpack_jax.tokenizer import get_tokenizer

    params, config = load_hf(REAL_CHECKPOINT)
    want = get_model_config("gpt2_small")
    assert (config.vocab_size, config.n_layer, config.n_embd, config.num_senses) == (
        want.vocab_size, want.n_layer, want.n_embd, want.num_senses)
    ref = Reference(config, read_tensors(REAL_CHECKPOINT))
    text = "The capital of France is Paris, and the capital of Germany is Berlin."
    ids = np.array([get_tokenizer().encode(text)])
    out = model.apply(params, jnp.asarray(ids), config, return_contextualization=True)
    with torch.no_grad():
        ref_logits, ref_alpha = ref(torch.as_tensor(ids))
    ref_logits = ref_logits.numpy()
    rel = np.abs(np.asarray(out.logits) - ref_logits).max() / np.abs(ref_logits).max()
    print(f"real checkpoint: max|dlogits|/max|logits| = {rel:.2e}")
    assert rel <= 1e-4
    assert np.abs(np.asarray(out.contextualization) - ref_alpha.numpy()).max() <= 1e-5
    logp = jax.nn.log_softmax(out.logits[0, :-1], axis=-1)
    loss = -float(jnp.take_along_axis(logp, jnp.asarray(ids[0, 1:, None]), axis=-1).mean())
    print(f"real checkpoint: loss {loss:.3f} nats/token on {text!r}")
    assert loss < 5.0  # GPT-2-small-class models score about 3-4 here; uniform is 10.8.
