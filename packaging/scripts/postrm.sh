#!/bin/sh
# Post-removal for the .deb (postrm: "remove", "purge", "upgrade", "abort-*", ...) and the .rpm
# (%postun: 0 = erase, 1 = upgrade).
#   deb remove / rpm erase: the program goes; configuration, the cluster secret, Raft state, the
#     weight cache, logs and the butterfly account stay (a reinstall picks them up again).
#   deb purge: configuration, secret, state, cache and logs are deleted too. The account stays,
#     as Debian packages do: files on other mounts may still belong to it.
# POSIX sh: dpkg and rpm run these with /bin/sh, which has no pipefail here (dash).
set -eu

case "$1" in
    purge)
        # /var/cache/butterfly: where earlier packages kept the weight cache. /var/butterfly goes
        # only if nothing but the cache was in it.
        rm -rf /etc/butterfly /var/lib/butterfly /var/butterfly/models /var/cache/butterfly \
            /var/log/butterfly
        rmdir /var/butterfly 2>/dev/null || true
        # Enablement symlinks of the unit and of any template instances.
        for link in /etc/systemd/system/*.wants/butterfly-node.service \
                    /etc/systemd/system/*.wants/butterfly-node@*.service; do
            if [ -L "$link" ]; then rm -f "$link"; fi
        done
        ;;
esac

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    # rpm upgrade: this runs after the old package's files are gone, so a restart now runs
    # exactly the new files.
    if [ "$1" = 1 ]; then
        systemctl try-restart butterfly-node.service 'butterfly-node@*.service' || true
    fi
fi
exit 0
