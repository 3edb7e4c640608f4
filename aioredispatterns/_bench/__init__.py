"""The benchmark runner behind ``python -m aioredispatterns bench`` (private).

Scenario files define ``scenarios(env: BenchEnv) -> list[Scenario]``; the built-in ones
are the modules of :mod:`aioredispatterns._bench.scenarios`, and ``--scenarios DIR`` runs
the files of a directory of your own instead (see ``benchmarks/README.md``). Modules:

- :mod:`.scenario`: ``Scenario``, ``BenchEnv``, ``Measured``, what scenario files use;
- :mod:`.loader`: where scenarios come from, ``--only`` / ``--concurrency``, grouping;
- :mod:`.plan`: the time budget (``--duration`` is the whole run's wall time);
- :mod:`.measure`: one slice of one row (warm-up, window, grace);
- :mod:`.noise`: competitors' warnings, logs and task errors, counted;
- :mod:`.runner`: rounds, rotation, the reports; :mod:`.report`, :mod:`.plot`.
"""

from .scenario import BenchEnv, Measured, Operation, Scenario

__all__ = ("BenchEnv", "Measured", "Operation", "Scenario")
