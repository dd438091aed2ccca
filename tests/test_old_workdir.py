"""Checkpoints written before the one-config change still load, and a workdir still resumes.

The fixture (tests/fixtures/tiny_workdir_caeb19e, made as its README says) is a run of the code
at commit caeb19e cut back to its step-4 checkpoint, as if killed after step 5; its metrics.jsonl
still holds that run's steps 5 and 6, which the resumed run must reproduce.
"""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from backpack_jax import checkpoint, hf, model
from backpack_jax.config import get_config, get_model_config
from train import metrics
from train.run import TRAIN_CONFIG_FILE, train

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "tiny_workdir_caeb19e"
# A converted model (`checkpoint.save`: config.json + params/) of the same code, seed 0.
CONVERTED = pathlib.Path(__file__).parent / "fixtures" / "converted_caeb19e"
# The fixture command's overrides of the `tiny` preset.
OVERRIDES = {"model.n_embd": 4, "model.n_head": 1, "model.num_senses": 2, "model.n_layer": 1,
             "model.sense_intermediate_scale": 1, "steps": 6, "warmup_steps": 2,
             "batch_size": 2, "seq_len": 16, "eval_every": 2, "eval_batches": 1,
             "checkpoint_every": 2, "keep_checkpoints": 2}


def _config():
    cfg = get_config("tiny")
    cfg.update_from_flattened_dict(OVERRIDES)
    return cfg


@pytest.fixture
def workdir(tmp_path):
    return shutil.copytree(FIXTURE, tmp_path / "workdir")


def test_fixture_records_the_removed_no_op_field():
    """What makes the fixture a test of compatibility: both files name the removed field."""
    saved = json.loads((FIXTURE / TRAIN_CONFIG_FILE).read_text())
    assert saved["model"]["reorder_and_upcast_attn"] is False
    config_json = json.loads((FIXTURE / hf.CONFIG_FILE).read_text())
    assert config_json["reorder_and_upcast_attn"] is False
    assert checkpoint.latest_step_dir(FIXTURE).name == "4"


def test_old_workdir_loads(workdir):
    params, cfg = checkpoint.load(workdir)
    assert cfg == get_model_config(_config())
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), params)
    assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), model.abstract_params(cfg))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_old_converted_model_loads_with_its_values():
    params, cfg = checkpoint.load(CONVERTED)
    assert cfg == get_model_config(_config()).replace(resid_pdrop=0.1, embd_pdrop=0.1,
                                                      attn_pdrop=0.1)
    fresh = model.init(cfg, jax.random.PRNGKey(0))  # the same initialisation then and now
    jax.tree.map(np.testing.assert_array_equal, params, fresh)


@pytest.mark.slow
def test_old_workdir_resumes_with_the_same_losses(workdir, capsys):
    logged = {r["step"]: r for r in metrics.read_metrics(workdir)}
    summary = train(_config(), workdir)
    assert "resuming from step 4" in capsys.readouterr().out
    assert summary["step"] == 6
    resumed = {r["step"]: r for r in metrics.read_metrics(workdir)}
    assert sorted(resumed) == sorted(logged)
    for step in (5, 6):
        assert resumed[step]["loss"] == pytest.approx(logged[step]["loss"], abs=1e-5), step
    assert resumed[6]["eval_loss"] == pytest.approx(logged[6]["eval_loss"], abs=1e-5)


def test_a_removed_field_with_another_value_is_refused(workdir):
    path = workdir / TRAIN_CONFIG_FILE
    saved = json.loads(path.read_text())
    saved["model"]["reorder_and_upcast_attn"] = True
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="reorder_and_upcast_attn=True is not implemented"):
        train(_config(), workdir)
