# The interest-stream worker image: the worker's own install (`pip install .`: no torch, no matplotlib; training and
# export need the `train` extra and happen outside the image). Build: docker build -t interest-stream .
# GPU: docker build --build-arg ORT_EXTRAS='[cuda,cudnn]' (CUDA/cuDNN from NVIDIA's pip wheels; the host needs the
# NVIDIA container runtime). The model is mounted at /models (see docker-compose.yml), not baked in.
FROM python:3.11-slim
ARG ORT_EXTRAS=""
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY streams ./streams
COPY models ./models
COPY export ./export
RUN pip install . && if [ -n "$ORT_EXTRAS" ]; then pip install "onnxruntime-gpu${ORT_EXTRAS}==1.31.1"; fi
RUN useradd --create-home --uid 10001 interest
USER interest
# Faust creates its data directory at start; /app belongs to root
ENV INTEREST_DATA_DIR=/home/interest/faust
EXPOSE 9108 6066
CMD ["interest-stream", "worker"]
