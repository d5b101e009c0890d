# cdc_service container image.
#
# Two stages on the same base. The builder turns the locked runtime dependencies (requirements.txt: every package,
# transitive ones included, pinned with hashes; `make lock`) into wheels in /wheels, checking every download against
# the lock. The runtime stage installs exactly those wheels (no index, no network, nothing built) and adds the
# application. Neither pip's cache, the wheels nor anything the builder was given end up in the final image.
#
# The runtime writes nothing to its filesystem, so it runs with a read-only root (docker run --read-only, compose
# read_only: true, Kubernetes readOnlyRootFilesystem: true): bytecode is compiled at build time, Python writes none at
# run time, logs go to stdout, and HOME points at a directory that does not exist.
#
# Needs BuildKit (the RUN --mount below); Docker's own Dockerfile frontend is enough, no `# syntax` image is fetched.
# `make image-test` builds and runs it; docs/operations.md section 2.1 has the build arguments.

# The base of both stages. A registry mirror or a digest-pinned reference can be given instead
# (--build-arg PYTHON_IMAGE=registry.example.com/python:3.11-slim-bookworm).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder -----------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

# Where pip downloads from, for a build behind a corporate proxy or with a private index; all optional.
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL  an index or PyPI mirror (pip reads them from the environment). The lock's
#                                       hashes still apply: the index must serve PyPI's files (a mirror or proxy does).
#   PIP_TRUSTED_HOST                    a host whose index is plain http or not verified.
#   EXTRA_CA_CERTS                      PEM text of the CA(s) of a TLS-intercepting proxy or of the private index,
#                                       appended to a copy of the base image's bundle for pip in this stage.
# They are declared in this stage only, which the final image does not contain: its layers and history hold none.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG EXTRA_CA_CERTS

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

COPY requirements.txt requirements-build.txt /src/
# Wheels only (the slim image has no compiler), except nkeys: it is published only as a source package, pure Python,
# built here by the locked setuptools of requirements-build.txt (--no-build-isolation: no unpinned build download).
# A package that starts to need a compiler fails this step instead of compiling.
RUN set -eu; \
    if [ -n "${EXTRA_CA_CERTS:-}" ]; then \
        cat /etc/ssl/certs/ca-certificates.crt > /tmp/ca-bundle.pem; \
        printf '%s\n' "$EXTRA_CA_CERTS" >> /tmp/ca-bundle.pem; \
        export PIP_CERT=/tmp/ca-bundle.pem; \
    fi; \
    pip install --require-hashes --only-binary=:all: -r /src/requirements-build.txt; \
    pip wheel --require-hashes --no-build-isolation --only-binary=:all: --no-binary=nkeys \
        -r /src/requirements.txt -w /wheels

# --- runtime -----------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

# A fixed non-root uid, so Kubernetes can enforce runAsNonRoot/runAsUser and volume permissions can name it.
RUN groupadd --system --gid 10001 cdc \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin cdc

# Install the builder's wheels, and only those (--no-index: nothing is downloaded; --no-deps: the builder already
# resolved the lock, whose hashes cover the downloads; the wheel built from nkeys' source has no hash in the lock).
# The wheels are bind-mounted for this one step rather than copied, so they add nothing to the image; the mount
# point is /mnt, empty in the base image, because a new mount point would stay behind as an empty directory. The base
# image's pip installs into a venv that has no pip of its own; bytecode is compiled below, with the application's.
RUN --mount=type=bind,from=builder,source=/wheels,target=/mnt \
    python -m venv --without-pip /opt/venv \
 && pip --python /opt/venv/bin/python install --no-cache-dir --disable-pip-version-check --no-compile \
        --no-index --no-deps /mnt/*.whl

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
