#!/usr/bin/env python3
"""End-to-end check of cluster mode: two gateways and a Redis, each killed in
turn under load; counts what was lost. Prints the counts, exits 1 if any is
not zero.

    python bench/cluster_run.py            # about 40 s
    python bench/cluster_run.py --quick    # shorter phases (about 15 s)

It starts redis-server on a free port in a temporary directory and two
gateway processes (python odin_gateway.py, cluster set, each on its own
port), and puts in front of them what a load balancer does: calls to / go
round robin to the gateways whose /ready is 200, calls to /internal to those
whose /health is 200, and a call whose connection is refused goes to the
other gateway (a call already sent is not repeated). Behind that front:

- simulated ODIN servers report every update_interval; a room token makes
  its server host the room (a peer joins), a RoomClose closes it;
- clients Connect to rooms that exist and to new ones (two clients at once
  for a new room, so that both gateways may be asked), for a customer
  without limits and for one with limits;
- admins send RoomUpdate calls, each with a number of its own; an answer {}
  counts as acknowledged.

Meanwhile it SIGKILLs gateway A and restarts it, then B, then kills
redis-server and restarts it empty, then kills it and restarts it with its
data (appendonly). Then the load stops, the servers report a few more times,
and it counts:

- lost: acknowledged tasks never delivered;
- twice: tasks delivered more than once;
- split: a server told to host a room that another server hosts (a Connect
  answer naming a server other than the room's);
- closed_live: RoomClose tasks (only the gateways send them here: they
  close a collision's copy) for rooms a server hosts;
- overrun: peers or rooms of the limited customer beyond its limit plus
  one per additional gateway (the documented bound).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import odin_gateway as og  # noqa: E402

OPEN_KEY = og.generate_access_key()
LIMITED_KEY = og.generate_access_key()
MAX_PEERS, MAX_ROOMS = 40, 12
UPDATE_INTERVAL = 0.5
SERVERS = ["sfu-%d.example:4433" % n for n in range(1, 7)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log(text: str) -> None:
    print("%8.3f %s" % (time.monotonic() - STARTED, text), flush=True)


STARTED = time.monotonic()


class Redis:
    def __init__(self, directory: str):
        self.directory = directory
        self.port = free_port()
        self.url = "redis://127.0.0.1:%d/0" % self.port
        self.process = None

    def start(self, keep_data: bool) -> None:
        if not keep_data:
            for name in os.listdir(self.directory):
                path = os.path.join(self.directory, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.directory,
             "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.01)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


class GatewayProcess:
    def __init__(self, name: str, directory: str, redis_url: str, heartbeat: float):
        self.name = name
        self.directory = os.path.join(directory, name)
        os.mkdir(self.directory)
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        customers = [
            {"id": "open", "max_peers": None, "max_rooms": None,
             "access_keys": [{"public_key": og.public_jwk(OPEN_KEY)}]},
            {"id": "limited", "max_peers": MAX_PEERS, "max_rooms": MAX_ROOMS,
             "access_keys": [{"public_key": og.public_jwk(LIMITED_KEY)}]}]
        with open(os.path.join(self.directory, "gateway_config.py"), "w") as config:
            config.write("host = '127.0.0.1'\nport = %d\nlog_format = 'json'\ncluster = %r\n"
                         "cluster_heartbeat = %r\nupdate_interval = %r\ndisable_timeout = %r\n"
                         "master_key = %r\ncustomers = %r\n" % (
                             self.port, redis_url, heartbeat, UPDATE_INTERVAL, 4 * UPDATE_INTERVAL,
                             MASTER_KEY, customers))
        self.process = None
        self.log = None

    def start(self) -> None:
        self.log = open(os.path.join(self.directory, "log"), "a")
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(os.path.dirname(HERE), "odin_gateway.py"), "--config",
             "gateway_config.py"], cwd=self.directory, stdout=self.log, stderr=self.log)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.log.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.log.close()


MASTER_KEY = og.b64_encode(os.urandom(32))


class Refused(Exception):
    """No gateway took the connection."""


class Front:
    """What a load balancer does: health checks, round robin, another gateway
    when the connection is refused."""

    def __init__(self, gateways):
        self.gateways = gateways
        self.ready = {g.name: False for g in gateways}
        self.healthy = {g.name: False for g in gateways}
        self.turn = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._check, daemon=True)
        self.thread.start()

    def _status(self, gateway, path):
        try:
            connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=1)
            connection.request("GET", path)
            status = connection.getresponse().status
            connection.close()
            return status == 200
        except OSError:
            return False

    def _check(self):
        while not self.stopping.wait(0.05):
            for gateway in self.gateways:
                self.ready[gateway.name] = self._status(gateway, "/ready")
                self.healthy[gateway.name] = self._status(gateway, "/health")

    def call(self, path, body, headers=None, timeout=5.0):
        """(gateway name, parsed answer); Refused, or OSError when the call was sent
        and failed (not repeated: the gateway may have done it)."""
        up = self.ready if path == "/" else self.healthy
        with self.lock:
            self.turn += 1
            order = self.gateways[self.turn % 2:] + self.gateways[:self.turn % 2]
        order = [g for g in order if up[g.name]]  # as a load balancer: none up, no call
        for gateway in order:
            connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=timeout)
            try:
                connection.connect()
            except ConnectionRefusedError:
                up[gateway.name] = False
                continue
            try:
                connection.request("POST", path, body=json.dumps(body),
                                   headers=dict({"Content-Type": "application/json"}, **(headers or {})))
                reply = connection.getresponse()
                data = reply.read()
            finally:
                connection.close()
            return gateway.name, (json.loads(data) if data else None)
        raise Refused()


class Fleet:
    """The simulated servers' rooms, what they were told, and the counts."""

    def __init__(self):
        self.lock = threading.Lock()
        self.rooms = {host: {} for host in SERVERS}  # host -> {(namespace, name): [customer, peers]}
        self.delivered = {}  # task number -> times delivered
        self.first_delivery = {}  # task number -> where and when
        self.acknowledged = set()
        self.accepted = {}  # task number -> by which gateway, when, for which room
        self.split = []
        self.closed_live = []
        self.limited_admitted = {"peers": 0, "rooms": set()}
        self.counts = {"connects": 0, "refused": 0, "failed": 0, "reports": 0, "reports_failed": 0,
                       "admin": 0, "admin_failed": 0}

    def host_of(self, key):
        for host, rooms in self.rooms.items():
            if key in rooms:
                return host
        return None

    def join(self, host, key, customer, via):
        with self.lock:
            where = self.host_of(key)
            if where is not None and where != host:
                self.split.append((key, where, host, via, round(time.monotonic() - STARTED, 3)))
                log("SPLIT %s on %s, told %s by %s" % (key, where, host, via))
            room = self.rooms[host].setdefault(key, [customer, 0])
            room[1] += 1
            if customer == "limited":
                self.limited_admitted["peers"] += 1
                if self.limited_admitted["peers"] > MAX_PEERS:
                    log("limited customer: peer %d admitted by %s" % (self.limited_admitted["peers"], via))
                self.limited_admitted["rooms"].add(key)

    def report_params(self, host):
        with self.lock:
            rooms = [{"id": list(key), "customer": customer, "peers": peers,
                      "age": {"secs": 1, "nanos": 0}}
                     for key, (customer, peers) in self.rooms[host].items()]
        return {"public_endpoint": host, "version": "1.6.0", "load": 0.1, "clients": len(rooms),
                "rooms": rooms}

    def tasks(self, host, tasks, via):
        with self.lock:
            for task in tasks:
                if task["task"] == "RoomUpdate":
                    number = int.from_bytes(bytes(task["user_data"]), "big")
                    self.delivered[number] = self.delivered.get(number, 0) + 1
                    if self.delivered[number] == 2:
                        log("TWICE task %d (to %s via %s; first %s)" % (
                            number, host, via, self.first_delivery[number]))
                    else:
                        self.first_delivery[number] = "to %s via %s at %.3f" % (
                            host, via, time.monotonic() - STARTED)
                elif task["task"] == "RoomClose":
                    key = tuple(task["id"])
                    if key in self.rooms[host]:
                        self.closed_live.append((key, host, via))
                        log("ROOMCLOSE of live %s on %s via %s" % (key, host, via))
                        del self.rooms[host][key]


def rpc(method, params, request_id=1):
    return {"jsonrpc": "2.0", "method": method, "params": params, "id": request_id}


def counted_call(fleet, done, failed, refused, front, *request):
    """One call through the front, counted as done, failed (no answer) or refused
    (an error answer); (the gateway that answered, the result or None)."""
    try:
        via, answer = front.call(*request)
    except (Refused, OSError, ValueError):
        outcome, via, answer = failed, None, None
    else:
        outcome = refused if answer is None or "result" not in answer else done
    with fleet.lock:
        fleet.counts[outcome] += 1
    return via, answer["result"] if outcome == done else None


def report_loop(front, fleet, host, stop):
    next_at = time.monotonic() + random.random() * UPDATE_INTERVAL
    while not stop.is_set():
        time.sleep(max(0.0, next_at - time.monotonic()))
        next_at += UPDATE_INTERVAL
        via, result = counted_call(fleet, "reports", "reports_failed", "reports_failed", front,
                                   "/internal", rpc("sfu.Report", fleet.report_params(host)))
        if result is not None:
            fleet.tasks(host, result["tasks"], via)


def connect(front, fleet, key, customer, access_key, user):
    token = og.create_token(access_key, key[1], user)
    via, result = counted_call(fleet, "connects", "failed", "refused", front,
                               "/", rpc("Connect", {}), {"Authorization": "Bearer " + token})
    if result is not None:
        fleet.join(result["address"], key, customer, via)


def client_loop(front, fleet, number, stop, retry):
    rng = random.Random(number)
    made = 0
    while not stop.is_set():
        choice = rng.random()
        if choice < 0.4:  # a room that exists
            with fleet.lock:
                known = [key for rooms in fleet.rooms.values() for key in rooms if key[0] == "open"]
            if known:
                connect(front, fleet, rng.choice(known), "open", OPEN_KEY, "u%d" % number)
                continue
        if choice < 0.6:  # a new room, two clients at once
            made += 1
            key = ("open", "c%d-%d" % (number, made))
            pair = [threading.Thread(target=connect, args=(front, fleet, key, "open", OPEN_KEY, user))
                    for user in ("x", "y")]
            for thread in pair:
                thread.start()
            for thread in pair:
                thread.join()
        elif choice < 0.7:  # the customer with limits
            key = ("limited", "l%d" % rng.randrange(2 * MAX_ROOMS))
            connect(front, fleet, key, "limited", LIMITED_KEY, "u%d" % number)
        else:  # an admin task with a number of its own
            with fleet.lock:
                known = [key for rooms in fleet.rooms.values() for key in rooms if key[0] == "open"]
                task_number = fleet.counts["admin"] + fleet.counts["admin_failed"] + 1000000 * number
            if not known:
                continue
            key = rng.choice(known)
            token = og.create_token(OPEN_KEY, key[1], "admin", subject="RoomUpdate")
            request = rpc("RoomUpdate", {"room_id": key[1],
                                         "user_data": list(task_number.to_bytes(4, "big"))})
            answer = None
            for _attempt in range(2 if retry else 1):  # the same request again, if it failed
                try:
                    via, answer = front.call("/", request, {"Authorization": "Bearer " + token})
                except (Refused, OSError, ValueError):
                    continue
                if answer is not None and "result" in answer:
                    break
            with fleet.lock:
                if answer is not None and answer.get("result") == {}:
                    fleet.acknowledged.add(task_number)
                    fleet.accepted[task_number] = "by %s at %.3f for %s" % (
                        via, time.monotonic() - STARTED, key)
                    fleet.counts["admin"] += 1
                else:
                    if not fleet.counts["admin_failed"]:
                        log("first failed admin call: %s" % (answer,))
                    fleet.counts["admin_failed"] += 1
        time.sleep(0.002)


def wait_ready(front, name, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not front.ready[name]:
        if time.monotonic() > deadline:
            raise RuntimeError("gateway %s not ready within %s s" % (name, timeout))
        time.sleep(0.02)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter phases")
    parser.add_argument("--clients", type=int, default=6, help="client threads")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--retry-admin", action="store_true",
                        help="send an admin call that failed once more, the same request")
    parser.add_argument("--heartbeat", type=float, default=0.5,
                        help="cluster_heartbeat of the gateways (update_interval is %s)" % UPDATE_INTERVAL)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("redis-server is not installed (Debian: apt-get install redis-server)")
        return 2
    random.seed(args.seed)
    phase = 1.5 if args.quick else 4.0
    directory = tempfile.mkdtemp(prefix="cluster-run-")
    redis_dir = os.path.join(directory, "redis")
    os.mkdir(redis_dir)
    redis = Redis(redis_dir)
    redis.start(keep_data=False)
    gateways = [GatewayProcess(name, directory, redis.url, args.heartbeat) for name in ("A", "B")]
    front = Front(gateways)
    fleet = Fleet()
    stop_clients, stop_servers = threading.Event(), threading.Event()
    threads = []
    try:
        for gateway in gateways:
            gateway.start()
        servers = [threading.Thread(target=report_loop, args=(front, fleet, host, stop_servers))
                   for host in SERVERS]
        for thread in servers:
            thread.start()
        for gateway in gateways:
            wait_ready(front, gateway.name)
        log("both gateways ready")
        threads = [threading.Thread(target=client_loop, args=(front, fleet, n, stop_clients,
                                                              args.retry_admin))
                   for n in range(args.clients)]
        for thread in threads:
            thread.start()
        time.sleep(phase)
        for gateway in gateways:
            log("SIGKILL gateway %s" % gateway.name)
            gateway.kill()
            time.sleep(phase / 2)
            gateway.start()
            wait_ready(front, gateway.name)
            log("gateway %s restarted and ready" % gateway.name)
            time.sleep(phase)
        for keep_data in (False, True):
            log("SIGKILL redis-server")
            redis.kill()
            time.sleep(phase / 2)
            redis.start(keep_data=keep_data)
            log("redis-server restarted %s" % ("with its data" if keep_data else "empty"))
            time.sleep(phase)
        log("load stops")
        stop_clients.set()
        for thread in threads:
            thread.join()
        time.sleep(6 * UPDATE_INTERVAL + 1)  # every task reaches its server
        stop_servers.set()
        for thread in servers:
            thread.join()
    finally:
        stop_clients.set()
        stop_servers.set()
        front.stopping.set()
        for gateway in gateways:
            gateway.stop()
        if redis.process is not None and redis.process.poll() is None:
            redis.kill()
    lost = sorted(fleet.acknowledged - set(fleet.delivered))
    twice = sorted(number for number, times in fleet.delivered.items() if times > 1)
    limited_rooms = len(fleet.limited_admitted["rooms"])
    overrun = (max(0, fleet.limited_admitted["peers"] - (MAX_PEERS + 1))
               + max(0, limited_rooms - (MAX_ROOMS + 1)))
    results = {"lost": len(lost), "twice": len(twice), "split": len(fleet.split),
               "closed_live": len(fleet.closed_live), "overrun": overrun}
    print(json.dumps(dict(fleet.counts, acknowledged=len(fleet.acknowledged),
                          delivered=len(fleet.delivered),
                          limited_peers=fleet.limited_admitted["peers"], limited_rooms=limited_rooms)))
    for number in lost[:20]:
        print("lost task %d: accepted %s" % (number, fleet.accepted[number]))
    if twice:
        print("tasks delivered twice:", twice[:20])
    for split in fleet.split[:10]:
        print("split:", split)
    for closed in fleet.closed_live[:10]:
        print("RoomClose of a live room:", closed)
    print("RESULT " + " ".join("%s=%d" % item for item in results.items()))
    if args.keep:
        print("logs in", directory)
    else:
        shutil.rmtree(directory, ignore_errors=True)
    return 1 if any(results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
