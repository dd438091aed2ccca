"""The benchmark's code paths on the tiny model: every part runs and the report renders.

Speeds are not asserted (see BENCHMARKS.md); this keeps `python -m bench` and the GPU section,
which no test machine has, from breaking unnoticed.
"""

import re

import pytest

from backpack_jax import sense_table
from backpack_jax.config import get_config
from bench import forward, generation, gpu, reference, report, training

# Report inputs only: the real run measures these (bench/machine.py).
MACHINE = {"cpu": "test cpu", "cores": 2, "platform": "cpu", "device": "cpu",
           "gemm_gflops": 100.0, "torch_gemm_gflops": 120.0, "read_gbps": 10.0}


@pytest.fixture(scope="module")
def tiny():
    config = get_config("tiny")
    ref, params = reference.reference_and_params(config)
    return config, ref, params, sense_table.build(params, config, chunk=4096)


def test_cpu_parts_run_and_render(tiny):
    config, ref, params, table = tiny
    fwd = [forward.run(config, ref, params, b, 16, repeats=1) for b in (1, 2)]
    fwd.append(forward.run(config, ref, params, 1, 16, repeats=1, table=table))
    gen = {"cached": generation.run(config, ref, params, 4, 6, repeats=1),
           "cached + sense table": generation.run(config, ref, params, 4, 6, repeats=1,
                                                  with_reference=False, sense_edit=table)}
    gen["cached + sense table"].update(sense_table=True, table_build_s=0.0, table_gb=0.0)
    train = training.run("tiny", 2, 16, repeats=1)
    results = {"machine": MACHINE,
               "forward": {"config": "tiny", "runs": fwd},
               "generation": {"config": "tiny", "runs": gen},
               "training": {"config": "tiny", "preset": "tiny", "run": train}}

    for r in fwd:  # the bench checks its own parity: same weights, same logits
        assert r["max_rel_diff"] < 1e-4
    assert gen["cached"]["same_first_tokens"] >= 1
    table_md = report.markdown(results)
    for row in ("forward B=1 S=16 fp32", "forward B=2 S=16 fp32",
                "forward B=1 S=16 fp32, sense table", "generate 6 new, B=1, cached",
                "generate 6 new, B=1, cached + sense table", "train step tiny 2x16 float32"):
        assert f"| {row} |" in table_md, row
    # Latency near the prompt's end, the middle (128 lies beyond this run) and the end.
    assert "| generation, ms per token near position | 4 | 7 | 10 |" in table_md
    assert not re.search(r"\bnan\b|\binf\b", table_md)


def test_gpu_section_runs_on_cpu_with_small_shapes():
    results = gpu.run(quick=True, train_name="tiny", model_name="tiny", seq_len=16)
    assert [r["batch"] for r in results["forward"]] == [1, 8, 32]
    assert results["training"]["jax_tokens_per_s"] > 0
    assert "mfu" not in results["training"]  # no bf16 peak is known for a CPU
    line = report.markdown({"machine": MACHINE, "gpu": results}).splitlines()[-1]
    assert line.startswith("GPU (") and "tiny train 8x16 bf16" in line
