"""Services: dataset store, job runner and supervisor, model registry. No HTTP here."""
