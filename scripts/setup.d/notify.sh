# notify-worker: its tests make a throwaway CA and a certificate for localhost with the openssl
# CLI (STARTTLS and implicit TLS against a real SMTP server); tests/tls.rs makes its CA, server
# and client certificates for amqps:// and rediss:// the same way. The SMTP server itself, aiosmtpd,
# comes from tests/py/requirements.txt into .venv. Sourced by scripts/setup.sh (uses apt_install).
command -v openssl >/dev/null || apt_install openssl
