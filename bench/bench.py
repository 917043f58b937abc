#!/usr/bin/env python3
"""Benchmark of odin_gateway.py: prints figures, asserts nothing.

    python bench/bench.py            # the full run (about two minutes)
    python bench/bench.py --quick    # a smoke run of every part (seconds)

On one machine it:
1. measures the Ed25519 verify+sign ceiling of one core with PyNaCl (what
   one Connect must at least cost), and the round trip of a trivial asyncio
   server on that core (what any asyncio server costs);
2. starts the gateway pinned to core 0 and drives Connect with keep-alive at
   1, 16, 64 and 256 connections from core 1, with wrk if it is installed
   (a Lua script rotates 1,000 distinct client tokens) or else with a load
   generator of its own, and prints Connect/s, p50 and p99, and the ratio
   to the ceiling; the first connections of a fresh process are timed apart
   (cold) from later ones (warm);
3. times sfu.Report with 1,000 and 10,000 rooms, the maintenance tick with
   100,000 rooms, and Connect with 10 to 1,000,000 rooms mapped; measures
   memory per room;
4. simulates placement: 100 new rooms between two reports on 10 servers,
   equal and uneven loads, for both placement rules;
5. with redis-server installed (and redis-py), the cluster: Connect/s at 64
   connections of one process alone against one process in cluster mode
   (gateway on core 0, load generator and redis-server on core 1), of
   --workers 2 against --workers 1 (both unpinned, the load generator and
   redis-server on the same two cores), the time a report takes to reach
   another gateway (p50/p99), and the time a gateway that starts needs to
   be ready with 10,000 rooms in the cluster.

    python bench/bench.py --cluster-only   # just part 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import odin_gateway as og  # noqa: E402

ACCESS_KEY = og.generate_access_key()
CUSTOMER = {"id": "bench", "max_peers": None, "max_rooms": None,
            "access_keys": [{"public_key": og.public_jwk(ACCESS_KEY)}]}
SERVER_CORE, CLIENT_CORE = 0, 1


def pin(core):
    if hasattr(os, "sched_setaffinity") and core < os.cpu_count():
        os.sched_setaffinity(0, {core})


def crypto_ceiling(seconds):
    """Ed25519 verify + sign per second on one core, as one Connect needs them."""
    token = og.create_token(ACCESS_KEY, "lobby", "alice", lifetime=3600)
    head, claims, signature = token.split(".")
    message, sig = (head + "." + claims).encode(), og.b64url_decode(signature)
    verify_key = og.VerifyKey("k", og.b64url_decode(og.public_jwk(ACCESS_KEY)["x"]))
    server_key = og.derive_server_key(b"master", "sfu:4433")
    room_claims = og.b64url_encode(json.dumps({"uid": "alice", "cid": "bench", "rid": "lobby",
                                               "nsp": "bench", "adr": "sfu:4433"}).encode())
    signing_input = (server_key.jwt_header + "." + room_claims).encode()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(100):
            verify_key.verify(message, sig)
            server_key.sign(signing_input)
        count += 100
    return count / (time.perf_counter() - started)


# -- load generation --------------------------------------------------------


def make_tokens(count):
    return [og.create_token(ACCESS_KEY, "room-%d" % (i % 500), "user-%d" % i, lifetime=3600)
            for i in range(count)]


def wrk_script(path, tokens):
    with open(path, "w") as script:
        script.write("local tokens = {%s}\n" % ",".join('"%s"' % t for t in tokens))
        script.write('local body = \'{"jsonrpc":"2.0","method":"Connect","params":{},"id":1}\'\n'
                     "local i = 0\n"
                     "request = function()\n"
                     "  i = i + 1\n"
                     '  return wrk.format("POST", "/", {["Authorization"] = "Bearer " .. '
                     'tokens[(i % #tokens) + 1], ["Content-Type"] = "application/json"}, body)\n'
                     "end\n")


def run_wrk(port, connections, seconds, script):
    out = subprocess.run(
        ["taskset", "-c", str(CLIENT_CORE), "wrk", "-t1", "-c%d" % connections, "-d%ds" % seconds,
         "--latency", "-s", script, "http://127.0.0.1:%d/" % port],
        capture_output=True, text=True, check=True).stdout
    rate = float(out.split("Requests/sec:")[1].split()[0])

    def percentile(label):
        # The "Latency Distribution" lines, e.g. "     50%  401.00us"; a stdev
        # figure elsewhere may also end in "50%".
        value = re.search(r"^\s*%s\s+(\S+)" % re.escape(label), out, re.MULTILINE).group(1)
        for unit, factor in (("us", 1e-3), ("ms", 1.0), ("s", 1000.0)):
            if value.endswith(unit):
                return float(value[:-len(unit)]) * factor
        return float(value)
    errors = "Non-2xx" in out or "Socket errors" in out or "unexpected symbol" in out
    return rate, percentile("50%"), percentile("99%"), errors


async def _own_client(port, connections, seconds, tokens):
    """A keep-alive load generator: each connection sends a Connect, reads the answer."""
    latencies = []
    stop_at = time.perf_counter() + seconds

    async def one(index):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b'{"jsonrpc":"2.0","method":"Connect","params":{},"id":1}'
        n = index
        while time.perf_counter() < stop_at:
            token = tokens[n % len(tokens)]
            n += connections
            request = (b"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (token.encode(), len(body), body))
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(connections)))
    return latencies, time.perf_counter() - started


def run_own(port, connections, seconds, tokens):
    pin(CLIENT_CORE)
    latencies, elapsed = asyncio.run(_own_client(port, connections, seconds, tokens))
    latencies.sort()
    return (len(latencies) / elapsed, latencies[len(latencies) // 2] * 1000,
            latencies[int(len(latencies) * 0.99)] * 1000, False)


def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_gateway(tmp, settings="", pinned=True, port=None):
    config = os.path.join(tmp, "bench_config.py")
    with open(config, "w") as out:
        out.write("host = '127.0.0.1'\nport = %d\nlog_level = 'WARNING'\nlog_format = 'json'\n"
                  "customers = %r\n%s" % (port or 0, [CUSTOMER], settings))
    code = ("import os, sys; os.sched_setaffinity(0, {%d}) if %r and hasattr(os, 'sched_setaffinity') "
            "else None; sys.path.insert(0, %r); import odin_gateway; "
            "sys.exit(odin_gateway.main(['--config', %r]))" % (
                SERVER_CORE, pinned, os.path.dirname(HERE), config))
    process = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    # The gateway logs warnings only; ask the OS which port it bound.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if "pid=%d," % process.pid in line or (port and ":%d " % port in line):
                port = int(line.split()[3].rsplit(":", 1)[1])
                report = {"jsonrpc": "2.0", "method": "sfu.Report", "id": 1, "params": {
                    "public_endpoint": "sfu:4433", "version": "bench", "load": 0.1,
                    "clients": 0, "rooms": []}}
                og.RpcClient("http://127.0.0.1:%d/internal" % port).call("sfu.Report", report["params"])
                wait_ready(port)
                return process, port
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("the gateway did not start")


def wait_ready(port):
    """Until /ready answers 200 (in cluster mode: the state is loaded), as a load balancer waits."""
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with opener.open("http://127.0.0.1:%d/ready" % port, timeout=5):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    raise RuntimeError("the gateway did not get ready")


def keep_reporting(port, stop):
    client = og.RpcClient("http://127.0.0.1:%d/internal" % port)
    while not stop.wait(2):
        client.call("sfu.Report", {"public_endpoint": "sfu:4433", "version": "bench", "load": 0.1,
                                   "clients": 0, "rooms": []})


def trivial_server_round_trip(seconds, tokens, use_wrk, script):
    """p50 and rate of an asyncio streams server that answers '{}' (the floor)."""
    code = r'''
import asyncio, os, sys
if hasattr(os, "sched_setaffinity"): os.sched_setaffinity(0, {%d})
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
async def handle(r, w):
    try:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            n = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            await r.readexactly(n)
            w.write(RESP)
            await w.drain()
    except Exception:
        pass
    w.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
''' % SERVER_CORE
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        port = int(process.stdout.readline())
        generate = (lambda c: run_wrk(port, c, seconds, script)) if use_wrk else (
            lambda c: run_own(port, c, seconds, tokens))
        return generate(1), generate(64)
    finally:
        process.kill()
        process.wait()


# -- in-process measurements ------------------------------------------------


def rooms_report(count, customer="bench"):
    return [{"id": [customer, "room-%d" % i], "customer": customer,
             "age": {"secs": 1, "nanos": 0}, "peers": 2} for i in range(count)]


def time_report(rooms):
    gw = og.Gateway(og.Config(customers=[CUSTOMER]))
    body = json.dumps({"jsonrpc": "2.0", "method": "sfu.Report", "id": 1, "params": {
        "public_endpoint": "sfu:4433", "version": "b", "load": 0.1, "clients": 0,
        "rooms": rooms_report(rooms)}}).encode()
    first = time.perf_counter()
    gw.handle_http("POST", "/internal", {}, body)
    first = time.perf_counter() - first
    again = []
    for _ in range(5):
        started = time.perf_counter()
        gw.handle_http("POST", "/internal", {}, body)
        again.append(time.perf_counter() - started)
    return first, statistics.median(again), len(body)


def fill(gw, rooms, servers=10):
    per_server = rooms // servers
    for s in range(servers):
        gw.grid.report("sfu-%d:4433" % s, "b", {"load": 0.1, "clients": 0, "rooms": [
            {"id": ["bench", "s%d-r%d" % (s, i)], "customer": "bench", "age": {"secs": 1, "nanos": 0},
             "peers": 2} for i in range(per_server)]}, gw.clock())


def time_tick(rooms):
    clock = [time.time()]
    gw = og.Gateway(og.Config(customers=[CUSTOMER]), clock=lambda: clock[0])
    fill(gw, rooms)
    clock[0] += 2
    started = time.perf_counter()
    gw.tick()
    return time.perf_counter() - started


def memory_per_room(rooms):
    gw = og.Gateway(og.Config(customers=[CUSTOMER]))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    fill(gw, rooms)
    for server in gw.grid.servers.values():  # the reports themselves are the servers' data
        server.report = {"load": 0.1, "clients": 0, "rooms": []}
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / rooms


def connect_cost(rooms, tokens):
    gw = og.Gateway(og.Config(customers=[CUSTOMER]))
    fill(gw, rooms)
    body = b'{"jsonrpc":"2.0","method":"Connect","params":{},"id":1}'
    headers = [{"authorization": "Bearer " + t} for t in tokens]
    for h in headers[:50]:
        gw.handle_http("POST", "/", h, body)
    started = time.perf_counter()
    for h in headers:
        gw.handle_http("POST", "/", h, body)
    return (time.perf_counter() - started) / len(headers)


def placement(rule, loads, rooms=100, seeds=20):
    ratios = []
    for seed in range(seeds):
        gw = og.Gateway(og.Config(placement=rule), rng=random.Random(seed))
        for index, load in enumerate(loads):
            gw.grid.report("sfu-%d:4433" % index, "b", {"load": load, "clients": 0, "rooms": []},
                           gw.clock())
        for index in range(rooms):
            digest = og.room_hash("demo", "r%d" % index)
            gw.grid.assign(digest, ("demo", "r%d" % index), "demo", None, gw.clock())
        counts = {}
        for room in gw.grid.rooms.values():
            counts[room.server] = counts.get(room.server, 0) + 1
        ratios.append((max(counts.values()) / (rooms / len(loads)), counts))
    return ratios


# -- the cluster ------------------------------------------------------------


def start_redis(tmp, core):
    """A redis-server on a free TCP port, no persistence, pinned to core; (process, url)."""
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", tmp]
    if shutil.which("taskset"):
        command = ["taskset", "-c", str(core)] + command
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    return process, "redis://127.0.0.1:%d/0" % port


def connect_rate(tmp, generate_for, settings="", pinned=True, connections=64, seconds=5):
    port = free_port() if "workers" in settings else None
    process, port = start_gateway(tmp, settings, pinned=pinned, port=port)
    import threading
    stop = threading.Event()
    reporter = threading.Thread(target=keep_reporting, args=(port, stop), daemon=True)
    reporter.start()
    try:
        return generate_for(port)(connections, seconds)
    finally:
        stop.set()
        process.terminate()
        process.wait()


async def _propagation(url, reports):
    """Seconds from sending a report to gateway A until gateway B has applied it."""
    a = og.Gateway(og.Config(customers=[CUSTOMER], cluster=url))
    b = og.Gateway(og.Config(customers=[CUSTOMER], cluster=url))
    arrived = {}
    original = b.grid.report

    def report(hostname, version, body, now, replica=False):
        server = original(hostname, version, body, now, replica=replica)
        if version in arrived and not arrived[version].done():
            arrived[version].set_result(time.perf_counter())
        return server

    b.grid.report = report
    times = []
    async with a.serve() as server_a, b.serve():
        while not (a.cluster.loaded and b.cluster.loaded):
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", server_a.port)
        for index in range(reports):
            version = "v%d" % index
            arrived[version] = asyncio.get_running_loop().create_future()
            body = json.dumps({"jsonrpc": "2.0", "method": "sfu.Report", "id": 1, "params": {
                "public_endpoint": "sfu:4433", "version": version, "load": 0.1, "clients": 0,
                "rooms": rooms_report(10)}}).encode()
            started = time.perf_counter()
            writer.write(b"POST /internal HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
            times.append(await asyncio.wait_for(arrived[version], 5) - started)
        writer.close()
    times.sort()
    return times[len(times) // 2], times[int(len(times) * 0.99)]


async def _time_to_ready(url, rooms, servers=10):
    """Fill the cluster with rooms through gateway A; seconds gateway B needs to be ready."""
    a = og.Gateway(og.Config(customers=[CUSTOMER], cluster=url))
    async with a.serve() as server_a:
        while not a.cluster.loaded:
            await asyncio.sleep(0.01)
        for s in range(servers):
            params = {"public_endpoint": "sfu-%d:4433" % s, "version": "b", "load": 0.1, "clients": 0,
                      "rooms": [{"id": ["bench", "s%d-r%d" % (s, i)], "customer": "bench",
                                 "age": {"secs": 1, "nanos": 0}, "peers": 2}
                                for i in range(rooms // servers)]}
            await asyncio.get_running_loop().run_in_executor(None, lambda: og.RpcClient(
                server_a.url + "/internal").call("sfu.Report", params))
        b = og.Gateway(og.Config(customers=[CUSTOMER], cluster=url))
        started = time.perf_counter()
        async with b.serve():
            while not b.cluster.loaded:
                await asyncio.sleep(0.001)
            elapsed = time.perf_counter() - started
            assert len(b.grid.rooms) >= rooms, len(b.grid.rooms)
    return elapsed


def cluster_part(tmp, seconds, tokens, script, use_wrk):
    try:
        import redis  # noqa: F401
    except ImportError:
        print("\nCluster: skipped (pip install redis)")
        return
    if shutil.which("redis-server") is None:
        print("\nCluster: skipped (apt-get install redis-server)")
        return
    redis_process, url = start_redis(tmp, CLIENT_CORE)
    try:
        def pinned_load(port):
            return (lambda c, s: run_wrk(port, c, s, script)) if use_wrk else (
                lambda c, s: run_own(port, c, s, tokens))

        print("\nCluster (redis-server and the load generator on core %d):" % CLIENT_CORE)
        alone = connect_rate(tmp, pinned_load, seconds=seconds)
        clustered = connect_rate(tmp, pinned_load, "cluster = %r\n" % url, seconds=seconds)
        print("  Connect/s at 64 connections, gateway on core %d: alone %.0f, cluster %.0f "
              "(ratio %.2f)" % (SERVER_CORE, alone[0], clustered[0], clustered[0] / alone[0]))
        one = connect_rate(tmp, pinned_load, "cluster = %r\nworkers = 1\n" % url, pinned=False,
                           seconds=seconds)
        two = connect_rate(tmp, pinned_load, "cluster = %r\nworkers = 2\n" % url, pinned=False,
                           seconds=seconds)
        print("  Connect/s at 64 connections, gateway unpinned: --workers 1 %.0f, --workers 2 %.0f "
              "(ratio %.2f; the load generator and redis-server share the 2 cores)"
              % (one[0], two[0], two[0] / one[0]))
        p50, p99 = asyncio.run(_propagation(url, 50 if seconds < 5 else 500))
        print("  a report reaches another gateway: p50 %.2f ms, p99 %.2f ms" % (p50 * 1000, p99 * 1000))
        rooms = 1000 if seconds < 5 else 10000
        print("  a gateway that starts is ready with %d rooms in the cluster after %.0f ms"
              % (rooms, asyncio.run(_time_to_ready(url, rooms)) * 1000))
    finally:
        redis_process.terminate()
        redis_process.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run of every part")
    parser.add_argument("--cluster-only", action="store_true", help="only the cluster figures")
    args = parser.parse_args()
    seconds = 1 if args.quick else 5
    use_wrk = shutil.which("wrk") is not None and shutil.which("taskset") is not None

    print("odin_gateway %s benchmark: Python %s, %d cores, %s" % (
        og.__version__, sys.version.split()[0], os.cpu_count(),
        "wrk" if use_wrk else "own load generator (install wrk for better figures)"))
    try:
        with open("/proc/cpuinfo") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
        print("CPU:", model)
    except (OSError, StopIteration):
        pass

    tokens = make_tokens(100 if args.quick else 1000)
    if args.cluster_only:
        with tempfile.TemporaryDirectory() as tmp:
            script = os.path.join(tmp, "connect.lua")
            wrk_script(script, tokens)
            cluster_part(tmp, seconds, tokens, script, use_wrk)
        return
    pin(SERVER_CORE)
    ceiling = crypto_ceiling(1 if args.quick else 3)
    pin(CLIENT_CORE)
    print("\nEd25519 verify+sign ceiling of one core: %.0f/s (%.0f us each)" % (ceiling, 1e6 / ceiling))
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "connect.lua")
        wrk_script(script, tokens)
        (f1, f64) = trivial_server_round_trip(seconds, tokens, use_wrk, script)
        print("Trivial asyncio server on that core: p50 %.3f ms at 1 connection; %.0f/s at 64"
              % (f1[1], f64[0]))

        process, port = start_gateway(tmp)
        import threading
        stop = threading.Event()
        reporter = threading.Thread(target=keep_reporting, args=(port, stop), daemon=True)
        reporter.start()
        try:
            generate = (lambda c, s: run_wrk(port, c, s, script)) if use_wrk else (
                lambda c, s: run_own(port, c, s, tokens))
            cold = generate(16, 1)
            print("\nConnect over HTTP (gateway on core %d, load from core %d, keep-alive):"
                  % (SERVER_CORE, CLIENT_CORE))
            print("  first second of a fresh process (cold, 16 connections): %.0f/s, p50 %.3f ms"
                  % (cold[0], cold[1]))
            print("  %-12s %10s %10s %10s %9s" % ("connections", "Connect/s", "p50 ms", "p99 ms",
                                                  "/ceiling"))
            for connections in (1, 16, 64, 256):
                rate, p50, p99, errors = generate(connections, seconds)
                print("  %-12d %10.0f %10.3f %10.3f %9.2f%s" % (
                    connections, rate, p50, p99, rate / ceiling, "  (errors!)" if errors else ""))
        finally:
            stop.set()
            process.terminate()
            process.wait()
        cluster_part(tmp, seconds, tokens, script, use_wrk)

    print("\nsfu.Report (in-process, whole request):")
    for rooms in (1000, 10000):
        first, again, size = time_report(rooms)
        print("  %6d rooms (%4.0f KiB): first %.1f ms, then %.1f ms" % (rooms, size / 1024,
                                                                      first * 1000, again * 1000))
    tick_rooms = 10000 if args.quick else 100000
    print("Maintenance tick with %d rooms: %.1f ms" % (tick_rooms, time_tick(tick_rooms) * 1000))
    print("Memory per room (grid state): %.0f bytes" % memory_per_room(10000 if args.quick else 100000))
    print("Connect cost by rooms mapped (in-process, whole request):")
    sizes = (10, 1000, 100000) if args.quick else (10, 1000, 100000, 1000000)
    for rooms in sizes:
        print("  %8d rooms: %.0f us" % (rooms, connect_cost(rooms, tokens) * 1e6))

    print("\nPlacement: 100 new rooms between two reports on 10 servers (20 seeds):")
    for rule in ("balanced", "random"):
        ratios = placement(rule, [0.3] * 10)
        print("  equal loads (0.3):    %-9s max/mean worst %.2f, average %.2f" % (
            rule, max(r for r, _ in ratios), statistics.mean(r for r, _ in ratios)))
    print("  uneven loads 0.0, 0.1 ... 0.9 (no clients reported): rooms per server, first seed")
    for rule in ("balanced", "random"):
        counts = placement(rule, [i / 10 for i in range(10)], seeds=1)[0][1]
        print("    %-9s %s" % (rule, " ".join("%3d" % counts.get("sfu-%d:4433" % i, 0)
                                              for i in range(10))))


if __name__ == "__main__":
    main()
