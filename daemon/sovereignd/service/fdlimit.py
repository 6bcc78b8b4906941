"""The daemon's file-descriptor budget: raise the soft limit to the hard one at start, and
divide what there is between client connections and supervision.

Service managers start daemons with small soft limits (systemd: 1024 soft, since v240 a hard
limit of 524288 — systemd.exec(5) `LimitNOFILE=`; launchd: 256 soft — launchd.plist(5)
`SoftResourceLimits`), and a process may raise its soft limit up to its hard limit
(setrlimit(2)). macOS refuses values above OPEN_MAX (10240, <sys/syslimits.h>) for
RLIMIT_NOFILE, whatever the hard limit says (Python `resource` docs).
"""

from __future__ import annotations

import resource
import sys

OPEN_MAX_DARWIN = 10240
# Each proxied request holds two descriptors (client and server connection).
FDS_PER_CONNECTION = 2
MIN_CONNECTIONS = 16


def raise_nofile() -> tuple[int, int, int]:
    """Raise RLIMIT_NOFILE's soft limit as far as allowed; (soft before, soft now, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if sys.platform == "darwin" and (hard == resource.RLIM_INFINITY or hard > OPEN_MAX_DARWIN):
        target = OPEN_MAX_DARWIN
    if target == resource.RLIM_INFINITY:
        target = 1 << 20
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            target = soft
    return soft, max(soft, target), hard


def connection_budget(soft: int, reserve: int, configured: int) -> int:
    """Client connections the gateway may hold: the configured cap, lowered so that they (and
    their upstream connections) leave `reserve` descriptors for supervision."""
    return max(MIN_CONNECTIONS, min(configured, (soft - reserve) // FDS_PER_CONNECTION))
