"""Tests of odin_gateway.py.

First the golden vectors recorded from the original gateway (test_vectors/),
then the protocol rules as pure functions over a Gateway with an injected
clock, then the HTTP server over real sockets on 127.0.0.1, port 0.

Run: python -m pytest -q
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import os
import pathlib
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

import odin_gateway as og

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

HERE = pathlib.Path(__file__).resolve().parent
VECTORS = HERE / "test_vectors"


def vector(name):
    return json.loads((VECTORS / name).read_text("utf-8"))


ACCESS_KEYS = vector("access_keys.json")
SERVER_KEYS = vector("server_keys.json")
ROOM_HASHES = vector("room_hashes.json")
TOKENS = vector("tokens.json")
VERDICTS = vector("token_verdicts.json")
GRID_CONFIGS = vector("grid_config.json")
TRANSCRIPT = vector("transcript.json")

KEY_A = VERDICTS["keys"]["A"]["access_key"]  # customer odinref, namespace custom-ns
KEY_B = VERDICTS["keys"]["B"]["access_key"]  # customer odinref, no namespace
KEY_TINY = VERDICTS["keys"]["tiny"]["access_key"]  # customer tiny: 3 peers, 2 rooms
KEY_UNKNOWN = VERDICTS["keys"]["unknown"]["access_key"]  # configured nowhere
SFU1 = "sfu-1.example.com:4433"
SFU2 = "sfu-2.example.com:4433"
NOW = 1_700_000_000.0


def reference_customers():
    """The customers of the original's config.ts plus the vectors' extra ones."""
    config_ts = ACCESS_KEYS["config_ts_keys"]
    customers = []
    for customer_id in ("foo", "bar"):
        customers.append({"id": customer_id, "max_peers": None, "max_rooms": None, "access_keys": [
            {"public_key": {"kid": k["kid_in_config"], "kty": "OKP", "crv": "Ed25519", "x": k["x"]}}
            for k in config_ts if k["customer"] == customer_id]})
    # The vectors write them in the original's camelCase, which we accept too.
    return customers + VERDICTS["configuration"]["extra_customers"]


class Clock:
    """An injectable clock that moves only when told to."""

    def __init__(self, now=NOW):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def make_gateway(clock=None, seed=1, **settings):
    settings.setdefault("customers", reference_customers())
    return og.Gateway(og.Config(**settings), clock=clock or Clock(), rng=random.Random(seed))


def rpc(gw, method, params=None, *, path=None, token=None, request_id=1, headers=None):
    """Call a method through Gateway.handle_http; the HTTP status and the parsed body."""
    if path is None:
        path = "/internal" if method in og.Gateway.INTERNAL_METHODS else "/"
    request = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        request["params"] = params
    if request_id is not None:
        request["id"] = request_id
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["authorization"] = "Bearer " + token
    response = gw.handle_http("POST", path, all_headers, json.dumps(request).encode(), "127.0.0.1")
    return response.status, response.json()


def result(gw, method, params=None, **kwargs):
    status, body = rpc(gw, method, params, **kwargs)
    assert status == 200 and "result" in body, body
    return body["result"]


def error(gw, method, params=None, **kwargs):
    status, body = rpc(gw, method, params, **kwargs)
    assert status == 200 and "error" in body, body
    return body["error"]


def room(namespace, name, customer, peers=1):
    return {"id": [namespace, name], "customer": customer, "age": {"secs": 1, "nanos": 0},
            "peers": peers}


def report(gw, hostname=SFU1, rooms=(), load=0.0, **kwargs):
    params = {"public_endpoint": hostname, "version": "1.6.0", "load": load, "clients": 0,
              "rooms": list(rooms)}
    return result(gw, "sfu.Report", params, **kwargs)["tasks"]


def token(access_key=KEY_A, room_id="lobby", user="alice", now=NOW, **options):
    return og.create_token(access_key, room_id, user, now=now, **options)


def admin_token(room_id="lobby", access_key=KEY_A, now=NOW):
    return token(access_key, room_id, "admin", now=now, subject=[
        "connect", "roomclose", "roomupdate", "roombanclient", "roomsendmessage"])


def claims_of(jwt):
    return json.loads(og.b64url_decode(jwt.split(".")[1]))


def header_of(jwt):
    return json.loads(og.b64url_decode(jwt.split(".")[0]))


# ---------------------------------------------------------------------------
# Golden vectors: keys
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", ACCESS_KEYS["valid"], ids=lambda c: c["label"])
def test_access_key_vectors(case):
    seed31 = bytes.fromhex(case["seed_hex"])
    assert og.crc8(seed31) == case["crc8"]
    assert og.access_key_seed(case["access_key"]).hex() == case["ed25519_seed_hex"]
    assert og.public_jwk(case["access_key"]) == {
        "kid": case["kid"], "kty": "OKP", "crv": "Ed25519", "x": case["x"]}
    assert og.key_id(0x01, bytes.fromhex(case["public_key_hex"])) == case["kid"]


@pytest.mark.parametrize("case", ACCESS_KEYS["invalid"], ids=lambda c: c["reason"])
def test_invalid_access_keys_are_refused(case):
    with pytest.raises(ValueError, match="invalid access key"):
        og.access_key_seed(case["access_key"])


@pytest.mark.parametrize("case", ACCESS_KEYS["quirks"], ids=lambda c: c["access_key"])
def test_access_key_in_url_alphabet_is_accepted(case):
    assert og.public_jwk(case["access_key"])["x"] == case["x"]
    assert og.public_jwk(case["access_key"])["kid"] == case["kid"]


@pytest.mark.parametrize("case", ACCESS_KEYS["config_ts_keys"], ids=lambda c: c["kid_in_config"])
def test_kid_of_original_config_keys(case):
    assert og.key_id(0x01, og.b64url_decode(case["x"])) == case["kid_in_config"]


def test_generated_access_key_is_valid():
    key = og.generate_access_key()
    assert len(key) == 44
    raw = base64.b64decode(key)
    assert raw[0] == 1 and og.crc8(raw[1:32]) == raw[32]
    assert og.public_jwk(key)["kid"].startswith("A")  # version byte 0x01 in base64


@pytest.mark.parametrize("case", SERVER_KEYS["cases"], ids=lambda c: c["hostname"] + c["master_key"][:4])
def test_server_key_vectors(case):
    key = og.derive_server_key(base64.b64decode(case["master_key"]), case["hostname"])
    assert key.private_jwk() == case["jwk"]
    assert list(key.private_jwk()) == ["kid", "kty", "crv", "x", "d"]


# ---------------------------------------------------------------------------
# Golden vectors: room hashes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", ROOM_HASHES["cases"], ids=lambda c: c["note"])
def test_room_hash_vectors(case):
    assert og.room_base_name(case["name"]) == case["base_name"]
    if case["namespace_utf8_len"] > 255 or case["base_name_utf8_len"] > 255:
        # Improvement: the original wrapped the one-byte length; we refuse.
        with pytest.raises(ValueError, match="at most 255 bytes"):
            og.room_hash(case["namespace"], case["name"])
    else:
        assert og.room_hash(case["namespace"], case["name"]) == case["hash"]


def test_room_hash_refusals_are_covered_by_the_vectors():
    assert any(c["base_name_utf8_len"] > 255 for c in ROOM_HASHES["cases"])
    assert any(c["namespace_utf8_len"] > 255 for c in ROOM_HASHES["cases"])


def test_rooms_sort_like_javascript_locale_compare():
    data = ROOM_HASHES["locale_compare_sort"]
    assert sorted(data["input"], key=og.locale_order) == data["sorted_locale_compare"]
    assert sorted(data["input"]) != data["sorted_locale_compare"]


# ---------------------------------------------------------------------------
# Golden vectors: tokens
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", TOKENS["create_jwt"], ids=lambda c: c["name"])
def test_jwt_vectors_byte_for_byte(case):
    key_info = TOKENS["keys"][case["key"]]
    key = og.SigningKey(bytes.fromhex(key_info["d_hex"]), 0, kid=case["kid"])
    assert og.js_json(case["claims"]) == case["claims_json"]
    assert og.js_json({"alg": "EdDSA", "kid": case["kid"]}) == case["header_json"]
    assert og.encode_jwt(case["claims"], key) == case["token"]


CREATE_TOKEN_OPTIONS = {"audience", "subject", "lifetime", "customer", "internal"}
ODIN_TOKEN_CASES = [
    case for group in ("odin_tokens_1_4_0", "odin_tokens_2_2_0") for case in TOKENS[group]["cases"]
    if set(case["options"] or {}) <= CREATE_TOKEN_OPTIONS
]


def test_most_token_library_cases_are_covered():
    # Only the 2.2.0 case with address/tags/upstream is outside create_token.
    assert len(ODIN_TOKEN_CASES) >= 11


@pytest.mark.parametrize("case", ODIN_TOKEN_CASES, ids=lambda c: json.dumps(c["options"]))
def test_create_token_matches_the_odin_token_library(case):
    made = og.create_token(case["access_key"], case["room_id"], case["user_id"],
                           now=case["now_ms"] / 1000, **(case["options"] or {}))
    assert made == case["token"]


# The verdicts where PROTOCOL.md declares an improvement: what we answer instead.
IMPROVED_VERDICTS = {
    # Library errors leaked by the original become the documented reasons.
    "signature_wrong_length": "invalid signature in token",
    "signature_empty": "invalid signature in token",
    "signature_s_equals_l": "invalid signature in token",
    "signature_R_not_on_curve": "invalid signature in token",
    "signature_base64_plus": "invalid signature in token",
    "signature_len_mod4_1": "invalid signature in token",
    "basic_auth_not_base64": "invalid credentials",
    # Authorization schemes are case-insensitive (RFC 9110).
    "bearer_lowercase": "accepted",
    # Credentials followed by more text are refused.
    "trailing_garbage": "invalid authorization",
}


def _verdict_gateway(mode):
    unknown = "forbidden" if mode == "forbidden_mode" else {"max_peers": 10, "max_rooms": 5}
    gw = make_gateway(Clock(VERDICTS["now_ms"] / 1000), unknown_customers=unknown)
    report(gw, SFU1)  # the server key of sfu-1 is known to the gateway
    return gw


def _limit(value):
    return None if value == "Infinity" else value


@pytest.mark.parametrize("mode", ["forbidden_mode", "unknown_allowed_mode"])
@pytest.mark.parametrize("case", VERDICTS["cases"], ids=lambda c: c["id"])
def test_token_verdicts(case, mode):
    gw = _verdict_gateway(mode)
    expected = case[mode]
    improved = IMPROVED_VERDICTS.get(case["id"])
    if improved == "accepted":  # a valid token of key A
        expected = {"accepted": True, "namespace": "custom-ns",
                    "licensee": {"customerId": "odinref", "peerLimit": 50, "roomLimit": 10},
                    "claimSet": claims_of(case["authorization"].split(" ")[1])}
    elif improved is not None:
        expected = {"accepted": False, "message": improved}
    try:
        auth = gw.authorizer.authorize(case["authorization"], VERDICTS["now_s"],
                                       required_claims=("rid", "uid"))
    except og.TokenError as err:
        assert not expected["accepted"], "refused: %s" % err
        assert str(err) == expected["message"]
        return
    assert expected["accepted"], "accepted, expected %s" % expected["message"]
    licensee = expected["licensee"]
    assert (auth.licensee.customer_id, auth.licensee.peer_limit, auth.licensee.room_limit) == (
        licensee["customerId"], _limit(licensee["peerLimit"]), _limit(licensee["roomLimit"]))
    assert auth.namespace == expected["namespace"]
    assert auth.claims == expected["claimSet"]


def test_every_improved_verdict_names_a_real_case():
    ids = {case["id"] for case in VERDICTS["cases"]}
    assert set(IMPROVED_VERDICTS) <= ids


IMPROVED_BASIC = {
    # RFC 7617: the password is everything after the first colon.
    "basic_extra_colon": "invalid credentials",
    # The original crashed with a TypeError.
    "basic_no_colon": "invalid credentials",
}


@pytest.mark.parametrize("case", VERDICTS["basic_auth_with_table"]["cases"], ids=lambda c: c["id"])
def test_basic_auth_verdicts(case):
    table = VERDICTS["basic_auth_with_table"]["table"]
    scheme, credentials = og.split_authorization(case["authorization"])
    assert scheme == "Basic"
    expected = case["result"]
    if case["id"] in IMPROVED_BASIC:
        expected = {"accepted": False, "message": IMPROVED_BASIC[case["id"]]}
    if expected["accepted"]:
        auth = og.check_basic(credentials, table)
        assert auth.licensee.customer_id == expected["licensee"]["customerId"]
        assert auth.licensee.peer_limit is None and auth.licensee.room_limit is None
        assert auth.namespace is None and auth.claims == {}
    else:
        with pytest.raises(og.TokenError, match="^%s$" % expected["message"]):
            og.check_basic(credentials, table)


def test_basic_password_may_contain_colons():
    credentials = base64.b64encode(b"admin:pa:ss").decode()
    assert og.check_basic(credentials, {"admin": "pa:ss"}).licensee.customer_id == "admin"


# ---------------------------------------------------------------------------
# Golden vectors: sfu.GridConfig
# ---------------------------------------------------------------------------


def _grid_config(gw, case):
    params = {"version": "1.6.0", "config": case["input_config"]}
    if case["public_endpoint"] is not None:
        params["public_endpoint"] = case["public_endpoint"]
    return rpc(gw, "sfu.GridConfig", params)[1]


def _server_jwk(hostname):
    return next(c["jwk"] for c in SERVER_KEYS["cases"]
                if c["hostname"] == hostname and c["master_key"] == og.DEFAULT_MASTER_KEY)


@pytest.mark.parametrize("case", GRID_CONFIGS["cases"], ids=lambda c: c["name"])
def test_grid_config_vectors(case):
    gw = make_gateway()
    body = _grid_config(gw, case)
    name = case["name"]
    if name == "invalid_toml":
        # Improvement: -32600 saying where the TOML is wrong, not -32603.
        assert body["error"]["code"] == -32600
        assert body["error"]["message"].startswith("invalid TOML in config:")
        return
    if name == "authorization_is_array_of_tables":
        # Improvement: the original silently dropped the server's key.
        assert body["error"]["code"] == -32600
        assert "authorization must be a table" in body["error"]["message"]
        return
    config = tomllib.loads(body["result"]["config"])
    if case.get("error"):
        # Improvement: an empty or comment-only config is valid TOML.
        assert not tomllib.loads(case["input_config"])
        hostname = case["public_endpoint"] or "127.0.0.1:4433"
        assert config["authorization"]["keys"] == [_server_jwk(hostname)]
        assert config["supervisor"] == {"report_interval": 5000}
        return
    expected = case["output_parsed"]
    if name == "value_types":
        # Improvement: values keep their TOML type (the original turned 0x10
        # into the string "0x10" and the float 1e3 into an integer).
        assert config["hexv"] == 16 and isinstance(config["expf"], float)
        expected = dict(expected, hexv=16, expf=1000.0)
    assert config == expected
    assert list(config) == list(expected)  # the server's keys first, in order


def test_grid_config_output_is_byte_identical_where_types_allow():
    gw = make_gateway()
    identical = [c["name"] for c in GRID_CONFIGS["cases"] if c.get("output_config")
                 and _grid_config(gw, c).get("result", {}).get("config") == c["output_config"]]
    assert len(identical) >= 8, identical


TOML_DOCUMENTS = [
    {},
    {"big": 2**70, "neg": -(2**63), "hex": 0x10, "f": 1.0, "nz": -0.0, "tiny": 5e-324, "e": 1e300},
    {"inf": math.inf, "ninf": -math.inf},
    {"s": "tab\t quote\" back\\ nl\n cr\r ff\f bs\b ctl\x01 del\x7f é 😀 \u2028"},
    {"dt": __import__("datetime").datetime(1979, 5, 27, 7, 32, 0, 999000,
                                           tzinfo=__import__("datetime").timezone(
                                               __import__("datetime").timedelta(hours=-7))),
     "local": __import__("datetime").datetime(1979, 5, 27, 7, 32),
     "day": __import__("datetime").date(1979, 5, 27),
     "t": __import__("datetime").time(7, 32, 0, 123000)},
    {"a": {"b": {"c": 1}}, "e": {}, "arr": [], "mixed": [1, "a", [2.5, True], {"x": 1}]},
    {"aot": [{"n": 1, "sub": {"k": "v"}, "deep": [{"m": 2}]}, {"n": 2}]},
    {"quoted key": 1, "a.b": 2, "": 3, "ünï": 4, "k": {"inline": {"x": [{"y": 1}], "z": {}}}},
]


@pytest.mark.parametrize("document", TOML_DOCUMENTS)
def test_toml_writer_round_trips_every_value_and_type(document):
    text = og.toml_dumps(document)
    parsed = tomllib.loads(text)
    assert parsed == document
    assert typed(parsed) == typed(document)  # types too: 1.0 stays a float, -0.0 keeps its sign


def typed(value):
    """value with the type of every leaf made visible (so 1 != 1.0 and 0.0 != -0.0)."""
    if isinstance(value, dict):
        return {key: typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [typed(item) for item in value]
    return type(value).__name__, repr(value)


def test_toml_writer_round_trips_nan():
    assert math.isnan(tomllib.loads(og.toml_dumps({"x": math.nan}))["x"])


# ---------------------------------------------------------------------------
# Golden vectors: the original's recorded HTTP session, replayed over a socket
# ---------------------------------------------------------------------------

GATEWAY_HEADERS = {
    "access-control-allow-origin": "*",
    "access-control-allow-headers": "Authorization,Content-Type",
    "access-control-request-method": "POST",
    "cache-control": "no-store",
}
_INFO_TIMES = ("firstSeen", "lastSeen", "updated")


def _mask_times(info):
    for entry in info["result"]["servers"] + info["result"]["rooms"]:
        for name in _INFO_TIMES:
            if name in entry:
                assert og.iso_time(0) != entry[name] and entry[name].endswith("Z")
                entry[name] = "<time>"
    return info


def _field_errors(*fields):
    def check(status, body, headers):
        assert status == 200
        assert body["error"]["code"] == -32600
        assert set(body["error"]["data"]["fieldErrors"]) == set(fields)
        for field in fields:
            assert field in body["error"]["message"]
    return check


def _status_and_error(status_code, code, message_part):
    def check(status, body, headers):
        assert status == status_code
        assert body["error"]["code"] == code and message_part in body["error"]["message"]
    return check


def _reference_info(step, api_call_changes):
    """The original's Info answer at step, with our documented differences in the stats."""
    body = _mask_times(json.loads(STEPS[step]["response"]["body_text"]))
    for entry in body["result"]["stats"]["apiCalls"]:
        entry.update(api_call_changes.get(entry["name"], {}))

    def check(status, got, headers):
        assert status == 200
        assert _mask_times(got) == body
    return check


def _empty_config_accepted(status, body, headers):
    config = tomllib.loads(body["result"]["config"])
    assert config["authorization"]["keys"] == [_server_jwk(SFU1)]


def _head_405(status, body, headers):
    assert status == 405 and body is None and headers["allow"] == "POST, OPTIONS"


def _lowercase_bearer_accepted(status, body, headers):
    assert status == 200 and body["result"]["address"] == SFU1


def _undrained_task_delivered(status, body, headers):
    assert body["result"]["tasks"] == [
        {"task": "RoomUpdate", "id": ["custom-ns", "lobby"], "user_data": []}]


STEPS = {entry["step"]: entry for entry in TRANSCRIPT["entries"]}
# Steps where PROTOCOL.md declares an improvement: what we answer instead.
IMPROVED_STEPS = {
    9: _status_and_error(405, -32600, "method not allowed"),  # GET
    10: _head_405,  # HEAD
    14: _empty_config_accepted,  # empty TOML is valid
    17: _field_errors("server", "version", "config"),
    22: _reference_info(22, {"sfu.GridConfig": {"success": 2, "failure": 0}}),
    24: _field_errors("server"),
    35: _field_errors("uid"),
    36: _status_and_error(200, -32602, "params must be an object"),
    38: _status_and_error(401, -32600, "token has expired"),
    39: _status_and_error(401, -32600, "not authorized"),
    40: _status_and_error(401, -32600, "token audience does not match"),
    41: _lowercase_bearer_accepted,
    49: _field_errors("user_data"),
    52: _field_errors("room_id"),
    57: _undrained_task_delivered,  # the notification of step 56 left it queued
    64: _status_and_error(200, -32602, "params must be an object"),
    65: _status_and_error(200, -32602, "Invalid params"),
    73: _status_and_error(405, -32600, "method not allowed"),  # PUT
    75: _reference_info(75, {"sfu.GridConfig": {"success": 2, "failure": 0},
                             "Connect": {"success": 6}}),
}


def test_transcript_replay_over_http():
    clock = Clock(1795630240.0)
    gw = make_gateway(clock)
    import http.client

    with og.serve_in_thread(gateway=gw) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        for step, entry in sorted(STEPS.items()):
            request, expected = entry["request"], entry["response"]
            if entry["sleep_before_s"]:
                clock.advance(entry["sleep_before_s"])
                gw.tick()
            for issued in expected.get("tokens") or []:
                clock.now = issued["claims"]["nbf"] + 0.25  # so signatures match byte for byte
            headers = {k: v for k, v in request["headers"] if k.lower() not in ("host", "content-length")}
            body = request["body"].encode() if request["body"] is not None else None
            connection.request(request["method"], request["path"], body=body, headers=headers)
            response = connection.getresponse()
            raw = response.read()
            got_headers = {k.lower(): v for k, v in response.getheaders()}
            status = response.status
            parsed = json.loads(raw) if raw else None
            for name, value in GATEWAY_HEADERS.items():
                assert got_headers.get(name) == value, (step, name)
            assert "content-encoding" not in got_headers
            if raw:
                assert got_headers["content-type"] == "application/json", step
            elif request["method"] != "HEAD":  # HEAD has the headers of the body it omits
                assert "content-type" not in got_headers, step
            check = IMPROVED_STEPS.get(step)
            if check is not None:
                check(status, parsed, got_headers)
                continue
            assert status == expected["status"], (step, entry["note"], raw)
            assert raw.decode() == expected["body_text"], (step, entry["note"])
        connection.close()


def test_transcript_improvements_name_real_steps():
    assert set(IMPROVED_STEPS) <= set(STEPS)
    assert len(STEPS) == 75
