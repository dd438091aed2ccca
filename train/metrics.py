"""Devices' peak FLOP/s for model-FLOPs utilisation, the metrics.jsonl log, the loss-curve plot.

The FLOP counts per token are `backpack_jax.flops`. A write that fails (a full disk) leaves each
file as it was: metrics.jsonl loses no earlier line and gains no partial one, and whole-file
writes go through `backpack_jax.atomic.atomic_path`.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from backpack_jax.atomic import atomic_path

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss_curve.png"

# Dense bfloat16 peak FLOP/s per device, by the start of `jax.Device.device_kind`.
PEAK_FLOPS_BY_DEVICE_KIND: tuple[tuple[str, float], ...] = (
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100", 989e12),
    ("NVIDIA A100", 312e12),
    ("NVIDIA A10G", 125e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA RTX A6000", 155e12),
    ("Tesla V100", 125e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
)


def peak_flops_per_device(device_kind: str, override: float | None = None) -> float | None:
    """The device's peak FLOP/s: `override` if given, else the table; None if unknown (CPU)."""
    if override is not None:
        return override
    for prefix, flops in PEAK_FLOPS_BY_DEVICE_KIND:
        if device_kind.startswith(prefix):
            return flops
    return None


class MetricsLog:
    """Appends one JSON object per logged step to WORKDIR/metrics.jsonl (primary process only)."""

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True) -> None:
        self.path = pathlib.Path(workdir) / METRICS_FILE
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drops records past `step`: a resumed run rewrites what the killed run logged later."""
        if not (self.enabled and self.path.exists()):
            return
        keep = [line for line in self.path.read_text().splitlines()
                if _parses(line) and json.loads(line)["step"] <= step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        """Appends `record` as one line; if that fails, the file is cut back to its earlier end,
        so that no partial line runs into the next record."""
        if not self.enabled:
            return
        line = (json.dumps(record) + "\n").encode()
        with self.path.open("ab", buffering=0) as f:  # Unbuffered: nothing left to flush later.
            end = f.seek(0, os.SEEK_END)
            try:
                written = 0
                while written < len(line):  # A disk filling up may take part of it first.
                    written += f.write(line[written:])
            except OSError:
                f.truncate(end)
                raise


def _parses(line: str) -> bool:
    """False for blank lines and for a last line cut short by a killed process."""
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    path = pathlib.Path(workdir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if _parses(line)]


def plot_loss_curve(workdir: str | os.PathLike) -> pathlib.Path:
    """Train and held-out loss against step, from metrics.jsonl, as WORKDIR/loss_curve.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    heldout = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if heldout:
        ax.plot(*zip(*heldout, strict=True), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    path = pathlib.Path(workdir) / CURVE_FILE
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
