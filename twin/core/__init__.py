"""The twin's numeric core: utilization/OEE, chamber fill and anomaly scores for a whole fleet.

A library that knows nothing of MQTT: arrays in, KPIs and events out. State is a few numpy
arrays (see :mod:`twin.core.layout`); one numba call processes a batch (:mod:`twin.core.kernels`);
:mod:`twin.core.reference` is the slow, obviously-correct twin every kernel is tested against.

Anomaly detectors share one contract (see :mod:`twin.core.detectors`): ``learn_one``/``score_one``,
a score in [0, 1] where higher means more anomalous, and a documented warm-up during which the
score is 0.
"""

from twin.core.config import CoreConfig, WindowSpec
from twin.core.fill import BuildError, BuildRecord
from twin.core.fleet import AnomalyEvent, CoreError, FleetCore, IngestStats

__all__ = [
    "AnomalyEvent",
    "BuildError",
    "BuildRecord",
    "CoreConfig",
    "CoreError",
    "FleetCore",
    "IngestStats",
    "WindowSpec",
]
