"""Throwaway fixtures for demos and tests: nothing here is used on the sidecar's serving path."""
