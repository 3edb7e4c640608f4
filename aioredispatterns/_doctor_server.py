"""The doctor's server checks: persistence, memory, replication, clients and commands.

Each check reads what one server says about itself (``INFO``, ``CONFIG GET *``,
``SLOWLOG GET``, ``CLIENT LIST``) and judges it against the role the server plays, as the
seed does: a cache may run without persistence and should evict; queues, streams and
locks need AOF, replicas and a policy that never evicts. Nothing here writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._doctor_model import Finding, NodeProbe, Role, Severity, plural, text

__all__ = ("ServerFacts", "check_server", "read_facts")

_DURABLE: frozenset[str] = frozenset({"queue", "lock", "streams", "mixed"})

# What a role loses when the server forgets its writes.
_LOSES = {
    "cache": "cache entries (the cache refills from the source of truth)",
    "queue": "every queued and in-flight job",
    "lock": "every lock (one still held is handed out again) and the fencing counters "
    "(tokens start over, so a stale holder's writes look new)",
    "streams": "stream entries and the consumer groups' positions and pending entries",
    "mixed": "queued jobs, stream entries, locks and fencing counters",
}

# Commands whose cost grows with the size of the key (or of the keyspace) they touch.
_LINEAR = frozenset(
    {
        "smembers", "hgetall", "hkeys", "hvals", "lrange", "lrem", "lpos", "ltrim",
        "zrange", "zrevrange", "zrangebyscore", "zrevrangebyscore", "zrangebylex",
        "zrevrangebylex", "zrangestore", "zremrangebyscore", "zremrangebyrank",
        "zunion", "zinter", "zdiff", "zunionstore", "zinterstore", "zdiffstore",
        "sunion", "sinter", "sdiff", "sunionstore", "sinterstore", "sdiffstore",
        "sintercard", "sort", "sort_ro", "xrange", "xrevrange", "georadius",
        "georadiusbymember", "geosearch", "geosearchstore",
    }
)  # fmt: skip
_FLUSH = ("flushall", "flushdb")
# A linear command is reported when one call takes this long on average.
_SLOW_MEAN_USEC = 1000.0
_SLOWLOG_ENTRIES = 128
_EXAMPLES = 5


@dataclass(slots=True)
class ServerFacts:
    """What one server said about itself (None where the command was refused)."""

    info: Mapping[str, Any] | None = None
    config: dict[str, str] | None = None
    slowlog: list[tuple[str, str, int]] | None = None  # (command, key, microseconds)
    clients: list[dict[str, str]] | None = None
    notes: list[str] = field(default_factory=list)


def _config(reply: Any) -> dict[str, str] | None:
    if reply is None:
        return None
    if isinstance(reply, Mapping):  # RESP3: a map
        return {text(k): text(v) for k, v in reply.items()}
    items = list(reply)
    return {text(items[i]): text(items[i + 1]) for i in range(0, len(items) - 1, 2)}


def _slowlog(reply: Any) -> list[tuple[str, str, int]] | None:
    if reply is None:
        return None
    entries = []
    for item in reply:
        # [id, time, microseconds, [args], client address, client name]; Redis
        # Enterprise puts a complexity hint before the arguments.
        args = item[3] if isinstance(item[3], list | tuple) else item[4]
        words = [text(arg) for arg in args]
        if not words:
            continue
        key = words[1] if len(words) > 1 else ""
        entries.append((words[0].lower(), key[:200], int(item[2])))
    return entries


def _clients(reply: Any) -> list[dict[str, str]] | None:
    if reply is None:
        return None
    clients = []
    for line in text(reply).splitlines():
        fields = dict(part.split("=", 1) for part in line.split(" ") if "=" in part)
        if fields:
            clients.append(fields)
    return clients


async def read_facts(probe: NodeProbe) -> ServerFacts:
    """Ask one server for everything the server checks need (four commands)."""
    info = await probe.ask("INFO", "all")
    return ServerFacts(
        info=info if isinstance(info, Mapping) else None,
        config=_config(await probe.ask("CONFIG GET", "*")),
        slowlog=_slowlog(await probe.ask("SLOWLOG GET", _SLOWLOG_ENTRIES)),
        clients=_clients(await probe.ask("CLIENT LIST")),
    )


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(float(text(value)))
    except (TypeError, ValueError):
        return default


def _mib(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    return f"{n / (1 << 20):.1f} MiB"


class _Checks:
    def __init__(self, facts: ServerFacts, role: Role, node: str | None, idle_seconds: float):
        self.facts = facts
        self.role = role
        self.node = node
        self.idle_seconds = idle_seconds
        self.found: list[Finding] = []

    def add(
        self, check: str, severity: Severity, summary: str, why: str, fix: str, **kw: Any
    ) -> None:
        self.found.append(Finding(check, severity, summary, why, fix, node=self.node, **kw))

    # ------------------------------------------------------------ persistence

    def persistence(self) -> None:
        config, info = self.facts.config, self.facts.info
        if config is None:
            return
        aof = config.get("appendonly") == "yes"
        fsync = config.get("appendfsync", "everysec")
        save = config.get("save", "").strip()
        if info is not None:
            if aof and text(info.get("aof_last_write_status", "ok")) != "ok":
                self.add(
                    "persistence.failing", Severity.ERROR,
                    "the last AOF write failed",
                    "writes are acknowledged but not on disk; a restart loses them",
                    "see the server's log (disk full? permissions?) and fix the disk",
                )  # fmt: skip
            if save and text(info.get("rdb_last_bgsave_status", "ok")) != "ok":
                self.add(
                    "persistence.failing", Severity.ERROR,
                    "the last RDB snapshot failed",
                    "the snapshot on disk is older than it should be; with "
                    "stop-writes-on-bgsave-error the server refuses writes",
                    "see the server's log (disk full? fork failed for lack of memory?)",
                )  # fmt: skip
        if self.role not in _DURABLE:
            return
        loses = _LOSES[self.role]
        fix = (
            "CONFIG SET appendonly yes and CONFIG SET appendfsync everysec (and the same "
            "in the config file, or CONFIG REWRITE), with at least one replica"
        )
        if not aof and not save:
            self.add(
                "persistence", Severity.ERROR,
                f"persistence is off (no RDB snapshots, AOF off) on a {self.role} server",
                f"a restart or crash loses {loses}; a cache may run like this, a "
                f"{self.role} may not",
                fix,
            )  # fmt: skip
        elif not aof:
            self.add(
                "persistence", Severity.WARNING,
                f"RDB snapshots only (save {save!r}), no AOF, on a {self.role} server",
                f"a crash loses every write since the last snapshot (minutes of them): "
                f"{loses}",
                fix,
            )  # fmt: skip
        elif fsync == "no":
            self.add(
                "persistence", Severity.WARNING,
                "AOF with appendfsync no on a " + self.role + " server",
                "the OS flushes the log when it likes (about every 30 s): a crash of "
                f"the machine loses that much of {loses}",
                "CONFIG SET appendfsync everysec (at most a second lost; 'always' loses "
                "nothing and costs throughput)",
            )  # fmt: skip

    # ------------------------------------------------------------ memory

    def memory(self) -> None:
        info, config = self.facts.info, self.facts.config
        if info is not None and "maxmemory" in info:
            limit = _int(info.get("maxmemory"))
            policy = text(info.get("maxmemory_policy", "noeviction"))
        elif config is not None:
            limit = _int(config.get("maxmemory"))
            policy = config.get("maxmemory-policy", "noeviction")
        else:
            return
        used = _int(info.get("used_memory")) if info is not None else 0
        evicted = _int(info.get("evicted_keys")) if info is not None else 0
        evicting = policy != "noeviction"
        if self.role == "cache":
            if limit == 0:
                self.add(
                    "memory.limit", Severity.WARNING,
                    f"no maxmemory on a cache ({_mib(used)} used)",
                    "a cache grows until the machine runs out of memory and the OS kills "
                    "the server; nothing is ever evicted",
                    "CONFIG SET maxmemory <bytes> (below the machine's memory, leaving "
                    "room for forks) and maxmemory-policy allkeys-lru (or allkeys-lfu)",
                )  # fmt: skip
            elif not evicting:
                self.add(
                    "memory.policy", Severity.WARNING,
                    "maxmemory-policy noeviction on a cache",
                    "once the cache is full every write fails with OOM instead of "
                    "evicting an old entry",
                    "CONFIG SET maxmemory-policy allkeys-lru (or allkeys-lfu)",
                )  # fmt: skip
            return
        if limit and not evicting and used >= 0.9 * limit:
            self.add(
                "memory.full", Severity.WARNING,
                f"memory at {used / limit:.0%} of maxmemory ({_mib(used)} of {_mib(limit)})",
                "with noeviction, writes fail with OOM once the limit is reached",
                "raise maxmemory, trim retention (streams, dead letters), or add shards",
            )  # fmt: skip
        drops_locks = self.role in ("lock", "mixed") and policy.startswith("volatile-")
        if policy.startswith("allkeys-") or drops_locks:
            severity = Severity.ERROR if limit else Severity.WARNING
            what = {
                "queue": "queue jobs",
                "streams": "stream entries and consumer groups",
                "lock": "locks (a held lock vanishes and is handed out again)",
                "mixed": "locks, queue jobs and stream entries",
            }[self.role]
            when = (
                f"once memory reaches {_mib(limit)}" if limit else "as soon as a maxmemory is set"
            )
            evicted_text = f"; {plural(evicted, 'key')} evicted already" if evicted else ""
            self.add(
                "memory.policy", severity,
                f"maxmemory-policy {policy} on a {self.role} server{evicted_text}",
                f"an evicting policy silently drops {what} {when}",
                "CONFIG SET maxmemory-policy noeviction (writes then fail loudly when "
                "full); keep caches on a server of their own",
                count=evicted or None,
            )  # fmt: skip

    # ------------------------------------------------------------ replication

    def replication(self) -> None:
        info, config = self.facts.info, self.facts.config
        if info is None:
            return
        if text(info.get("role", "master")) != "master":
            self.add(
                "replication.replica", Severity.INFO,
                "this server is a replica",
                "its primary's settings decide what is kept; writes go there",
                "run the doctor against the primary as well",
            )  # fmt: skip
            return
        if self.role not in _DURABLE:
            return
        replicas = _int(info.get("connected_slaves"))
        if replicas == 0:
            self.add(
                "replication.none", Severity.WARNING,
                f"no replica on a {self.role} server",
                f"the server is a single point of failure: losing its disk loses "
                f"{_LOSES[self.role]}, and nothing takes over while it is down",
                "add a replica (replicaof <primary>) and a failover (Sentinel, a managed "
                "service, or Redis Cluster with replicas)",
            )  # fmt: skip
            return
        if config is not None and _int(config.get("min-replicas-to-write")) == 0:
            self.add(
                "replication.min_replicas",
                Severity.WARNING if self.role in ("lock", "mixed") else Severity.INFO,
                f"{plural(replicas, 'replica')} but min-replicas-to-write 0",
                "a write acknowledged by the primary alone is lost if it fails over "
                "before the write reaches a replica (for locks: two holders at once)",
                "CONFIG SET min-replicas-to-write 1 and min-replicas-max-lag 10 (writes "
                "then fail while no replica is in sync)",
                count=replicas,
            )  # fmt: skip

    # ------------------------------------------------------------ clients

    def clients(self) -> None:
        info, config = self.facts.info, self.facts.config
        if info is not None:
            connected = _int(info.get("connected_clients"))
            limit = _int(info.get("maxclients"))
            blocked = _int(info.get("blocked_clients"))
            if limit and connected >= 0.8 * limit:
                self.add(
                    "clients.capacity",
                    Severity.ERROR if connected >= 0.95 * limit else Severity.WARNING,
                    f"{connected} of maxclients {limit} connections in use "
                    f"({blocked} blocked)",
                    "past maxclients new connections are refused: workers and web "
                    "processes fail to start or reconnect",
                    "shrink the pools (max_connections x processes), share one client per "
                    "process, or raise maxclients (and the file-descriptor limit)",
                    count=connected,
                )  # fmt: skip
            rejected = _int(info.get("rejected_connections"))
            if rejected:
                self.add(
                    "clients.rejected", Severity.ERROR,
                    f"{plural(rejected, 'connection')} rejected (maxclients {limit} reached)",
                    "clients were turned away: each of them saw a connection error",
                    "shrink the pools or raise maxclients; CONFIG RESETSTAT after the fix "
                    "to count afresh",
                    count=rejected,
                )  # fmt: skip
            if blocked:
                self.add(
                    "clients.blocked", Severity.INFO,
                    f"{plural(blocked, 'client')} blocked (BLPOP, XREADGROUP BLOCK, WAIT ...)",
                    "each blocked consumer holds a connection of its pool for the whole "
                    "wait; a pool sized for short commands only runs dry",
                    "size pools for the blocking consumers plus the rest",
                    count=blocked,
                )  # fmt: skip
            if "client_output_buffer_limit_disconnections" in info:
                dropped = _int(info.get("client_output_buffer_limit_disconnections"))
                if dropped:
                    limits = config.get("client-output-buffer-limit", "") if config else ""
                    pubsub = limits.split("pubsub", 1)[1].strip() if "pubsub" in limits else ""
                    self.add(
                        "clients.output_buffer", Severity.WARNING,
                        f"{plural(dropped, 'client')} disconnected by client-output-buffer-limit"
                        + (f" (pubsub {pubsub})" if pubsub else ""),
                        "a subscriber (or replica) that reads slower than messages arrive "
                        "is cut off, and it misses everything published until it is back",
                        "make subscribers drain their socket (a buffer that drops by "
                        "policy, as subscribe() does) or raise the pubsub limit; move "
                        "must-not-lose traffic to streams",
                        count=dropped,
                    )  # fmt: skip
            else:
                self.facts.notes.append(
                    "this server does not count output-buffer disconnections (Redis < 7)"
                )
        self.idle_clients()

    def idle_clients(self) -> None:
        clients = self.facts.clients
        if clients is None:
            return
        plain = [
            c
            for c in clients
            # Replicas, a primary's link, subscribers, monitors and blocked clients are
            # idle by nature.
            if not set(c.get("flags", "")) & set("SMPOb")
            and _int(c.get("sub")) + _int(c.get("psub")) + _int(c.get("ssub")) == 0
        ]
        idle = [c for c in plain if _int(c.get("idle")) >= self.idle_seconds]
        if len(idle) >= 5 and len(idle) >= len(plain) / 2:
            shown = sorted(idle, key=lambda c: -_int(c.get("idle")))[:_EXAMPLES]
            self.add(
                "clients.idle", Severity.WARNING,
                f"{len(idle)} of {plural(len(plain), 'connection')} idle for "
                f"{self.idle_seconds:g} s or more",
                "connections opened and never used: a pool far bigger than the traffic, "
                "or clients that are created per request and never closed (a leak that "
                "ends at maxclients)",
                "share one client per process and close it on shutdown (aclose()), lower "
                "max_connections, or let the server close idle ones (CONFIG SET timeout "
                "300)",
                count=len(idle),
                examples=tuple(
                    f"{c.get('addr', '?')} idle {c.get('idle', '?')} s"
                    + (f" ({c['name']})" if c.get("name") else "")
                    for c in shown
                ),
            )  # fmt: skip

    # ------------------------------------------------------------ commands

    def commands(self) -> None:
        info, slowlog = self.facts.info, self.facts.slowlog
        stats: dict[str, tuple[int, float]] = {}
        if info is not None:
            for name, value in info.items():
                if name.startswith("cmdstat_") and isinstance(value, Mapping):
                    stats[name[8:].lower()] = (
                        _int(value.get("calls")),
                        float(value.get("usec_per_call", 0.0)),
                    )
        slow: dict[str, list[tuple[str, int]]] = {}
        for command, key, usec in slowlog or ():
            slow.setdefault(command, []).append((key, usec))

        def examples(command: str) -> tuple[str, ...]:
            entries = sorted(slow.get(command, []), key=lambda e: -e[1])[:_EXAMPLES]
            return tuple(f"{command.upper()} {key} ({usec / 1000:.1f} ms)" for key, usec in entries)

        keys_calls = stats.get("keys", (0, 0.0))[0] or len(slow.get("keys", []))
        if keys_calls:
            self.add(
                "commands.keys", Severity.ERROR,
                f"KEYS ran {plural(keys_calls, 'time')}",
                "KEYS walks the whole keyspace in one step: the server answers nobody "
                "else until it is done (seconds on millions of keys)",
                "use SCAN with MATCH and COUNT (redis-py's scan_iter); forbid KEYS to the "
                "application's ACL user (-keys) or rename it",
                count=keys_calls,
                examples=examples("keys"),
            )  # fmt: skip
        flushes = {name: stats.get(name, (0, 0.0))[0] for name in _FLUSH}
        if any(flushes.values()):
            done = ", ".join(f"{name.upper()} x{n}" for name, n in flushes.items() if n)
            self.add(
                "commands.flush", Severity.WARNING,
                f"the server was flushed ({done})",
                "FLUSHALL / FLUSHDB delete everything (and block while they do, unless "
                "ASYNC); one run by mistake on a production server is an outage",
                "forbid them to application users (ACL -flushall -flushdb, or "
                "-@dangerous) and rename them on production servers",
                count=sum(flushes.values()),
            )  # fmt: skip
        for command in sorted(_LINEAR):
            calls, mean = stats.get(command, (0, 0.0))
            logged = slow.get(command, [])
            if not logged and not (calls and mean >= _SLOW_MEAN_USEC):
                continue
            parts = []
            if calls:
                parts.append(f"{plural(calls, 'call')}, {mean / 1000:.1f} ms each on average")
            if logged:
                parts.append(f"{len(logged)} in SLOWLOG")
            self.add(
                "commands.linear", Severity.WARNING,
                f"{command.upper()} is slow: " + "; ".join(parts),
                f"{command.upper()} costs time in proportion to the key it reads; on a "
                "big key one call blocks every other client meanwhile",
                "read big keys in pages (SSCAN / HSCAN / ZSCAN, LRANGE or ZRANGE with a "
                "small range) or split them; see the big-key findings",
                count=calls or len(logged),
                examples=examples(command),
            )  # fmt: skip


def check_server(
    facts: ServerFacts, role: Role, node: str | None, *, idle_seconds: float
) -> list[Finding]:
    """Every server check on ``facts``; nothing is sent."""
    checks = _Checks(facts, role, node, idle_seconds)
    checks.persistence()
    checks.memory()
    checks.replication()
    checks.clients()
    checks.commands()
    return checks.found
