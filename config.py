# Sample configuration of odin_gateway.py.
#
# A plain Python module: the gateway runs it and takes the names below. Every
# name is optional; each is shown here with its default unless said otherwise.
# None means "unlimited" wherever a limit is expected. Command-line flags
# (--host, --port, --ssl, --certificate, --privatekey) override this file.
# Settings are lower case: a name close to one (PORT, customer) stops the start,
# any other is reported as unknown, except names that start with "_": use those
# for constants of your own (_REGION = "eu", not REGION = "eu").
#
#   python odin_gateway.py                     # uses ./config.py
#   python odin_gateway.py --config /etc/odin-gateway/config.py

# -- Logging ------------------------------------------------------------------
log_level = "INFO"          # DEBUG, INFO, WARNING, ERROR, CRITICAL
log_format = "pretty"       # "pretty" for people, "json" for one object per line
access_log = False          # one log line per HTTP request (also: --access-log)

# -- Listening ----------------------------------------------------------------
host = "0.0.0.0"
port = 7000
ssl = False                 # serve HTTPS with the two PEM files below
certificate = "fullchain.pem"
private_key = "privkey.pem"

# -- Keys ---------------------------------------------------------------------
# The master key (base64) from which every media server's signing key is
# derived. This default is public knowledge: anyone who knows it can forge
# room tokens. Make your own with:  python odin_gateway.py keygen --master
# Better kept out of this file: the environment variable ODIN_GATEWAY_MASTER_KEY
# or --master-key-file FILE take precedence over this setting.
master_key = "VGhpcyBpcyBhIHN1cGVyIHNlY3JldCBtYXN0ZXIga2V5IQ=="

# -- Customers ----------------------------------------------------------------
# Each customer has limits and the *public* keys of its access keys. Add a
# customer's key with the output of:  python odin_gateway.py keygen
# Default: [] (no customers, which puts the gateway in the "everything goes"
# demo mode: any token is accepted as a demo customer).
customers = [
    {
        # FOR LOCAL TESTING ONLY. The access key of this customer is printed
        # in README.md, so anyone can sign tokens for it:
        #   Aa6xMG5KsCRp0BevxLhsLzSdBAEpJK9sxcvscAsK5+8j
        # Remove this customer before the gateway faces a network.
        "id": "demo",
        "max_peers": 100,   # concurrent peers over all its rooms (None: unlimited)
        "max_rooms": 20,    # concurrent rooms (None: unlimited)
        # "region": "eu-central",  # where its new rooms prefer to go (see server_labels below)
        # "pool": "acme",          # only servers of this pool, which serve no one else
        "access_keys": [
            {
                "public_key": {
                    "kid": "ARjlCj4VESC3",
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "x": "IIy5Y30wG7_fGPlMjHfwMBHkoAF0K333UNl5xvymUMY",
                },
                "namespace": None,  # rooms live in this namespace; None: the customer id
            },
        ],
    },
]

# Customers can also come from a function, called at start and then every
# update_interval seconds; it returns a list shaped like `customers` (the
# original's camelCase names such as maxPeers are accepted too). It may be a
# plain or an async function. When it raises or returns no usable key, the
# previous keys stay in force. Default: None.
#
# def fetch_customers():
#     import json, urllib.request
#     with urllib.request.urlopen("https://example.com/api/customer-keys", timeout=10) as reply:
#         return json.load(reply)
#
# customer_api = {"update_function": fetch_customers, "update_interval": 300}
customer_api = None

# Tokens whose key id belongs to no customer: "forbidden", or admitted as
# customer "demo_<kid>" with these limits, without any signature check.
# unknown_customers = {"max_peers": 10, "max_rooms": 5}
unknown_customers = "forbidden"

# -- The internal endpoint (/internal) ----------------------------------------
# Servers register there and receive their signing keys. With users set, a
# Basic Authorization header is required: point each server's supervisor url
# at http://user:password@gateway:7000/internal. Empty: open to anyone who
# reaches the port (the gateway warns at start).
internal_users = {}         # e.g. {"sfu": "a long random password"}

# -- Media servers ------------------------------------------------------------
# How a new room finds its server: "balanced" picks the least loaded server,
# counting the peers sent to it since its last report; "random" picks at
# random, weighted by free capacity, as the original gateway did.
placement = "balanced"

# -- Regions and pools (README: "Regions and pools") --------------------------
# Labels for media servers, by hostname pattern (fnmatch-style, * and ?,
# case-insensitive); the first rule that matches decides what it names
# ("region", "pools" or both), and a server's own report the rest. A server
# with pools takes rooms only of customers with one of those pools (customer
# setting "pool"); a customer with a pool gets only that pool's servers.
# server_labels = [
#     {"match": "sfu-eu-*", "region": "eu-central"},
#     {"match": "acme-*", "region": "eu-central", "pools": ["acme"]},
# ]
server_labels = []
# Where a new room goes when its region (the token's internal.region, else the
# customer's "region") has no server with capacity: these regions in order,
# then any region.
# region_fallback = {"eu-central": ["eu-west", "us-east"], "us-east": ["us-west"]}
region_fallback = {}

metrics_server = "0.0.0.0/0"  # network allowed to scrape the servers' metrics
update_interval = 5           # s between server reports and maintenance ticks
# disable_timeout and login_token_lifetime must exceed update_interval, and
# remove_timeout disable_timeout: else servers or rooms go between two reports.
disable_timeout = 7.5         # s without a report before a server gets no new rooms
remove_timeout = 600          # s without a report before a server is forgotten
login_token_lifetime = 300    # s a room token (and a room never reported) lives
# After a start without saved state, a Connect for a room no server has
# reported waits this long (None: update_interval + 2 s; 0: not at all), so
# that a room living on a server yet to report is not placed elsewhere.
warmup = None
# A file where the gateway keeps what a restart or a crash must not lose:
# admin tasks it answered but has not delivered yet, and where every room
# lives. Read at start if younger than remove_timeout (then no warm-up);
# None: nothing is saved.
state_file = None             # e.g. "/var/lib/odin-gateway/state.jsonl"

# -- Several gateways ---------------------------------------------------------
# A Redis URL (redis://[:password@]host:port/db, rediss:// for TLS, unix://)
# shares servers, rooms, usage and admin tasks between gateways; needs
# pip install "odin-gateway[cluster]" (redis-py). None: one process alone.
# See README, "Running several gateways".
cluster = None                # e.g. "redis://:secret@redis.internal:6379/0"
cluster_timeout = 0.25        # s any Redis call may take; then the gateway serves alone
cluster_heartbeat = 1.0       # s between heartbeats; 3 missed: the member is dropped
workers = 1                   # processes on this box sharing the port (needs cluster)

# -- Event feed ---------------------------------------------------------------
# The newest events (servers added, disabled, draining; rooms placed and gone;
# limit refusals; tasks queued and delivered...) kept for the Events method on
# /internal and the status page (/status). Older ones fall out.
max_events = 1000

# -- Limits -------------------------------------------------------------------
# What one client may cost the gateway. A request over a limit gets the HTTP
# status named here and its connection is closed; see README, "Security and
# limits".
max_request_line = 8192       # bytes in the request line (414)
max_head_bytes = 16384        # bytes in the request line and headers (431)
max_headers = 100             # header fields (431)
max_body_bytes = 1048576      # bytes in a body, checked before reading it (413)
max_internal_body_bytes = 33554432  # bytes in a body to /internal (servers' reports) (413)
max_chunk_line = 1024         # bytes in a chunk size line of a chunked body (400)
max_connections = 1024        # open connections; more get 503 (clamped to the open-file limit)
backlog = 1024                # connections the kernel queues before they are accepted
max_batch = 100               # requests in one JSON-RPC batch
max_queued_tasks = 10000      # admin tasks waiting for one server; more are refused
read_timeout = 10.0           # s for each of the next three left None
first_byte_timeout = None     # s a new connection may take to send its first byte
head_timeout = None           # s from a request's first byte to the end of its head (408)
body_timeout = None           # s from the end of a request's head to the end of its body (408)
keep_alive_timeout = 75.0     # s an idle connection is kept open between requests
write_timeout = 10.0          # s a client may take to read more of an answer
linger_timeout = 1.0          # s a closing connection is read from, so its last answer arrives
max_linger_bytes = 4194304    # bytes read (and dropped) while lingering
receive_size = 65536          # bytes read from a connection at once
max_write_buffer = 65536      # unsent bytes per connection before it waits for its client
max_unsent_bytes = 67108864   # bytes of large answers waiting for their clients, in all (503)
shutdown_timeout = 10.0       # s a stop waits for requests in flight
customer_update_timeout = 30.0  # s the customer update function may take
