#!/bin/sh
# Installs etcd 3.4 (server and etcdctl) from Debian's packages when it is not on PATH.
# Used by `quorum-bench vs-etcd` (which runs it when etcd is missing) and by hand.
set -eu
if command -v etcd >/dev/null 2>&1 && command -v etcdctl >/dev/null 2>&1; then
    etcd --version | head -1
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server etcd-client
# Debian's package starts a single-member etcd on 2379/2380; the benchmark runs its own.
if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl disable --now etcd >/dev/null 2>&1 || true; fi
if command -v service >/dev/null 2>&1; then $SUDO service etcd stop >/dev/null 2>&1 || true; fi
etcd --version | head -1
