"""Every metric name the chart's Grafana dashboard and Prometheus alert rules use is exported by a running service
(deploy/helm/cdc-service/files/). tests/deploy/test_dashboard.py checks the same against cdc_service/metrics.py
without servers; this checks what /metrics really serves once events have flowed."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.files import base_name, referenced_metrics, selector_labels
from tests.integration.helpers import OUTPUT, consumer_settled, ensure_input, feed, wait_count, wait_until
from tests.sequin import body


async def test_dashboard_and_alert_metrics_are_exported(js, start_service) -> None:
    await ensure_input(js)
    svc = start_service()
    await feed(js, "cdc.acme.messages", body("messages"))
    # One dead letter too, so the dead-letter series carry a real sample, not only their start-up zero.
    await feed(js, "cdc.acme.messages", b"not json")
    assert await wait_count(js, OUTPUT, 1) == 1
    await consumer_settled(js)
    await wait_until(
        lambda: (
            svc.metric("cdc_consumer_processing_seconds_count", {"table": "messages"}) == 1
            and svc.metric("cdc_consumer_dead_letters_total", {"reason": "invalid_json"}) == 1
            and svc.metric("cdc_consumer_last_ack_timestamp_seconds") > 0
        ),
        what="histograms, dead-letter counter and last-ack gauge updated",
    )

    status, raw = svc.get("/metrics")
    assert status == 200
    families = list(text_string_to_metric_families(raw.decode()))
    samples = {sample.name: set(sample.labels) for family in families for sample in family.samples}
    histograms = {family.name for family in families if family.type == "histogram"}
    # A labelled family whose labels cannot be known in advance (handler errors by exception type) has no sample until
    # its first event; /metrics still declares it (HELP and TYPE), which is what can be checked here.
    declared_only = {family.name for family in families if not family.samples}

    referenced = referenced_metrics()
    assert len(referenced) >= 10, sorted(referenced)  # the extraction found the queries
    missing = {
        name: sorted(where)
        for name, where in referenced.items()
        if name not in samples
        and not (name in histograms and f"{name}_bucket" in samples)
        and base_name(name) not in declared_only
    }
    assert not missing, f"used by the dashboard or the rules but not exported: {missing}"
    for name, labels in selector_labels().items():
        if base_name(name) in declared_only:
            continue  # no sample to read labels from; tests/deploy/test_dashboard.py checks them against metrics.py
        assert labels <= samples[name], f"{name} is exported without label(s) {sorted(labels - samples[name])}"
    # Every family the rules need for their arithmetic is there as the right type.
    assert {base_name(n) for n in referenced if n.endswith("_bucket")} <= histograms
