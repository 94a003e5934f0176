#!/usr/bin/env bash
# Installs mpilm's Debian dependencies (DESIGN.md section 7). Idempotent:
# packages already present are not fetched again.
set -euo pipefail
PKGS="openmpi-bin libopenmpi-dev libpmix-dev libucx-dev libhdf5-openmpi-dev hdf5-tools
libopenblas-dev libopenblas-openmp-dev libyaml-dev libcmocka-dev slurm-wlm munge gnuplot-nox python3-h5py
python3-numpy iproute2 fortunes pkg-config make gcc libmicrohttpd-dev curl"
missing=$(dpkg-query -W -f='${Package} ${Status}\n' $PKGS 2>/dev/null | awk '$4!="installed"{print $1}')
# dpkg-query prints nothing for packages it has never heard of
for p in $PKGS; do dpkg-query -W "$p" >/dev/null 2>&1 || missing="$missing $p"; done
missing=$(echo $missing | tr ' ' '\n' | sort -u | tr '\n' ' ')
if [[ -z "${missing// /}" ]]; then echo "deps: all packages present"; exit 0; fi
SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
echo "deps: installing $missing"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing
