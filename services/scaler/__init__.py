"""services.scaler: sizes the worker Deployment (and per-job pools) to the work, through the Kubernetes API."""
