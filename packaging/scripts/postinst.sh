#!/bin/sh
# Post-install for the .deb (postinst: "configure" [old-version], "abort-*") and the .rpm (%post:
# 1 = first install, 2 = upgrade). Creates the service account and directories, generates the
# cluster secret once, and tells a running systemd about the units.
# POSIX sh: dpkg and rpm run these with /bin/sh, which has no pipefail here (dash).
set -eu

case "$1" in
    configure) upgrade=${2:+yes} ;;     # dpkg passes the old version on an upgrade
    [0-9]*) upgrade= ;;                 # rpm: running nodes are restarted by %postun (postrm.sh)
    *) exit 0 ;;    # abort-upgrade, abort-remove, ...: nothing was changed by us that needs undoing
esac

# The account, from the package's sysusers.d file where systemd-sysusers exists; the same account
# by hand where it does not (minimal containers without systemd).
if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers /usr/lib/sysusers.d/butterfly.conf
elif ! getent passwd butterfly >/dev/null; then
    nologin=/usr/sbin/nologin
    [ -x "$nologin" ] || nologin=/sbin/nologin
    getent group butterfly >/dev/null || groupadd --system butterfly
    useradd --system --gid butterfly --home-dir /var/lib/butterfly --no-create-home \
        --shell "$nologin" --comment "Butterfly inference node" butterfly
fi

if command -v systemd-tmpfiles >/dev/null 2>&1; then
    systemd-tmpfiles --create /usr/lib/tmpfiles.d/butterfly.conf
else
    # As butterfly.tmpfiles says: /var/butterfly is left as it is when it exists.
    [ -d /var/butterfly ] || install -d -m 0755 /var/butterfly
    install -d -m 0750 -o butterfly -g butterfly /var/lib/butterfly /var/butterfly/models \
        /var/log/butterfly
fi

# The cluster secret: 32 random bytes as 64 hex digits. Never overwritten: every node of a cluster
# must hold the same one, so an operator replaces it with the cluster's and upgrades keep it.
# Written under a temporary name and renamed, so it is never visible with wider permissions or
# half-written.
key=/etc/butterfly/cluster.key
if [ ! -e "$key" ]; then
    tmp=$(umask 077 && mktemp /etc/butterfly/.cluster.key.XXXXXX)
    od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$tmp"
    echo >>"$tmp"
    chown root:butterfly "$tmp"
    chmod 0640 "$tmp"
    mv "$tmp" "$key"
fi

# Only a running systemd can be told anything (not in a chroot, an image build or a container
# without systemd). The unit is not enabled or started on a first install: the node needs its
# model (and peers) in node.toml first. An upgrade restarts nodes that were running, so they run
# the new code.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    if [ -n "$upgrade" ]; then
        systemctl try-restart butterfly-node.service 'butterfly-node@*.service' || true
    fi
fi
exit 0
