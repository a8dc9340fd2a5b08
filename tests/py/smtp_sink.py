"""A real SMTP server on 127.0.0.1 for the notify-worker tests and benchmark (aiosmtpd).

Usage: smtp_sink.py DIR [--auth USER:PASS] [--delay-ms N] [--tls starttls|implicit --cert PEM --key PEM]
Listens on a free port and prints it as the first line of stdout. Every accepted message is
saved as DIR/<n>.eml with DIR/<n>.json beside it ({mail_from, rcpt_tos, smtp_utf8, connection,
auth, tls}); DIR/connections holds the number of connections accepted so far. Recipients steer it:
  reject@...        RCPT answered 550 (permanent)
  defer-once@...    the first DATA for it is answered 451 (transient), later ones accepted
  defer-always@...  every DATA for it is answered 452 (transient: insufficient storage)
--delay-ms holds each DATA reply that long after the message is saved.
"""
import argparse
import asyncio
import itertools
import json
import os
import ssl
import sys

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

args = argparse.ArgumentParser()
args.add_argument("dir")
args.add_argument("--auth")
args.add_argument("--delay-ms", type=int, default=0)
args.add_argument("--tls", choices=["starttls", "implicit"])
args.add_argument("--cert")
args.add_argument("--key")
opts = args.parse_args()
os.makedirs(opts.dir, exist_ok=True)

connections = itertools.count(1)
messages = itertools.count(1)
deferred = set()


def write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class Handler:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.lower().startswith("reject@"):
            return "550 5.1.1 <%s>: mailbox unavailable" % address
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        for rcpt in envelope.rcpt_tos:
            if rcpt.lower().startswith("defer-always@"):
                return "452 4.3.1 insufficient system storage"
            if rcpt.lower().startswith("defer-once@") and rcpt not in deferred:
                deferred.add(rcpt)
                return "451 4.3.0 try again later"
        n = next(messages)
        base = os.path.join(opts.dir, str(n))
        write_atomic(base + ".eml", envelope.original_content or envelope.content)
        meta = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "smtp_utf8": envelope.smtp_utf8,
            "connection": session.connection_id,
            "auth": session.login_data.decode() if session.login_data else None,
            "tls": "starttls" if session.ssl else ("implicit" if session.implicit_tls else None),
        }
        write_atomic(base + ".json", json.dumps(meta).encode())
        if opts.delay_ms:
            await asyncio.sleep(opts.delay_ms / 1000)
        return "250 2.0.0 OK queued as %d" % n


class CountingSMTP(SMTP):
    def connection_made(self, transport):
        upgrade = self._original_transport is not None  # called again after STARTTLS
        before = getattr(self, "session", None)
        super().connection_made(transport)
        if upgrade:
            self.session.connection_id = before.connection_id
            self.session.implicit_tls = False
            return
        self.session.implicit_tls = transport.get_extra_info("sslcontext") is not None
        self.session.connection_id = next(connections)
        write_atomic(os.path.join(opts.dir, "connections"),
                     str(self.session.connection_id).encode())


def authenticator(server, session, envelope, mechanism, auth_data):
    if not isinstance(auth_data, LoginPassword):
        return AuthResult(success=False, handled=False)
    user, password = opts.auth.split(":", 1)
    ok = auth_data.login.decode() == user and auth_data.password.decode() == password
    return AuthResult(success=ok, handled=False, auth_data=auth_data)


async def main():
    loop = asyncio.get_running_loop()
    kwargs = dict(enable_SMTPUTF8=True, decode_data=False, hostname="sink.test")
    if opts.auth:
        kwargs.update(auth_required=True, auth_require_tls=False, authenticator=authenticator)
    server_tls = None
    if opts.tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(opts.cert, opts.key)
        if opts.tls == "starttls":
            kwargs.update(tls_context=context, require_starttls=True)
        else:
            server_tls = context
    server = await loop.create_server(lambda: CountingSMTP(Handler(), **kwargs), "127.0.0.1", 0,
                                      ssl=server_tls)
    print(server.sockets[0].getsockname()[1], flush=True)
    # Stop when the test that started us goes away (stdin closes).
    await loop.run_in_executor(None, sys.stdin.read)
    server.close()


asyncio.run(main())
