"""End-to-end jobs behind the CLI, usable from Python too: built-in model + data + recorder."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import ConfigError, expected
from .record import RecordConfig, Recorder, every_epoch, parse_schedule
from .train import TrainConfig, fit, make_optimizer
from .zoo import build_model, load_dataset


@dataclass
class RecordJob:
    """A built-in training run with recording (what ``bstab record`` runs)."""

    model: str = "cnn"
    dataset: str = "digits"
    train: TrainConfig = field(default_factory=TrainConfig)
    record: RecordConfig = field(default_factory=RecordConfig)
    schedule: str = "epoch"
    device: str = "cpu"


@dataclass
class RecordResult:
    path: Path
    history: list[dict[str, float]]
    n_snapshots: int
    n_layers: int


def default_run_path(stem: str, folder: str | Path = "runs") -> Path:
    """``runs/{stem}.h5``, or ``{stem}-2.h5``, ``-3``, ... so no existing run is overwritten."""
    folder = Path(folder)
    path = folder / f"{stem}.h5"
    i = 2
    while path.exists():
        path = folder / f"{stem}-{i}.h5"
        i += 1
    return path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            expected(
                "device",
                "an available device",
                name,
                "No CUDA GPU is visible here; use --device cpu.",
            )
        )
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(
            expected("device", "cpu, cuda, cuda:N or auto", name, "Use --device cpu.")
        ) from None


def build(job: RecordJob) -> tuple[torch.nn.Module, object]:
    """The job's dataset and freshly initialised model."""
    data = load_dataset(job.dataset, seed=job.train.seed)
    torch.manual_seed(job.train.seed)
    model = build_model(job.model, data.input_shape, data.num_classes, seed=job.train.seed)
    return model.to(resolve_device(job.device)), data


def run_record_job(
    job: RecordJob, path: str | Path, mode: str = "create", progress: bool = True
) -> RecordResult:
    """Train a built-in model and record it into ``path``."""
    model, data = build(job)
    steps_per_epoch = math.ceil(len(data.x_train) / job.train.batch_size)
    schedule = parse_schedule(job.schedule, steps_per_epoch, steps_per_epoch * job.train.epochs)
    meta = {
        **job.record.metadata,
        "job": {
            "model": job.model,
            "dataset": job.dataset,
            "schedule": job.schedule,
            "device": job.device,
            "steps_per_epoch": steps_per_epoch,
            "train": asdict(job.train),
        },
    }
    record_cfg = RecordConfig(**{**asdict(job.record), "metadata": meta})
    optimizer = make_optimizer(model, job.train)
    with Recorder(model, path, record_cfg, mode=mode) as rec:
        by_epoch = isinstance(schedule, every_epoch)
        if by_epoch:

            def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
                rec.snapshot(epoch=epoch, step=epoch * steps_per_epoch, metrics=metrics)

            on_loss = None
        else:
            rec.attach(optimizer, schedule, steps_per_epoch=steps_per_epoch)
            on_epoch_end = None

            def on_loss(loss: float) -> None:
                rec.log(batch_loss=loss)

        history = fit(
            model,
            data,
            job.train,
            optimizer=optimizer,
            on_epoch_end=on_epoch_end,
            on_loss=on_loss,
            progress=progress,
        )
        return RecordResult(Path(path), history, rec.n_snapshots, len(rec.views))
