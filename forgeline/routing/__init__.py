"""Order routing: decompose customer orders into parts, pack them into builds and assign the builds
to partner printers from live twin state.

Layout: :mod:`~forgeline.routing.model` (orders, printers, the fleet view, configuration),
:mod:`~forgeline.routing.packing` (bounding-box 3D packing with rotations and spacing),
:mod:`~forgeline.routing.router` (scoring, open builds, release rules, re-routing, explanations),
:mod:`~forgeline.routing.service` (MQTT request/response and job dispatch) and
:mod:`~forgeline.routing.cli` (``forgeline route``). See ``docs/routing.md``.
"""
