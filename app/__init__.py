"""SLIDE HTTP service: FastAPI over background trainer processes (see app.main)."""
