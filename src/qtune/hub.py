"""Whether the Hugging Face hub can be reached, asked once and quickly.

Without network the hub clients (huggingface_hub for models, datasets for hub datasets) retry with
backoff for up to a minute and then print a long error; model loading and the data readers probe
first and fail in seconds saying what to do.
"""

from __future__ import annotations

import socket

HUB_PROBE_TIMEOUT_S = 3.0  # a reachable hub answers a TCP connect in well under a second


def hub_reachable(endpoint: str) -> bool:
    """Whether a TCP connection to the hub (or the proxy the hub client would use) opens within
    HUB_PROBE_TIMEOUT_S: one quick probe instead of the client's retries with backoff."""
    import urllib.parse
    import urllib.request

    url = urllib.parse.urlsplit(endpoint)
    if not url.hostname:
        return True  # not a URL we can probe: leave the answer to the hub client
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname):
        url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:  # refused, unreachable, no DNS, timed out
        return False
