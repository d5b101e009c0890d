"""The loop-thread pipeline behind ``cdc_service.engine.Engine``, one job per class.

How one message flows::

    intake (push callback or pull batch)
      ─► Batcher        buffers up to ingest.batch_size / batch_wait_ms, dispatches a Batch to the worker pool
      ─► worker pool    BatchPreparer (cdc_service.worker): parse, route, build, one Redis lookup-and-claim
                        ─► one Outcome per message (core.outcomes); workers touch no NATS object
      ─► Engine         walks batches in receipt order (the only first publish of an event), decides per outcome
      ─► FlightTable    a copy of an event already in flight here waits for it (Copies); claims are renewed
      ─► Output         sends publishes, waits for PubAcks, holds failures (retried in order; the engine's
                        keep-alive task keeps the held messages from being redelivered)
      ─► Finisher       markers in Redis, then the message's Result
      ─► SettleLedger   ack / nak / term exactly once, counters, idle and room events (back-pressure)

Everything here runs on the event-loop thread, which owns every NATS object; the pool only returns outcomes.
Time is read through a ``Clock`` (``clock.py``) so tests can move it.
"""
