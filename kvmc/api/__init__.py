"""``kvmc serve``: a Docker Engine API (1.50) front end, so docker's own clients drive kvmc.

- ``http``      - aiohttp plumbing: version prefix, headers, JSON errors, hijacked attach/exec
                  streams, listeners (unix socket, loopback TCP) and graceful stop
- ``translate`` - pure functions from Docker's request JSON and query strings to kvmc's terms
- ``shapes``    - pure functions from kvmc's records to the JSON docker's clients read

The routes themselves (which call kvmc's service layer) live elsewhere; these modules hold
no state and do no container work, so they can be tested without VMs.
"""

API_VERSION = "1.50"
"""The Docker Engine API version served (docker CLI 28.2's own)."""
MIN_API_VERSION = "1.24"
ENGINE_VERSION = "28.2.2"
"""The Docker Engine release whose API kvmc speaks (what ``/version`` and ``Server:`` report)."""
