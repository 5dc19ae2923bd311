"""`itscale serve`: an OpenAI-compatible inference-time-scaling server.

    requests.py   a request body → a checked `SearchRequest` (every bad field is a 400)
    app.py        the FastAPI app: endpoints, admission (concurrency, queue), cancellation,
                  streaming, responses in OpenAI's shapes, errors, request ids
    metrics.py    Prometheus counters and gauges
    commands.py   `itscale serve`: flags, the engine, uvicorn, graceful shutdown

One engine serves every client: concurrent searches share its decode rounds (the embedded
engine batches all callers), or one HTTP client in front of any OpenAI-compatible server.
"""
