"""python -m bench [--quick] [--json PATH] [--only forward|generation|training ...]

Prints a Markdown table (see BENCHMARKS.md) and writes every figure to a JSON file.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys

PARTS = ("forward", "generation", "training")


@functools.cache
def _backpack_gpt2():
    """backpack-gpt2's config, PyTorch reference and identical params, and the sense table
    with its build time: made once for the forward and generation parts."""
    from backpack_jax import sense_table
    from backpack_jax.config import get_config
    from bench import reference, timing

    config = get_config("backpack_gpt2")
    ref, params = reference.reference_and_params(config)
    build_s, table = timing.seconds(lambda: sense_table.build(params, config))
    return config, ref, params, table, build_s


def cpu_part(name: str, quick: bool, new_tokens: int | None = None) -> dict:
    """One CPU comparison against the PyTorch reference (same weights, same cores)."""
    from backpack_jax import sense_table
    from bench import forward, generation, machine, training

    if name == "training":
        _backpack_gpt2.cache_clear()  # frees ~4 GB before the training comparison
        return {"config": "gpt2_micro", "preset": "micro",
                "run": training.run("gpt2_micro", 4, 512, repeats=2 if quick else 4)}
    config, ref, params, table, build_s = _backpack_gpt2()
    repeats = 1 if quick else 4
    if name == "forward":
        probe = functools.partial(machine.gemm_gflops, repeats=5)
        runs = [forward.run(config, ref, params, b, 512, repeats, gemm_probe=probe)
                for b in (1, 8)]
        runs.append(forward.run(config, ref, params, 1, 512, repeats, table=table,
                                gemm_probe=probe))
        return {"config": "backpack_gpt2", "runs": runs}
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
    return {"config": "backpack_gpt2", "runs": runs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[2])
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats, 64 instead of 256 new tokens (a smoke run)")
    parser.add_argument("--json", default="bench_results.json", help="where to write results")
    parser.add_argument("--only", action="append", choices=PARTS,
                        help="run only these parts (repeatable); default all")
    parser.add_argument("--new_tokens", type=int, default=None,
                        help="tokens to generate after the 32-token prompt (default 256; 64 quick)")
    args = parser.parse_args(argv)

    import jax  # after argparse so that --help is instant
    from tqdm import tqdm

    from bench import machine, reference, report

    cores = reference.pin_torch_threads()
    on_gpu = jax.devices()[0].platform == "gpu"
    results: dict = {"quick": args.quick, "argv": sys.argv[1:], "torch_threads": cores,
                     "xla_flags": os.environ.get("XLA_FLAGS", ""),
                     "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
    run_start = machine.cpu_jiffies()
    first = machine.measure(quick=args.quick)
    steal = results["steal"] = {}
    # The torch reference is CPU-only: with a GPU the accelerator section replaces the rest.
    parts = ["gpu"] if on_gpu else [p for p in PARTS if not args.only or p in args.only]
    for part in tqdm(parts, desc="bench", unit="part", file=sys.stderr):
        part_start = machine.cpu_jiffies()
        if part == "gpu":
            from bench import gpu
            results["gpu"] = gpu.run(args.quick)
        else:
            results[part] = cpu_part(part, args.quick, args.new_tokens)
        steal[part] = machine.steal_fraction(part_start, machine.cpu_jiffies())
    # Measured again at the end; interference only lowers a rate, so the bounds use the best.
    last = machine.measure(quick=args.quick)
    results["machine"] = dataclasses.asdict(machine.best_of(first, last))
    steal["run"] = machine.steal_fraction(run_start, machine.cpu_jiffies())
    table = report.markdown(results)
    results["markdown"] = table
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(table)
    print(f"\n(all figures: {args.json})")


if __name__ == "__main__":
    from backpack_jax import huge_pages

    huge_pages.reexec_with_huge_pages()  # before jax is loaded; see backpack_jax/huge_pages.py
    main()
