"""`minikv serve`: an OpenAI-compatible HTTP server over one Engine (FastAPI + uvicorn).

- app.py: the FastAPI app (endpoints, error handlers); `create_app(engine, model_name=...)`;
- engine_loop.py: the one thread that owns the Engine, and the queues requests cross to reach it;
- protocol.py: the request bodies (OpenAI's fields, vLLM's extensions, minikv's kv_budget);
- serving.py: outputs into OpenAI's response and stream-chunk shapes, usage with KV accounting;
- metrics.py: the Prometheus registry behind /metrics;
- errors.py: errors in OpenAI's shape; cli.py: the `minikv serve` command; loadgen.py: `minikv bench --url`.

Needs the `serve` extra (`pip install -e ".[serve]"`): fastapi, uvicorn, prometheus-client, httpx.
"""
