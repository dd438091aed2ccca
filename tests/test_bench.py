"""The benchmark's code paths on the tiny model: every part runs and the report renders.

Speeds are not asserted (see BENCHMARKS.md); this keeps `python -m bench` and the GPU section,
which no test machine has, from breaking unnoticed.
"""

import json
import re
import sys

import pytest

from backpack_jax import sense_table
from backpack_jax.config import get_model_config
from bench import (
    __main__ as cli,
    forward,
    generation,
    gpu,
    machine,
    reference,
    report,
    suite,
    timing,
    training,
)

# Report inputs only: the real run measures these (bench/machine.py).
MACHINE = {"cpu": "test cpu", "cores": 2, "platform": "cpu", "device": "cpu",
           "gemm_gflops": 100.0, "torch_gemm_gflops": 120.0, "read_gbps": 10.0,
           "read_burst_gbps": 12.0}


@pytest.fixture(scope="module")
def tiny():
    config = get_model_config("tiny")
    ref, params = reference.reference_and_params(config)
    return config, ref, params, sense_table.build(params, config, chunk=4096)


@pytest.mark.slow
def test_cpu_parts_run_and_render(tiny):
    config, ref, params, table = tiny
    gemms = iter([90.0, 150.0])  # the GEMM rate measured before and after the one turn
    fwd = [forward.run(config, ref, params, 1, 16, repeats=1, gemm_probe=lambda: next(gemms)),
           forward.run(config, ref, params, 2, 16, repeats=1)]
    fwd.append(forward.run(config, ref, params, 1, 16, repeats=1, table=table))
    probes = iter([5.0, 7.0])  # bandwidth measured before and after the timed run
    gen = {"cached": generation.run(config, ref, params, 4, 6, repeats=1,
                                    read_probe=lambda: next(probes)),
           "cached + sense table": generation.run(config, ref, params, 4, 6, repeats=1,
                                                  with_reference=False, sense_edit=table)}
    gen["cached + sense table"].update(sense_table=True, table_build_s=0.0, table_gb=0.0)
    train = training.run("tiny", 2, 16, repeats=1)
    results = {"machine": MACHINE,
               "forward": {"config": "tiny", "runs": fwd},
               "generation": {"config": "tiny", "runs": gen,
                              "demo_pane": generation.demo_pane(config, params, table, 4, 1),
                              "batched": [generation.batched(config, params, 3, 4, 5, repeats=1,
                                                             gemm_probe=lambda: 80.0)]},
               "training": {"config": "tiny", "run": train}}

    for r in fwd:  # the bench checks its own parity: same weights, same logits
        assert r["max_rel_diff"] < 1e-4
    assert gen["cached"]["same_first_tokens"] >= 1
    table_md = report.markdown(results)
    for row in ("forward B=1 S=16 fp32", "forward B=2 S=16 fp32",
                "forward B=1 S=16 fp32, sense table", "generate 6 new, B=1, cached",
                "generate 6 new, B=1, cached + sense table", "train step tiny 2x16 float32",
                "demo pane 48 new, B=1, prompt 4 padded to 64, sense table (`Demo.stream`)",
                "sample 5 new after 4, B=3, T=1, cached"):
        assert f"| {row} |" in table_md, row
    # Latency near the prompt's end, the middle (128 lies beyond this run) and the end.
    assert "| generation, ms per token near position | 4 | 7 | 10 |" in table_md
    # A row's bound uses the rate measured around its turns, if any, else the run's.
    assert fwd[0]["gemm_gflops"] == 150.0
    assert "(at 150 GFLOP/s) |" in table_md and "(at 120 GFLOP/s) |" in table_md
    assert gen["cached"]["read_gbps"] == 7.0
    assert "MB/step at 7.0 GB/s)" in table_md and "MB/step at 10.0 GB/s)" in table_md
    assert "glibc huge pages off" in table_md
    assert "steal" not in table_md  # nothing measured, nothing said
    results["steal"] = {"forward": 0.14, "generation": None, "run": 0.09}
    assert "(steal, /proc/stat), which slows every figure and no timer sees: forward 14%, run 9%." \
        in report.markdown(results)
    results["glibc_tunables"] = "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert "glibc huge pages on" in report.markdown(results)
    results["glibc_tunables"] = "glibc.malloc.hugetlb=0"
    assert "glibc huge pages off" in report.markdown(results)
    assert not re.search(r"\bnan\b|\binf\b", table_md)


@pytest.mark.slow
def test_gpu_section_runs_on_cpu_with_small_shapes():
    results = gpu.run(quick=True, config_name="tiny", seq_len=16)
    assert [r["batch"] for r in results["forward"]] == [1, 8, 32]
    assert results["training"]["jax_tokens_per_s"] > 0
    assert "mfu" not in results["training"]  # no bf16 peak is known for a CPU
    line = report.markdown({"machine": MACHINE, "gpu": results}).splitlines()[-1]
    assert line.startswith("GPU (") and "tiny train 8x16 bf16" in line


def test_sustained_rate_averages_a_window_where_best_takes_the_fastest_call(monkeypatch):
    now = [0.0]
    durations = iter([0.1, 0.3] * 100)

    def call():
        now[0] += next(durations)

    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    assert timing.best_seconds(call, 4) == pytest.approx(0.1)
    # Windows of >= 1 s: six calls (1.2 s) each, 0.2 s per call.
    assert timing.sustained_seconds(call, 1.0, 2) == pytest.approx(0.2)


def test_steal_is_read_from_proc_stat_between_two_readings(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 0 20 60 0 0 0 20 5 0\ncpu0 50 0 10 30 0 0 0 10 0 0\n")
    start = machine.cpu_jiffies(str(stat))
    assert start == (20, 200)  # guest time is inside user time, not added again
    stat.write_text("cpu  250 0 40 80 0 0 0 50 9 0\n")
    end = machine.cpu_jiffies(str(stat))
    assert machine.steal_fraction(start, end) == pytest.approx(30 / 220)
    assert machine.cpu_jiffies(str(tmp_path / "missing")) is None
    assert machine.steal_fraction(None, end) is None
    assert machine.steal_fraction(end, end) is None


def test_cli_writes_json_only_where_asked(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(suite, "run", lambda *args: calls.append(args) or {"markdown": "TABLE"})
    monkeypatch.chdir(tmp_path)
    cli.main(["--quick", "--only", "training"])
    assert calls == [(True, ["training"], None)]
    assert capsys.readouterr().out == "TABLE\n"
    assert list(tmp_path.iterdir()) == []  # no file unless --json names one
    cli.main(["--json", "figures.json"])
    assert calls[-1] == (False, ["forward", "generation", "training"], None)
    assert json.loads((tmp_path / "figures.json").read_text()) == {"markdown": "TABLE"}


@pytest.mark.parametrize("absent", ["torch", "transformers"])
def test_cli_without_the_bench_extra_says_how_to_get_it(absent, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, absent, None)  # what an uninstalled package looks like
    with pytest.raises(SystemExit) as e:
        cli.main(["--quick"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (f'error: python -m bench needs {absent}: '
                                       f'pip install -e ".[bench]"\n')
