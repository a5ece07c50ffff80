#!/usr/bin/env bash
# System packages the tests need: a real Slurm (slurmctld, slurmd, srun), a
# C++ compiler (DeepSpeed builds its CPU ops on the fly) and Debian's Chromium
# (the studio's browser tests drive it with Playwright; Playwright's own
# browser download is never used). Installs them with apt-get when missing and
# running as root; otherwise says what to install.
set -euo pipefail
need=()
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd >/dev/null || need+=(slurmd)
command -v srun >/dev/null || need+=(slurm-client)
command -v g++ >/dev/null || need+=(g++)
[ -x /usr/bin/chromium ] || need+=(chromium fonts-dejavu-core)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "The tests need: ${need[*]}. Install them: sudo apt-get install ${need[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
