"""The Python client of the Soft Specialists gateway."""
