# syntax=docker/dockerfile:1
# cdc_service container image.
#
# Two stages on the same base. The builder turns the pinned runtime dependencies into wheels in /wheels; the runtime
# stage installs them from there with --no-index (no network, nothing built) and adds the application. Neither pip's
# cache nor the wheels end up in the final image.
#
# The runtime writes nothing to its filesystem, so it runs with a read-only root (docker run --read-only, compose
# read_only: true, Kubernetes readOnlyRootFilesystem: true): bytecode is compiled at build time, Python writes none at
# run time, logs go to stdout, and HOME points at a directory that does not exist.

# --- builder -----------------------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY requirements.txt /wheels/requirements.txt
# Binary wheels only: the slim image has no compiler, and every pinned dependency ships a manylinux wheel for
# CPython 3.11, so a missing wheel fails the build here instead of compiling an sdist.
RUN pip wheel --only-binary=:all: -r /wheels/requirements.txt -w /wheels

# --- runtime -----------------------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS runtime

# A fixed non-root uid, so Kubernetes can enforce runAsNonRoot/runAsUser and volume permissions can name it.
RUN groupadd --system --gid 10001 cdc \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin cdc

# Install from the builder's wheels only (--no-index: nothing is downloaded). The wheels are bind-mounted for this
# one step rather than copied, so they add nothing to the image. The base image's pip installs into a venv that has
# no pip of its own; bytecode is compiled below, together with the application's.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv --without-pip /opt/venv \
 && pip --python /opt/venv/bin/python install --no-cache-dir --disable-pip-version-check --no-compile \
        --no-index --find-links=/wheels -r /wheels/requirements.txt

WORKDIR /app
# Owned by root and read-only to the service user: the process never writes its own code or settings.
# The service reads settings.toml and .secrets.toml from the working directory. .secrets.toml holds placeholders
# only; real credentials come from CDC_* environment variables (a Kubernetes Secret).
COPY cdc_service/ ./cdc_service/
COPY settings.toml .secrets.toml ./

# Bytecode for the dependencies and the application, once, here: at run time nothing may be written. unchecked-hash:
# the image never changes, so Python loads the .pyc files without checking them against the sources' timestamps
# (which image builders may rewrite) and never recompiles in memory at start-up.
RUN python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/venv/lib /app/cdc_service

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/nonexistent

USER 10001:10001
EXPOSE 8080

# Exec form: python is PID 1 and receives SIGTERM itself. The service installs handlers for SIGTERM and SIGINT,
# drains within shutdown.grace_seconds (keep the orchestrator's stop timeout above it), and starts no child
# processes, so no init shim is needed.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "cdc_service"]
