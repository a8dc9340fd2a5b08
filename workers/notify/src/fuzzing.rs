//! The fuzz target `notify_args` and its corpus replay test run this: the first line names the
//! task (`email`, `sms` or `webhook`), the rest is its kwargs as JSON, taken through the
//! runtime's deserialisation and everything the task does before it touches the network or
//! storage — templates rendered (fixed ones, the context from the input), addresses and
//! headers checked, the MIME message built and written out, the webhook body signed.
//! Not part of the supported API.

use std::sync::OnceLock;

use mediafarm::net::signing;
use mediafarm::TaskError;

use crate::email::{compose, Email};
use crate::sms::{self, Sms};
use crate::templates::Templates;
use crate::validate;
use crate::webhook::{self, Webhook};

/// Templates that use what real ones do: variables, loops over the context, filters, HTML
/// auto-escaping.
const TEMPLATES: &[(&str, &str)] = &[
    ("welcome.subject.txt", "Welcome, {{ name }}"),
    (
        "welcome.txt",
        "Hi {{ name }},\n{% for item in items %}- {{ item.title }} x{{ item.qty }}\n{% endfor %}\
         Total: {{ total | round(2) }} {{ currency | default('EUR') | upper }}\n",
    ),
    (
        "welcome.html",
        "<p>Hi {{ name }}</p><ul>{% for item in items %}<li>{{ item.title }}</li>{% endfor %}</ul>\
         <pre>{{ extra | tojson }}</pre>",
    ),
    (
        "code.sms.txt",
        "Your code is {{ code }}.{% if minutes %} It expires in {{ minutes }} min.{% endif %}",
    ),
];

fn templates() -> &'static Templates {
    static T: OnceLock<Templates> = OnceLock::new();
    T.get_or_init(|| Templates::from_sources(TEMPLATES).expect("the fuzz templates parse"))
}

/// What the kwargs became: the message as it would be sent.
#[derive(Debug)]
pub enum Prepared {
    /// The whole MIME message.
    Email(Vec<u8>),
    Sms(String),
    /// The body and its signature header.
    Webhook(Vec<u8>, String),
}

pub fn notify_kwargs(data: &[u8]) -> Result<Prepared, TaskError> {
    let (task, kwargs) = match data.iter().position(|b| *b == b'\n') {
        Some(nl) => (&data[..nl], &data[nl + 1..]),
        None => (data, &b""[..]),
    };
    match task {
        b"email" => {
            let args = mediafarm::fuzzing::kwargs::<Email>(kwargs)?;
            let draft = compose::draft(&args, templates(), "Mediafarm <noreply@example.com>")?;
            let key = args.idempotency_key.as_deref().unwrap_or("fuzz");
            Ok(Prepared::Email(draft.build(key, Vec::new())?.formatted()))
        }
        b"sms" => {
            let args = mediafarm::fuzzing::kwargs::<Sms>(kwargs)?;
            Ok(Prepared::Sms(sms::check(&args, templates())?))
        }
        b"webhook" => {
            let args = mediafarm::fuzzing::kwargs::<Webhook>(kwargs)?;
            let (_url, body) = webhook::prepare(&args)?;
            if let Some(key) = &args.idempotency_key {
                validate::header_value("idempotency_key", key)?;
            }
            let signature = signing::sign(b"fuzz-secret", 1_790_000_000, &body);
            Ok(Prepared::Webhook(body, signature))
        }
        _ => Err(TaskError::invalid(
            "FuzzInput",
            "the first line must be `email`, `sms` or `webhook`",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Files whose outcome is pinned: (file, text the error must contain); `None`: accepted.
    const EXPECTED: &[(&str, Option<&str>)] = &[
        ("seeds/email-readme", None),
        ("seeds/email-all", None),
        ("seeds/email-template", None),
        ("seeds/email-injection", Some("HeaderInjection")),
        ("seeds/sms-readme", None),
        ("seeds/sms-body", None),
        ("seeds/webhook-readme", None),
        ("seeds/webhook-headers", None),
    ];

    #[test]
    fn notify_args_corpus_replays() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fuzz/notify_args");
        mediafarm::fuzzing::replay_expecting(&dir, EXPECTED, |data| {
            notify_kwargs(data).err().map(|e| e.to_string())
        });
    }

    #[test]
    fn the_template_seed_renders_its_context_escaped() {
        let data = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../fixtures/fuzz/notify_args/seeds/email-template"),
        )
        .expect("seed exists");
        let Ok(Prepared::Email(mime)) = notify_kwargs(&data) else {
            panic!("the template seed builds an email")
        };
        let mime = String::from_utf8_lossy(&mime);
        assert!(mime.contains("&lt;Ann &amp; Bob&gt;"), "{mime}");
    }
}
