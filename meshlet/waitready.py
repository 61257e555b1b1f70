"""``meshlet wait-ready``: wait until the sidecar beside this app is ready (``/readyz`` answers
200: its listeners are up and it has a routing table), then exit 0.

For clusters without native sidecars (Kubernetes before 1.29), where the app's container may
start before the sidecar's: run it first in the app's command (``meshlet wait-ready && exec
app``) or as the sidecar container's ``postStart`` hook, as Istio's
``holdApplicationUntilProxyStarts`` does. A native sidecar needs none of it: its startup probe
holds the app back.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from urllib.parse import urlsplit

DEFAULT_URL = "http://127.0.0.1:15020/readyz"


def ready(opener: urllib.request.OpenerDirector, url: str, timeout: float) -> tuple[bool, str]:
    """One look: ready or not, and what was seen."""
    try:
        with opener.open(url, timeout=timeout) as r:
            return r.status == 200, f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return False, f"HTTP {e.code}"
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        return False, str(reason)


def main(argv: Sequence[str], prog: str = "meshlet wait-ready") -> int:
    p = argparse.ArgumentParser(
        prog=prog, description="Wait until the sidecar beside this app is ready, then exit 0."
    )
    p.add_argument("--url", default=DEFAULT_URL, help="the sidecar's readiness (%(default)s)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (%(default)s)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between looks")
    args = p.parse_args(argv)
    if urlsplit(args.url).scheme not in ("http", "https") or not urlsplit(args.url).hostname:
        print(f"{prog}: error: --url: {args.url[:200]!r} is not an http:// URL", file=sys.stderr)
        return 2
    if args.timeout <= 0 or args.interval <= 0:
        print(f"{prog}: error: --timeout and --interval must be more than 0", file=sys.stderr)
        return 2
    # (HTTP_PROXY may be set for the app: the sidecar beside it is reached directly)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + args.timeout
    while True:
        ok, seen = ready(opener, args.url, min(args.interval * 4, 5.0))
        if ok:
            return 0
        if time.monotonic() + args.interval > deadline:
            print(
                f"{prog}: the sidecar was not ready within {args.timeout:g} s ({args.url}: {seen})",
                file=sys.stderr,
            )
            return 1
        time.sleep(args.interval)
