"""The built-in scenarios: one module per primitive, each with ``scenarios(env)``.

Modules whose name starts with an underscore are helpers, not scenario files.
"""
