"""What `framecast play` refuses before a message reaches a session (docs/world_model.md, "Live play").

- `Guard`, an ASGI middleware in front of every route: the Host header must name this server (its own
  host:port, or localhost / 127.0.0.1 / [::1] on its port), so a DNS-rebinding page cannot read it; an Origin
  header, which every browser sends on a WebSocket handshake, must be the same origin (or in `allow_origins`),
  so a page on another site cannot stream (cross-site WebSocket hijacking); and with a `token` every request
  must carry it (`?token=...`, or `Authorization: Bearer ...`). A refused WebSocket is closed before it is
  accepted (uvicorn answers HTTP 403; close code 1008, policy violation); a refused request gets a 403.
- `parse_message`: a page message is a JSON object of at most MAX_MESSAGE characters nested at most
  MAX_DEPTH deep; the depth is counted before `json.loads`, whose recursion a deeply nested message would
  blow up. Every refusal is a RequestError naming the problem (architecture.md §5).
"""

import hmac
import json
import re
from urllib.parse import parse_qs, urlsplit

from ..errors import ConfigError, RequestError

MAX_MESSAGE = 4096  # characters; the page's messages are tiny, anything larger is malformed
MAX_DEPTH = 32      # nesting of arrays and objects; the page's messages nest 1 deep
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes [0, 2**64 - 1]
SEQ_MAX = 2**53 - 1   # the page counts in JavaScript numbers, exact up to 2**53 - 1
CLOSE_POLICY = 1008   # RFC 6455: "policy violation"
LOOPBACK = frozenset({"localhost", "127.0.0.1", "[::1]"})
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]')  # a JSON string (brackets in it do not nest) or a bracket
DEFAULT_PORT = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def json_depth(raw: str, limit: int = MAX_DEPTH) -> int:
    """How deep the arrays and objects of the JSON text `raw` nest, counting stops past `limit`."""
    depth = peak = 0
    for m in _TOKENS.finditer(raw):
        c = m.group()
        if c in "[{":
            depth += 1
            peak = max(peak, depth)
            if peak > limit:
                break
        elif c in "]}":
            depth -= 1
    return peak


def parse_message(raw: str) -> dict:
    """A page message -> the JSON object, or a RequestError naming why it is refused."""
    if len(raw) > MAX_MESSAGE:
        raise RequestError(f"message of {len(raw)} bytes (limit {MAX_MESSAGE})")
    if json_depth(raw) > MAX_DEPTH:
        raise RequestError(f"message nests deeper than {MAX_DEPTH} levels (limit {MAX_DEPTH})")
    try:
        msg = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; recursion: belt and braces
        raise RequestError(f"not JSON: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise RequestError('a message must be a JSON object with a "type"')
    return msg


def check_int(name: str, value, lo: int, hi: int, allowed: str) -> int:
    """`value` if it is an integer in [lo, hi] (JSON true/false are not), else a RequestError naming `name` and
    the `allowed` range."""
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise RequestError(f'"{name}" must be {allowed}, got {shown}')
    return value


def check_seed(seed) -> int:
    return check_int("seed", seed, 0, SEED_MAX, "a non-negative integer in [0, 2**64 - 1]")


def _host_port(netloc: str, scheme: str) -> tuple[str, int | None]:
    """"Host:8000" -> ("host", 8000); "[::1]" -> ("[::1]", the scheme's default port); port None if invalid."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        name, _, rest = netloc.partition("]")
        name, port = name + "]", rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port = netloc.partition(":")
    if not port:
        return name, DEFAULT_PORT.get(scheme)
    return name, int(port) if port.isdigit() and 0 < int(port) < 65536 else None


def _among(host_port: tuple[str, int | None], own: set) -> bool:
    """Whether (name, port) is one of `own`, where a port None in `own` stands for any port."""
    return host_port[1] is not None and (host_port in own or (host_port[0], None) in own)


def normalise_origin(origin: str) -> str:
    """ "HTTP://Host:80/" -> "http://host" (the form a browser sends), or a ConfigError naming allow_origins."""
    if origin == "*":
        return origin
    try:
        parts = urlsplit(origin.strip())
    except ValueError:  # "http://[::1"
        parts = None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.netloc or "@" in parts.netloc
            or parts.path not in ("", "/") or parts.query or parts.fragment):
        raise ConfigError(f"allow_origins: {origin[:100]!r} is not an origin; write scheme://host[:port] "
                          "(e.g. http://myhost:8000) or '*'")
    name, port = _host_port(parts.netloc, parts.scheme)
    if port is None:
        raise ConfigError(f"allow_origins: {origin[:100]!r} has a port outside 1..65535")
    return f"{parts.scheme}://{name}" + ("" if port == DEFAULT_PORT[parts.scheme] else f":{port}")


class Guard:
    """ASGI middleware: Host / Origin allow-list and the optional token in front of the app (module docstring)."""

    def __init__(self, app, allow_origins=(), token: str | None = None) -> None:
        if token is not None and (not isinstance(token, str) or not token or len(token) > 512
                                  or not token.isprintable() or " " in token):
            raise ConfigError("token must be None or a non-empty printable string without spaces (at most 512 "
                              "characters)")
        if isinstance(allow_origins, str):
            allow_origins = [allow_origins]
        if not all(isinstance(o, str) for o in allow_origins):
            raise ConfigError(f"allow_origins must be a list of origins (strings), got {list(allow_origins)!r}")
        self.app, self.token = app, token
        self.origins = {normalise_origin(o) for o in allow_origins}
        self.any = "*" in self.origins
        self.hosts = {_host_port(urlsplit(o).netloc, urlsplit(o).scheme) for o in self.origins - {"*"}}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        why = self.refusal(scope)
        if why is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":  # before accept: the handshake is refused with HTTP 403
            return await send({"type": "websocket.close", "code": CLOSE_POLICY, "reason": why})
        body = json.dumps({"type": "error", "error": why}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def refusal(self, scope) -> str | None:
        """Why this request is refused, or None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in reversed(scope.get("headers", []))}
        scheme = scope.get("scheme", "http")
        own = self.own_hosts(scope)
        if not self.any and not _among(_host_port(headers.get("host", ""), scheme), own):
            return "this server answers only to its own host name (a foreign Host header: DNS rebinding?)"
        origin = headers.get("origin")
        if origin is not None and not self.any and not self.same_origin(origin, scheme, own):
            return f"origin {origin[:100]!r} is not allowed (same origin only; see allow_origins)"
        if self.token is not None and not self.has_token(scope, headers):
            return "a token is needed: open the URL the server printed (with ?token=...)"
        return None

    def own_hosts(self, scope) -> set[tuple[str, int | None]]:
        """(name, port) pairs that name this server: the address the connection reached and loopback, on its
        port, and the allowed origins' hosts. On a unix socket (no port): loopback names, port None = any."""
        name, port = (scope.get("server") or (None, None))[:2]
        names = set(LOOPBACK)
        if isinstance(name, str) and name and port is not None:
            names.add(f"[{name.lower()}]" if ":" in name and not name.startswith("[") else name.lower())
        return {(n, None if port is None else int(port)) for n in names} | self.hosts

    def same_origin(self, origin: str, scheme: str, own) -> bool:
        try:
            o = normalise_origin(origin)
        except ConfigError:
            return False  # "null", a file: page, garbage
        if o in self.origins:
            return True
        parts = urlsplit(o)
        secure = scheme in ("https", "wss")
        return parts.scheme == ("https" if secure else "http") and _among(_host_port(parts.netloc, parts.scheme), own)

    def has_token(self, scope, headers: dict) -> bool:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        given = query.get("token", [""])[-1]
        auth = headers.get("authorization", "")
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode("utf-8", "replace"), self.token.encode())
