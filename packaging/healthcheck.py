"""The image's HEALTHCHECK: the server's own /health on the container's loopback, 200 once the
model is loaded and warm. Over TLS when EDGE_LLM_TLS_CERT turns it on, without verifying the
certificate: it names the board, not 127.0.0.1, and this checks liveness, not trust. A server
that requires client certificates (EDGE_LLM_TLS_CLIENT_CA) cannot pass it: run that container
with --no-healthcheck."""

import os
import ssl
import urllib.request

url, context = "http://127.0.0.1:8080/health", None
if os.environ.get("EDGE_LLM_TLS_CERT"):
    url, context = "https://127.0.0.1:8080/health", ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
urllib.request.urlopen(url, timeout=4, context=context)
