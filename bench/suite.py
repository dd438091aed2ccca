"""The benchmark run: the machine's rates, then each part, then the machine again."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys

import jax
from tqdm import tqdm

from backpack_jax import sense_table
from backpack_jax.config import get_model_config
from bench import forward, generation, gpu, machine, reference, report, timing, topic, training

MODEL = "gpt2_small"  # the forward and generation parts: Backpack-Small, as released
TRAINING = "gpt2_micro"  # small enough for a CPU training step
BATCHES = (8, 32)  # batched sampling: 32 new tokens after a 16-token prompt
BATCHED_PROMPT, BATCHED_NEW = 16, 32


@functools.cache
def _model():
    """The model's config, PyTorch reference and identical params, and the sense table with its
    build time: made once for the forward and generation parts."""
    config = get_model_config(MODEL)
    ref, params = reference.reference_and_params(config)
    build_s, table = timing.seconds(lambda: sense_table.build(params, config))
    return config, ref, params, table, build_s


def cpu_part(name: str, quick: bool, new_tokens: int | None = None) -> dict:
    """One CPU comparison against the PyTorch reference (same weights, same cores)."""
    if name == "training":
        _model.cache_clear()  # frees the model, reference and sense table (GBs) first
        return {"config": TRAINING,
                "run": training.run(TRAINING, 4, 512, repeats=2 if quick else 4)}
    config, ref, params, table, build_s = _model()
    repeats = 1 if quick else 4
    if name == "forward":
        probe = functools.partial(machine.gemm_gflops, repeats=5)
        runs = [forward.run(config, ref, params, b, 512, repeats, gemm_probe=probe)
                for b in (1, 8)]
        runs.append(forward.run(config, ref, params, 1, 512, repeats, table=table,
                                gemm_probe=probe))
        scores = topic.run(config, params, 512 if quick else 2048, repeats, gemm_probe=probe)
        return {"config": MODEL, "runs": runs, "topic_scores": scores}
    new = new_tokens or (64 if quick else 256)
    probe = machine.sustained_read_gbps
    runs = {"cached": generation.run(config, ref, params, 32, new, read_probe=probe)}
    with_table = generation.run(config, ref, params, 32, new, with_reference=False,
                                read_probe=probe, sense_edit=table)
    with_table.update(sense_table=True, table_build_s=build_s,
                      table_gb=sense_table.nbytes(config) / 1e9)
    ref_rate = runs["cached"].get("reference", {}).get("tokens_per_s")
    if ref_rate:
        with_table["speedup"] = with_table["jax"]["tokens_per_s"] / ref_rate
    runs["cached + sense table"] = with_table
    pane = generation.demo_pane(config, params, table, 32, repeats=2 if quick else 4)
    gemm = functools.partial(machine.gemm_gflops, repeats=5)
    batched = [generation.batched(config, params, b, BATCHED_PROMPT, BATCHED_NEW,
                                  repeats=2 if quick else 4, gemm_probe=gemm)
               for b in BATCHES]
    return {"config": MODEL, "runs": runs, "demo_pane": pane, "batched": batched}


def run(quick: bool, parts: list[str], new_tokens: int | None = None) -> dict:
    """Every figure of one benchmark run (`parts` of `cpu_part`; on a GPU its own section
    instead), the Markdown table under "markdown"."""
    cores = reference.pin_torch_threads()
    on_gpu = jax.devices()[0].platform == "gpu"
    results: dict = {"quick": quick, "argv": sys.argv[1:], "torch_threads": cores,
                     "xla_flags": os.environ.get("XLA_FLAGS", ""),
                     "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
    run_start = machine.cpu_jiffies()
    first = machine.measure(quick=quick)
    steal = results["steal"] = {}
    # The torch reference is CPU-only: with a GPU the accelerator section replaces the rest.
    parts = ["gpu"] if on_gpu else parts
    for part in tqdm(parts, desc="bench", unit="part", file=sys.stderr):
        part_start = machine.cpu_jiffies()
        results[part] = gpu.run(quick) if part == "gpu" else cpu_part(part, quick, new_tokens)
        steal[part] = machine.steal_fraction(part_start, machine.cpu_jiffies())
    # Measured again at the end; interference only lowers a rate, so the bounds use the best.
    last = machine.measure(quick=quick)
    results["machine"] = dataclasses.asdict(machine.best_of(first, last))
    steal["run"] = machine.steal_fraction(run_start, machine.cpu_jiffies())
    results["markdown"] = report.markdown(results)
    return results
