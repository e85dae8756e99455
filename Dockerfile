# payguard's two images from one file, so the Python environment is built once and shared:
#   docker build --target api -t payguard .                 serve, worker, jobs, migrate (the default target)
#   docker build --target operator -t payguard-operator .   the FailedOperation operator (Kopf)
# The operator drives app.failures' retry engine, so both carry the same virtualenv; only the
# command and the exposed ports differ.
#
# The images expect DATABASE_URL (a Kubernetes Secret). The embedded PostgreSQL that
# `payguard serve` starts without it is for development on a laptop: it has nowhere to write here
# (no home directory, a read-only root filesystem under the chart).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: a virtualenv with payguard and its dependencies, nothing else -------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# dependencies in a layer of their own, keyed on pyproject.toml alone: a code change (skaffold dev)
# rebuilds only the small layer below
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt
COPY app ./app
COPY migrations ./migrations
COPY operator ./operator
RUN pip install --no-cache-dir --no-deps .

# --- runtime: the virtualenv on a clean slim base (no compiler, no pip cache, no sources) ------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="payguard" \
      org.opencontainers.image.description="Money-moving flows made safe: idempotent payments, exactly-once webhooks" \
      org.opencontainers.image.source="https://github.com/payguard/payguard"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
# a fixed numeric UID/GID: Kubernetes' runAsNonRoot can check a number, never a name
RUN groupadd --system --gid 10001 payguard \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin payguard
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
ENTRYPOINT ["payguard"]

# --- operator: `payguard operator`; Kopf's liveness endpoint on 8080 ---------------------------------
FROM runtime AS operator
EXPOSE 8080
CMD ["operator"]

# --- api (last, so the default target): the HTTP API on 8000; `payguard worker --metrics-port 9100` --
FROM runtime AS api
EXPOSE 8000 9100
CMD ["serve", "--host", "0.0.0.0"]
