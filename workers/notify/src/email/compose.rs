//! From job kwargs to a MIME message: the subject and bodies (literal or rendered from a
//! template), checked addresses and headers (no CR/LF anywhere a header is built), text + HTML
//! as alternatives, attachments as a mixed part. Non-ASCII display names and subjects are
//! written as RFC 2047 encoded words and bodies as UTF-8 quoted-printable or base64 by lettre,
//! so any MTA carries them; a non-ASCII address is sent with SMTPUTF8.

use lettre::message::header::{ContentTransferEncoding, HeaderName, HeaderValue};
use lettre::message::{Attachment, Body as MimeBody, Mailbox, MultiPart, SinglePart};
use lettre::Message;
use mediafarm::TaskError;
use sha2::{Digest, Sha256};

use super::attachments::File;
use super::EmailArgs;
use crate::templates::{Rendered, Templates};
use crate::validate;

/// Most recipients (to + cc + bcc) of one email.
const MAX_RECIPIENTS: usize = 100;
/// Headers the message writes itself; a job may not set them through `headers`.
const RESERVED_HEADERS: &[&str] = &[
    "from",
    "to",
    "cc",
    "bcc",
    "reply-to",
    "sender",
    "subject",
    "message-id",
    "date",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "return-path",
];

/// What the email says.
#[derive(Debug, Clone, PartialEq)]
pub struct Content {
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
}

/// The subject and bodies: literal, or rendered from `template` with `context`.
pub fn content(args: &EmailArgs, templates: &Templates) -> Result<Content, TaskError> {
    let content = match &args.template {
        Some(name) => {
            if args.subject.is_some() || args.text.is_some() || args.html.is_some() {
                return Err(TaskError::invalid(
                    "InvalidArguments",
                    "give either `template` (+ `context`) or `subject` + `text`/`html`, not both",
                ));
            }
            Templates::check_name(name)?;
            let files = [
                format!("{name}.subject.txt"),
                format!("{name}.txt"),
                format!("{name}.html"),
            ];
            let render = |file: &String| match templates.render(file, &args.context)? {
                Rendered::Text(t) => Ok(Some(t)),
                Rendered::Missing => Ok::<_, TaskError>(None),
            };
            let subject = render(&files[0])?;
            let text = render(&files[1])?;
            let html = render(&files[2])?;
            if subject.is_none() && text.is_none() && html.is_none() {
                return Err(templates.unknown(name, &files));
            }
            let subject = subject.ok_or_else(|| {
                TaskError::invalid(
                    "UnknownTemplate",
                    format!(
                        "template {name:?} has no subject: add {} to {}",
                        files[0],
                        templates.dir().display()
                    ),
                )
            })?;
            Content {
                subject: subject.trim_end_matches(['\r', '\n']).to_owned(),
                text,
                html,
            }
        }
        None => Content {
            subject: args.subject.clone().ok_or_else(|| {
                TaskError::invalid(
                    "InvalidArguments",
                    "notify.email needs `subject` (with `text` and/or `html`) or a `template`",
                )
            })?,
            text: args.text.clone(),
            html: args.html.clone(),
        },
    };
    validate::header_value("subject", &content.subject)?;
    validate::non_empty("the subject", &content.subject)?;
    let has_body = [&content.text, &content.html]
        .iter()
        .any(|b| b.as_deref().is_some_and(|b| !b.trim().is_empty()));
    if !has_body {
        return Err(TaskError::invalid(
            "EmptyBody",
            "the email has no body: give `text` and/or `html` (or template files that render to some)",
        ));
    }
    Ok(content)
}

/// Everything checked before attachments are read: the content (rendered when a template is
/// named), the addresses and the extra headers. `default_from` is the `email_from` setting.
pub fn draft(
    args: &EmailArgs,
    templates: &Templates,
    default_from: &str,
) -> Result<Draft, TaskError> {
    let content = content(args, templates)?;
    let from = args.from.as_deref().unwrap_or(default_from);
    Draft::new(args, from, content)
}

/// One address as given in a job: `a@example.com` or `Name <a@example.com>`.
pub fn mailbox(field: &str, text: &str) -> Result<Mailbox, TaskError> {
    validate::header_value(field, text)?;
    text.trim().parse::<Mailbox>().map_err(|e| {
        TaskError::invalid(
            "InvalidAddress",
            format!(
                "`{field}` = {text:?} is not an email address ({e}); use \"user@example.com\" or \
                 \"Name <user@example.com>\""
            ),
        )
    })
}

/// A checked email, short of its attachments.
pub struct Draft {
    from: Mailbox,
    to: Vec<Mailbox>,
    cc: Vec<Mailbox>,
    bcc: Vec<Mailbox>,
    reply_to: Option<Mailbox>,
    headers: Vec<HeaderValue>,
    content: Content,
}

impl Draft {
    pub fn new(args: &EmailArgs, from: &str, content: Content) -> Result<Draft, TaskError> {
        let list = |field: &str, items: Vec<&str>| {
            items
                .into_iter()
                .map(|a| mailbox(field, a))
                .collect::<Result<Vec<_>, _>>()
        };
        let to = list("to", args.to.list())?;
        let cc = list("cc", args.cc.list())?;
        let bcc = list("bcc", args.bcc.list())?;
        if to.is_empty() {
            return Err(TaskError::invalid(
                "InvalidAddress",
                "`to` is empty: give at least one recipient",
            ));
        }
        let count = to.len() + cc.len() + bcc.len();
        if count > MAX_RECIPIENTS {
            return Err(TaskError::invalid(
                "TooManyRecipients",
                format!("{count} recipients; one email takes at most {MAX_RECIPIENTS}"),
            ));
        }
        let mut headers = Vec::new();
        for (name, value) in &args.headers {
            validate::header_value(&format!("headers.{name}"), value)?;
            let valid_name =
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
            if !valid_name {
                return Err(TaskError::invalid(
                    "InvalidHeader",
                    format!("header name {name:?} is not valid: printable ASCII without ':'"),
                ));
            }
            if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                return Err(TaskError::invalid(
                    "InvalidHeader",
                    format!("header {name:?} is set from the job's own fields, not `headers`"),
                ));
            }
            let header = HeaderName::new_from_ascii(name.clone()).map_err(|_| {
                TaskError::invalid(
                    "InvalidHeader",
                    format!("header name {name:?} is not valid"),
                )
            })?;
            headers.push(HeaderValue::new(header, value.clone()));
        }
        Ok(Draft {
            from: mailbox("from", from)?,
            to,
            cc,
            bcc,
            reply_to: args
                .reply_to
                .as_deref()
                .map(|r| mailbox("reply_to", r))
                .transpose()?,
            headers,
            content,
        })
    }

    /// Every envelope recipient's address.
    pub fn recipients(&self) -> Vec<String> {
        self.to
            .iter()
            .chain(&self.cc)
            .chain(&self.bcc)
            .map(|m| m.email.to_string())
            .collect()
    }

    /// The message, its Message-ID derived from `once_key` so that a repeat (see
    /// [`crate::once_only`]) carries the same one.
    pub fn build(self, once_key: &str, files: Vec<File>) -> Result<Message, TaskError> {
        let digest = hex::encode(Sha256::digest(once_key.as_bytes()));
        let message_id = format!("<{}@{}>", &digest[..32], self.from.email.domain());
        let mut builder = Message::builder()
            .from(self.from)
            .subject(self.content.subject)
            .message_id(Some(message_id))
            .date_now();
        for m in self.to {
            builder = builder.to(m);
        }
        for m in self.cc {
            builder = builder.cc(m);
        }
        for m in self.bcc {
            builder = builder.bcc(m);
        }
        if let Some(r) = self.reply_to {
            builder = builder.reply_to(r);
        }
        for h in self.headers {
            builder = builder.raw_header(h);
        }
        let body = match (self.content.text, self.content.html) {
            (Some(text), Some(html)) => Body::Multi(MultiPart::alternative_plain_html(text, html)),
            (Some(text), None) => Body::Single(SinglePart::plain(text)),
            (None, Some(html)) => Body::Single(SinglePart::html(html)),
            (None, None) => {
                return Err(TaskError::invalid("EmptyBody", "the email has no body"));
            }
        };
        let built = if files.is_empty() {
            match body {
                Body::Multi(m) => builder.multipart(m),
                Body::Single(s) => builder.singlepart(s),
            }
        } else {
            let mut mixed = match body {
                Body::Multi(m) => MultiPart::mixed().multipart(m),
                Body::Single(s) => MultiPart::mixed().singlepart(s),
            };
            for f in files {
                // Base64 always: a file must arrive byte for byte, and a "7bit" text file with
                // bare LFs would break SMTP's line rules.
                let body = MimeBody::new_with_encoding(
                    f.data.to_vec(),
                    ContentTransferEncoding::Base64,
                )
                .map_err(|_| TaskError::permanent("InternalError", "base64 is always valid"))?;
                mixed = mixed.singlepart(Attachment::new(f.filename).body(body, f.content_type));
            }
            builder.multipart(mixed)
        };
        built
            .map_err(|e| TaskError::invalid("InvalidEmail", format!("cannot build the email: {e}")))
    }
}

enum Body {
    Single(SinglePart),
    Multi(MultiPart),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::email::Recipients;

    fn args(v: serde_json::Value) -> EmailArgs {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn chinese_names_and_subjects_become_encoded_words() {
        let a = args(serde_json::json!({
            "to": "张三 <zhang@example.com>", "subject": "你好，世界", "text": "正文：你好",
            "html": "<p>你好</p>"
        }));
        let t = Templates::new("/nonexistent");
        let c = content(&a, &t).unwrap();
        let d = Draft::new(&a, "发件人 <from@example.com>", c).unwrap();
        assert_eq!(d.recipients(), ["zhang@example.com"]);
        let m = String::from_utf8(d.build("k", Vec::new()).unwrap().formatted()).unwrap();
        assert!(m.is_ascii(), "headers and bodies are 7-bit encoded:\n{m}");
        assert!(m.contains("Subject: =?utf-8?"), "{m}");
        assert!(m.contains("multipart/alternative"), "{m}");
    }

    #[test]
    fn injection_and_bad_addresses_are_refused() {
        let t = Templates::new("/nonexistent");
        let a = args(
            serde_json::json!({"to": "a@example.com", "subject": "x\r\nBcc: e@evil.test", "text": "b"}),
        );
        assert_eq!(content(&a, &t).unwrap_err().exc_type, "HeaderInjection");
        let ok = Content {
            subject: "s".into(),
            text: Some("b".into()),
            html: None,
        };
        let mut a = args(serde_json::json!({"to": "not an address", "text": "b"}));
        let e = Draft::new(&a, "f@example.com", ok.clone()).err().unwrap();
        assert_eq!(e.exc_type, "InvalidAddress");
        a.to = Recipients::One("a@example.com\nBcc: e@evil.test".into());
        let e = Draft::new(&a, "f@example.com", ok.clone()).err().unwrap();
        assert_eq!(e.exc_type, "HeaderInjection");
        a.to = Recipients::One("a@example.com".into());
        a.headers
            .insert("X-Tag".into(), "v\r\nBcc: e@evil.test".into());
        let e = Draft::new(&a, "f@example.com", ok.clone()).err().unwrap();
        assert_eq!(e.exc_type, "HeaderInjection");
        a.headers.clear();
        a.headers.insert("Bcc".into(), "e@evil.test".into());
        let e = Draft::new(&a, "f@example.com", ok).err().unwrap();
        assert_eq!(e.exc_type, "InvalidHeader");
        let a = args(serde_json::json!({"to": "a@example.com", "subject": "s", "text": "  "}));
        assert_eq!(content(&a, &t).unwrap_err().exc_type, "EmptyBody");
    }
}

#[cfg(test)]
mod line_length_tests {
    use super::*;
    use crate::email::attachments::{guess, File};

    #[test]
    fn no_line_is_longer_than_smtp_allows() {
        let a: EmailArgs = serde_json::from_value(serde_json::json!({
            "to": "张三 <zhang@example.com>", "subject": "您的订单已发货 — order #42 shipped",
            "text": "你好，张三！\n您的包裹已经发出。", "html": "<p>你好，<b>张三</b>！</p>",
            "headers": {"X-Campaign": "发货通知"}
        }))
        .unwrap();
        let t = Templates::new("/nonexistent");
        let c = content(&a, &t).unwrap();
        let d = Draft::new(&a, "订单系统 <orders@shop.example>", c).unwrap();
        let pdf = b"%PDF-1.4\n% test document\n".repeat(40);
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDRxxxx".to_vec();
        let files = vec![
            File {
                filename: "report.pdf".into(),
                content_type: guess("report.pdf", &pdf),
                data: pdf.into(),
            },
            File {
                filename: "图表".into(),
                content_type: guess("x", &png),
                data: png.into(),
            },
        ];
        let m = d.build("k", files).unwrap().formatted();
        let text = String::from_utf8(m).unwrap();
        assert!(
            !text.replace("\r\n", "").contains('\n'),
            "no bare LF:\n{text}"
        );
        for line in text.split("\r\n") {
            assert!(line.len() <= 998, "{line}");
        }
    }
}
