"""The image's HEALTHCHECK: exit 0 when GET /healthz answers 200, else 1 (stdlib only: no curl in
the slim base image)."""

import os
import sys
import urllib.request

url = f"http://127.0.0.1:{os.environ.get('DYNABERT_PORT', '8000')}/healthz"
try:
    with urllib.request.urlopen(url, timeout=float(os.environ.get("DYNABERT_HEALTHCHECK_TIMEOUT", "3"))) as r:
        sys.exit(0 if r.status == 200 else 1)
except OSError as e:
    print(f"healthcheck {url}: {e}", file=sys.stderr)
    sys.exit(1)
