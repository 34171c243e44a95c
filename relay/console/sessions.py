"""Who may use the console, and proof that a form came from it.

Logins are by token (console.token: an operator, who may act; console.read_token: a reader,
who may look). A login opens a session, kept in memory (a restart logs everyone out), named by a
random cookie that scripts cannot read (HttpOnly) and browsers never send with a request another
site started (SameSite=Strict). Every form carries the session's own random CSRF token, checked
on each POST; a POST whose Origin is another, or that a browser marks as cross-site
(Sec-Fetch-Site), is refused before that. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass, field

from relay.settings import ConsoleSettings

COOKIE = "relay_console"
SESSION_SECONDS = 12 * 3600  # a session ends this long after its login, whatever happens
MAX_SESSIONS = 1000  # beyond, the oldest ends (a flood of logins cannot grow memory for ever)
OPERATOR, READER = "operator", "reader"


@dataclass(slots=True)
class Session:
    role: str  # OPERATOR | READER
    who: str  # the name given at login, for the log
    started: float = field(default_factory=time.monotonic)
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    notice: str = ""  # shown once on the next page: what an action did

    @property
    def may_act(self) -> bool:
        return self.role == OPERATOR

    def take_notice(self) -> str:
        notice, self.notice = self.notice, ""
        return notice


class Sessions:
    def __init__(self, console: ConsoleSettings) -> None:
        self._console = console
        self._open: dict[str, Session] = {}

    def login(self, token: str, who: str) -> tuple[str, Session] | None:
        """A new session (its cookie value and itself) for a token that matches, else None."""
        role = self._role_of(token)
        if role is None:
            return None
        if len(self._open) >= MAX_SESSIONS:
            del self._open[next(iter(self._open))]
        key = secrets.token_urlsafe(32)
        session = Session(role, who)
        self._open[key] = session
        return key, session

    def get(self, key: str | None) -> Session | None:
        session = self._open.get(key or "")
        if session is not None and time.monotonic() - session.started > SESSION_SECONDS:
            del self._open[key or ""]
            return None
        return session

    def logout(self, key: str | None) -> None:
        self._open.pop(key or "", None)

    def _role_of(self, token: str) -> str | None:
        # Both compared, whichever matches: the time taken says nothing of either
        found = None
        for role, secret in ((OPERATOR, self._console.token), (READER, self._console.read_token)):
            if secret is not None and same(token, secret.value) and found is None:
                found = role
        return found


def same(given: str, expected: str) -> bool:
    """Constant time in what `given` holds (hmac.compare_digest)."""
    return hmac.compare_digest(given.encode(), expected.encode())


def cross_site(origin: str | None, fetch_site: str | None, own_origin: str) -> bool:
    """A browser's request that another site, or another origin, started: refused for any POST.
    A client that sends neither header (curl) is no browser a page could have driven."""
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return True
    return origin is not None and origin != own_origin
