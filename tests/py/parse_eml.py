"""Parses a received .eml with Python's own email package (an independent MIME reader) and
prints what a mail client would show, as JSON: decoded headers, text and HTML bodies, and each
attachment's file name, content type, size and SHA-256.

Usage: parse_eml.py FILE
"""
import email
import email.policy
import hashlib
import json
import sys

with open(sys.argv[1], "rb") as f:
    raw = f.read()
msg = email.message_from_bytes(raw, policy=email.policy.default)
out = {
    "subject": str(msg["subject"]),
    "from": str(msg["from"]),
    "to": str(msg["to"]),
    "cc": str(msg["cc"]) if msg["cc"] else None,
    "bcc": str(msg["bcc"]) if msg["bcc"] else None,
    "reply_to": str(msg["reply-to"]) if msg["reply-to"] else None,
    "message_id": str(msg["message-id"]),
    "content_type": msg.get_content_type(),
    "raw_is_ascii": all(b < 128 for b in raw),
    "extra": {k: str(v) for k, v in msg.items() if k.lower().startswith("x-")},
    "text": None,
    "html": None,
    "attachments": [],
}
for part in msg.walk():
    if part.is_multipart():
        continue
    if part.get_content_disposition() == "attachment":
        data = part.get_payload(decode=True)
        out["attachments"].append({
            "filename": part.get_filename(),
            "content_type": part.get_content_type(),
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        })
    elif part.get_content_type() == "text/plain":
        out["text"] = part.get_content()
    elif part.get_content_type() == "text/html":
        out["html"] = part.get_content()
print(json.dumps(out))
