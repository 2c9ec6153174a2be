"""``accept-mqtt broker``: set up and run a fleet Mosquitto with per-client passwords and an ACL.

Sub-commands::

    accept-mqtt broker init DIR                  # DIR/fleet.conf, empty DIR/passwd and DIR/acl
    accept-mqtt broker add-device NAME --dir DIR       # password entry + device ACL block
    accept-mqtt broker add-coordinator NAME --dir DIR  # may drive jobs, reads everything
    accept-mqtt broker add-monitor NAME --dir DIR      # reads everything, publishes nothing
    accept-mqtt broker remove NAME --dir DIR
    accept-mqtt broker run --dir DIR             # mosquitto -c DIR/fleet.conf, in the foreground

Guarantees:

* ``init`` never overwrites an existing file unless ``--force``.
* Password entries are Mosquitto 2.0 ``$7$`` hashes (PBKDF2-HMAC-SHA512) computed here with
  ``hashlib``: no ``mosquitto_passwd`` binary is needed. One line per user; re-adding a user
  replaces its line (a new password), other lines are kept verbatim.
* Each client's ACL lines sit in one block between ``# BEGIN accept-mqtt ROLE NAME`` and
  ``# END accept-mqtt NAME``; re-adding replaces that block (never a duplicate), ``remove``
  deletes it, and lines written by hand elsewhere are kept. A hand-written ``user NAME`` block
  for the same name is an error rather than a second, conflicting block.
* ``passwd`` and ``acl`` are rewritten atomically (temporary file, then rename) with mode 0600
  and their previous owner; ``init`` run as root hands them and ``data/`` to the
  ``mosquitto`` user when it exists, because Mosquitto reads them after dropping privileges.
* Names follow the topic id rule (``topics.check_id``: ``[A-Za-z0-9_-]{1,64}``), so a name can
  never smuggle ``+``, ``#``, ``/`` or ``:`` into a topic, an ACL line or the password file.
* Every error is one line on stderr and exit code 2; no tracebacks.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import os
import re
import secrets
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from accept_mqtt.wire.topics import TopicError, Topics, check_id

TEMPLATE = Path(__file__).resolve().parent / "templates" / "fleet.conf"
DIR_PLACEHOLDER = "@DIR@"
ROLES = ("device", "coordinator", "monitor")
# mosquitto_passwd's own defaults (Mosquitto 2.0): 12 salt bytes, 101 PBKDF2 rounds. Generated
# passwords carry 144 random bits, so key stretching would add nothing for them.
ITERATIONS = 101
SALT_BYTES = 12
SERVICE_USER = "mosquitto"

ACL_HEADER = """\
# Mosquitto ACL of an accept-mqtt fleet broker (docs/security.md).
#
# Managed by `accept-mqtt broker add-device / add-coordinator / add-monitor / remove`: each
# client's lines sit between its BEGIN and END comments and are replaced as a whole. Put lines
# of your own in their own `user NAME` block: a `topic` line belongs to the last `user` line
# above it. Nothing may come before the first `user` line (anonymous clients are refused).
"""


class SetupError(Exception):
    """A user-facing problem (bad name, missing directory, file exists): one line, exit 2."""


# -- password hashes ---------------------------------------------------------------------------
def hash_password(password: str, *, salt: bytes | None = None,
                  iterations: int = ITERATIONS) -> str:
    """``$7$<iterations>$<base64 salt>$<base64 hash>``: what Mosquitto 2.0 expects after
    ``user:`` in a password file (PBKDF2-HMAC-SHA512, 64-byte hash, standard base64).

    >>> hash_password("secret", salt=bytes(12))[:24]
    '$7$101$AAAAAAAAAAAAAAAA$'
    """
    if not password:
        raise SetupError("the password must not be empty")
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    b64 = lambda b: base64.b64encode(b).decode("ascii")
    return f"$7${iterations}${b64(salt)}${b64(digest)}"


def check_password(password: str, encoded: str) -> bool:
    """True when ``password`` matches a ``$7$`` entry (as Mosquitto would decide)."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt, want = base64.b64decode(parts[3]), base64.b64decode(parts[4])
    except ValueError:
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, int(parts[2]))
    return hmac.compare_digest(got, want)


def generate_password() -> str:
    """24 URL-safe characters (144 random bits): fits in a URL without quoting."""
    return secrets.token_urlsafe(18)


# -- ACL -----------------------------------------------------------------------------------------
def acl_lines(role: str, name: str, root: str = "accept") -> list[str]:
    """The ``user`` line and ``topic`` lines of one client (docs/security.md has the table).

    A device writes its own status and profile (the Last Will is its status), its own timing,
    events and trace spans, frames and weights, and error reports on metrics; it reads plans,
    coordinators' liveness, frames, sync, control and weights (a restore after a re-plan), and
    its own status and probe topic (the twin check, ``wire.liveness``). A coordinator writes
    what drives a job (plan, liveness, probes, control, sync, inputs, metrics, weights to
    restore) and reads the whole tree; a monitor only reads.
    """
    check_id(role, name)
    r = Topics(root).root
    j = f"{r}/jobs/+"
    if role == "device":
        writes = [f"{r}/devices/{name}/status", f"{r}/devices/{name}/profile",
                  f"{r}/devices/{name}/probe",
                  f"{j}/timing/{name}", f"{j}/events/{name}", f"{j}/trace/{name}",
                  f"{j}/stage/+/fwd", f"{j}/stage/+/bwd", f"{j}/metrics", f"{j}/weights/+"]
        reads = [f"{r}/devices/{name}/status", f"{r}/devices/{name}/probe",
                 f"{j}/plan", f"{j}/coordinator", f"{j}/stage/#", f"{j}/sync", f"{j}/control",
                 f"{j}/weights/+"]
    elif role == "coordinator":
        writes = [f"{j}/plan", f"{j}/coordinator", f"{j}/probe", f"{j}/control", f"{j}/sync",
                  f"{j}/stage/0/fwd", f"{j}/metrics", f"{j}/weights/+"]
        reads = [f"{r}/#"]
    elif role == "monitor":
        writes, reads = [], [f"{r}/#"]
    else:
        raise SetupError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    return ([f"user {name}"] + [f"topic write {t}" for t in writes]
            + [f"topic read {t}" for t in reads])


def _begin(role: str, name: str) -> str:
    return f"# BEGIN accept-mqtt {role} {name}"


def _end(name: str) -> str:
    return f"# END accept-mqtt {name}"


_BEGIN_RE = re.compile(r"^# BEGIN accept-mqtt (\S+) (\S+)\s*$")


def acl_block(role: str, name: str, root: str = "accept") -> list[str]:
    """``acl_lines`` between this client's BEGIN and END markers."""
    return [_begin(role, name), *acl_lines(role, name, root), _end(name)]


def strip_acl_block(text: str, name: str) -> tuple[str, str | None]:
    """``text`` without ``name``'s managed block, and the role that block had (None: none).

    Raises ``SetupError`` for a block without its END line, or a hand-written ``user NAME``
    line outside managed blocks (it would silently grant or shadow rights).
    """
    out: list[str] = []
    role: str | None = None
    inside = False
    for n, line in enumerate(text.splitlines(), 1):
        m = _BEGIN_RE.match(line)
        if m and m.group(2) == name:
            role, inside = m.group(1), True
            if out and not out[-1].strip():
                out.pop()  # the blank line that separated the block
            continue
        if inside:
            inside = line.strip() != _end(name)
            continue
        if re.match(rf"^\s*user\s+{re.escape(name)}\s*$", line):
            raise SetupError(f"acl line {n}: a hand-written 'user {name}' block exists; "
                             "remove it first")
        out.append(line)
    if inside:
        raise SetupError(f"acl: the block of {name} has no '{_end(name)}' line; fix it by hand")
    while out and not out[-1].strip():
        out.pop()
    return ("\n".join(out) + "\n") if out else "", role


def acl_roles(text: str) -> dict[str, str]:
    """Name -> role of every managed block in an ACL."""
    return {m.group(2): m.group(1) for m in map(_BEGIN_RE.match, text.splitlines()) if m}


# -- password file -------------------------------------------------------------------------------
def set_password_entry(text: str, name: str, encoded: str | None) -> tuple[str, bool]:
    """``text`` with ``name``'s line replaced by ``name:encoded`` (dropped when None, appended
    when absent), and whether ``name`` had a line. Other lines are kept as they are."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    found = any(ln.split(":", 1)[0] == name for ln in lines)
    lines = [ln for ln in lines if ln.split(":", 1)[0] != name]
    if encoded is not None:
        lines.append(f"{name}:{encoded}")
    return ("\n".join(lines) + "\n") if lines else "", found


def password_entry(text: str, name: str) -> str | None:
    """The hash after ``name:`` in a password file, or None."""
    for ln in text.splitlines():
        user, _, encoded = ln.partition(":")
        if user == name:
            return encoded.strip()
    return None


# -- the directory ---------------------------------------------------------------------------
@dataclass(frozen=True)
class FleetDir:
    """The files of one fleet broker: ``fleet.conf``, ``passwd``, ``acl`` and ``data/``."""

    path: Path

    @property
    def conf(self) -> Path:
        return self.path / "fleet.conf"

    @property
    def passwd(self) -> Path:
        return self.path / "passwd"

    @property
    def acl(self) -> Path:
        return self.path / "acl"

    @property
    def data(self) -> Path:
        return self.path / "data"

    def require(self) -> FleetDir:
        """Self, or ``SetupError`` naming what is missing and how to make it."""
        if not self.path.is_dir():
            raise SetupError(f"{self.path}: no such directory; run 'accept-mqtt broker init "
                             f"{self.path}' first")
        for f in (self.passwd, self.acl):
            if not f.is_file():
                raise SetupError(f"{f}: missing; run 'accept-mqtt broker init {self.path}' "
                                 "first")
        return self


def render_fleet_conf(directory: Path, template: str | None = None) -> str:
    """The fleet template with ``@DIR@`` replaced by ``directory`` (absolute)."""
    d = str(directory.resolve())
    if "\n" in d:
        raise SetupError(f"directory {d!r}: a path with a newline cannot go in a config")
    text = TEMPLATE.read_text(encoding="utf-8") if template is None else template
    return text.replace(DIR_PLACEHOLDER, d)


def _service_owner() -> tuple[int, int] | None:
    """(uid, gid) of the ``mosquitto`` user when we run as root and it exists, else None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    try:
        import pwd

        pw = pwd.getpwnam(SERVICE_USER)
    except (ImportError, KeyError):
        return None
    return pw.pw_uid, pw.pw_gid


def write_private(path: Path, text: str, owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` atomically with ``text``, mode 0600, owned like the old file (or by
    ``owner``, when root)."""
    if path.exists() and owner is None and hasattr(os, "geteuid") and os.geteuid() == 0:
        st = path.stat()
        owner = (st.st_uid, st.st_gid)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        if owner is not None:
            os.chown(tmp, *owner)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def init_fleet(directory: Path | str, *, force: bool = False) -> FleetDir:
    """Write ``fleet.conf`` (paths filled in), an empty ``passwd`` and an ACL with only its
    header into ``directory`` (created if missing), and make ``data/``. Refuses to overwrite
    an existing file unless ``force``."""
    fd = FleetDir(Path(directory))
    if fd.path.exists() and not fd.path.is_dir():
        raise SetupError(f"{fd.path}: exists and is not a directory")
    if not force:
        for f in (fd.conf, fd.passwd, fd.acl):
            if f.exists():
                raise SetupError(f"{f}: already exists; use --force to overwrite")
    conf = render_fleet_conf(fd.path)
    fd.path.mkdir(parents=True, exist_ok=True)
    owner = _service_owner()
    fd.conf.write_text(conf, encoding="utf-8")
    write_private(fd.passwd, "", owner)
    write_private(fd.acl, ACL_HEADER, owner)
    fd.data.mkdir(mode=0o700, exist_ok=True)
    if owner is not None:
        os.chown(fd.data, *owner)
    return fd


def add_client(directory: Path | str, name: str, role: str, *, password: str | None = None,
               keep_password: bool = False, root: str = "accept") -> tuple[str | None, str | None]:
    """Give ``name`` a password entry and the ACL block of ``role``, replacing any it had.

    Returns (the password: ``password`` or a generated one, None when ``keep_password``;
    the role of the block it replaced, None when new). Validates everything before writing.
    """
    check_id(role, name)
    acl_lines(role, name, root)  # validates role and root
    fd = FleetDir(Path(directory)).require()
    passwd_text = fd.passwd.read_text(encoding="utf-8")
    acl_text, old_role = strip_acl_block(fd.acl.read_text(encoding="utf-8"), name)
    if keep_password:
        if password is not None:
            raise SetupError("--keep-password and --password exclude each other")
        if password_entry(passwd_text, name) is None:
            raise SetupError(f"{name} has no password entry to keep in {fd.passwd}")
    else:
        password = generate_password() if password is None else password
        passwd_text, _ = set_password_entry(passwd_text, name, hash_password(password))
    block = "\n".join(acl_block(role, name, root)) + "\n"
    acl_text = (acl_text + "\n" if acl_text else "") + block
    if not keep_password:
        write_private(fd.passwd, passwd_text)
    write_private(fd.acl, acl_text)
    return (None if keep_password else password), old_role


def remove_client(directory: Path | str, name: str) -> str | None:
    """Delete ``name``'s password entry and ACL block; the role it had (None: no block).
    ``SetupError`` when it had neither."""
    check_id("user", name)
    fd = FleetDir(Path(directory)).require()
    passwd_text, had_pw = set_password_entry(fd.passwd.read_text(encoding="utf-8"), name, None)
    acl_text, role = strip_acl_block(fd.acl.read_text(encoding="utf-8"), name)
    if not had_pw and role is None:
        raise SetupError(f"{name}: no such user in {fd.path}")
    write_private(fd.passwd, passwd_text)
    write_private(fd.acl, acl_text)
    return role


# -- command line ----------------------------------------------------------------------------
def _dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=".", type=Path,
                   help="the broker directory made by 'init' (default: current directory)")


def _client_parser(sub: argparse._SubParsersAction, role: str, help_: str) -> None:
    p = sub.add_parser(f"add-{role}", help=help_, description=help_)
    p.set_defaults(broker_cmd="add", role=role)
    p.add_argument("name", metavar="NAME",
                   help=("the device id (--device-id of its agent)" if role == "device" else
                         "the user name") + ": [A-Za-z0-9_-]{1,64}")
    _dir_arg(p)
    p.add_argument("--password", default=None,
                   help="use this password ('-': read one line from stdin); default: generate "
                        "one and print it once")
    p.add_argument("--keep-password", action="store_true",
                   help="rewrite only the ACL block, keep the existing password entry")
    p.add_argument("--root", default="accept", help="topic root (default: accept)")
    p.add_argument("--host", default=None,
                   help="broker host for the printed command (default: this machine's name)")
    p.add_argument("--port", type=int, default=None,
                   help="broker port for the printed command (default: 1883, 8883 with --tls)")
    p.add_argument("--tls", action="store_true", help="print an mqtts:// command")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``init / add-device / add-coordinator / add-monitor / remove / run`` sub-commands."""
    sub = parser.add_subparsers(dest="broker_cmd", metavar="ACTION", required=True)
    p = sub.add_parser("init", help="write fleet.conf, passwd and acl into DIR",
                       description="Write DIR/fleet.conf (paths filled in), an empty "
                                   "DIR/passwd and DIR/acl, and DIR/data/.")
    p.add_argument("dir", metavar="DIR", type=Path)
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    _client_parser(sub, "device", "add a device: password entry and device ACL block")
    _client_parser(sub, "coordinator", "add a coordinator: may drive jobs, reads the whole tree")
    _client_parser(sub, "monitor", "add a monitor: reads the whole tree, publishes nothing")
    p = sub.add_parser("remove", help="delete a user's password entry and ACL block")
    p.add_argument("name", metavar="NAME")
    _dir_arg(p)
    p = sub.add_parser("run", help="run mosquitto in the foreground on a fleet config")
    p.add_argument("--config", type=Path, default=None,
                   help="config file (default: DIR/fleet.conf)")
    _dir_arg(p)


def _read_password(arg: str | None) -> str | None:
    if arg != "-":
        return arg
    line = sys.stdin.readline()
    return line[:-1] if line.endswith("\n") else line


def _url(role: str, name: str, password: str | None, args: argparse.Namespace) -> str:
    host = args.host or socket.gethostname()
    port = args.port or (8883 if args.tls else 1883)
    pw = f":{quote(password, safe='')}" if password is not None else ""
    return f"{'mqtts' if args.tls else 'mqtt'}://{name}{pw}@{host}:{port}"


def _usage_lines(role: str, name: str, password: str | None,
                 args: argparse.Namespace) -> list[str]:
    """How to start this client, with the password in the URL and, safer, in the env."""
    root = f" --root {args.root}" if args.root != "accept" else ""
    tail = {"device": f" --device-id {name}{root}", "coordinator": root, "monitor": root}[role]
    cmd = {"device": "python -m device_agent --broker", "coordinator":
           "accept-mqtt train --broker", "monitor": "accept-mqtt monitor --broker"}[role]
    ca = " ACCEPT_MQTT_CAFILE=/path/to/ca.crt" if args.tls else ""
    lines = []
    if password is not None:
        lines += [f"password (printed once, store it now): {password}",
                  f"  {cmd} {_url(role, name, password, args)}{tail}"]
    secret = quote(password, safe="") if password is not None else "<password>"
    lines += ["or, keeping the password off the command line (ps, shell history):",
              f"  ACCEPT_MQTT_PASSWORD='{secret}'{ca} {cmd} {_url(role, name, None, args)}"
              f"{tail}"]
    return lines


def _cmd_init(args: argparse.Namespace) -> int:
    fd = init_fleet(args.dir, force=args.force)
    print(f"wrote {fd.conf}, {fd.passwd}, {fd.acl} and {fd.data}/")
    print(f"next: accept-mqtt broker add-coordinator NAME --dir {fd.path}; "
          f"accept-mqtt broker add-device NAME --dir {fd.path}; "
          f"then mosquitto -c {fd.conf}")
    return 0


def _cmd_add(args: argparse.Namespace) -> int:
    password = _read_password(args.password)
    pw, old = add_client(args.dir, args.name, args.role, password=password,
                         keep_password=args.keep_password, root=args.root)
    fd = FleetDir(args.dir)
    what = "replaced" if old else "added"
    was = f" (was a {old})" if old and old != args.role else ""
    print(f"{what} {args.role} {args.name}{was}: {fd.passwd}, {fd.acl}")
    shown = pw if args.password is None else None  # never echo a password the user typed
    for line in _usage_lines(args.role, args.name, shown, args):
        print(line)
    print("a running broker picks this up on SIGHUP: kill -HUP <pid> (or systemctl reload "
          "mosquitto); a session still using an old password is then disconnected")
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    role = remove_client(args.dir, args.name)
    print(f"removed {role or 'user'} {args.name} from {args.dir}; on reload (SIGHUP: kill -HUP "
          "<pid> or systemctl reload mosquitto) the broker also disconnects it")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    """Replace this process with ``mosquitto -c CONFIG`` (returns only on an error)."""
    from broker import find_mosquitto

    conf = args.config or FleetDir(args.dir).conf
    if not conf.is_file():
        raise SetupError(f"{conf}: no such config; run 'accept-mqtt broker init DIR' or give "
                         "--config")
    binary = find_mosquitto()
    sys.stdout.flush()
    sys.stderr.flush()
    # exec, not a child: signals (SIGHUP reload, SIGTERM, Ctrl-C) reach mosquitto itself
    os.execv(binary, [binary, "-c", str(conf)])
    return 1  # not reached


def run(args: argparse.Namespace) -> int:
    """Run the chosen action; a setup problem is one line on stderr and exit code 2."""
    from broker import BrokerError

    actions = {"init": _cmd_init, "add": _cmd_add, "remove": _cmd_remove, "run": _cmd_run}
    try:
        return actions[args.broker_cmd](args)
    except (SetupError, TopicError, BrokerError) as e:
        print(f"accept-mqtt broker: {e}", file=sys.stderr)
    except OSError as e:
        print(f"accept-mqtt broker: {e.strerror or e}"
              + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """``python -m broker ...``: the same as ``accept-mqtt broker ...``."""
    parser = argparse.ArgumentParser(prog="accept-mqtt broker",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    add_arguments(parser)
    return run(parser.parse_args(argv))
