"""Training entry points (adapters, router). Nothing in the library imports this package."""
