#!/usr/bin/env bash
# System packages the end-to-end launcher tests use: Debian's slurm-wlm (+ munge) for a real one-node SLURM,
# iproute2 for network namespaces (two "hosts" on one machine). Installs only what is missing; needs root.
set -euo pipefail
need=()
command -v slurmctld >/dev/null || need+=(slurm-wlm)
command -v munged >/dev/null || need+=(munge)
command -v ip >/dev/null || need+=(iproute2)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "note: ${need[*]} missing and not root: the SLURM / multi-host tests will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
