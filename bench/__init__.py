"""The throughput, latency and efficiency benchmark of cio-worker (``make bench``).

Nothing in the worker imports this package; it runs only from a source tree.
"""
