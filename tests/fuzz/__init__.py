"""Property-based tests of the HTTP API against its own OpenAPI document."""
