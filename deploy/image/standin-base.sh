#!/usr/bin/env bash
# A stand-in for the Dockerfile's pinned base (python:3.11-slim-bookworm),
# FOR THE IMAGE TEST ONLY (tests/deploy/test_image_build.py): these machines
# reach Debian's packages but no container registry, so the test builds the
# real Dockerfile on a Debian bookworm minbase made here with debootstrap
# (CPython 3.11, venv, pip, CA certificates, tini), imported into the local
# container storage with `podman import`. Release builds use the pinned base.
#
#   standin-base.sh OUT_DIR IMAGE_NAME
#
# Writes OUT_DIR/rootfs.tar and imports it as IMAGE_NAME. Debian's mirror is
# the one apt uses on this machine.
set -euo pipefail

out="$1"
image="$2"
mirror="${FINSTREAM_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
rootfs="$out/rootfs"

rm -rf "$rootfs"
mkdir -p "$out"
debootstrap --variant=minbase \
  --include=python3,python3-venv,python3-pip,ca-certificates,tini \
  bookworm "$rootfs" "$mirror" >"$out/debootstrap.log" 2>&1 \
  || { tail -20 "$out/debootstrap.log" >&2; exit 1; }

# What the official python image gives a Dockerfile: `python` and `pip` on the
# PATH, and pip allowed to install (PEP 668's marker is Debian's, not the image's).
ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/pip"
rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
# pip and apt inside the build trust what this machine trusts (its package
# registries may be reached through a proxy with a CA of its own).
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
# The build needs no package lists from the base; the runtime stage fetches its own.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb

tar -C "$rootfs" -cf "$out/rootfs.tar" .
rm -rf "$rootfs"
podman rmi -f "$image" >/dev/null 2>&1 || true
podman import --quiet "$out/rootfs.tar" "$image" >/dev/null
echo "stand-in base $image imported from $out/rootfs.tar"
