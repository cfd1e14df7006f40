"""The engine room: Celery tasks, the call pipeline, provider adapters, policy and costing."""
