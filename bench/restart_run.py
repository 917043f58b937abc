#!/usr/bin/env python3
"""Restart-and-load run of odin_gateway.py (issue #11): counts what a restart harms.

    python bench/restart_run.py            # both variants, about a minute
    python bench/restart_run.py --quick    # a short run of both (about half a minute)
    python bench/restart_run.py --variant state --seconds 60 --seed 7

It starts the gateway as a real process (`python odin_gateway.py` with a
config in a temporary directory), once with `state_file` set and once
without, and drives it the way a fleet does:

- simulated ODIN servers, each reporting its rooms and peers over HTTP every
  update_interval (each with its own phase and jitter, so they report in
  random order; two of them with thousands of rooms: big reports), applying
  the tasks that come back in the answers (RoomClose closes the room there);
- clients calling Connect, for rooms that exist and for new ones, each then
  joining the room on the server the answer names (the server opens the
  room if it does not have it: a second copy if the answer was wrong), and
  leaving a few seconds later (a room without peers closes);
- admin calls (RoomClose, RoomBanClient, RoomSendMessage, RoomUpdate) on live
  rooms, each made unique so that its delivery can be recognised, and
  counted as acknowledged when answered {};
- slow Info readers that read the room list a few kilobytes at a time;

and kills the gateway several times under that load (SIGKILL, and SIGTERM:
a planned restart), restarting it at once on the same port. Then it stops
the admin calls and the kills, lets every server report a few more times,
and counts:

- misroutes: Connect answers naming a server other than the room's real
  host, for a room that host had reported (its report answered) before the
  Connect was sent; and apart, for a room its host had not yet reported (a
  room the gateway placed there a moment ago, or one the server had before
  the gateway first started);
- live closes: RoomClose tasks that the gateway itself queued (a collision)
  delivered to a room's real host while the room lived there;
- lost tasks: admin tasks answered {} that no server ever received;
- duplicates: admin tasks a server received more than once.

The promises (README, "Restarts"): with state_file, none of the four may
be non-zero except duplicates, which the gateway allows in one narrow case
(it died between answering a server and recording that); without it,
misroutes and live closes must still be zero (the warm-up holds Connects for
rooms no server has reported yet), while tasks acknowledged before a kill
(either signal: nothing is saved) may be lost. The script says which
promises held and exits 1 if one did not.

The machine's load matters: a report answered later than disable_timeout
after the previous one moves its server's rooms, which the run counts as
misroutes. A restart costs each server the report it sent meanwhile, so
its next one comes an update_interval after that: the run gives
disable_timeout four update_intervals (--disable-after; the default config
has 1.5, which on a loaded 2-core machine with 30,000 rooms can move
rooms after a restart, and not without one: compare with --kills 0
--sigterms 0). It prints `uptime` before it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Set, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import odin_gateway as og  # noqa: E402  (the bench runs from a checkout)

CUSTOMER = "rr"  # also the namespace of every room
#: Admin RoomClose tasks carry ban_time 1,000,000 + their number: a collision's
#: RoomClose (ban_time update_interval) is told apart by that.
ADMIN_CLOSE_BASE = 1_000_000


# ---------------------------------------------------------------------------
# HTTP: a minimal keep-alive client over asyncio streams
# ---------------------------------------------------------------------------

class Http:
    """One keep-alive connection to the gateway, reopened after any failure."""

    def __init__(self, port: int, timeout: float):
        self.port = port
        self.timeout = timeout
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def post(self, path: str, body: dict, authorization: Optional[str] = None) -> Tuple[int, Any]:
        """(status, parsed JSON body); raises OSError (or a timeout) when the gateway is not there."""
        try:
            return await asyncio.wait_for(self._post(path, body, authorization), self.timeout)
        except BaseException:
            self.close()
            raise

    async def _post(self, path: str, body: dict, authorization: Optional[str]) -> Tuple[int, Any]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        data = json.dumps(body).encode()
        head = "POST %s HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n" % path
        if authorization:
            head += "Authorization: %s\r\n" % authorization
        self.writer.write(head.encode() + b"Content-Length: %d\r\n\r\n" % len(data) + data)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionResetError("connection closed before the answer")
        status = int(status_line.split()[1])
        headers: Dict[str, str] = {}
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                chunks.append(chunk[:-2])
            payload = b"".join(chunks)
        else:
            payload = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, json.loads(payload) if payload else None


# ---------------------------------------------------------------------------
# The world: which server really hosts each room, and what was delivered
# ---------------------------------------------------------------------------

class Counts:
    def __init__(self) -> None:
        self.connects = 0  # answered with a server
        self.connect_errors: Dict[str, int] = {}
        self.misroutes = 0  # to another server than a reported room's host
        self.misroute_examples: List[str] = []
        self.early_misroutes = 0  # to another server than the host of a room it has not yet reported
        self.live_closes = 0  # collision RoomCloses delivered to a live room's real host
        self.live_close_examples: List[str] = []
        self.duplicate_closes = 0  # collision RoomCloses of a second copy (after a misroute)
        self.acknowledged: Set[int] = set()  # admin tasks answered {}
        self.delivered: Dict[int, int] = {}  # admin task -> times delivered
        self.admin_errors: Dict[str, int] = {}
        self.reports = 0
        self.report_failures = 0
        self.info_pages = 0
        self.restarts: List[Tuple[str, float]] = []  # (signal, seconds until it answered again)

    def error(self, table: Dict[str, int], text: str) -> None:
        table[text] = table.get(text, 0) + 1


class SimServer:
    """A simulated ODIN server: its rooms (name -> [peers, generation]) and its report loop."""

    def __init__(self, world: "World", hostname: str, old_rooms: int):
        self.world = world
        self.hostname = hostname
        self.rooms: Dict[str, List[int]] = {}
        # Rooms it had before the gateway first started (a big server has
        # thousands): the gateway learns them from its reports. Their peers
        # stay; Connects join some of them too.
        for index in range(old_rooms):
            name = "rold-%s-%d" % (hostname.split(".")[0], index)
            self.rooms[name] = [1 + index % 5, world.next_generation()]
            world.hosts[name] = (hostname, self.rooms[name][1])
            if index < 50:
                world.old.append(name)
        self.http = Http(world.port, timeout=10)
        self.answered = 0.0  # when its last report was answered (time.monotonic)

    def report_body(self) -> Tuple[dict, List[Tuple[str, int]]]:
        rooms = [{"id": [CUSTOMER, name], "customer": CUSTOMER, "age": {"secs": 5, "nanos": 0},
                  "peers": peers} for name, (peers, _generation) in self.rooms.items()]
        body = {"jsonrpc": "2.0", "method": "sfu.Report", "id": 1, "params": {
            "public_endpoint": self.hostname, "version": "1.6.0", "load": min(0.9, len(rooms) / 20000),
            "clients": sum(room["peers"] for room in rooms), "rooms": rooms}}
        return body, [(name, generation) for name, (_peers, generation) in self.rooms.items()]

    async def run(self) -> None:
        world = self.world
        await asyncio.sleep(world.rng.uniform(0, world.interval))  # its own phase
        while not world.servers_stop:
            started = time.monotonic()
            body, listed = self.report_body()
            try:
                status, answer = await self.http.post("/internal", body)
            except (OSError, asyncio.TimeoutError, ValueError):
                world.counts.report_failures += 1
            else:
                if status == 200 and "result" in answer:
                    world.counts.reports += 1
                    self.answered = time.monotonic()
                    for name, generation in listed:  # the gateway has seen them
                        if world.hosts.get(name) == (self.hostname, generation):
                            world.confirmed.add(name)
                    for task in answer["result"]["tasks"]:
                        self.apply(task)
                else:
                    world.counts.report_failures += 1
            # Every update_interval, give or take 10 %: the servers' order changes all the time.
            pause = world.interval * world.rng.uniform(0.9, 1.1) - (time.monotonic() - started)
            await asyncio.sleep(max(0.01, pause))
        self.http.close()

    def apply(self, task: dict) -> None:
        world, counts = self.world, self.world.counts
        name = task["id"][1]
        number = world.task_number(task)
        if number is not None:
            counts.delivered[number] = counts.delivered.get(number, 0) + 1
        if task["task"] != "RoomClose":
            return
        here = self.rooms.get(name)
        if number is None and here is not None:  # a collision's RoomClose, for a room we have
            if world.hosts.get(name) == (self.hostname, here[1]):
                counts.live_closes += 1
                if len(counts.live_close_examples) < 5:
                    counts.live_close_examples.append("%s on %s (%s)" % (name, self.hostname, world.phase))
            else:
                counts.duplicate_closes += 1
        if here is not None:
            self.close(name)

    def join(self, name: str) -> None:
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = [0, self.world.next_generation()]
            if self.world.hosts.get(name) is None:
                self.world.hosts[name] = (self.hostname, room[1])
                self.world.live.add(name)
        room[0] += 1
        generation = room[1]
        delay = self.world.rng.uniform(2, 12) * self.world.interval
        asyncio.get_running_loop().call_later(delay, self.leave, name, generation)

    def leave(self, name: str, generation: int) -> None:
        room = self.rooms.get(name)
        if room is not None and room[1] == generation:
            room[0] -= 1
            if room[0] <= 0:
                self.close(name)

    def close(self, name: str) -> None:
        _peers, generation = self.rooms.pop(name)
        if self.world.hosts.get(name) == (self.hostname, generation):
            del self.world.hosts[name]
            self.world.confirmed.discard(name)
            self.world.live.discard(name)


class World:
    def __init__(self, port: int, interval: float, rng: random.Random):
        self.port = port
        self.interval = interval
        self.rng = rng
        self.counts = Counts()
        self.hosts: Dict[str, Tuple[str, int]] = {}  # room -> (its real host, that copy's generation)
        self.confirmed: Set[str] = set()  # rooms whose host has reported them (answer received)
        self.live: Set[str] = set()  # rooms opened by Connect that live somewhere
        self.old: List[str] = []  # some of the rooms the servers had before the gateway started
        self.servers: Dict[str, SimServer] = {}
        self.generation = 0
        self.room_number = 0
        self.task_counter = 0
        self.phase = "start"
        self.servers_stop = False
        self.load_stop = False
        self.admin_stop = False

    def next_generation(self) -> int:
        self.generation += 1
        return self.generation

    def new_room(self) -> str:
        self.room_number += 1
        return "r-%d" % self.room_number

    def next_task(self) -> int:
        self.task_counter += 1
        return self.task_counter

    @staticmethod
    def task_number(task: dict) -> Optional[int]:
        """The number an admin task was made with (None: a collision's RoomClose)."""
        kind = task["task"]
        if kind == "RoomClose":
            secs = task["ban_time"]["secs"]
            return secs - ADMIN_CLOSE_BASE if secs >= ADMIN_CLOSE_BASE else None
        if kind == "RoomBanClient":
            return int(task["user_id"].split("-", 1)[1])
        data = task["message"] if kind == "RoomSendMessage" else task["user_data"]
        return int.from_bytes(bytes(data), "big")


# ---------------------------------------------------------------------------
# The load: Connects, admin calls, slow Info readers
# ---------------------------------------------------------------------------

class Tokens:
    def __init__(self, access_key: str):
        self.access_key = access_key
        self.cache: Dict[str, str] = {}
        self.admin = "Bearer " + og.create_token(access_key, "r", "admin", lifetime=3600, subject=[
            "roomclose", "roomupdate", "roombanclient", "roomsendmessage"])

    def connect(self, room: str) -> str:
        token = self.cache.get(room)
        if token is None:
            token = self.cache[room] = "Bearer " + og.create_token(self.access_key, room, "u", lifetime=3600)
        return token


async def connect_client(world: World, tokens: Tokens, pause: float) -> None:
    http = Http(world.port, timeout=30)  # a Connect may wait out the warm-up
    rng, counts = world.rng, world.counts
    while not world.load_stop:
        pick = rng.random()
        if pick < 0.15:
            room = rng.choice(world.old)
        elif world.live and pick < 0.7:
            room = rng.choice(sorted(world.live)) if len(world.live) < 50 else rng.choice(tuple(world.live))
        else:
            room = world.new_room()
        host = world.hosts.get(room)
        reported = room in world.confirmed
        try:
            status, answer = await http.post("/", {"jsonrpc": "2.0", "method": "Connect", "params": {}, "id": 1},
                                             tokens.connect(room))
        except (OSError, asyncio.TimeoutError, ValueError) as err:
            counts.error(counts.connect_errors, type(err).__name__)
            await asyncio.sleep(0.05)
            continue
        if status != 200 or "result" not in answer:
            message = answer["error"]["message"] if isinstance(answer, dict) and "error" in answer else ""
            counts.error(counts.connect_errors, "%d %s" % (status, message.split(":")[0]))
            await asyncio.sleep(0.05)
            continue
        counts.connects += 1
        address = answer["result"]["address"]
        if host is not None and world.hosts.get(room) == host and address != host[0]:
            if reported:
                counts.misroutes += 1
                if len(counts.misroute_examples) < 5:
                    counts.misroute_examples.append("%s: answered %s, lives on %s (%s; its last report "
                                                    "answered %.2f s before)" % (
                        room, address, host[0], world.phase,
                        time.monotonic() - world.servers[host[0]].answered))
            else:
                counts.early_misroutes += 1
                if len(counts.misroute_examples) < 5:
                    counts.misroute_examples.append("%s: answered %s, lives on %s, not yet reported (%s)"
                                                    % (room, address, host[0], world.phase))
        server = world.servers.get(address)
        if server is not None:
            server.join(room)
        await asyncio.sleep(rng.uniform(0, 2 * pause))
    http.close()


async def admin_client(world: World, tokens: Tokens, pause: float) -> None:
    http = Http(world.port, timeout=10)
    rng, counts = world.rng, world.counts
    while not world.admin_stop:
        if rng.random() < 0.1:
            rooms = tuple(name for name in world.old if name in world.confirmed)
        else:
            rooms = tuple(world.confirmed & world.live)
        if not rooms:
            await asyncio.sleep(0.1)
            continue
        room = rng.choice(rooms)
        number = world.next_task()
        kind = rng.choices(["RoomSendMessage", "RoomUpdate", "RoomBanClient", "RoomClose"], [5, 3, 3, 1])[0]
        params: Dict[str, Any] = {"room_id": room}
        if kind == "RoomSendMessage":
            params.update(user_id="u", message=list(number.to_bytes(4, "big")))
        elif kind == "RoomUpdate":
            params["user_data"] = list(number.to_bytes(4, "big"))
        elif kind == "RoomBanClient":
            params.update(user_id="ban-%d" % number, ban_time=0)
        else:
            params["ban_time"] = ADMIN_CLOSE_BASE + number
        try:
            status, answer = await http.post("/", {"jsonrpc": "2.0", "method": kind, "params": params, "id": 1},
                                             tokens.admin)
        except (OSError, asyncio.TimeoutError, ValueError) as err:
            counts.error(counts.admin_errors, type(err).__name__)
            await asyncio.sleep(0.05)
            continue
        if status == 200 and answer.get("result") == {}:
            counts.acknowledged.add(number)
        else:
            message = answer["error"]["message"] if isinstance(answer, dict) and "error" in answer else ""
            counts.error(counts.admin_errors, "%d %s" % (status, message))
        await asyncio.sleep(rng.uniform(0, 2 * pause))
    http.close()


async def slow_info_reader(world: World, chunk: int, pause: float) -> None:
    """Asks for a page of up to 5,000 rooms and reads the answer a little at a time."""
    body = json.dumps({"jsonrpc": "2.0", "method": "Info", "params": {"rooms": {"limit": 5000}}, "id": 1})
    request = ("POST /internal HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
               % (len(body), body)).encode()
    while not world.load_stop:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", world.port, limit=chunk)
        except OSError:
            await asyncio.sleep(0.2)
            continue
        try:
            writer.transport.set_write_buffer_limits(0)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, chunk)
            writer.write(request)
            while not world.load_stop:
                data = await asyncio.wait_for(reader.read(chunk), 30)
                if not data:
                    world.counts.info_pages += 1
                    break
                await asyncio.sleep(pause)
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.2)
        finally:
            writer.close()


# ---------------------------------------------------------------------------
# The gateway process: start, kill, restart on the same port
# ---------------------------------------------------------------------------

def free_port() -> int:
    """A port for every start of the gateway (it must come back on the same one,
    as behind a fixed address; a port taken meanwhile makes the start fail loudly)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GatewayProcess:
    def __init__(self, directory: str, port: int, settings: Dict[str, Any]):
        self.directory = directory
        self.port = port
        self.config = os.path.join(directory, "config.py")
        with open(self.config, "w") as out:
            for name, value in dict(settings, host="127.0.0.1", port=port, log_format="json").items():
                out.write("%s = %r\n" % (name, value))
        self.log_path = os.path.join(directory, "gateway.log")
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "odin_gateway.py"), "--config", self.config],
            stdout=log, stderr=log, cwd=self.directory)
        log.close()

    async def answering(self, timeout: float = 20) -> float:
        """Seconds until /health answers (the process must not have died)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError("the gateway exited with %s; its log:\n%s" % (
                    self.process.returncode, self.log_tail()))
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(b"GET /health HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
                answer = await reader.read()
                writer.close()
                if answer.startswith(b"HTTP/1.1 200"):
                    return time.monotonic() - started
            except OSError:
                pass
            await asyncio.sleep(0.02)
        raise RuntimeError("the gateway did not answer /health within %d s; its log:\n%s" % (
            timeout, self.log_tail()))

    async def stop(self, signum: int) -> None:
        self.process.send_signal(signum)
        while self.process.poll() is None:
            await asyncio.sleep(0.01)

    def log_tail(self, lines: int = 20) -> str:
        with open(self.log_path, "rb") as source:
            return b"\n".join(source.read().splitlines()[-lines:]).decode("utf-8", "replace")


# ---------------------------------------------------------------------------
# A run
# ---------------------------------------------------------------------------

async def run_variant(saved: bool, seconds: float, kills: List[int], options: Any) -> Counts:
    rng = random.Random(options.seed)
    interval = options.interval
    access_key = og.generate_access_key()
    directory = tempfile.mkdtemp(prefix="odin-restart-")
    port = free_port()
    settings: Dict[str, Any] = {
        "customers": [{"id": CUSTOMER, "max_peers": None, "max_rooms": None,
                       "access_keys": [{"public_key": og.public_jwk(access_key), "namespace": None}]}],
        "update_interval": interval,
        # Reports are answered late under this load on a shared machine; a server
        # disabled for that would move its rooms (which is right, but not what this
        # run is about), so it gets four intervals unless told otherwise.
        "disable_timeout": options.disable_after * interval,
        "shutdown_timeout": 2,
    }
    if saved:
        settings["state_file"] = os.path.join(directory, "state.jsonl")
    gateway = GatewayProcess(directory, port, settings)
    world = World(port, interval, rng)
    for index in range(options.servers):
        hostname = "sfu-%02d.example.com:4433" % index
        world.servers[hostname] = SimServer(
            world, hostname, options.big_rooms if index < options.big_servers else 20)
    tokens = Tokens(access_key)
    gateway.start()
    await gateway.answering()
    # The fleet is there when the gateway starts: servers with rooms, and clients.
    tasks = [asyncio.ensure_future(server.run()) for server in world.servers.values()]
    tasks += [asyncio.ensure_future(connect_client(world, tokens, options.pause)) for _ in range(options.clients)]
    tasks += [asyncio.ensure_future(admin_client(world, tokens, options.pause * 4)) for _ in range(options.admins)]
    tasks += [asyncio.ensure_future(slow_info_reader(world, 4096, 0.05)) for _ in range(options.readers)]
    counts = world.counts
    try:
        world.phase = "under load"
        for number, signum in enumerate(kills):
            if number == 0:  # the first start dies before every server has reported (a crash loop)
                await asyncio.sleep(interval * rng.uniform(0.2, 0.8))
            else:
                await asyncio.sleep(seconds / len(kills) * rng.uniform(0.7, 1.3))
            name = signal.Signals(signum).name
            world.phase = "after %s #%d" % (name, number + 1)
            await gateway.stop(signum)
            gateway.start()  # at once, like a supervisor
            counts.restarts.append((name, await gateway.answering()))
        await asyncio.sleep(seconds / max(1, len(kills)))
        world.phase = "settling"
        world.admin_stop = True
        await asyncio.sleep(interval * 4)  # every task acknowledged reaches its server
        world.load_stop = True
        await asyncio.sleep(interval * 1.5)
        world.servers_stop = True
        await asyncio.wait_for(asyncio.gather(*tasks), interval * 3 + 35)
    finally:
        for task in tasks:
            task.cancel()
        if gateway.process.poll() is None:
            await gateway.stop(signal.SIGTERM)
    return counts


def verdicts(counts: Counts, saved: bool) -> List[Tuple[str, int, bool, str]]:
    """(what, count, promised to be zero, note) for the variant."""
    lost = len(counts.acknowledged - set(counts.delivered))
    duplicates = sum(1 for times in counts.delivered.values() if times > 1)
    return [
        ("misrouted Connects (room reported by its host)", counts.misroutes, True, ""),
        ("misrouted Connects (room not yet reported)", counts.early_misroutes, True, ""),
        ("RoomCloses sent to live rooms", counts.live_closes, True, ""),
        ("acknowledged tasks lost", lost, saved,
         "" if saved else "allowed without state_file: a stop or kill loses the queued tasks"),
        ("tasks delivered twice", duplicates, False,
         "allowed: a kill between answering a report and recording it delivers its tasks again"),
    ]


def print_variant(name: str, counts: Counts, saved: bool) -> bool:
    print("\n== %s ==" % name)
    print("restarts: %s" % ", ".join("%s (answering after %.2f s)" % restart for restart in counts.restarts))
    print("Connects answered: %d; reports answered: %d (failed: %d); admin tasks acknowledged: %d, "
          "delivered: %d; Info pages read slowly: %d" % (
              counts.connects, counts.reports, counts.report_failures, len(counts.acknowledged),
              sum(counts.delivered.values()), counts.info_pages))
    if counts.connect_errors:
        print("Connect errors: %s" % json.dumps(counts.connect_errors, sort_keys=True))
    if counts.admin_errors:
        print("admin call errors: %s" % json.dumps(counts.admin_errors, sort_keys=True))
    print("collision RoomCloses of second copies (follow misroutes): %d" % counts.duplicate_closes)
    held = True
    for what, count, promised, note in verdicts(counts, saved):
        if promised:
            verdict = "holds" if count == 0 else "BROKEN"
            held = held and count == 0
        else:
            verdict = "not promised"
        print("  %-50s %6d  %s%s" % (what, count, verdict, "  (%s)" % note if note else ""))
    for example in counts.misroute_examples + counts.live_close_examples:
        print("    e.g. %s" % example)
    return held


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run: one kill of each kind per variant")
    parser.add_argument("--variant", choices=("state", "nostate", "both"), default="both")
    parser.add_argument("--seconds", type=float, help="load time per variant (default 24, quick 6)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--interval", type=float, default=1.0, help="update_interval of the run")
    parser.add_argument("--big-rooms", type=int, help="rooms of each big server (default 4,000, quick 1,000)")
    parser.add_argument("--big-servers", type=int, default=2, help="servers with big reports")
    parser.add_argument("--kills", type=int, help="SIGKILLs per variant (default 3, quick 1)")
    parser.add_argument("--sigterms", type=int, default=1, help="SIGTERMs per variant, after the "
                        "first two SIGKILLs (0 and --kills 0: a run without restarts, for comparison)")
    parser.add_argument("--disable-after", type=float, default=4.0,
                        help="disable_timeout in update_intervals (the default config has 1.5)")
    options = parser.parse_args(argv)
    if options.quick:
        seconds = options.seconds or 6
        kills = [signal.SIGKILL] * (1 if options.kills is None else options.kills)
        options.servers, options.default_big, options.clients, options.admins, options.readers = 6, 1000, 6, 2, 2
    else:
        seconds = options.seconds or 24
        kills = [signal.SIGKILL] * (3 if options.kills is None else options.kills)
        options.servers, options.default_big, options.clients, options.admins, options.readers = 12, 4000, 12, 3, 4
    kills[2:2] = [signal.SIGTERM] * options.sigterms
    options.pause = 0.02
    options.big_rooms = options.big_rooms if options.big_rooms is not None else options.default_big
    try:
        print("uptime: %s" % subprocess.check_output(["uptime"], text=True).strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    print("%d servers (%d with %d rooms), %d Connect clients, %d admin clients, %d slow Info readers; "
          "update_interval %.0f s; %.0f s of load per variant, kills: %s" % (
              options.servers, options.big_servers, options.big_rooms, options.clients, options.admins, options.readers,
              options.interval, seconds, ", ".join(signal.Signals(k).name for k in kills) or "none"))
    variants = [("state", True), ("nostate", False)]
    held = True
    for name, saved in variants:
        if options.variant not in (name, "both"):
            continue
        counts = asyncio.run(run_variant(saved, seconds, kills, options))
        title = "with state_file" if saved else "without state_file (warm-up only)"
        held = print_variant(title, counts, saved) and held
    print("\nevery promise held" if held else "\nA PROMISE WAS BROKEN")
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
