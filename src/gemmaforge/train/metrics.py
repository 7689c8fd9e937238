"""metrics.jsonl (+ TensorBoard when installed): one JSON record per logged step, process 0 only."""

from __future__ import annotations

import json
from pathlib import Path

from .. import atomic


class MetricsLog:
    """metrics.jsonl (+ TensorBoard when installed), written by process 0 only."""

    def __init__(self, out: Path, resume_step: int | None, enabled: bool, tensorboard: bool):
        self.path, self.enabled, self.tb = out / "metrics.jsonl", enabled, None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():  # drop what the killed run logged after its checkpoint
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            atomic.write_bytes(self.path, "".join(line + "\n" for line in kept).encode())
        elif resume_step is None:
            self.path.unlink(missing_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step)
            except ImportError:
                print("gemmaforge: tensorboard is not installed; metrics go to metrics.jsonl only")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "split") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record['split']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_metrics(run_dir: Path, keys: list[str], path: Path) -> Path | None:
    """One panel per key of the train records (val points on top where they have it), as a PNG;
    None when matplotlib is not installed (it is in the ``train`` extra)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for split, style in (("train", "-"), ("val", "o")):
            pts = [(r["step"], r[key]) for r in records if r["split"] == split and key in r]
            if pts:
                ax.plot(*zip(*pts), style, label=split, markersize=4)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
