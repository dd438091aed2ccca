"""Markdown tables of a benchmark run, each figure beside its physical bound and its target."""

from __future__ import annotations

from typing import Any

from backpack_jax import flops
from backpack_jax.config import get_model_config
from bench import topic as bench_topic

# The glibc tunable that backs malloc with transparent huge pages (set in GLIBC_TUNABLES).
HUGE_PAGES = "glibc.malloc.hugetlb=1"


def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _mark(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**missed**")


def gemm_bound_gflops(machine: dict, run: dict | None = None) -> float:
    """The fp32 GEMM rate: the faster of XLA's (measured around `run`'s turns where it was) and
    PyTorch's (MKL on CPU)."""
    xla = (run or {}).get("gemm_gflops", machine["gemm_gflops"])
    return max(xla, machine.get("torch_gemm_gflops") or 0.0)


def forward_rows(results: dict, machine: dict) -> list[str]:
    config = get_model_config(results["config"])
    rows = []
    for r in results["runs"]:
        table = r.get("sense_table", False)
        gemm = gemm_bound_gflops(machine, r)
        bound = gemm * 1e9 / flops.forward_flops_per_token(config, r["seq_len"], table)
        frac = r["jax_tokens_per_s"] / bound
        ratio = r.get("speedup")
        ok = None if ratio is None else (ratio >= 1.0 and frac >= 0.9)
        rows.append(_row([f"forward B={r['batch']} S={r['seq_len']} fp32"
                          + (", sense table" if table else ""),
                          _f(r["jax_tokens_per_s"]), _f(r.get("ref_tokens_per_s")),
                          _f(ratio, 2) + ("x" if ratio else ""),
                          f"{_f(bound)} (at {gemm:.0f} GFLOP/s)",
                          f"{100 * frac:.0f}%", ">= ref, >= 90%", _mark(ok)]))
    return rows


def generation_rows(results: dict, machine: dict) -> list[str]:
    config = get_model_config(results["config"])
    rows = []
    for label, r in results["runs"].items():
        cache_len = r["prompt_len"] + r["new_tokens"] - 1
        step_bytes = flops.decode_bytes_per_token(config, cache_len, r.get("sense_table", False))
        read_gbps = r.get("read_gbps", machine["read_gbps"])  # measured between its runs
        bound = read_gbps * 1e9 / step_bytes  # decode steps/s
        decode_rate = 1e3 / r["jax"]["decode_step_ms"]
        frac = decode_rate / bound
        ratio = r.get("speedup")
        ok = None if ratio is None else (ratio >= 15 and frac >= 0.8)
        rows.append(_row([f"generate {r['new_tokens']} new, B=1, {label}",
                          _f(r["jax"]["tokens_per_s"]),
                          _f(r.get("reference", {}).get("tokens_per_s"), 2),
                          _f(ratio, 1) + ("x" if ratio else ""),
                          f"{_f(bound)} steps/s ({step_bytes / 1e6:,.0f} MB/step at "
                          f"{read_gbps:.1f} GB/s)",
                          f"{100 * frac:.0f}% (step {r['jax']['decode_step_ms']:.1f} ms)",
                          ">= 15x, >= 80%", _mark(ok)]))
    return rows


def demo_rows(results: dict, machine: dict) -> list[str]:
    """The demo's pane against the "cached" generation row of the same run (the issue's bar:
    stream as fast as cached decoding), with its step (median, each token synced to the host)
    against the bound of a decode step with the sense table."""
    config = get_model_config(results["config"])
    r, runs = results["demo_pane"], results["runs"]
    read_gbps = runs["cached + sense table"].get("read_gbps", machine["read_gbps"])
    step_bytes = flops.decode_bytes_per_token(config, r["cache_len"], True)
    rate = 1e3 / r["jax"]["stream_step_ms"]
    ratio = r["jax"]["tokens_per_s"] / runs["cached"]["jax"]["tokens_per_s"]
    return [_row([f"demo pane {r['new_tokens']} new, B=1, prompt {r['prompt_len']} padded to "
                  f"{r['padded_to']}, sense table (`Demo.stream`)", _f(r["jax"]["tokens_per_s"]),
                  "-", f"{ratio:.2f}x cached generate",
                  f"{_f(read_gbps * 1e9 / step_bytes)} steps/s ({step_bytes / 1e6:,.0f} MB/step)",
                  f"{100 * rate * step_bytes / (read_gbps * 1e9):.0f}% (step "
                  f"{r['jax']['stream_step_ms']:.1f} ms)", ">= cached generate",
                  _mark(ratio >= 1.0)])]


def batched_rows(results: dict, machine: dict) -> list[str]:
    """Batched sampling against the GEMM bound: a decode step's FLOPs per row are a forward
    pass's per-token count at the step's cache length (the mean over the run is used)."""
    config = get_model_config(results["config"])
    rows = []
    for r in results["batched"]:
        gemm = gemm_bound_gflops(machine, r)
        cache_len = r["prompt_len"] + r["new_tokens"] // 2
        bound = gemm * 1e9 / flops.forward_flops_per_token(config, cache_len)
        step_rate = r["batch"] * 1e3 / r["decode_step_ms"]
        frac = step_rate / bound
        rows.append(_row([f"sample {r['new_tokens']} new after {r['prompt_len']}, B={r['batch']},"
                          " T=1, cached", _f(r["tokens_per_s"]), "-", "-",
                          f"{_f(bound)} (at {gemm:.0f} GFLOP/s)",
                          f"{100 * frac:.0f}% (step {r['decode_step_ms']:.1f} ms)", ">= 70%",
                          _mark(frac >= 0.7)]))
    return rows


def topic_rows(results: dict, machine: dict) -> list[str]:
    """Scoring the vocabulary's sense vectors (bench/topic.py): bound by the GEMM rate, the
    target is 1.5x the bound's time at most."""
    config = get_model_config(results["config"])
    r = results["topic_scores"]
    gemm = gemm_bound_gflops(machine, r)
    bound = gemm * 1e9 / bench_topic.flops_per_token(config)
    frac = r["tokens_per_s"] / bound
    return [_row([f"topic scores V={r['vocab_size']} K={r['num_senses']} fp32 (sense max "
                  "logits)", _f(r["tokens_per_s"]), "-", "-", f"{_f(bound)} (at {gemm:.0f} "
                  "GFLOP/s)", f"{100 * frac:.0f}% (vocabulary {r['vocabulary_s']:.0f} s)",
                  ">= 67% (1.5x)", _mark(frac >= 1 / 1.5)])]


def huge_pages_on(glibc_tunables: str) -> bool:
    """Whether a GLIBC_TUNABLES value (colon-separated settings) turns huge pages on."""
    return HUGE_PAGES in glibc_tunables.split(":")


def training_rows(results: dict, machine: dict) -> list[str]:
    config = get_model_config(results["config"])
    r = results["run"]
    bound = gemm_bound_gflops(machine) * 1e9 / (3 * flops.forward_flops_per_token(config,
                                                                                r["seq_len"]))
    ratio = r.get("speedup")
    return [_row([f"train step {results['config']} {r['batch']}x{r['seq_len']} {r['dtype']}",
                  _f(r["jax_tokens_per_s"]), _f(r.get("ref_tokens_per_s")),
                  _f(ratio, 2) + ("x" if ratio else ""), _f(bound),
                  f"{100 * r['jax_tokens_per_s'] / bound:.0f}%", ">= 1.1x",
                  _mark(None if ratio is None else ratio >= 1.1)])]


def latency_table(results: dict) -> list[str]:
    lines = ["| generation, ms per token near position | " + " | ".join(
        k.rsplit("_", 1)[1] for k in next(iter(results["runs"].values()))["jax"]
        if k.startswith("latency_ms_at_")) + " |"]
    lines.append("|---" * (len(lines[0].split("|")) - 2) + "|")
    for label, r in results["runs"].items():
        for side in ("jax", "reference"):
            if side in r:
                vals = [_f(v) for k, v in r[side].items() if k.startswith("latency_ms_at_")]
                name = f"backpack-jax ({label})" if side == "jax" else "reference (full forward)"
                lines.append(_row([name] + vals))
    return lines


def markdown(results: dict) -> str:
    m = results["machine"]
    torch_gemm = m.get("torch_gemm_gflops")
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, jax platform `{m['platform']}`; "
             f"measured at the start and end of this run: fp32 GEMM {m['gemm_gflops']:.0f} "
             "GFLOP/s (XLA"
             + (f"; PyTorch/MKL {torch_gemm:.0f}" if torch_gemm else "")
             + f"), memory read {m['read_gbps']:.1f} GB/s sustained over 1 s (fastest single "
             f"read {m['read_burst_gbps']:.1f}). Bounds: the faster GEMM rate, and every weight "
             "read once per decode step at the sustained read rate, each measured again between "
             "the turns of its forward or generation row (the rate in the row; training uses "
             "the run's). glibc huge pages "
             + ("on" if huge_pages_on(results.get("glibc_tunables", "")) else "off")
             + " (both sides run in one process).", "",
             "| benchmark (tokens/s) | backpack-jax | reference | ratio | bound | of bound "
             "| target | |", "|---|---|---|---|---|---|---|---|"]
    if "forward" in results:
        lines += forward_rows(results["forward"], m)
        if "topic_scores" in results["forward"]:
            lines += topic_rows(results["forward"], m)
    if "generation" in results:
        lines += generation_rows(results["generation"], m)
        if "demo_pane" in results["generation"]:
            lines += demo_rows(results["generation"], m)
        if "batched" in results["generation"]:
            lines += batched_rows(results["generation"], m)
    if "training" in results:
        lines += training_rows(results["training"], m)
    if "generation" in results:
        lines += [""] + latency_table(results["generation"])
    compiles = []
    for r in results.get("forward", {}).get("runs", []):
        table = " (sense table)" if r.get("sense_table") else ""
        compiles.append(f"forward B={r['batch']}{table} {r['compile_s']:.1f} s")
    if scores := results.get("forward", {}).get("topic_scores"):
        compiles.append(f"topic scores first call {scores['compile_s']:.1f} s")
    for label, r in results.get("generation", {}).get("runs", {}).items():
        compiles.append(f"generation ({label}) first call {r['first_run_s']:.1f} s")
        if "table_build_s" in r:
            compiles.append(f"building the sense table ({r['table_gb']:.2f} GB) "
                            f"{r['table_build_s']:.1f} s")
    for r in results.get("generation", {}).get("batched", []):
        compiles.append(f"sampling B={r['batch']} first call {r['first_run_s']:.1f} s")
    if "training" in results:
        compiles.append(f"train step {results['training']['run']['compile_s']:.1f} s")
    if compiles:
        lines += ["", "Compile / first-call times (not in the rates above): "
                  + "; ".join(compiles) + "."]
    if "forward" in results:
        diffs = [f"B={r['batch']}{' (sense table)' if r.get('sense_table') else ''}: "
                 f"{r['max_rel_diff']:.1e}" for r in results["forward"]["runs"]
                 if "max_rel_diff" in r]
        if diffs:
            lines.append("Forward logits vs reference, max |diff| / max |logit|: "
                         + ", ".join(diffs) + ".")
    steal = {part: f for part, f in results.get("steal", {}).items() if f is not None}
    if steal:
        lines.append("CPU time the hypervisor took (steal, /proc/stat), which slows every figure "
                     "and no timer sees: " + ", ".join(f"{part} {100 * f:.0f}%"
                                                      for part, f in steal.items()) + ".")
    if "gpu" in results:
        g = results["gpu"]
        t = g["training"]
        lines += ["", f"GPU ({g['device']}): {t['config']} train {t['batch']}x{t['seq_len']} bf16: "
                  f"{_f(t['jax_tokens_per_s'], 0)} tokens/s, MFU "
                  f"{_f(100 * t['mfu'] if t.get('mfu') else None)}%, peak memory "
                  f"{_f(t.get('peak_memory_gib'))} GiB; forward "
                  + ", ".join(f"B={r['batch']} {_f(r['jax_tokens_per_s'], 0)}"
                              for r in g["forward"])
                  + f" tokens/s; generation {_f(g['generation']['jax']['tokens_per_s'])} "
                  f"tokens/s."]
    return "\n".join(lines)
