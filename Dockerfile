# syntax=docker/dockerfile:1
# cio-worker image: `docker build -t cio-worker .`
#
# Stage 1 builds every wheel from requirements.lock (the lock the Makefile
# installs) plus the worker's own; stage 2 installs only those wheels, with no
# index and no compiler, and runs as an unprivileged user. Pin PYTHON_IMAGE to
# a digest in production so a rebuild cannot change the interpreter under you.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# A compiler only for a dependency that has no wheel for this platform; this
# stage is thrown away, so none of it reaches the final image.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements.lock ./
RUN pip wheel --quiet --wheel-dir /wheels -r requirements.lock
COPY pyproject.toml README.md ./
COPY worker/ worker/
RUN pip wheel --quiet --no-deps --wheel-dir /wheels . \
    && cp requirements.lock /wheels/requirements.lock

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="cio-worker" \
      org.opencontainers.image.description="Delivers person and event records from Kafka to the Customer.io Track API." \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# The same two steps as `make install`: the locked dependencies, then the worker
# itself with --no-deps, so nothing unlocked is ever resolved. The wheels are
# mounted from the build stage, never copied into a layer.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --quiet --no-index --find-links /wheels -r /wheels/requirements.lock \
    && pip install --quiet --no-index --find-links /wheels --no-deps cio-worker
RUN groupadd --system --gid 10001 cio \
    && useradd --system --uid 10001 --gid cio --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin cio
# Settings and schemas resolve from the working folder (config/worker.toml,
# schemas/*.avsc); they stay owned by root, so the worker cannot change them.
WORKDIR /app
COPY schemas/ schemas/
COPY config/worker.toml config/worker.toml
# Numeric, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
# /metrics, /healthz and /readyz ([metrics] port, CIO_METRICS__PORT).
EXPOSE 9108
# slim has no curl: the probe is Python's urllib; a 503 or no answer fails it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CIO_METRICS__PORT', '9108'), timeout=4)"]
ENTRYPOINT ["cio-worker"]
CMD ["run"]
