#!/usr/bin/env bash
# Build the images the tests marked `docker` use, from Debian's packages and the package
# index only (no registry is needed):
#   nipype-s3-test/debian:bookworm       debootstrap --variant=minbase, docker import
#   nipype-s3-test/nipype:local          Python + this environment's nipype, nibabel,
#                                        numpy, boto3 versions + a stand-in mcflirt
#   nipype-s3-test/nipype-older:local    the same with nipype 1.10.0 (a version mismatch)
# Needs a running Docker engine, debootstrap, and PYTHON (default: python) with nipype.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python}
docker info >/dev/null 2>&1 || { echo "build-images: no Docker engine (docker info)" >&2; exit 1; }
if ! docker image inspect nipype-s3-test/debian:bookworm >/dev/null 2>&1; then
  root=$(mktemp -d)
  debootstrap --variant=minbase bookworm "$root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
    >/dev/null
  tar -C "$root" -c . | docker import - nipype-s3-test/debian:bookworm >/dev/null
  rm -rf "$root"
fi
PINS=$("$PY" -c "from importlib import metadata as m
print(' '.join(f'{d}=={m.version(d)}' for d in ('nipype', 'nibabel', 'numpy', 'traits',
                                                  'boto3', 'botocore', 's3transfer')))")
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$here"/*.Dockerfile "$here/fake-mcflirt" "$ctx/"
cp "${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}" "$ctx/build-ca.pem"
docker build -q -f "$ctx/nipype.Dockerfile" --build-arg PINS="$PINS" \
  -t nipype-s3-test/nipype:local "$ctx" >/dev/null
docker build -q -f "$ctx/older-nipype.Dockerfile" -t nipype-s3-test/nipype-older:local \
  "$ctx" >/dev/null
echo "build-images: nipype-s3-test/nipype:local ($PINS) and nipype-s3-test/nipype-older:local"
