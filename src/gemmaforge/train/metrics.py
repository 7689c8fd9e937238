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
