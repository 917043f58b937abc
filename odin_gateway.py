#!/usr/bin/env python3
"""odin_gateway: an ODIN gateway in one readable Python file.

An ODIN gateway sits between voice-chat clients and a pool of ODIN media
servers (SFUs). Servers register with it and report their rooms and load every
few seconds; clients present a token signed with their customer's access key
and get back the address of the server that hosts (or will host) their room,
plus a fresh Ed25519-signed token for that server.

Run it::

    pip install pynacl "tomli; python_version < '3.11'"
    python odin_gateway.py                 # reads ./config.py if present
    python odin_gateway.py --help

The protocol in five lines::

    Server -> Gateway  POST /internal  sfu.GridConfig  (once)      <- recommended config + its signing key
    Server -> Gateway  POST /internal  sfu.Report      (every 5 s) <- queued admin tasks
    Client -> Gateway  POST /          Connect (Bearer token)      <- {address, token}
    Client -> Server   join the room with that token
    Backend -> Gateway POST /          RoomClose | RoomUpdate | RoomBanClient | RoomSendMessage

Everything is JSON-RPC 2.0 over HTTP/1.1. README.md describes every call, and
where this gateway deliberately improves on the original; the sections below
follow the data from keys and tokens to the grid, the RPC methods and HTTP.

Security stance: client tokens are verified with the customers' public keys
only (the gateway never sees an access key); server keys are derived from the
master key, so change ``master_key`` before going to production; ``/internal``
hands out signing keys, so protect it with ``internal_users`` or a firewall.
The gateway warns at start about each of these.

Watching it: GET /status is a live page of the grid for people (servers,
customers, the newest events); the Events method on /internal lets tools tail
the same event feed the log is written from.

The protocol logic (tokens, grid state, RPC methods, JSON-RPC dispatch) is
plain synchronous code over plain data; only the HTTP layer and the timers
touch asyncio. Time and randomness are injectable, and all state lives on a
``Gateway`` instance, so several gateways can run in one process.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "Authorization",
    "Config",
    "ConfigError",
    "FakeServer",
    "Gateway",
    "GatewayError",
    "GatewayServer",
    "HttpFraming",
    "Licensee",
    "RpcClient",
    "RpcError",
    "TokenError",
    "create_token",
    "derive_server_key",
    "generate_access_key",
    "main",
    "public_jwk",
    "room_hash",
    "serve_in_thread",
]

import argparse
import asyncio
import binascii
import bisect
import collections
import contextlib
import copy
import dataclasses
import datetime
import difflib
import email.utils
import fnmatch
import functools
import gc
import hashlib
import hmac
import html
import inspect
import ipaddress
import itertools
import json
import logging
import math
import operator
import os
import pprint
import random
import re
import runpy
import shlex
import socket
import ssl as ssl_module
import subprocess
import stat
import sys
import threading
import time
import traceback
import types
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, Generator, Iterator, List, Optional, Tuple, Union

try:  # Unix: the state_file lock (elsewhere a second gateway on one state_file is not stopped)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

if sys.version_info < (3, 9):  # else a TypeError from deep inside, on Ubuntu 20.04's 3.8
    raise SystemExit("odin_gateway needs Python 3.9 or newer; this is Python %d.%d"
                     % sys.version_info[:2])

try:  # the only third-party dependency; a clear message in main() if missing
    import nacl.bindings
    import nacl.exceptions
    import nacl.signing
except ImportError:  # pragma: no cover - exercised by hand
    nacl = None  # type: ignore[assignment]

log = logging.getLogger("odin_gateway")


# ---------------------------------------------------------------------------
# Limits and errors
# ---------------------------------------------------------------------------

# The limits on what one client may cost (request sizes, connections,
# timeouts) are settings: see Config below, which declares each with its reason.

#: Rooms in one page of Info (params {"rooms": {"after": hash, "limit": n}}):
#: the default, and the most one page may ask for (a page of 10,000 rooms is
#: about 2.5 MB of JSON; more would hold the loop as long as a whole listing).
INFO_PAGE_ROOMS = 1000
MAX_INFO_PAGE_ROOMS = 10_000
#: Seconds a gateway started without saved state waits, beyond one
#: update_interval, for every server to report before it places new rooms:
#: a report in flight, a server that retries after the gateway was down.
WARMUP_MARGIN = 2.0
#: Seconds of leeway for exp and nbf, as the original.
TOKEN_LEEWAY = 300
#: Largest integer JavaScript represents exactly; exp and nbf must be within.
MAX_SAFE_INTEGER = 2**53 - 1

# JSON-RPC 2.0 error codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603


class GatewayError(Exception):
    """Base class of every error this module raises on purpose."""


class ConfigError(GatewayError):
    """The configuration is missing, unreadable or holds a wrong value."""


class TokenError(GatewayError):
    """An Authorization header or bearer token was refused; str() is the reason."""


class RpcError(GatewayError):
    """A JSON-RPC call was refused; becomes the error object of the response."""

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict:
        error = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


def fields(event: str, **values: Any) -> dict:
    """Structured fields for a log record that is not a grid event (the access
    log's request lines): log.info(..., extra=fields("request", ...)).

    Grid events go through Gateway.event(), which also keeps them in the feed.
    The json log format writes the fields as keys of the line's object; the
    pretty format shows only the message, which says the same for people.
    """
    return {"event": event, "fields": values}


def refused(message: str, code: int = INVALID_REQUEST) -> RpcError:
    """An RpcError for a request a method handler turns down."""
    return RpcError(code, message)


# ---------------------------------------------------------------------------
# Encodings: base64, JSON the way JavaScript writes it, timestamps
# ---------------------------------------------------------------------------

_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*={0,2}")
_B64_RE = re.compile(r"[A-Za-z0-9+/]*={0,2}")


# binascii directly: base64's wrappers cost more than the conversion (per Connect, three).
_TO_URL_ALPHABET = bytes.maketrans(b"+/", b"-_")
_FROM_URL_ALPHABET = bytes.maketrans(b"-_", b"+/")


def b64url_encode(data: bytes) -> str:
    """URL-safe base64 without padding, as JWTs and JWKs use."""
    return binascii.b2a_base64(data, newline=False).translate(_TO_URL_ALPHABET).rstrip(
        b"=").decode("ascii")


def _strict_b64(text: str, alphabet: "re.Pattern[str]", table: Optional[bytes],
                what: str) -> bytes:
    # binascii silently skips characters outside the alphabet, so the
    # alphabet and the length are checked first.
    if not alphabet.fullmatch(text):
        raise ValueError("not " + what)
    stripped = text.rstrip("=")
    if len(stripped) % 4 == 1:
        raise ValueError("not %s: impossible length" % what)
    data = (stripped + "=" * (-len(stripped) % 4)).encode("ascii")
    return binascii.a2b_base64(data.translate(table) if table else data)


def b64url_decode(text: str) -> bytes:
    """Strict URL-safe base64, padding optional; ValueError on anything else."""
    return _strict_b64(text, _B64URL_RE, _FROM_URL_ALPHABET, "base64url")


if sys.version_info >= (3, 11):
    def _b64url_token(text: str) -> bytes:
        """b64url_decode of a token's segment (same bytes, ValueError for the same
        texts), in fewer steps: binascii's strict mode checks the alphabet. (Tokens
        are unpadded; padding, which strict mode reads otherwise, takes the long way.)"""
        if "=" in text:
            return b64url_decode(text)
        if "+" in text or "/" in text:
            raise ValueError("not base64url")
        data = (text + "=" * (-len(text) % 4)).encode("ascii")
        return binascii.a2b_base64(data.translate(_FROM_URL_ALPHABET), strict_mode=True)
else:  # no strict mode before 3.11
    _b64url_token = b64url_decode


def b64_decode(text: str) -> bytes:
    """Strict standard base64, padding optional; ValueError on anything else."""
    return _strict_b64(text, _B64_RE, None, "base64")


def b64_encode(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _escape_surrogate(match: "re.Match[str]") -> str:
    return "\\u%04x" % ord(match.group())


def _refuse_constant(name: str) -> Any:
    raise ValueError("%s is not JSON" % name)


# Immutable, so shareable; json.loads/dumps with options would build one per call.
_JSON_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
# The C scanner and encoder behind them, called directly: JSONEncoder.encode
# builds a new C encoder on every call. (None where the C accelerator is missing.)
_JSON_SCAN = _JSON_DECODER.scan_once
_C_ENCODE = json.encoder.c_make_encoder and json.encoder.c_make_encoder(  # type: ignore[attr-defined]
    None, _JSON_ENCODER.default, json.encoder.encode_basestring,  # type: ignore[attr-defined]
    None, ":", ",", False, False, False)


def _utf8(text: str) -> bytes:
    """UTF-8 as JavaScript's TextEncoder writes it: a lone surrogate becomes U+FFFD."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape
        return _SURROGATE_RE.sub("\ufffd", text).encode("utf-8")


def js_number(value: float) -> str:
    """A number as JavaScript's Number.prototype.toString writes it.

    Python and JavaScript agree on the shortest round-trip digits; they differ
    in where they switch to exponent notation and how they write it.
    """
    if value != value or value in (math.inf, -math.inf):
        raise ValueError("JSON has no representation for %r" % value)
    if value == 0:
        return "0"
    if isinstance(value, int):
        return str(value)
    sign = "-" if value < 0 else ""
    mantissa, _, exponent = repr(abs(value)).partition("e")
    int_part, _, frac_part = mantissa.partition(".")
    digits = (int_part + frac_part.rstrip("0")).lstrip("0") or "0"
    # n: position of the decimal point relative to the digit string.
    n = len(int_part.lstrip("0")) if int_part.strip("0") else -(
        len(frac_part) - len(frac_part.lstrip("0"))
    )
    n += int(exponent or 0)
    k = len(digits)
    if k <= n <= 21:
        return sign + digits + "0" * (n - k)
    if 0 < n <= 21:
        return sign + digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return sign + "0." + "0" * -n + digits
    e = n - 1
    e_text = ("+" if e >= 0 else "-") + str(abs(e))
    if k == 1:
        return sign + digits + "e" + e_text
    return sign + digits[0] + "." + digits[1:] + "e" + e_text


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _has_float(value: Any) -> bool:
    kind = type(value)
    if kind is dict:
        items: Any = value.values()
    elif kind is list or kind is tuple:
        items = value
    else:
        return isinstance(value, float)
    for item in items:
        kind = type(item)
        if kind is not str and kind is not int and _has_float(item):
            return True
    return False


def js_json(value: Any) -> str:
    """Compact JSON exactly as JavaScript's JSON.stringify writes it.

    No spaces, keys in insertion order, non-ASCII characters raw, integral
    floats without a fraction, lone surrogates escaped. Used for tokens, whose
    bytes are signed. Without floats the standard library writes the same.
    """
    if not _has_float(value):
        return _compact_json(value)
    if isinstance(value, dict):
        return "{" + ",".join(
            js_json(str(k)) + ":" + js_json(v) for k, v in value.items()
        ) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(js_json(v) for v in value) + "]"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return _SURROGATE_RE.sub(_escape_surrogate, text) if _SURROGATE_RE.search(text) else text
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return js_number(value)
    raise TypeError("cannot encode %s as JSON" % type(value).__name__)


def _compact_json(value: Any) -> str:
    """Compact JSON by the (C-accelerated) standard library, lone surrogates escaped."""
    text = "".join(_C_ENCODE(value, 0)) if _C_ENCODE else _JSON_ENCODER.encode(value)
    if text.isascii() or not _SURROGATE_RE.search(text):
        return text
    return _SURROGATE_RE.sub(_escape_surrogate, text)


def dump_json(value: Any) -> bytes:
    """A response body: compact UTF-8 JSON (floats as Python writes them)."""
    return _compact_json(value).encode("utf-8")


#: A Connect's answer, in the order dump_json writes it (answer_json).
_CONNECT_ANSWER = '{"jsonrpc":"2.0","result":{"address":%s,"token":%s},"id":%s}'
_ANSWER_KEYS, _CONNECT_RESULT_KEYS = ["jsonrpc", "result", "id"], ["address", "token"]


def answer_json(answer: dict) -> bytes:
    """dump_json of one JSON-RPC answer, byte for byte; a Connect's answer
    (the usual one) is written into a template, which costs a third as much."""
    result = answer.get("result")
    if type(result) is dict and list(result) == _CONNECT_RESULT_KEYS and list(
            answer) == _ANSWER_KEYS:
        address, token, request_id = result["address"], result["token"], answer["id"]
        if (type(address) is str and type(token) is str
                and (type(request_id) is int or type(request_id) is str)):
            text = _CONNECT_ANSWER % (_JSON_STRING(address), _JSON_STRING(token), _JSON_STRING(
                request_id) if type(request_id) is str else int.__repr__(request_id))
            if text.isascii() or not _SURROGATE_RE.search(text):
                return text.encode("utf-8")
            return _SURROGATE_RE.sub(_escape_surrogate, text).encode("utf-8")
    return dump_json(answer)


def load_json(data: bytes) -> Any:
    """Strict JSON from UTF-8 bytes; ValueError for anything JSON.parse refuses."""
    return _parse_json(data.decode("utf-8"))


def _parse_json(text: str) -> Any:
    try:
        try:  # the scanner alone, for text without surrounding whitespace
            value, end = _JSON_SCAN(text, 0)
            if end == len(text):
                return value
        except StopIteration:
            pass
        return _JSON_DECODER.decode(text)  # whitespace, or the error's message
    except RecursionError as err:
        raise ValueError("JSON nested too deeply") from err


# A big report is parsed in steps, so that the loop serves other requests in
# between: its rooms array is cut at commas into pieces of about
# JSON_STEP_CHARS, each parsed as an array of its own, and the rest of the
# body is parsed with a random marker as the array's first element. JSON's
# grammar makes this exact: if every piece is a non-empty array and the rest
# parses with the marker where the rooms were, the whole body is valid JSON
# and its rooms are the pieces' elements in order. Anything else (a cut that
# fell inside a string, "rooms" met elsewhere first, a duplicate key that
# wins) parses the whole body at once, as load_json does.

#: A body not parsed yet (load_json_in_steps parses big ones before dispatch).
_UNPARSED = object()
#: Rooms of a big report hashed in one step before it is integrated (Grid.prepare_rooms).
PREPARE_STEP_ROOMS = 1000
#: Characters of a rooms array parsed in one step (about 1,000 rooms).
JSON_STEP_CHARS = 100_000
_ROOMS_ARRAY = re.compile(r'"rooms"[ \t\n\r]*:[ \t\n\r]*\[')
_BETWEEN_OBJECTS = re.compile(r'\}[ \t\n\r]*,[ \t\n\r]*\{')


def load_json_in_steps(data: bytes, read_rooms: Optional[Callable[[str, int], Generator[None, None, Any]]]
                       = None) -> Generator[None, None, Any]:
    """load_json(data) as a generator: it yields between the steps of a long
    rooms array and returns the value (ValueError as load_json raises it).
    read_rooms: read_rooms_in_steps for the text and where its rooms array
    starts, to try before parsing (its value, unless None)."""
    text = data.decode("utf-8")
    found = _ROOMS_ARRAY.search(text)
    if found is not None and read_rooms is not None:
        value = yield from read_rooms(text, found.end())
        if value is not None:
            return value
    if found is None or len(text) - found.end() < 2 * JSON_STEP_CHARS:
        return _parse_json(text)
    rooms: List[Any] = []
    start = found.end()  # just after the array's "["
    while True:
        cut = _BETWEEN_OBJECTS.search(text, start + JSON_STEP_CHARS)
        if cut is None or len(text) - cut.end() < JSON_STEP_CHARS:
            break
        try:
            piece = _parse_json("[" + text[start:cut.start() + 1] + "]")
        except ValueError:
            piece = []
        if not piece:  # the cut fell inside a string: no shortcut
            return _parse_json(text)
        rooms.extend(piece)
        start = cut.end() - 1  # the next object's "{"
        yield
    value, marker = _parse_marked(text, found.end(), start, ",")
    params = value.get("params") if isinstance(value, dict) else None
    listed = params.get("rooms") if isinstance(params, dict) else None
    if not (isinstance(listed, list) and listed and listed[0] == marker):
        return _parse_json(text)
    rooms.extend(listed[1:])
    params["rooms"] = rooms
    return value


def _parse_marked(text: str, start: int, end: int, glue: str = "") -> Tuple[Any, str]:
    """(JSON of text with text[start:end] replaced by an unguessable string
    and glue, that string): where the string lands in the value tells where
    the replaced text stood."""
    marker = "\0" + os.urandom(8).hex()  # what no sender can guess
    return _parse_json(text[:start] + '"\\u0000%s"' % marker[1:] + glue + text[end:]), marker


# A server reports its rooms every few seconds, and each report mostly
# repeats the one before: only the rooms' ages always change, their peers
# now and then. So a report's rooms array in the form servers write it,
#     [{"id": [ns, name], "customer": c, "age": {"secs": s, "nanos": n}, "peers": p}, ...]
# (strings without escapes, integers of at most 18 digits, whitespace as
# servers write it), is read from its text: cut at the ages, the text between two ages
# (a seam: the end of one room, its peers, and the start of the next, its id
# and customer) is compared with the seams of the same server's previous
# report, and only new seams are matched against the grammar above; the
# ages are the only numbers converted. Exact: each piece matches a regular
# grammar that JSON reads one way only (no escapes, every key once, numbers
# int() reads as json.loads does), and the rest of the body is parsed by
# json.loads with a marker where the array was, as above. Anything else
# (another order of keys, an escape, a float, a seam that does not match)
# is parsed by json.loads as before.

#: The methods whose rooms are read from the text (read_rooms_in_steps).
REPORT_METHODS = ("sfu.Report", "SubmitReport")
_W = r"[ \t\n\r]*"  # JSON's whitespace (\s is more)
_STRING = r'"([^"\\\x00-\x1f]*)"'  # a string without escapes, its text captured
_INTEGER = r"(0|[1-9][0-9]{0,17})"
_ROOM_START = _W.join(("", r"\{", '"id"', ":", r"\[", _STRING, ",", _STRING, r"\]", ",", '"customer"', ":",
                       _STRING, ",", ""))
_ROOM_END = _W.join(("", ",", '"peers"', ":", _INTEGER, r"\}"))
# (Ages as JSON.stringify, serde_json or json.dumps write them: a space
# after the colons and commas or none; JSON's every whitespace costs a
# quarter more, and the odd report is parsed by json.loads.)
_AGE_TEXT = re.compile(" ?".join(('"age":', r"\{", '"secs":', _INTEGER + ",", '"nanos":', _INTEGER + r"\}")))
_FIRST_SEAM = re.compile(_ROOM_START)
_SEAM = re.compile(_ROOM_END + _W + "," + _ROOM_START)
_LAST_SEAM = re.compile(_ROOM_END + _W + r"\]")


class RoomsText:
    """A report's rooms read from its text (read_rooms_in_steps): their
    columns (RoomColumns), and its seams joined by NULs (which no seam holds;
    one string costs half a list of them), to read the server's next report by.
    Seam i starts room i + 1 and ends room i."""

    __slots__ = ("columns", "seams")

    def __init__(self, columns: "RoomColumns", seams: str):
        self.columns = columns
        self.seams = seams


def read_rooms_in_steps(text: str, start: int, previous_of: Callable[[dict], Optional[RoomsText]]
                        ) -> Generator[None, None, Any]:
    """The JSON value of text, a report whose rooms array starts at start
    (just after its "["), with params["rooms"] a RoomsText; None if the text
    is not in that form. Yields between steps. previous_of(params): what the
    reporting server's previous report read (its seams are not matched again)."""
    parts: List[str] = []  # seam, secs, nanos, seam, ..., seam
    position = start
    while True:  # cut at the ages, about JSON_STEP_CHARS at a time
        cut = _AGE_TEXT.search(text, position + JSON_STEP_CHARS)
        parts += _AGE_TEXT.split(text[position:cut.start() if cut else len(text)])
        if cut is None:
            break
        parts += cut.groups()
        position = cut.end()
        yield
    texts, secs, nanos = parts[0::3], parts[1::3], parts[2::3]
    first, last = _FIRST_SEAM.fullmatch(texts[0]), _LAST_SEAM.match(texts[-1])
    if not secs or first is None or last is None:
        return None
    try:  # the rest of the body, the array replaced by a marker
        value, marker = _parse_marked(text, start - 1, len(text) - len(texts[-1]) + last.end())
    except ValueError:
        return None
    params = value.get("params") if isinstance(value, dict) else None
    if not (isinstance(params, dict) and params.get("rooms") == marker
            and value.get("method") in REPORT_METHODS):
        return None
    seams = texts[1:-1]
    joined = "\0".join(seams)  # as many seams, and the same text: the same seams
    previous = previous_of(params)
    known, (ids, customers, _, peers) = (previous.seams, previous.columns) if previous else ("", ([],) * 4)
    # What the known seams say: the rooms they start (ids, customers), those they end (peers).
    ids, customers, peers = ids[1:], customers[1:], peers[:-1]
    if len(seams) != len(ids) or joined != known:  # rooms came, went, or changed their peers:
        # the seams known say what they said; the others are matched
        rows = list(map(dict(zip(known.split("\0") if ids else (), itertools.count())).get, seams))
        for count, index in enumerate([index for index, row in enumerate(rows) if row is None], 1):
            seam = _SEAM.fullmatch(seams[index])
            if seam is None:
                return None
            ended, namespace, name, customer = seam.groups()
            rows[index] = len(ids)
            ids.append((namespace, name))
            customers.append(customer)
            peers.append(int(ended))
            if count % PREPARE_STEP_ROOMS == 0:
                yield
        ids, customers, peers = (list(map(column.__getitem__, rows)) for column in (ids, customers, peers))
    namespace, name, customer = first.groups()
    columns = ([(namespace, name)] + ids, [customer] + customers,
               list(zip(map(int, secs), map(int, nanos))), peers + [int(last.group(1))])
    params["rooms"] = RoomsText(columns, joined)
    return value


def iso_time(seconds: float) -> str:
    """A timestamp as JavaScript's Date.prototype.toISOString writes it."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (moment.microsecond // 1000)


def printable(text: Any, limit: int = 200) -> str:
    """Text from a request, safe to log: control characters escaped, length capped."""
    text = str(text)
    if len(text) > limit:
        text = text[:limit] + "..."
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


# ---------------------------------------------------------------------------
# Keys: access keys, key ids, derived server keys
# ---------------------------------------------------------------------------

ACCESS_KEY_VERSION = 0x01
CUSTOMER_KID_PREFIX = 0x01
SERVER_KID_PREFIX = 0x02


def crc8(data: bytes) -> int:
    """CRC-8, polynomial 0x31, initial value 0xFF, no reflection, no final xor."""
    crc = 0xFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def key_id(prefix: int, public_key: bytes) -> str:
    """kid = b64(prefix || SHA-512(public key) folded to 8 bytes by xor)."""
    digest = hashlib.sha512(public_key).digest()
    folded = bytearray(8)
    for offset in range(0, 64, 8):
        for j in range(8):
            folded[j] ^= digest[offset + j]
    return b64_encode(bytes([prefix]) + bytes(folded))


def access_key_seed(access_key: str) -> bytes:
    """The 32-byte Ed25519 seed of an ODIN access key; ValueError if invalid.

    An access key is b64(0x01 || 31 random bytes || crc8 of those bytes); the
    seed is everything after the version byte, checksum included. The
    URL-safe alphabet is tolerated, as the original token library does.
    """
    try:
        raw = b64_decode(access_key.replace("-", "+").replace("_", "/"))
    except (ValueError, AttributeError) as err:
        raise ValueError("invalid access key") from err
    if len(raw) != 33 or raw[0] != ACCESS_KEY_VERSION or crc8(raw[1:]) != 0:
        raise ValueError("invalid access key")
    return raw[1:]


def generate_access_key() -> str:
    """A new random ODIN access key (keep it secret; give the gateway its public_jwk)."""
    body = os.urandom(31)
    return b64_encode(bytes([ACCESS_KEY_VERSION]) + body + bytes([crc8(body)]))


class SigningKey:
    """An Ed25519 key pair with its kid; signs JWTs."""

    __slots__ = ("kid", "seed", "public", "jwt_header", "jwt_prefix", "_secret")

    def __init__(self, seed: bytes, kid_prefix: int, kid: Optional[str] = None):
        if len(seed) != 32:
            raise ValueError("an Ed25519 seed has 32 bytes, not %d" % len(seed))
        self.seed = bytes(seed)
        self.public, self._secret = nacl.bindings.crypto_sign_seed_keypair(self.seed)
        self.kid = kid if kid is not None else key_id(kid_prefix, self.public)
        # The first segment of every JWT this key signs: the same each time.
        self.jwt_header = b64url_encode(js_json({"alg": "EdDSA", "kid": self.kid}).encode("utf-8"))
        self.jwt_prefix = self.jwt_header.encode("ascii") + b"."  # what sign_jwt starts from

    def sign(self, message: bytes) -> bytes:
        # PyNaCl's bindings return signature || message; the signature is 64 bytes.
        return nacl.bindings.crypto_sign(message, self._secret)[:64]

    def verify(self, message: bytes, signature: bytes) -> bool:
        return _verify(self.public, message, signature)

    def public_jwk(self) -> dict:
        return {"kid": self.kid, "kty": "OKP", "crv": "Ed25519", "x": b64url_encode(self.public)}

    def private_jwk(self) -> dict:
        return dict(self.public_jwk(), d=b64url_encode(self.seed))


def public_jwk(access_key: str) -> dict:
    """The public JWK (kid, kty, crv, x) of an access key, for the gateway's customers."""
    return SigningKey(access_key_seed(access_key), CUSTOMER_KID_PREFIX).public_jwk()


def hkdf_sha512(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF (RFC 5869) with SHA-512; the standard library has no HKDF."""
    prk = hmac.new(salt, ikm, hashlib.sha512).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha512).digest()
        okm += block
        counter += 1
    return okm[:length]


def derive_server_key(master_key: bytes, hostname: str) -> SigningKey:
    """The signing key of the server named hostname: a pure function of the master key.

    Tokens therefore stay valid across gateway restarts, and a server gets the
    same key every time it asks.
    """
    okm = hkdf_sha512(master_key, _utf8(hostname), b"grid-connection-key", 512)
    return SigningKey(hashlib.sha256(okm).digest(), SERVER_KID_PREFIX)


class VerifyKey:
    """A customer's Ed25519 public key, from a JWK."""

    __slots__ = ("kid", "public")

    def __init__(self, kid: str, public: bytes):
        if len(public) != 32:
            raise ValueError("x is %d bytes long; an Ed25519 public key has 32" % len(public))
        nacl.signing.VerifyKey(public)  # refuses what libsodium cannot use, now rather than later
        self.kid = kid
        self.public = bytes(public)

    def verify(self, message: bytes, signature: bytes) -> bool:
        return _verify(self.public, message, signature)


def _verify(public: bytes, message: bytes, signature: bytes) -> bool:
    """Ed25519 verification that answers False for anything PyNaCl refuses."""
    if len(signature) != 64:
        return False
    try:
        nacl.bindings.crypto_sign_open(signature + message, public)
        return True
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        return False


# ---------------------------------------------------------------------------
# Tokens: JWT with EdDSA, the room token, client tokens
# ---------------------------------------------------------------------------


def encode_jwt(claims: dict, key: SigningKey) -> str:
    """b64url(header).b64url(claims).b64url(Ed25519 signature of the first two)."""
    return sign_jwt(js_json(claims), key)


def sign_jwt(claims_json: str, key: SigningKey) -> str:
    """A JWT of claims already written as JSON (encode_jwt's second half)."""
    # In bytes throughout: each step is one C call, and nothing is decoded twice.
    signing_input = key.jwt_prefix + binascii.b2a_base64(
        claims_json.encode("utf-8"), newline=False).translate(_TO_URL_ALPHABET).rstrip(b"=")
    signature = binascii.b2a_base64(key.sign(signing_input), newline=False)
    return (signing_input + b"." + signature.translate(_TO_URL_ALPHABET).rstrip(b"=")).decode("ascii")


def create_token(
    access_key: str,
    room_id: Any,
    user_id: str,
    *,
    audience: Any = None,
    subject: Any = "connect",
    lifetime: float = 300,
    customer: Optional[str] = None,
    internal: Optional[dict] = None,
    now: Optional[float] = None,
) -> str:
    """A client token signed with an access key, byte-identical to the ODIN token library.

    room_id is a string or a list of strings; audience is e.g. "gateway";
    subject is a method name or a list of them; internal is e.g.
    {"server": "host:4433"} to pin the room to one server, or {"region":
    "eu-central"} for the region a new room prefers. now defaults to
    the current time.
    """
    if not (_is_integer(lifetime) or (isinstance(lifetime, float) and lifetime.is_integer())):
        # A fractional exp is not a safe integer: the gateway would refuse the token.
        raise ValueError("lifetime must be a whole number of seconds")
    key = SigningKey(access_key_seed(access_key), CUSTOMER_KID_PREFIX)
    nbf = int(time.time() if now is None else now)
    lifetime = int(lifetime)
    claims: dict = {"rid": room_id, "uid": user_id}
    if customer is not None:
        claims["cid"] = customer
    if subject is not None:
        claims["sub"] = subject
    if audience is not None:
        claims["aud"] = audience
    claims["exp"] = nbf + lifetime
    claims["nbf"] = nbf
    if internal is not None:
        claims["internal"] = internal
    return encode_jwt(claims, key)


#: The claims of a room token, in the order the original writes them.
_ROOM_CLAIMS = ('{"uid":%s,"cid":%s,"rid":%s,"nsp":%s,"adr":%s,"sub":"connect","aud":"sfu",'
                '"exp":%d,"nbf":%d}')
_JSON_STRING = json.encoder.encode_basestring  # type: ignore[attr-defined]


def room_claims_json(uid: str, cid: str, rid: Any, nsp: str, adr: str, exp: int, nbf: int) -> str:
    """js_json of a room token's claims ({"uid": uid, "cid": cid, ...}), byte for
    byte: strings (rid: one or a list), whole numbers, no floats. Written into
    a template, which costs a third of encoding the dict on every Connect."""
    string = _JSON_STRING
    text = _ROOM_CLAIMS % (string(uid), string(cid), string(rid) if type(rid) is str else
                           _compact_json(rid), string(nsp), string(adr), exp, nbf)
    if text.isascii() or not _SURROGATE_RE.search(text):
        return text
    return _SURROGATE_RE.sub(_escape_surrogate, text)


class Licensee:
    """Who pays for a request: a customer id and its limits (None: unlimited)."""

    __slots__ = ("customer_id", "peer_limit", "room_limit")

    def __init__(self, customer_id: str, peer_limit: Optional[int] = None,
                 room_limit: Optional[int] = None):
        self.customer_id = customer_id
        self.peer_limit = peer_limit
        self.room_limit = room_limit

    def __repr__(self) -> str:
        return "Licensee(%r, peer_limit=%r, room_limit=%r)" % (
            self.customer_id, self.peer_limit, self.room_limit)


class Authorization:
    """The outcome of a successful authorization: licensee, namespace and claims."""

    __slots__ = ("licensee", "namespace", "claims")

    def __init__(self, licensee: Licensee, namespace: Optional[str], claims: dict):
        self.licensee = licensee
        self.namespace = namespace
        self.claims = claims


class CustomerKey:
    """A customer's access key as the gateway knows it: public key, owner, namespace."""

    __slots__ = ("verify_key", "licensee", "namespace")

    def __init__(self, verify_key: VerifyKey, licensee: Licensee, namespace: str):
        self.verify_key = verify_key
        self.licensee = licensee
        self.namespace = namespace


# The kinds of key a token's kid can name (section "Verifying a bearer token").
KEY_CUSTOMER, KEY_SERVER, KEY_DEMO, KEY_UNKNOWN = "customer", "server", "demo", "unknown"


def _token_json(segment: str) -> dict:
    """A header or claims segment: b64url JSON of an object (TokenError otherwise)."""
    try:
        data = _b64url_token(segment)
        # Invalid UTF-8 becomes U+FFFD as in the original; the signature
        # covers the raw bytes, so this changes no verdict.
        value = _parse_json(data.decode("utf-8", "replace"))
    except ValueError as err:
        raise TokenError("invalid json in token") from err
    if not isinstance(value, dict):
        raise TokenError("json, in token, must be a object")
    return value


def _is_safe_integer(value: Any) -> bool:
    if type(value) is int:  # the usual exp and nbf, checked on every Connect
        return -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, float) and not value.is_integer():
        return False
    return abs(value) <= MAX_SAFE_INTEGER


def _is_string_or_strings(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(item, str) for item in value))


#: Most distinct token header segments an Authorizer keeps decoded.
TOKEN_HEADER_CACHE = 256


class Authorizer:
    """Checks Authorization headers against a key set; no I/O, time is passed in.

    Lookups: customer_keys (kid -> CustomerKey), server_keys (a callable
    kid -> SigningKey or None, the keys of the servers the gateway knows),
    and unknown_limits: a Licensee template for unknown kids, or None when
    unknown customers are forbidden.
    """

    def __init__(self, customer_keys: Dict[str, CustomerKey],
                 server_keys: Callable[[str], Optional[SigningKey]],
                 unknown_limits: Optional[Tuple[Optional[int], Optional[int]]]):
        self.customer_keys = customer_keys
        self.server_keys = server_keys
        self.unknown_limits = unknown_limits
        # Decoded header segments: a customer's tokens share theirs. (The
        # signature is checked on every token all the same.)
        self._headers: Dict[str, dict] = {}

    def authorize(self, header: Optional[str], now: float, *,
                  required_claims: Tuple[str, ...] = (),
                  basic_users: Optional[Dict[str, str]] = None,
                  allow_unsigned: bool = False) -> Authorization:
        """Authorization for an Authorization header value; TokenError if refused."""
        scheme, credentials = split_authorization(header)
        scheme = scheme.lower()
        if scheme == "bearer":
            return self.verify_token(credentials, now, required_claims=required_claims,
                                     allow_unsigned=allow_unsigned)
        if scheme == "basic":
            return check_basic(credentials, basic_users or {})
        raise TokenError("invalid authorization")

    def verify_token(self, token: str, now: float, *, required_claims: Tuple[str, ...] = (),
                     allow_unsigned: bool = False) -> Authorization:
        """Verify a bearer token in the documented order; the first failure wins."""
        segments = token.split(".")
        if len(segments) != 3:
            raise TokenError("token must have three segments")
        head, body, signature = segments
        entry = self._headers.get(head)
        if entry is None:
            entry = _token_header(head)
            if len(self._headers) >= TOKEN_HEADER_CACHE:
                self._headers.clear()
            self._headers[head] = entry
        kid, alg = entry  # alg: "EdDSA" (an Ed25519 curve, if named), "none", or refused
        key = self.customer_keys.get(kid)
        kind = KEY_CUSTOMER if key is not None else None
        if kind is None:
            key = self.server_keys(kid)
            kind = KEY_SERVER if key is not None else KEY_DEMO \
                if self.unknown_limits is not None else KEY_UNKNOWN
        if alg == "EdDSA":
            if kind is KEY_CUSTOMER or kind is KEY_SERVER:
                try:
                    signed = (head + "." + body).encode("ascii")
                    valid = _verify(key.verify_key.public if kind is KEY_CUSTOMER else key.public,
                                    signed, _b64url_token(signature))
                except (ValueError, UnicodeEncodeError):
                    valid = False
                if not valid:
                    raise TokenError("invalid signature in token")
        elif alg == "none":
            if not allow_unsigned:
                raise TokenError("token has not been signed")
        else:
            raise TokenError(alg)

        claims = _token_json(body)
        if kind is KEY_CUSTOMER:
            authorization = Authorization(key.licensee, key.namespace, claims)
        elif kind is KEY_SERVER:
            if not isinstance(claims.get("cid"), str):
                raise TokenError("cid must be a string")
            if not isinstance(claims.get("nsp"), str):
                raise TokenError("nsp must be a string")
            authorization = Authorization(Licensee(claims["cid"]), claims["nsp"], claims)
        elif kind is KEY_DEMO:
            peers, rooms = self.unknown_limits  # type: ignore[misc]
            authorization = Authorization(Licensee("demo_" + kid, peers, rooms), None, claims)
        else:
            raise TokenError("not authorized")

        get = claims.get
        sub = get("sub", _MISSING)
        if sub is not _MISSING and sub.__class__ is not str and not _is_string_or_strings(sub):
            raise TokenError("invalid sub in token")
        aud = get("aud", _MISSING)
        if aud is not _MISSING:
            if not _is_string_or_strings(aud):
                raise TokenError("invalid aud in token")
            if aud != "gateway" and not (isinstance(aud, list) and "gateway" in aud):
                raise TokenError("token audience does not match")
        exp, nbf = get("exp", _MISSING), get("nbf", _MISSING)
        if not (exp.__class__ is int and nbf.__class__ is int  # the usual: both safe, known at once
                and -MAX_SAFE_INTEGER <= exp <= MAX_SAFE_INTEGER
                and -MAX_SAFE_INTEGER <= nbf <= MAX_SAFE_INTEGER):
            if exp is not _MISSING and not _is_safe_integer(exp):
                raise TokenError("invalid exp in token")
            if nbf is not _MISSING and not _is_safe_integer(nbf):
                raise TokenError("invalid nbf in token")
        if exp is not _MISSING and now - exp > TOKEN_LEEWAY:
            raise TokenError("token has expired")
        if nbf is not _MISSING and nbf - now > TOKEN_LEEWAY:
            raise TokenError("token not yet valid")
        for name in required_claims:
            if name not in claims:
                raise TokenError("missing required claims in token")
        return authorization


def _token_header(segment: str) -> Tuple[str, str]:
    """(kid, alg) of a token's header segment, kept per Authorizer: a customer's
    tokens share theirs. alg is "EdDSA", "none", or the message refusing it
    (refused after the key lookup, as the documented order says)."""
    header = _token_json(segment)
    kid = header.get("kid")
    if type(kid) is not str:
        if not (isinstance(kid, (int, float)) and not isinstance(kid, bool)
                and math.isfinite(kid)):
            raise TokenError("invalid or missing kid in token")
        kid = js_number(kid)
    alg = header.get("alg")
    if alg == "EdDSA":
        if "crv" in header and header["crv"] != "Ed25519":
            alg = "unsupported crv in token"
    elif alg != "none":
        alg = "unsupported alg in token"
    return kid, alg


def split_authorization(header: Optional[str]) -> Tuple[str, str]:
    """(scheme, credentials) of an Authorization header value.

    Split at spaces as the original does ("Bearer  x" has empty credentials);
    more than one space-separated credential is refused (the original
    silently ignored the rest).
    """
    parts = (header or "").split(" ")
    if len(parts) == 2 and parts[0] and parts[1] and parts[1].isprintable():
        return parts[0], parts[1]  # the usual: printable text after one space has no whitespace
    scheme, credentials = parts[0], parts[1] if len(parts) > 1 else ""
    if not scheme or not credentials:
        raise TokenError("missing authorization")
    # Printable text without a space has no whitespace: the scan is skipped.
    if len(parts) > 2 or not (credentials.isprintable() and " " not in credentials) and \
            _WHITESPACE_RE.search(credentials):
        raise TokenError("invalid authorization")
    return scheme, credentials


_WHITESPACE_RE = re.compile(r"\s")
_DUMMY_PASSWORD = b"\x00" * 32


def check_basic(credentials: str, users: Dict[str, str]) -> Authorization:
    """Basic credentials against a user table, compared in constant time.

    RFC 7617: the user id ends at the first colon; the password is the rest
    and may itself contain colons.
    """
    try:
        user, password = b64_decode(credentials).decode("utf-8").split(":", 1)
    except ValueError as err:  # not base64, not UTF-8 or no colon
        raise TokenError("invalid credentials") from err
    expected = users.get(user)
    # Compare against a dummy for unknown users so timing reveals nothing.
    matched = hmac.compare_digest(
        password.encode("utf-8"),
        expected.encode("utf-8") if isinstance(expected, str) else _DUMMY_PASSWORD)
    if expected is None or not matched:
        raise TokenError("invalid credentials")
    return Authorization(Licensee(user), None, {})


# ---------------------------------------------------------------------------
# Configuration: every setting declared once, with its default and check
# ---------------------------------------------------------------------------

#: The well-known master key of the original's sample configuration.
DEFAULT_MASTER_KEY = "VGhpcyBpcyBhIHN1cGVyIHNlY3JldCBtYXN0ZXIga2V5IQ=="
#: Shorter master keys are guessable; keygen --master makes 32 random bytes.
MIN_MASTER_KEY_BYTES = 32
#: Key id of the sample config's demo customer, whose access key README.md prints.
PUBLISHED_DEMO_KID = "ARjlCj4VESC3"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: Why a value is wrong for a setting, or None when it is fine.
Check = Callable[[Any], Optional[str]]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_limit(value: Any) -> bool:
    return value is None or (_is_integer(value) and value >= 0)


def _did_you_mean(value: Any, choices: Tuple[str, ...]) -> str:
    """' (did you mean "random"?)' for a string close to one of choices (any case), or ''."""
    if not isinstance(value, str):
        return ""
    lowered = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(value.lower(), list(lowered), n=1)
    return ' (did you mean "%s"?)' % lowered[close[0]] if close else ""


def _one_of(*choices: str) -> Check:
    expected = "expected " + " or ".join('"%s"' % choice for choice in choices)
    return lambda value: None if value in choices else expected + _did_you_mean(value, choices)


def _log_level(value: Any) -> Optional[str]:
    if isinstance(value, str) and value.upper() in LOG_LEVELS:
        return None
    return "expected one of %s%s" % (", ".join(LOG_LEVELS), _did_you_mean(value, LOG_LEVELS))


def _non_empty_string(value: Any) -> Optional[str]:
    return None if isinstance(value, str) and value else "expected a non-empty string"


def _host(value: Any) -> Optional[str]:
    if _non_empty_string(value):
        return _non_empty_string(value)
    if value.count(":") == 1 or "/" in value:  # localhost:7000, http://0.0.0.0 (IPv6 has more)
        return "expected an address or host name alone (the port is the port setting, --port)"
    return None


def _network(value: Any) -> Optional[str]:
    try:
        ipaddress.ip_network(value, strict=False)
    except (TypeError, ValueError):
        return "expected a CIDR network such as 0.0.0.0/0 or 10.0.0.0/8"
    return _non_empty_string(value)


def _port(value: Any) -> Optional[str]:
    return None if _is_integer(value) and 0 <= value <= 65535 else "expected an integer from 0 to 65535"


def _boolean(value: Any) -> Optional[str]:
    return None if isinstance(value, bool) else "expected True or False"


def _positive_integer(value: Any) -> Optional[str]:
    return None if _is_integer(value) and value > 0 else "expected a positive integer"


def _positive_seconds(value: Any) -> Optional[str]:
    return None if _is_number(value) and value > 0 else "expected a positive number of seconds"


def _seconds_or_none(value: Any) -> Optional[str]:
    if value is None or (_is_number(value) and value > 0):
        return None
    return "expected a positive number of seconds, or None"


def _token_lifetime(value: Any) -> Optional[str]:
    if _is_integer(value) and value > 0:
        return None
    return "expected a positive whole number of seconds (it becomes the tokens' exp)"


def _master_key(value: Any) -> Optional[str]:
    try:
        if isinstance(value, str) and b64_decode(value):
            return None
    except ValueError:
        pass
    return "expected a non-empty base64 string (make one with: python odin_gateway.py keygen --master)"


def _redis_url(value: Any) -> Optional[str]:
    if value is None or (isinstance(value, str) and value.startswith(("redis://", "rediss://", "unix://"))):
        return None
    return "expected None or a Redis URL (redis://[:password@]host:port/db, rediss://, unix://)"


def _warmup(value: Any) -> Optional[str]:
    if value is None or (_is_number(value) and value >= 0):
        return None
    return "expected None (update_interval + %g s) or a number of seconds (0: no warm-up)" % WARMUP_MARGIN


def _state_file(value: Any) -> Optional[str]:
    if value is None or (isinstance(value, str) and value):
        return None
    return "expected None or the path of a file the gateway may write"


#: A region or pool name: 1 to 64 characters without whitespace or control
#: characters (names show in logs, Info and metric labels).
LABEL_RE = re.compile(r"[^\s\x00-\x1f\x7f]{1,64}")
#: Most pools one server may belong to.
MAX_SERVER_POOLS = 16
#: The keys of one server_labels rule.
SERVER_LABEL_KEYS = ("match", "region", "pools")


def _label_problem(value: Any) -> Optional[str]:
    """Why value is not a region or pool name, or None."""
    if isinstance(value, str) and LABEL_RE.fullmatch(value):
        return None
    return "must be a name of 1 to 64 characters without spaces"


def _pools_problem(value: Any) -> Optional[str]:
    """Why value is not a server's list of pools, or None."""
    if (isinstance(value, (list, tuple)) and len(value) <= MAX_SERVER_POOLS
            and not any(_label_problem(pool) for pool in value)):
        return None
    return "must be a list of at most %d pool names (1 to 64 characters without spaces)" % (
        MAX_SERVER_POOLS)


def _check_server_labels(rules: Any) -> Optional[str]:
    """Why a server_labels list is malformed, or None."""
    if not isinstance(rules, list):
        return 'expected a list of {"match": "hostname pattern", "region": name, "pools": [names]}'
    for index, rule in enumerate(rules):
        where = "rule #%d" % (index + 1)
        if not isinstance(rule, dict):
            return '%s: expected {"match": "hostname pattern", "region": name, "pools": [names]}' % where
        unknown = [key for key in rule if key not in SERVER_LABEL_KEYS]
        if unknown:
            return "%s: unknown key %s (known: %s)" % (
                where, ", ".join(printable(repr(key), 40) for key in unknown), ", ".join(SERVER_LABEL_KEYS))
        if not isinstance(rule.get("match"), str) or not rule["match"]:
            return '%s: match must be a hostname pattern such as "sfu-eu-*:4433"' % where
        where = "rule %s" % printable(repr(rule["match"]), 80)
        if "region" not in rule and "pools" not in rule:
            return "%s: expected a region, pools or both" % where
        if rule.get("region") is not None and _label_problem(rule["region"]):
            return "%s: region %s" % (where, _label_problem(rule["region"]))
        if "pools" in rule and _pools_problem(rule["pools"]):
            return "%s: pools %s" % (where, _pools_problem(rule["pools"]))
    return None


def _check_region_fallback(value: Any) -> Optional[str]:
    """Why a region_fallback table is malformed, or None."""
    if not isinstance(value, dict):
        return 'expected {"region": ["next region", ...], ...}'
    for region, order in value.items():
        if _label_problem(region):
            return "region %s: %s" % (printable(repr(region), 80), _label_problem(region))
        if not isinstance(order, (list, tuple)) or any(_label_problem(other) for other in order):
            return "%s: expected a list of region names" % region
        if region in order or len(set(order)) != len(order):
            return "%s: the fallback order must not repeat a region or name %s itself" % (region, region)
    return None


def _camel(snake: str) -> str:
    return re.sub(r"_(\w)", lambda m: m.group(1).upper(), snake)


def _pick(mapping: dict, snake: str, default: Any = None) -> Any:
    """mapping[snake], also accepting the original's camelCase spelling."""
    if snake in mapping:
        return mapping[snake]
    return mapping.get(_camel(snake), default)


#: The keys of a customer, of one of its access keys, of unknown_customers and
#: of customer_api (camelCase spellings of the first three are accepted too).
CUSTOMER_KEYS = ("id", "max_peers", "max_rooms", "access_keys", "region", "pool")
ACCESS_KEY_KEYS = ("public_key", "namespace")
LIMIT_KEYS = ("max_peers", "max_rooms")
CUSTOMER_API_KEYS = ("update_function", "update_interval")


def _unknown_key(mapping: dict, known: Tuple[str, ...], camel: bool = True) -> Optional[str]:
    """'unknown key ...' naming the first key of mapping that is not known, and the
    nearest known one: a misspelled limit must not silently mean no limit. A key
    given in both spellings (max_peers and maxPeers) is refused too: one would be
    silently ignored."""
    names = known + tuple(_camel(name) for name in known) if camel else known
    for key in mapping:
        if key not in names:
            loose = str(key).lower().replace("_", "")  # ID, publickey, Max_Peers
            same_but_case = [name for name in names if name.lower().replace("_", "") == loose]
            close = same_but_case or difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = "did you mean %r?" % close[0] if close else "known: %s" % ", ".join(known)
            return "unknown key %s (%s)" % (printable(repr(key), 40), hint)
    for name in known:
        if camel and name != _camel(name) and name in mapping and _camel(name) in mapping:
            return "both %r and %r are given; keep one" % (name, _camel(name))
    return None


def _customer_problem(index: int, customer: Any) -> Optional[str]:
    """Why one entry of a customer list is malformed, naming it, or None.
    (JWKs are checked when loaded.)"""
    where = "customer #%d" % (index + 1)
    if not isinstance(customer, dict):
        return "%s: expected a dict" % where
    if isinstance(customer.get("id"), str) and customer["id"]:
        where = "customer %s" % printable(repr(customer["id"]), 60)
    unknown = _unknown_key(customer, CUSTOMER_KEYS)  # first: "ID" is a typo of "id"
    if unknown:
        return "%s: %s" % (where, unknown)
    if not isinstance(customer.get("id"), str) or not customer["id"]:
        return "%s: id must be a non-empty string" % where
    for field in LIMIT_KEYS:
        if not _is_limit(_pick(customer, field)):
            return "%s: %s must be a non-negative integer or None" % (where, field)
    keys = _pick(customer, "access_keys", [])
    if not isinstance(keys, list):
        return "%s: access_keys must be a list" % where
    for number, key in enumerate(keys, 1):
        if isinstance(key, str) or (isinstance(key, dict) and isinstance(_pick(key, "public_key"), str)):
            return ("%s, access key #%d: a string where the public JWK belongs; the gateway needs "
                    "only the public key (python odin_gateway.py keygen prints the entry), never "
                    "the access key itself" % (where, number))
        if not isinstance(key, dict):
            return '%s, access key #%d: expected {"public_key": {...jwk...}, "namespace": ...}' % (
                where, number)
        unknown = _unknown_key(key, ACCESS_KEY_KEYS)
        if unknown:
            return "%s, access key #%d: %s" % (where, number, unknown)
        if not isinstance(_pick(key, "public_key"), dict):
            return "%s, access key #%d: public_key must be the public JWK, a dict" % (where, number)
        if _pick(key, "namespace") is not None and not isinstance(_pick(key, "namespace"), str):
            return "%s, access key #%d: namespace must be a string or None" % (where, number)
    for field in ("region", "pool"):  # see "Regions and pools" in README.md
        if customer.get(field) is not None and _label_problem(customer[field]):
            return "%s: %s %s (or None)" % (where, field, _label_problem(customer[field]))
    return None


def _duplicate_customer(customer: dict, index: int, seen: Dict[str, int]) -> Optional[str]:
    """'customer 'a' (#2): id already used by customer #1' when an earlier entry (ids in
    seen, with their index) has the same id: two entries of one customer would count
    one usage against two sets of limits."""
    earlier = seen.setdefault(customer["id"], index)
    if earlier == index:
        return None
    return "customer %s (#%d): id already used by customer #%d; give each customer one entry " \
           "and list all its keys in access_keys" % (
               printable(repr(customer["id"]), 60), index + 1, earlier + 1)


def _check_customers(customers: Any) -> Optional[str]:
    """Why a customer list is malformed, or None."""
    if not isinstance(customers, list):
        return "expected a list of customers, not %s" % type(customers).__name__
    seen: Dict[str, int] = {}
    for index, customer in enumerate(customers):
        problem = _customer_problem(index, customer) or _duplicate_customer(customer, index, seen)
        if problem:
            return problem
    return None


def customer_labels(customers: List[dict]) -> Dict[str, Tuple[Optional[str], Optional[str]]]:
    """customer id -> (region, pool): where its new rooms prefer to go, and the
    only servers it may use (None: no preference; no pool)."""
    return {customer["id"]: (customer.get("region"), customer.get("pool")) for customer in customers}



def _check_customer_api(value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, dict):
        return 'expected None or {"update_function": fn, "update_interval": seconds}, not %s' % (
            type(value).__name__)
    unknown = _unknown_key(value, CUSTOMER_API_KEYS, camel=False)
    if unknown:
        return unknown
    if not callable(value.get("update_function")):
        return "update_function: expected a function that returns a list of customers"
    if _positive_seconds(value.get("update_interval", 300)):
        return "update_interval: expected a positive number of seconds"
    return None


def _check_unknown_customers(value: Any) -> Optional[str]:
    if value == "forbidden":
        return None
    if not isinstance(value, dict):
        return 'expected "forbidden" or {"max_peers": n, "max_rooms": n} (None: unlimited)'
    unknown = _unknown_key(value, LIMIT_KEYS)
    if unknown:
        return unknown
    for field in LIMIT_KEYS:
        if not _is_limit(_pick(value, field)):
            return "%s must be a non-negative integer or None" % field
    return None


def _check_internal_users(value: Any) -> Optional[str]:
    if not isinstance(value, dict):
        return 'expected {"user": "password"}'
    for user, password in value.items():
        if not isinstance(user, str) or not user or ":" in user:
            return "user names must be non-empty strings without a colon (RFC 7617)"
        # An empty password would let anyone who knows the name in.
        if not isinstance(password, str) or not password:
            return "user %s: the password must be a non-empty string" % printable(repr(user), 40)
    return None


#: Malformed entries of one customer update named in the log; the rest are counted.
MAX_SKIPPED_LOGGED = 10

#: A connection's deadlines, named for what they bound -> the setting that says how
#: long (None there: read_timeout's, the default of the three reading ones).
DEADLINE_SETTINGS = types.MappingProxyType({
    "first byte": "first_byte_timeout",
    "head": "head_timeout",
    "body": "body_timeout",
    "idle": "keep_alive_timeout",  # between requests
    "write": "write_timeout",  # the client reads no more of an answer
    "linger": "linger_timeout",  # after a last answer, input is read and dropped
    "stop": "shutdown_timeout",  # requests in flight when the server stops
})

#: (a timeout, the one it must exceed, what would happen otherwise).
ORDERED_TIMEOUTS = (
    ("disable_timeout", "update_interval", "servers report every update_interval, so each would "
                                           "count as silent between two reports"),
    ("remove_timeout", "disable_timeout", "a silent server would be forgotten, with its rooms, "
                                          "before it is disabled"),
    ("login_token_lifetime", "update_interval", "a room not reported within it is dropped, so "
                                                "every room would be dropped between two reports"),
)


@dataclasses.dataclass(frozen=True)
class Setting:
    """What the gateway knows about one setting, declared once as a field of Config."""

    name: str
    type: str                # as annotated on Config's field, e.g. "int", "Optional[str]"
    default: Any
    check: Check
    meaning: str             # one line: README's settings table, --help
    reload: bool             # whether a reload (SIGHUP) applies it; False: only a restart
    flag: Optional[str]      # the command-line flag that overrides it, if any
    secret: bool             # never shown in messages, repr() or README
    shown: Optional[str]     # how README and --help show the default, when not its value

    def problem(self, value: Any) -> Optional[str]:
        """'name = value: why it is wrong' for a bad value (a secret is not shown), or None.
        The value of a structured setting is not repeated: the reason names the entry,
        and what the user put there may hold a secret (an access key pasted where its
        public JWK belongs, an API's URL with its token)."""
        why = self.check(value)
        if why is None:
            return None
        if (isinstance(value, (list, tuple, dict)) or "dict" in self.type.lower()) and not self.secret:
            return "%s: %s" % (self.name, why)
        return "%s = %s: %s" % (self.name, self.show(value), why)

    def show(self, value: Any) -> str:
        return "<hidden>" if self.secret else printable(repr(value), 80)


def setting(default: Any, check: Check, meaning: str, *, reload: bool = True,
            flag: Optional[str] = None, secret: bool = False, shown: Optional[str] = None) -> Any:
    """Declare one setting: a field of Config that carries its Setting (the field gives
    its name and type)."""
    return dataclasses.field(repr=not secret, metadata={"setting": Setting(
        "", "", default, check, meaning, reload, flag, secret, shown)})


@dataclasses.dataclass(init=False)
class Config:
    """Every setting of config.py; Config(**settings) checks them and fills in the defaults.

    Each setting is one field below: its type, then setting(default, check,
    meaning, reload=..., flag=...). Config's validation, the reload rule, the
    command-line flags and README's settings table all follow from it
    (SETTINGS lists them), so adding a setting is adding a field; the tests
    then ask for its line in the sample config.py and print the README table
    with its row. None means unlimited where a limit is expected.
    """

    # -- logging
    log_level: str = setting("INFO", _log_level, "`DEBUG`, `INFO`, `WARNING`, `ERROR` or `CRITICAL`")
    log_format: str = setting("pretty", _one_of("pretty", "json"),
                              '`"pretty"` lines for people or `"json"`, one object per line (stderr)')
    # -- listening
    host: str = setting("0.0.0.0", _host, "address to listen on", reload=False,
                        flag="--host")
    port: int = setting(7000, _port, "TCP port to listen on", reload=False, flag="--port")
    ssl: bool = setting(False, _boolean, "serve HTTPS with the certificate and private key",
                        reload=False, flag="--ssl")
    certificate: str = setting("fullchain.pem", _non_empty_string, "PEM certificate chain for HTTPS",
                               reload=False, flag="--certificate")
    private_key: str = setting("privkey.pem", _non_empty_string, "PEM private key for HTTPS",
                               reload=False, flag="--privatekey")
    # -- keys and customers
    master_key: str = setting(
        DEFAULT_MASTER_KEY, _master_key,
        "base64; every server key is derived from it. **Change it** (`keygen --master`); "
        "the gateway warns while it is the default", reload=False, secret=True,
        shown="the original's public sample key")
    customers: List[dict] = setting(
        [], _check_customers,
        'list of `{"id", "max_peers", "max_rooms", "access_keys": [{"public_key": jwk, '
        '"namespace": None}]}`, optionally with `"region"` and `"pool"` (see '
        '[Regions and pools](#regions-and-pools)). An omitted `max_peers` or `max_rooms` (or '
        "`None`) means unlimited; an unknown key stops the start; camelCase names (`maxPeers`, "
        "`accessKeys`, `publicKey`) work too. A JWK that cannot be used is skipped with a warning "
        "(the sample config ships the `demo` customer)")
    customer_api: Optional[dict] = setting(
        None, _check_customer_api, '`{"update_function": fn, "update_interval": 300}`, see below')
    unknown_customers: Union[str, Dict[str, Any]] = setting(
        "forbidden", _check_unknown_customers,
        'or `{"max_peers": n, "max_rooms": n}`: tokens with unknown key ids are admitted '
        "**without a signature check** as customer `demo_<kid>` with these limits")
    internal_users: Dict[str, str] = setting(
        {}, _check_internal_users,
        '`{"user": "password"}`: require HTTP Basic on `/internal`. Empty: `/internal` is open '
        "(the gateway warns)", secret=True)
    # -- media servers
    metrics_server: str = setting(
        "0.0.0.0/0", _network,
        "CIDR allowed to scrape the servers' metrics (sent in `sfu.GridConfig`)")
    update_interval: float = setting(
        5, _positive_seconds,
        "seconds between server reports (sent to servers) and maintenance ticks")
    disable_timeout: float = setting(
        7.5, _positive_seconds,
        "seconds without a report before a server gets no new rooms (more than `update_interval`)")
    remove_timeout: float = setting(
        600, _positive_seconds,
        "seconds without a report before a server is forgotten (more than `disable_timeout`)")
    login_token_lifetime: int = setting(
        300, _token_lifetime,
        "seconds a room token lives, and an unreported room is kept (more than `update_interval`)")
    warmup: Optional[float] = setting(
        None, _warmup,
        "seconds after a start (without state saved after a warm-up) before rooms no server has "
        "reported are placed; `None`: `update_interval` + 2 s; `0`: none. See [Restarts](#restarts)")
    state_file: Optional[str] = setting(
        None, _state_file,
        "a file for what a restart or crash must not lose (admin tasks not yet delivered, where "
        "every room lives); `None`: nothing is saved; with `workers`, worker N saves to this path "
        "plus `.workerN`. See [Restarts](#restarts)", reload=False)
    access_log: bool = setting(False, _boolean, "log one line per HTTP request", flag="--access-log")
    placement: str = setting(
        "balanced", _one_of("balanced", "random"),
        'how a new room finds its server: `"balanced"` (least estimated load) or `"random"` '
        "(the original's weighted draw)")
    # Older events fall out (and Events tells a reader how many it missed).
    max_events: int = setting(1000, _positive_integer,
                              "events kept for the `Events` method and `/status` (older ones fall out)")
    # -- regions and pools (see "Regions and pools" in README.md)
    server_labels: List[dict] = setting(
        [], _check_server_labels,
        '`[{"match": "sfu-eu-*", "region": "eu-central", "pools": ["acme"]}, ...]`: region and '
        "pools of the servers whose hostname matches (first match wins), see "
        "[Regions and pools](#regions-and-pools)")
    region_fallback: Dict[str, List[str]] = setting(
        {}, _check_region_fallback,
        '`{"eu-central": ["eu-west", "us-east"], ...}`: where a new room goes, in order, when its '
        "region has no server with capacity (then any region)")
    # -- several gateways (see "Running several gateways" in README.md)
    cluster: Optional[str] = setting(
        None, _redis_url,
        "Redis URL (`redis://[:password@]host:port/db`, `rediss://`, `unix://`) shared by "
        "several gateways; needs redis-py (`pip install \"odin-gateway[cluster]\"`). None: one "
        "gateway alone", reload=False, flag="--cluster", secret=True)
    # Well under a second: a request that needs Redis waits at most this long.
    cluster_timeout: float = setting(
        0.25, _positive_seconds,
        "seconds any Redis call may take; beyond it the gateway serves from its own replica",
        reload=False)
    cluster_heartbeat: float = setting(
        1.0, _positive_seconds,
        "seconds between a gateway's heartbeats; a member silent for three is dropped",
        reload=False)
    workers: int = setting(
        1, _positive_integer,
        "gateway processes on this box sharing the port (SO_REUSEPORT); more than 1 needs "
        "`cluster`", reload=False, flag="--workers")
    # -- limits (see "Security and limits" in README.md): what one client may cost.
    # http.server allows 64 KiB, but no ODIN call needs more than a path: a long
    # line is an attack or a mistake.
    max_request_line: int = setting(8 * 1024, _positive_integer, "bytes in the request line (414)")
    # As h11.
    max_head_bytes: int = setting(16 * 1024, _positive_integer,
                                  "bytes in the request line and headers (431)")
    # As CPython's http.client.
    max_headers: int = setting(100, _positive_integer, "header fields in one request (431)")
    # A client's body is one JSON-RPC call.
    max_body_bytes: int = setting(1024 * 1024, _positive_integer,
                                  "bytes in a body, checked before reading it (413)")
    # Servers report their rooms to /internal: 10,000 rooms with UUID names are
    # about 1.1 MiB, so this leaves room for about 280,000.
    max_internal_body_bytes: int = setting(
        32 * 1024 * 1024, _positive_integer,
        "bytes in a body to `/internal` (servers' reports); a refused one is logged (413)")
    # A hex size and short extensions.
    max_chunk_line: int = setting(1024, _positive_integer,
                                  "bytes in a chunk size line of a chunked body (400)")
    # Clamped at start to what the open-file limit allows (with a warning).
    max_connections: int = setting(1024, _positive_integer, "open connections; more get 503")
    # asyncio's default of 100 overflowed under bursts of connects, and a
    # dropped SYN costs the client a second; the kernel caps it at somaxconn.
    backlog: int = setting(1024, _positive_integer,
                           "connections the kernel queues before they are accepted (listen backlog)",
                           reload=False)
    max_batch: int = setting(100, _positive_integer, "requests in one JSON-RPC batch")
    # Admin calls beyond it are refused rather than dropping tasks already queued.
    max_queued_tasks: int = setting(10_000, _positive_integer,
                                    "admin tasks waiting for one server; more are refused")
    # The deadlines of a connection, each named for what it bounds (DEADLINE_SETTINGS
    # names them). A silent connection must not hold its slot for keep_alive_timeout.
    # read_timeout stays the default of the three reading ones (earlier configs
    # set only it): each of them that is None takes its value.
    read_timeout: float = setting(
        10.0, _positive_seconds,
        "seconds for each of `first_byte_timeout`, `head_timeout` and `body_timeout` left `None`")
    first_byte_timeout: Optional[float] = setting(
        None, _seconds_or_none,
        "seconds a new connection may take to send its first byte (on TLS: to end its "
        "handshake); then it is closed",
        shown="`None`: `read_timeout`")
    head_timeout: Optional[float] = setting(
        None, _seconds_or_none,
        "seconds from a request's first byte to the end of its head (408)",
        shown="`None`: `read_timeout`")
    body_timeout: Optional[float] = setting(
        None, _seconds_or_none,
        "seconds from the end of a request's head to the end of its body (408)",
        shown="`None`: `read_timeout`")
    keep_alive_timeout: float = setting(75.0, _positive_seconds,
                                        "seconds an idle connection is kept open between requests")
    # A client that never reads must not hold a connection and its answer.
    write_timeout: float = setting(10.0, _positive_seconds,
                                   "seconds a client may take to read more of an answer")
    # Closing a socket with unread input sends a reset, which can destroy the
    # last answer before the client reads it: half-close, read on for a moment.
    linger_timeout: float = setting(
        1.0, _positive_seconds, "seconds a connection closed after its last answer is still read from")
    max_linger_bytes: int = setting(4 * 1024 * 1024, _positive_integer,
                                    "bytes read (and dropped) while lingering")
    shutdown_timeout: float = setting(10.0, _positive_seconds,
                                      "seconds a stop waits for requests in flight")
    # asyncio reads 256 KiB at once, above glibc's mmap threshold (128 KiB):
    # every read would map and unmap memory until glibc adapts.
    receive_size: int = setting(64 * 1024, _positive_integer, "bytes read from a connection at once")
    # asyncio's own high-water mark. Larger answers are written in pieces of
    # this size as the client takes them.
    max_write_buffer: int = setting(
        64 * 1024, _positive_integer,
        "unsent bytes of a connection before it waits for its client to read")
    # Clients that ask and never read must not grow memory without bound.
    max_unsent_bytes: int = setting(
        64 * 1024 * 1024, _positive_integer,
        "bytes of large answers waiting for their clients, in all; a larger answer beyond gets 503")
    customer_update_timeout: float = setting(
        30.0, _positive_seconds,
        "seconds the customer update function may take before its result is ignored")

    # source is keyword-only: Config({"port": 1}) must not quietly become a config
    # named after a dict, with every setting at its default.
    def __init__(self, *, source: str = "Config()", **settings: Any):
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise ConfigError("%s: unknown setting %s%s (known: %s)" % (
                source, ", ".join(unknown), _nearest_setting(unknown[0]), ", ".join(SETTINGS)))
        self.source = source
        for name, declared in SETTINGS.items():
            # A copy: a default list or dict must not be shared between configs.
            value = settings[name] if name in settings else copy.deepcopy(declared.default)
            setattr(self, name, value)  # checked there
        for longer, shorter, why in ORDERED_TIMEOUTS:
            if getattr(self, longer) <= getattr(self, shorter):
                raise ConfigError("%s: %s = %r: expected more than %s (%r): %s" % (
                    source, longer, getattr(self, longer), shorter, getattr(self, shorter), why))
        if self.workers > 1 and self.cluster is None:
            raise ConfigError("%s: workers = %d needs cluster: worker processes share servers, "
                              "rooms and tasks through Redis (set cluster to a Redis URL)"
                              % (source, self.workers))

    @classmethod
    def load(cls, path: str) -> "Config":
        """Run the Python file at path and take the settings it defines."""
        if os.path.isdir(path):
            raise ConfigError("%s: is a directory, not a config file" % path)
        if not os.path.isfile(path):
            raise ConfigError("%s: no such file" % path)
        # A JSON or TOML file may even run as Python, and then set nothing.
        if os.path.splitext(path)[1].lower() in (".json", ".toml", ".yaml", ".yml", ".ini"):
            raise ConfigError("%s: the config file is Python, like the sample config.py "
                              "(port = 7000, customers = [...])" % path)
        try:
            namespace = runpy.run_path(path, run_name="odin_gateway_config")
        # Any error in the user's file stops the start, and exit() there must not end
        # a running gateway at a reload.
        except (Exception, SystemExit) as err:
            # JSON pasted into the file (keygen's JWK, an API's answer): null, true, false.
            undefined = re.match(r"name '(\w+)' is not defined", str(err))  # NameError.name: 3.10+
            hint = {"null": "None", "true": "True", "false": "False"}.get(
                undefined.group(1) if undefined else "")
            raise ConfigError("%s: cannot load: %s: %s%s" % (
                path, type(err).__name__, err,
                " (the config file is Python: write %s)" % hint if hint else "")) from err
        settings = {name: namespace[name] for name in SETTINGS if name in namespace}
        for name, value in namespace.items():
            # PORT = 17322 is as much a mistake as prot = 17322; names of the
            # user's own start with "_".
            if (name not in SETTINGS and not name.startswith("_")
                    and not callable(value) and not inspect.ismodule(value)):
                nearest = _nearest_setting(name)
                if nearest:  # Customers = [...] ignored would open the gateway to any token
                    raise ConfigError("%s: unknown setting %r%s; settings are lower case, names "
                                      "of your own start with _" % (path, name, nearest))
                log.warning("%s: ignoring unknown setting %r (names of your own start with _)",
                            path, name)
        return cls(source=path, **settings)

    def __setattr__(self, name: str, value: Any) -> None:
        """config.port = "x" is checked like Config(port="x"); config.prot = 1 is refused."""
        if name in SETTINGS:
            problem = SETTINGS[name].problem(value)
            if problem:
                raise ConfigError("%s: %s" % (self.source, problem))
            if name == "log_level":
                value = value.upper()
        elif name != "source" and not name.startswith("_"):
            raise AttributeError("Config has no setting %r%s" % (name, _nearest_setting(name)))
        super().__setattr__(name, value)

    @property
    def master_key_bytes(self) -> bytes:
        return b64_decode(self.master_key)

    def deadline(self, name: str) -> float:
        """Seconds of the connection deadline named for what it bounds (Connection.arm)."""
        seconds = getattr(self, DEADLINE_SETTINGS[name])
        return self.read_timeout if seconds is None else seconds

    def replace(self, **changes: Any) -> "Config":
        """A copy with some settings changed (validated again)."""
        settings = {name: getattr(self, name) for name in SETTINGS}
        settings.update(changes)
        return Config(source=self.source, **settings)


def _nearest_setting(name: str) -> str:
    """' (did you mean 'port'?)' for a name that is not a setting, or ''."""
    close = difflib.get_close_matches(name.lower(), SETTINGS, n=1)
    return " (did you mean %r?)" % close[0] if close else ""


#: name -> Setting, in the order of Config's fields (read-only).
SETTINGS: "types.MappingProxyType[str, Setting]" = types.MappingProxyType({
    field.name: dataclasses.replace(field.metadata["setting"], name=field.name, type=str(field.type))
    for field in dataclasses.fields(Config)})


def customer_verify_key(jwk: Any) -> VerifyKey:
    """The key of a customer's public JWK; ValueError saying what is wrong with it."""
    if not isinstance(jwk, dict):
        raise ValueError("expected a JWK object")
    for member in jwk:  # other members (use, alg) are allowed by RFC 7517
        lower = str(member).lower()
        if member != lower and lower in ("kid", "kty", "crv", "x") and lower not in jwk:
            raise ValueError("%s: JWK member names are lower case (%r)"
                             % (printable(repr(member), 20), lower))
    if jwk.get("kty", "OKP") != "OKP":
        raise ValueError('kty is %s: only Ed25519 keys (kty "OKP") are supported'
                         % printable(repr(jwk["kty"]), 40))
    if jwk.get("crv", "Ed25519") != "Ed25519":
        raise ValueError("crv is %s: only Ed25519 keys are supported" % printable(repr(jwk["crv"]), 40))
    if not isinstance(jwk.get("x"), str) or not jwk["x"]:
        raise ValueError("the JWK has no x (the public key)")
    try:
        public = b64url_decode(jwk["x"])
    except ValueError:
        raise ValueError("x is not base64url") from None
    key = VerifyKey(key_id(CUSTOMER_KID_PREFIX, public), public)
    # Tokens carry the kid derived from the key, so any other kid matches no token.
    if "kid" not in jwk:
        raise ValueError("the JWK has no kid (for this x it is %s)" % key.kid)
    if jwk["kid"] != key.kid:
        raise ValueError("kid %s does not match the public key x, whose kid is %s"
                         % (printable(repr(jwk["kid"]), 40), key.kid))
    return key


def load_customer_keys(customers: List[dict]) -> Dict[str, CustomerKey]:
    """kid -> CustomerKey for a customer list; a JWK that cannot be used is skipped,
    with a warning naming the customer and the key."""
    keys: Dict[str, CustomerKey] = {}
    for customer in customers:
        customer_id = customer["id"]
        licensee = Licensee(customer_id, _pick(customer, "max_peers"), _pick(customer, "max_rooms"))
        access_keys = _pick(customer, "access_keys", [])
        usable = 0
        for number, access_key in enumerate(access_keys, 1):
            jwk = _pick(access_key, "public_key")
            try:
                verify_key = customer_verify_key(jwk)
            except ValueError as err:
                named = isinstance(jwk, dict) and "kid" in jwk
                kid = " (kid %s)" % printable(repr(jwk["kid"]), 40) if named else ""
                log.warning("customer %r: skipping access key #%d%s: %s", customer_id, number, kid, err)
                continue
            usable += 1
            if "d" in jwk:
                log.warning("customer %r: access key #%d is a private JWK (it has d): the gateway "
                            "needs only the public key; remove d from the config", customer_id, number)
            namespace = _pick(access_key, "namespace") or customer_id
            if verify_key.kid in keys:
                log.warning("customer %r: key id %s is already used by customer %r; the later wins",
                            customer_id, verify_key.kid, keys[verify_key.kid].licensee.customer_id)
            keys[verify_key.kid] = CustomerKey(verify_key, licensee, namespace)
        if not usable:
            log.warning("customer %r has no usable access key (%d configured): all its tokens "
                        "will be refused", customer_id, len(access_keys))
    return keys


# ---------------------------------------------------------------------------
# Rooms: base names and hashes
# ---------------------------------------------------------------------------


def room_base_name(name: str) -> str:
    """The part of a room name that identifies it: from a '{' up to the next '}'.

    "lobby" -> "lobby"; "match{42}red" -> "{42" (the '{' kept, the '}' not),
    so every room of one group lands on the same server.
    """
    start = name.find("{")
    if start >= 0:
        end = name.find("}", start + 1)
        if end >= 0:
            return name[start:end]
    return name


def room_hash(namespace: str, name: str) -> str:
    """b64(SHA-256(len(ns) || ns || len(base) || base)), each length one byte.

    ValueError when the namespace or base name is longer than 255 bytes (the
    original silently wrapped the length byte, so distinct rooms could share
    a preimage prefix).
    """
    ns = _utf8(namespace)
    base = _utf8(room_base_name(name))
    if len(ns) > 255 or len(base) > 255:
        raise ValueError("room namespace and base name must be at most 255 bytes of UTF-8")
    return b64_encode(hashlib.sha256(b"%c%s%c%s" % (len(ns), ns, len(base), base)).digest())


# The original orders reported rooms by hash with JavaScript's localeCompare
# (ICU root collation). For the base64 alphabet that is: '/' < '+' < '=' <
# digits < letters compared case-insensitively, then lowercase before upper.
_PRIMARY = str.maketrans(
    {c: chr(0x21 + i) for i, c in enumerate("/+=0123456789")}
    | {c: chr(0x41 + i) for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}
    | {c: chr(0x41 + i) for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZ")}
)
_TERTIARY = str.maketrans({c: "1" if c.isupper() else "0" for c in
                           "/+=0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"})


def locale_order(text: str) -> Tuple[str, str]:
    """Sort key giving JavaScript's localeCompare order for base64 text."""
    return text.translate(_PRIMARY), text.translate(_TERTIARY)


# ---------------------------------------------------------------------------
# TOML: the server configuration round trip of sfu.GridConfig
# ---------------------------------------------------------------------------

try:
    import tomllib as _toml_reader
except ImportError:  # Python < 3.11
    try:
        import tomli as _toml_reader  # type: ignore[no-redef]
    except ImportError:
        _toml_reader = None  # type: ignore[assignment]
NO_TOML_READER = ("sfu.GridConfig needs a TOML parser: Python 3.11+ has one; on Python %d.%d "
                  "run: pip install tomli" % sys.version_info[:2])

_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
                 "\f": "\\f", "\r": "\\r"}


def _toml_key(key: str) -> str:
    return key if _BARE_KEY_RE.fullmatch(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ch < " " or ch == "\x7f":
            out.append("\\u%04x" % ord(ch))
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (math.inf, -math.inf):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ",".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join("%s = %s" % (_toml_key(k), _toml_value(v))
                                for k, v in value.items()) + " }"
    raise TypeError("cannot write %s as TOML" % type(value).__name__)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def toml_dumps(document: dict) -> str:
    """TOML text for a parsed document; tomllib.loads(toml_dumps(d)) == d.

    Keys keep their order; plain values come before sub-tables, as TOML
    requires. The standard library reads TOML but cannot write it.
    """
    lines: List[str] = []
    _toml_table(document, [], lines, header=None)
    return "\n".join(lines) + "\n"


def _toml_table(table: dict, path: List[str], lines: List[str], header: Optional[str]) -> None:
    # Like the original, a table holding only sub-tables gets no header line
    # of its own ("[a.b]" rather than "[a]" then "[a.b]").
    if header is not None and (header.startswith("[[") or not table or not all(
            isinstance(value, dict) for value in table.values())):
        lines.extend(["", header])
    for key, value in table.items():
        if not isinstance(value, dict) and not _is_table_array(value):
            lines.append("%s = %s" % (_toml_key(key), _toml_value(value)))
    for key, value in table.items():
        sub_path = path + [_toml_key(key)]
        if isinstance(value, dict):
            _toml_table(value, sub_path, lines, "[%s]" % ".".join(sub_path))
        elif _is_table_array(value):
            for item in value:
                _toml_table(item, sub_path, lines, "[[%s]]" % ".".join(sub_path))


#: Largest server config sfu.GridConfig accepts: real ones are a few KiB, and
#: parsing runs on the event loop.
MAX_SERVER_CONFIG = 64 * 1024


def parse_toml(text: str) -> dict:
    """Parse TOML; RpcError naming the line and column when it is invalid."""
    if _toml_reader is None:
        raise RpcError(INTERNAL_ERROR, NO_TOML_READER)
    if len(text) > MAX_SERVER_CONFIG:
        raise refused("config is %d characters; at most %d are accepted" % (len(text), MAX_SERVER_CONFIG))
    try:
        return _toml_reader.loads(text)
    except _toml_reader.TOMLDecodeError as err:
        raise refused("invalid TOML in config: %s" % err) from err
    except (ValueError, RecursionError) as err:  # e.g. an integer beyond Python's digit limit
        raise refused("config cannot be used: %s" % err) from err


def recommended_server_config(config: Config) -> dict:
    """What the gateway recommends to every server (durations in milliseconds)."""
    return {
        "supervisor": {"report_interval": _millis(config.update_interval)},
        "quic": {"keep_alive_interval": 5000, "idle_timeout": 30000,
                 "pre_send_timeout": 500, "migration": True},
        "http": {"timeout": 10000, "ping_interval": 5000},
        "metrics": {"binding": "0.0.0.0:9000", "idle_timeout": 3600000,
                    "global_labels": {"deployment": "public"},
                    "allowed": [config.metrics_server, "127.0.0.1/8", "::1/128"]},
        "limit": {"peer": {"incoming_messages": {"rate": 10, "capacity": 50, "overflow": 20}}},
    }


def _millis(seconds: float) -> int:
    return int(round(seconds * 1000))


def merge_config(server: dict, recommended: dict) -> dict:
    """Merge recommended settings into a server's config, in place.

    Both arrays: append the recommended items; both tables: merge; absent in
    the server's config: take the recommended value; otherwise the server's
    own value wins.
    """
    for key, value in recommended.items():
        mine = server.get(key)
        if mine is None:
            server[key] = value
        elif isinstance(mine, list) and isinstance(value, list):
            mine.extend(value)
        elif isinstance(mine, dict) and isinstance(value, dict):
            merge_config(mine, value)
    return server


# ---------------------------------------------------------------------------
# Events: a bounded feed of what happened; the structured log is made from it
# ---------------------------------------------------------------------------

#: Events one Events call returns unless it asks for fewer or more.
EVENTS_PAGE = 100
#: Most customers whose limit refusals are counted (unknown_customers makes
#: customer ids from tokens, so the count must be bounded).
MAX_COUNTED_CUSTOMERS = 10_000

#: Every kind of event: its log level and its log message for people ({name}
#: is the field of that name, escaped). The json log format writes the fields
#: as keys of the line's object; the Events method returns them as they are.
EVENT_KINDS: Dict[str, Tuple[int, str]] = {
    "server_added": (logging.INFO, "server {hostname} added (version {version}, key {kid})"),
    "server_enabled": (logging.INFO, "server {hostname} re-enabled: it reported again"),
    "server_disabled": (logging.WARNING, "server {hostname} disabled: no report for {silent:.1f} s; "
                                         "its rooms move on their next Connect"),
    "server_removed": (logging.INFO, "server {hostname} removed with its {rooms} rooms: "
                                     "no report for {silent:.0f} s"),
    "server_draining": (logging.INFO, "server {hostname} draining (set by the {by})"),
    "server_undrained": (logging.INFO, "server {hostname} undrained (set by the {by})"),
    "room_placed": (logging.DEBUG, "room {room} of {customer} placed on {server}: {reason}"),
    "room_collision": (logging.WARNING, "room collision: {hostname} reports room {room}, which lives "
                                        "on {owner}; closing it there"),
    "room_gone": (logging.DEBUG, "room {room} of {customer} gone from {server}: {reason}"),
    "limit_refused": (logging.INFO, "Connect refused: customer {customer} has {usage} of {max} {limit}"),
    "task_queued": (logging.DEBUG, "{task} for room {room} queued for {server}"),
    "task_delivered": (logging.DEBUG, "{task} for room {room} delivered to {server}"),
    "customers_loaded": (logging.INFO, "customer update: {counts} loaded"),
    "customers_kept": (logging.WARNING, "customer update: keeping the previous keys: {reason}"),
    "customer_skipped": (logging.WARNING, "customer update: skipping {reason}"),
    "config_reloaded": (logging.INFO, "config reloaded from {source}: {counts}"),
    "config_reload_refused": (logging.ERROR, "config reload refused, the running config stays: "
                                             "{reason}"),
    "warmup_started": (logging.INFO, "warming up: new rooms are placed in {seconds:g} s, once every "
                                     "server has reported"),
    "warmup_over": (logging.INFO, "warm-up over: placing new rooms"),
    "cluster_up": (logging.INFO, "cluster: {how} with Redis: {servers} servers, {rooms} rooms, "
                                 "{members} members"),
    "cluster_down": (logging.ERROR, "cluster: Redis unreachable ({reason}); serving from this "
                                    "gateway's replica until it answers again"),
    "cluster_member_joined": (logging.INFO, "cluster: member {member} joined ({members} members)"),
    "cluster_member_left": (logging.INFO, "cluster: member {member} left: stopped, or no heartbeat "
                                          "for {silence:g} s ({members} members)"),
    # The supervisor logs a worker's start and death itself (it sees both, even
    # a worker that cannot start); the worker's feed records them unlogged.
    "worker_started": (logging.DEBUG, "worker {worker} of {workers} started (pid {pid})"),
    "worker_restarted": (logging.DEBUG, "worker {worker} restarted (pid {pid}): pid {died_pid} "
                                        "{died} after {lived:.1f} s"),
    "listening": (logging.INFO, "listening on {url}"),
    "stopping": (logging.INFO, "stopping: finishing requests in flight"),
    "stopped": (logging.INFO, "stopped listening on {url}"),
}


def _shown(value: Any) -> Any:
    """An event field as its log message shows it: text escaped, a room as namespace/name."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, (list, tuple)):
        return "/".join(printable(part) for part in value)
    return value


class EventFeed:
    """The newest events, oldest first: {"seq", "time", "kind", ...fields}.

    seq counts from 1 and never repeats within a process, so a reader can
    ask for what came after the last event it saw (after()).
    """

    __slots__ = ("events", "next_seq")

    def __init__(self, size: int):
        self.events: "collections.deque[dict]" = collections.deque(maxlen=size)
        self.next_seq = 1

    def add(self, kind: str, now: float, values: Dict[str, Any]) -> dict:
        event = {"seq": self.next_seq, "time": now, "kind": kind}
        event.update(values)
        self.next_seq += 1
        self.events.append(event)  # the deque drops the oldest when full
        return event

    def resize(self, size: int) -> None:
        if size != self.events.maxlen:
            self.events = collections.deque(self.events, maxlen=size)

    def after(self, seq: int, limit: int) -> dict:
        """Up to limit events after seq, the seq to ask after next, and how many
        events after seq fell out of the feed before they could be read."""
        if seq >= self.next_seq:  # a seq from before a restart: start again
            seq = 0
        oldest = self.events[0]["seq"] if self.events else self.next_seq
        start = max(seq + 1, oldest)
        events = list(itertools.islice(self.events, start - oldest, start - oldest + limit))
        return {"events": events, "next": events[-1]["seq"] if events else start - 1,
                "dropped": max(0, oldest - 1 - seq)}

    def newest(self, count: int) -> List[dict]:
        """The newest count events, newest first."""
        return list(itertools.islice(reversed(self.events), count))


# ---------------------------------------------------------------------------
# Grid state: servers, rooms, customer usage
# ---------------------------------------------------------------------------


#: Load one peer adds to a server that has not yet reported any clients: a
#: server is assumed to carry a thousand peers at load 1.0 until it says more.
DEFAULT_PEER_LOAD = 0.001


class Server:
    """A media server as the gateway knows it, keyed by its hostname.

    Besides its last report it keeps what Connect sent its way since then
    (pending peers and rooms, by customer): load the report does not show yet.
    """

    __slots__ = ("hostname", "version", "disabled", "draining", "reported_draining", "report",
                 "reported_rooms", "first_seen", "last_seen", "tasks", "key", "room_hashes",
                 "room_keys", "closing", "usage", "pending", "pending_peers", "changes", "integrated",
                 "region", "pools", "rooms_text")

    def __init__(self, hostname: str, key: SigningKey, now: float):
        self.hostname = hostname
        self.version = ""
        self.disabled = False
        self.draining = False  # set by an operator (Drain)
        self.reported_draining = False  # set by the server in its report
        self.report: dict = {"load": 0, "clients": 0}  # its last report, without the rooms
        # The rooms of its last report as columns (RoomColumns): lists of
        # strings, numbers and tuples of them, which the garbage collector
        # stops tracking (the report's dicts and lists it would scan).
        self.reported_rooms: RoomColumns = ([], [], [], [])
        self.first_seen = now
        self.last_seen = now
        self.tasks: List[dict] = []
        self.key = key
        self.room_hashes: set = set()  # hashes of the rooms of its last report
        self.room_keys: Dict[Tuple[str, str], str] = {}  # (namespace, name) -> hash, of those
        self.closing: set = set()  # hashes with a collision RoomClose queued
        self.usage: Dict[str, List[int]] = {}  # customer -> [peers, rooms] of its last report
        self.pending: Dict[str, List[int]] = {}  # customer -> [peers, rooms] sent since
        self.pending_peers = 0
        # Counts changes to its rooms made by others (Connect moving one, a
        # room expiring, another server taking one over); with integrated
        # (its last report's ids, customers and rooms, when it owned them
        # all), a report that repeats the previous one needs no lookups.
        self.changes = 0
        self.integrated: Optional[tuple] = None
        # Labels for placement: from server_labels, else from its own report.
        self.region: Optional[str] = None
        self.pools: Tuple[str, ...] = ()
        # Its last report's rooms as read from the text (read_rooms_in_steps), if they were.
        self.rooms_text: Optional[RoomsText] = None

    @property
    def load(self) -> float:
        return self.report["load"]

    def report_json(self) -> dict:
        """Its last report as it came (the known fields), rooms included."""
        rooms = [{"id": list(key), "customer": customer, "age": {"secs": age[0], "nanos": age[1]},
                  "peers": peers} for key, customer, age, peers in zip(*self.reported_rooms)]
        return dict(self.report, rooms=rooms)

    @property
    def takes_rooms(self) -> bool:
        return not (self.disabled or self.draining or self.reported_draining)

    @property
    def draining_by_anyone(self) -> bool:
        """Draining, as Info and Drain report it: by an operator or by its own report."""
        return self.draining or self.reported_draining

    def peer_load(self) -> float:
        """The load one more peer adds, estimated from the server's own report."""
        clients, load = self.report["clients"], self.report["load"]
        if clients > 0 and load > 0:
            return load / clients
        return DEFAULT_PEER_LOAD

    def estimated_load(self) -> float:
        """Reported load plus the peers Connect sent here since the report."""
        return min(max(self.load, 0.0), 1.0) + self.pending_peers * self.peer_load()


class Room:
    """Where a room lives: its id (namespace, name), customer, server and last update.

    reported: its server has reported it. A room only placed by Connect is
    not owned yet: a server that reports it takes it over (reported beats placed).
    """

    __slots__ = ("id", "customer", "server", "updated", "reported")

    def __init__(self, room_id: Tuple[str, str], customer: str, server: str, updated: float,
                 reported: bool = False):
        self.id = room_id
        self.customer = customer
        self.server = server
        self.updated = updated
        self.reported = reported


#: A report's rooms by column: ids as (namespace, name), customers, ages as
#: (secs, nanos), peers; see room_columns.
RoomColumns = Tuple[List[Tuple[str, str]], List[str], List[Tuple[Any, Any]], List[int]]

_ROOM_ID, _ROOM_CUSTOMER, _ROOM_AGE, _ROOM_PEERS = map(operator.itemgetter, ("id", "customer", "age", "peers"))
_AGE_FIELDS = operator.itemgetter("secs", "nanos")
_NUMBER_TYPES = {int, float}
_flatten = itertools.chain.from_iterable


def room_columns(rooms: Any) -> Optional[RoomColumns]:
    """A report's rooms by column, or None if one of them is malformed
    (_want_rooms then says which and why).

    Each check runs over a whole column in C (map, set, chain), so a report
    of 10,000 rooms is checked in a few milliseconds, not tens.
    """
    if not isinstance(rooms, list):
        return None
    if not rooms:
        return [], [], [], []
    try:
        if set(map(type, rooms)) != {dict}:
            return None
        ids = list(map(_ROOM_ID, rooms))
        customers = list(map(_ROOM_CUSTOMER, rooms))
        ages = list(map(_ROOM_AGE, rooms))
        peers = list(map(_ROOM_PEERS, rooms))
        if set(map(type, ids)) != {list} or set(map(len, ids)) != {2}:
            return None
        if set(map(type, _flatten(ids))) | set(map(type, customers)) != {str}:
            return None
        if set(map(type, ages)) != {dict}:
            return None
        times = list(map(_AGE_FIELDS, ages))
        number_types = set(map(type, _flatten(times)))
        if not number_types <= _NUMBER_TYPES:
            return None
        if float in number_types and not all(map(math.isfinite, _flatten(times))):
            return None  # 1e999 parses as infinity
        if set(map(type, peers)) != {int} or min(peers) < 0:
            return None
    except KeyError:  # a field missing
        return None
    return list(map(tuple, ids)), customers, times, peers


def _usage_by_customer(keys: List[Tuple[str, str]], customers: List[str], peers: List[int],
                       unknown: set) -> Dict[str, List[int]]:
    """customer -> [peers, rooms] of a report (rooms sharing a base name each
    count; rooms that cannot be identified do not)."""
    if not unknown and len(set(customers)) <= 1:  # the usual case, at C speed
        return {customers[0]: [sum(peers), len(peers)]} if customers else {}
    usage: Dict[str, List[int]] = {}
    for key, customer, count in zip(keys, customers, peers):
        if key not in unknown:
            counts = usage.setdefault(customer, [0, 0])
            counts[0] += count
            counts[1] += 1
    return usage


# The placement rule: which server gets a new room, and why. Pools are a hard
# wall (dedicated servers stay dedicated), regions a preference with an
# explicit fallback order, and the balanced pick decides within a tier.

#: The tiers of the rule, as Explain, the logs and /metrics name them.
PLACEMENT_TIERS = ("in_region", "fallback", "any")
#: The refusal when no server can take a new room (sic, the original's text).
NO_SERVER = "no server to assign room too"


class Placement:
    """A placement decision: the tiers the rule considered, each a (tier,
    region, [(server, estimated load)]); the index of the tier used; the
    pick (None: no server can take the room) and why, in words."""

    __slots__ = ("region", "pool", "tiers", "used", "server", "reason", "walled")

    def __init__(self, region: Optional[str], pool: Optional[str]):
        self.region = region
        self.pool = pool
        self.tiers: List[Tuple[str, Optional[str], List[Tuple[Server, float]]]] = []
        self.used: Optional[int] = None
        self.server: Optional[Server] = None
        self.reason = ""
        self.walled = pool is not None  # a refusal names the pool that walled the room in or out

    @property
    def tier(self) -> Optional[str]:
        return self.tiers[self.used][0] if self.used is not None else None

    def refusal(self) -> RpcError:
        """Connect's answer when no server can take the room (naming the pool, if
        one is why; else the original's text)."""
        return refused("%s: %s" % (NO_SERVER, self.reason) if self.walled else NO_SERVER)

    def explain(self) -> dict:
        """The decision as plain data (the Explain method's answer)."""
        return {
            "region": self.region, "pool": self.pool,
            "tiers": [{"tier": tier, "region": region, "used": index == self.used, "candidates": [
                {"hostname": server.hostname, "region": server.region, "pools": list(server.pools),
                 "estimatedLoad": round(load, 6), "full": load >= 1.0} for server, load in members]}
                for index, (tier, region, members) in enumerate(self.tiers)],
            "pick": self.server.hostname if self.server is not None else None,
            "reason": self.reason,
        }


def place_room(taking: List[Server], *, pool: Optional[str], region: Optional[str],
               pinned: Optional[str], region_fallback: Dict[str, List[str]], rule: str,
               rng: random.Random, room_key: str = "") -> Placement:
    """The placement rule for a new room (README: "Regions and pools"), among
    the servers taking rooms now (answering, not draining).

    1. Candidates: those the customer's pool allows: a customer with a pool
       gets only the servers of that pool, a customer without one only servers
       of no pool. The token's internal.server narrows them to that one server.
    2. Tiers: with a room region, the candidates in that region, then those of
       each region of region_fallback[region] in order, then every candidate;
       without a region, every candidate. The first tier with a server that
       is not estimated full is used; when all are full, every candidate.
    3. The pick within the tier: "balanced", the least estimated load (ties
       at random); "random", the original's draw weighted by 1 - load;
       "hashed" (a cluster gateway without Redis), by room_key alone.
    """
    placement = Placement(region, pool)
    # 1. Candidates.
    if pinned is not None:
        found = [server for server in taking if server.hostname == pinned]
        if not found:
            placement.reason = "pinned server %s is unknown or takes no rooms" % printable(pinned)
            return placement
        if not _pool_allows(found[0], pool):
            placement.walled = True
            placement.reason = ("pinned server %s is not in pool %s" % (printable(pinned), pool)
                                if pool is not None else "pinned server %s is dedicated to pool %s"
                                % (printable(pinned), ", ".join(found[0].pools)))
            return placement
    else:
        found = [server for server in taking if _pool_allows(server, pool)]
        if not found:
            placement.reason = ("no server takes rooms" if pool is None
                                else "no server of pool %s takes rooms" % pool)
            return placement
    candidates = [(server, server.estimated_load()) for server in found]
    # 2. Tiers: the first with a server that is not estimated full is used.
    tiers = placement.tiers
    if region is not None:
        tiers.append(("in_region", region, [c for c in candidates if c[0].region == region]))
        for other in region_fallback.get(region, ()):
            tiers.append(("fallback", other, [c for c in candidates if c[0].region == other]))
    tiers.append(("any", None, candidates))
    skipped = []
    for index, (tier, name, members) in enumerate(tiers):
        if any(load < 1.0 for _server, load in members):
            placement.used = index
            break
        if tier != "any":
            skipped.append("region %s: %s" % (name, "no candidate" if not members
                                              else "every candidate (%d) estimated full" % len(members)))
    if placement.used is None:
        placement.used = len(tiers) - 1
        why_tier = "every candidate is estimated full, so the least loaded of all"
    elif region is None:
        why_tier = "the room has no region: every candidate"
    elif placement.tier == "in_region":
        why_tier = "in the room's region %s" % region
    elif placement.tier == "fallback":
        why_tier = "%s; next in region_fallback: %s" % ("; ".join(skipped), tiers[placement.used][1])
    else:
        why_tier = "%s; so any region" % "; ".join(skipped)
    # 3. The pick within the tier.
    placement.server, why_pick = _pick_in_tier(tiers[placement.used][2], rule, rng, room_key)
    placement.reason = "%s; %s" % (why_tier, why_pick)
    return placement


def _pool_allows(server: Server, pool: Optional[str]) -> bool:
    """Pools are a wall both ways: a pool's customers use only its servers,
    and the others never use a server of any pool."""
    return pool in server.pools if pool is not None else not server.pools


def _pick_in_tier(members: List[Tuple[Server, float]], rule: str,
                  rng: random.Random, room_key: str = "") -> Tuple[Server, str]:
    """The server for a room among a tier's candidates, and why it."""
    if len(members) == 1:
        return members[0][0], "the only candidate"
    if rule == "hashed":
        # Rendezvous hashing: the same room gets the same server on every gateway
        # that knows the same candidates, with no one to ask (ClusterLink, Redis down).
        def weight(server: Server) -> bytes:
            return hashlib.blake2b(("%s\0%s" % (room_key, server.hostname)).encode("utf-8"),
                                   digest_size=8).digest()
        return (max((server for server, _load in members), key=weight),
                "by the room's hash among %d, as every gateway without Redis picks" % len(members))
    if rule == "random":
        weights = [1.0 - min(max(load, 0.0), 1.0) for _server, load in members]
        why = "drawn at random, weighted by free capacity (1 - load), among %d" % len(members)
        total = sum(weights)
        if total <= 0:
            return members[int(rng.random() * len(members))][0], why
        point = rng.random() * total
        for (server, _load), weight in zip(members, weights):
            point -= weight
            if point < 0:
                return server, why
        return members[-1][0], why
    lowest = min(load for _server, load in members)
    best = [server for server, load in members if load - lowest < 1e-9]
    why = "least estimated load (%.3f) of %d" % (lowest, len(members))
    if len(best) == 1:
        return best[0], why
    return best[int(rng.random() * len(best))], why + ", a tie of %d broken at random" % len(best)


class Grid:
    """Servers, rooms and usage: plain data, changed only by the methods below.

    Settings (timeouts, intervals) are read from the gateway's current
    config at each call, so a reloaded config applies at once.
    """

    def __init__(self, gateway: "Gateway"):
        self._gateway = gateway
        self.servers: Dict[str, Server] = {}
        self.rooms: Dict[str, Room] = {}
        # customer -> [peers, rooms]: reported by the enabled servers, and sent
        # by Connect since their last report. Kept up to date as reports and
        # Connects arrive, so limits hold between maintenance ticks too.
        self.reported: Dict[str, List[int]] = {}
        self.pending: Dict[str, List[int]] = {}
        self._by_kid: Dict[str, Server] = {}
        # Cluster hook: called with (hostname, customer, new_room) for every
        # peer Connect places, so the cluster link can share future usage.
        self.on_placed: Optional[Callable[[str, str, int], None]] = None
        # Cluster: True while this gateway places new rooms without Redis (and
        # shortly after it returns): then every gateway picks a room's server by
        # the room's hash, so that they agree without asking (ClusterLink).
        self.placing_alone = False
        self.gateways_alone = 1  # the gateways placing alone meanwhile (see limit_usage)
        # Clock time until which no server counts as silent: set when saved state
        # is restored, since each server may have lost a report to the restart
        # (sent while the gateway was down, or on a connection the restart broke).
        self.grace_until = 0.0
        # Called with (record, acknowledged) for every change worth saving
        # (section "Saved state"); None: nobody saves the state.
        self.journal: Optional[Callable[[list, bool], None]] = None
        # Room hashes in order, for Info's pages (rooms_after), from the first
        # page on. Kept in batches, not hash by hash (each insertion or deletion
        # moves the rest of the list: seconds for a big report's rooms): hashes
        # mapped since wait in _unsorted; hashes unmapped stay, counted in
        # _stale, until a quarter of the list is stale (pages skip them).
        self._sorted: Optional[List[str]] = None
        self._unsorted: set = set()
        self._stale = 0
        # Hashes of the rooms placed by Connect and not yet reported: with the
        # rooms of servers silent for a token's lifetime, the only ones that
        # can expire (a reported room is refreshed by every report).
        self.placed: set = set()
        # Every server's rooms are known: a warm-up ended (or was turned off)
        # since a start without saved state, or the state restored says so.
        # A state saved before that must not spare the next start its warm-up.
        self.complete = False
        self.frozen_rooms = 0  # rooms when the collector last froze the grid (handle_request)
        # Hashes (and their sort keys) of the rooms of a big report, worked out
        # in steps before it is integrated (prepare_rooms); used up by the report.
        self.prepared: Dict[Tuple[str, str], str] = {}
        self.prepared_order: Dict[str, Tuple[str, str]] = {}
        # Cluster mode: admin tasks whose Redis call failed (it may have run), id ->
        # (hostname, task); sent again under their ids (ClusterLink._push_held_tasks).
        self.held: Dict[str, Tuple[str, dict]] = {}

    # -- changes: each room mapping goes through _map and _unmap ---------------

    def _note(self, record: list, acknowledged: bool = False) -> None:
        if self.journal is not None:
            self.journal(record, acknowledged)

    def _touch(self, hostname: str) -> None:
        """Note that a room of this server changed (see Server.changes)."""
        server = self.servers.get(hostname)
        if server is not None:
            server.changes += 1

    def _map(self, digest: str, room: Room, acknowledged: bool = False) -> None:
        """Map (or remap) a room and journal it; acknowledged: a Connect answers with it."""
        self.put_room(digest, room)
        if self.journal is not None:
            self.journal(room_record(digest, room), acknowledged)

    def put_room(self, digest: str, room: Room) -> None:
        """Map (or remap) a room, unjournaled (apply_record replays a record with it).
        (A caller that moves a Room object to another server touches the old one.)"""
        old = self.rooms.get(digest)
        if old is None:
            if self._sorted is not None:
                self._unsorted.add(digest)
        elif old is not room:
            self._touch(old.server)
        self.rooms[digest] = room
        if room.reported:
            self.placed.discard(digest)
        else:
            self.placed.add(digest)

    def _unmap(self, digest: str) -> None:
        """Unmap a room and journal it."""
        self.drop_room(digest)
        self._note(["unroom", digest])

    def drop_room(self, digest: str) -> Optional[Room]:
        """Unmap a room, unjournaled (apply_record replays an "unroom" record with it);
        the room, None if it was not mapped. (Its server's room_hashes are the caller's.)"""
        room = self.rooms.pop(digest, None)
        if room is None:
            return None
        self._touch(room.server)
        self.placed.discard(digest)
        if self._sorted is not None:
            if digest in self._unsorted:
                self._unsorted.discard(digest)
            else:
                self._stale += 1
        return room

    def set_complete(self) -> None:
        """Every server's rooms are known from now on (see complete)."""
        if not self.complete:
            self.complete = True
            self._note(["complete"])

    def note_server(self, server: Server) -> None:
        self._note(["server", server.hostname, server.version, server.disabled, server.draining])

    def rooms_after(self, after: str, limit: int) -> List[str]:
        """At most limit room hashes that sort after after (Info's pages)."""
        order, rooms = self._sorted, self.rooms
        if order is None:
            order, self._unsorted = sorted(rooms), set()
        elif self._stale > len(order) // 4:  # the gone (and twice listed) out, in one pass
            order = [digest for digest, _ in itertools.groupby(order) if digest in rooms]
        if self._unsorted:
            if len(self._unsorted) < 100:
                for digest in self._unsorted:
                    bisect.insort(order, digest)
            else:  # timsort merges a sorted run with the new ones in about len(order) steps
                order += self._unsorted
                order.sort()
        if order is not self._sorted:
            self._stale = 0
        self._sorted, self._unsorted = order, set()
        page: List[str] = []
        for digest in itertools.islice(order, bisect.bisect_right(order, after), None):
            if len(page) >= limit:
                break
            # (a hash unmapped and mapped again is listed twice, side by side)
            if digest in rooms and (not page or digest != page[-1]):
                page.append(digest)
        return page

    @property
    def config(self) -> Config:
        return self._gateway.config

    def key_for(self, hostname: str) -> SigningKey:
        server = self.servers.get(hostname)
        return server.key if server else derive_server_key(self.config.master_key_bytes, hostname)

    def server_key_by_kid(self, kid: str) -> Optional[SigningKey]:
        server = self._by_kid.get(kid)
        return server.key if server else None

    def add_server(self, hostname: str, now: float) -> Server:
        """A new server, known by its hostname and by its key's kid (as first seen now)."""
        server = Server(hostname, derive_server_key(self.config.master_key_bytes, hostname), now)
        self.servers[hostname] = server
        self._by_kid[server.key.kid] = server
        return server

    # -- reports ------------------------------------------------------------

    def prepare_rooms(self, hostname: str, rooms: Union[List[Any], RoomsText]) -> Iterator[None]:
        """Hash the rooms of a coming report that are new to its server, in
        steps of PREPARE_STEP_ROOMS (yielding between them): pure work that
        the report's integration then finds done. The grid does not change
        here, so nothing is ever half-integrated; malformed rooms are left
        for the report to refuse."""
        server = self.servers.get(hostname)
        known = server.room_keys if server is not None else {}
        prepared, orders = self.prepared, self.prepared_order
        if isinstance(rooms, RoomsText):  # their ids, those it does not know (in C)
            same = server.integrated if server is not None else None
            if same is not None and same[0] == rooms.columns[0]:  # the ids of the last report
                return
            rooms = list(itertools.filterfalse(known.__contains__, rooms.columns[0]))
        for start in range(0, len(rooms), PREPARE_STEP_ROOMS):
            for room in rooms[start:start + PREPARE_STEP_ROOMS]:
                room_id = room.get("id") if isinstance(room, dict) else room
                if not (isinstance(room_id, (list, tuple)) and len(room_id) == 2):
                    continue
                key = tuple(room_id)
                if key in known or key in prepared or not all(isinstance(part, str) for part in key):
                    continue
                try:
                    digest = prepared[key] = room_hash(*key)  # type: ignore[misc]
                except ValueError:
                    continue  # the report warns about it
                orders[digest] = locale_order(digest)
            yield

    def report(self, hostname: str, version: str, report: dict, now: float,
               rooms: Optional["RoomColumns"] = None, *, replica: bool = False) -> Server:
        """Store a server's report: find or create it, integrate its rooms, re-enable it.

        report: load, clients (and draining); rooms: its rooms (room_columns
        of report["rooms"] if not given). The cost grows with what changed
        since its previous report, not with its size: a report repeating
        the previous one's rooms only refreshes them. replica: the report was
        taken by another gateway of the cluster; it is applied alike, but a
        collision queues no RoomClose here (the gateway that took it answered).
        """
        if rooms is None:
            rooms = room_columns(report.get("rooms", []))
            if rooms is None:
                raise ValueError("invalid rooms in report: %s" % _want_rooms(report.get("rooms")))
        report = {name: value for name, value in report.items() if name != "rooms"}
        server = self.servers.get(hostname)
        changed = server is None or server.disabled or server.version != version
        if server is None:
            server = self.add_server(hostname, now)
            self._gateway.event("server_added", now, hostname=hostname, version=version,
                                kid=server.key.kid)
        elif server.disabled:
            self._gateway.event("server_enabled", now, hostname=hostname)
        if changed:  # before its rooms: a replay needs the server first
            self._note(["server", hostname, version, False, server.draining])
        keys, customers, ages, peers = rooms
        unknown = self._integrate_rooms(server, keys, customers, now, replica)
        self._account(server, -1)
        usage = _usage_by_customer(keys, customers, peers, unknown)
        if usage != server.usage:  # customer limits hold across a restart too
            self._note(["usage", hostname, usage])
        server.usage = usage
        server.reported_rooms = rooms
        server.pending = {}
        server.pending_peers = 0
        server.version = version
        server.report = report
        draining = bool(report.get("draining", False))
        if draining != server.reported_draining:
            server.reported_draining = draining
            self._gateway.event("server_draining" if draining else "server_undrained", now,
                                hostname=hostname, by="server")
        self._label(server)
        server.last_seen = now
        server.disabled = False
        self._account(server, +1)
        if self.prepared:
            self.prepared, self.prepared_order = {}, {}
        return server

    def _account(self, server: Server, sign: int) -> None:
        """Add (sign +1) or take back (-1) an enabled server's share of the usage."""
        if server.disabled:
            return
        for totals, share in ((self.reported, server.usage), (self.pending, server.pending)):
            for customer, (peers, rooms) in share.items():
                counts = totals.setdefault(customer, [0, 0])
                counts[0] += sign * peers
                counts[1] += sign * rooms
                if counts == [0, 0]:
                    del totals[customer]

    def usage_of(self, customer: str) -> Tuple[int, int]:
        """(peers, rooms) of a customer: reported, plus sent by Connect since."""
        reported = self.reported.get(customer, (0, 0))
        pending = self.pending.get(customer, (0, 0))
        return reported[0] + pending[0], reported[1] + pending[1]

    def limit_usage(self, customer: str, shares: Optional[int] = None) -> Tuple[int, int]:
        """usage_of() as limits count it: a cluster gateway without Redis, which cannot
        see the others' placements, counts its own placements since the reports once
        for every gateway (gateways_alone, or shares if more), as if each had placed as
        many."""
        shares = max(self.gateways_alone, shares or 1)
        if shares == 1:
            return self.usage_of(customer)
        reported = self.reported.get(customer, (0, 0))
        pending = self.pending.get(customer, (0, 0))
        return reported[0] + shares * pending[0], reported[1] + shares * pending[1]

    @property
    def usage(self) -> Dict[str, Tuple[int, int]]:
        """(peers, rooms) per customer, as usage_of() counts them."""
        return {customer: self.usage_of(customer) for customer in set(self.reported) | set(self.pending)}

    def _integrate_rooms(self, server: Server, keys: List[Tuple[str, str]], customers: List[str],
                         now: float, replica: bool = False) -> set:
        """Map the reported rooms (keys: their ids); the keys that cannot be
        identified (a name over 255 bytes; left out, with a warning).

        A repeat of the previous report, with nothing changed by others since
        (Server.changes), only refreshes the rooms' times. Otherwise only the
        rooms new to this report are hashed, and each reported room is looked up.
        """
        hostname = server.hostname
        same = server.integrated
        if (same is not None and same[3] == server.changes and same[0] == keys
                and same[1] == customers):  # a repeat (compared in C): all still its own
            for known in same[2]:
                known.updated = now
            return set()
        room_keys = server.room_keys
        unknown: set = set()
        if len(room_keys) != len(keys) or None in map(room_keys.get, keys):
            current = dict.fromkeys(keys)
            prepared = self.prepared
            for key in current.keys() - room_keys.keys():
                try:
                    room_keys[key] = prepared.get(key) or room_hash(*key)
                except ValueError as err:
                    unknown.add(key)
                    log.warning("server %s reported room %s/%s: %s; ignoring it", printable(hostname),
                                printable(key[0]), printable(key[1]), err)
            for key in room_keys.keys() - current.keys():
                del room_keys[key]
        # hash -> row; rooms sharing a base name share a hash: the last one names it
        reported = dict(zip(map(room_keys.get, keys), range(len(keys))))
        reported.pop(None, None)
        fresh = []
        rooms_get = self.rooms.get
        for digest, row in reported.items():
            known = rooms_get(digest)
            if known is not None and known.server == hostname:
                known.updated = now
                if known.customer != customers[row] or not known.reported:
                    known.customer = customers[row]
                    known.reported = True  # a placement, confirmed
                    self._map(digest, known)
            else:
                fresh.append(digest)
        # Sorted as the original sorts them: the order shows in Info and in
        # the order of collision tasks.
        orders = self.prepared_order
        for digest in sorted(fresh, key=lambda digest: orders.get(digest) or locale_order(digest)):
            row = reported[digest]
            known = self.rooms.get(digest)
            # Reported beats placed: a room Connect placed elsewhere, which no
            # server has confirmed, moves to the server that has it.
            if known is None or not known.reported or known.server not in self.servers:
                self._map(digest, Room(keys[row], customers[row], hostname, now, True))
            elif digest not in server.closing and not replica:  # at most one RoomClose per room
                self._collision(server, known, keys[row], digest)
        if len(server.room_hashes) != len(reported) or not server.room_hashes.issuperset(reported):
            for digest in server.room_hashes.difference(reported):
                known = self.rooms.get(digest)
                if known is not None and known.server == hostname:
                    self._unmap(digest)
                    self._gateway.event("room_gone", now, customer=known.customer, room=known.id,
                                        server=hostname, reason="no longer reported")
            server.room_hashes = set(reported)
        owned = list(map(rooms_get, reported))
        mine = not unknown and all(known is not None and known.server == hostname for known in owned)
        server.integrated = (keys, customers, owned, server.changes) if mine else None
        return unknown

    def _collision(self, server: Server, owner: Room, room_id: Tuple[str, str], digest: str) -> None:
        """Another server owns the room: tell this one to close its copy."""
        if len(server.tasks) >= self.config.max_queued_tasks:
            log.warning("room collision on %s: its task queue is full; not queueing RoomClose",
                        printable(server.hostname))
            return
        self._gateway.event("room_collision", hostname=server.hostname, room=tuple(room_id),
                            owner=owner.server)
        ban = {"secs": int(math.ceil(self.config.update_interval)), "nanos": 0}
        task = {"task": "RoomClose", "id": list(room_id), "ban_time": ban}
        server.tasks.append(task)
        self._task_event("task_queued", server, task)
        server.closing.add(digest)
        self._note(["task", server.hostname, task])

    def _label(self, server: Server) -> None:
        """A server's region and pools: the first server_labels rule whose pattern
        matches its hostname (case-insensitively) decides what the rule names;
        the server's own report decides the rest."""
        region, pools = server.report.get("region"), server.report.get("pools", ())
        hostname = server.hostname.lower()
        for rule in self.config.server_labels:
            if fnmatch.fnmatchcase(hostname, rule["match"].lower()):
                region = rule.get("region") if "region" in rule else region
                pools = (rule.get("pools") or ()) if "pools" in rule else pools
                break
        server.region = region
        server.pools = tuple(dict.fromkeys(pools))

    def relabel(self) -> None:
        """Label every server again (after a config reload changed server_labels)."""
        for server in self.servers.values():
            self._label(server)

    def take_tasks(self, server: Server) -> List[dict]:
        tasks, server.tasks = server.tasks, []
        server.closing.clear()
        for task in tasks:
            self._task_event("task_delivered", server, task)
        if tasks:
            self._note(["sent", server.hostname, len(tasks)])
        return tasks

    def queue_task(self, server: Server, task: dict) -> None:
        if len(server.tasks) >= self.config.max_queued_tasks:
            raise self.queue_full(server.hostname)
        self._append_task(server, task)

    def queue_full(self, hostname: str) -> RpcError:
        """The refusal of an admin task whose server's queue is full (here, or in Redis)."""
        return refused("task queue of server %s is full (%d tasks); try again after its next report"
                       % (hostname, self.config.max_queued_tasks))

    def _append_task(self, server: Server, task: dict) -> None:
        server.tasks.append(task)
        self._task_event("task_queued", server, task)
        self._note(["task", server.hostname, task], acknowledged=True)

    def hold_task(self, task_id: str, hostname: str, task: dict, acknowledged: bool = False) -> None:
        """Keep a task whose Redis call failed, to send again under its id (journaled:
        acknowledged, the answer {} waits until it is on disk)."""
        self.held[task_id] = (hostname, task)
        self._note(["held", task_id, hostname, task], acknowledged)

    def stored_task(self, task_id: str) -> None:
        """A held task that Redis now has (or refused: then queued here again)."""
        if self.held.pop(task_id, None) is not None:
            self._note(["stored", task_id])

    def _task_event(self, kind: str, server: Server, task: dict) -> None:
        self._gateway.event(kind, server=server.hostname, task=task["task"], room=tuple(task["id"]))

    # -- placement ----------------------------------------------------------

    def assign(self, digest: str, room_id: Tuple[str, str], customer: str,
               pinned: Optional[str], now: float, *, region: Optional[str] = None,
               pool: Optional[str] = None) -> Server:
        """The server for a room: where it lives, else a new pick; (re)maps it there.

        A room that lives on an answering server stays there, whatever region
        later tokens name. The peer (and the room, if new there) count as
        pending usage of the server and the customer until its next report.
        """
        server = self.server_of(digest, now)
        room = self.rooms.get(digest)
        if server is None:
            moved_from = room.server if room is not None else None
            server = self._place(room_id, customer, pinned, region, pool, now, moved_from, digest)
        new_here = room is None or room.server != server.hostname
        if room is None:
            self._map(digest, Room(room_id, customer, server.hostname, now), acknowledged=True)
        else:
            saved_second = int(room.updated)
            room.updated = now
            if new_here:  # moved: the new server has not confirmed it yet
                self._touch(room.server)
                room.reported = False
                room.server = server.hostname
                self._map(digest, room, acknowledged=True)
            elif not room.reported and int(now) != saved_second:
                # A placement lives as long as Connects refresh it: saved, so that
                # it does not expire early after a restart (no report refreshes it).
                self._map(digest, room)
        new_room = 1 if new_here and digest not in server.room_hashes else 0
        self._count_pending(server, customer, 1, new_room)
        if self.on_placed is not None:
            self.on_placed(server.hostname, customer, new_room)
        return server

    def answering(self, server: Server, now: float) -> bool:
        """Not disabled, and not silent for disable_timeout: a silent server is out
        from that moment, whatever the phase of the maintenance tick (which only
        makes it official). While a cluster gateway is without Redis (gateways_alone),
        a server silent here may be reporting to another gateway: it stays in; and
        so it does after a restart from saved state, until grace_until."""
        return not server.disabled and (now - server.last_seen < self.config.disable_timeout
                                        or self.gateways_alone > 1 or now < self.grace_until)

    def state(self, server: Server, now: float) -> str:
        """"enabled" (takes new rooms), "draining" (serves its rooms, takes no new
        ones) or "disabled" (by the tick, or silent for disable_timeout: out from
        that moment, as answering() says). What /metrics and /status both show."""
        if not self.answering(server, now):
            return "disabled"
        return "enabled" if server.takes_rooms else "draining"

    def candidates(self, now: float) -> List[Server]:
        """The servers that take new rooms now: answering and not draining."""
        return [s for s in self.servers.values() if s.takes_rooms and self.answering(s, now)]

    def server_of(self, digest: str, now: float) -> Optional[Server]:
        """The answering server a room is mapped to, or None: then a Connect opens it anew."""
        room = self.rooms.get(digest)
        server = self.servers.get(room.server) if room is not None else None
        return server if server is not None and self.answering(server, now) else None

    def place(self, *, pool: Optional[str], region: Optional[str], pinned: Optional[str],
              now: float, rng: random.Random, digest: str = "") -> Placement:
        """The placement rule (place_room) over this grid's servers and settings
        (digest: the room's hash, for the pick of a gateway placing alone)."""
        return place_room(self.candidates(now), pool=pool, region=region, pinned=pinned,
                          region_fallback=self.config.region_fallback,
                          rule="hashed" if self.placing_alone else self.config.placement,
                          rng=rng, room_key=digest)

    # -- cluster replica (see ClusterLink) -------------------------------------

    def adopt_room(self, record: list, now: float, *, force: bool = False) -> None:
        """Map a room as its claim in Redis (a "room" record) says; force: even over a
        live local mapping. Placed, as far as this replica knows, until its server's
        report (applied here too) confirms it."""
        digest, room = record_room(record)
        if force or self.server_of(digest, now) is None:
            room.updated = min(now, room.updated)
            room.reported = False
            self._map(digest, room)

    def set_pending(self, hostname: str, usage: Dict[str, List[int]]) -> None:
        """A server's usage placed since its last report, as the cluster counted it."""
        server = self.servers.get(hostname)
        if server is None:
            return
        self._account(server, -1)
        server.pending = usage
        server.pending_peers = sum(peers for peers, _rooms in usage.values())
        self._account(server, +1)

    def add_pending(self, hostname: str, customer: str, peers: int, rooms: int) -> None:
        """Usage another gateway placed on a server since its last report."""
        server = self.servers.get(hostname)
        if server is not None:
            self._count_pending(server, customer, peers, rooms)

    def _count_pending(self, server: Server, customer: str, peers: int, rooms: int) -> None:
        """Count usage placed on a server since its report (in the totals too while it is enabled)."""
        for totals in (server.pending,) if server.disabled else (server.pending, self.pending):
            counts = totals.get(customer)
            if counts is None:  # not setdefault: that builds a list on every Connect
                counts = totals[customer] = [0, 0]
            counts[0] += peers
            counts[1] += rooms
        server.pending_peers += peers

    def _place(self, room_id: Tuple[str, str], customer: str, pinned: Optional[str],
               region: Optional[str], pool: Optional[str], now: float,
               moved_from: Optional[str] = None, digest: str = "") -> Server:
        """A server for a new room (or one whose server is gone: moved_from), counted
        by tier and recorded as a room_placed event; refused if none."""
        placement = self.place(pool=pool, region=region, pinned=pinned, now=now, rng=self._gateway.rng,
                               digest=digest)
        server, tier = placement.server, placement.tier
        if server is None or tier is None:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("room %s/%s of customer %s (region %s, pool %s): refused: %s",
                          printable(room_id[0]), printable(room_id[1]), printable(customer),
                          printable(region), printable(pool), placement.reason, extra=fields(
                              "room_refused", room=list(room_id), customer=customer,
                              region=region, pool=pool, reason=placement.reason))
            raise placement.refusal()
        self._gateway.metrics.placed[tier] += 1
        reason = placement.reason + ("; moved from %s" % moved_from if moved_from else "")
        self._gateway.event("room_placed", now, customer=customer, room=room_id,
                            server=server.hostname, new=moved_from is None, reason=reason,
                            region=region, pool=pool, tier=tier)
        return server

    # -- maintenance --------------------------------------------------------

    def tick(self, now: float) -> None:
        """Disable and remove silent servers, expire rooms, recompute usage."""
        config = self.config
        for server in list(self.servers.values()):
            silent = now - server.last_seen
            if silent >= config.remove_timeout:
                rooms = self._remove(server)
                self._gateway.event("server_removed", now, hostname=server.hostname, silent=silent,
                                    rooms=rooms)
            elif (silent >= config.disable_timeout and not server.disabled and self.gateways_alone == 1
                  and now >= self.grace_until):
                self._account(server, -1)
                server.disabled = True
                self.note_server(server)
                self._gateway.event("server_disabled", now, hostname=server.hostname, silent=silent)
        lifetime = config.login_token_lifetime
        candidates = set(self.placed)  # not every room: a tick must not cost more with more rooms
        for server in self.servers.values():
            if now - server.last_seen > lifetime:
                candidates.update(server.room_hashes)
        for digest in sorted(candidates):
            room = self.rooms.get(digest)
            if room is not None and now - room.updated > lifetime:
                self._unmap(digest)
                self._gateway.event("room_gone", now, customer=room.customer, room=room.id,
                                    server=room.server, reason="not reported while its tokens lived")
        self._recount()

    def _recount(self) -> None:
        """Rebuild the usage totals from the enabled servers (they are kept up to
        date as reports and Connects arrive; this keeps them honest)."""
        self.reported, self.pending = {}, {}
        for server in self.servers.values():
            self._account(server, +1)

    def _remove(self, server: Server) -> int:
        """Forget a server and its rooms; how many rooms went with it."""
        self._account(server, -1)
        del self.servers[server.hostname]
        self._by_kid.pop(server.key.kid, None)
        journal, self.journal = self.journal, None  # one record says it all
        gone = [d for d, room in self.rooms.items() if room.server == server.hostname]
        for digest in gone:
            self._unmap(digest)
        self.journal = journal
        self._note(["forget", server.hostname])
        return len(gone)


# ---------------------------------------------------------------------------
# Saved state: the grid as records, the state file
# ---------------------------------------------------------------------------
#
# What a restart must not lose (admin tasks answered but not yet delivered,
# rooms placed by Connect and not yet reported) and what lets a restarted
# gateway place rooms at once (where every room lives) are written as
# records: JSON arrays, one kind each. The grid emits one for each change
# (Grid.journal); grid_records() writes a whole grid as records and
# apply_record() replays one, so a snapshot followed by the changes since
# rebuilds the grid. The state file holds exactly that. In cluster mode a
# room's claim in Redis is its "room" record too, built by room_record and
# read by record_room for both. (A task is the same dict in both, queued in
# Redis with an id; a server record in Redis holds its whole last report,
# which the state file does not need: it is rebuilt from the next reports.)
#
#   ["server", hostname, version, disabled, draining]   added, or one of these changed
#   ["forget", hostname]                                removed, with its rooms
#   ["room", hash, namespace, name, customer, server, updated, reported]   (re)mapped
#                                 (updated: whole seconds; a reported room is as new as the restore)
#   ["unroom", hash]                                    unmapped
#   ["task", hostname, task]                            queued for the server
#   ["sent", hostname, count]                           its first count tasks were delivered
#   ["held", id, hostname, task]       cluster: its Redis call failed; sent again under its id
#   ["stored", id]                                      that held task is in Redis now
#   ["usage", hostname, {customer: [peers, rooms]}]     its last report's usage by customer
#   ["complete"]                                        every server's rooms are known (Grid.complete)

#: The first line of a state file: its format and version.
STATE_HEADER = ["odin-gateway-state", 1]
#: A state file is compacted (rewritten as a snapshot) when the changes
#: appended since the last snapshot exceed both this and the snapshot's size.
STATE_COMPACT_BYTES = 4 * 1024 * 1024
#: Records per line of the state file: the JSON encoder writes a line in one
#: call, and a line cut short by a crash loses no more than its own records.
STATE_LINE_RECORDS = 1000

_RECORD_SHAPES: Dict[str, Tuple[type, ...]] = {
    "server": (str, str, bool, bool),
    "forget": (str,),
    "room": (str, str, str, str, str, (int, float), bool),  # type: ignore[dict-item]
    "unroom": (str,),
    "task": (str, dict),
    "sent": (str, int),
    "held": (str, str, dict),
    "stored": (str,),
    "usage": (str, dict),
    "complete": (),
}


class StateError(GatewayError):
    """The state file cannot be read or is not a state file this gateway wrote."""


def record_problem(record: Any) -> Optional[str]:
    """Why a record is malformed, or None."""
    if not (isinstance(record, list) and record and record[0] in _RECORD_SHAPES):
        return "not a record (expected [kind, ...] with kind one of %s)" % ", ".join(_RECORD_SHAPES)
    shape = _RECORD_SHAPES[record[0]]
    if len(record) != len(shape) + 1 or not all(
            isinstance(value, kind) and (kind is not int or not isinstance(value, bool))
            for value, kind in zip(record[1:], shape)):
        return "malformed %s record" % record[0]
    if record[0] == "usage" and not all(
            isinstance(counts, list) and len(counts) == 2 and all(map(_is_integer, counts))
            for counts in record[2].values()):
        return "malformed usage record (counts must be [peers, rooms])"
    return None


def grid_records(grid: Grid) -> Iterator[list]:
    """The grid's state as records (a snapshot): servers, their rooms, their tasks."""
    if grid.complete:
        yield ["complete"]
    for server in grid.servers.values():
        yield ["server", server.hostname, server.version, server.disabled, server.draining]
        if server.usage:
            yield ["usage", server.hostname, server.usage]
        for task in server.tasks:
            yield ["task", server.hostname, task]
    for task_id, (hostname, task) in grid.held.items():
        yield ["held", task_id, hostname, task]
    for digest, room in grid.rooms.items():
        yield room_record(digest, room)


def room_record(digest: str, room: Room) -> list:
    """A room's mapping as a "room" record: in the state file, and (the same JSON)
    as the room's claim in Redis (odin:room:<hash>, see ClusterLink)."""
    return ["room", digest, room.id[0], room.id[1], room.customer, room.server, int(room.updated),
            room.reported]


def record_room(record: list) -> Tuple[str, Room]:
    """The hash and Room of a "room" record (from the state file, or a claim in Redis)."""
    _, digest, namespace, name, customer, hostname, updated, reported = record
    return digest, Room((namespace, name), customer, hostname, updated, reported)


def apply_record(grid: Grid, record: list, now: float) -> None:
    """Replay one record onto a grid (the journal hook is not called).

    Servers come back enabled as seen now: the gateway was down, so their
    silence meant nothing; a server that is really gone is disabled
    disable_timeout later, as always.
    """
    kind = record[0]
    if kind == "complete":
        grid.complete = True
        return
    if kind == "room":
        digest, room = record_room(record)
        server = grid.servers.get(room.server)
        if server is None:
            return  # its server was forgotten: so is the room
        if room.reported:
            room.updated = max(room.updated, now)
        grid.put_room(digest, room)
        if room.reported:
            server.room_hashes.add(digest)
        return
    if kind == "held":
        grid.held[record[1]] = (record[2], record[3])
        return
    if kind == "stored":
        grid.held.pop(record[1], None)
        return
    if kind == "unroom":
        room = grid.drop_room(record[1])
        if room is not None and room.server in grid.servers:
            grid.servers[room.server].room_hashes.discard(record[1])
        return
    hostname = record[1]
    server = grid.servers.get(hostname)
    if kind == "forget":
        if server is not None:
            journal, grid.journal = grid.journal, None
            grid._remove(server)
            grid.journal = journal
        return
    if server is None:
        server = grid.add_server(hostname, now)
    if kind == "server":
        server.version, server.disabled, server.draining = record[2], record[3], record[4]
        server.last_seen = now
    elif kind == "task":
        server.tasks.append(record[2])
    elif kind == "sent":
        del server.tasks[:record[2]]
        server.closing.clear()
    elif kind == "usage":
        grid._account(server, -1)
        server.usage = {customer: list(counts) for customer, counts in record[2].items()}
        grid._account(server, +1)


class StateFile:
    """The state file: a header line, then lines that each hold a JSON array
    of records (a snapshot in chunks, then one line per flush of changes).
    Its methods do blocking file I/O: the serving loop calls them in a
    worker thread, one at a time."""

    def __init__(self, path: str):
        self.path = path
        self._file: Any = None
        self._lock: Any = None
        self.snapshot_bytes = 0  # size of the last snapshot
        self.appended_bytes = 0  # bytes appended since

    def lock(self) -> None:
        """Hold path + ".lock" (flock, exclusive) while this gateway uses the file: a
        second gateway on it would journal into a file the first then replaces, or the
        other way round. StateError naming the file and the holder's pid."""
        if fcntl is None or self._lock is not None:
            return
        lock_path = self.path + ".lock"
        try:
            lock = open(lock_path, "a+")
        except OSError as err:
            raise StateError("state_file %s: cannot open its lock file %s: %s" % (
                self.path, lock_path, err.strerror or err)) from err
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise StateError("state_file %s is in use by another gateway (pid %s, holding %s): stop "
                             "it first, or give each gateway its own state_file"
                             % (self.path, holder, lock_path)) from None
        lock.truncate(0)
        lock.write("%d\n" % os.getpid())
        lock.flush()
        self._lock = lock

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # (closing releases the flock)
            self._lock = None

    def read(self) -> List[list]:
        """The records of the file ([] if there is none); StateError if unreadable.

        A last line cut short (a crash while writing it) is dropped: it was
        never synced, so nothing it held was acknowledged.
        """
        try:
            with open(self.path, "rb") as source:
                data = source.read()
        except FileNotFoundError:
            return []
        except OSError as err:
            raise StateError("state_file %s cannot be read: %s" % (self.path, err.strerror or err)) from err
        lines = data.split(b"\n")
        if lines[-1]:
            log.warning("state_file %s: dropping a last line cut short (%d bytes), written while "
                        "the gateway was killed", self.path, len(lines[-1]))
        records: List[list] = []
        for number, line in enumerate(lines[:-1], 1):
            try:
                batch = load_json(line)
            except ValueError as err:
                raise StateError("state_file %s: line %d is not JSON (%s)" % (self.path, number, err)) from err
            if number == 1:
                if batch != STATE_HEADER:
                    raise StateError("state_file %s is not an odin_gateway state file (its first "
                                     "line is not %s)" % (self.path, dump_json(STATE_HEADER).decode()))
                continue
            if not isinstance(batch, list):
                raise StateError("state_file %s: line %d is not an array of records" % (self.path, number))
            for record in batch:
                problem = record_problem(record)
                if problem:
                    raise StateError("state_file %s: line %d: %s" % (self.path, number, problem))
            records.extend(batch)
        return records

    def age(self, now: float) -> float:
        """Seconds since the file was last written."""
        return now - os.stat(self.path).st_mtime

    @staticmethod
    def encode(records: List[list]) -> bytes:
        """Records as lines of the file (one per STATE_LINE_RECORDS), JSON encoded in C."""
        return b"".join(dump_json(records[start:start + STATE_LINE_RECORDS]) + b"\n"
                        for start in range(0, len(records), STATE_LINE_RECORDS))

    def rewrite(self, data: bytes) -> None:
        """Replace the file by a snapshot (encoded records), atomically and durably."""
        self.close()
        temporary = self.path + ".new"
        with open(temporary, "wb") as out:
            out.write(dump_json(STATE_HEADER) + b"\n" + data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.path)
        directory = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself is durable
        finally:
            os.close(directory)
        self._file = open(self.path, "ab")
        self.snapshot_bytes, self.appended_bytes = len(data), 0

    def append(self, data: bytes) -> None:
        """Write encoded records at the end and sync them to disk."""
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.appended_bytes += len(data)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class SavedState:
    """A gateway's state file: restores the grid at start, then journals its
    changes. Records wait in memory until the next flush (the serving loop
    runs one after every loop iteration that made changes, and holds the
    answers to acknowledged calls until it is done); acknowledged counts the
    records that must be on disk before their answer is sent."""

    def __init__(self, gateway: "Gateway", path: str):
        self.gateway = gateway
        self.file = StateFile(path)
        self.pending: List[list] = []
        self.acknowledged = 0
        self.failed = False  # a write failed: the next one rewrites the whole state

    def note(self, record: list, acknowledged: bool) -> None:
        self.pending.append(record)
        if acknowledged:
            self.acknowledged += 1

    def restore(self, discard_unreadable: bool = False) -> bool:
        """Load the file into the grid if it is young enough; True if state was restored.

        An unreadable or corrupt file stops the start (StateError) unless
        discard_unreadable, which starts without it (and overwrites it).
        """
        gateway, grid, path = self.gateway, self.gateway.grid, self.file.path
        now = gateway.clock()
        self.file.lock()
        try:
            records = self.file.read()
            age = self.file.age(now) if os.path.exists(path) else None
        except (StateError, OSError) as err:
            if not discard_unreadable:
                self.file.unlock()
                raise StateError(str(err)) from err
            log.error("%s; starting without it, as --discard-unreadable-state says", err,
                      extra=fields("state_discarded", path=path, reason=str(err)))
            records, age = [], None
        restored = False
        if age is not None and age > gateway.config.remove_timeout:
            log.warning("state_file %s is %.0f s old (more than remove_timeout): starting without it",
                        path, age, extra=fields("state_too_old", path=path, age=age))
        elif age is not None:
            for record in records:
                apply_record(grid, record, now)
            grid._recount()  # the usage of the servers as restored, enabled or not
            restored = True
            log.info("state restored from %s: %d servers, %d rooms, %d tasks%s", path,
                     len(grid.servers), len(grid.rooms),
                     sum(len(server.tasks) for server in grid.servers.values()),
                     "" if grid.complete else " (saved during a warm-up: warming up again)",
                     extra=fields("state_restored", path=path, servers=len(grid.servers),
                                  rooms=len(grid.rooms)))
        self.resume()
        if restored:  # no server could report while the state was loaded and written anew
            seen = gateway.clock()
            for server in grid.servers.values():
                server.last_seen = max(server.last_seen, seen)
            # and each may have lost a report to the restart: the next one is
            # due an update_interval later; silent from then on is silent.
            config = gateway.config
            grid.grace_until = seen + config.update_interval + config.disable_timeout
        return restored

    def resume(self) -> None:
        """Start journaling: a fresh snapshot of the grid, then its changes."""
        self.file.lock()
        try:
            self.file.rewrite(self.file.encode(list(grid_records(self.gateway.grid))))
        except OSError as err:
            raise StateError("state_file %s cannot be written: %s" % (
                self.file.path, err.strerror or err)) from err
        self.pending = []
        self.gateway.grid.journal = self.note

    def take(self) -> Tuple[List[list], bool]:
        """What the next write must do, taken now: (records, True for a snapshot
        that replaces the file). A snapshot when the changes have outgrown the
        last one, or after a failed write. The records are fresh lists of
        values nobody changes later, so write() can encode them in a worker
        thread: encoding a snapshot of 100,000 rooms takes a third of a second."""
        if self.failed or self.file.appended_bytes > max(STATE_COMPACT_BYTES, self.file.snapshot_bytes):
            self.pending = []
            self.failed = False
            return list(grid_records(self.gateway.grid)), True
        records, self.pending = self.pending, []
        return records, False

    def write(self, records: List[list], snapshot: bool) -> None:
        """Do what take() said (encoding and blocking file I/O); on failure, the
        next take() is a snapshot."""
        try:
            if snapshot:
                self.file.rewrite(self.file.encode(records))
            elif records:
                self.file.append(self.file.encode(records))
        except OSError:
            self.failed = True
            raise

    def flush(self) -> None:
        """Write what is pending now, in the calling thread."""
        if self.pending or self.failed:
            self.write(*self.take())

    def close(self) -> None:
        """Stop journaling (flush first: what is pending is not written here)."""
        self.file.close()
        self.file.unlock()
        self.gateway.grid.journal = None


# ---------------------------------------------------------------------------
# RPC parameters: validation with messages that name the field
# ---------------------------------------------------------------------------

_MISSING = object()


def _want_string(value: Any) -> Optional[str]:
    return None if isinstance(value, str) else "must be a string"


def _want_number(value: Any) -> Optional[str]:
    return None if _is_number(value) else "must be a number"


def _want_duration(value: Any) -> Optional[str]:
    if _is_number(value) and 0 <= value <= MAX_SAFE_INTEGER:
        return None
    return "must be a non-negative number of seconds (at most 2^53 - 1)"


def _want_bytes(value: Any) -> Optional[str]:
    if isinstance(value, list) and all(
            _is_integer(b) and 0 <= b <= 255 for b in value):
        return None
    return "must be an array of integers from 0 to 255"


def _want_count(value: Any) -> Optional[str]:
    return None if _is_integer(value) and value >= 0 else "must be a non-negative integer"


def _want_positive(value: Any) -> Optional[str]:
    return None if _is_integer(value) and value > 0 else "must be a positive integer"


def _want_bool(value: Any) -> Optional[str]:
    return None if isinstance(value, bool) else "must be true or false"


def _want_rooms_page(value: Any) -> Optional[str]:
    if isinstance(value, bool):
        return None
    if not isinstance(value, dict):
        return 'must be true, false or a page {"after": hash, "limit": n}'
    unknown = sorted(set(value) - {"after", "limit"})
    if unknown:
        return "has unknown field %s (a page is {\"after\": hash, \"limit\": n})" % printable(unknown[0])
    if not isinstance(value.get("after", ""), str):
        return "after must be a string: the next of the previous page, or a room hash"
    limit = value.get("limit", INFO_PAGE_ROOMS)
    if not (_is_integer(limit) and 1 <= limit <= MAX_INFO_PAGE_ROOMS):
        return "limit must be an integer from 1 to %d" % MAX_INFO_PAGE_ROOMS
    return None


def _want_label(value: Any) -> Optional[str]:
    """A region (or pool) name, or null for none."""
    return None if value is None else _label_problem(value)


def _want_pools(value: Any) -> Optional[str]:
    return None if value is None else _pools_problem(value)


def _want_server_kind(value: Any) -> Optional[str]:
    return None if value in ("grid", "saga") else 'must be "grid" or "saga"'


def _want_list(value: Any) -> Optional[str]:
    return None if isinstance(value, (list, RoomsText)) else "must be an array of rooms"


def _want_rooms(value: Any) -> Optional[str]:
    """Which room is malformed and why (room_columns checks faster, without saying)."""
    if not isinstance(value, list):
        return "must be an array of rooms"
    for index, room in enumerate(value):
        problem = _room_problem(room)
        if problem:
            return "[%d]: %s" % (index, problem)
    return None


def _room_problem(room: Any) -> Optional[str]:
    if not isinstance(room, dict):
        return "must be an object"
    room_id = room.get("id")
    if not (isinstance(room_id, list) and len(room_id) == 2
            and all(isinstance(part, str) for part in room_id)):
        return "id must be [namespace, name], two strings"
    if not isinstance(room.get("customer"), str):
        return "customer must be a string"
    age = room.get("age")
    if not (isinstance(age, dict) and _is_number(age.get("secs")) and _is_number(age.get("nanos"))):
        return "age must be {secs: number, nanos: number}"
    peers = room.get("peers")
    if not (_is_integer(peers) and peers >= 0):
        return "peers must be a non-negative integer"
    return None


class Params:
    """Take fields from a params object, collecting every problem before refusing."""

    def __init__(self, params: dict):
        self.params = params
        self.problems: Dict[str, str] = {}

    def take(self, name: str, check: Callable[[Any], Optional[str]], default: Any = _MISSING) -> Any:
        if name not in self.params:
            if default is _MISSING:
                self.problems[name] = "is required"
            return None if default is _MISSING else default
        value = self.params[name]
        problem = check(value)
        if problem:
            self.problems[name] = problem
        return value

    def check(self) -> None:
        """RpcError listing every problem, with zod-style fieldErrors as data."""
        if self.problems:
            raise invalid_fields(self.problems)


def invalid_fields(problems: Dict[str, str], what: str = "invalid params") -> RpcError:
    message = "%s: %s" % (what, "; ".join(
        "%s %s" % (name, problem) if not problem.startswith("[") else name + problem
        for name, problem in problems.items()))
    data = {"formErrors": [], "fieldErrors": {name: [p] for name, p in problems.items()}}
    return RpcError(INVALID_REQUEST, message, data)


#: The admin tasks a customer's backend can queue, with their fields in the
#: order the task carries them: (name, check, default; _MISSING: required).
ROOM_TASKS = {
    "RoomClose": (("ban_time", _want_duration, 0),),
    "RoomUpdate": (("user_data", _want_bytes, _MISSING),),
    "RoomBanClient": (("user_id", _want_string, _MISSING), ("ban_time", _want_duration, 0)),
    "RoomSendMessage": (("user_id", _want_string, _MISSING), ("message", _want_bytes, _MISSING)),
}


def _task_duration(seconds: float) -> dict:
    """A ban time as the servers expect it: whole seconds and nanoseconds."""
    secs = int(seconds)
    nanos = int(round((seconds - secs) * 1e9))
    if nanos >= 1_000_000_000:
        secs, nanos = secs + 1, 0
    return {"secs": secs, "nanos": nanos}


# ---------------------------------------------------------------------------
# The gateway: customers, RPC methods, JSON-RPC dispatch, HTTP requests
# ---------------------------------------------------------------------------


class Call:
    """What a method handler knows about its call besides the params."""

    __slots__ = ("auth", "remote", "notification", "request_id")

    def __init__(self, auth: Optional[Authorization], remote: str, notification: bool,
                 request_id: Any = None):
        self.auth = auth
        self.remote = remote  # the default hostname of a server calling from there
        self.notification = notification
        self.request_id = request_id  # the JSON-RPC id


def _reporter(params: dict, remote: str) -> str:
    """The hostname of the server that sends a report (its rooms may still be
    unchecked): its public_endpoint, else the one its address gives."""
    endpoint = params.get("public_endpoint")
    return endpoint if isinstance(endpoint, str) and endpoint else remote_hostname(remote)


def remote_hostname(address: str) -> str:
    """The hostname a server calling from address gets when it names none."""
    try:
        if ipaddress.ip_address(address).version == 6:
            return "[%s]:4433" % address
    except ValueError:
        pass
    return "%s:4433" % address


class Response:
    """An HTTP response as plain data: status, extra headers, body and its type."""

    __slots__ = ("status", "headers", "body", "content_type")

    def __init__(self, status: int, body: bytes = b"", headers: Optional[List[Tuple[str, str]]] = None,
                 content_type: str = "application/json"):
        self.status = status
        self.body = body
        self.headers = headers or []
        self.content_type = content_type

    def json(self) -> Any:
        return load_json(self.body) if self.body else None


class Postponed(Response):
    """handle_http's answer to a request that must wait (a Connect for a room
    not yet reported, during the warm-up): ask handle_http again when the
    gateway's on_change hook fires or after seconds. Its own 503 is the answer
    for a transport that cannot wait, or when the gateway stops."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float, message: str):
        super().__init__(503, _error_body(INVALID_REQUEST, message),
                         [("Retry-After", str(max(1, int(math.ceil(seconds)))))])
        self.seconds = seconds


def _error_body(code: int, message: str, request_id: Any = None) -> bytes:
    return dump_json({"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": request_id})


def _is_request_id(value: Any) -> bool:
    if value is None or isinstance(value, str):
        return True
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


class ClusterStep:
    """A method's need for one Redis round trip (cluster mode only), as plain data.

    A handler that must not answer before Redis has seen something (a new
    room's claim, an admin task, a report and its tasks) returns a step
    instead of its result: ``operation`` and ``args`` say what the cluster
    link must do, and ``finish(outcome)`` (synchronous; outcome None when
    Redis could not be reached in time) gives the result, raises RpcError,
    or returns the next step. Steps with the same ``serial`` (a customer
    with limits) run one at a time on a gateway.
    """

    __slots__ = ("operation", "args", "finish", "serial")

    def __init__(self, operation: str, args: tuple, finish: Callable[[Any], Any],
                 serial: Optional[str] = None):
        self.operation = operation
        self.args = args
        self.finish = finish
        self.serial = serial


class PendingAnswers:
    """JSON-RPC answers of which some are ClusterSteps still to be completed."""

    __slots__ = ("answers", "batch")

    def __init__(self, answers: List[dict], batch: bool):
        self.answers = answers  # response objects; "notification": True ones are not sent
        self.batch = batch


class Gateway:
    """An ODIN gateway: grid state, customers and the RPC methods over them.

    Everything here is synchronous and does no I/O: handle_http() takes a
    parsed request and returns a Response; tick() runs the maintenance step.
    serve() (below) puts it on a socket. clock returns seconds since the
    epoch; rng is a random.Random used to pick servers.
    """

    PUBLIC_METHODS = ("Connect", "RoomClose", "RoomUpdate", "RoomBanClient", "RoomSendMessage")
    INTERNAL_METHODS = ("sfu.GridConfig", "sfu.Report", "GetConfig", "SubmitReport", "Info", "Drain",
                        "Explain", "Events")

    def __init__(self, config: Optional[Config] = None, *, clock: Callable[[], float] = time.time,
                 rng: Optional[random.Random] = None):
        if config is not None and not isinstance(config, Config):
            raise TypeError("Gateway(config): expected a Config (Config(**settings) or "
                            "Config.load(path)), not %s" % type(config).__name__)
        self.config = config if config is not None else Config()
        self.clock = clock
        if clock() < 1e9:  # before 2001: time.monotonic or a fake clock started at 0
            log.warning("Gateway(clock=...) returned %r: expected seconds since the epoch, as "
                        "time.time gives; tokens carry such times, so each would be refused",
                        clock())
        self.rng = rng if rng is not None else random.Random()
        self.started = clock()
        self.events = EventFeed(self.config.max_events)
        self.refusals: Dict[str, int] = {}  # customer -> Connects refused by a limit
        self.grid = Grid(self)
        self.stats: Dict[str, List[int]] = {}  # method -> [success, failure, rejected]
        # Clock time the warm-up ends (0: not warming up); see begin_warmup.
        self.warm_until = 0.0
        self.state_restored = False  # started with saved state (complete or not: Grid.complete)
        self.saved: Optional[SavedState] = None  # the state_file, once opened
        # Added by the I/O layer: called when Postponed requests may be answered.
        self.on_change: List[Callable[[], None]] = []
        self.warmed = False  # the warm-up has begun once (a second listener does not restart it)
        # The GatewayServers serving this gateway, oldest first: the first runs the timers.
        self.servers: List[Any] = []
        self.metrics = Metrics()
        # (namespace, room name) -> room_hash: a room's peers all ask for it (bounded, ROOM_HASH_CACHE).
        self.room_hashes: Dict[Tuple[str, str], str] = {}
        # The cluster link (cluster mode, while serving): the handlers ask it
        # whether Redis is up, and hand it ClusterSteps through the HTTP layer.
        self.cluster: Optional[ClusterLink] = None
        # The thread of a sync customer update function, while it runs (see update_customers).
        self.customer_update_thread: Optional[threading.Thread] = None
        self._dynamic_keys: Dict[str, CustomerKey] = {}
        # customer id -> (region, pool), from config and the update function (which wins).
        self._dynamic_labels: Dict[str, Tuple[Optional[str], Optional[str]]] = {}
        self._load_static_keys()
        self._handlers: Dict[str, Callable[[Call, dict], Any]] = {
            "Connect": self.rpc_connect,
            **{task: functools.partial(self.rpc_room_task, task=task) for task in ROOM_TASKS},
            "sfu.GridConfig": functools.partial(self.rpc_grid_config, sfu=True),
            "GetConfig": functools.partial(self.rpc_grid_config, sfu=False),
            "sfu.Report": functools.partial(self.rpc_report, sfu=True),
            "SubmitReport": functools.partial(self.rpc_report, sfu=False),
            "Info": self.rpc_info,
            "Drain": self.rpc_drain,
            "Explain": self.rpc_explain,
            "Events": self.rpc_events,
        }

    def event(self, kind: str, now: Optional[float] = None, **values: Any) -> dict:
        """Record an event (EVENT_KINDS) in the feed and log it: one record for both.

        Cheap when its level is not logged: a dict appended to a deque.
        """
        record = self.events.add(kind, self.clock() if now is None else now, values)
        level, message = EVENT_KINDS[kind]
        if log.isEnabledFor(level):
            shown = {name: _shown(value) for name, value in values.items()}
            log.log(level, message.format(**shown),
                    extra={"event": kind, "fields": dict(values, seq=record["seq"])})
        return record

    # -- customers ----------------------------------------------------------

    def _load_static_keys(self) -> None:
        customers = self.config.customers
        self._static_keys = load_customer_keys(customers)
        self._static_labels = customer_labels(customers)
        if customers and not self._static_keys:
            log.warning("no usable access key in customers (%d configured): every token of "
                        "those customers will be refused", len(customers))
        self._rebuild_authorizer()

    def _rebuild_authorizer(self) -> None:
        keys = dict(self._static_keys)
        keys.update(self._dynamic_keys)
        unknown = self.config.unknown_customers
        if isinstance(unknown, dict):  # else "forbidden"
            limits: Optional[tuple] = (_pick(unknown, "max_peers"), _pick(unknown, "max_rooms"))
        elif self.everything_goes:
            limits = (None, None)
        else:
            limits = None
        self.authorizer = Authorizer(keys, self.grid.server_key_by_kid, limits)

    def reload(self, config: Config) -> None:
        """Apply a new config without dropping state: customers, limits, timeouts.

        A setting that only a restart can apply (declared with reload=False:
        listening address, TLS, master key, the listen backlog) keeps its
        running value, with a warning.
        """
        kept = {}
        for name, declared in SETTINGS.items():
            if not declared.reload and getattr(config, name) != getattr(self.config, name):
                log.warning("config reload: %s changed; it takes effect after a restart", name)
                kept[name] = getattr(self.config, name)
        if kept:
            config = config.replace(**kept)
        self.config = config
        self.events.resize(config.max_events)
        self._load_static_keys()
        self.grid.relabel()
        self.event("config_reloaded", source=config.source, counts=self.customer_counts(),
                   customers=len(config.customers), keys=len(self._static_keys))

    def customer_counts(self) -> str:
        """'2 customers with 3 usable access keys' of the config, for the start and reload lines."""
        config = self.config
        text = "%s with %s" % (_counted(len(config.customers), "customer"),
                               _counted(len(self._static_keys), "usable access key"))
        if config.customer_api is not None:
            text += ", and those of customer_api"
        return text

    @property
    def everything_goes(self) -> bool:
        """No customer source is configured: any token is admitted as a demo licensee."""
        return (not self.config.customers and self.config.customer_api is None
                and not self._dynamic_keys)

    def set_customers(self, customers: Any) -> bool:
        """Replace the customers from the update function; False (old keys kept) if unusable."""
        if not isinstance(customers, list):
            problem = "expected a list of customers, not %s" % type(customers).__name__
            lists = [key for key, value in customers.items() if isinstance(value, list)] \
                if isinstance(customers, dict) else []
            if lists:  # an API's whole answer, {"customers": [...]}
                problem += " (return the list itself, e.g. its %s)" % printable(repr(lists[0]), 40)
            self.event("customers_kept", reason=problem)
            return False
        usable: List[dict] = []
        seen: Dict[str, int] = {}
        for index, customer in enumerate(customers):
            problem = _customer_problem(index, customer) or _duplicate_customer(customer, index, seen)
            if not problem:
                usable.append(customer)
            # One bad entry must not cost every other customer its keys; a list of bad
            # ones must not flood the log (or the feed) at every update.
            elif index - len(usable) < MAX_SKIPPED_LOGGED:
                self.event("customer_skipped", reason=problem)
        skipped = len(customers) - len(usable)
        if skipped > MAX_SKIPPED_LOGGED:
            log.warning("customer update: skipping %d more malformed entries",
                        skipped - MAX_SKIPPED_LOGGED)
        customers = usable
        configured = {customer["id"] for customer in self.config.customers}
        for customer_id in sorted(configured & {customer["id"] for customer in customers}):
            log.warning("customer update: customer %s is also in the config's customers, with "
                        "limits of its own; give each customer one place",
                        printable(repr(customer_id), 60))
        keys = load_customer_keys(customers)
        if not keys:
            self.event("customers_kept", reason="the update has no usable key")
            return False
        self._dynamic_keys = keys
        self._dynamic_labels = customer_labels(customers)
        self._rebuild_authorizer()
        self.event("customers_loaded", counts="%s of %s" % (
            _counted(len(keys), "key"), _counted(len(customers), "customer")),
                   keys=len(keys), customers=len(customers))
        return True

    def labels_of(self, customer_id: str) -> Tuple[Optional[str], Optional[str]]:
        """(region, pool) of a customer; (None, None) for one not configured."""
        labels = self._dynamic_labels.get(customer_id)
        return labels if labels is not None else self._static_labels.get(customer_id, (None, None))

    # -- public methods (/) -------------------------------------------------

    def rpc_connect(self, call: Call, params: dict) -> dict:
        """Pick the server for the token's room and sign a room token for it."""
        auth = call.auth
        claims = auth.claims
        problems = {}
        if not isinstance(claims.get("uid"), str):
            problems["uid"] = "must be a string"
        rid = claims.get("rid")
        if not _is_string_or_strings(rid):
            problems["rid"] = "must be a string or an array of strings"
        internal = claims.get("internal")
        pinned = claimed_region = None
        if internal is not None:
            if (not isinstance(internal, dict) or not isinstance(internal.get("server", ""), str)
                    or (internal.get("region") is not None and _label_problem(internal["region"]))):
                problems["internal"] = ("must be an object with an optional string server and an "
                                        "optional region name")
            else:
                pinned = internal.get("server")
                claimed_region = internal.get("region")
        if problems:
            raise invalid_fields(problems, "invalid claims in token")

        licensee = auth.licensee
        if licensee.peer_limit is not None:  # every Connect
            self._check_limit(licensee, licensee.peer_limit,
                              self.grid.limit_usage(licensee.customer_id)[0], "peers")

        digest, (namespace, room_name) = _connect_room(auth, self.room_hashes)
        link = self.cluster
        if link is None or not link.up:  # one gateway: the limits were just checked
            return self._connect_to(auth, digest, namespace, room_name, pinned, claimed_region)
        if licensee.peer_limit is not None or licensee.room_limit is not None:
            # Limits across gateways: first apply every placement published before
            # now (a barrier), then check and place, one Connect of the customer at a
            # time here; the placement is published before the answer.
            return ClusterStep("barrier", (), functools.partial(
                self._connect_checked, auth, digest, namespace, room_name, pinned, claimed_region),
                serial=licensee.customer_id)
        return self._connect_checked(auth, digest, namespace, room_name, pinned, claimed_region)

    def _connect_checked(self, auth: Authorization, digest: str, namespace: str, room_name: str,
                         pinned: Optional[str], claimed_region: Optional[str],
                         seen_all: Optional[bool] = True) -> Any:
        """Connect past its claims: the limits, then the room's server or a claim for it.
        seen_all: the barrier passed (None: it missed its deadline, so the others'
        latest placements may be unseen: the limits count as while Redis is down)."""
        licensee = auth.licensee
        link = self.cluster
        unseen = len(link.members) if link is not None and not seen_all else None
        peers, rooms = self.grid.limit_usage(licensee.customer_id, unseen)
        self._check_limit(licensee, licensee.peer_limit, peers, "peers")
        now = self.clock()
        if link is not None and link.up and self.grid.server_of(digest, now) is None:
            # A new room: claim it in Redis first, so that every gateway sends it to one server.
            self._check_limit(licensee, licensee.room_limit, rooms, "rooms")
            region, pool = self.labels_of(licensee.customer_id)
            placement = self.grid.place(pool=pool, region=claimed_region or region, pinned=pinned,
                                        now=now, rng=self.rng, digest=digest)
            if placement.server is None:
                raise placement.refusal()
            hostname = placement.server.hostname
            record = room_record(digest, Room((namespace, room_name), licensee.customer_id,
                                              hostname, now))
            return ClusterStep("claim", (digest, record), functools.partial(
                self._connect_claimed, auth, digest, namespace, room_name, pinned, claimed_region,
                hostname))
        return self._connect_to(auth, digest, namespace, room_name, pinned, claimed_region)

    def _connect_claimed(self, auth: Authorization, digest: str, namespace: str, room_name: str,
                         pinned: Optional[str], claimed_region: Optional[str], attempted: str,
                         claimed: Optional[dict]) -> dict:
        """Connect's answer once Redis said who has the new room. Claimed by this gateway:
        placed here on the claimed server (and counted as a new room here); by another: the
        link mapped it there. None: Redis was unreachable, the room is placed here alone: on
        the server it tried to claim if Redis was only slow (the claim may still run), else
        by the pick of a gateway without Redis."""
        if claimed is not None and claimed["won"]:
            pinned = claimed["server"]
        elif claimed is None and self.cluster is not None and self.cluster.up:
            pinned = attempted
        return self._connect_to(auth, digest, namespace, room_name, pinned, claimed_region)

    def _connect_to(self, auth: Authorization, digest: str, namespace: str, room_name: str,
                    pinned: Optional[str], claimed_region: Optional[str]) -> dict:
        """Connect's answer: the room's server (mapped, or picked now) and a room token for it."""
        claims, licensee = auth.claims, auth.licensee
        rid = claims["rid"]
        now = self.clock()
        # The room limit limits rooms (PROTOCOL.md 5.3): a Connect to a room that
        # lives on an answering server opens none, so only a new room is refused.
        if licensee.room_limit is not None and self.grid.server_of(digest, now) is None:
            self._check_limit(licensee, licensee.room_limit,
                              self.grid.limit_usage(licensee.customer_id)[1], "rooms")
        region, pool = self.labels_of(licensee.customer_id)  # a token cannot choose a pool
        server = self.grid.assign(digest, (namespace, room_name), licensee.customer_id, pinned, now,
                                  region=claimed_region or region, pool=pool)
        nbf = int(now)
        token = sign_jwt(room_claims_json(claims["uid"], licensee.customer_id, rid, namespace,
                                          server.hostname, nbf + self.config.login_token_lifetime,
                                          nbf), server.key)
        return {"address": server.hostname, "token": token}

    def _check_limit(self, licensee: Licensee, limit: Optional[int], usage: int, what: str) -> None:
        """Refuse a Connect when the customer's usage has reached a limit of its licence."""
        if limit is not None and not limit > usage:
            customer = licensee.customer_id
            # Customer ids of unknown_customers come from tokens: the count is bounded.
            if customer in self.refusals or len(self.refusals) < MAX_COUNTED_CUSTOMERS:
                self.refusals[customer] = self.refusals.get(customer, 0) + 1
            self.event("limit_refused", customer=customer, limit=what, usage=usage, max=limit)
            raise refused("%s limit exceeded" % what[:-1])

    def rpc_room_task(self, call: Call, params: dict, *, task: str) -> dict:
        """RoomClose, RoomUpdate, RoomBanClient, RoomSendMessage: queue the task
        (fields as in ROOM_TASKS) for the server of the room."""
        p = Params(params)
        room_id = p.take("room_id", _want_string)
        fields = {name: p.take(name, check, default) for name, check, default in ROOM_TASKS[task]}
        p.check()
        return self._queue_room_task(call, room_id, dict(task=task, **fields))

    def _queue_room_task(self, call: Call, room_id: str, fields: dict) -> dict:
        """Queue an admin task for the server of a room the token may administer."""
        auth = call.auth
        rid = auth.claims.get("rid")
        prefix = rid[0] if isinstance(rid, list) and rid else rid
        if not isinstance(prefix, str) or not room_id.startswith(prefix):
            raise refused("room_id param does not match rid in authorization token")
        namespace = auth.namespace if auth.namespace is not None else auth.licensee.customer_id
        try:
            room = self.grid.rooms.get(room_hash(namespace, room_id))
        except ValueError as err:
            raise refused(str(err)) from err
        server = self.grid.servers.get(room.server) if room is not None else None
        if server is None:
            raise refused("no server for room found")
        task = {"task": fields.pop("task"), "id": [namespace, room_id]}
        for name, value in fields.items():
            task[name] = _task_duration(value) if name == "ban_time" else value
        if self.cluster is not None and self.cluster.up:
            # Answered {} only once the task is in Redis: any gateway can deliver it.
            # The same request sent again (same token and id, e.g. through another
            # gateway after the first died before answering) is the same task: queued once.
            call_id = None
            if not call.notification and call.auth is not None:
                call_id = "call:" + hashlib.sha256(_compact_json(
                    [call.auth.claims, call.request_id, task]).encode("utf-8")).hexdigest()[:32]
            return ClusterStep("task", (server.hostname, task, call_id), functools.partial(
                self._task_stored, server.hostname, task))
        self.grid.queue_task(server, task)
        return {}

    def _task_stored(self, hostname: str, task: dict, outcome: Optional[str]) -> dict:
        """The answer to an admin call once Redis stored its task (outcome "queued"), found
        the queue full ("full"), or could not be reached (None: held here, sent later)."""
        if outcome == "full":
            raise self.grid.queue_full(hostname)
        if outcome is None:
            server = self.grid.servers.get(hostname)
            if server is None:
                raise refused("no server for room found")
            self.grid.queue_task(server, task)
        return {}

    # -- internal methods (/internal) ---------------------------------------

    def rpc_grid_config(self, call: Call, params: dict, *, sfu: bool) -> dict:
        """A server's own TOML config with the recommended settings and its key merged in."""
        p = Params(params)
        endpoint = p.take("public_endpoint", _want_string, None)
        kind = p.take("server", _want_server_kind, "grid" if sfu else _MISSING)
        p.take("version", _want_string)
        text = p.take("config", _want_string)
        p.check()
        if kind != "grid":
            raise refused("api must be used for grid servers only" if sfu else "only grid is supported")
        hostname = endpoint or remote_hostname(call.remote)
        document = merge_config(parse_toml(text), recommended_server_config(self.config))
        authorization = document.setdefault("authorization", {})
        if not isinstance(authorization, dict):
            raise refused("config: authorization must be a table (the gateway adds the server's "
                          "key to authorization.keys), not %s" % _toml_kind(authorization))
        keys = authorization.setdefault("keys", [])
        if not isinstance(keys, list):
            raise refused("config: authorization.keys must be an array, not %s" % _toml_kind(keys))
        keys.append(self.grid.key_for(hostname).private_jwk())
        try:
            return {"config": toml_dumps(document)}
        except (ValueError, RecursionError) as err:  # nesting or digits beyond Python's limits
            raise refused("config cannot be written back: %s" % err) from err

    def rpc_report(self, call: Call, params: dict, *, sfu: bool) -> dict:
        """Store a server's report; answer the admin tasks queued for it."""
        p = Params(params)
        endpoint = p.take("public_endpoint", _want_string, None)
        kind = p.take("server", _want_server_kind, "grid" if sfu else _MISSING)
        version = p.take("version", _want_string)
        load = p.take("load", _want_number)
        clients = p.take("clients", _want_number)
        rooms = p.take("rooms", _want_list)
        columns = rooms.columns if isinstance(rooms, RoomsText) else room_columns(rooms)
        if columns is None and "rooms" not in p.problems:
            p.problems["rooms"] = _want_rooms(rooms) or "must be an array of rooms"
        draining = p.take("draining", _want_bool, False)
        region = p.take("region", _want_label, None)
        pools = p.take("pools", _want_pools, None)
        p.check()
        if kind != "grid":
            raise refused("api must be used for grid servers only" if sfu else "only grid is supported")
        report = {"load": load, "clients": clients}
        if draining:
            report["draining"] = True
        if region is not None:  # labels for placement; server_labels in the config win
            report["region"] = region
        if pools is not None:
            report["pools"] = pools
        hostname = endpoint or remote_hostname(call.remote)
        before = self.grid.servers.get(hostname)
        gone = set(before.room_hashes) if before is not None and self.cluster is not None else set()
        server = self.grid.report(hostname, version, report, self.clock(), columns)
        server.rooms_text = rooms if isinstance(rooms, RoomsText) else None
        if self.warm_until:  # rooms that Connects wait for may have arrived
            self._changed()
        if self.cluster is not None:
            # Shared with every gateway; the tasks queued in Redis come back with it.
            gone.difference_update(server.room_hashes)
            step = self.cluster.report_step(server, gone, not call.notification)
            if step is not None:
                return step
        if call.notification:
            # A notification gets no answer, so the tasks stay queued for the next report.
            return {"tasks": []}
        return {"tasks": self.grid.take_tasks(server)}

    def prepare_report(self, request: Any, remote: str) -> Iterator[None]:
        """If request (parsed JSON) is a report, the work its rooms need that
        can be done in steps beforehand (Grid.prepare_rooms); else nothing."""
        if not (isinstance(request, dict) and request.get("method") in REPORT_METHODS):
            return iter(())
        params = request.get("params")
        rooms = params.get("rooms") if isinstance(params, dict) else None
        if not isinstance(rooms, (list, RoomsText)):
            return iter(())
        return self.grid.prepare_rooms(_reporter(params, remote), rooms)  # type: ignore[arg-type]

    def parse_in_steps(self, body: bytes, remote: str) -> Generator[None, None, Any]:
        """load_json_in_steps for a body sent to /internal: a report's rooms
        are read from the text, by its server's previous report (read_rooms_in_steps)."""
        def previous_of(params: dict) -> Optional[RoomsText]:
            server = self.grid.servers.get(_reporter(params, remote))
            return server.rooms_text if server is not None else None
        return load_json_in_steps(body, lambda text, start: read_rooms_in_steps(text, start, previous_of))

    def rpc_drain(self, call: Call, params: dict) -> dict:
        """Drain a server (no new rooms; its rooms stay and are served) or undrain it."""
        p = Params(params)
        hostname = p.take("hostname", _want_string)
        draining = p.take("draining", _want_bool, True)
        p.check()
        server = self.grid.servers.get(hostname)
        if server is None:
            raise refused("no server %s: Info lists the servers" % printable(hostname))
        if self.cluster is not None:
            self.cluster.drained(hostname, draining)
        if server.draining != draining:
            server.draining = draining
            self.grid.note_server(server)
            self.event("server_draining" if draining else "server_undrained", hostname=hostname,
                       by="operator")
        return {"hostname": hostname, "draining": server.draining_by_anyone}

    def rpc_explain(self, call: Call, params: dict) -> dict:
        """Where a new room of a customer would go now, and why; changes nothing."""
        p = Params(params)
        customer = p.take("customer", _want_string)
        # Absent: the customer's region, as for a token without internal.region; null: none.
        unset = object()
        region = p.take("region", _want_label, unset)
        pinned = p.take("server", _want_string, None)
        # The room (and its namespace, as in a token: the customer's id by default):
        # a cluster gateway without Redis picks a new room's server by the room's hash.
        room_id = p.take("room", _want_string, None)
        namespace = p.take("namespace", _want_string, customer)
        p.check()
        try:
            digest = room_hash(namespace, room_id) if room_id is not None else ""
        except ValueError as err:
            raise invalid_fields({"room": str(err)}) from err
        customer_region, pool = self.labels_of(customer)
        placement = self.grid.place(pool=pool, region=customer_region if region is unset else region,
                                    pinned=pinned, now=self.clock(), digest=digest,
                                    rng=copy.deepcopy(self.rng))  # the real draws stay as they are
        answer = placement.explain()
        if (self.grid.placing_alone and room_id is None and placement.used is not None
                and len(placement.tiers[placement.used][2]) > 1):
            answer["pick"] = None  # each room has its own: no one server to name
            answer["reason"] += " (name a room to see its pick)"
        return dict(customer=customer, configured=customer in self._static_labels
                    or customer in self._dynamic_labels, **answer)

    def rpc_info(self, call: Call, params: dict) -> dict:
        """Servers, rooms and call statistics, for operators.

        params.rooms: true (default) lists every room; false none; a page
        {"after": hash, "limit": n} lists up to n rooms in hash order after
        that hash, and next is the hash to ask after for the next page
        (null on the last page). Unless every room is listed, the servers'
        reports are shown without their room lists.
        """
        p = Params(params)
        pages = p.take("rooms", _want_rooms_page, True)
        p.check()
        servers = [{
            "hostname": s.hostname, "address": s.hostname, "version": s.version,
            "disabled": s.disabled, "draining": s.draining_by_anyone,
            "keyId": s.key.kid, "report": s.report_json() if pages is True else s.report,
            "firstSeen": iso_time(s.first_seen), "lastSeen": iso_time(s.last_seen),
            "tasks": len(s.tasks), "region": s.region, "pools": list(s.pools),
        } for s in self.grid.servers.values()]
        answer: Dict[str, Any] = {"servers": servers}
        rooms = self.grid.rooms
        if pages is True:
            listed: Any = rooms.items()
        elif pages is False:
            listed = ()
        else:
            limit = pages.get("limit", INFO_PAGE_ROOMS)
            digests = self.grid.rooms_after(pages.get("after", ""), limit + 1)
            listed = [(digest, rooms[digest]) for digest in digests[:limit]]
        if pages is not False:
            stamps: Dict[float, str] = {}  # the rooms of one report share their time
            answer["rooms"] = [{
                "hash": digest, "id": list(room.id), "customer": room.customer, "server": room.server,
                "updated": stamps.get(room.updated) or stamps.setdefault(room.updated, iso_time(room.updated)),
            } for digest, room in listed]
        if isinstance(pages, dict):
            answer["next"] = digests[limit - 1] if len(digests) > limit else None
        calls = [{"name": name, "success": counts[0], "failure": counts[1], "rejected": counts[2]}
                 for name, counts in self.stats.items()]
        answer["stats"] = {"apiCalls": calls}
        if self.cluster is not None:
            answer["cluster"] = {"member": self.cluster.member, "members": list(self.cluster.members),
                                 "redis": "up" if self.cluster.up else "down"}
        return answer

    # -- saved state ----------------------------------------------------------

    def open_state(self, discard_unreadable: bool = False) -> None:
        """Restore the grid from state_file (if set and young enough) and journal
        its changes there from now on; StateError if the file is unusable
        (unless discard_unreadable). Serving calls it if nobody did before."""
        if self.config.state_file is None:
            return
        if self.saved is None:
            self.saved = SavedState(self, self.config.state_file)
            self.state_restored = self.saved.restore(discard_unreadable)
        elif self.grid.journal is None:  # served again after a stop
            self.saved.resume()

    # -- warm-up: no blind placements after a start ----------------------------

    def begin_warmup(self) -> None:
        """Start the warm-up (serving calls it): for update_interval plus a margin
        (setting warmup), a Connect for a room no server has reported waits,
        so that every server can report its rooms before new ones are placed;
        otherwise a room that lives on a server yet to report would be placed
        on another one. Skipped when the gateway started with saved state that
        knew every server's rooms (Grid.complete): not with the state of a
        gateway that died during its own warm-up."""
        seconds = self.config.warmup
        if seconds is None:
            seconds = self.config.update_interval + WARMUP_MARGIN
        if seconds <= 0:  # no warm-up: the rooms are as known as they will be
            self.grid.set_complete()
        if self.grid.complete or self.warmed:
            return
        self.warmed = True
        self.warm_until = self.clock() + seconds
        self.event("warmup_started", seconds=seconds)

    def warming_up(self, now: float) -> bool:
        """True during the warm-up; ends it (waking the waiting requests) when its time is up."""
        if self.warm_until and now >= self.warm_until:
            self.end_warmup(now)
        return self.warm_until > 0

    def end_warmup(self, now: Optional[float] = None) -> None:
        """End the warm-up: every server's rooms are known (Grid.complete), the
        waiting requests are woken."""
        self.warm_until = 0.0
        self.grid.set_complete()
        self.event("warmup_over", now)
        self._changed()

    def _changed(self) -> None:
        for hook in self.on_change:
            hook()

    def _postpone(self, auth: Authorization, body: bytes) -> Optional[Postponed]:
        """A Postponed if the request calls Connect for a room not yet known, during the warm-up."""
        now = self.clock()
        if not self.warming_up(now):
            return None
        if not _is_string_or_strings(auth.claims.get("rid")):
            return None  # Connect itself refuses it (its room cannot be looked up)
        try:
            digest, _ = _connect_room(auth, self.room_hashes)
        except RpcError:  # Connect itself refuses it
            return None
        if digest in self.grid.rooms or not _calls_method(body, "Connect"):
            return None
        return Postponed(self.warm_until - now, "the gateway is warming up: no server has reported "
                         "this room yet; try again in %d s" % math.ceil(self.warm_until - now))

    def rpc_events(self, call: Call, params: dict) -> dict:
        """The events after seq `after` (at most `limit`), for tools that tail the feed."""
        p = Params(params)
        after = p.take("after", _want_count, 0)
        limit = p.take("limit", _want_positive, EVENTS_PAGE)
        p.check()
        return self.events.after(after, limit)

    # -- maintenance --------------------------------------------------------

    def tick(self) -> None:
        """The maintenance step (every update_interval): timeouts, expiry, usage."""
        now = self.clock()
        self.warming_up(now)
        self.grid.tick(now)

    @contextlib.asynccontextmanager
    async def serve(self, host: str = "127.0.0.1", port: int = 0,
                    ssl: Optional[ssl_module.SSLContext] = None) -> Any:
        """Serve HTTP(S) while inside ``async with gateway.serve() as server``.

        port 0 binds a free port; server.url has the real one (no trailing
        slash). Timers for the maintenance tick and the customer update run
        meanwhile; leaving the block stops everything cleanly. (A thin
        wrapper over GatewayServer, below.)
        """
        server = GatewayServer(self, host, port, ssl)
        await server.start()
        try:
            yield server
        finally:
            await server.stop()

    # -- JSON-RPC dispatch --------------------------------------------------

    def dispatch(self, methods: Tuple[str, ...], body: bytes, auth: Optional[Authorization],
                 remote: str, parsed: Any = _UNPARSED) -> Tuple[int, Optional[bytes]]:
        """(HTTP status, response body or None) for a JSON-RPC request or batch
        (parsed: the body's JSON, if the caller parsed it already)."""
        try:
            request = load_json(body) if parsed is _UNPARSED else parsed
        except ValueError:
            return 400, _error_body(PARSE_ERROR, "Parse error")
        if isinstance(request, list):
            if not request:
                return 200, _error_body(INVALID_REQUEST, "Invalid Request")
            if len(request) > self.config.max_batch:
                return 200, _error_body(INVALID_REQUEST, "Invalid Request: a batch may hold at most "
                                        "%d requests" % self.config.max_batch)
            answers = [a for a in (self._call(methods, r, auth, remote) for r in request) if a]
            if self.cluster is not None and _has_steps(answers):
                return 200, PendingAnswers(answers, batch=True)  # type: ignore[return-value]
            return (200, dump_json(answers)) if answers else (204, None)
        answer = self._call(methods, request, auth, remote)
        if answer is not None and isinstance(answer.get("result"), ClusterStep):
            return 200, PendingAnswers([answer], batch=False)  # type: ignore[return-value]
        return (200, answer_json(answer)) if answer else (204, None)

    def finish_steps(self, pending: PendingAnswers, results: List[Any]) -> Response:
        """The response once the cluster link has done the steps and finished them
        (results in order: each a result, an RpcError, or another exception: a bug)."""
        results_left = iter(results)
        sent = []
        for answer in pending.answers:
            if isinstance(answer.get("result"), ClusterStep):
                method = answer.pop("method")
                result = next(results_left)
                if not isinstance(result, BaseException):
                    answer["result"] = result
                    self._count(method, 0)
                else:
                    self._count(method, 2 if isinstance(result, RpcError) else 1)
                    if not isinstance(result, RpcError):
                        log.error("internal error in %s:\n%s", method, "".join(
                            traceback.format_exception(type(result), result, result.__traceback__)))
                        result = RpcError(INTERNAL_ERROR, "Internal error")
                    answer.pop("result")
                    answer["error"] = result.to_json()
            if not answer.pop("notification", False):
                sent.append(answer)
        if not sent:
            return Response(204)
        return Response(200, dump_json(sent if pending.batch else sent[0]))

    def _call(self, methods: Tuple[str, ...], request: Any, auth: Optional[Authorization],
              remote: str) -> Optional[dict]:
        """The response object for one request, or None for a notification."""
        request_id = request.get("id") if isinstance(request, dict) else False
        if request_id.__class__ is not int:  # the usual id: an int, valid as it is
            if not _is_request_id(request_id):
                return {"jsonrpc": "2.0", "error": {"code": INVALID_REQUEST,
                                                   "message": "Invalid Request"}, "id": None}
            if isinstance(request_id, float):
                request_id = int(request_id)
        notification = "id" not in request
        method = request.get("method")
        try:
            if (request.get("jsonrpc") != "2.0" or not isinstance(method, str)
                    or method.startswith("rpc.")):
                if notification:  # the id cannot be trusted; JSON-RPC answers null
                    request_id = None
                    notification = False
                raise RpcError(INVALID_REQUEST, "Invalid Request")
            if method not in methods:  # methods: those the token's sub allows
                raise RpcError(METHOD_NOT_FOUND, "Method not found")
            params = request.get("params", {})
            if isinstance(params, list):
                raise RpcError(INVALID_PARAMS, "Invalid params: params must be an object, not an array")
            if not isinstance(params, dict):
                raise RpcError(INVALID_PARAMS, "Invalid params", "params must be an object")
            result = self._run(method, Call(auth, remote, notification, request_id), params)
        except RpcError as err:
            if notification:
                return None
            return {"jsonrpc": "2.0", "error": err.to_json(), "id": request_id}
        if isinstance(result, ClusterStep):  # finished (and counted) by finish_steps
            return {"jsonrpc": "2.0", "result": result, "id": request_id, "method": method,
                    "notification": notification}
        if notification:
            return None
        return {"jsonrpc": "2.0", "result": result, "id": request_id}

    def _run(self, method: str, call: Call, params: dict) -> Any:
        """Run a handler, counting success, rejection (RpcError) and failure (a bug)."""
        started = time.perf_counter()
        try:
            result = self._handlers[method](call, params)
        except RpcError:
            self._count(method, 2)
            raise
        except Exception:
            self._count(method, 1)
            log.error("internal error in %s:\n%s", method, traceback.format_exc())
            raise RpcError(INTERNAL_ERROR, "Internal error") from None
        if isinstance(result, ClusterStep):
            return result  # counted when finished
        self._count(method, 0)
        if method == "Connect":
            self.metrics.observe_connect(time.perf_counter() - started)
        return result

    def _count(self, method: str, outcome: int) -> None:
        # Counted after the call, so Info does not see itself in its own answer.
        counts = self.stats.get(method)
        if counts is None:
            counts = self.stats[method] = [0, 0, 0]
        counts[outcome] += 1

    # -- HTTP requests ------------------------------------------------------

    def handle_http(self, method: str, target: str, headers: Dict[str, str], body: bytes,
                    remote: str = "127.0.0.1", *, stopping: bool = False,
                    parsed: Any = _UNPARSED) -> Response:
        """The response to one HTTP request (headers keyed by lower-case name).

        stopping: the server that received it is stopping (/ready says so);
        parsed: the body's JSON, if already parsed (load_json_in_steps).
        """
        path = target.split("?", 1)[0] if "?" in target else target
        if path == "/":
            methods = self.PUBLIC_METHODS
        elif path == "/internal":
            methods = self.INTERNAL_METHODS
        elif path in OPERATIONS_PATHS:
            return self._operations(method, path, headers, stopping)
        elif path == "*":  # OPTIONS * (the framing lets no other method have it): the server
            return Response(200, headers=[("Allow", "GET, HEAD, POST, OPTIONS")])
        else:
            return Response(404, _error_body(PARSE_ERROR, "not found"))
        if method == "OPTIONS":
            if headers.get("access-control-request-private-network", "").lower() == "true":
                # Chrome's Private Network Access: a public page calling a
                # gateway on a private address asks for this in the preflight.
                return Response(200, headers=[("Access-Control-Allow-Private-Network", "true")])
            return Response(200)
        if method != "POST":
            return _method_not_allowed(method, "POST", "POST, OPTIONS")

        header = headers.get("authorization", "")
        auth: Optional[Authorization] = None
        try:
            if path == "/":
                if not header:
                    return _missing_credentials(basic=False)
                # Whole seconds, as the original: a token exactly 300 s late still passes.
                auth = self.authorizer.authorize(header, int(self.clock()),
                                                 required_claims=("rid", "uid"))
            elif self.config.internal_users:
                if not header:
                    return _missing_credentials(basic=True)
                auth = self._basic_auth(header)
        except TokenError as err:
            log.debug("%s refused: %s", path, err)
            return Response(401, _error_body(INVALID_REQUEST, str(err)))

        if auth is not None and "sub" in auth.claims:
            methods = _subject_filter(auth.claims["sub"], methods)
            if not methods:
                return Response(403, _error_body(PARSE_ERROR, "access denied by token restrictions"))
        if self.warm_until and path == "/" and "Connect" in methods:
            postponed = self._postpone(auth, body)  # type: ignore[arg-type]
            if postponed is not None:
                return postponed
        if parsed is _UNPARSED and path == "/internal":  # a report is read by its previous one
            parsed = _finish_steps(self.parse_in_steps(body, remote))
        status, response_body = self.dispatch(methods, body, auth, remote, parsed)
        if isinstance(response_body, PendingAnswers):
            # Cluster mode: an awaitable answer (the server awaits it, serving others meanwhile).
            return self.cluster.complete(response_body)  # type: ignore[union-attr,return-value]
        return Response(status, response_body or b"")

    def may_call_internal(self, headers: Dict[str, str]) -> bool:
        """Whether a request's credentials admit it to /internal (before its
        body is parsed: a big body is parsed in steps only for those)."""
        if not self.config.internal_users:
            return True
        try:
            self._basic_auth(headers.get("authorization", ""))
        except TokenError:
            return False
        return True

    def _basic_auth(self, header: str) -> Authorization:
        """Basic credentials checked against internal_users; TokenError if refused."""
        scheme, credentials = split_authorization(header)
        if scheme.lower() != "basic":
            raise TokenError("invalid authorization")
        return check_basic(credentials, self.config.internal_users)

    def _operations(self, method: str, path: str, headers: Dict[str, str],
                    stopping: bool) -> Response:
        """GET /health, /ready and /metrics: for load balancers and Prometheus;
        /status and /status.json: for people."""
        if method not in ("GET", "HEAD"):
            return _method_not_allowed(method, "GET", "GET, HEAD")
        if path == "/health":
            return Response(200, dump_json({"status": "ok"}))
        if path == "/ready":
            now = self.clock()
            enabled = len(self.grid.candidates(now))
            if stopping:
                return Response(503, dump_json({"status": "stopping"}))
            if self.cluster is not None and not self.cluster.loaded:
                return Response(503, dump_json({"status": "loading the cluster state from Redis"}))
            if self.warming_up(now):
                return Response(503, dump_json({
                    "status": "warming up", "reason": "servers have %.1f s left to report their "
                    "rooms before new rooms are placed" % (self.warm_until - now)}))
            if not enabled:
                answering = sum(1 for s in self.grid.servers.values() if self.grid.answering(s, now))
                why = ", ".join("%d %s" % (count, state) for count, state in (
                    (answering, "draining"), (len(self.grid.servers) - answering, "silent"))
                    if count) or "none has reported"
                return Response(503, dump_json({"status": "no server takes rooms: " + why}))
            return Response(200, dump_json({"status": "ready", "servers": enabled}))
        if self.config.internal_users:  # /metrics and /status are protected like /internal
            if not headers.get("authorization"):
                return _missing_credentials(basic=True)
            try:
                self._basic_auth(headers["authorization"])
            except TokenError as err:
                return Response(401, _error_body(INVALID_REQUEST, str(err)),
                                [("WWW-Authenticate", 'Basic realm="odin-gateway"')])
        if path == "/status":
            # "replace": a lone surrogate in a reported name must not fail the page.
            return Response(200, render_status_page(status_data(self)).encode("utf-8", "replace"),
                            status_headers(), content_type="text/html; charset=utf-8")
        if path == "/status.json":
            return Response(200, dump_json(status_data(self)))
        return Response(200, render_metrics(self).encode("utf-8"),
                        content_type="text/plain; version=0.0.4; charset=utf-8")


def _finish_steps(steps: Generator[None, None, Any]) -> Any:
    """What a parse in steps returns, all steps taken at once; _UNPARSED if
    it raises (dispatch then answers the parse error)."""
    try:
        while True:
            next(steps)
    except StopIteration as done:
        return done.value
    except (ValueError, RecursionError):
        return _UNPARSED


def _has_steps(answers: List[dict]) -> bool:
    return any(isinstance(answer.get("result"), ClusterStep) for answer in answers)


#: GET paths for operators (answered by Gateway._operations).
OPERATIONS_PATHS = ("/health", "/ready", "/metrics", "/status", "/status.json")


#: Most room hashes a gateway keeps computed (Gateway.room_hashes).
ROOM_HASH_CACHE = 4096


def _connect_room(auth: Authorization, hashes: Optional[Dict[Tuple[str, str], str]] = None
                  ) -> Tuple[str, Tuple[str, str]]:
    """The hash and id of the room a Connect with these claims joins (section 7.3
    step 3); hashes, if given, keeps the hashes computed (bounded)."""
    rid = auth.claims.get("rid")
    namespace = auth.namespace if auth.namespace is not None else auth.licensee.customer_id
    if isinstance(rid, list):
        if not rid:
            raise RpcError(400, "rid in authorization token must not be empty")
        if len({room_base_name(name) for name in rid}) > 1:
            raise RpcError(400, "all values in rid must have the same base")
        room_name = rid[-1]
    else:
        room_name = rid
    room = (namespace, room_name)
    digest = hashes.get(room) if hashes is not None else None
    if digest is None:
        try:
            digest = room_hash(namespace, room_name)
        except ValueError as err:
            raise refused(str(err)) from err
        if hashes is not None:
            if len(hashes) >= ROOM_HASH_CACHE:
                hashes.clear()
            hashes[room] = digest
    return digest, room


def _calls_method(body: bytes, method: str) -> bool:
    """Whether a JSON-RPC request or batch calls method (False if it is not JSON)."""
    try:
        request = load_json(body)
    except ValueError:
        return False
    calls = request if isinstance(request, list) else [request]
    return any(isinstance(call, dict) and call.get("method") == method for call in calls)


def _missing_credentials(basic: bool) -> Response:
    """The 401 for a request without an Authorization header, on every protected path.

    Its code is -32700 (Parse error) although nothing failed to parse: the
    original answers its HTTP-level refusals (this 401, 403, 404) with
    -32700, and clients may match on it, so it stays. Credentials that are
    present but refused get -32600 and the reason.
    """
    return Response(401, _error_body(PARSE_ERROR, "invalid or missing authorization"),
                    [("WWW-Authenticate", 'Basic realm="odin-gateway"')] if basic else None)


#: The methods HTTP defines (RFC 9110 section 9, RFC 5789); methods are case-sensitive.
HTTP_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                          "PATCH"))


def _method_not_allowed(method: str, use: str, allow: str) -> Response:
    """405 with Allow for a method HTTP defines, 501 for one it does not (RFC 9110
    sections 9.1 and 15.6.2: "GET" in lower case is such a method)."""
    if method not in HTTP_METHODS:
        return Response(501, _error_body(INVALID_REQUEST, "method not implemented: use " + use),
                        [("Allow", allow)])
    return Response(405, _error_body(INVALID_REQUEST, "method not allowed: use " + use),
                    [("Allow", allow)])


def _counted(count: int, noun: str) -> str:
    return "%d %s%s" % (count, noun, "" if count == 1 else "s")


def _subject_filter(subjects: Any, methods: Tuple[str, ...]) -> Tuple[str, ...]:
    """The methods a token with sub may call: those it names, case-insensitively."""
    if isinstance(subjects, str):  # the common case, one method: no sets
        method = _METHOD_NAMES.get(subjects.lower())
        return (method,) if method in methods else ()
    named = {s.lower() for s in subjects}
    return tuple(method for method in methods if method.lower() in named)


#: Method names by their lower-case spelling (read-only).
_METHOD_NAMES = types.MappingProxyType(
    {method.lower(): method for method in Gateway.PUBLIC_METHODS + Gateway.INTERNAL_METHODS})


def _toml_kind(value: Any) -> str:
    if _is_table_array(value):
        return "an array of tables"
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a float"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------
# Metrics: Prometheus text exposition format 0.0.4
# ---------------------------------------------------------------------------

#: Upper bounds (seconds) of the Connect latency histogram's buckets.
CONNECT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0)
#: The path label of HTTP responses: a fixed set, never raw request paths.
METRIC_PATHS = ("/", "/internal", "/metrics", "/health", "/ready", "/status", "/status.json")


#: count_response's key for a target that is exactly one of METRIC_PATHS (read-only).
_RESPONSE_KEYS = types.MappingProxyType({
    (path, status): (path, "%dxx" % (status // 100))
    for path in METRIC_PATHS for status in (200, 204, 400, 401, 403, 404, 405, 413, 500, 503)})


class Metrics:
    """Counters the HTTP layer and the RPC methods feed (RPC calls live in Gateway.stats)."""

    def __init__(self) -> None:
        self.responses: Dict[Tuple[str, str], int] = {}
        self.connect_buckets = [0] * len(CONNECT_BUCKETS)
        self.connect_sum = 0.0
        self.connect_count = 0
        self.started = time.time()
        self.placed = {tier: 0 for tier in PLACEMENT_TIERS}  # new rooms by placement tier

    def count_response(self, target: Optional[str], status: int) -> None:
        key = _RESPONSE_KEYS.get((target, status))  # the usual ones, looked up
        if key is None:
            path = (target or "").split("?", 1)[0]
            key = (path if path in METRIC_PATHS else "other" if target else "invalid",
                   "%dxx" % (status // 100))
        self.responses[key] = self.responses.get(key, 0) + 1

    def observe_connect(self, seconds: float) -> None:
        index = bisect.bisect_left(CONNECT_BUCKETS, seconds)
        if index < len(CONNECT_BUCKETS):
            self.connect_buckets[index] += 1
        self.connect_sum += seconds
        self.connect_count += 1


def _label_value(value: Any) -> str:
    value = _SURROGATE_RE.sub("\ufffd", str(value))  # a lone surrogate cannot be UTF-8
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample(name: str, labels: Dict[str, Any], value: float) -> str:
    if labels:
        name += "{%s}" % ",".join('%s="%s"' % (k, _label_value(v)) for k, v in labels.items())
    text = repr(float(value)) if isinstance(value, float) else str(value)
    return "%s %s" % (name, text)


def process_start_time() -> Optional[float]:
    """When this process started (Linux /proc), or None where that cannot be read."""
    try:
        with open("/proc/self/stat") as stat:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as system:
            boot = next(int(line.split()[1]) for line in system if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _servers_by_state(grid: Grid, now: float, groups_of: Callable[[Server], Any],
                      always: Tuple[str, ...] = ("",)) -> List[Tuple[str, Dict[str, int]]]:
    """(group, {state: servers}) for each group (region, pool) a server is in,
    sorted; the groups always (zeros) when there is none."""
    counts: Dict[str, Dict[str, int]] = {}
    for server in grid.servers.values():
        state = grid.state(server, now)
        for group in groups_of(server):
            by_state = counts.setdefault(group, {})
            by_state[state] = by_state.get(state, 0) + 1
    if not counts:
        counts = {group: {} for group in always}
    return [(group, {state: counts[group].get(state, 0) for state in ("enabled", "draining", "disabled")})
            for group in sorted(counts)]


def render_metrics(gateway: Gateway) -> str:
    """The /metrics page: one HELP and one TYPE line per family, then its samples."""
    lines: List[str] = []

    def family(name: str, kind: str, help_text: str, samples: List[Tuple[dict, float]],
               suffix: str = "") -> None:
        lines.append("# HELP %s %s" % (name, help_text))
        lines.append("# TYPE %s %s" % (name, kind))
        lines.extend(_sample(name + suffix, labels, value) for labels, value in samples)

    grid = gateway.grid
    now = gateway.clock()
    # Out from the moment it is silent, before the tick disables it (as /status says).
    enabled = [s for s in grid.servers.values() if grid.state(s, now) != "disabled"]
    family("odin_gateway_build_info", "gauge", "Version of this gateway (always 1).",
           [({"version": __version__}, 1)])
    start = process_start_time()
    family("process_start_time_seconds", "gauge", "Start time of the process since the epoch.",
           [({}, start if start is not None else gateway.metrics.started)])
    family("odin_gateway_rpc_calls_total", "counter",
           "JSON-RPC calls by method and outcome (rejected: refused with an error; "
           "failure: an internal error).",
           [({"method": m, "outcome": outcome}, counts[index])
            for m, counts in gateway.stats.items()
            for index, outcome in enumerate(("success", "failure", "rejected"))])
    family("odin_gateway_http_responses_total", "counter", "HTTP responses by path and status class.",
           [({"path": path, "status": status}, count)
            for (path, status), count in sorted(gateway.metrics.responses.items())])
    metrics = gateway.metrics
    cumulative, buckets = 0, []
    for bound, count in zip(CONNECT_BUCKETS, metrics.connect_buckets):
        cumulative += count
        buckets.append(({"le": repr(bound)}, cumulative))
    buckets.append(({"le": "+Inf"}, metrics.connect_count))
    lines.append("# HELP odin_gateway_connect_duration_seconds Time to answer a successful Connect.")
    lines.append("# TYPE odin_gateway_connect_duration_seconds histogram")
    lines.extend(_sample("odin_gateway_connect_duration_seconds_bucket", labels, value)
                 for labels, value in buckets)
    lines.append(_sample("odin_gateway_connect_duration_seconds_sum", {}, float(metrics.connect_sum)))
    lines.append(_sample("odin_gateway_connect_duration_seconds_count", {}, metrics.connect_count))
    family("odin_gateway_servers", "gauge",
           "Media servers by state and region: enabled (taking rooms), draining (serving its "
           "rooms, no new ones), disabled (silent); region \"\" for servers without one.",
           [({"state": state, "region": region}, count)
            for region, counts in _servers_by_state(grid, now, lambda s: [s.region or ""])
            for state, count in counts.items()])
    family("odin_gateway_pool_servers", "gauge",
           "Media servers of each pool by state (a server may be in several pools).",
           [({"pool": pool, "state": state}, count)
            for pool, counts in _servers_by_state(grid, now, lambda s: s.pools, ())
            for state, count in counts.items()])
    family("odin_gateway_rooms_placed_total", "counter",
           "New rooms placed, by the tier of the placement rule: in_region (the room's region), "
           "fallback (a region of region_fallback), any (any region, or the room has none).",
           [({"tier": tier}, count) for tier, count in gateway.metrics.placed.items()])
    family("odin_gateway_rooms", "gauge", "Rooms the gateway maps to a server.", [({}, len(grid.rooms))])
    family("odin_gateway_reported_peers", "gauge", "Peers in the enabled servers' last reports.",
           [({}, sum(peers for peers, _rooms in grid.reported.values()))])
    family("odin_gateway_reported_clients", "gauge", "Clients in the enabled servers' last reports.",
           [({}, sum(s.report["clients"] for s in enabled))])
    usage = sorted(grid.usage.items())
    family("odin_gateway_customer_rooms", "gauge",
           "Rooms per customer: reported, plus sent by Connect since (what limits count).",
           [({"customer": c}, rooms) for c, (_peers, rooms) in usage])
    family("odin_gateway_customer_peers", "gauge",
           "Peers per customer: reported, plus sent by Connect since (what limits count).",
           [({"customer": c}, peers) for c, (peers, _rooms) in usage])
    oldest = min((s.last_seen for s in enabled), default=None)
    family("odin_gateway_oldest_report_age_seconds", "gauge",
           "Seconds since the stalest enabled server last reported (0 without servers).",
           [({}, float(max(0.0, now - oldest)) if oldest is not None else 0.0)])
    family("odin_gateway_tasks_queued", "gauge", "Admin tasks waiting for their server's next report.",
           [({}, sum(len(s.tasks) for s in grid.servers.values()))])
    family("odin_gateway_customer_keys", "gauge", "Customer access keys loaded.",
           [({}, len(gateway.authorizer.customer_keys))])
    if gateway.cluster is not None:
        family("odin_gateway_cluster_up", "gauge",
               "1 while Redis answers and the shared state is loaded, else 0 (serving alone).",
               [({}, 1 if gateway.cluster.up else 0)])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Status page: /status for people, /status.json for its live refresh
# ---------------------------------------------------------------------------

#: Most servers, customers and events /status shows, so that the page stays a
#: few tens of KB (Info and Events have them all).
STATUS_SERVERS = 60
STATUS_CUSTOMERS = 40
STATUS_EVENTS = 30
#: Longest text shown in one place (a report may name a server with 100 KB);
#: an event's, which says why, may be longer.
STATUS_TEXT = 64
STATUS_EVENT_TEXT = 160

# The tables' columns: (heading, key in the row's entry, how it is shown). The
# page's script draws the same columns from /status.json, so a new column is
# one line here and one key in status_data(). Kinds: text, number; state
# (taking rooms / draining / disabled); bar (a load, 0..1); age (seconds since
# the last report: amber past update_interval, red past disable_timeout);
# usage ([used, limit or None]).
SERVER_COLUMNS = (
    ("server", "hostname", "text"),
    ("region", "region", "text"),
    ("pools", "pools", "text"),
    ("state", "state", "state"),
    ("load", "load", "bar"),
    ("estimated load", "estimated_load", "bar"),
    ("clients", "clients", "number"),
    ("rooms", "rooms", "number"),
    ("peers", "peers", "number"),
    ("last report", "age", "age"),
    ("tasks", "tasks", "number"),
    ("version", "version", "text"),
)
CUSTOMER_COLUMNS = (
    ("customer", "id", "text"),
    ("rooms", "rooms", "usage"),
    ("peers", "peers", "usage"),
    ("refused since start", "refused", "number"),
)


def exposure_warnings(gateway: Gateway) -> List[str]:
    """What an operator must know is exposed, and how to fix it (logged at start,
    shown on /status)."""
    config = gateway.config
    warnings = []
    if _toml_reader is None:
        warnings.append("%s (until then every server's sfu.GridConfig fails)" % NO_TOML_READER)
    if config.master_key == DEFAULT_MASTER_KEY:
        warnings.append("master_key is the well-known default: anyone can derive your servers' "
                        "signing keys and forge room tokens; set a secret one "
                        "(python odin_gateway.py keygen --master)")
    elif len(config.master_key_bytes) < MIN_MASTER_KEY_BYTES:
        warnings.append("master_key is only %d bytes long: use at least %d random bytes "
                        "(python odin_gateway.py keygen --master makes one)"
                        % (len(config.master_key_bytes), MIN_MASTER_KEY_BYTES))
    for key in gateway.authorizer.customer_keys.values():
        if key.verify_key.kid == PUBLISHED_DEMO_KID:
            warnings.append("customer %r has the access key published in README.md (key id %s): "
                            "anyone can sign tokens for it; remove it before the gateway faces a "
                            "network" % (key.licensee.customer_id, PUBLISHED_DEMO_KID))
    if not config.ssl and (config.certificate != SETTINGS["certificate"].default
                           or config.private_key != SETTINGS["private_key"].default):
        warnings.append("certificate and private_key are set but ssl is False: serving plain HTTP "
                        "(set ssl = True, or --ssl, for HTTPS)")
    if not config.internal_users:
        warnings.append("/internal is open (internal_users is empty): anyone who reaches this port "
                        "can register servers and read their signing keys, /metrics and /status; "
                        "set internal_users or firewall the port")
    if gateway.everything_goes:
        warnings.append("no customers configured: every token is accepted as a demo customer "
                        "without checking its signature; add customers to the config")
    elif config.unknown_customers != "forbidden":
        warnings.append("unknown_customers is not \"forbidden\": tokens with unknown key ids are "
                        "accepted as demo customers without checking their signature")
    return warnings


def _duration(seconds: float) -> str:
    """2 d 3 h, 3 h 5 min, 5 min 2 s or 42 s."""
    seconds = int(max(seconds, 0))
    for unit, size, smaller, small_size in (("d", 86400, "h", 3600), ("h", 3600, "min", 60),
                                            ("min", 60, "s", 1)):
        if seconds >= size:
            return "%d %s %d %s" % (seconds // size, unit, seconds % size // small_size, smaller)
    return "%d s" % seconds


def _clip(value: Any, limit: int = STATUS_TEXT) -> Any:
    """Text (also inside a list) cut to limit characters for the page."""
    if isinstance(value, str) and len(value) > limit:
        return value[:limit - 1] + "\u2026"
    if isinstance(value, (list, tuple)):
        return [_clip(part, limit) for part in value]
    return value


def _status_state(grid: Grid, server: Server, now: float) -> str:
    state = grid.state(server, now)
    return "taking rooms" if state == "enabled" else state


def status_data(gateway: Gateway) -> dict:
    """What /status shows, as /status.json returns it."""
    config, grid, now = gateway.config, gateway.grid, gateway.clock()
    servers = [{
        "hostname": _clip(s.hostname), "region": _clip(s.region or ""),
        "pools": _clip(", ".join(s.pools)), "state": _status_state(grid, s, now), "load": s.load,
        "estimated_load": round(s.estimated_load(), 4), "clients": s.report["clients"],
        "rooms": len(s.room_hashes), "peers": sum(peers for peers, _rooms in s.usage.values()),
        "age": round(now - s.last_seen, 1), "tasks": len(s.tasks), "version": _clip(s.version),
    } for s in sorted(grid.servers.values(), key=lambda s: s.hostname)]
    licensees = {key.licensee.customer_id: key.licensee
                 for key in gateway.authorizer.customer_keys.values()}
    # Customers without a key of their own: unknown_customers' limits, as the authorizer applies them.
    default_peers, default_rooms = gateway.authorizer.unknown_limits or (None, None)
    customers, usage = [], grid.usage
    for customer in set(licensees) | set(usage) | set(gateway.refusals):
        peers, rooms = usage.get(customer, (0, 0))
        licensee = licensees.get(customer)
        room_limit, peer_limit = ((licensee.room_limit, licensee.peer_limit) if licensee is not None
                                  else (default_rooms, default_peers))
        customers.append({"id": _clip(customer), "rooms": [rooms, room_limit], "peers": [peers, peer_limit],
                          "refused": gateway.refusals.get(customer, 0)})
    customers.sort(key=lambda c: (-c["peers"][0], -c["rooms"][0], c["id"]))
    events = [dict({name: _clip(value, STATUS_EVENT_TEXT) for name, value in event.items()},
                   level=logging.getLevelName(EVENT_KINDS[event["kind"]][0]).lower())
              for event in gateway.events.newest(STATUS_EVENTS)]
    keys = len(gateway.authorizer.customer_keys)
    return {
        "gateway": {"version": __version__, "time": now, "started": gateway.started,
                    "placement": config.placement, "customers": len(licensees), "keys": keys,
                    "servers": len(grid.servers), "rooms": len(grid.rooms),
                    "update_interval": config.update_interval,
                    "disable_timeout": config.disable_timeout},
        "facts": [["version", __version__], ["up", _duration(now - gateway.started)],
                  ["placement", config.placement],
                  ["customers", "%d (%d keys)" % (len(licensees), keys)],
                  ["servers", str(len(grid.servers))], ["rooms", str(len(grid.rooms))]]
        + ([["warming up", "new rooms placed in %d s" % math.ceil(gateway.warm_until - now)]]
           if gateway.warm_until > now else []),
        "warnings": exposure_warnings(gateway),
        "columns": {"servers": SERVER_COLUMNS, "customers": CUSTOMER_COLUMNS},
        "servers": servers[:STATUS_SERVERS], "more_servers": max(0, len(servers) - STATUS_SERVERS),
        "customers": customers[:STATUS_CUSTOMERS],
        "more_customers": max(0, len(customers) - STATUS_CUSTOMERS),
        "events": events,
    }


# The page renders the same data twice: here as HTML, for the first view
# (readable without JavaScript), and in _STATUS_SCRIPT from /status.json at
# every refresh. Both put text only where text goes (escaped here, textContent
# there): hostnames, room ids and customer ids come from requests.

def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> str:
    """As the script's fmt(): whole numbers plain, others with two decimals."""
    if isinstance(value, float) and not value.is_integer():
        return "%.2f" % value
    return "%d" % value if isinstance(value, (int, float)) else _esc(value)


def _bar(fraction: float, high: bool) -> str:
    width = int(min(max(fraction, 0.0), 1.0) * 100 + 0.5)
    return '<span class="bar%s"><span style="width:%d%%"></span></span>' % (" high" if high else "", width)


def _cell(kind: str, value: Any, gateway: dict) -> str:
    if kind == "number":
        return '<td class="number">%s</td>' % _number(value)
    if kind == "state":
        return '<td class="state %s">%s</td>' % (_esc(value.split(" ")[0]), _esc(value))
    if kind == "bar":
        return "<td>%s%s</td>" % (_bar(value, value >= 0.9), _number(value))
    if kind == "age":
        late = (" silent" if value > gateway["disable_timeout"] else
                " late" if value > gateway["update_interval"] else "")
        return '<td class="number%s">%.1f s</td>' % (late, value)
    if kind == "usage":
        used, limit = value
        if limit is None:
            return "<td>%d / no limit</td>" % used
        return "<td>%s%d / %d</td>" % (_bar(used / limit if limit else 1.0, used >= limit), used, limit)
    return "<td>%s</td>" % _esc(value)


def _rows(columns: Any, entries: List[dict], more: int, gateway: dict, empty: str) -> str:
    rows = ["<tr>%s</tr>" % "".join(_cell(kind, entry[key], gateway) for _h, key, kind in columns)
            for entry in entries]
    if not entries or more:
        rows.append('<tr><td class="more" colspan="%d">%s</td></tr>' % (
            len(columns), "and %d more" % more if entries else _esc(empty)))
    return "".join(rows)


def _event_text(value: Any) -> str:
    """An event field as the script's text(): a room as namespace/name."""
    if isinstance(value, (list, tuple)):
        return "/".join(str(part) for part in value)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float) and not value.is_integer():
        return "%.1f" % value
    if isinstance(value, str) and " " in value:
        return '"%s"' % value
    return "%d" % value if isinstance(value, float) else str(value)


def _event_details(event: dict) -> str:
    """An event's fields as name=value pairs, as the script's details."""
    return " ".join("%s=%s" % (name, _event_text(value)) for name, value in event.items()
                    if name not in ("seq", "time", "kind", "level") and value is not None)


def _event_item(event: dict) -> str:
    return '<li class="%s"><time>%s</time> <b>%s</b> %s</li>' % (
        _esc(event["level"]), time.strftime("%H:%M:%S", time.gmtime(event["time"])),
        _esc(event["kind"]), _esc(_event_details(event)))


def _table(name: str, columns: Any, body: str) -> str:
    head = "".join("<th>%s</th>" % _esc(heading) for heading, _key, _kind in columns)
    return '<table id="%s"><thead><tr>%s</tr></thead><tbody>%s</tbody></table>' % (name, head, body)


def render_status_page(data: dict) -> str:
    """The whole /status page: inline CSS and script, no outside resources."""
    gateway = data["gateway"]
    facts = "".join("<span>%s <b>%s</b></span>" % (_esc(label), _esc(text))
                    for label, text in data["facts"])
    warnings = "".join('<p class="band warning">%s</p>' % _esc(text) for text in data["warnings"])
    servers = _rows(SERVER_COLUMNS, data["servers"], data["more_servers"], gateway,
                    "no server has reported yet")
    customers = _rows(CUSTOMER_COLUMNS, data["customers"], data["more_customers"], gateway,
                      "no customers")
    events = "".join(_event_item(event) for event in data["events"])
    return _STATUS_PAGE % {
        "css": _STATUS_CSS, "script": _STATUS_SCRIPT, "refresh": _number(gateway["update_interval"]),
        "facts": facts, "warnings": warnings,
        "servers": _table("servers", SERVER_COLUMNS, servers),
        "customers": _table("customers", CUSTOMER_COLUMNS, customers), "events": events}


def status_headers() -> List[Tuple[str, str]]:
    """A strict Content-Security-Policy: only the page's own script runs."""
    digest = binascii.b2a_base64(hashlib.sha256(_STATUS_SCRIPT.encode("utf-8")).digest(),
                                 newline=False).decode()
    return [("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; "
             "script-src 'sha256-%s'; connect-src 'self'; img-src data:; base-uri 'none'; "
             "form-action 'none'; frame-ancestors 'none'" % digest),
            ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer")]


_STATUS_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,"><title>ODIN gateway status</title>
<style>%(css)s</style></head>
<body data-refresh="%(refresh)s">
<h1>ODIN gateway</h1>
<p id="notice" class="band" hidden></p>
<p id="facts" class="facts">%(facts)s</p>
<div id="warnings">%(warnings)s</div>
<h2>Servers</h2>
%(servers)s
<h2>Customers</h2>
%(customers)s
<h2>Newest events</h2>
<ol id="events" class="events">%(events)s</ol>
<noscript><p>Without JavaScript this page does not refresh itself: reload it.</p></noscript>
<script>%(script)s</script>
</body></html>
"""

_STATUS_CSS = """
:root{color-scheme:light;--ok:#15803d;--warn:#b45309;--bad:#b91c1c;--bar:#2563eb;--line:#e5e7eb}
body{font:14px/1.45 system-ui,sans-serif;margin:1.2em auto;max-width:76em;padding:0 1em;color:#111}
h1{font-size:1.35em;margin:0 0 .2em}h2{font-size:1.05em;margin:1.4em 0 .4em}
.facts span{margin-right:1.4em;color:#555}.facts b{color:#111}
.band{padding:.45em .8em;border-radius:4px;margin:.4em 0}
.warning.band{background:#fef3c7;color:#78350f}#notice{background:var(--bad);color:#fff;font-weight:600}
table{border-collapse:collapse;width:100%}
th{font-weight:600;color:#555;font-size:.9em}
th,td{padding:.28em .55em;border-bottom:1px solid var(--line);text-align:left;white-space:nowrap}
td.number{text-align:right;font-variant-numeric:tabular-nums}td.more{color:#666;font-style:italic}
.state{font-weight:600}.taking{color:var(--ok)}.draining{color:var(--warn)}.disabled{color:var(--bad)}
.bar{display:inline-block;width:5em;height:.65em;background:var(--line);border-radius:2px;
vertical-align:middle;margin-right:.5em;overflow:hidden}
.bar>span{display:block;height:100%;background:var(--bar)}.bar.high>span{background:var(--bad)}
.late{color:var(--warn);font-weight:600}.silent{color:var(--bad);font-weight:600}
.events{list-style:none;padding:0;margin:0;font:12.5px/1.5 ui-monospace,monospace}
.events li{border-bottom:1px solid var(--line);white-space:pre-wrap;overflow-wrap:anywhere}
.events time{color:#666}.events .warning b,.events .error b{color:var(--warn)}
"""

_STATUS_SCRIPT = """
"use strict";
(() => {
  const every = 1000 * (Number(document.body.dataset.refresh) || 5);
  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const fmt = (v) => typeof v === "number" && !Number.isInteger(v) ? v.toFixed(2) : String(v);
  const text = (v) => Array.isArray(v) ? v.join("/") :
    typeof v === "number" && !Number.isInteger(v) ? v.toFixed(1) :
    typeof v === "string" && v.includes(" ") ? '"' + v + '"' : String(v);
  const clock = (t) => new Date(t * 1000).toISOString().slice(11, 19);
  function bar(fraction, high) {
    const outer = el("span", high ? "bar high" : "bar"), inner = el("span");
    inner.style.width = Math.round(Math.min(Math.max(fraction, 0), 1) * 100) + "%";
    outer.append(inner);
    return outer;
  }
  function cell(kind, v, g) {
    const td = el("td");
    if (kind === "number") { td.className = "number"; td.textContent = fmt(v); }
    else if (kind === "state") { td.className = "state " + v.split(" ")[0]; td.textContent = v; }
    else if (kind === "bar") td.append(bar(v, v >= 0.9), fmt(v));
    else if (kind === "age") {
      td.className = "number" + (v > g.disable_timeout ? " silent" : v > g.update_interval ? " late" : "");
      td.textContent = v.toFixed(1) + " s";
    } else if (kind === "usage") {
      if (v[1] === null) td.textContent = v[0] + " / no limit";
      else td.append(bar(v[1] ? v[0] / v[1] : 1, v[0] >= v[1]), v[0] + " / " + v[1]);
    } else td.textContent = v;
    return td;
  }
  function rows(id, columns, entries, more, g, empty) {
    const out = entries.map((entry) => {
      const tr = el("tr");
      for (const [, key, kind] of columns) tr.append(cell(kind, entry[key], g));
      return tr;
    });
    if (!entries.length || more) {
      const tr = el("tr"), td = el("td", "more", entries.length ? "and " + more + " more" : empty);
      td.colSpan = columns.length;
      tr.append(td);
      out.push(tr);
    }
    $(id).tBodies[0].replaceChildren(...out);
  }
  function render(d) {
    $("facts").replaceChildren(...d.facts.map(([label, value]) => {
      const span = el("span", "", label + " ");
      span.append(el("b", "", value));
      return span;
    }));
    $("warnings").replaceChildren(...d.warnings.map((w) => el("p", "band warning", w)));
    rows("servers", d.columns.servers, d.servers, d.more_servers, d.gateway, "no server has reported yet");
    rows("customers", d.columns.customers, d.customers, d.more_customers, d.gateway, "no customers");
    $("events").replaceChildren(...d.events.map((e) => {
      const li = el("li", e.level), details = [];
      for (const [name, value] of Object.entries(e))
        if (!["seq", "time", "kind", "level"].includes(name) && value !== null)
          details.push(name + "=" + text(value));
      li.append(el("time", "", clock(e.time)), " ", el("b", "", e.kind), " " + details.join(" "));
      return li;
    }));
  }
  let lastGood = new Date(), failing = false;
  async function refresh() {
    const abort = new AbortController(), timer = setTimeout(() => abort.abort(), every);
    try {
      // Not fetch("status.json"): on a page opened with user:password@ in its
      // URL that resolves to a URL with credentials, which fetch refuses.
      const url = new URL("status.json", location.origin + location.pathname);
      const answer = await fetch(url, {cache: "no-store", signal: abort.signal});
      if (!answer.ok) throw new Error("it answered HTTP " + answer.status);
      render(await answer.json());
      lastGood = new Date();
      failing = false;
      $("notice").hidden = true;
    } catch (err) {
      failing = true;
      $("notice").textContent = "The gateway is not answering (" + (err.name === "AbortError" ?
        "no answer in time" : err.message) + "). What you see is from " +
        lastGood.toLocaleTimeString() + "; trying again every " + every / 1000 + " s.";
      $("notice").hidden = false;
    } finally {
      clearTimeout(timer);
      setTimeout(refresh, every);
    }
  }
  setTimeout(refresh, every);
})();
"""


# ---------------------------------------------------------------------------
# HTTP/1.1 framing: bytes in; a request, an exact error answer or "need more" out
# ---------------------------------------------------------------------------
# No sockets here (the h11 lesson): HttpFraming takes the bytes a connection
# received and says what they make. The server below only reads, feeds, calls
# Gateway.handle_http, writes and keeps one deadline; the fuzz tests drive
# this section without an event loop.

_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: The start of a request line: method characters up to the first space. A
#: byte that cannot belong to a method (a TLS ClientHello begins with 0x16)
#: is answered 400 at once instead of waiting for a line that never comes.
_METHOD_PREFIX_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]*")
#: Bytes no head may hold: a CR not before LF, an LF not after CR, a NUL. A
#: head that is not complete yet is refused at once when it holds one (it
#: would otherwise wait for a CRLF CRLF that bare-LF clients never send).
_NEVER_IN_HEAD_RE = re.compile(rb"\r[^\n]|(?<!\r)\n|\x00")
#: A well-formed header line; and the same at every line start of a block of
#: them (one call per request instead of one per line): when it matches as
#: many lines as the block has, each line is well-formed; when not, the block
#: takes the slow path, for its message. (Greedy: a lazy value is 5x slower.)
_HEADER_LINE_RE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\r\n\x00]*?)[ \t]*")
_HEADER_FIELD_RE = re.compile(r"^([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\r\n\x00]*)\r\n",
                              re.MULTILINE)
_VERSION_RE = re.compile(r"HTTP/(\d)\.(\d)")
#: A request target is visible ASCII (RFC 9112 section 3.2); a control byte in
#: it (NUL, TAB, DEL) is a malformed request line, not a path to look up.
_TARGET_RE = re.compile(r"[\x21-\x7e]+")
_CONTENT_LENGTH_RE = re.compile(r"[0-9]+")
#: A request target in absolute-form (RFC 9112 section 3.2.2), as a proxy
#: would send it: the request is routed by its path (and query), which is
#: "/" when the URI has none. The authority is not checked against Host.
_ABSOLUTE_FORM_RE = re.compile(r"[Hh][Tt][Tt][Pp][Ss]?://[^/?#]*([^#]*)")
#: A Host header's value: uri-host [":" port] (RFC 9110 section 7.2; RFC 3986:
#: an IP literal in brackets or a reg-name, which may be empty).
_HOST_RE = re.compile(r"(?:\[[0-9A-Za-z._~!$&'()*+,;=:%-]+\]|[0-9A-Za-z._~!$&'()*+,;=%-]*)"
                      r"(?::[0-9]*)?")
#: Empty lines before a request line: ignored (RFC 9112 section 2.2), as a
#: keep-alive client may send a stray CRLF after a body.
_EMPTY_LINES_RE = re.compile(rb"(?:\r\n)+")
#: A chunk size line without its CRLF: the size (as h11: more hex digits than
#: 2**64 needs is not a size; larger ones get 413), then extensions, unread.
#: Nothing before the size, and no CR, LF or NUL anywhere in the line.
_CHUNK_LINE_RE = re.compile(rb"([0-9A-Fa-f]{1,20})[ \t]*(?:;[^\r\n\x00]*)?")
_REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
            403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 413: "Content Too Large", 414: "URI Too Long",
            417: "Expectation Failed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            501: "Not Implemented", 503: "Service Unavailable",
            505: "HTTP Version Not Supported"}
#: Status lines, rendered once (immutable after import).
_STATUS_LINES = {status: b"HTTP/1.1 %d %s\r\n" % (status, reason.encode("ascii"))
                 for status, reason in _REASONS.items()}
_COMMON_HEADERS = (
    b"Access-Control-Allow-Origin: *\r\n"
    b"Access-Control-Allow-Headers: Authorization,Content-Type\r\n"
    b"Access-Control-Allow-Methods: POST, OPTIONS\r\n"
    b"Access-Control-Request-Method: POST\r\n"
    b"Cache-Control: no-store\r\n"
)
#: The usual header names as clients spell them, with their lower-case keys (read-only).
_HEADER_NAMES = types.MappingProxyType({spelling: name for name in (
    "host", "authorization", "content-type", "content-length", "connection", "user-agent",
    "accept", "accept-encoding", "accept-language", "origin", "referer", "expect",
    "transfer-encoding", "access-control-request-method", "access-control-request-headers",
    "access-control-request-private-network", "x-forwarded-for")
    for spelling in (name, name.title(), name.upper())})
#: Most distinct request lines a server remembers parsed (clients repeat theirs).
REQUEST_LINE_CACHE = 256
#: Most distinct header lines a server remembers parsed, and the longest it keeps
#: (Host, Content-Type and Content-Length lines repeat; Authorization lines, which
#: hold tokens, are not kept; long lines would make the cache big).
HEADER_LINE_CACHE, HEADER_LINE_KEPT = 256, 200
#: Most distinct heads a server remembers parsed, and the longest it keeps. A
#: client's heads differ only in their token: a head with an Authorization line
#: spelled as below is kept without its value, and a head that is the same but
#: for that value (one without CR, LF or NUL) is read as the one kept was.
HEAD_CACHE, HEAD_KEPT = 256, 1024
_AUTHORIZATION_LINE = b"\r\nAuthorization: "
_CLEAN_VALUE_RE = re.compile(rb"[^\r\n\x00]*")


class HttpError(GatewayError):
    """A request the HTTP layer refuses; the connection is closed after the answer."""

    def __init__(self, status: int, message: str, target: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.target = target  # the request's target, when the head was read


class Request:
    """A complete request: head, body and whether the client wants to keep the connection."""

    __slots__ = ("method", "target", "version", "headers", "body", "keep_alive")

    def __init__(self, method: str, target: str, version: Tuple[int, int], headers: Dict[str, str],
                 body: bytes = b""):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.body = body
        connection = headers.get("connection")
        if connection is None:
            self.keep_alive = version >= (1, 1)
        else:
            # A list of tokens (RFC 9110 section 7.6.1): "close" closes; HTTP/1.0
            # keeps the connection only when asked with "keep-alive".
            connection = connection.lower()
            if connection == "keep-alive" or connection == "close":
                self.keep_alive = connection == "keep-alive"
            else:
                tokens = {token.strip(" \t") for token in connection.split(",")}
                self.keep_alive = "close" not in tokens and (version >= (1, 1) or "keep-alive" in tokens)


def parse_request_line(line: bytes) -> Tuple[str, str, Tuple[int, int]]:
    """(method, target, (major, minor)) of a request line without its CRLF."""
    try:
        method, target, version = line.decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, "malformed request line") from None
    match = _VERSION_RE.fullmatch(version)
    if not _TOKEN_RE.fullmatch(method) or not _TARGET_RE.fullmatch(target) or not match:
        raise HttpError(400, "malformed request line")
    if match.group(1) != "1":
        raise HttpError(505, "HTTP version not supported: use HTTP/1.1")
    if target[0] != "/" or "#" in target:
        target = origin_form(method, target)
    return method, target, (1, int(match.group(2)))


def origin_form(method: str, target: str) -> str:
    """The path and query a request target not in origin-form names (RFC 9112
    section 3.2): an absolute-form target is routed by its path, "*" is only
    for OPTIONS (the server as a whole); anything else (a fragment, which
    clients never send, included) is refused."""
    absolute = _ABSOLUTE_FORM_RE.fullmatch(target)
    if absolute is not None:
        path = absolute.group(1)
        return path if path.startswith("/") else "/" + path
    if target == "*" and method == "OPTIONS":
        return target
    if method == "CONNECT":  # authority-form: asks for a tunnel, as from a proxy
        raise HttpError(501, "CONNECT is not supported: this is not a proxy")
    raise HttpError(400, "malformed request target: %s" % printable(target, 40))


def parse_header_line(line: str, headers: Dict[str, str]) -> None:
    """Add one 'Name: value' line (latin-1 text without CRLF) to headers, keyed by lower-case name."""
    match = _HEADER_LINE_RE.fullmatch(line)
    if match is None:
        name, colon, _value = line.partition(":")
        if not colon or not _TOKEN_RE.fullmatch(name):
            # Also refuses obsolete line folding and whitespace before the colon.
            raise HttpError(400, "malformed header line")
        raise HttpError(400, "malformed header value")
    _add_header(headers, match.group(1).lower(), match.group(2))


def _add_header(headers: Dict[str, str], name: str, value: str) -> None:
    if name in headers:
        if name == "content-length":
            if headers[name] != value:
                raise HttpError(400, "conflicting Content-Length headers")
            return
        if name in ("authorization", "host", "transfer-encoding"):
            raise HttpError(400, "duplicate %s header" % name)
        value = headers[name] + ", " + value
    headers[name] = value


def parse_headers(block: str, max_headers: int,
                  known: Optional[Dict[str, Tuple[str, str]]] = None) -> Dict[str, str]:
    """The header fields of a head (latin-1 text after the request line, each
    line ending in CRLF), keyed by lower-case name; HttpError if malformed.
    known, if given, keeps the field of each well-formed line (HEADER_LINE_CACHE)."""
    headers: Dict[str, str] = {}
    lines = block[:-2].split("\r\n")
    if (len(lines) <= max_headers and block.count("\n") == len(lines) == block.count("\r")
            and "\x00" not in block):
        # Each line ends in its CRLF and holds no other CR, LF or NUL: then a
        # line is well-formed when a token and a colon begin it (the usual
        # names are looked up, not matched). Anything else: the checks below.
        for line in lines:
            field = known.get(line) if known is not None else None
            if field is None:
                name, colon, value = line.partition(":")
                lower = _HEADER_NAMES.get(name)
                if lower is None:
                    if not colon or not _TOKEN_RE.fullmatch(name):
                        break
                    lower = name.lower()
                elif not colon:
                    break
                field = (lower, value.strip(" \t"))
                if (known is not None and lower != "authorization"
                        and len(line) <= HEADER_LINE_KEPT):
                    if len(known) >= HEADER_LINE_CACHE:
                        known.clear()
                    known[line] = field
            lower, value = field
            if lower in headers:
                _add_header(headers, lower, value)
            else:
                headers[lower] = value
        else:
            return headers
        headers = {}
    fields = _HEADER_FIELD_RE.findall(block)
    if len(fields) == block.count("\n"):
        if len(fields) > max_headers:
            raise HttpError(431, "too many header fields (limit %d)" % max_headers)
        for name, value in fields:
            name, value = name.lower(), value.rstrip(" \t")
            if name in headers:
                _add_header(headers, name, value)
            else:
                headers[name] = value
        return headers
    lines = block[:-2].split("\r\n")
    if len(lines) > max_headers:
        raise HttpError(431, "too many header fields (limit %d)" % max_headers)
    for line in lines:
        parse_header_line(line, headers)
    return headers


def body_length(headers: Dict[str, str]) -> Optional[int]:
    """Content-Length as an int, None for a chunked body; HttpError otherwise."""
    encoding = headers.get("transfer-encoding")
    if encoding is not None:
        if "content-length" in headers:  # a smuggling attempt, or a broken proxy
            raise HttpError(400, "both Transfer-Encoding and Content-Length")
        if encoding.lower() == "chunked":
            return None
        # RFC 9112 section 6.3: a request whose codings do not end in chunked
        # (once) has no reliable length: 400. A coding we do not know: 501.
        codings = [coding.strip(" \t").lower() for coding in encoding.split(",")]
        if codings[-1] != "chunked" or "chunked" in codings[:-1]:
            raise HttpError(400, "Transfer-Encoding must end in chunked, once: %s"
                            % printable(encoding, 40))
        raise HttpError(501, "unsupported Transfer-Encoding: %s" % printable(encoding, 40))
    text = headers.get("content-length", "0")
    if text.isdigit() and text.isascii() and len(text) <= 15:  # [0-9]{1,15}, quickly
        return int(text)
    if not _CONTENT_LENGTH_RE.fullmatch(text):
        raise HttpError(400, "Content-Length must be plain digits")
    digits = text.lstrip("0")
    if len(digits) > 15:  # beyond every body limit (and int() refuses 4,300 digits)
        raise HttpError(413, "request body too large (Content-Length of %d digits)" % len(digits))
    return int(digits or "0")


class HttpDate:
    """The Date header's value, formatted once a second (formatting costs more than
    a request). One per server, so gateways in one process share nothing."""

    __slots__ = ("second", "value")

    def __init__(self) -> None:
        self.second = -1
        self.value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second, self.value = now, email.utils.formatdate(now, usegmt=True).encode("ascii")
        return self.value


def render_response(response: Response, *, keep_alive: bool, head_only: bool = False,
                    date: bytes = b"") -> bytes:
    """The bytes of an HTTP/1.1 response with the CORS headers every answer carries."""
    status = response.status
    body = response.body
    if body and keep_alive and not head_only and not response.headers and status in _STATUS_LINES:
        # The usual answer, in one formatting step.
        return b"%s%sDate: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
            _STATUS_LINES[status], _COMMON_HEADERS, date or HttpDate()(),
            response.content_type.encode("ascii"), len(body), body)
    head = [_STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status, _COMMON_HEADERS,
            b"Date: ", date or HttpDate()(), b"\r\n"]
    if body:
        head.append(b"Content-Type: %s\r\n" % response.content_type.encode("ascii"))
    for name, value in response.headers:
        head.append(("%s: %s\r\n" % (name, value)).encode("latin-1"))
    if status != 204:
        head.append(b"Content-Length: %d\r\n" % len(body))
    head.append(b"\r\n" if keep_alive else b"Connection: close\r\n\r\n")
    if not head_only:
        head.append(body)
    return b"".join(head)


def _http_error_response(err: HttpError) -> Response:
    code = PARSE_ERROR if err.status == 400 else INVALID_REQUEST
    return Response(err.status, _error_body(code, err.message))


#: HttpFraming.next_event() results besides a Request and an HttpError.
NEED_DATA = "need data"  # feed more bytes (phase says what is awaited)
CONTINUE = "100 continue"  # the client waits for "100 Continue" before sending its body
CLOSED = "closed"  # the client closed between requests, or the connection is done
CONTINUE_ANSWER = b"HTTP/1.1 100 Continue\r\n\r\n"


class HttpFraming:
    """The HTTP/1.1 state of one connection, without I/O.

    feed() the bytes received (feed_eof() at their end), then call
    next_event() until it says NEED_DATA: a Request (complete, with its
    body, Content-Length or chunked), an HttpError (answer it with error()
    and close), CONTINUE (send CONTINUE_ANSWER) or CLOSED. answer() renders
    a response and decides keep-alive, HEAD and close. phase names what is
    awaited, which decides the deadline: "first byte" (of a new
    connection), "idle" (between requests), "head", "body", or "closed".
    limits is a Config; it may be replaced between requests (a reload).
    """

    __slots__ = ("limits", "date", "lines", "buffer", "start", "eof", "phase", "scanned",
                 "request", "length", "continue_sent", "chunk_pos", "chunk_left", "chunks",
                 "in_trailer", "host", "header_lines", "heads")

    def __init__(self, limits: Config, *, date: Optional[Callable[[], bytes]] = None,
                 request_lines: Optional[Dict[bytes, Tuple[str, str, Tuple[int, int]]]] = None,
                 header_lines: Optional[Dict[str, Tuple[str, str]]] = None,
                 heads: Optional[Dict[bytes, tuple]] = None):
        self.limits = limits
        self.date = date or HttpDate()
        self.lines = request_lines if request_lines is not None else {}
        self.header_lines = header_lines if header_lines is not None else {}
        self.heads = heads if heads is not None else {}  # see HEAD_CACHE
        # Bytes received and not yet consumed: buffer[start:]. A request that
        # arrives whole is parsed from the bytes as received (no copy); a
        # request in pieces is gathered in a bytearray.
        self.buffer: Any = b""
        self.start = 0
        self.eof = False
        self.phase = "first byte"
        self.scanned = 0  # how far the buffer is known to hold no end of head
        self.request: Optional[Request] = None  # a head whose body is awaited
        self.length: Optional[int] = None  # its Content-Length (None: chunked)
        self.continue_sent = False
        self.chunk_pos = 0
        self.chunk_left: Optional[int] = None
        self.chunks = bytearray()
        self.in_trailer = False
        self.host: Optional[str] = None  # the last Host value found well-formed

    def feed(self, data: bytes) -> None:
        if self.start >= len(self.buffer):
            self.buffer, self.start = data, 0
            self.scanned = 0
            return
        if self.start or type(self.buffer) is bytes:
            self.buffer = bytearray(self.buffer[self.start:])
            self.scanned = max(0, self.scanned - self.start)
            self.start = 0
        self.buffer += data

    @property
    def pending(self) -> int:
        """Bytes received and not yet consumed."""
        return len(self.buffer) - self.start

    def feed_eof(self) -> None:
        self.eof = True

    def next_event(self) -> Any:
        """A Request, an HttpError, NEED_DATA, CONTINUE or CLOSED (see the class)."""
        if self.phase == "closed":
            return CLOSED
        if self.start >= len(self.buffer) and self.request is None and not self.eof:
            return NEED_DATA  # between requests, nothing received
        try:
            if self.request is None:
                event = self._head()
                if event is not None:
                    return event
            request = self.request
            if self.length is None:
                body = self._chunked_body()
            elif len(self.buffer) - self.start >= self.length:
                end = self.start + self.length
                body = bytes(self.buffer[self.start:end])
                self.start = end
            else:
                body = None
            if body is None:
                if self.eof:
                    raise HttpError(400, "connection closed inside the request")
                if (not self.continue_sent and request.headers.get("expect", "").lower()
                        == "100-continue" and request.version >= (1, 1)):  # 1.0: RFC 9110 10.1.1
                    self.continue_sent = True
                    return CONTINUE
                return NEED_DATA
        except HttpError as err:
            if err.target is None and self.request is not None:
                err.target = self.request.target
            self.phase = "closed"
            return err
        request.body = body
        self.request = None
        self.phase = "idle"
        return request

    def _head(self) -> Any:
        """Parse a request head if the buffer holds one (None: it did; the body follows)."""
        buffer, start = self.buffer, self.start
        limits = self.limits
        end = buffer.find(b"\r\n\r\n", max(start, self.scanned))
        if end < 0:
            if start >= len(buffer):
                if self.eof:
                    self.phase = "closed"
                    return CLOSED
                return NEED_DATA
            if buffer[start] == 13:  # CR: an empty line, or the start of one
                return self._skip_empty_lines()
            self.phase = "head"
            self._refuse_early(limits)
            if self.eof:
                raise HttpError(400, "connection closed inside the request")
            self.scanned = max(start, len(buffer) - 3)
            return NEED_DATA
        line_end = buffer.find(b"\r\n", start, end + 2)
        if line_end == start:
            return self._skip_empty_lines()
        key = None
        cut = buffer.find(_AUTHORIZATION_LINE, line_end, end) if type(buffer) is bytes else -1
        if cut >= 0:  # a head kept (HEAD_CACHE): read as it was, with this token
            value_start = cut + len(_AUTHORIZATION_LINE)
            value_end = buffer.find(b"\r\n", value_start, end + 2)
            key = buffer[start:value_start] + buffer[value_end:end]
            kept = self.heads.get(key)
            if (kept is not None and kept[0] is limits and end - start <= limits.max_head_bytes
                    and _CLEAN_VALUE_RE.fullmatch(buffer, value_start, value_end)):
                _limits, method, target, version, fields, length = kept
                headers = fields.copy()
                headers["authorization"] = buffer[value_start:value_end].decode("latin-1").strip(" \t")
                self.start = self.scanned = end + 4
                self.phase = "body"
                self.request = Request(method, target, version, headers)
                self.continue_sent = False
                self.length = length
                return None
        line = bytes(buffer[start:line_end])
        if len(line) > limits.max_request_line:
            raise HttpError(414, "request line too long (limit %d bytes)" % limits.max_request_line)
        parsed = self.lines.get(line)
        if parsed is None:
            parsed = parse_request_line(line)
            if len(self.lines) >= REQUEST_LINE_CACHE:
                self.lines.clear()
            self.lines[line] = parsed
        method, target, version = parsed
        if end - start > limits.max_head_bytes:
            raise HttpError(431, "header block too large (limit %d bytes)" % limits.max_head_bytes,
                            target)
        headers: Dict[str, str] = {}
        if line_end < end:
            try:
                headers = parse_headers(buffer[line_end + 2:end + 2].decode("latin-1"),
                                        limits.max_headers, self.header_lines)
            except HttpError as err:
                err.target = target
                raise
        host = headers.get("host")
        if host is None:
            if version >= (1, 1):
                raise HttpError(400, "missing Host header (HTTP/1.1 requires one)", target)
        elif host != self.host:  # a connection's requests usually name one host: checked once
            if not _HOST_RE.fullmatch(host):
                raise HttpError(400, "malformed Host header: %s" % printable(host, 40), target)
            self.host = host
        expect = headers.get("expect")
        if expect is not None and expect.lower() != "100-continue":  # RFC 9110 section 10.1.1
            raise HttpError(417, "unsupported expectation: %s" % printable(expect, 40), target)
        self.start = self.scanned = end + 4
        self.phase = "body"
        self.request = Request(method, target, version, headers)
        self.continue_sent = False
        self.length = length = body_length(headers)
        limit = self.body_limit(target)
        if length is not None and length > limit:
            raise HttpError(413, "request body too large (limit %d bytes)" % limit, target)
        if length is None:
            self.chunk_pos, self.chunk_left, self.in_trailer = 0, None, False
            self.chunks = bytearray()
            if version < (1, 1):  # its framing is suspect: close after it (RFC 9112 6.1)
                self.request.keep_alive = False
        elif key is not None and len(key) <= HEAD_KEPT and "authorization" in headers:
            if len(self.heads) >= HEAD_CACHE:
                self.heads.clear()
            fields = headers.copy()
            fields["authorization"] = ""  # the token is not kept; its place in the order is
            self.heads[key] = (limits, method, target, version, fields, length)
        return None

    def _skip_empty_lines(self) -> Any:
        """Drop the empty lines (CRLF) before a request line, then read on (RFC 9112
        section 2.2: a keep-alive client may send a stray CRLF after a body). The
        phase stays: an idle connection stays idle (empty lines hold it no longer
        than a request each keep_alive_timeout would), a new one keeps its
        first-byte deadline."""
        skipped = _EMPTY_LINES_RE.match(self.buffer, self.start)
        if skipped is None:
            if self.start + 1 == len(self.buffer) and not self.eof:
                return NEED_DATA  # a CR whose LF is on its way
            raise HttpError(400, "malformed request line")
        self.start = skipped.end()
        return self._head()

    def body_limit(self, target: str) -> int:
        """Largest body for target: servers' reports to /internal may be far larger
        than anything a client sends."""
        if target.startswith("/internal") and target.split("?", 1)[0] == "/internal":
            return self.limits.max_internal_body_bytes
        return self.limits.max_body_bytes

    def _refuse_early(self, limits: Config) -> None:
        """HttpError at once for a head that can no longer become a valid one."""
        buffer, start = self.buffer, self.start
        method_end = _METHOD_PREFIX_RE.match(buffer, start).end()  # type: ignore[union-attr]
        if method_end < len(buffer) and (method_end == start or buffer[method_end] != 0x20):
            raise HttpError(400, "malformed request line")
        line_end = buffer.find(b"\r\n", start)
        if line_end - start > limits.max_request_line or (
                line_end < 0 and len(buffer) - start > limits.max_request_line + 1):
            raise HttpError(414, "request line too long (limit %d bytes)" % limits.max_request_line)
        if len(buffer) - start > limits.max_head_bytes + 3:
            raise HttpError(431, "header block too large (limit %d bytes)" % limits.max_head_bytes)
        # From where the last look ended (the lookbehind sees the byte before).
        if _NEVER_IN_HEAD_RE.search(buffer, max(start, self.scanned)):
            raise HttpError(400, "malformed head: lines must end in CRLF, without NUL bytes")

    def _chunked_body(self) -> Optional[bytes]:
        """The chunked body (RFC 9112 section 7.1) once complete, else None."""
        if self.start or type(self.buffer) is bytes:  # gathered from here on
            self.buffer, self.start = bytearray(self.buffer[self.start:]), 0
        buffer, limits = self.buffer, self.limits
        limit = self.body_limit(self.request.target)  # type: ignore[union-attr]
        while True:
            pos = self.chunk_pos
            if self.chunk_left is None:  # at a chunk size line, or a trailer line
                eol = buffer.find(b"\r\n", pos)
                line_limit = limits.max_head_bytes if self.in_trailer else limits.max_chunk_line
                if eol < 0:
                    if len(buffer) - pos > line_limit + 1:
                        eol = len(buffer)  # too long either way
                    elif _NEVER_IN_HEAD_RE.search(buffer, pos):  # no CRLF will end it
                        raise HttpError(400, "malformed chunked body: lines must end in CRLF")
                    else:
                        break
                line = bytes(buffer[pos:eol])
                if len(line) > line_limit:
                    if self.in_trailer:
                        raise HttpError(431, "trailer too long (limit %d bytes)" % line_limit)
                    raise HttpError(400, "chunk size line too long (limit %d bytes)" % line_limit)
                self.chunk_pos = eol + 2
                if self.in_trailer:
                    if not line:
                        del buffer[:self.chunk_pos]
                        self.scanned = 0
                        body, self.chunks = bytes(self.chunks), bytearray()
                        return body
                    # Dropped, but only if a field line: a front proxy that reads
                    # it otherwise must not see a request hidden in the trailer.
                    if not _HEADER_LINE_RE.fullmatch(line.decode("latin-1")):
                        raise HttpError(400, "malformed trailer line")
                    continue
                match = _CHUNK_LINE_RE.fullmatch(line)
                if match is None:
                    raise HttpError(400, "malformed chunk size")
                size = int(match.group(1), 16)
                if size == 0:
                    self.in_trailer = True
                elif len(self.chunks) + size > limit:
                    raise HttpError(413, "request body too large (limit %d bytes)" % limit)
                else:
                    self.chunk_left = size
            else:
                end = pos + self.chunk_left
                if len(buffer) < end + 2:
                    break
                if buffer[end:end + 2] != b"\r\n":
                    raise HttpError(400, "malformed chunk")
                self.chunks += buffer[pos:end]
                self.chunk_pos, self.chunk_left = end + 2, None
        del buffer[:self.chunk_pos]  # what was consumed; the rest waits for more bytes
        self.chunk_pos = 0
        return None

    def answer(self, request: Request, response: Response, *, stopping: bool = False) -> bytes:
        """The bytes answering request; after them the connection closes unless
        the client and the server both keep it (phase tells)."""
        keep_alive = request.keep_alive and not stopping
        if not keep_alive:
            self.phase = "closed"
        elif request.version < (1, 1):
            # An HTTP/1.0 client reads an answer without it as the last one,
            # until the close (RFC 9112 appendix C.2.2; ab -k waited for that).
            response = Response(response.status, response.body,
                                response.headers + [("Connection", "keep-alive")],
                                response.content_type)
        return render_response(response, keep_alive=keep_alive, head_only=request.method == "HEAD",
                               date=self.date())

    def error(self, err: HttpError) -> bytes:
        """The bytes answering a refused request; the connection closes after them."""
        self.phase = "closed"
        return render_response(_http_error_response(err), keep_alive=False, date=self.date())


# ---------------------------------------------------------------------------
# Cluster: sharing the grid through Redis
# ---------------------------------------------------------------------------
#
# With the setting cluster (a Redis URL), each gateway's grid stays its own
# local replica, and the ClusterLink below shares through Redis what must be
# shared. Requests never wait for Redis except for what must be in Redis
# before the answer (a new room's claim, an admin task, a report's tasks),
# each under the deadline cluster_timeout; a Connect to a mapped room makes
# no round trip. The Redis data model (all keys under "odin:"):
#
#   odin:servers          hash    hostname -> JSON server record {hostname, version,
#                                 report (with its rooms), first_seen, last_seen};
#                                 written by the gateway that takes the report. A
#                                 record silent for remove_timeout is deleted by
#                                 the next gateway that loads the state.
#   odin:seen             hash    hostname -> last_seen (what the claim script reads).
#   odin:room:<hash>      string  the room's claim: its "room" record, as in the state
#                                 file (room_record/record_room build and read both); set once
#                                 (atomically, by the claim script) by the gateway
#                                 that places a new room, refreshed by the gateway
#                                 taking its server's report, deleted when the room
#                                 leaves the report; EX login_token_lifetime.
#   odin:placed:<host>    hash    "p:<customer>"/"r:<customer>" -> peers/rooms Connect
#                                 sent to the server since its report (future usage);
#                                 HINCRBY by every gateway, deleted by the report.
#   odin:tasks:<host>     list    JSON {id, task}; RPUSH (bounded by max_queued_tasks)
#                                 by the gateway that accepted the call, before it
#                                 answers; taken whole, atomically, by the gateway that
#                                 takes the server's next report; EX remove_timeout.
#   odin:taken            hash    "<report id>\n<host>" -> the tasks a report took, one
#                                 JSON entry a line, until its answer is written (then
#                                 deleted) or not sent (then handed back to the front of
#                                 odin:tasks:<host>); the entries of a gateway that is no
#                                 longer a member are handed back by the others.
#   odin:cancelled:<id>   string  a report whose take was handed back before it ran
#                                 (its call timed out): it takes nothing; EX remove_timeout.
#   odin:taskids:<host>   zset    id -> Redis time, of the tasks queued there within
#                                 remove_timeout (older ones are dropped at each push):
#                                 a task sent again after a call that failed (but may
#                                 have run) is not queued twice; EX remove_timeout.
#   odin:drained          hash    hostname -> "1": servers drained by an operator.
#   odin:members          zset    member id -> Redis time of its last heartbeat;
#                                 every heartbeat drops members silent for 3 heartbeats.
#   odin:events           pub/sub JSON {"from": member, "type": "report" | "claim" |
#                                 "placed" | "drain" | "delivered", ...}: what the
#                                 others apply to their replicas as it happens.
#
# When Redis cannot be reached, each gateway serves from its replica (mapped
# rooms as mapped, new rooms placed locally by their hash so that the
# gateways agree without Redis, admin tasks and reports held),
# says so once in the log, in Info and in odin_gateway_cluster_up; when
# Redis answers again it flushes what it held, then reloads the whole state.

CLUSTER_PREFIX = "odin:"
#: Seconds placements are gathered before they are shared in one batch.
CLUSTER_BATCH_DELAY = 0.005
#: Rooms loaded per round trip when the state is loaded.
CLUSTER_LOAD_BATCH = 1000
#: Ids of delivered tasks a gateway remembers for a Redis that restarts empty.
CLUSTER_RECENT_DELIVERIES = 100_000

# Claim a new room unless a live server owns it already: one atomic step.
# KEYS: odin:room:<hash>, odin:seen, odin:events; ARGV: the claim (a "room"
# record: its 6th element is the server), the oldest
# last_seen of a live server, its TTL, the event to publish if it is taken.
_CLAIM_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current then
  local seen = redis.call('HGET', KEYS[2], cjson.decode(current)[6])
  if seen and tonumber(seen) >= tonumber(ARGV[2]) then return current end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('PUBLISH', KEYS[3], ARGV[4])
return ARGV[1]
"""
# Queue an admin task unless it was queued before (same id) or the server's
# queue is full. KEYS: odin:tasks:<host>, odin:taskids:<host>; ARGV: the task,
# the bound, the TTL, the task's id. 1: queued (now, or before and still there),
# 2: queued before and taken since, 0: full.
_TASK_SCRIPT = """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[3]))
if redis.call('ZSCORE', KEYS[2], ARGV[4]) then
  if redis.call('LPOS', KEYS[1], ARGV[1]) then return 1 end
  return 2
end
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], now, ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"""
# Take a server's tasks for a report (report id <member>|<n>), keeping them in
# odin:taken until the answer is written. KEYS: odin:tasks:<host>, odin:taken,
# odin:cancelled:<report id>; ARGV: the field "<report id>\n<host>". The tasks.
_TAKE_SCRIPT = """
if redis.call('EXISTS', KEYS[3]) == 1 then return {} end
local tasks = redis.call('LRANGE', KEYS[1], 0, -1)
if #tasks > 0 then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], ARGV[1], table.concat(tasks, '\\n'))
end
return tasks
"""
# Tasks taken for a report whose answer was not sent, back to the front of
# their queue; if the take has not run yet, it never will. KEYS: as _TAKE_SCRIPT;
# ARGV: the field, the TTL of the cancellation. How many came back.
_GIVE_BACK_SCRIPT = """
local taken = redis.call('HGET', KEYS[2], ARGV[1])
if not taken then
  redis.call('SET', KEYS[3], '1', 'EX', ARGV[2])
  return 0
end
local entries = {}
for entry in string.gmatch(taken, '[^\\n]+') do table.insert(entries, entry) end
for i = #entries, 1, -1 do redis.call('LPUSH', KEYS[1], entries[i]) end
redis.call('HDEL', KEYS[2], ARGV[1])
return #entries
"""
# The tasks taken by gateways that are no longer members (killed between the
# take and the answer), back to their queues. KEYS: odin:taken, odin:members;
# ARGV: the key prefix. How many reports' tasks came back.
_SWEEP_SCRIPT = """
local count = 0
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  local report, host = string.match(field, '^([^\\n]*)\\n(.*)$')
  local member = report and string.match(report, '^(.*)|[^|]*$')
  if member and not redis.call('ZSCORE', KEYS[2], member) then
    local entries = {}
    for entry in string.gmatch(redis.call('HGET', KEYS[1], field), '[^\\n]+') do
      table.insert(entries, entry)
    end
    for i = #entries, 1, -1 do redis.call('LPUSH', ARGV[1] .. 'tasks:' .. host, entries[i]) end
    redis.call('HDEL', KEYS[1], field)
    count = count + 1
  end
end
return count
"""
# A heartbeat: this member is alive (Redis time), silent ones are dropped;
# the members. KEYS: odin:members; ARGV: member id, seconds of silence allowed.
_HEARTBEAT_SCRIPT = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
redis.call('ZADD', KEYS[1], t, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t - tonumber(ARGV[2]))
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


def import_redis() -> Any:
    """redis-py's asyncio client, imported only in cluster mode; ConfigError if missing."""
    try:
        import redis.asyncio as redis_asyncio
    except ImportError as err:
        raise ConfigError('cluster needs redis-py; install it with: pip install "redis>=4.2" '
                          '(or pip install "odin-gateway[cluster]")') from err
    return redis_asyncio


def _aclose(client: Any) -> Any:
    """close() of a redis-py client or pubsub (aclose() from redis-py 5.0.1 on)."""
    return client.aclose() if hasattr(client, "aclose") else client.close()


def _script_in(pipe: Any, script: Any, keys: List[str], args: List[Any]) -> None:
    """Add a call of a registered script to a pipeline."""
    pipe.eval(script.script, len(keys), *keys, *args)  # EVAL: no round trip to load it


class _Unreachable(Exception):
    """Redis did not answer within cluster_timeout (or refused the connection)."""


class TakenAnswer(Response):
    """An answer carrying tasks taken from Redis: settle(sent) is called once it is
    written (sent) or cannot be (its connection is gone), so that the link confirms
    the take or hands the tasks back."""

    __slots__ = ("settle",)

    def __init__(self, response: Response, settle: Callable[[bool], None]):
        super().__init__(response.status, response.body, response.headers, response.content_type)
        self.settle = settle


class ClusterLink:
    """A gateway's link to the cluster: its replica in, its changes out, through Redis.

    up: Redis answers and the shared state is loaded, so the handlers hand
    it ClusterSteps; loaded: the state was loaded once (then /ready may say
    ready). Every call has the deadline cluster_timeout; a failure makes the
    link down until the heartbeat reaches Redis again and resyncs.
    """

    def __init__(self, gateway: Gateway, redis_asyncio: Any = None):
        self.gateway = gateway
        redis_asyncio = redis_asyncio or import_redis()
        import redis.exceptions as redis_errors

        config = gateway.config
        self.member = "%s-%d-%s" % (socket.gethostname(), os.getpid(), os.urandom(3).hex())
        self.redis = redis_asyncio.Redis.from_url(
            config.cluster, socket_timeout=config.cluster_timeout,
            socket_connect_timeout=config.cluster_timeout, retry_on_timeout=False)
        # Events wait on their connection as long as it takes: no read timeout
        # (the heartbeat notices a Redis that stopped answering).
        self._events_redis = redis_asyncio.Redis.from_url(
            config.cluster, socket_connect_timeout=config.cluster_timeout)
        self._errors = (redis_errors.RedisError, OSError, asyncio.TimeoutError)
        self._timeouts = (redis_errors.TimeoutError, asyncio.TimeoutError)
        self._claim = self.redis.register_script(_CLAIM_SCRIPT)
        self._queue = self.redis.register_script(_TASK_SCRIPT)
        self._heartbeat = self.redis.register_script(_HEARTBEAT_SCRIPT)
        self._take = self.redis.register_script(_TAKE_SCRIPT)
        self._give_back = self.redis.register_script(_GIVE_BACK_SCRIPT)
        self._sweep = self.redis.register_script(_SWEEP_SCRIPT)
        self.up = False
        self.loaded = False
        self.members: List[str] = []
        self.changed = asyncio.Event()  # set whenever up, loaded or members change (tests await it)
        self._placed: List[Tuple[str, str, int]] = []  # (hostname, customer, new room) to share
        self._drains: List[Tuple[str, bool]] = []  # (hostname, draining) to share
        # customer -> [the lock of its Connects' turn here, Connects holding or awaiting it]
        self._serials: Dict[str, list] = {}
        self._sending = asyncio.Lock()  # one batch of placements at a time
        self._task_count = 0
        self._report_count = 0
        self._slow_beats = 0  # heartbeats in a row that got no answer in time
        # Takes of reports' tasks (fields of odin:taken) -> (hostname, whether the
        # answer was sent; None until it is written or known unsent).
        self._takes: Dict[str, Tuple[str, Optional[bool]]] = {}
        # Tasks this gateway queued in Redis, until delivered: id -> (hostname, task, since).
        self._undelivered: Dict[str, Tuple[str, dict, float]] = {}
        self._delivered: List[str] = []  # ids of tasks delivered here, to tell the others
        # Ids of the tasks delivered here lately (-> hostname), told to a Redis that
        # restarted (_restore_delivered); the requeue waits until then (_requeue_at).
        self._recent: Dict[str, str] = {}
        self._requeue_at: Optional[float] = None
        # Tasks whose call timed out while the link stayed up: id -> (hostname, task),
        # kept in the grid (Grid.held), so that a state file keeps them too.
        self._unsure = gateway.grid.held
        # With a state file: a future done once what the grid journaled is on disk.
        self.state_written: Optional[Callable[[], "asyncio.Future[None]"]] = None
        self._redis_run: Optional[str] = None  # Redis's run_id: it changes when Redis restarts
        self._pongs: Dict[str, "asyncio.Future[None]"] = {}  # barrier token -> its arrival
        self._wake = asyncio.Event()
        self._pubsub: Any = None
        self._reader: Optional[asyncio.Task] = None
        self._loops: List[asyncio.Task] = []
        self._stopping = False
        self._settling: Optional[asyncio.TimerHandle] = None
        gateway.grid.on_placed = self._on_placed
        gateway.grid.placing_alone = True  # until the state is loaded

    def key(self, *parts: str) -> str:
        return CLUSTER_PREFIX + ":".join(parts)

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        self._loops = [asyncio.ensure_future(self._heartbeat_loop()),
                       asyncio.ensure_future(self._publisher_loop())]

    async def stop(self) -> None:
        # redis-py may turn a cancellation into a connection error, which the
        # loops survive; the flag ends them for good.
        self._stopping = True
        self._wake.set()
        tasks = self._loops + ([self._reader] if self._reader else [])
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=2 * self.gateway.config.cluster_timeout)
        if self.up:
            with contextlib.suppress(_Unreachable):
                await self._call(self.redis.zrem(self.key("members"), self.member))
        await self._close_pubsub()
        for client in (self.redis, self._events_redis):
            with contextlib.suppress(*self._errors):
                await asyncio.wait_for(_aclose(client), self.gateway.config.cluster_timeout)
        self.gateway.grid.on_placed = None
        self._place_alone(False)

    async def _call(self, awaitable: Any, *, heartbeat: bool = False) -> Any:
        """Await one Redis call under the deadline; _Unreachable if it fails. A lost
        connection takes the link down at once; a slow answer only when two heartbeats
        in a row are slow too (one slow call, or beat, under load must not cost a resync,
        nor send the gateways placing rooms each its own way)."""
        try:
            answer = await asyncio.wait_for(awaitable, self.gateway.config.cluster_timeout)
        except self._errors as err:
            slow = isinstance(err, self._timeouts)
            if heartbeat and slow:
                self._slow_beats += 1
            if not slow or self._slow_beats >= 2:
                self._down(err)
            raise _Unreachable(str(err)) from err
        if heartbeat:
            self._slow_beats = 0
        return answer

    def _down(self, err: BaseException) -> None:
        if self.up:
            self.up = False
            self._place_alone(True)
            self.gateway.event("cluster_down", reason="%s: %s" % (type(err).__name__, err))
            self.changed.set()
            if self._reader is not None:
                self._reader.cancel()
                self._reader = None

    # -- the heartbeat: membership, and Redis coming back ---------------------

    async def _heartbeat_loop(self) -> None:
        while not self._stopping:
            try:
                await self.beat()
            except _Unreachable:
                pass
            except Exception:  # keep beating: a bug here must not cut the gateway off
                log.error("cluster heartbeat failed:\n%s", traceback.format_exc())
            await asyncio.sleep(self.gateway.config.cluster_heartbeat)

    async def beat(self) -> None:
        """One heartbeat: membership; a resync if Redis is back, else the held tasks pushed."""
        members = await self._call(self._heartbeat(
            keys=[self.key("members")],
            args=[self.member, 3 * self.gateway.config.cluster_heartbeat]), heartbeat=True)
        members = sorted(m.decode() if isinstance(m, bytes) else m for m in members)
        if members != self.members:
            if self.members:  # not this gateway's first view of the cluster
                for member in sorted(set(self.members) - set(members) - {self.member}):
                    self.gateway.event("cluster_member_left", member=member, members=len(members),
                                       silence=3 * self.gateway.config.cluster_heartbeat)
                for member in sorted(set(members) - set(self.members) - {self.member}):
                    self.gateway.event("cluster_member_joined", member=member, members=len(members))
            self.members = members
            self.changed.set()
        if not self.up:
            await self._resync()
        else:
            await self._settle_takes()
            await self._push_held_tasks()
            await self._call(self._sweep(keys=[self.key("taken"), self.key("members")],
                                         args=[CLUSTER_PREFIX]))

    async def _resync(self) -> None:
        """Subscribe, flush what was held while Redis was down, load the shared state."""
        # Pooled connections to a Redis that went away are broken: each would take
        # the link down again at its first use after the resync.
        await self._call(self.redis.connection_pool.disconnect())
        await self._close_pubsub()
        self._pubsub = self._events_redis.pubsub(ignore_subscribe_messages=True)
        await self._call(self._pubsub.subscribe(self.key("events")))
        await self._flush_held()
        await self._load()
        self._reader = asyncio.ensure_future(self._read_events(self._pubsub))
        first = not self.loaded
        self.up = self.loaded = True
        self.changed.set()
        if first:
            self._place_alone(False)
        else:  # until the other gateways have seen Redis back too (a heartbeat each)
            self._settling = asyncio.get_running_loop().call_later(
                2 * self.gateway.config.cluster_heartbeat, self._place_alone, False)
        grid = self.gateway.grid
        if first and grid.servers and self.gateway.warm_until:
            # The cluster's state is this gateway's state: no blind interval to wait out.
            self.gateway.end_warmup()
        self.gateway.event("cluster_up", how="joined" if first else "resynced",
                           servers=len(grid.servers), rooms=len(grid.rooms), members=len(self.members))

    def _place_alone(self, alone: bool) -> None:
        """Whether new rooms are placed by their hash (Grid.placing_alone), silent servers
        kept and limits shared (Grid.gateways_alone): while Redis is down, and two
        heartbeats after it is back, when the others may not have written back yet."""
        if self._settling is not None:
            self._settling.cancel()
            self._settling = None
        self.gateway.grid.placing_alone = alone
        if not alone:
            self.gateway.grid.gateways_alone = 1
        elif not self.up:  # every member may be placing rooms, and taking reports, unseen
            self.gateway.grid.gateways_alone = max(1, len(self.members))

    async def _close_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(*self._errors):
                await asyncio.wait_for(_aclose(pubsub), self.gateway.config.cluster_timeout)

    async def _flush_held(self) -> None:
        """Send to Redis what this replica knows and Redis does not (Redis restarted
        empty, or this gateway served alone meanwhile): newer server records, room
        claims nobody else made, and the admin tasks held here."""
        grid, config = self.gateway.grid, self.gateway.config
        await self._settle_takes()
        stored = await self._call(self.redis.hgetall(self.key("servers")))
        pipe = self.redis.pipeline(transaction=False)
        for hostname, server in grid.servers.items():
            raw = stored.get(hostname.encode())
            if raw is None or load_json(raw)["last_seen"] < server.last_seen:
                record = self._server_record(server)
                pipe.hset(self.key("servers"), hostname, _compact_json(record))
                pipe.hset(self.key("seen"), hostname, repr(server.last_seen))
                pipe.publish(self.key("events"), self._event("report", record=record))
        ttl = int(config.login_token_lifetime)
        for digest, room in grid.rooms.items():
            if room.server in grid.servers:
                pipe.set(self.key("room", digest), _compact_json(room_record(digest, room)), nx=True,
                         ex=ttl)
        await self._call(pipe.execute())
        run = (await self._call(self.redis.info("server")))["run_id"]
        if self._redis_run is not None and run != self._redis_run:
            # A new Redis: what it lost is queued again, once every gateway had a
            # heartbeat's time to say which tasks it delivered (so those are not).
            await self._restore_delivered()
            self._requeue_at = self.gateway.clock() + 2 * config.cluster_heartbeat
        self._redis_run = run
        await self._push_held_tasks()

    async def _push_held_tasks(self) -> None:
        """Move the admin tasks held here (accepted while Redis did not answer) to Redis,
        where any gateway can deliver them, in one round trip. Each gets its id and leaves
        the local queue before it is sent, so that a report answered here cannot deliver
        it too; a task whose call failed (it may have reached Redis) goes again under its
        id: queued once, whether or not the first ran. A task Redis finds no room for
        stays held here."""
        waiting = self._requeue_at is not None and self.gateway.clock() < self._requeue_at
        if self._requeue_at is not None and not waiting:
            self._requeue_at = None
            await self._requeue_lost_tasks()
        grid = self.gateway.grid
        fresh = {}  # never sent: these need not wait for _requeue_at
        for server in grid.servers.values():
            if server.tasks:  # no longer queued here (journaled as delivered): held under ids
                grid._note(["sent", server.hostname, len(server.tasks)])
            for task in server.tasks:
                task_id = self._new_task_id()
                fresh[task_id] = (server.hostname, task)
                grid.hold_task(task_id, server.hostname, task)
            server.tasks.clear()
        if fresh and self.state_written is not None:  # on disk under their ids before sent
            await self.state_written()
        pushing = list((fresh if waiting else self._unsure).items())
        if not pushing:
            return
        outcomes = await self._push_tasks([(host, task_id, task) for task_id, (host, task) in pushing])
        for (task_id, (hostname, task)), outcome in zip(pushing, outcomes):
            grid.stored_task(task_id)
            held = grid.servers.get(hostname)
            if outcome == "full" and held is not None:
                held.tasks.append(task)
                grid._note(["task", hostname, task])
        if "full" in outcomes:
            log.warning("cluster: task queues full in Redis; %d held tasks stay here",
                        outcomes.count("full"))

    async def _load(self) -> None:
        """Apply the shared state to the replica: servers, drains, future usage, rooms."""
        gateway, grid, config = self.gateway, self.gateway.grid, self.gateway.config
        now = gateway.clock()
        records = await self._call(self.redis.hgetall(self.key("servers")))
        drained = await self._call(self.redis.hgetall(self.key("drained")))
        for raw in records.values():
            record = load_json(raw)
            hostname = record["hostname"]
            if now - record["last_seen"] >= config.remove_timeout:
                await self._call(self.redis.hdel(self.key("servers"), hostname))
                continue
            self._apply_report(record)
        for hostname, flag in drained.items():
            server = grid.servers.get(hostname.decode())
            if server is not None:
                server.draining = flag == b"1"
        for hostname in list(grid.servers):
            placed = await self._call(self.redis.hgetall(self.key("placed", hostname)))
            usage: Dict[str, List[int]] = {}
            for field, count in placed.items():
                kind, customer = field.decode().split(":", 1)
                usage.setdefault(customer, [0, 0])[0 if kind == "p" else 1] = int(count)
            grid.set_pending(hostname, usage)
        cursor = 0
        while True:
            cursor, keys = await self._call(self.redis.scan(
                cursor, match=self.key("room", "*"), count=CLUSTER_LOAD_BATCH))
            if keys:
                values = await self._call(self.redis.mget(keys))
                for key, raw in zip(keys, values):
                    if raw is not None:
                        grid.adopt_room(load_json(raw), now)
            if not cursor:
                break

    def _apply_report(self, record: dict) -> None:
        """A server record taken by another gateway (or loaded), applied to the replica."""
        grid = self.gateway.grid
        hostname = record["hostname"]
        known = grid.servers.get(hostname)
        if known is not None and known.last_seen > record["last_seen"]:
            return  # this replica has a newer report already
        server = grid.report(hostname, record["version"], record["report"],
                             record["last_seen"], replica=True)
        if known is None:
            server.first_seen = record["first_seen"]

    # -- events from the other gateways ---------------------------------------

    async def _read_events(self, pubsub: Any) -> None:
        own = ('{"from":%s,' % _compact_json(self.member)).encode()  # how _event() starts
        try:
            async for message in pubsub.listen():
                if message.get("type") == "pong":  # a barrier (see _perform_barrier)
                    data = message.get("data")
                    arrived = self._pongs.get(data.decode() if isinstance(data, bytes) else data)
                    if arrived is not None and not arrived.done():
                        arrived.set_result(None)
                    continue
                if message.get("type") != "message" or message["data"].startswith(own):
                    continue  # this gateway's own events come back too
                try:
                    self._apply_event(load_json(message["data"]))
                except Exception:  # one bad event must not stop the others
                    log.error("cluster: cannot apply an event:\n%s", traceback.format_exc())
        except self._errors as err:
            self._down(err)

    def _apply_event(self, event: dict) -> None:
        """Another gateway's event (_read_events skips this one's own before parsing)."""
        grid, kind = self.gateway.grid, event.get("type")
        if kind == "report":
            self._apply_report(event["record"])
        elif kind == "claim":
            grid.adopt_room(event["room"], self.gateway.clock())
        elif kind == "placed":
            for hostname, customer, peers, rooms in event["items"]:
                grid.add_pending(hostname, customer, peers, rooms)
        elif kind == "drain":
            server = grid.servers.get(event["hostname"])
            if server is not None:
                server.draining = event["draining"]
        elif kind == "delivered":
            for task_id in event["ids"]:
                self._undelivered.pop(task_id, None)

    def _event(self, kind: str, **values: Any) -> str:
        return _compact_json(dict({"from": self.member, "type": kind}, **values))

    # -- future usage: placements since the last report, shared in batches ----

    def _on_placed(self, hostname: str, customer: str, new_room: int) -> None:
        if self.up:
            self._placed.append((hostname, customer, new_room))
            self._wake.set()

    async def _publisher_loop(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            # Gather a few milliseconds of placements into one batch: under load a
            # batch per loop iteration would cost more than the Connects themselves.
            # (Customers with limits do not wait for it: see _settle.)
            await asyncio.sleep(CLUSTER_BATCH_DELAY)
            self._wake.clear()
            if self._stopping:
                break
            with contextlib.suppress(_Unreachable):  # estimates only: the next report corrects them
                await self._send_placed()

    async def _send_placed(self) -> None:
        """Share the placements and drains made here since the last batch (after the batch
        being sent, if any: a caller knows its placements are in Redis when this returns)."""
        async with self._sending:
            if self._placed or self._drains or self._delivered:
                await self._send_batch()

    async def _send_batch(self) -> None:
        ttl = int(self.gateway.config.login_token_lifetime)
        placed, self._placed = self._placed, []
        drains, self._drains = self._drains, []
        delivered, self._delivered = self._delivered, []
        totals: Dict[Tuple[str, str], List[int]] = {}
        for hostname, customer, new_room in placed:
            counts = totals.setdefault((hostname, customer), [0, 0])
            counts[0] += 1
            counts[1] += new_room
        pipe = self.redis.pipeline(transaction=False)
        for (hostname, customer), (peers, rooms) in totals.items():
            key = self.key("placed", hostname)
            pipe.hincrby(key, "p:" + customer, peers)
            if rooms:
                pipe.hincrby(key, "r:" + customer, rooms)
            pipe.expire(key, ttl)
        if totals:
            pipe.publish(self.key("events"), self._event("placed", items=[
                [hostname, customer, peers, rooms]
                for (hostname, customer), (peers, rooms) in totals.items()]))
        for hostname, draining in drains:
            if draining:
                pipe.hset(self.key("drained"), hostname, "1")
            else:
                pipe.hdel(self.key("drained"), hostname)
            pipe.publish(self.key("events"), self._event(
                "drain", hostname=hostname, draining=draining))
        if delivered:
            pipe.publish(self.key("events"), self._event("delivered", ids=delivered))
        try:
            await self._call(pipe.execute())
        except _Unreachable:
            # The others must hear of them: in the next batch. Placements that reached
            # Redis anyway (a slow answer) then count twice until their server's next
            # report: a limit refuses early rather than late.
            self._placed[:0] = placed
            self._drains[:0] = drains
            self._delivered[:0] = delivered
            raise

    # -- steps: what must be in Redis before an answer ------------------------

    def report_step(self, server: Server, gone: set, answered: bool) -> Optional[ClusterStep]:
        """The step that shares a report just applied here (and takes its server's tasks
        from Redis when the report gets an answer); None while Redis is down (held)."""
        if not self.up:
            return None  # held: written when Redis is back (_flush_held)
        grid = self.gateway.grid

        def finish(taken: Optional[Tuple[str, List[dict]]]) -> dict:
            if not answered:
                return {"tasks": []}
            tasks = grid.take_tasks(server)
            if taken is not None:
                tasks += taken[1]
            return {"tasks": tasks}

        return ClusterStep("report", (server, gone, answered), finish)

    @staticmethod
    def _server_record(server: Server) -> dict:
        return {"hostname": server.hostname, "version": server.version,
                "report": server.report_json(), "first_seen": server.first_seen,
                "last_seen": server.last_seen}

    def _store_report(self, server: Server, gone: set, take: Optional[str]) -> Any:
        """A transaction that stores a server's report, refreshes its rooms' claims,
        clears its future usage and (take: a field of odin:taken) takes its queued tasks."""
        grid, config = self.gateway.grid, self.gateway.config
        hostname = server.hostname
        record = self._server_record(server)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.key("servers"), hostname, _compact_json(record))
        pipe.hset(self.key("seen"), hostname, repr(server.last_seen))
        pipe.delete(self.key("placed", hostname))
        ttl = int(config.login_token_lifetime)
        for digest in server.room_hashes:
            room = grid.rooms.get(digest)
            if room is not None and room.server == hostname:
                pipe.set(self.key("room", digest), _compact_json(room_record(digest, room)), ex=ttl)
        for digest in gone:
            pipe.delete(self.key("room", digest))
        pipe.publish(self.key("events"), self._event("report", record=record))
        if take is not None:
            _script_in(pipe, self._take, self._take_keys(take), [take])
        return pipe

    def _take_keys(self, field: str) -> List[str]:
        report_id, hostname = field.split("\n", 1)
        return [self.key("tasks", hostname), self.key("taken"), self.key("cancelled", report_id)]

    async def complete(self, pending: PendingAnswers) -> Response:
        """Do the answers' steps (together, each under the deadline) and finish them."""
        steps = [answer["result"] for answer in pending.answers
                 if isinstance(answer.get("result"), ClusterStep)]
        takes: List[str] = []  # the reports' takes, settled once the answer is written
        try:
            results = await asyncio.gather(*(self._settle(step, takes) for step in steps),
                                           return_exceptions=True)
            response = self.gateway.finish_steps(pending, list(results))
        except BaseException:  # no answer will carry the tasks taken: handed back
            if takes:
                self._answered(takes, False)
            raise
        if not takes:
            return response
        return TakenAnswer(response, functools.partial(self._answered, takes))

    def _answered(self, takes: List[str], sent: bool) -> None:
        """The answer with these takes' tasks was written (sent) or not: confirm them
        in Redis, or hand them back (now, or at the next heartbeat if this fails)."""
        for field in takes:
            self._takes[field] = (self._takes[field][0], sent)
        asyncio.ensure_future(self._settle_takes())

    async def _settle_takes(self) -> None:
        """Confirm the takes whose answers were written; hand the others back."""
        fields = [field for field, (_host, sent) in self._takes.items() if sent is not None]
        if not fields or not self.up:
            return
        pipe = self.redis.pipeline(transaction=False)
        for field in fields:
            hostname, sent = self._takes[field]
            if sent:
                pipe.hdel(self.key("taken"), field)
            else:
                _script_in(pipe, self._give_back, self._take_keys(field),
                           [field, int(self.gateway.config.remove_timeout)])
        with contextlib.suppress(_Unreachable):
            await self._call(pipe.execute())
            for field in fields:
                self._takes.pop(field, None)

    async def _settle(self, step: ClusterStep, takes: List[str]) -> Any:
        """Perform a step and finish it, and the steps its finish returns; a serial
        step holds its lock until its placements are published. (takes: where a
        report's take of tasks is noted.)"""
        lock = turn = None
        if step.serial is not None:
            # The lock is dropped when no Connect holds or awaits it: a released lock
            # reads unlocked before its next waiter runs, so locked() cannot tell.
            turn = self._serials.get(step.serial)
            if turn is None:
                turn = self._serials[step.serial] = [asyncio.Lock(), 0]
            lock = turn[0]
            turn[1] += 1
            try:
                await lock.acquire()
            except BaseException:
                self._leave_turn(step.serial, turn)
                raise
        try:
            result: Any = step
            while isinstance(result, ClusterStep):
                if result.operation == "report":
                    result = result.finish(await self._perform_report(*result.args, takes))
                else:
                    result = result.finish(await self._perform(result))
            if lock is not None:
                with contextlib.suppress(_Unreachable):  # then the others learn it at the next report
                    await self._send_placed()
            return result
        finally:
            if lock is not None:
                lock.release()
                self._leave_turn(step.serial, turn)  # type: ignore[arg-type]

    def _leave_turn(self, serial: str, turn: list) -> None:
        turn[1] -= 1
        if turn[1] == 0 and self._serials.get(serial) is turn:
            del self._serials[serial]

    async def _perform_barrier(self) -> bool:
        """Return (True) once every event published before this call has been applied here:
        a PING on the events connection comes back after them."""
        if not self.up or self._pubsub is None:
            raise _Unreachable("down")
        token = os.urandom(8).hex()
        arrived = asyncio.get_running_loop().create_future()
        self._pongs[token] = arrived
        try:
            await self._call(self._pubsub.ping(token))
            await self._call(asyncio.shield(arrived))
        finally:
            self._pongs.pop(token, None)
        return True

    async def _perform(self, step: ClusterStep) -> Any:
        """A step's outcome; None if Redis could not be reached in time (then held here)."""
        try:
            return await getattr(self, "_perform_" + step.operation)(*step.args)
        except _Unreachable:
            return None

    async def _perform_claim(self, digest: str, record: dict) -> dict:
        gateway, config = self.gateway, self.gateway.config
        if not self.up:
            raise _Unreachable("down")
        now = gateway.clock()
        raw = await self._call(self._claim(  # if it fails: placed here, claimed when Redis is back
            keys=[self.key("room", digest), self.key("seen"), self.key("events")],
            args=[_compact_json(record), repr(now - config.disable_timeout),
                  int(config.login_token_lifetime), self._event("claim", room=record)]))
        claimed = load_json(raw)
        server = record_room(claimed)[1].server
        if claimed == record:  # ours: Connect maps it, and counts it as a new room
            return {"won": True, "server": server}
        grid = gateway.grid
        if server not in grid.servers:  # its report has not reached us yet
            found = await self._call(self.redis.hget(self.key("servers"), server))
            if found is not None:
                self._apply_report(load_json(found))
        grid.adopt_room(claimed, gateway.clock(), force=True)
        return {"won": False, "server": server}

    async def _perform_task(self, hostname: str, task: dict, call_id: Optional[str]) -> Optional[str]:
        if not self.up:
            raise _Unreachable("down")
        task_id = call_id or self._new_task_id()
        try:
            return await self._push_task(hostname, task_id, task)
        except _Unreachable:
            # Redis may have run the call (slow, or the connection broke after it was
            # sent): sent again under the same id once Redis answers (queued once),
            # never delivered from here.
            self.gateway.grid.hold_task(task_id, hostname, task, acknowledged=True)
            return "queued"

    def _new_task_id(self) -> str:
        self._task_count += 1
        return "%s:%d" % (self.member, self._task_count)

    async def _push_task(self, hostname: str, task_id: str, task: dict) -> str:
        return (await self._push_tasks([(hostname, task_id, task)]))[0]

    async def _push_tasks(self, items: List[Tuple[str, str, dict]]) -> List[str]:
        """Queue tasks (hostname, id, task) in Redis in one round trip: each "queued"
        (now, or before under its id) or "full". Kept here too until a gateway says it
        delivered it, so a Redis that restarts empty gets it again."""
        config = self.gateway.config
        pipe = self.redis.pipeline(transaction=False)
        for hostname, task_id, task in items:
            _script_in(pipe, self._queue, [self.key("tasks", hostname), self.key("taskids", hostname)],
                       [_compact_json({"id": task_id, "task": task}), config.max_queued_tasks,
                        int(config.remove_timeout), task_id])
        results = await self._call(pipe.execute())
        now = self.gateway.clock()
        for (hostname, task_id, task), queued in zip(items, results):
            if queued == 1:  # (2: a report took it already: nothing to keep)
                self._undelivered[task_id] = (hostname, task, now)
        return ["queued" if queued else "full" for queued in results]

    async def _restore_delivered(self) -> None:
        """Tell a new Redis the ids of the tasks delivered here lately, so that the gateway
        that accepted one does not queue it again (the task script skips known ids)."""
        by_host: Dict[str, List[str]] = {}
        for task_id, hostname in self._recent.items():
            by_host.setdefault(hostname, []).append(task_id)
        if not by_host:
            return
        pipe = self.redis.pipeline(transaction=False)
        for hostname, ids in by_host.items():
            pipe.zadd(self.key("taskids", hostname), dict.fromkeys(ids, int(self.gateway.clock())))
            pipe.expire(self.key("taskids", hostname), int(self.gateway.config.remove_timeout))
        await self._call(pipe.execute())

    async def _requeue_lost_tasks(self) -> None:
        """After Redis restarted: queue again the tasks accepted here that it lost."""
        config, now = self.gateway.config, self.gateway.clock()
        for task_id, (_host, _task, since) in list(self._undelivered.items()):
            if now - since >= config.remove_timeout:  # its server is forgotten by now
                del self._undelivered[task_id]
        hosts = sorted({host for host, _task, _since in self._undelivered.values()})
        if not hosts:
            return
        pipe = self.redis.pipeline(transaction=False)
        for hostname in hosts:
            pipe.lrange(self.key("tasks", hostname), 0, -1)
        present = {load_json(raw)["id"] for entries in await self._call(pipe.execute())
                   for raw in entries}
        lost = [(host, task_id, task) for task_id, (host, task, _since) in self._undelivered.items()
                if task_id not in present]
        if lost:
            await self._push_tasks(lost)

    async def _perform_report(self, server: Server, gone: set, answered: bool,
                              takes: List[str]) -> Optional[Tuple[str, List[dict]]]:
        """The report stored in Redis, and (answered) the tasks it took, kept in
        odin:taken until the answer is written; None if Redis did not answer in time
        (then a take that may still run is handed back)."""
        if not self.up:
            return None
        take = None
        if answered:
            self._report_count += 1
            take = "%s|%d\n%s" % (self.member, self._report_count, server.hostname)
        try:
            results = await self._call(self._store_report(server, gone, take).execute())
        except _Unreachable:
            if take is not None:  # the take may still run: hand it back, not on this request's time
                self._takes[take] = (server.hostname, False)
                asyncio.ensure_future(self._settle_takes())
            return None
        if take is None:
            return None
        entries = [load_json(raw) for raw in results[-1]]
        if entries:
            self._takes[take] = (server.hostname, None)  # settled once the answer is written
            takes.append(take)
            # Delivered: the gateways that accepted them may forget them.
            for entry in entries:
                self._undelivered.pop(entry["id"], None)
                self._recent[entry["id"]] = server.hostname
            while len(self._recent) > CLUSTER_RECENT_DELIVERIES:
                del self._recent[next(iter(self._recent))]
            self._delivered.extend(entry["id"] for entry in entries)
            self._wake.set()
        return take, [entry["task"] for entry in entries]

    def drained(self, hostname: str, draining: bool) -> None:
        """An operator drained (or undrained) a server here: tell the others."""
        if self.up:
            self._drains.append((hostname, draining))
            self._wake.set()


# ---------------------------------------------------------------------------
# The server: listeners, connections and their deadlines, refusals, the stop
# ---------------------------------------------------------------------------
# GatewayServer owns the whole asyncio side, in the shape uvicorn uses:
# start() binds and starts the timers, serve() runs until asked to stop,
# stop() is the stop sequence. Each Connection is an asyncio protocol around
# one HttpFraming, with one deadline at a time, named for what it bounds.
# Gateway.serve(), serve_in_thread() and the command line are thin wrappers.

#: Seconds between summary log lines of refused connections and accept errors
#: (one line per refusal filled the log during floods).
SUMMARY_INTERVAL = 10.0
#: File descriptors kept free beside max_connections: listeners, the log,
#: config reloads, update functions, and refusals being answered.
SPARE_FILES = 64
#: Connections answered 503 at the same time; beyond, they are closed at once
#: (each holds a file while its answer lingers).
MAX_LINGERING_REFUSALS = 32


def raise_open_file_limit(wanted: int) -> Tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards wanted (the hard limit at most);
    (soft, hard) afterwards. (A common default of 1,024 is below max_connections.)"""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return wanted, wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
    return soft, hard


def _open_files() -> int:
    """Files this process has open (Linux /proc), or a guess elsewhere."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 32


def kernel_somaxconn() -> Optional[int]:
    """The kernel's cap on listen backlogs (Linux), or None where unknown."""
    try:
        with open("/proc/sys/net/core/somaxconn") as value:
            return int(value.read())
    except (OSError, ValueError):
        return None


def create_listeners(host: str, port: int, backlog: int, *, reuse_port: bool = False) -> List[Any]:
    """Bound, listening TCP sockets for every address host resolves to (as
    asyncio.start_server binds). reuse_port sets SO_REUSEPORT, so that several
    processes can share one port."""
    infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                               0, socket.AI_PASSIVE)
    sockets: List[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _name, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            if port:  # port 0: the other addresses take the port the first one got
                address = (address[0], port) + tuple(address[2:])
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
            port = sock.getsockname()[1]
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Turns:
    """Requests that take turns, one per loop iteration or two: a flood of
    them (ten clients reading every page of Info, back to back) cannot hold
    up the Connects that arrive meanwhile, since the loop reads its sockets
    and serves them between two turns."""

    def __init__(self) -> None:
        self._busy = False
        self._waiting: "collections.deque[asyncio.Future[None]]" = collections.deque()

    async def take(self) -> None:
        if not self._busy:
            self._busy = True
            return
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # the turn came as the task was cancelled: pass it on
            else:
                self._waiting.remove(future)
            raise

    def release(self) -> None:
        """The turn passes on after one more round of socket reads (to a request
        waiting for it, or to the first that asks), never within this round."""
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.call_soon, self._hand_on)

    def _hand_on(self) -> None:
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_result(None)
                return
        self._busy = False


class StateFlush:
    """Writes a gateway's saved state after each loop iteration that changed
    it: one write and one fsync for all the requests of that iteration, in a
    worker thread (a disk can take its time; the loop serves meanwhile), one
    write at a time. Answers that must wait for the disk await soon()."""

    def __init__(self, saved: SavedState) -> None:
        self.saved = saved
        self._next: Optional[asyncio.Future[None]] = None  # the write that takes what is pending
        self._writing: Optional[asyncio.Future[None]] = None  # the write in progress

    def soon(self) -> "asyncio.Future[None]":
        """A future done once what is pending now is on disk (or failed to get there)."""
        if self._next is None:
            loop = asyncio.get_running_loop()
            self._next = loop.create_future()
            if self._writing is None:
                loop.call_soon(self._start)
        return self._next

    def _start(self) -> None:
        done, self._next = self._next, None
        records, snapshot = self.saved.take()
        self._writing = asyncio.get_running_loop().run_in_executor(
            None, self.saved.write, records, snapshot)
        self._writing.add_done_callback(functools.partial(self._written, done))

    def _written(self, done: "asyncio.Future[None]", writing: "asyncio.Future[None]") -> None:
        self._writing = None
        if not writing.cancelled() and writing.exception() is not None:
            _state_write_failed(self.saved, writing.exception())  # type: ignore[arg-type]
        if not done.done():
            done.set_result(None)
        if self._next is not None:
            self._start()

    async def drain(self) -> None:
        """Until the writes in progress and due are done (at a stop)."""
        while self._next is not None or self._writing is not None:
            await asyncio.wait([f for f in (self._next, self._writing) if f is not None])


def _state_write_failed(saved: SavedState, err: BaseException) -> None:
    log.error("state_file %s cannot be written: %s; the whole state is written again with the "
              "next change", saved.file.path, getattr(err, "strerror", None) or err,
              extra=fields("state_write_failed", path=saved.file.path, reason=str(err)))


def flush_state(saved: SavedState) -> None:
    """saved.flush() in this thread, logging (not raising) a failure."""
    try:
        saved.flush()
    except OSError as err:
        _state_write_failed(saved, err)


class Wakeup:
    """Any number of coroutines waiting for one signal (the gateway's on_change)."""

    def __init__(self) -> None:
        self._future: Optional[asyncio.Future[None]] = None

    def fire(self) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_result(None)
        self._future = None

    async def wait(self, seconds: float) -> None:
        """Until the next fire(), or seconds at most."""
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._future), seconds)


#: Request bodies above this size are handled with the garbage collector
#: paused. Parsing a big report makes tens of thousands of dicts and lists;
#: the collector would run every 700 of them, each time walking all the
#: young ones, though reference counting frees them all when the request
#: ends. Measured: 44 ms for a 10,000-room report with, 23 ms without.
GC_PAUSE_BYTES = 64 * 1024


#: The collector's thresholds in the gateway's process (CPython's default is
#: 700, 10, 10). Each request makes and frees a few hundred containers, and
#: the grid's objects are long-lived: rarer young collections cost the same
#: in total, and full collections, which walk every room, come far less often.
GC_THRESHOLDS = (20_000, 20, 100)
#: Rooms the grid may gain before its objects are frozen again (see tune_collector).
GC_FREEZE_ROOMS = 10_000


def tune_collector() -> None:
    """Set the garbage collector up for a long-lived gateway process (the
    command does this; an embedding program decides for itself): the
    objects of the start-up are frozen, out of every collection's way."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _lists_grid(target: str, body: bytes) -> bool:
    """Whether a request calls Info, the one call whose answer grows with the
    grid (a cheap look at the bytes: a report naming a room "Info" just waits
    its turn too). Reports, the servers' heartbeat, never wait for a turn."""
    return target.startswith("/internal") and len(body) < GC_PAUSE_BYTES and b'"Info"' in body


def handle_request(gateway: Gateway, request: Request, remote: str, stopping: bool,
                   parsed: Any = _UNPARSED) -> Response:
    """gateway.handle_http, with the garbage collector paused for a big body.

    When the collector has been tuned (tune_collector) and the grid has
    gained GC_FREEZE_ROOMS rooms since, its objects are frozen too: full
    collections would walk them all, and they hold no reference cycles.
    """
    body = request.body
    if len(body) <= GC_PAUSE_BYTES or not gc.isenabled():
        return gateway.handle_http(request.method, request.target, request.headers, body, remote,
                                   stopping=stopping, parsed=parsed)
    gc.disable()
    try:
        return gateway.handle_http(request.method, request.target, request.headers, body, remote,
                                   stopping=stopping, parsed=parsed)
    finally:
        gc.enable()
        freeze_grown_grid(gateway.grid)


def freeze_grown_grid(grid: Grid) -> None:
    """Freeze the grid's objects if the collector was tuned (tune_collector)
    and the grid has gained GC_FREEZE_ROOMS rooms since they were last frozen."""
    rooms = len(grid.rooms)
    if gc.get_freeze_count() and rooms >= grid.frozen_rooms + GC_FREEZE_ROOMS:
        gc.collect(1)  # the young garbage of this request first: only live objects are frozen
        gc.freeze()
        grid.frozen_rooms = rooms
    grid.frozen_rooms = min(grid.frozen_rooms, rooms)


def _plain(response: Response) -> Response:
    """A Postponed answered as it is (its 503): when the gateway stops."""
    return Response(response.status, response.body, response.headers, response.content_type)



# A report's answer hands its tasks over: they have left their queue (and, in a
# cluster, are confirmed as sent once it is written), so such an answer is never
# swapped for max_unsent_bytes' 503 (its size is bounded by max_queued_tasks).
# JSON strings escape quotes, so only a result that is a task list has this.
_TASKS_HANDED_OVER = b'"result":{"tasks":[{'


class Connection(asyncio.Protocol):
    """One client connection: its HttpFraming, its answers, its one deadline.

    Requests are answered as they complete; keep-alive answers go out once
    per loop iteration (GatewayServer.flush). Large answers are written in
    pieces as the client reads them, and while an answer waits for the client
    no further request of this connection is read. Gateway.handle_http may
    answer with an awaitable instead of a Response: the connection then waits
    for it (in order, without a deadline of its own) while others are served.
    """

    __slots__ = ("server", "transport", "framing", "remote", "started", "deadline", "until",
                 "scheduled", "timer", "out", "pending", "writing_paused", "reading_paused",
                 "closing", "lingering", "discarded", "refused", "waiting", "out_bytes")

    def __init__(self, server: "GatewayServer"):
        self.server = server
        self.transport: Any = None
        self.framing: Optional[HttpFraming] = None
        self.remote = "127.0.0.1"
        self.started = 0.0  # perf_counter at the first byte of the current request
        self.deadline = ""  # what the deadline bounds (see arm)
        self.until = 0.0  # loop time it passes
        self.scheduled = 0.0
        self.timer: Optional[asyncio.TimerHandle] = None
        self.out: List[bytes] = []  # answers for this iteration's flush
        self.out_bytes = 0  # their size
        self.pending: Optional[memoryview] = None  # the unsent rest of a large answer
        self.writing_paused = False
        self.reading_paused = False
        self.closing = False  # the last answer is being sent; then close
        self.lingering = False  # that answer is out; input is discarded until EOF
        self.discarded = 0
        self.refused = False
        self.waiting = False  # for an answer handle_http gave as an awaitable

    # -- the one deadline ---------------------------------------------------

    def arm(self, deadline: str) -> None:
        """Set the connection's deadline: "first byte", "idle", "head", "body",
        "write" (the client reads no more of an answer), "linger" or "stop",
        each as long as its setting says (Config.deadline). The timer only
        moves when it must fire earlier than it is set to."""
        self.deadline = deadline
        self.until = until = self.server.loop.time() + self.server.gateway.config.deadline(deadline)
        if self.timer is None or until < self.scheduled:
            if self.timer is not None:
                self.timer.cancel()
            self.scheduled = until
            self.timer = self.server.loop.call_at(until, self._check_deadline)

    def _check_deadline(self) -> None:
        self.timer = None
        transport = self.transport
        if transport is None or self.waiting:  # the gateway's own wait has no deadline here
            return
        if self.server.loop.time() < self.until:  # moved on meanwhile
            self.scheduled = self.until
            self.timer = self.server.loop.call_at(self.until, self._check_deadline)
            return
        deadline = self.deadline
        if transport.is_closing():  # closed, but the client does not take its last bytes
            transport.abort()
            return
        if deadline in ("head", "body"):
            request = self.framing.request  # type: ignore[union-attr]  # its head, if read
            self.server.answered(self.remote, request and request.target, 408, self.started,
                                 request.method if request else "-")
            self._finish(self.framing.error(HttpError(  # type: ignore[union-attr]
                408, "request not received in time")))
        elif deadline in ("first byte", "idle"):
            self.transport.close()  # nothing was asked, so nothing is answered
        elif deadline == "linger" and not self.transport.get_write_buffer_size():
            self.transport.close()
        else:  # write, stop, or a linger with an answer nobody reads
            self.transport.abort()

    def _arm_for_phase(self) -> None:
        phase = self.framing.phase  # type: ignore[union-attr]
        if phase == "idle" or phase != self.deadline:  # head, body: once, as they begin
            self.arm(phase)

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        server = self.server
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else "127.0.0.1"
        self.started = time.perf_counter()
        config = server.gateway.config
        if server.stopping:  # accepted as the stop began; stop() waits for it to go
            server.connections.add(self)
            transport.abort()
            return
        if len(server.connections) >= server.connection_limit():
            server.refuse(self)
            return
        server.connections.add(self)
        if hasattr(transport, "max_size"):  # selector transports: bytes read at once
            transport.max_size = config.receive_size
        transport.set_write_buffer_limits(high=config.max_write_buffer)
        self.framing = HttpFraming(config, date=server.date, request_lines=server.request_lines,
                                   header_lines=server.header_lines, heads=server.heads)
        self.arm("first byte")

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self.discarded += len(data)
            if self.discarded > self.server.gateway.config.max_linger_bytes:
                self.transport.close()
            return
        framing = self.framing
        if framing is None or self.closing:
            return
        if framing.phase in ("idle", "first byte"):
            self.started = time.perf_counter()
        framing.limits = self.server.gateway.config  # a reload applies to open connections
        framing.feed(data)
        self.process()

    def eof_received(self) -> bool:
        if self.lingering or self.framing is None:
            self.transport.close()
            return True
        self.framing.feed_eof()
        if not self.closing:
            self.process()
        if not (self.closing or self.pending is not None) and self.transport is not None:
            self.flush()
            self.arm("linger")
            self.transport.close()
        return True  # closed by us, once the answers are out

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        server = self.server
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.pending is not None:
            server.unsent -= len(self.pending)
            self.pending = None
        self.out = []
        server.connections.discard(self)
        server.refusing.discard(self)
        self.transport = None
        if server.stopping:
            server.all_closed.set()  # type: ignore[union-attr]

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._pause_reading()
        self.arm("write")

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.pending is not None:
            self.arm("write")  # it reads: progress
            self._write_pending()
        elif not self.closing:
            self._unblock()

    # -- requests and answers -----------------------------------------------

    def process(self) -> None:
        """Answer the complete requests received; then wait (for data, or for the
        client to read what it was sent)."""
        framing = self.framing
        server = self.server
        while not (self.closing or self.writing_paused or self.pending is not None or self.waiting):
            event = framing.next_event()  # type: ignore[union-attr]
            if event.__class__ is Request:
                self._respond(event)
            elif event is NEED_DATA:
                self._arm_for_phase()
                return
            elif event is CONTINUE:
                self.send(CONTINUE_ANSWER)
            elif event is CLOSED:
                self.flush()
                self.arm("linger")
                self.transport.close()
                return
            else:
                server.refused_request(self.remote, event, self.started)
                self._finish(framing.error(event))  # type: ignore[union-attr]
                return

    def _respond(self, request: Request) -> None:
        server = self.server
        try:
            response = server.respond(request, self.remote)
        except Exception:  # a bug: answer, log once, keep the process serving
            response = _internal_error(request)
        if response.__class__ is not Response:  # an awaitable: the answer comes later
            self.waiting = True
            self._pause_reading()
            asyncio.ensure_future(response).add_done_callback(
                functools.partial(self._respond_later, request))
            return
        self._answer(request, response)

    def _respond_later(self, request: Request, future: "asyncio.Future[Response]") -> None:
        """An answer that was awaited (other connections were served meanwhile)."""
        self.waiting = False
        try:
            response = future.result()
        except (Exception, asyncio.CancelledError):  # a bug: answer, log once, keep serving
            response = _internal_error(request)
        settle = getattr(response, "settle", None)  # a TakenAnswer: tasks taken from Redis
        written = False
        try:  # tasks taken for an answer not written (closed, or it failed) are handed back
            if self.transport is None:
                return
            self._answer(request, response)
            written = True
        finally:
            if settle is not None:
                settle(written)
        if not (self.closing or self.writing_paused or self.pending is not None):
            self._unblock()

    def _answer(self, request: Request, response: Response) -> None:
        server = self.server
        config = server.gateway.config
        size = len(response.body)
        if (size > config.max_write_buffer and server.unsent + size > config.max_unsent_bytes
                and _TASKS_HANDED_OVER not in response.body):
            log.warning("answering %s %s with 503: %d bytes of answers wait for their clients "
                        "(max_unsent_bytes %d)", printable(request.method), printable(request.target),
                        server.unsent, config.max_unsent_bytes)
            response = Response(503, _error_body(
                INVALID_REQUEST, "too many answers wait to be read; try again later"))
        data = self.framing.answer(request, response,  # type: ignore[union-attr]
                                   stopping=server.stopping)
        if self.framing.phase == "closed":  # type: ignore[union-attr]
            self._finish(data)
        else:
            self.send(data)
        # Counted (and logged) once written: the client waits for nothing here.
        server.answered(self.remote, request.target, response.status, self.started,
                        request.method, len(response.body))

    def send(self, data: bytes) -> None:
        """Write an answer: small ones with this iteration's flush, large ones in pieces.

        Under load, the answers of one loop iteration are written together
        at its end (GatewayServer.flush), which saves a fifth of a Connect's
        CPU; when the last iteration answered one request at most, the first
        answer of an iteration goes out at once, which saves its latency. The
        answer to the only connection's only request waits for nothing: it
        goes out at once, without a flush (and its extra loop iteration).
        """
        server = self.server
        max_write_buffer = server.gateway.config.max_write_buffer
        if len(data) <= max_write_buffer:
            if not server.flush_scheduled:
                framing = self.framing
                if (len(server.connections) == 1 and not self.out and framing is not None
                        and framing.start >= len(framing.buffer)):
                    self.transport.write(data)
                    return
                server.flush_scheduled = True
                server.loop.call_soon(server.flush)
                if server.last_batch <= 1 and not self.out:
                    server.batch = 1
                    self.transport.write(data)
                    return
            server.batch += 1
            if not self.out:
                server.to_flush.append(self)
            self.out.append(data)
            self.out_bytes += len(data)
            if self.out_bytes > max_write_buffer:
                # Many pipelined requests in one read: written now, so that a
                # client that does not read is paused at max_write_buffer
                # (one 64 KiB read of them held 10 times that in answers).
                self.flush()
            return
        self.flush()
        self.pending = memoryview(data)
        self.server.unsent += len(data)
        self._pause_reading()
        self.arm("write")
        self._write_pending()

    def flush(self) -> None:
        """Write the answers collected in this loop iteration (one send)."""
        out = self.out
        if out and self.transport is not None:
            self.out, self.out_bytes = [], 0
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _write_pending(self) -> None:
        piece = self.server.gateway.config.max_write_buffer
        while self.pending is not None and not self.writing_paused and self.transport is not None:
            chunk, rest = self.pending[:piece], self.pending[piece:]
            self.server.unsent -= len(chunk)
            self.pending = rest if len(rest) else None
            self.transport.write(chunk)  # may call pause_writing at once
        if self.pending is None and not self.writing_paused and self.transport is not None:
            if self.closing:
                self._close_after_answer()
            else:  # the next request waits a loop iteration: others run first
                self.server.loop.call_soon(self._unblock)

    def _finish(self, data: bytes) -> None:
        """Send a last answer, then close the connection without losing it."""
        self.closing = True
        self.flush()
        if len(data) > self.server.gateway.config.max_write_buffer:
            self.send(data)  # in pieces; _write_pending closes after the last
            return
        self.transport.write(data)
        self._close_after_answer()

    def _close_after_answer(self) -> None:
        """Close without losing the answer: closing a socket with unread input
        makes the kernel send a reset, which can destroy the answer before the
        client reads it (a 413 while the body still arrives, or Connection:
        close with more requests behind it). So half-close, then discard input
        until the client closes, for linger_timeout at most."""
        transport = self.transport
        if self.framing is not None and self.framing.eof or not transport.can_write_eof():
            self.arm("linger")
            transport.close()
            return
        try:
            transport.write_eof()
        except OSError:  # reset while its answer waited (ENOTCONN): nothing to linger for
            transport.abort()
            return
        self.lingering = True
        self.arm("linger")
        if self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def _unblock(self) -> None:
        """The client has read what it was sent: read and answer its next requests."""
        if self.transport is None or self.waiting:
            return
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        self.deadline = ""
        self.process()


def _internal_error(request: Request) -> Response:
    log.error("internal error serving %s %s:\n%s", printable(request.method),
              printable(request.target), traceback.format_exc())
    return Response(500, _error_body(INTERNAL_ERROR, "Internal error"))


class GatewayServer:
    """A gateway on its listening sockets: start(), serve() until asked to stop, stop().

    url, host and port are known once started (port 0 binds a free port).
    stopping is what the gateway's answers are told: from the first moment
    of a stop on, they close their connections and /ready answers 503.
    """

    def __init__(self, gateway: Gateway, host: str = "127.0.0.1", port: int = 0,
                 ssl: Optional[ssl_module.SSLContext] = None, *, reuse_port: bool = False):
        self.gateway = gateway
        self.ssl = ssl
        self.host, self.port = host, port
        self.reuse_port = reuse_port  # several processes serving one port (SO_REUSEPORT)
        self.url = ""
        self.stopping = False
        self.loop: Any = None
        self.listeners: List[asyncio.AbstractServer] = []
        self.connections: set = set()  # Connections being served
        self.refusing: set = set()  # Connections being answered 503
        self.all_closed: Optional[asyncio.Event] = None
        self.stop_asked: Optional[asyncio.Event] = None
        self.unsent = 0  # bytes of large answers not yet handed to their transports
        self.changed = Wakeup()  # fired by the gateway's on_change: Postponed requests retry
        self.state_flush: Optional[StateFlush] = None  # when the gateway saves its state
        self.big_reports = 0  # reports being parsed in steps (_parsed_in_steps)
        self.collector_paused = False  # by them
        self.listing_turns = Turns()  # Info calls take turns
        self.to_flush: List[Connection] = []  # connections with answers for flush()
        self.flush_scheduled = False
        self.batch = self.last_batch = 0  # answers of this and of the last loop iteration
        self.date = HttpDate()
        self.request_lines: Dict[bytes, Tuple[str, str, Tuple[int, int]]] = {}
        self.header_lines: Dict[str, Tuple[str, str]] = {}
        self.heads: Dict[bytes, tuple] = {}  # HEAD_CACHE
        self.file_budget = gateway.config.max_connections
        self.refused_count = 0
        self.accept_errors = 0
        self._summary: Optional[asyncio.TimerHandle] = None
        self._timers: List[asyncio.Future] = []  # the gateway's timers, if this server runs them
        self.owns_cluster = False  # this server made the gateway's ClusterLink (and stops it)
        self._signals: Dict[int, Any] = {}
        self._previous_exception_handler: Any = None
        self.force_exit: Callable[[int], Any] = os._exit

    # -- start --------------------------------------------------------------

    async def start(self) -> None:
        """Bind the listener(s), start the timers; return once clients can connect."""
        self.loop = loop = asyncio.get_running_loop()
        self.all_closed, self.stop_asked = asyncio.Event(), asyncio.Event()
        config = self.gateway.config
        if config.cluster is not None:
            if self.gateway.cluster is not None:
                raise RuntimeError("this gateway is in cluster mode and served already: its cluster "
                                   "link (on the first server's loop) serves one server; run one "
                                   "GatewayServer per cluster gateway")
            self.gateway.cluster = ClusterLink(self.gateway)  # ConfigError if redis-py is missing
            self.owns_cluster = True
        self.file_budget = self._check_open_files(config.max_connections)
        somaxconn = kernel_somaxconn()
        if somaxconn is not None and somaxconn < config.backlog:
            log.warning("backlog %d is above the kernel's net.core.somaxconn (%d), which caps it; "
                        "raise it with: sysctl -w net.core.somaxconn=%d", config.backlog, somaxconn,
                        config.backlog)
        self.gateway.open_state()  # an unusable state file stops the start before listening
        if self.gateway.saved is not None:
            self.state_flush = StateFlush(self.gateway.saved)
            if self.owns_cluster:
                self.gateway.cluster.state_written = self.state_flush.soon  # type: ignore[union-attr]
        sockets = create_listeners(self.host, self.port, config.backlog, reuse_port=self.reuse_port)
        try:
            for sock in sockets:
                # A TLS connection reaches its Connection only after the handshake
                # (its first bytes): until then asyncio's deadline (60 s) held it
                # outside max_connections, and from 3.12 on a stop waited for it.
                self.listeners.append(await loop.create_server(
                    functools.partial(Connection, self), sock=sock, ssl=self.ssl,
                    backlog=config.backlog,
                    ssl_handshake_timeout=config.deadline("first byte") if self.ssl else None))
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        sockname = sockets[0].getsockname()
        self.host, self.port = sockname[0], sockname[1]
        host = "[%s]" % self.host if ":" in self.host else self.host
        self.url = "%s://%s:%d" % ("https" if self.ssl else "http", host, self.port)
        self._previous_exception_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_exception)
        self.gateway.servers.append(self)
        if self.gateway.servers[0] is self:
            self._start_timers()
        self.gateway.on_change.append(self.changed.fire)
        self.gateway.begin_warmup()
        if self.gateway.cluster is not None:
            await self.gateway.cluster.start()
        self.gateway.event("listening", url=self.url)

    def _start_timers(self) -> None:
        """The gateway's timers, run by the first of its servers only: a second server
        (HTTP beside HTTPS) would tick twice and call customer_api twice."""
        if self in self.gateway.servers and not self._timers:
            self._timers = [asyncio.ensure_future(_maintenance_timer(self.gateway, self)),
                            asyncio.ensure_future(_customer_timer(self.gateway))]

    def _check_open_files(self, wanted: int) -> int:
        """Connections this process can hold open: raise the open-file limit for
        max_connections, else say what it allows and use that."""
        needed = wanted + SPARE_FILES + _open_files()
        soft, hard = raise_open_file_limit(needed)
        if soft >= needed:
            return wanted
        budget = max(1, soft - SPARE_FILES - _open_files())
        log.warning("max_connections %d is more than this process can open: the open-file limit "
                    "is %d (hard limit %d), %d files are open and %d kept spare; serving at most "
                    "%d connections (raise the limit with ulimit -n or LimitNOFILE)",
                    wanted, soft, hard, _open_files(), SPARE_FILES, budget,
                    extra=fields("max_connections_clamped", max_connections=wanted,
                                 open_file_limit=soft, hard_limit=hard, serving=budget))
        return budget

    def connection_limit(self) -> int:
        return min(self.gateway.config.max_connections, self.file_budget)

    # -- serve --------------------------------------------------------------

    async def serve(self, *, install_signal_handlers: bool = False,
                    reload: Optional[Callable[[], None]] = None) -> None:
        """Start, serve until request_stop() (or SIGINT/SIGTERM), then stop.
        SIGHUP calls reload, if given."""
        await self.start()
        try:
            if install_signal_handlers:
                self._install_signal_handlers(reload)
            await self.stop_asked.wait()  # type: ignore[union-attr]
        finally:
            try:
                await self.stop()
            finally:
                self._restore_signal_handlers()

    def request_stop(self) -> None:
        """Ask serve() to stop (from the server's loop)."""
        if self.stop_asked is not None:
            self.stop_asked.set()

    def _install_signal_handlers(self, reload: Optional[Callable[[], None]]) -> None:
        import signal

        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set signal handlers
        handlers = {signal.SIGINT: self._on_stop_signal, signal.SIGTERM: self._on_stop_signal}
        if reload is not None and hasattr(signal, "SIGHUP"):
            handlers[signal.SIGHUP] = reload
        for signum, handler in handlers.items():
            previous = signal.getsignal(signum)
            try:
                self.loop.add_signal_handler(signum, handler)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows
                continue
            self._signals[signum] = previous

    def _restore_signal_handlers(self) -> None:
        import signal

        for signum, previous in self._signals.items():
            with contextlib.suppress(NotImplementedError, RuntimeError):
                self.loop.remove_signal_handler(signum)
            if previous is not None:  # None: set outside Python, cannot be put back
                signal.signal(signum, previous)
        self._signals = {}

    def _on_stop_signal(self) -> None:
        if self.stop_asked.is_set():  # type: ignore[union-attr]
            log.warning("second signal: exiting at once", extra=fields("forced_exit"))
            for handler in log.handlers + logging.getLogger().handlers:
                handler.flush()  # os._exit skips the flush at exit
            self.force_exit(1)
            return
        self.stopping = True  # from now on, answers close their connections
        self.gateway.event("stopping")
        self.request_stop()

    # -- stop ---------------------------------------------------------------

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (shutdown_timeout at
        most; their answers close their connections), close the rest."""
        self.stopping = True
        self.changed.fire()  # Postponed requests get their 503 now
        if self.changed.fire in self.gateway.on_change:
            self.gateway.on_change.remove(self.changed.fire)
        for timer in self._timers:
            timer.cancel()
        if self in self.gateway.servers:
            self.gateway.servers.remove(self)
            if self._timers and self.gateway.servers:  # the next server runs them, on its loop
                heir = self.gateway.servers[0]
                heir.loop.call_soon_threadsafe(heir._start_timers)
        # A connection the loop has just accepted reaches its protocol a few
        # iterations later, and one in the listen queue is accepted soon:
        # closing the listener now would leave them half-made (their sockets
        # leak). Let them arrive first: with stopping set, they close at once.
        for _ in range(5):
            await asyncio.sleep(0)
        for listener in self.listeners:
            listener.close()
        for _ in range(5):
            await asyncio.sleep(0)
        config = self.gateway.config
        for connection in list(self.connections):
            framing = connection.framing
            if (framing is not None and framing.phase in ("idle", "first byte") and not framing.pending
                    and not connection.out and connection.pending is None and not connection.waiting):
                connection.transport.abort()  # nothing in flight; abort skips TLS's goodbye
            elif connection.deadline == "linger":
                pass  # its last answer is out: it closes within linger_timeout, not later
            else:
                connection.arm("stop")
        for connection in list(self.refusing):
            connection.transport.abort()
        if not await self._all_closed(config.shutdown_timeout + 1):
            for connection in self.connections | self.refusing:
                if connection.transport is not None:
                    connection.transport.abort()
            await self._all_closed(1)  # connection_lost closes their sockets
        for listener in self.listeners:
            await listener.wait_closed()
        await asyncio.gather(*self._timers, return_exceptions=True)
        self._timers = []
        if self.owns_cluster and self.gateway.cluster is not None:
            await self.gateway.cluster.stop()
            self.gateway.cluster = None
        self.owns_cluster = False
        saved = self.gateway.saved
        if self.state_flush is not None:
            await self.state_flush.drain()
        if saved is not None:
            flush_state(saved)
            saved.close()
        if self._summary is not None:
            self._summary.cancel()
            self._log_summary()
        if self.loop.get_exception_handler() == self._loop_exception:
            self.loop.set_exception_handler(self._previous_exception_handler)
        self.gateway.event("stopped", url=self.url)

    # -- answers that wait: warm-up, the state file, Info's turns ---------------

    def respond(self, request: Request, remote: str) -> Any:
        """The gateway's answer to a request: a Response, or an awaitable of one
        when it must wait. A Connect for a room not yet reported waits during
        the warm-up (Postponed: asked again when the gateway changes); an
        answer that acknowledges what the state file must hold waits until
        it is on disk; an Info call waits for its turn."""
        if request.target != "/":  # a client's call ("/") neither lists the grid nor reports
            if _lists_grid(request.target, request.body):
                return self._in_turn(request, remote)
            if (len(request.body) > 2 * JSON_STEP_CHARS and request.method == "POST"
                    and request.target.split("?", 1)[0] == "/internal"
                    and self.gateway.may_call_internal(request.headers)):
                return self._parsed_in_steps(request, remote)
        saved = self.gateway.saved
        acknowledged = saved.acknowledged if saved is not None else 0
        response = handle_request(self.gateway, request, remote, self.stopping)
        if response.__class__ is Response and saved is None:
            return response  # the usual: nothing to wait for
        if isinstance(response, Postponed):
            return self._when_changed(request, remote, response) if not self.stopping else _plain(response)
        if response.__class__ is not Response:  # cluster steps: Redis first (ClusterLink.complete)
            return self._after_cluster(response, acknowledged)
        return self._after_saving(response, acknowledged)

    async def _after_cluster(self, steps: Any, acknowledged: int) -> Response:
        answer = self._after_saving(await steps, acknowledged)
        return answer if isinstance(answer, Response) else await answer

    def _after_saving(self, response: Response, acknowledged: int) -> Any:
        saved = self.gateway.saved
        if saved is None or not saved.pending or self.state_flush is None:
            return response
        written = self.state_flush.soon()  # what this loop iteration changed: one write
        if saved.acknowledged == acknowledged:
            return response
        return self._once_written(written, response)  # on disk before the answer says so

    async def _once_written(self, written: "asyncio.Future[None]", response: Response) -> Response:
        await written
        return response

    async def _parsed_in_steps(self, request: Request, remote: str) -> Response:
        """A big report: its body parsed in steps (load_json_in_steps) with other
        requests served in between, then handled at once."""
        # The collector stays off until the report is handled (for the other
        # requests in between too): the parsed body is hundreds of thousands
        # of objects, which a collection would walk, only to see them all
        # freed when the report is done.
        if not self.big_reports and gc.isenabled():
            gc.disable()
            self.collector_paused = True
        self.big_reports += 1
        try:
            steps = self.gateway.parse_in_steps(request.body, remote)
            parsed: Any = _UNPARSED  # unparseable: handle_request answers the parse error
            try:
                while True:
                    next(steps)
                    await asyncio.sleep(0)
            except StopIteration as done:
                parsed = done.value
            except ValueError:
                pass
            if parsed is not _UNPARSED:  # then the new rooms' hashes, in steps too
                for _ in self.gateway.prepare_report(parsed, remote):
                    await asyncio.sleep(0)
            saved = self.gateway.saved
            acknowledged = saved.acknowledged if saved is not None else 0
            response = handle_request(self.gateway, request, remote, self.stopping, parsed)
            del parsed, steps
        finally:
            self.big_reports -= 1
            if not self.big_reports and self.collector_paused:
                self.collector_paused = False
                gc.enable()
                freeze_grown_grid(self.gateway.grid)
        if response.__class__ is not Response:  # cluster steps: Redis first, as for any request
            return await self._after_cluster(response, acknowledged)
        answer = self._after_saving(response, acknowledged)
        return answer if isinstance(answer, Response) else await answer

    async def _in_turn(self, request: Request, remote: str) -> Response:
        await self.listing_turns.take()
        try:
            return handle_request(self.gateway, request, remote, self.stopping)
        finally:
            self.listing_turns.release()

    async def _when_changed(self, request: Request, remote: str, response: Response) -> Response:
        acknowledged = 0
        while isinstance(response, Postponed):
            if self.stopping:
                return _plain(response)
            await self.changed.wait(response.seconds)  # other requests run meanwhile
            saved = self.gateway.saved
            acknowledged = saved.acknowledged if saved is not None else 0
            response = handle_request(self.gateway, request, remote, self.stopping)
        answer = self._after_saving(response, acknowledged)
        return answer if isinstance(answer, Response) else await answer

    async def _all_closed(self, timeout: float) -> bool:
        """Wait until every connection is gone; False if timeout seconds pass first."""
        give_up = self.loop.time() + timeout
        while self.connections or self.refusing:
            self.all_closed.clear()  # type: ignore[union-attr]
            try:
                await asyncio.wait_for(self.all_closed.wait(),  # type: ignore[union-attr]
                                       max(0.0, give_up - self.loop.time()))
            except asyncio.TimeoutError:
                return False
        return True

    # -- writing, refusing, counting ------------------------------------------

    def flush(self) -> None:
        """Write the keep-alive answers of this loop iteration, one send per connection."""
        connections, self.to_flush = self.to_flush, []
        self.flush_scheduled = False
        self.last_batch, self.batch = self.batch, 0
        for connection in connections:
            connection.flush()

    def refuse(self, connection: Connection) -> None:
        """Answer 503 to a connection over max_connections, and count it for the summary."""
        self.refused_count += 1
        self._schedule_summary()
        self.answered(connection.remote, None, 503, connection.started)
        if len(self.refusing) >= MAX_LINGERING_REFUSALS:
            connection.transport.abort()
            return
        self.refusing.add(connection)
        connection.refused = True
        connection.closing = True
        connection.transport.write(render_response(Response(503, _error_body(
            INVALID_REQUEST, "too many connections; try again later")), keep_alive=False,
            date=self.date()))
        connection._close_after_answer()

    def refused_request(self, remote: str, err: HttpError, started: float) -> None:
        """Count and log a request the framing refused."""
        log.debug("%s: HTTP %d: %s", remote, err.status, err.message)
        self.answered(remote, err.target, err.status, started)
        if err.status == 413 and err.target is not None and err.target.split("?", 1)[0] == "/internal":
            servers = [hostname for hostname in self.gateway.grid.servers  # at that address
                       if hostname.rsplit(":", 1)[0].strip("[]") == remote]
            log.warning("refused a request to /internal from %s%s: %s (max_internal_body_bytes); "
                        "a server's report over the limit is lost and its rooms move",
                        remote, " (server %s)" % ", ".join(servers) if servers else "",
                        err.message, extra=fields("report_refused", remote=remote, servers=servers,
                                                  limit=self.gateway.config.max_internal_body_bytes))

    def answered(self, remote: str, target: Optional[str], status: int, started: float,
                 method: str = "-", size: int = 0) -> None:
        """Count an answer in the metrics and, if asked for, write its access log line."""
        gateway = self.gateway
        gateway.metrics.count_response(target, status)
        if gateway.config.access_log:
            seconds = time.perf_counter() - started
            log.info('%s "%s %s" %d %d %.2fms', remote, printable(method), printable(target or "-"),
                     status, size, seconds * 1000, extra=fields(
                         "request", remote=remote, method=method, target=target, status=status,
                         bytes=size, duration_ms=round(seconds * 1000, 3)))

    def _loop_exception(self, loop: Any, context: dict) -> None:
        """asyncio's report of an accept that failed for lack of files (it pauses
        accepting for a second by itself): counted for the summary, not logged
        each time with a traceback."""
        if context.get("message") == "socket.accept() out of system resource":
            self.accept_errors += 1
            self._schedule_summary()
            return
        if self._previous_exception_handler is not None:
            self._previous_exception_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    def _schedule_summary(self) -> None:
        if self._summary is None:
            self._summary = self.loop.call_later(SUMMARY_INTERVAL, self._log_summary)

    def _log_summary(self) -> None:
        """One line per SUMMARY_INTERVAL for refused connections and failed accepts."""
        self._summary = None
        if self.refused_count:
            log.warning("refused %d connections in the last %g s: %d connections open "
                        "(max_connections %d)", self.refused_count, SUMMARY_INTERVAL,
                        len(self.connections), self.connection_limit(),
                        extra=fields("connections_refused", count=self.refused_count,
                                     open=len(self.connections), limit=self.connection_limit()))
        if self.accept_errors:
            log.warning("could not accept connections %d times in the last %g s: out of files "
                        "(open-file limit %s); accepting pauses for a second each time",
                        self.accept_errors, SUMMARY_INTERVAL, raise_open_file_limit(0)[0],
                        extra=fields("accept_failed", count=self.accept_errors))
        self.refused_count = self.accept_errors = 0



async def _maintenance_timer(gateway: Gateway, server: "GatewayServer") -> None:
    while True:
        await asyncio.sleep(gateway.config.update_interval)
        try:
            gateway.tick()
        except Exception:  # keep ticking: a bug here must not freeze the grid
            log.error("maintenance tick failed:\n%s", traceback.format_exc())
        if server.state_flush is not None and gateway.saved is not None and gateway.saved.pending:
            server.state_flush.soon()


async def update_customers(gateway: Gateway) -> bool:
    """Call the customer update function once (sync or async, with a timeout)."""
    function = gateway.config.customer_api["update_function"]
    timeout = gateway.config.customer_update_timeout
    try:
        if inspect.iscoroutinefunction(function):
            customers = await asyncio.wait_for(function(), timeout)
        else:
            # One thread per call at most: a function that hangs for good must not leave
            # a new hung thread behind at every update_interval.
            running = gateway.customer_update_thread
            if running is not None and running.is_alive():
                gateway.event("customers_kept", reason="the last call has not returned yet")
                return False
            future, gateway.customer_update_thread = _in_daemon_thread(function)
            customers = await asyncio.wait_for(future, timeout)
            if inspect.isawaitable(customers):
                customers = await asyncio.wait_for(customers, timeout)
    except asyncio.TimeoutError:
        gateway.event("customers_kept", reason="no answer within %g s" % timeout)
        return False
    except (Exception, SystemExit) as err:
        gateway.event("customers_kept", reason="the function raised %s: %s" % (
            type(err).__name__, err))
        return False
    return gateway.set_customers(customers)


def _in_daemon_thread(function: Callable[[], Any]
                      ) -> Tuple["asyncio.Future[Any]", threading.Thread]:
    """function() in a thread of its own: one that hangs cannot hold up a stop
    (the loop's executor is joined when asyncio.run ends). Its outcome, and the thread."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(outcome: Any, failed: bool) -> None:
        if future.done():  # timed out meanwhile
            return
        if failed:
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def run() -> None:
        try:
            outcome, failed = function(), False
        except BaseException as err:  # handed to the awaiting coroutine (SystemExit too)
            outcome, failed = err, True
        with contextlib.suppress(RuntimeError):  # the loop may be closed by now
            loop.call_soon_threadsafe(settle, outcome, failed)

    thread = threading.Thread(target=run, name="customer-update", daemon=True)
    thread.start()
    return future, thread


async def _customer_timer(gateway: Gateway) -> None:
    """Call the customer update function now and every update_interval (if configured;
    a reload may add or remove it)."""
    while True:
        api = gateway.config.customer_api
        if api is not None:
            await update_customers(gateway)
        await asyncio.sleep(api.get("update_interval", 300) if api is not None else
                            gateway.config.update_interval)



class ThreadedServer:
    """A GatewayServer on an event loop in a background thread (see serve_in_thread)."""

    def __init__(self, gateway: Gateway, host: str = "127.0.0.1", port: int = 0,
                 ssl: Optional[ssl_module.SSLContext] = None):
        self.gateway = gateway
        self.server = GatewayServer(gateway, host, port, ssl)
        self.url = ""
        self.port = 0
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._started = threading.Event()
        self._error: Optional[BaseException] = None

    def start(self) -> None:
        """Start the thread; return once the socket listens (or raise why it cannot)."""
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),),
                                        name="odin-gateway", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        self.url, self.port = self.server.url, self.server.port

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            await self.server.start()
        except BaseException as err:  # reported to the caller's thread
            self._error = err
            return
        finally:
            self._started.set()
        try:
            await self.server.stop_asked.wait()  # type: ignore[union-attr]
        finally:
            try:
                await self.server.stop()
            except BaseException as err:  # the stop itself failed
                self._error = err

    def stop(self) -> None:
        """Stop the server cleanly (no leaked thread, socket or task)."""
        self.loop.call_soon_threadsafe(self.server.request_stop)  # type: ignore[union-attr]
        self._thread.join()  # type: ignore[union-attr]
        if self._error is not None:
            raise self._error

    def call(self, function: Callable[[], Any]) -> Any:
        """Run function() in the server's thread and return its result.

        The gateway is not thread-safe: change it from the test's thread only
        through here, e.g. server.call(server.gateway.tick).
        """
        async def run() -> Any:
            return function()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result()  # type: ignore[arg-type]

    def tick(self) -> None:
        """Run the maintenance step now (in the server's thread)."""
        self.call(self.gateway.tick)


@contextlib.contextmanager
def serve_in_thread(config: Optional[Config] = None, host: str = "127.0.0.1", port: int = 0, *,
                    gateway: Optional[Gateway] = None,
                    ssl: Optional[ssl_module.SSLContext] = None) -> Iterator[ThreadedServer]:
    """Run a gateway in a background thread for synchronous test suites.

    with serve_in_thread(Config(...)) as server:
        requests.post(server.url + "/internal", ...)

    Pass a ready gateway (e.g. with an injected clock) instead of a config
    to keep a handle on it. Returns once the socket listens; stops cleanly
    (no leaked thread, socket or task) when the block exits.
    """
    runner = ThreadedServer(gateway if gateway is not None else Gateway(config), host, port, ssl)
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()


# ---------------------------------------------------------------------------
# Embedding: a JSON-RPC client and a fake media server for test suites
# ---------------------------------------------------------------------------


class RpcClient:
    """A minimal JSON-RPC 2.0 client over HTTP(S), for tests, tools and the demo.

    The url may carry user:password@ (sent as Basic credentials); trace, if
    given, is called with (method, params, answer) after every call.
    """

    def __init__(self, url: str, *, token: Optional[str] = None, timeout: float = 10.0,
                 trace: Optional[Callable[[str, Any, Any], None]] = None):
        parts = urllib.parse.urlsplit(url)
        self.headers = {"Content-Type": "application/json"}
        if token is not None:
            self.headers["Authorization"] = "Bearer " + token
        elif parts.username is not None:
            credentials = "%s:%s" % (urllib.parse.unquote(parts.username),
                                     urllib.parse.unquote(parts.password or ""))
            self.headers["Authorization"] = "Basic " + b64_encode(credentials.encode("utf-8"))
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = "[%s]" % netloc
        if parts.port is not None:
            netloc += ":%d" % parts.port
        self.url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        self.timeout = timeout
        self.trace = trace
        self._next_id = 0

    def call(self, method: str, params: Optional[dict] = None, *, notify: bool = False) -> Any:
        """The result of a call; RpcError if the gateway answers with an error."""
        request: dict = {"jsonrpc": "2.0", "method": method, "params": params or {}}
        if not notify:
            self._next_id += 1
            request["id"] = self._next_id
        http_request = urllib.request.Request(self.url, data=dump_json(request),
                                              headers=self.headers, method="POST")
        try:
            # No proxy from the environment: a gateway is called directly.
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(http_request, timeout=self.timeout) as reply:
                body = reply.read()
        except urllib.error.HTTPError as err:
            body = err.read()
            if not body:
                raise RpcError(INTERNAL_ERROR, "HTTP %d from %s" % (err.code, self.url)) from None
        answer = load_json(body) if body else None
        if self.trace is not None:
            self.trace(method, params or {}, answer)
        if answer is None:
            return None
        if "error" in answer:
            error = answer["error"]
            raise RpcError(error.get("code", INTERNAL_ERROR), error.get("message", ""), error.get("data"))
        return answer["result"]


class FakeServer:
    """The server side of the protocol over HTTP: a stand-in for an ODIN media server.

    internal_url is the gateway's /internal endpoint, as a server's
    supervisor url names it (e.g. server.url + "/internal"). Rooms added
    here are sent with every report(); the tasks the gateway answers are
    collected in .tasks, and a RoomClose task closes the room, as a real
    server would. start() reports in a background thread until stop().
    region and pools, when given, label the server in its reports.
    """

    def __init__(self, internal_url: str, public_endpoint: str = "127.0.0.1:4433", *,
                 load: float = 0.0, version: str = "fake", region: Optional[str] = None,
                 pools: Optional[List[str]] = None,
                 trace: Optional[Callable[[str, Any, Any], None]] = None):
        # The gateway's own URL would answer every report "invalid or missing authorization".
        if not urllib.parse.urlsplit(internal_url).path.rstrip("/").endswith("/internal"):
            raise ValueError("FakeServer(internal_url): expected the gateway's /internal URL, "
                             "e.g. %s/internal" % internal_url.rstrip("/"))
        self.client = RpcClient(internal_url, trace=trace)
        self.public_endpoint = public_endpoint
        self.load = load
        self.version = version
        self.region = region  # sent in reports when set (server_labels in the config win)
        self.pools = pools
        self.rooms: Dict[Tuple[str, str], dict] = {}
        self.tasks: List[dict] = []
        self.report_interval = 5.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def grid_config(self, toml_text: str = "") -> dict:
        """Ask for the recommended config; the merged config, parsed."""
        answer = self.client.call("sfu.GridConfig", {
            "public_endpoint": self.public_endpoint, "version": self.version, "config": toml_text})
        config = parse_toml(answer["config"])
        interval = config.get("supervisor", {}).get("report_interval")
        if _is_number(interval) and interval > 0:
            self.report_interval = interval / 1000
        return config

    def add_room(self, room_id: str, customer: str, peers: int = 1,
                 namespace: Optional[str] = None) -> None:
        """A room on this server (namespace defaults to the customer id)."""
        key = (namespace if namespace is not None else customer, room_id)
        with self._lock:
            self.rooms[key] = {"customer": customer, "peers": peers, "since": time.time()}

    def remove_room(self, room_id: str, customer: Optional[str] = None,
                    namespace: Optional[str] = None) -> None:
        with self._lock:
            for key in [k for k in self.rooms if k[1] == room_id and
                        (namespace is None or k[0] == namespace) and
                        (customer is None or self.rooms[k]["customer"] == customer)]:
                del self.rooms[key]

    def set_load(self, load: float) -> None:
        self.load = load

    def report(self) -> List[dict]:
        """Send one report; the tasks it brought back (also appended to .tasks)."""
        now = time.time()
        with self._lock:
            rooms = []
            for (namespace, name), info in self.rooms.items():
                age = max(0.0, now - info["since"])
                rooms.append({"id": [namespace, name], "customer": info["customer"],
                              "age": {"secs": int(age), "nanos": int(age % 1 * 1e9)},
                              "peers": info["peers"]})
        params = {"public_endpoint": self.public_endpoint, "version": self.version, "load": self.load,
                  "clients": sum(room["peers"] for room in rooms), "rooms": rooms}
        if self.region is not None:
            params["region"] = self.region
        if self.pools is not None:
            params["pools"] = list(self.pools)
        answer = self.client.call("sfu.Report", params)
        tasks = answer["tasks"]
        with self._lock:
            self.tasks.extend(tasks)
            for task in tasks:
                if task.get("task") == "RoomClose":
                    self.rooms.pop(tuple(task["id"]), None)
        return tasks

    def start(self, interval: Optional[float] = None) -> None:
        """Report now and then every interval seconds (default: as the gateway recommends)."""
        if self._thread is not None:
            raise RuntimeError("the fake server is already reporting")
        every = interval if interval is not None else self.report_interval
        self._stop.clear()
        self.report()

        def loop() -> None:
            while not self._stop.wait(every):
                try:
                    self.report()
                except (OSError, RpcError) as err:
                    log.warning("fake server %s: report failed: %s", self.public_endpoint, err)

        self._thread = threading.Thread(target=loop, name="fake-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop reporting (the gateway disables the server after disable_timeout)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "FakeServer":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def run_demo(out: Any = None) -> int:
    """Run the whole protocol on this machine and narrate it (the demo command)."""
    out = out or sys.stdout
    if _toml_reader is None:
        print("The demo starts media servers, whose first call is sfu.GridConfig.\n" + NO_TOML_READER,
              file=out)
        return 2
    offset = [0.0]

    def clock() -> float:  # real time, plus the time the demo pretends has passed
        return time.time() + offset[0]

    def say(text: str = "") -> None:
        print(text, file=out)

    def wire(who: str) -> Callable[[str, Any, Any], None]:
        def trace(method: str, params: Any, answer: Any) -> None:
            say("    %-7s -> %s %s" % (who, method, _short(params)))
            shown = answer.get("result", answer.get("error")) if isinstance(answer, dict) else answer
            say("    %-7s <- %s" % ("", _short(shown)))
        return trace

    access_key = generate_access_key()
    config = Config(customers=[{"id": "acme", "max_peers": 10, "max_rooms": 5,
                                "access_keys": [{"public_key": public_jwk(access_key)}]}],
                    master_key=b64_encode(os.urandom(32)), internal_users={"sfu": "demo-password"},
                    warmup=0)  # a fresh grid: no live rooms to wait for
    gateway = Gateway(config, clock=clock, rng=random.Random(4))
    with serve_in_thread(gateway=gateway) as server:
        internal = server.url.replace("://", "://sfu:demo-password@") + "/internal"
        say("ODIN gateway demo: the whole protocol, on this machine, in under a second.")
        say("Arrows show each JSON-RPC call and its answer, shortened.")
        say()
        say("1. A gateway listens on %s with one customer, acme (max 10 peers," % server.url)
        say("   5 rooms). acme's access key was made just now; the gateway knows only its")
        say("   public key, kid %s. Servers log in to /internal as user 'sfu'." % public_jwk(access_key)["kid"])
        say()
        say("2. Two media servers start. Each sends its own TOML config and gets it back")
        say("   with recommended settings and its own signing key, derived from the")
        say("   gateway's master key and its hostname:")
        servers = {}
        for name, load in (("sfu-a", 0.2), ("sfu-b", 0.6)):
            fake = FakeServer(internal, "%s.local:4433" % name, load=load, version="demo",
                              trace=wire(name))
            merged = fake.grid_config('public_address = "%s.local"\n' % name)
            key = merged["authorization"]["keys"][-1]
            say("           report every %d ms; signing key kid %s" % (
                merged["supervisor"]["report_interval"], key["kid"]))
            servers[name] = fake
        say()
        say("3. Both report their load and rooms (none yet); the answer holds queued tasks:")
        for fake in servers.values():
            fake.report()
        say()

        def connect(user: str, room: str) -> str:
            token = create_token(access_key, room, user, now=clock())
            client = RpcClient(server.url + "/", token=token, trace=wire(user))
            answer = client.call("Connect")
            header, claims, _signature = answer["token"].split(".")
            claims = _token_json(claims)
            say("           room token for %s: kid %s, claims %s" % (
                answer["address"], _token_json(header)["kid"],
                _short({k: claims[k] for k in ("uid", "cid", "rid", "nsp", "aud")})))
            return answer["address"]

        say("4. alice and bob join room 'lobby' with tokens from acme's backend. The first")
        say("   Connect picks the least loaded server (its reported load plus the rooms")
        say("   sent to it since); the second finds the room where it already is:")
        first = connect("alice", "lobby")
        second = connect("bob", "lobby")
        say("   -> both on %s%s" % (first, "" if first == second else " and " + second))
        host = next(fake for fake in servers.values() if fake.public_endpoint == first)
        host.add_room("lobby", "acme", peers=2)
        say()
        say("5. %s reports the room; the gateway now counts acme's usage:" % first)
        host.report()
        server.tick()
        say()
        say("6. acme's backend closes the room (its token may call RoomClose). The gateway")
        say("   queues the task; the server gets it with its next report:")
        admin = create_token(access_key, "lobby", "ops", subject="roomclose", now=clock())
        RpcClient(server.url + "/", token=admin, trace=wire("ops")).call(
            "RoomClose", {"room_id": "lobby", "ban_time": 10})
        host.report()
        say()
        say("7. carol joins room 'quiz'; then the server it lands on falls silent:")
        quiz = connect("carol", "quiz")
        silent = next(fake for fake in servers.values() if fake.public_endpoint == quiz)
        alive = next(fake for fake in servers.values() if fake is not silent)
        offset[0] += 8  # no real waiting: the gateway's clock is moved on
        alive.report()
        server.tick()
        say("   8 s pass (simulated) without a report from %s; the maintenance tick" % quiz)
        say("   disables it (disable_timeout is 7.5 s). Info shows:")
        info = RpcClient(internal).call("Info")
        for entry in info["servers"]:
            say("           %s disabled=%s" % (entry["hostname"], str(entry["disabled"]).lower()))
        say("   carol connects again: her room moves to a server that is alive:")
        moved = connect("carol", "quiz")
        say()
        say("Done: rooms stay together, tasks ride on reports, silent servers lose their")
        say("rooms (now on %s). Read README.md for every call and option." % moved)
    return 0


#: The demo --serve timeline, in steps of DEMO_STEP seconds; it repeats.
DEMO_STEP = 0.5
DEMO_CYCLE = 120  # steps: one minute
DEMO_TIMELINE = {20: "drain", 40: "silence", 70: "undrain", 80: "return"}


def serve_demo(out: Any = None, *, port: int = 0, stop: Optional[threading.Event] = None,
               seed: Optional[int] = None) -> int:
    """Keep a demo grid going until Ctrl-C (or stop is set): the demo --serve command.

    Three fake servers report every 2 s; clients of two customers join and
    leave rooms, a backend closes some; a server drains and undrains, another
    falls silent and comes back; globex keeps meeting its room limit. The
    terminal shows the event feed; the status page shows the grid.
    """
    out = out or sys.stdout
    stop = stop or threading.Event()
    rng = random.Random(seed)
    keys = {"acme": generate_access_key(), "globex": generate_access_key()}
    rooms = {"acme": ["lobby", "arena-1", "arena-2", "arena-3", "quiz"],
             "globex": ["standup", "retro", "planning", "all-hands"]}
    config = Config(host="127.0.0.1", port=port, update_interval=2, disable_timeout=5,
                    master_key=b64_encode(os.urandom(32)), server_labels=[
                        {"match": "sfu-[ab].*", "region": "eu-central"},
                        {"match": "sfu-c.*", "region": "us-east"}], customers=[
                        {"id": "acme", "max_peers": 40, "max_rooms": 6,
                         "access_keys": [{"public_key": public_jwk(keys["acme"])}]},
                        {"id": "globex", "max_peers": 20, "max_rooms": 3,
                         "access_keys": [{"public_key": public_jwk(keys["globex"])}]}])
    with serve_in_thread(config, "127.0.0.1", port) as server:
        internal = server.url + "/internal"
        fakes = {}
        for name in ("sfu-a", "sfu-b", "sfu-c"):
            fake = FakeServer(internal, "%s.local:4433" % name, version="demo")
            fake.grid_config()
            fake.start()
            fakes[fake.public_endpoint] = fake
        peers: Dict[Tuple[str, str], int] = {}  # (customer, room) -> peers
        hosts: Dict[Tuple[str, str], FakeServer] = {}
        print("ODIN gateway demo, served: watch it at %s/status" % server.url, file=out)
        print("The grid keeps moving until Ctrl-C; the gateway's events follow.\n", file=out, flush=True)

        def join(customer: str, room: str) -> None:
            token = create_token(keys[customer], room, "user-%d" % rng.randrange(1000))
            try:
                address = RpcClient(server.url + "/", token=token).call("Connect")["address"]
            except RpcError:
                return  # refused: the feed shows why
            key = (customer, room)
            if key in hosts and hosts[key].public_endpoint != address:
                hosts[key].remove_room(room, customer)  # it moved off a silent server
            hosts[key] = fakes[address]
            peers[key] = peers.get(key, 0) + 1
            fakes[address].add_room(room, customer, peers=peers[key])

        def leave(key: Tuple[str, str]) -> None:
            peers[key] -= 1
            if peers[key]:
                hosts[key].add_room(key[1], key[0], peers=peers[key])
            else:
                hosts.pop(key).remove_room(key[1], key[0])
                del peers[key]

        def close(key: Tuple[str, str]) -> None:
            admin = create_token(keys[key[0]], key[1], "backend", subject="roomclose")
            RpcClient(server.url + "/", token=admin).call("RoomClose", {"room_id": key[1]})
            del peers[key], hosts[key]  # the server closes it when the task arrives

        def script(step: str) -> None:
            if step in ("drain", "undrain"):
                RpcClient(internal).call("Drain", {"hostname": "sfu-b.local:4433",
                                                   "draining": step == "drain"})
            elif step == "silence":
                fakes["sfu-c.local:4433"].stop()
            else:
                fakes["sfu-c.local:4433"].start()

        seen = 0
        # Ctrl-C and SIGTERM (a service manager, `kill`) end the loop after the step: taken
        # even where SIGINT was ignored at start (a background job), as serve takes it,
        # never raised as a KeyboardInterrupt in the middle of a step. The handler only
        # appends (stop.set() there could wait for the lock the interrupted thread holds).
        import signal
        signalled: List[int] = []
        in_main = threading.current_thread() is threading.main_thread()
        previous = {number: signal.signal(number, lambda number, _frame: signalled.append(number))
                    for number in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
        try:
            step = 0
            while not signalled and not stop.wait(DEMO_STEP):
                step += 1
                if step % DEMO_CYCLE in DEMO_TIMELINE:
                    script(DEMO_TIMELINE[step % DEMO_CYCLE])
                chance = rng.random()
                if chance < 0.62 or not peers:
                    customer = rng.choice(sorted(rooms))
                    join(customer, rng.choice(rooms[customer]))
                elif chance < 0.96:
                    leave(rng.choice(sorted(peers)))
                else:
                    close(rng.choice(sorted(peers)))
                for fake in fakes.values():
                    load = sum(n for key, n in peers.items() if hosts[key] is fake) / 20
                    fake.set_load(round(min(load, 1.0), 2))
                page = server.call(lambda: server.gateway.events.after(seen, 100))
                for event in page["events"]:
                    print("%s %-16s %s" % (time.strftime("%H:%M:%S", time.gmtime(event["time"])),
                                           event["kind"], _event_details(event)), file=out, flush=True)
                seen = page["next"]
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
            for fake in fakes.values():
                fake.stop()
    print("\nDemo stopped.", file=out)
    return 0


def _short(value: Any, limit: int = 100) -> str:
    text = js_json(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------------------
# Logging: pretty lines for people, JSON lines for machines
# ---------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, (worker,) message (and traceback)."""

    def __init__(self, worker: Optional[int] = None) -> None:
        super().__init__()
        self.worker = worker  # with workers, each worker's lines say which one wrote them

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": iso_time(record.created), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        if self.worker is not None:
            entry["worker"] = self.worker
        if hasattr(record, "event"):
            entry["event"] = record.event
            for name, value in record.fields.items():
                entry.setdefault(name, value)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class PrettyFormatter(logging.Formatter):
    """A line for people: UTC time with its Z (as the JSON lines), level, (worker,) message."""

    def __init__(self, worker: Optional[int] = None) -> None:
        super().__init__("%(asctime)s %(levelname)-7s " + (
            "" if worker is None else "worker %d: " % worker) + "%(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: Optional[str] = None) -> str:
        return iso_time(record.created)


def configure_logging(level: str, fmt: str, stream: Any = None) -> None:
    """Send odin_gateway's log to stderr in the chosen format (main() only); a worker's
    lines carry its number (the workers of one box share the supervisor's stderr)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    number = os.environ.get(WORKER_ENV)
    worker = int(number) if number and number.isdigit() else None
    handler.setFormatter(JsonFormatter(worker) if fmt == "json" else PrettyFormatter(worker))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def warn_about_exposure(gateway: Gateway) -> None:
    """Say at start what an operator must know is exposed, and how to fix it."""
    for warning in exposure_warnings(gateway):
        log.warning("%s", warning)


def _ssl_context(config: Config) -> ssl_module.SSLContext:
    context = ssl_module.SSLContext(ssl_module.PROTOCOL_TLS_SERVER)
    # load_cert_chain's FileNotFoundError names no file (3.9-3.13): look first.
    for name in ("certificate", "private_key"):
        path = getattr(config, name)
        if not os.path.isfile(path):
            raise ConfigError("TLS: %s %s: %s" % (name, path, "is a directory" if os.path.isdir(path)
                                                    else "no such file"))
    asked = []

    def no_passphrase() -> bytes:
        # Else OpenSSL asks for the passphrase on the terminal, and a start under
        # systemd waits for nobody (or fails with "Invalid argument").
        asked.append(True)
        return b""

    try:
        context.load_cert_chain(config.certificate, config.private_key, password=no_passphrase)
    except (ssl_module.SSLError, OSError) as err:
        if asked:
            raise ConfigError("TLS: private_key %s is encrypted with a passphrase; the gateway "
                              "needs it unencrypted (openssl pkey -in KEY -out KEY.plain, kept "
                              "readable only by the gateway's user)" % config.private_key) from None
        hint = " (are they PEM files, the certificate chain first and then the key?)" \
            if "PEM lib" in str(err) else ""
        raise ConfigError("TLS: cannot use certificate %s with key %s: %s%s"
                          % (config.certificate, config.private_key, err, hint)) from err
    return context


COMMANDS = ("serve", "keygen", "token", "demo")
#: Environment variable that holds the master key (instead of config.py).
MASTER_KEY_ENV = "ODIN_GATEWAY_MASTER_KEY"


#: A flag whose name says it carries a secret (--access-key, --master-key...); a
#: flag that names a file holding one (--master-key-file) is not secret.
_SECRET_FLAG_RE = re.compile(r"--[\w-]*(key|secret|password)")


class CommandParser(argparse.ArgumentParser):
    """argparse without abbreviations (--master-key must not pass for
    --master-key-file), whose error messages never repeat a secret flag's value."""

    def __init__(self, **options: Any):
        super().__init__(allow_abbrev=False, **options)
        self.secrets: List[str] = []

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        self.secrets = []
        for index, arg in enumerate(argv):
            name, equals, value = arg.partition("=")
            if _SECRET_FLAG_RE.fullmatch(name):
                self.secrets.append(value if equals else argv[index + 1] if index + 1 < len(argv) else "")
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> Any:
        for secret in self.secrets:
            if len(secret) >= 4:  # shorter is no secret, and would blank out words
                message = message.replace(secret, "<hidden>")
        # A key given where no flag takes it ("unrecognized arguments: <the key>").
        message = " ".join("<hidden>" if _looks_like_a_key(word) else word
                           for word in message.split(" "))
        super().error(message)


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default once: not for required flags or switches, nor for None, nor when the
    help says it."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        if (action.required or action.default is None or action.default is False
                or "default" in (action.help or "")):
            return action.help
        return super()._get_help_string(action)


def build_parser(command: str = "serve") -> CommandParser:
    """The argument parser of one command (serve is the default command)."""
    formatter = _DefaultsFormatter
    if command == "keygen":
        parser = CommandParser(
            prog="odin_gateway.py keygen", formatter_class=formatter,
            description="Make a new ODIN access key and print it with its public JWK, its key "
                        "id and the customers entry to paste into config.py. Keep the access "
                        "key secret: the gateway needs only the public key.")
        parser.add_argument("--master", action="store_true",
                            help="print a new random master_key instead")
        parser.add_argument("--customer",
                            help="customer id for the printed config entry (default: my-customer)")
        return parser
    if command == "demo":
        parser = CommandParser(
            prog="odin_gateway.py demo", formatter_class=formatter,
            description="Run the whole protocol on this machine in under a second and narrate "
                        "it: a gateway, two fake media servers, clients, an admin task, and a "
                        "server falling silent.")
        parser.add_argument("--serve", action="store_true",
                            help="instead, keep a demo grid going until Ctrl-C and print the "
                                 "URL of its status page")
        parser.add_argument("--port", type=int, default=0,
                            help="port of the --serve gateway on 127.0.0.1 (0: a free one)")
        return parser
    if command == "token":
        parser = CommandParser(
            prog="odin_gateway.py token", formatter_class=formatter,
            description="Print a client token signed with an access key, as the ODIN token "
                        "library makes them (for testing Connect and the admin methods).")
        parser.add_argument("--access-key", required=True,
                            help="the access key to sign with; '-' reads it from standard input "
                                 "(a key on the command line can be read by anyone who lists "
                                 "processes)")
        parser.add_argument("--room", required=True, action="append",
                            help="room id (repeat for a list of rooms with the same base)")
        parser.add_argument("--user", required=True, help="user id")
        parser.add_argument("--audience", help='aud claim, e.g. "gateway"')
        parser.add_argument("--subject", action="append",
                            help="method the token may call (repeat for several; "
                                 "default: connect)")
        parser.add_argument("--lifetime", type=int, default=300, help="seconds until it expires")
        parser.add_argument("--customer", help="cid claim")
        parser.add_argument("--server", help="internal.server claim: pin the room to this server")
        parser.add_argument("--region", help="internal.region claim: the region a new room prefers")
        return parser
    called = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    parser = CommandParser(
        prog=called if called.startswith("odin") else "odin_gateway.py",
        description="An ODIN gateway: spreads ODIN clients over ODIN media servers and checks "
                    "customer licences. Settings come from a config file (see config.py); "
                    "flags override it.",
        epilog="Other commands: 'odin_gateway.py demo' runs the protocol and narrates it; "
               "'odin_gateway.py keygen --help'; 'odin_gateway.py token --help'. "
               "Signals: SIGTERM/SIGINT stop gracefully (twice: at once); SIGHUP reloads the "
               "config file.")
    # The name as installed (odin-gateway) or the module's, never "odin_gateway.py".
    parser.add_argument("--version", action="version", version="%s %s" % (
        "odin-gateway" if called == "odin-gateway" else "odin_gateway", __version__))
    parser.add_argument("--config", metavar="PATH", default="config.py",
                        help="config file (default: config.py; if that default is missing, "
                             "the built-in defaults apply)")
    for name, declared in SETTINGS.items():
        if declared.flag is None:
            continue
        kind: Dict[str, Any] = {"type": {"int": int, "float": float}.get(declared.type, str)}
        shown = declared.shown or str(declared.default)
        if declared.type == "bool":  # a switch: on when given, else the config's
            kind, shown = {"action": "store_true", "default": None}, "on" if declared.default else "off"
        parser.add_argument(declared.flag, dest=name, **kind,
                            help="%s (config: %s; default: %s)" % (
                                declared.meaning.replace("%", "%%"), name, shown))
    parser.add_argument("--master-key-file", metavar="FILE",
                        help="read master_key from this file; it takes precedence over the "
                             "environment variable %s, which takes precedence over the config "
                             "(default: neither)" % MASTER_KEY_ENV)
    parser.add_argument("--discard-unreadable-state", action="store_true",
                        help="if state_file cannot be read or is corrupt, start without it and "
                             "overwrite it, losing what it held (default: refuse to start)")
    return parser


def keygen_command(args: Any) -> int:
    if args.master:
        if args.customer is not None:
            print("odin_gateway keygen: --customer names the customer of an access key; "
                  "a master key (--master) has none", file=sys.stderr)
            return 2
        print(b64_encode(os.urandom(MIN_MASTER_KEY_BYTES)))
        return 0
    access_key = generate_access_key()
    jwk = public_jwk(access_key)
    entry = {"id": args.customer or "my-customer", "max_peers": None, "max_rooms": None,
             "access_keys": [{"public_key": jwk, "namespace": None}]}
    print("access key (secret, for your token backend): %s" % access_key)
    print("key id: %s" % jwk["kid"])
    print("public JWK: %s" % json.dumps(jwk))
    print("config.py customers entry:")
    print(pprint.pformat(entry, sort_dicts=False))
    return 0


def _token_problem(args: Any) -> Optional[str]:
    """Why the gateway would refuse the token these flags describe, in its words, or None."""
    if len({room_base_name(room) for room in args.room}) > 1:
        return "--room %s: all values in rid must have the same base" % " --room ".join(
            shlex.quote(room) for room in args.room)
    if args.lifetime <= 0:
        return "--lifetime %d: expected a positive number of seconds (the token would expire " \
               "before it is made)" % args.lifetime
    if not _is_safe_integer(int(time.time()) + args.lifetime):
        return "--lifetime %d: the gateway would answer 'invalid exp in token' (exp must be at " \
               "most %d)" % (args.lifetime, MAX_SAFE_INTEGER)
    if args.audience is not None and args.audience != "gateway":
        return ("--audience %s: the gateway would answer 'token audience does not match' (it "
                "accepts only \"gateway\", or no --audience)" % shlex.quote(args.audience))
    methods = [method.lower() for method in Gateway.PUBLIC_METHODS]
    for subject in args.subject or ():
        if subject.lower() not in methods:
            close = difflib.get_close_matches(subject.lower(), methods, n=1)
            return ("--subject %s: no method has this name, so the gateway would answer "
                    "'access denied by token restrictions' (%s)" % (
                        shlex.quote(subject), "did you mean %s?" % close[0] if close
                        else "methods: " + ", ".join(methods)))
    return None


def token_command(args: Any) -> int:
    room = args.room[0] if len(args.room) == 1 else args.room
    subject: Any = "connect"
    if args.subject:
        subject = args.subject[0] if len(args.subject) == 1 else args.subject
    problem = _token_problem(args)
    if problem:
        print("odin_gateway token: %s" % problem, file=sys.stderr)
        return 2
    access_key = sys.stdin.readline().strip() if args.access_key == "-" else args.access_key
    try:
        print(create_token(access_key, room, args.user, audience=args.audience,
                           subject=subject, lifetime=args.lifetime, customer=args.customer,
                           internal=_internal_claim(args.server, args.region)))
    except ValueError as err:
        print("odin_gateway token: %s" % err, file=sys.stderr)
        return 2
    return 0


def _internal_claim(server: Optional[str], region: Optional[str]) -> Optional[dict]:
    """The token's internal claim: the pinned server and the room's region, if given."""
    claim = {name: value for name, value in (("server", server), ("region", region)) if value}
    return claim or None


def load_config(args: Any, environ: Optional[Dict[str, str]] = None) -> Config:
    """The config file named by --config (optional when it is the default), with flags applied.

    The master key comes from --master-key-file, else the environment
    variable ODIN_GATEWAY_MASTER_KEY, else the config file.
    """
    environ = os.environ if environ is None else environ
    if os.path.exists(args.config) or args.config != "config.py":
        config = Config.load(args.config)
    else:
        config = Config()
    # setting -> (what the user wrote, its value): an error names the flag, not the setting.
    overrides: Dict[str, Tuple[str, Any]] = {}
    for name, declared in SETTINGS.items():
        value = getattr(args, name, None)
        if declared.flag and value is not None:
            overrides[name] = (declared.flag if value is True
                               else "%s %s" % (declared.flag, shlex.quote(str(value))), value)
    if environ.get(MASTER_KEY_ENV):
        overrides["master_key"] = ("$" + MASTER_KEY_ENV, environ[MASTER_KEY_ENV].strip())
        config.source += " + $" + MASTER_KEY_ENV
    if getattr(args, "master_key_file", None):
        written = "--master-key-file %s" % args.master_key_file
        try:
            with open(args.master_key_file, encoding="utf-8") as key_file:
                overrides["master_key"] = (written, key_file.read().strip())
        except (OSError, UnicodeDecodeError) as err:
            if not os.path.exists(args.master_key_file) and _looks_like_a_key(args.master_key_file):
                raise ConfigError(
                    "--master-key-file: no such file, and the value looks like a key itself (not "
                    "shown): the flag takes the path of a file that holds the key; a key on the "
                    "command line can be read by anyone who lists processes") from None
            raise ConfigError("%s: %s" % (written, getattr(err, "strerror", None) or err)) from err
        config.source += " + " + args.master_key_file
        mode = os.stat(args.master_key_file).st_mode
        if os.name == "posix" and mode & (stat.S_IRGRP | stat.S_IROTH):
            log.warning("%s: other users can read the master key (mode %s); make it readable "
                        "only by the gateway's user: chmod 600 %s", written,
                        oct(stat.S_IMODE(mode)), shlex.quote(args.master_key_file))
    for name, (written, value) in overrides.items():
        problem = SETTINGS[name].check(value)
        if problem:
            raise ConfigError("%s: %s" % (written, problem))
    config = config.replace(**{name: value for name, (_, value) in overrides.items()})
    for name in ("certificate", "private_key"):
        if name in overrides and not config.ssl:
            raise ConfigError("%s without --ssl (or ssl = True in the config): the gateway would "
                              "serve plain HTTP" % overrides[name][0])
    worker = environ.get(WORKER_ENV)
    if worker and config.state_file is not None:
        # Each worker saves its own replica: two processes writing one journal lose lines.
        config = config.replace(state_file="%s.worker%s" % (config.state_file, worker))
    return config


def _looks_like_a_key(text: str) -> bool:
    """Whether a value given for a file's path is rather a key (16 bytes or more in base64)."""
    try:
        return len(b64_decode(text)) >= 16
    except ValueError:
        return False


def reload_config(args: Any, started_from_file: bool, running: Optional[Config] = None) -> Config:
    """The config for a reload: the file the gateway started with must still be there
    (a file missing for a moment must not turn into the built-in defaults), and a
    reload does not open what the running config keeps closed (a restart can, with
    its warnings)."""
    if started_from_file and not os.path.exists(args.config):
        raise ConfigError("%s: no such file (it was there at start)" % args.config)
    config = load_config(args)
    if running is None:
        return config
    if ((running.customers or running.customer_api is not None)
            and not config.customers and config.customer_api is None):
        raise ConfigError("%s: no customers and no customer_api: every token would be admitted "
                          "without a signature check; a reload does not do that (a restart "
                          "does, with a warning)" % config.source)
    if running.internal_users and not config.internal_users:
        raise ConfigError("%s: no internal_users: /internal would be open to anyone; a reload "
                          "does not do that (a restart does, with a warning)" % config.source)
    return config


async def _run(gateway: Gateway, ssl_context: Optional[ssl_module.SSLContext],
               reload: Optional[Callable[[], Config]] = None, reuse_port: bool = False) -> None:
    """Serve until SIGINT/SIGTERM (twice: at once); SIGHUP reloads the config."""
    def on_hangup() -> None:
        try:
            new_config = reload()  # type: ignore[misc]
        except ConfigError as err:
            gateway.event("config_reload_refused", reason=str(err))
            return
        configure_logging(new_config.log_level, new_config.log_format)
        gateway.reload(new_config)
        warn_about_exposure(gateway)

    server = GatewayServer(gateway, gateway.config.host, gateway.config.port, ssl_context,
                           reuse_port=reuse_port)
    await server.serve(install_signal_handlers=True, reload=on_hangup if reload else None)


def _printing(command: Callable[[Any], int], args: Any) -> int:
    """Run a command that prints; a reader that goes away (keygen | head -1) ends it
    quietly, as it ends other Unix tools."""
    try:
        status = command(args)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # Python would complain again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


# ---------------------------------------------------------------------------
# Workers: several gateway processes on one box, sharing the port
# ---------------------------------------------------------------------------
#
# With workers = N (which needs cluster), main() becomes a small supervisor:
# it starts N copies of this command, each a whole gateway listening on the
# same port with SO_REUSEPORT (the kernel spreads connections over them) and
# sharing the grid through Redis like gateways on different boxes. It passes
# SIGTERM, SIGINT and SIGHUP on to every worker, and restarts a worker that
# dies.

#: Set in a worker's environment: its number (the supervisor does not set it for itself).
WORKER_ENV = "ODIN_GATEWAY_WORKER"
#: Set in a restarted worker's environment: how the worker it replaces ended (JSON).
WORKER_REPLACES_ENV = "ODIN_GATEWAY_WORKER_REPLACES"
#: Seconds a worker must live for an immediate restart; one that dies sooner waits this long.
WORKER_RESTART_DELAY = 1.0


def _reserve_port(host: str) -> socket.socket:
    """A socket bound (SO_REUSEPORT, not listening) to a free port, held so that the
    workers can share that port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock


def _ended(status: int) -> str:
    """How a process ended, from its wait status: "was killed by SIGKILL", "exited with status 1"."""
    import signal

    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return "was killed by %s" % signal.Signals(number).name
        except ValueError:
            return "was killed by signal %d" % number
    return "exited with status %d" % os.WEXITSTATUS(status)


def record_worker_start(gateway: Gateway, number: int) -> None:
    """A worker's start, and how the worker it replaces ended, in its own event feed."""
    gateway.event("worker_started", worker=number, workers=gateway.config.workers, pid=os.getpid())
    replaces = os.environ.get(WORKER_REPLACES_ENV)
    if replaces:
        died = json.loads(replaces)
        gateway.event("worker_restarted", worker=number, pid=os.getpid(), died_pid=died["pid"],
                      died=died["died"], lived=died["lived"])


def run_workers(config: Config, argv: List[str]) -> int:
    """Supervise config.workers gateway processes sharing config.port; the exit status."""
    import signal

    if not hasattr(socket, "SO_REUSEPORT"):
        log.error("workers: this system has no SO_REUSEPORT; run one process per port instead")
        return 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if config.workers > cores:
        # Affinity is inherited: workers started under taskset (or in a cpuset) share its cores.
        log.warning("workers = %d, but this process may run on %d core%s only (its CPU affinity: "
                    "taskset, numactl or a cpuset); the workers share %s", config.workers, cores,
                    "" if cores == 1 else "s", "it" if cores == 1 else "them",
                    extra=fields("workers_share_cores", workers=config.workers, cores=cores))
    port, held = config.port, None
    if port == 0:
        held = _reserve_port(config.host)
        port = held.getsockname()[1]
    command = [sys.executable, os.path.abspath(__file__)] + argv + ["--port", str(port)]
    workers: Dict[int, "subprocess.Popen[bytes]"] = {}
    started: Dict[int, float] = {}
    stopping: List[int] = []
    passed: List[Tuple[int, set]] = []  # signals passed on (and the workers they reached) since a start

    def start(number: int, replaces: Optional[dict] = None) -> None:
        env = dict(os.environ, **{WORKER_ENV: str(number)})
        env.pop(WORKER_REPLACES_ENV, None)
        if replaces is not None:
            env[WORKER_REPLACES_ENV] = _compact_json(replaces)
        passed.clear()  # (only those passed on while this worker starts matter)
        # A session of its own: a terminal's Ctrl-C reaches the supervisor only, which passes it on.
        workers[number] = subprocess.Popen(command, env=env, start_new_session=True)
        # A signal passed on while it started missed it (a stop would wait for it for ever).
        for signum, reached in passed:
            if number not in reached:
                with contextlib.suppress(ProcessLookupError):
                    workers[number].send_signal(signum)
        started[number] = time.monotonic()
        log.info("worker %d started (pid %d)", number, workers[number].pid,
                 extra=fields("worker_started", worker=number, pid=workers[number].pid))

    def pass_on(signum: int, _frame: Any) -> None:
        if signum != getattr(signal, "SIGHUP", None):
            stopping.append(signum)
        signum = signal.SIGTERM if signum == signal.SIGINT else signum
        passed.append((signum, set(workers)))
        for process in workers.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    handled = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {signum: signal.signal(signum, pass_on) for signum in handled}
    try:
        for number in range(1, config.workers + 1):
            if not stopping:
                start(number)
        while workers:
            pid, status = os.wait()  # returns after a signal handler, too (PEP 475)
            number = next((n for n, p in workers.items() if p.pid == pid), None)
            if number is None:
                continue
            workers.pop(number).returncode = status  # reaped here, not by Popen
            if stopping:
                continue
            lived = time.monotonic() - started[number]
            died = _ended(status)
            log.error("worker %d (pid %d) %s after %.1f s; restarting it", number, pid, died, lived,
                      extra=fields("worker_died", worker=number, pid=pid, status=status, died=died,
                                   lived=round(lived, 3)))
            if lived < WORKER_RESTART_DELAY:
                time.sleep(WORKER_RESTART_DELAY)  # a worker that cannot start must not spin
            if not stopping:
                start(number, {"pid": pid, "died": died, "lived": round(lived, 3)})
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if held is not None:
            held.close()
    log.info("all workers stopped", extra=fields("workers_stopped"))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Run the gateway (or another command) from the command line; the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    given = list(argv)
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0].lower(), COMMANDS, n=1)
        if close and not _looks_like_a_key(argv[0]):
            print("odin_gateway: unknown command %s (did you mean %s?)" % (
                printable(repr(argv[0]), 40), close[0]), file=sys.stderr)
            return 2
        if argv[0].endswith(".py") or os.path.isfile(argv[0]):
            print("odin_gateway: %s: a config file is given with --config %s" % (
                printable(argv[0], 80), shlex.quote(argv[0])), file=sys.stderr)
            return 2
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "serve"
    args = build_parser(command).parse_args(argv)
    if nacl is None:
        print("odin_gateway: PyNaCl is missing; install it with: pip install pynacl", file=sys.stderr)
        return 2
    if command == "demo":
        configure_logging("ERROR", "pretty")  # the narration says what happens
    if command != "serve":
        return _printing({"keygen": keygen_command, "token": token_command,
                          "demo": lambda _args: serve_demo(port=_args.port) if _args.serve
                          else run_demo()}[command], args)
    configure_logging("INFO", "pretty")  # until the config says otherwise
    started_from = os.path.isfile(args.config)
    try:
        config = load_config(args)
        configure_logging(config.log_level, config.log_format)
        if config.cluster is not None:
            import_redis()
        ssl_context = _ssl_context(config) if config.ssl else None
        gateway = Gateway(config)
        if config.workers == 1 or os.environ.get(WORKER_ENV):  # a supervisor keeps no state
            gateway.open_state(discard_unreadable=args.discard_unreadable_state)
    except ConfigError as err:
        print("odin_gateway: %s" % err, file=sys.stderr)
        return 2
    except StateError as err:
        print("odin_gateway: %s\nodin_gateway: nothing was changed; fix or move the file, or start "
              "with --discard-unreadable-state to start without it" % err, file=sys.stderr)
        return 2
    worker = os.environ.get(WORKER_ENV)
    if config.workers > 1 and worker is None:
        log.info("odin_gateway %s: starting %d workers", __version__, config.workers)
        return run_workers(config, given)
    log.info("odin_gateway %s (config: %s): %s", __version__,  # a worker's lines say which
             config.source if config.source != "Config()" else "built-in defaults",
             gateway.customer_counts())
    if worker:
        record_worker_start(gateway, int(worker))
    warn_about_exposure(gateway)
    tune_collector()
    try:
        asyncio.run(_run(gateway, ssl_context, reload=lambda: reload_config(
            args, started_from, gateway.config), reuse_port=worker is not None))
    except OSError as err:
        log.error("cannot listen on %s:%s: %s", config.host, config.port, err.strerror or err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
