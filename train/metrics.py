"""Throughput and model-FLOPs utilisation, the metrics.jsonl log and the loss-curve plot."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from backpack_jax.config import BackpackConfig

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


def sense_network_macs_per_token(config: BackpackConfig) -> int:
    """Multiply-adds of the sense network for one token (what a sense table saves)."""
    d, scale = config.n_embd, config.sense_intermediate_scale
    return 2 * d * 4 * d + d * scale * d + scale * d * config.num_senses * d


def train_flops_per_token(config: BackpackConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3 x forward), no remat.

    Matrix multiplies only: 2 FLOPs per multiply-add. Per token the forward pass multiplies by
    every linear weight once (GPT-2 blocks, sense network, weight network, tied LM head); causal
    attention is counted at full length, as is usual for MFU. About 1.11 GFLOP for
    Backpack-Small at 512 tokens (/work/shared/BACKPACK.md section 4).
    """
    d, k = config.n_embd, config.num_senses
    block = d * 3 * d + d * d + 2 * d * config.inner_dim
    linear = (config.n_layer * block + sense_network_macs_per_token(config) + d * 2 * d
              + config.vocab_size * d)
    attention = config.n_layer * 2 * seq_len * d  # q.k and probs.v
    backpack = seq_len * d + k * seq_len * d  # weight-network scores, alpha @ senses
    return 3 * 2 * (linear + attention + backpack)


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
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


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
        ax.plot(*zip(*train), label="train loss")
    if heldout:
        ax.plot(*zip(*heldout), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    path = pathlib.Path(workdir) / CURVE_FILE
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
