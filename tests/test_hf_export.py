"""Hugging Face exports: transformers loads them as a Backpack (offline, trust_remote_code) and
they agree with `model.apply` and `generate`, and `load_hf` reads them back bit-exact."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from backpack_jax import checkpoint, generate, hf, model, sense_finetune
from backpack_jax.config import get_model_config
from backpack_jax.hf import from_state_dict, load_hf
from convert import export, flax_to_hf, save_hf
from convert.hf_export.modeling_backpack import BackpackGPT2LMHeadModel
from tests.hf_checkpoints import write_hf_checkpoint
from tests.torch_reference import random_reference

CONFIG = get_model_config("tiny").replace(n_positions=32)  # GPT-2's vocabulary: has a tokenizer.
WORKDIR = pathlib.Path(__file__).parent / "fixtures" / "tiny_workdir_caeb19e"


@pytest.fixture(scope="module")
def reference():
    """The tests' independent PyTorch Backpack, on random weights with real spread."""
    return random_reference(CONFIG, seed=5)


@pytest.fixture(scope="module")
def params(reference):
    return from_state_dict(reference.tensors, CONFIG)


@pytest.fixture(scope="module")
def export_dir(params, tmp_path_factory):
    return save_hf(params, CONFIG, tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def hf_model(export_dir):
    return AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True).eval()


@pytest.fixture(scope="module")
def tokenizer(export_dir):
    return AutoTokenizer.from_pretrained(export_dir, tokenizer_type="gpt2")  # as the card says


def ids(batch, length, seed=0):
    return np.random.RandomState(seed).randint(0, CONFIG.vocab_size, (batch, length))


def test_export_is_self_contained_and_says_backpack(export_dir, params):
    names = {p.name for p in export_dir.iterdir()}
    assert names == {"config.json", "model.safetensors", "configuration_backpack.py",
                     "modeling_backpack.py", "vocab.json", "merges.txt",
                     "tokenizer_config.json", "README.md"}
    hf_config = json.loads((export_dir / "config.json").read_text())
    assert hf_config["model_type"] == "backpack-gpt2"
    assert hf_config["architectures"] == ["BackpackGPT2LMHeadModel"]
    assert hf_config["auto_map"] == {
        "AutoConfig": "configuration_backpack.BackpackGPT2Config",
        "AutoModelForCausalLM": "modeling_backpack.BackpackGPT2LMHeadModel"}
    assert "## Training" not in (export_dir / "README.md").read_text()  # Not from a workdir.
    again, config = load_hf(export_dir)
    assert config == CONFIG
    np.testing.assert_equal(jax.tree_util.tree_map(np.asarray, again),
                            jax.tree_util.tree_map(np.asarray, params))  # bit-exact


def test_save_pretrained_output_reads_back_with_load_hf(hf_model, params, tmp_path):
    """A model fine-tuned in PyTorch comes back to JAX unchanged."""
    hf_model.save_pretrained(tmp_path)
    again, config = load_hf(tmp_path)
    assert config == CONFIG
    np.testing.assert_equal(jax.tree_util.tree_map(np.asarray, again),
                            jax.tree_util.tree_map(np.asarray, params))


@pytest.mark.parametrize("layout", ["bin_aliases", "safetensors"])
def test_our_model_loads_checkpoints_in_the_hub_layout(params, layout, tmp_path):
    """The original's files (model_type gpt2, its auto_map, aliases, mask buffers) load into our
    class with the same logits."""
    tensors = {k: np.array(v) for k, v in hf.to_state_dict(params, CONFIG).items()}
    write_hf_checkpoint(tmp_path, tensors, CONFIG, layout)
    ours = BackpackGPT2LMHeadModel.from_pretrained(tmp_path).eval()
    x = ids(1, 7, seed=3)
    with torch.no_grad():
        got = ours(torch.as_tensor(x)).logits.numpy()
    want = np.asarray(model.apply(params, jnp.asarray(x), CONFIG).logits)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_a_plain_load_is_refused_not_silently_wrong(export_dir):
    with pytest.raises((ValueError, OSError), match="trust_remote_code|custom code"):
        AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=False)


def test_exported_model_equals_the_independent_reference(hf_model, reference):
    """modeling_backpack.py against tests/torch_reference.py, written apart from it: both run
    transformers' GPT-2 in float32, so only the order of sums may differ."""
    x = torch.as_tensor(ids(2, 11, seed=4))
    alpha = torch.as_tensor(np.random.RandomState(6).dirichlet(
        np.ones(11), size=(2, CONFIG.num_senses, 11)).astype(np.float32))
    with torch.no_grad():
        out = hf_model(x, use_cache=False, output_contextualization=True, output_senses=True)
        custom = hf_model.run_with_custom_contextualization(x, alpha).logits
        want_logits, want_alpha = reference(x)
        want_senses = reference.senses(x)
        want_custom, _ = reference(x, contextualization=alpha)
    for what, got, want in [("logits", out.logits, want_logits), ("alpha", out.contextualization,
                             want_alpha), ("senses", out.senses, want_senses),
                            ("logits with custom alpha", custom, want_custom)]:
        err, scale = (got - want).abs().max().item(), want.abs().max().item()
        print(f"export vs reference, {what}: max|d| = {err:.1e}, max = {scale:.1e}")
        assert err <= 2e-6 * scale, what


def test_logits_contextualization_and_senses_equal_apply(hf_model, params):
    x = ids(2, 9)
    want = model.apply(params, jnp.asarray(x), CONFIG, return_contextualization=True)
    with torch.no_grad():
        out = hf_model(torch.as_tensor(x), output_contextualization=True, output_senses=True)
    logits = np.asarray(want.logits)
    assert np.abs(out.logits.numpy() - logits).max() <= 1e-5 * np.abs(logits).max()
    np.testing.assert_allclose(out.contextualization.numpy(),
                               np.asarray(want.contextualization), atol=1e-5)
    assert out.senses.shape == (2, CONFIG.num_senses, 9, CONFIG.n_embd)
    with torch.no_grad():
        custom = hf_model.run_with_custom_contextualization(torch.as_tensor(x),
                                                            out.contextualization)
    np.testing.assert_allclose(custom.logits.numpy(), out.logits.numpy(), rtol=0, atol=1e-6)


def test_loss_from_labels_is_the_shifted_cross_entropy(hf_model, params):
    x = ids(2, 9, seed=1)
    labels = x.copy()
    labels[0, 3] = -100  # ignored
    logits = np.asarray(model.apply(params, jnp.asarray(x), CONFIG).logits, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)
                           ) - logits.max(-1, keepdims=True)
    target = labels[:, 1:]
    keep = target != -100
    picked = np.take_along_axis(logp[:, :-1], np.where(keep, target, 0)[..., None], -1)[..., 0]
    want = -picked[keep].mean()
    with torch.no_grad():
        loss = hf_model(torch.as_tensor(x), labels=torch.as_tensor(labels)).loss
    assert abs(loss.item() - want) <= 1e-5 * want


def test_the_tokenizer_loads_without_a_remote_code_question(export_dir, monkeypatch):
    """transformers 5's AutoTokenizer reads the model's config, whose auto_map asks whether to
    run remote code; the model card's `tokenizer_type="gpt2"` skips that."""
    import transformers.dynamic_module_utils
    import transformers.models.auto.configuration_auto
    import transformers.models.auto.tokenization_auto

    def asked(*args, **kwargs):
        raise AssertionError("transformers asked about remote code")

    for module in (transformers.dynamic_module_utils, transformers.models.auto.configuration_auto,
                   transformers.models.auto.tokenization_auto):
        monkeypatch.setattr(module, "resolve_trust_remote_code", asked)
    with pytest.raises(AssertionError, match="asked about remote code"):
        AutoTokenizer.from_pretrained(export_dir)  # what the model card no longer says
    tok = AutoTokenizer.from_pretrained(export_dir, tokenizer_type="gpt2")
    assert tok("Hello world").input_ids == [15496, 995] and tok.padding_side == "left"
    assert "AutoTokenizer.from_pretrained(path, tokenizer_type='gpt2')" in (
        export_dir / "README.md").read_text()


def test_positions_past_the_model_are_a_clear_error(hf_model):
    with pytest.raises(ValueError, match=rf"reaches position {CONFIG.n_positions + 1}, past this "
                                         rf"model's n_positions={CONFIG.n_positions}"):
        hf_model(torch.as_tensor(ids(1, CONFIG.n_positions + 1)))
    cache = hf_model(torch.as_tensor(ids(1, CONFIG.n_positions)), use_cache=True).cache
    with pytest.raises(ValueError, match="past this model's n_positions"):
        hf_model(torch.as_tensor(ids(1, 1)), cache=cache)


def test_cached_steps_equal_the_full_forward(hf_model):
    x = torch.as_tensor(ids(2, 8, seed=2))
    with torch.no_grad():
        full = hf_model(x, use_cache=False).logits
        first = hf_model(x[:, :5], use_cache=True)
        cache, steps = first.cache, [first.logits]
        for i in range(5, 8):
            step = hf_model(x[:, i:i + 1], past_key_values=cache,  # the older name, too
                            output_contextualization=True)
            assert step.contextualization.shape == (2, CONFIG.num_senses, 1, i + 1)
            cache = step.cache
            steps.append(step.logits)
    np.testing.assert_allclose(torch.cat(steps, 1).numpy(), full.numpy(), rtol=0,
                               atol=1e-5 * full.abs().max().item())


@pytest.mark.parametrize("lengths", [(6, 6), (6, 3)], ids=["same_length", "left_padded"])
def test_greedy_generate_gives_backpack_jax_tokens(hf_model, params, lengths):
    prompts = [ids(1, n, seed=10 + i)[0].tolist() for i, n in enumerate(lengths)]
    want = generate.generate(params, CONFIG, prompts, 8, eos_id=CONFIG.eos_token_id)
    pad = CONFIG.eos_token_id
    width = max(lengths)
    padded = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    got = hf_model.generate(padded, attention_mask=mask, max_new_tokens=8, do_sample=False,
                            pad_token_id=pad)
    np.testing.assert_array_equal(got[:, width:].numpy(), want.new_tokens)


def test_text_generation_pipeline_runs(hf_model, tokenizer):
    generator = pipeline("text-generation", model=hf_model, tokenizer=tokenizer)
    out = generator("The meaning of life is", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("The meaning of life is")
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]


def test_hub_code_option_points_at_the_authors_code(params, tmp_path):
    save_hf(params, CONFIG, tmp_path, hub_code=True)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert all(v.startswith("stanfordnlp/backpack-gpt2--") for v in hf_config["auto_map"].values())
    assert not list(tmp_path.glob("*.py"))


def test_model_card_has_metadata_config_and_training(tmp_path):
    flax_to_hf.main([str(WORKDIR), str(tmp_path / "hf")])
    card = (tmp_path / "hf" / "README.md").read_text()
    front = card.split("---")[1]
    for line in ("library_name: transformers", "license: apache-2.0",
                 "pipeline_tag: text-generation", "- backpack"):
        assert line in front
    step = int(checkpoint.step_dirs(WORKDIR)[0].name)
    summary = export.training_summary(WORKDIR)
    assert summary["step"] == step and summary["tokens"] == step * 2 * 16
    assert f"for {step:,} steps ({step * 32:,} tokens)" in card
    assert f"Held-out loss {summary['eval_loss']:.4f}" in card
    assert "| num_senses |" in card


def test_a_learned_sense_edit_travels_with_the_export(params, tmp_path, capsys):
    rng = np.random.default_rng(7)
    x = ids(2, 9, seed=3)
    pairs = [(int(x[0, 1]), 0), (int(x[0, 4]), 3), (int(x[1, 2]), 1)]
    edit = sense_finetune.sense_delta(CONFIG, pairs, rng.normal(size=(3, CONFIG.n_embd)))
    sense_finetune.save_delta(tmp_path / "edit.safetensors", edit, CONFIG)
    out = save_hf(params, CONFIG, tmp_path / "export", sense_edit=tmp_path / "edit.safetensors")
    edited = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    want = np.asarray(model.apply(params, jnp.asarray(x), CONFIG, sense_edit=edit).logits)
    plain = np.asarray(model.apply(params, jnp.asarray(x), CONFIG).logits)
    with torch.no_grad():
        got = edited(torch.as_tensor(x), use_cache=False).logits.numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert np.abs(want - plain).max() > 1e-2  # the edit changes the logits
    # Cached generation applies the edit too: the step logits equal the full pass.
    with torch.no_grad():
        first = edited(torch.as_tensor(x[:, :5]), use_cache=True)
        step = edited(torch.as_tensor(x[:, 5:6]), cache=first.cache, use_cache=True)
    np.testing.assert_allclose(step.logits.numpy()[:, 0], want[:, 5], atol=1e-5 * np.abs(
        want).max())
    # Read back: the parameters as they were, and the edit by one call.
    read, config = load_hf(out)
    assert "carries a learned sense edit" in capsys.readouterr().err
    for a, b in zip(jax.tree.leaves(read), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    back = sense_finetune.load_delta(out, config)
    assert back.pairs == pairs
    np.testing.assert_array_equal(np.asarray(back.delta_RxD), np.asarray(edit.delta_RxD))


def test_an_export_without_an_edit_has_no_edit_tensors(export_dir):
    _, info = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True,
                                                   output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    assert "sense_delta_pairs" not in json.loads((export_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="holds no sense delta"):
        sense_finetune.load_delta(export_dir, CONFIG)
