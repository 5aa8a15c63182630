# syntax=docker/dockerfile:1
#
# pg-tls-sidecar: plaintext PostgreSQL in on 127.0.0.1:5432, verified TLS out.
#
#   docker build -t pg-tls-sidecar .
#   docker run --rm --read-only --tmpfs /tmp --stop-timeout 30 \
#       -e PGHOST=mydb.postgres.database.azure.com -e PGSSLROOTCERT=/certs/ca.cer \
#       -v "$PWD/certs:/certs:ro" pg-tls-sidecar
#
# Configuration: /etc/pg-tls-sidecar/sidecar.yaml (deploy/container/sidecar.yaml) leaves the
# upstream to libpq's PG* variables; mount your own file over it for several routes.
#
# The base image is pinned to an exact Python release, the one CI runs the tests on (3.11).
# No digest is pinned here because none could be verified from where this file was written;
# pin one for reproducible builds with
#   docker build --build-arg PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:<digest> .
# taking <digest> from `docker buildx imagetools inspect python:3.11.13-slim-bookworm`.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- build: a virtual environment holding the sidecar and its three dependencies -------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/pg-tls-sidecar

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy

# --without-pip: the environment copied into the final image carries no installer. The base
# image's pip installs into it from outside. Binary wheels only for the dependencies: this
# stage has no compiler, and a platform without wheels should fail here, loudly.
RUN python -m venv --without-pip "$VIRTUAL_ENV" \
    && python -m pip --python "$VIRTUAL_ENV/bin/python" install --no-cache-dir \
        --only-binary=cryptography,cffi,pyyaml,prometheus-client . \
    && "$VIRTUAL_ENV/bin/pg-tls-sidecar" --version

# --- final: the base image without pip, the environment, a default configuration ------------
FROM ${PYTHON_IMAGE}

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="pg-tls-sidecar" \
      org.opencontainers.image.description="Plaintext PostgreSQL in on localhost, verified TLS out to a managed server (libpq verify-full semantics)." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="python:3.11.13-slim-bookworm"

# A fixed numeric UID/GID, so Kubernetes' runAsNonRoot can check it without a passwd lookup;
# the entry still exists for tools that ask for a name. pip, setuptools and wheel leave the
# base image: nothing in this container should be able to install code.
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin sidecar \
    && python -m pip uninstall --yes --no-cache-dir pip setuptools wheel \
    && rm -rf /root/.cache

COPY --from=build /opt/pg-tls-sidecar /opt/pg-tls-sidecar
COPY deploy/container/sidecar.yaml /etc/pg-tls-sidecar/sidecar.yaml

# PYTHONDONTWRITEBYTECODE: the root filesystem may be read-only (the .pyc files were compiled
# at install time). /tmp must stay writable: a CRL (sslcrl) is handed to OpenSSL through a
# temporary file. Mount a tmpfs there (--tmpfs /tmp, or an emptyDir in Kubernetes).
ENV PATH="/opt/pg-tls-sidecar/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 10001:10001

# 9432: the admin endpoint (/metrics, /startup, /livez, /readyz, /status). 5432 is bound on
# 127.0.0.1 only, for an application sharing this network namespace (a pod, or compose's
# network_mode: service:...), so it is not exposed.
EXPOSE 9432

# SIGTERM starts the drain; sidecar.yaml sets timeouts.drain to 25 s, within Kubernetes'
# default 30 s grace period. Docker's default stop timeout is 10 s: use --stop-timeout 30
# (compose: stop_grace_period: 30s) to let sessions finish.
STOPSIGNAL SIGTERM

# Liveness, not readiness: Docker and Swarm act on "unhealthy" by restarting, which cuts every
# open session and cannot fix what /readyz reports (upstream unreachable, at max_connections,
# draining). Kubernetes ignores HEALTHCHECK and uses the probes in deploy/kubernetes/.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["pg-tls-sidecar", "wait", "--probe", "live", "--timeout", "3"]

ENTRYPOINT ["pg-tls-sidecar"]
CMD ["run", "--config", "/etc/pg-tls-sidecar/sidecar.yaml"]
