"""Test configuration: real throwaway servers from aioredispatterns.testing."""

pytest_plugins = ["aioredispatterns.testing"]
