# syntax=docker/dockerfile:1
# The finstream image: every worker role, the API and the one-shot commands.
#
#   docker build -t finstream .
#   docker run --rm --read-only -v /tmp -v /var/lib/finstream finstream worker quotes
#
# linux/amd64: every runtime dependency has a manylinux wheel for it (checked
# with `uv pip compile --only-binary :all: --python-platform x86_64-manylinux_2_28`).
#
# Base image: python:3.11-slim-bookworm, pinned by the digest that tag resolved
# to in a public build log of 2026-09-05 (CPython 3.11.16), also pinned by an
# unrelated public Dockerfile. It could not be pulled here (no registry access
# from this machine): re-pin with `docker buildx imagetools inspect
# python:3.11-slim-bookworm` when bumping.
FROM python:3.11-slim-bookworm@sha256:528257d48c1da0dcecc2e725d1ae34498d60c965f1241e39cd6a85a8859bdf84 AS base

# -- build: the virtualenv, from hash-locked wheels only ------------------------
FROM base AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Dependencies before the source, so that this layer is rebuilt only when the
# lock changes. deploy/image/requirements.txt is the runtime part of
# requirements.lock with hashes (`make lock` writes both).
COPY deploy/image/requirements.txt deploy/image/build-requirements.txt /tmp/
RUN python -m venv /opt/finstream \
 && /opt/finstream/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: --no-deps \
      -r /tmp/requirements.txt \
 && pip install --no-cache-dir --require-hashes --only-binary=:all: --no-deps \
      -r /tmp/build-requirements.txt
# The project itself (.dockerignore keeps tests, caches and local state out).
COPY . /src
RUN python -m pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /tmp/dist /src \
 && /opt/finstream/bin/pip install --no-cache-dir --no-deps /tmp/dist/finstream-*.whl \
 && /opt/finstream/bin/finstream --version

# -- runtime ------------------------------------------------------------------
FROM base AS runtime
# tini as PID 1: forwards SIGTERM to finstream (which commits and leaves its
# consumer group) and reaps zombies.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 pgbackrest=2.45-1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 finstream \
 && useradd --uid 10001 --gid 10001 --no-create-home --no-log-init \
      --home-dir /var/lib/finstream --shell /usr/sbin/nologin finstream \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/finstream
COPY --from=build /opt/finstream /opt/finstream
COPY --chmod=0755 deploy/image/healthcheck.py /usr/local/bin/finstream-healthcheck

# Read-only root filesystem: Python writes no bytecode (pip compiled it at
# install), and everything finstream writes goes to /tmp or the state dir,
# both volumes. Production unless told otherwise: the API refuses to start
# without real keys (no development signing key) and the market-data roles
# refuse synthetic prices; the Compose demo sets FINSTREAM_ENV=dev. Stream
# roles keep their state in memory, restored from changelog topics.
ENV PATH=/opt/finstream/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/finstream \
    FINSTREAM_ENV=production \
    FINSTREAM_HTTP_HOST=0.0.0.0 \
    FINSTREAM_API_HOST=0.0.0.0 \
    FINSTREAM_STACK_DIR=/var/lib/finstream/stack
VOLUME ["/tmp", "/var/lib/finstream"]
WORKDIR /var/lib/finstream
USER 10001:10001
# 8081: a worker's /healthz, /readyz and /metrics; 8000: the API.
EXPOSE 8081 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["finstream-healthcheck"]
ENTRYPOINT ["/usr/bin/tini", "--", "finstream"]
CMD ["roles"]
