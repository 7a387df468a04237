"""Prometheus metrics (docs/metrics.md): a sink on the engine's bus turns the events the engine already emits into
counters, gauges and a histogram; what others own (MQTT connection, outbox queue, kubelet restarts) is read at
scrape time. One dedicated CollectorRegistry per service, never the process-global one, so tests and embedders
running several services in one process do not mix their figures.

Served by `lifecycle.adapters.metrics_http` from the service's own event loop. Imported only when
`[metrics]` is configured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lifecycle.bus import BusItem, Subscription
from lifecycle.certwatch import CertInfo
from lifecycle.exposures import ExposureSet
from lifecycle.logging import get_logger
from lifecycle.machine import State
from lifecycle.protocol import EventType, Reply, Status

# Steps take from milliseconds (a step already done) to many minutes (pulling images on a slow line).
STEP_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# States a job passes through whose time in the state is a step's (or a whole reset's, renewal's) duration; a node
# rests in idle, running, failed and stopped for as long as its user wants.
_TIMED_STATES = frozenset(s.value for s in State) - {State.IDLE.value, State.RUNNING.value, State.FAILED.value,
                                                     State.STOPPED.value}


@dataclass(frozen=True)
class LiveSources:
    """Readings owned elsewhere, taken at each scrape (a copy kept here could only lag)."""

    mqtt_connected: Callable[[], bool]
    mqtt_connects: Callable[[], int]
    queued_events: Callable[[], int]
    kubelet_restarts: Callable[[], int]


class _LiveCollector(Collector):
    def __init__(self, sources: LiveSources) -> None:
        self._sources = sources

    def collect(self) -> Iterable[Metric]:
        s = self._sources
        yield GaugeMetricFamily("lifecycle_mqtt_connected", "1 while the service has a session with the broker",
                                value=1.0 if s.mqtt_connected() else 0.0)
        yield CounterMetricFamily("lifecycle_mqtt_reconnects", "Broker sessions established after the first",
                                  value=max(0, s.mqtt_connects() - 1))
        yield GaugeMetricFamily("lifecycle_mqtt_queued_events",
                                "Events and status messages waiting to be published to the broker",
                                value=s.queued_events())
        yield CounterMetricFamily("lifecycle_kubelet_restarts",
                                  "Times the service restarted a kubelet that exited, since the service started",
                                  value=s.kubelet_restarts())


def request_outcome(reply: Reply) -> str:
    if reply.ok:
        return "ok"
    return "error" if reply.error is not None and reply.error[0] == "internal" else "refused"


class Metrics:
    def __init__(self, live: LiveSources) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.state = Gauge("lifecycle_state", "1 for the service's current state, 0 for the others", ["state"],
                           registry=r)
        self.step_duration = Histogram(
            "lifecycle_step_duration_seconds", "Time spent in a step (or a reset, a renewal), by how it ended",
            ["step", "outcome"], buckets=STEP_BUCKETS_S, registry=r)
        self.step_retries = Counter("lifecycle_step_retries", "Step attempts retried after a temporary error",
                                    ["step", "code"], registry=r)
        self.pull_bytes = Counter("lifecycle_image_pull_bytes", "Bytes of image layers downloaded", registry=r)
        self.requests = Counter("lifecycle_requests", "Requests answered, by action and outcome",
                                ["action", "outcome"], registry=r)
        self.cert_expiry = Gauge("lifecycle_certificate_expiry_timestamp_seconds",
                                 "When each certificate of the node expires (Unix time)", ["file"], registry=r)
        r.register(_LiveCollector(live))
        for state in State:
            self.state.labels(state=state.value).set(0)
        self._failure_code: str | None = None  # of the last step.failed: tells a cancel from a failure
        self._pulled: dict[str, int] = {}  # bytes already counted per image of the pull under way

    # ---- fed by the bus ----------------------------------------------------------------------------------

    def observe(self, item: BusItem) -> None:
        if isinstance(item, Status):
            self._set_state(item.state)
            return
        if isinstance(item, ExposureSet):  # the exposures message: no metric of its own yet
            return
        data = item.data
        if item.type == EventType.STATE_CHANGED:
            self._state_changed(data)
        elif item.type == EventType.STEP_FAILED:
            error = data.get("error")
            self._failure_code = str(error.get("code")) if isinstance(error, dict) else None
        elif item.type == EventType.STEP_RETRYING:
            error = data.get("error")
            code = str(error.get("code")) if isinstance(error, dict) else "unknown"
            self.step_retries.labels(step=str(data.get("state")), code=code).inc()
        elif item.type == EventType.STEP_PROGRESS:
            self._progress(data)

    def _set_state(self, current: str) -> None:
        for state in State:
            self.state.labels(state=state.value).set(1 if state.value == current else 0)

    def _state_changed(self, data: dict[str, Any]) -> None:
        left, entered = str(data.get("from")), str(data.get("to"))
        duration_s = data.get("duration_s")
        if left in _TIMED_STATES and isinstance(duration_s, int | float):
            if entered == State.FAILED.value:
                outcome = "cancelled" if self._failure_code == "cancelled" else "failure"
            elif entered == State.RESETTING.value and left != State.RESETTING.value:
                outcome = "interrupted"  # a reset pre-empted the job
            else:
                outcome = "success"
            self.step_duration.labels(step=left, outcome=outcome).observe(duration_s)
        self._failure_code = None
        if entered == State.IMAGES.value:
            self._pulled.clear()
        self._set_state(entered)

    def _progress(self, data: dict[str, Any]) -> None:
        # The images step reports each pull as "pulling <ref>" with the bytes downloaded so far (cumulative).
        message, current = data.get("message"), data.get("current")
        if (data.get("state") != State.IMAGES.value or data.get("unit") != "bytes" or not isinstance(message, str)
                or not message.startswith("pulling ") or not isinstance(current, int)):
            return
        before = self._pulled.get(message, 0)
        if current > before:
            self.pull_bytes.inc(current - before)
            self._pulled[message] = current

    # ---- fed by the service's other parts ------------------------------------------------------------------

    def request_answered(self, action: str, reply: Reply) -> None:
        self.requests.labels(action=action, outcome=request_outcome(reply)).inc()

    def certificates(self, certs: Iterable[CertInfo]) -> None:
        """A scan's result replaces the last one's: a file removed (a reset) leaves no stale series."""
        self.cert_expiry.clear()
        for cert in certs:
            self.cert_expiry.labels(file=cert.file).set(cert.not_after)


async def run_sink(metrics: Metrics, sub: Subscription) -> None:
    """Feed the bus subscription into `metrics` until cancelled."""
    log = get_logger("lifecycle.metrics")
    while True:
        await sub.wait()
        while len(sub):
            item = sub.pop()
            try:
                metrics.observe(item)
            except Exception:  # a bug in a metric must not end the metrics (nor touch the engine)
                log.exception("could not record an event in the metrics")
