"""The plumbing: settings, the deployments/routes config, and the one Celery app."""
