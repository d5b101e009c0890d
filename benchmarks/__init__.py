"""End-to-end benchmarks against real nats-server and redis-server processes (``python -m benchmarks.e2e``).

Never collected by pytest: ``make bench`` / ``make bench-full`` run them.
"""
