"""Experiment trackers beside OUT/log.jsonl (train.py --log-to wandb,swanlab,tensorboard): the run's
flags as its config; per logged step loss, lr, tokens/s, MFU; every evaluation's metrics; and the loss
picture (OUT/loss.png, as `loss_plot`) after each evaluation.

Off by default and never needed: each tracker's package is imported only when asked for, and a
missing one is one line (TrackerError). Only rank 0 tracks. Each writes under the run directory:

    OUT/tensorboard/   event files (`tensorboard --logdir OUT/tensorboard`); a --resume purges the
                       steps past its checkpoint, as log.jsonl does
    OUT/wandb/         wandb's run (online, or offline with WANDB_MODE=offline, then `wandb sync`);
                       OUT/wandb/run-id keeps a resumed run on the same wandb run; project
                       $WANDB_PROJECT, default minimind
    OUT/swanlog/       swanlab's run (mode from $SWANLAB_MODE: cloud, local, offline, disabled);
                       project $SWANLAB_PROJECT, default minimind
"""
import json
import os
import secrets
from pathlib import Path
from typing import Optional, Sequence

TRACKERS = ("wandb", "swanlab", "tensorboard")
PACKAGES = {"wandb": "wandb", "swanlab": "swanlab", "tensorboard": "tensorboard"}


class TrackerError(ValueError):
    """A tracker that cannot start: its package missing, or an unknown name."""


def parse_trackers(text: str) -> list:
    """'wandb,tensorboard' -> ['wandb', 'tensorboard']; an unknown name is a TrackerError."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise TrackerError(f"unknown tracker(s) {', '.join(unknown)} (choose from {', '.join(TRACKERS)})")
    return list(dict.fromkeys(names))


def _missing(name: str) -> TrackerError:
    return TrackerError(f"--log-to {name}: the {PACKAGES[name]} package is not installed "
                        f"(pip install {PACKAGES[name]}, or leave {name} out)")


def _run_id(folder: Path) -> str:
    """The tracker's id of this run: made once, kept in folder/run-id so a --resume continues it."""
    path = folder / "run-id"
    if path.exists():
        return path.read_text().strip()
    folder.mkdir(parents=True, exist_ok=True)
    run_id = secrets.token_hex(4)
    path.write_text(run_id + "\n")
    return run_id


def _image_key(path: Path) -> str:
    return f"{path.stem}_plot"  # loss.png -> loss_plot: apart from the scalar "loss"


class _TensorBoard:
    def __init__(self, out: Path, config: dict, resume_step: Optional[int]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"),
                                    purge_step=resume_step + 1 if resume_step is not None else None)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, step: int, record: dict):
        for key, value in record.items():
            self.writer.add_scalar(key, value, step)

    def image(self, step: int, path: Path):
        import matplotlib.image
        self.writer.add_image(_image_key(path), matplotlib.image.imread(str(path))[..., :3], step, dataformats="HWC")

    def close(self):
        self.writer.close()


class _Wandb:
    def __init__(self, out: Path, config: dict, resume_step: Optional[int]):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb") from None
        self.wandb = wandb
        folder = out / "wandb"
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "minimind"), name=out.name, config=config,
                              dir=str(out), id=_run_id(folder), resume="allow")

    def log(self, step: int, record: dict):
        self.run.log(record, step=step)

    def image(self, step: int, path: Path):
        self.run.log({_image_key(path): self.wandb.Image(str(path))}, step=step)

    def close(self):
        self.run.finish()


class _SwanLab:
    def __init__(self, out: Path, config: dict, resume_step: Optional[int]):
        try:
            import swanlab
        except ImportError:
            raise _missing("swanlab") from None
        self.swanlab = swanlab
        self.run = swanlab.init(project=os.environ.get("SWANLAB_PROJECT", "minimind"), name=out.name, config=config,
                                log_dir=str(out / "swanlog"), mode=os.environ.get("SWANLAB_MODE"))

    def log(self, step: int, record: dict):
        self.swanlab.log(record, step=step)

    def image(self, step: int, path: Path):
        self.swanlab.log({_image_key(path): self.swanlab.Image(str(path))}, step=step)

    def close(self):
        self.swanlab.finish()


BACKENDS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "swanlab": _SwanLab}


class Trackers:
    """The trackers of a run, each fed the same records; none: every call does nothing."""

    def __init__(self, names: Sequence[str], out: Path, config: dict, resume_step: Optional[int] = None):
        self.backends = []
        for name in names:
            self.backends.append(BACKENDS[name](Path(out), config, resume_step))

    def log(self, step: int, record: dict):
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        for backend in self.backends:
            backend.log(step, numbers)

    def image(self, step: int, path: Optional[Path]):
        if path is not None and Path(path).exists():  # (None: plot_log without matplotlib)
            for backend in self.backends:
                backend.image(step, Path(path))

    def close(self):
        for backend in self.backends:
            backend.close()
