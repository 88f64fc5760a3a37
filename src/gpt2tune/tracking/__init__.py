"""Tracking in MLflow: runs, the offline journal, the sample table."""
