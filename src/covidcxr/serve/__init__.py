"""The second-opinion web service: REST API (``/api/v1``) and web pages (FastAPI)."""
