"""What the OctoPrint and Moonraker adapters share: the device description from config and the job
tracker that turns observed printer states into job events and cumulative counters."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.device import DeviceInfo
from forgeline.contract.topics import TopicError, check_ident
from forgeline.contract.vocabulary import DeviceState, Technology

PRINTER_CHANNELS = ("state", "layer_progress", "layer", "nozzle_temp", "bed_temp", "chamber_temp",
                    "produced_total", "good_total", "scrap_total")
ACTIVE = (DeviceState.HEATING, DeviceState.PRINTING, DeviceState.PAUSED)


def printer_info(section: Any, default_vendor: str) -> DeviceInfo:
    """The DeviceInfo of a networked printer from its config section (tenant/site/area/device and more)."""
    ref = section.device_ref()
    technology = section.text("technology", "FDM", choices=[t.value for t in Technology if t is not Technology.LINE])
    # The process profile the printer runs (the loop's product model of its jobs) and its version.
    profile, version = section.text("product_model", None), section.text("product_revision", None)
    if (profile is None) != (version is None):
        raise section.error("product_revision" if version is None else "product_model",
                            "give product_model (the process profile) and product_revision (its version) together")
    for key, value in (("product_model", profile), ("product_revision", version)):
        if value is not None:
            try:
                check_ident(value, key)
            except TopicError as exc:
                raise section.error(key, str(exc)) from None
    return DeviceInfo(
        ref, technology, PRINTER_CHANNELS, vendor=section.text("vendor", default_vendor),
        model=section.text("model", None), materials=section.strings("materials", ()),
        product_model=profile, product_revision=version,
        build_volume_mm=section.vec3("build_volume_mm", None), cost_per_hour=section.number("cost_per_hour", None,
                                                                                            minimum=0),
        rate_hz=1.0 / section.number("poll_s", 2.0, positive=True, maximum=3600),
        labels=section.mapping_of_str("labels"),
    )


def job_tags(info: DeviceInfo) -> dict[str, str]:
    """What every job event of a printer carries: the material when exactly one is loaded, and the process
    profile (``product_model``) with its version (``product_revision``) when configured."""
    tags = {"material": info.materials[0]} if len(info.materials) == 1 else {}
    if info.product_model and info.product_revision:
        tags.update(product_model=info.product_model, product_revision=info.product_revision)
    return tags


def read_secret(section: Any, key: str, base_dir: Path) -> str | None:
    """``key`` or ``key_file`` (a file next to the config), not both."""
    value = section.text(key, None)
    file = section.text(f"{key}_file", None)
    if value is not None and file is not None:
        raise section.error(f"{key}_file", f"give {key} or {key}_file, not both")
    if file is not None:
        try:
            return str((base_dir / file).read_text(encoding="utf-8").strip())
        except OSError as exc:
            raise section.error(f"{key}_file", f"cannot read {base_dir / file}: {exc.strerror}") from None
    return value


@dataclass
class _TrackedJob:
    job_id: str
    file: str
    parts: list[dict[str, Any]]
    tags: dict[str, str]
    progress: float = 0.0


class JobTracker:
    """Job lifecycle from polled or pushed printer status.

    >>> tracker = JobTracker("p1")
    >>> [e["type"] for e in tracker.observe(DeviceState.PRINTING, "benchy.gcode", 0.1, None, 1.0)]
    ['job_started']
    >>> [e["type"] for e in tracker.observe(DeviceState.IDLE, "benchy.gcode", 1.0, "complete", 2.0)]
    ['job_finished']
    >>> tracker.produced, tracker.good, tracker.scrap
    (1, 1, 0)
    """

    def __init__(self, device: str, tags: Mapping[str, str] | None = None) -> None:
        self.device = device
        self.tags = dict(tags or {})  # see job_tags: added to every job event
        self.job: _TrackedJob | None = None
        self.dispatched: dict[str, tuple[str, list[dict[str, Any]]]] = {}  # file -> (job_id, parts)
        self.produced = self.good = self.scrap = 0
        self.jobs = 0

    def expect(self, file: str, job_id: str, parts: list[dict[str, Any]]) -> None:
        """A job dispatched by command: when ``file`` starts printing, its events carry this id and parts."""
        self.dispatched[file] = (job_id, parts)

    def observe(self, state: DeviceState, file: str | None, progress: float | None, outcome: str | None,
                now: float | None = None, volume_cm3: float | None = None) -> list[dict[str, Any]]:
        """Events implied by the printer now being in ``state`` printing ``file`` (``outcome``: complete,
        cancelled, error or None while unknown)."""
        ts = round(time.time() if now is None else now, 6)
        events: list[dict[str, Any]] = []
        job = self.job
        if job is not None and progress is not None:
            job.progress = max(job.progress, progress)
        if job is not None and (state not in ACTIVE or (file and file != job.file) or outcome is not None):
            events.append(self._end(job, outcome, ts))
            self.job = job = None
        if job is None and state in ACTIVE and file:
            self.jobs += 1
            job_id, parts = self.dispatched.pop(file, (f"{self.device}-{self.jobs}-{Path(file).stem}"[:128], []))
            if not parts and volume_cm3 and volume_cm3 > 0:
                parts = [{"part_id": Path(file).stem or file, "volume_cm3": round(volume_cm3, 3), "quantity": 1}]
            self.job = _TrackedJob(job_id, file, parts, dict(self.tags), progress or 0.0)
            started: dict[str, Any] = {"type": "job_started", "ts": ts, "job_id": job_id, "file": file, **self.tags}
            if parts:
                started["parts"] = parts
            events.append(started)
        return events

    def _end(self, job: _TrackedJob, outcome: str | None, ts: float) -> dict[str, Any]:
        count = max(1, sum(int(p.get("quantity", 1)) for p in job.parts))
        self.produced += count
        if outcome == "complete" or (outcome is None and job.progress >= 0.999):
            self.good += count
            return {"type": "job_finished", "ts": ts, "job_id": job.job_id, **job.tags, "parts_good": count,
                    "parts_scrap": 0}
        self.scrap += count
        return {"type": "job_aborted", "ts": ts, "job_id": job.job_id, **job.tags,
                "message": f"ended {outcome or 'early'} at {job.progress:.0%}"}

    def counters(self) -> Mapping[str, float]:
        return {"produced_total": self.produced, "good_total": self.good, "scrap_total": self.scrap}
