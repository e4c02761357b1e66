"""Where the twin's ingest cycles run (``cycle_thread``): every mode processes the same stream to the
same result, acknowledges all of it, and ``auto`` moves the cycles to the ingest thread for large
batches and back to paho's network thread for small messages."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from forgeline.contract.topics import DeviceRef
from forgeline.mqtt import MqttSettings
from tests.twin_support import Publisher, batch, birth, twin_config
from twin.config import ConfigError, TwinConfig
from twin.service import OFFLOAD_ABOVE_SAMPLES, TwinService

DEVICES = 4
LARGE_TICKS = 300  # 3 channels x 300 ticks = 900 samples per message
LARGE_SEQS = 25
SMALL_SEQS = 150  # one tick: 3 samples per message


def _publish_fast(publisher: Publisher, messages: list[tuple[str, bytes]]) -> None:
    """QoS 1 without waiting for each PUBACK (the twin sees a stream, not one message at a time)."""
    last = None
    for topic, payload in messages:
        last = publisher.client.publish(topic, payload, qos=1)
    assert last is not None
    last.wait_for_publish(30)


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("cycle_thread", ["network", "ingest", "auto"])
def test_every_cycle_thread_mode_ingests_the_same_stream(mqtt_settings: MqttSettings, tenant: str,
                                                          cycle_thread: str) -> None:
    config = twin_config(mqtt_settings, tenant, cycle_thread=cycle_thread, session_expiry_s=30)
    refs = [DeviceRef(tenant, "s", "a", f"d{i}") for i in range(DEVICES)]
    publisher = Publisher(mqtt_settings)
    service = TwinService(config).start()
    try:
        for ref in refs:
            publisher.birth(ref, birth())
        _wait(lambda: len(service.ingestor.registry) == DEVICES, "the births")
        counters = service.ingestor.counters
        large = [(ref.telemetry_topic, batch(seq, n_ticks=LARGE_TICKS)) for seq in range(LARGE_SEQS) for ref in refs]
        # one duplicate per device and one undecodable message in the middle of the stream
        large[60:60] = [(ref.telemetry_topic, batch(3, n_ticks=LARGE_TICKS)) for ref in refs]
        large.insert(70, (refs[0].telemetry_topic, b"junk"))
        _publish_fast(publisher, large)
        large_samples = DEVICES * LARGE_SEQS * LARGE_TICKS * 3
        _wait(lambda: counters.samples_accepted == large_samples and counters.batches_duplicate == DEVICES
              and sum(counters.dead_letters.values()) == 1, "the large batches")
        offloaded_after_large = service.offloaded
        # the same devices continue with single-tick batches (3 samples per message)
        small = [(ref.telemetry_topic, batch(LARGE_SEQS * LARGE_TICKS + k, n_ticks=1))
                 for k in range(SMALL_SEQS) for ref in refs]
        _publish_fast(publisher, small)
        _wait(lambda: counters.samples_accepted == large_samples + DEVICES * SMALL_SEQS * 3, "the small batches")
        assert service.wait_idle()
        assert counters.batches_duplicate == DEVICES and counters.dead_letters == {"TelemetryError": 1}
        assert counters.samples_rejected == {}
        runtime = service.ingestor.runtime
        assert sorted(r.samples for r in runtime.values()) == [LARGE_SEQS * LARGE_TICKS * 3 + SMALL_SEQS * 3] * 4
        if cycle_thread == "ingest":
            assert offloaded_after_large and service.offloaded
        elif cycle_thread == "network":
            assert not offloaded_after_large and not service.offloaded
        else:
            assert offloaded_after_large, "auto: 900-sample messages should run in the ingest thread"
            assert not service.offloaded, "auto: 3-sample messages should run in the network thread"
    finally:
        service.stop()
    # Everything was acknowledged: the persistent session redelivers nothing to the next twin.
    again = TwinService(config).start()
    try:
        time.sleep(0.5)
        assert again.wait_idle()
        assert again.ingestor.counters.telemetry_messages == 0
    finally:
        again.stop()
        publisher.close()


def test_cycle_thread_is_validated() -> None:
    assert TwinConfig.from_dict({"cycle_thread": "ingest"}).cycle_thread == "ingest"
    assert TwinConfig().cycle_thread == "auto"
    with pytest.raises(ConfigError, match="cycle_thread must be 'auto', 'network' or 'ingest', got 'gpu'"):
        TwinConfig.from_dict({"cycle_thread": "gpu"})
    assert OFFLOAD_ABOVE_SAMPLES > 3 * 1 and OFFLOAD_ABOVE_SAMPLES < 3 * LARGE_TICKS  # the test's two sides
