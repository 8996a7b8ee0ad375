# signalgen: one image for every process (manager, recorder, writer, worker, consumer, run).
# Build: docker build -t signalgen:0.1.0 .   (docs/deploy.md). No secret enters the image: the
# processes read credentials from environment variables the YAML names, set at run time.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# dependencies first, pinned to what the tests passed with (constraints.txt)
COPY pyproject.toml constraints.txt README.md ./
COPY signalgen ./signalgen
RUN pip install --no-cache-dir -c constraints.txt ".[redis,gcp,qc]"

COPY strategy_runner.py ./
COPY registry ./registry
COPY clients ./clients
COPY environments ./environments
COPY modes ./modes

# a user of its own (uid 10001, as the Kubernetes manifests run it); var/ is the only folder it writes
RUN groupadd --system --gid 10001 signalgen \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home signalgen \
    && mkdir -p /app/var \
    && chown 10001:10001 /app/var
USER 10001:10001

# process.metrics_port: /healthz, /readyz, /metrics
EXPOSE 9464

ENTRYPOINT ["python", "strategy_runner.py"]
CMD ["--help"]
