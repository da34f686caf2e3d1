"""MLflow: a local tracking server, tracked discovery runs, banks as registered models."""
