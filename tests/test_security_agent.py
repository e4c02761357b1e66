"""The real edge agent behind the production broker: with its tenant's credentials its devices'
telemetry and birth messages reach the twin; a device of another tenant configured on the same
agent (a mistake or a compromised gateway) is refused by the broker, reaches no one, and the agent
counts the refusals instead of losing them silently."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from security_support import probe

from edge_agent.agent import start_simulated_fleet, wait_connected
from edge_agent.sources.simulator import FleetSpec, PrinterSpec
from forgeline.broker import find_mosquitto
from forgeline.broker.secure import SecureBroker, start_secure_mosquitto
from forgeline.contract import topics
from forgeline.contract.topics import DeviceRef

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="needs the mosquitto binary")

SUFFIX = uuid.uuid4().hex[:6]
OWN, OTHER = f"own{SUFFIX}", f"other{SUFFIX}"


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    broker = start_secure_mosquitto(tmp_path_factory.mktemp("agent-broker"), [OWN, OTHER, "_twin", "_ops"])
    yield broker
    broker.stop()


def test_agent_publishes_only_its_own_tenant(secure: SecureBroker) -> None:
    fleet = FleetSpec(tenant=OWN, site="plant", area="hall1", printers=(
        PrinterSpec("fdm-01", "FDM"),
        PrinterSpec("fdm-99", "FDM", tenant=OTHER),  # configured on the wrong agent
    ))
    own, other = DeviceRef(OWN, "plant", "hall1", "fdm-01"), DeviceRef(OTHER, "plant", "hall1", "fdm-99")
    ops = probe(secure.settings("_ops"))
    twin = probe(secure.settings("_twin"))
    ops.subscribe("fl/#")
    twin.subscribe(topics.device_filter("telemetry"), topics.device_filter("status"))
    agent = start_simulated_fleet(secure.settings(OWN), fleet, speed=60, rate_hz=5)
    try:
        assert wait_connected(agent, 10), "the agent's links did not connect to the secure broker"
        twin.wait_topic(own.status_topic)
        twin.wait_for(lambda ms: sum(1 for t, _, _ in ms if t == own.telemetry_topic) >= 2, timeout=20)
        deadline = time.monotonic() + 20
        while agent.stats()["devices"][other.key].get("broker_rejected", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        stats = agent.stats()["devices"]
    finally:
        agent.stop()
        for p in (ops, twin):
            p.close()
    assert stats[other.key]["broker_rejected"] >= 2, stats[other.key]
    assert stats[own.key].get("broker_rejected", 0) == 0, stats[own.key]
    leaked = [t for t, _, _ in ops.messages if t.startswith(f"fl/v1/{OTHER}/")]
    assert leaked == [], f"the broker passed another tenant's topics from {OWN}'s agent: {leaked[:5]}"
