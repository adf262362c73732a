# aem-dist image for Ray clusters (KubeRay head, workers and RayJob submitter all use it).
#
# Base: the official Ray image for the pinned Ray (2.60.0, see pyproject.toml) and the project's Python
# (3.11); "-gpu" is Ray's alias for its default CUDA variant (pass e.g. RAY_IMAGE=...-py311-cu128 to pick
# one). It already runs as the non-root user `ray` (uid 1000, gid 100) with Python in /home/ray/anaconda3.
#
#   docker build -t REGISTRY/aem-dist:0.1.0 .          # docs/cluster.md explains push and use
#
# No credentials are ever baked in: S3 endpoint and keys reach the pods as environment variables from a
# Kubernetes Secret at run time (cluster/kuberay/secret.example.yaml).
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

# PyPI's Linux x86_64 torch wheels are CUDA builds (the CUDA runtime comes as nvidia-* wheels, so only the
# node's driver matters). TORCH_INDEX_URL can point at another wheel index for a different CUDA version.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG RAY_VERSION=2.60.0

LABEL org.opencontainers.image.title="aem-dist" \
      org.opencontainers.image.description="Distributed AEM (attention entropy maximization) MIL training on Ray" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Numeric uid:gid of the base image's `ray` user: Kubernetes can then verify runAsNonRoot.
USER 1000:100

# Layer 1 (largest, changes least): torch, a CUDA build. The project folder is made here, by the `ray`
# user, so the in-tree package build below can write to it (WORKDIR alone may create it owned by root).
RUN mkdir -p /home/ray/aem-dist \
 && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /home/ray/aem-dist

# Layer 2: the project's dependencies, read from pyproject.toml only, so editing code does not
# re-download them. Ray stays at the base image's version (the pin keeps pip from replacing it).
COPY --chown=1000:100 pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt "ray[train,tune,default]==${RAY_VERSION}" "torch==${TORCH_VERSION}" \
 && rm /tmp/requirements.txt

# Layer 3 (small, changes most): the package itself. `configs/` mirrors the repository's symlink so
# `--config configs/cluster-sweep.yaml` resolves from this folder too (where no configs/ folder exists,
# that exact form falls back to the packaged copy with a warning; any other missing path is an error).
COPY --chown=1000:100 aem_dist ./aem_dist
RUN pip install --no-cache-dir --no-deps . \
 && rm -rf build ./*.egg-info \
 && ln -s aem_dist/configs configs \
 && aem-dist --help > /dev/null
