"""The dominator's HTTP side: the deploy stage API under /v1, the dashboard and
/metrics, each a router over one HttpContext (context.py), mounted by app.py."""
