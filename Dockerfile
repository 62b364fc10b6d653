# The mserve serving image: one model, `mserve serve /mnt/models`, the entrypoint KServe runs.
#
#   docker build -t mserve:0.1.0 .                                    # CPU (plain onnxruntime)
#   docker build --build-arg VARIANT=gpu -t mserve:0.1.0-gpu .     # CUDA + cuDNN as wheels
#   docker run --rm -p 8080:8080 -v "$PWD/model-dir:/mnt/models:ro" mserve:0.1.0 --name iris
#
# (`make image` runs the first with podman, docker or buildah, `make image BASE=... VARIANT=gpu`
# the second.) Build arguments, the only things that differ between the variants:
#   BASE     the one base image both stages start from: any Debian or Ubuntu image; one
#            without python3 and its venv module (the CUDA images) gets them from apt.
#            A CPU build names only the CPU base, so nothing else is pulled.
#   VARIANT  cpu: plain onnxruntime (a wheel ~20 times smaller); gpu: onnxruntime-gpu with
#            the CUDA and cuDNN wheels it was built for (CUDA 13 for 1.31: its CUDA provider
#            links libcublas.so.13 and libcudart.so.13), so the base needs no CUDA; the
#            driver comes from the host (NVIDIA container toolkit, `--gpus all`).
# No `# syntax=` line: the builder's own Dockerfile frontend is enough, and BuildKit would
# otherwise fetch one from a registry (no offline builds).
#
# Arguments after the image name are `mserve serve` options. It runs as any uid on a read-only
# root filesystem (`mserve serve` writes nothing; tests/test_e2e_image.py runs it so).
# SIGTERM: not ready at once, serving for MSERVE_DRAIN_GRACE s, then a drain of up to
# MSERVE_DRAIN_TIMEOUT s: 25 s in all, under Kubernetes' default 30 s grace period (give
# `docker stop` / `podman stop` `-t 30`). docs/kubernetes.md has the rest.
ARG BASE=python:3.12-slim-bookworm

# Runtime: the base with python3 and venv.
FROM ${BASE} AS runtime
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi

# Build: a virtual environment in /opt/mserve holding mserve and its runtime dependencies.
FROM runtime AS build
ARG VARIANT=cpu
# The en_US.UTF-8 locale, the default of ONNX Runtime's StringNormalizer (skl2onnx's
# TfidfVectorizer and CountVectorizer models), so they load as written (without it the worker
# substitutes C.UTF-8: daemon/worker/stringlocale.py). Compiled here; only the 3 MB archive
# goes into the image, not the locales package and its sources.
RUN apt-get update \
 && apt-get install -y --no-install-recommends locales \
 && localedef -i en_US -c -f UTF-8 -A /usr/share/locale/locale.alias en_US.UTF-8 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/requirements.py docker/
RUN python3 -m venv /opt/mserve \
 && python3 docker/requirements.py "${VARIANT}" > /tmp/requirements.txt \
 && /opt/mserve/bin/pip install --no-cache-dir --disable-pip-version-check -r /tmp/requirements.txt
COPY cli cli
COPY daemon daemon
RUN /opt/mserve/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps . \
 && /opt/mserve/bin/pip uninstall -y -q pip

# Run: the same runtime, the environment, an unprivileged user.
FROM runtime
ENV PATH=/opt/mserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MSERVE_DRAIN_GRACE=5 \
    MSERVE_DRAIN_TIMEOUT=20
COPY --from=build /opt/mserve /opt/mserve
COPY --from=build /usr/lib/locale/locale-archive /usr/lib/locale/locale-archive
RUN groupadd --gid 10001 mserve \
 && useradd --uid 10001 --gid 10001 --home-dir /home/mserve --create-home \
            --shell /usr/sbin/nologin mserve
USER 10001:10001
WORKDIR /home/mserve
EXPOSE 8080 8081
ENTRYPOINT ["mserve", "serve", "/mnt/models"]
