#!/bin/sh
# Pre-removal for the .deb (prerm: "remove", "upgrade", "deconfigure", "failed-upgrade") and the
# .rpm (%preun: 0 = erase, 1 = upgrade). Stops the nodes before their files go away; an upgrade
# leaves them running and the new package's scripts restart them.
# POSIX sh: dpkg and rpm run these with /bin/sh, which has no pipefail here (dash).
set -eu

case "$1" in
    remove|deconfigure) erase=deb ;;
    0) erase=rpm ;;
    *) exit 0 ;;
esac

if [ -d /run/systemd/system ]; then
    systemctl stop butterfly-node.service 'butterfly-node@*.service' || true
fi
# RPM's convention (%systemd_preun): erasing a package disables its units. Debian keeps the
# enablement on "remove" (like the configuration) and drops it on "purge" (postrm).
if [ "$erase" = rpm ] && command -v systemctl >/dev/null 2>&1; then
    systemctl --no-reload disable butterfly-node.service >/dev/null 2>&1 || true
fi
exit 0
