"""The dominator daemon: the herd, the deploy engine, the admin gRPC API (service.py)
and the HTTP side (http/), started and stopped together by daemon.py."""
