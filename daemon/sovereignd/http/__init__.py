"""HTTP/1.1 to the model server, for the gateway's traffic and the supervisor's probes alike:
upstream (pool, deadlines, backpressure, requests), parser (response framing by llhttp),
errors (what can go wrong)."""
