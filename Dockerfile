# cdc_service container image.
#
# Two stages: the builder installs the pinned runtime dependencies into a venv; the runtime stage copies that venv
# and the application. Nothing that builds or tests ends up in the final image.

# --- builder -----------------------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
COPY requirements.txt /tmp/requirements.txt
# Wheels only: the slim image has no compiler. Every pinned dependency ships a manylinux wheel for CPython 3.11, so
# a missing wheel fails the build here rather than trying to compile an sdist.
RUN /opt/venv/bin/pip install --only-binary=:all: -r /tmp/requirements.txt

# --- runtime -----------------------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS runtime

# A fixed non-root uid, so Kubernetes can enforce runAsNonRoot and volume permissions can name it.
RUN groupadd --system --gid 10001 cdc \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin cdc

# The same base image in both stages, so the venv's python symlink still resolves.
COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
# Owned by root and read-only to the service user: the process never writes its own code or settings.
# The service reads settings.toml and .secrets.toml from the working directory. .secrets.toml holds placeholders
# only; real credentials come from CDC_* environment variables (a Kubernetes Secret).
COPY cdc_service/ ./cdc_service/
COPY settings.toml .secrets.toml ./

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# Compile the bytecode once, here: at run time PYTHONDONTWRITEBYTECODE stops Python from writing it (the service
# user could not anyway), so without this every start would recompile the package in memory.
RUN python -m compileall -q /app/cdc_service

USER 10001:10001
EXPOSE 8080

# Exec form: python is PID 1 and receives SIGTERM itself. The service installs handlers for SIGTERM and SIGINT,
# drains within shutdown.grace_seconds, and starts no child processes, so no init shim is needed.
ENTRYPOINT ["python", "-m", "cdc_service"]
