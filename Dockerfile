# syntax=docker/dockerfile:1
# Aurora's images, one Dockerfile, three targets (see docs/deploy.md):
#   operator        the kopf operator; no torch        --target operator
#   runtime         torch engine and trainer, with the default model baked in
#   runtime-sglang  SGLang (GPU) with Aurora's plugin and launcher installed, on the
#                   lmsysorg/sglang image of a supported release: 0.5.23 by default,
#                   0.5.12 (torch 2.11) with --build-arg SGLANG_IMAGE=lmsysorg/sglang:v0.5.12
# Every target runs as the non-root user 10001 and works with a read-only root file
# system (HOME and caches point at /tmp, which the pods mount as emptyDir).

ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm
ARG SGLANG_IMAGE=lmsysorg/sglang:v0.5.23

# ---------------------------------------------------------------- base and wheel
FROM ${PYTHON_IMAGE} AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp
RUN groupadd --gid 10001 aurora \
    && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin aurora

# One wheel of the project; each target installs it with the extras it needs.
FROM python-base AS wheel
WORKDIR /src
COPY pyproject.toml ./
COPY aurora ./aurora
COPY operator ./operator
COPY runtime ./runtime
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------- operator
FROM python-base AS operator
COPY --from=wheel /wheels /wheels
# Version ranges come from pyproject.toml's [operator] extra.
# hadolint ignore=DL3013
RUN pip install "$(echo /wheels/aurora_speculator-*.whl)[operator]" \
    && rm -rf /wheels \
    && ! python -c "import torch" 2>/dev/null
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080 9100
ENTRYPOINT ["aurora"]
CMD ["operator", "--all-namespaces"]

# ----------------------------------------------------------------------- runtime
FROM python-base AS runtime
# CPU wheels by default; a CUDA build: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV AURORA_HOME=/opt/aurora
COPY --from=wheel /wheels /wheels
# hadolint ignore=DL3013
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" "$(echo /wheels/aurora_speculator-*.whl)[runtime]" \
    && rm -rf /wheels
# The default model ships in the image: pods start without reaching a model hub.
RUN aurora models pull smollm2-135m && chmod -R a+rX /opt/aurora
WORKDIR /tmp
USER 10001:10001
EXPOSE 8000 9100
ENTRYPOINT ["aurora"]
CMD ["--help"]

# ---------------------------------------------------------------- runtime-sglang
# SGLang pins its own torch and transformers: they stay as the image has them. The torch
# engine's [runtime] needs transformers >= 5.24 where SGLang pins 5.19, so the two live
# in separate images (tests/integration/test_dependency_resolution.py keeps it honest).
FROM ${SGLANG_IMAGE} AS runtime-sglang
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
COPY --from=wheel /wheels /wheels
# Aurora without extras: nothing here may replace the image's SGLang, torch or
# transformers. The plugin's hooks are checked against each supported SGLang release:
# the build fails on an image with any other (require_supported lists them).
# hadolint ignore=DL3013
RUN python3 -m pip install "$(echo /wheels/aurora_speculator-*.whl)" \
    && rm -rf /wheels \
    && python3 -c "import aurora.runtime.sglang as a; a.require_supported(a.installed_version())" \
    && python3 -m aurora.runtime.sglang.serve --help > /dev/null \
    && (getent group 10001 || groupadd --gid 10001 aurora) \
    && (getent passwd 10001 || useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin aurora)
WORKDIR /tmp
USER 10001:10001
EXPOSE 8000
ENTRYPOINT []
CMD ["python3", "-m", "aurora.runtime.sglang.serve", "--help"]
