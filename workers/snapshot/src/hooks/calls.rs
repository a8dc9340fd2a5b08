//! What the media servers send, read into one shape ([`Call`]): nginx-rtmp's notify requests
//! (`application/x-www-form-urlencoded`: `call=publish|publish_done|…`, `app`, `name`, `addr`,
//! `clientid`, `tcurl`, …, plus the publisher's own URL arguments) and SRS's `http_hooks`
//! (a JSON object: `action` = `on_publish`|`on_unpublish`|…, `client_id`, `ip`, `vhost`,
//! `app`, `stream`, `param`, …). Anything that is neither is a [`CallError`], answered 400.

use serde::Deserialize;

/// What a hook asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A stream is being published (nginx-rtmp `publish`, SRS `on_publish`).
    Publish,
    /// Publishing has ended (nginx-rtmp `publish_done`, SRS `on_unpublish`).
    Unpublish,
    /// Any other notification (play, connect, update, …): answered OK, nothing done.
    Other(String),
}

/// One hook, whichever server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub event: Event,
    pub app: String,
    /// The stream name, without its URL arguments.
    pub name: String,
    /// The publisher's address as the media server saw it (for logs).
    pub client: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CallError {
    #[error("the body is not {0}")]
    Body(&'static str),
    #[error("field `{0}` is missing")]
    Missing(&'static str),
}

/// nginx-rtmp's form body.
pub fn nginx_rtmp(body: &[u8]) -> Result<Call, CallError> {
    if std::str::from_utf8(body).is_err() {
        return Err(CallError::Body(
            "a UTF-8 form (application/x-www-form-urlencoded)",
        ));
    }
    let (mut call, mut app, mut name, mut addr) = (None, None, None, None);
    for (k, v) in url::form_urlencoded::parse(body) {
        let slot = match k.as_ref() {
            "call" => &mut call,
            "app" => &mut app,
            "name" => &mut name,
            "addr" => &mut addr,
            _ => continue,
        };
        // The first of a repeated field: nginx-rtmp writes its own fields before the
        // publisher's URL arguments, which may reuse the names.
        if slot.is_none() {
            *slot = Some(v.into_owned());
        }
    }
    let call = call.ok_or(CallError::Missing("call"))?;
    let event = match call.as_str() {
        "publish" => Event::Publish,
        "publish_done" => Event::Unpublish,
        _ => Event::Other(call),
    };
    Ok(Call {
        app: app.ok_or(CallError::Missing("app"))?,
        name: strip_args(&name.ok_or(CallError::Missing("name"))?),
        client: addr.unwrap_or_default(),
        event,
    })
}

#[derive(Deserialize)]
struct SrsBody {
    action: Option<String>,
    app: Option<String>,
    stream: Option<String>,
    #[serde(default)]
    ip: Option<String>,
}

/// SRS's JSON body.
pub fn srs(body: &[u8]) -> Result<Call, CallError> {
    let b: SrsBody = serde_json::from_slice(body).map_err(|_| CallError::Body("a JSON object"))?;
    let action = b.action.ok_or(CallError::Missing("action"))?;
    let event = match action.as_str() {
        "on_publish" => Event::Publish,
        "on_unpublish" => Event::Unpublish,
        _ => Event::Other(action),
    };
    let app = b.app.ok_or(CallError::Missing("app"))?;
    let name = match (&event, b.stream) {
        (_, Some(s)) => strip_args(&s),
        // on_connect and on_close name no stream.
        (Event::Other(_), None) => String::new(),
        (_, None) => return Err(CallError::Missing("stream")),
    };
    Ok(Call {
        event,
        // SRS may report the app with the URL's arguments on some versions.
        app: strip_args(&app),
        name,
        client: b.ip.unwrap_or_default(),
    })
}

fn strip_args(s: &str) -> String {
    s.split('?').next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_rtmp_publish_and_publish_done() {
        let body = b"call=publish&addr=127.0.0.1&clientid=7&app=live&flashver=FMLE%2F3.0&swfurl=&tcurl=rtmp%3A%2F%2F127.0.0.1%3A1935%2Flive&pageurl=&name=room7&type=live&name=other";
        let c = nginx_rtmp(body).unwrap();
        assert_eq!(c.event, Event::Publish);
        assert_eq!((c.app.as_str(), c.name.as_str()), ("live", "room7"));
        assert_eq!(c.client, "127.0.0.1");
        let c = nginx_rtmp(b"call=publish_done&app=live&name=room7").unwrap();
        assert_eq!(c.event, Event::Unpublish);
        let c = nginx_rtmp(b"call=play&app=live&name=room7").unwrap();
        assert_eq!(c.event, Event::Other("play".into()));
        assert_eq!(
            nginx_rtmp(b"app=live&name=x"),
            Err(CallError::Missing("call"))
        );
        assert_eq!(
            nginx_rtmp(b"call=publish&name=x"),
            Err(CallError::Missing("app"))
        );
        assert!(nginx_rtmp(&[0xff, 0xfe]).is_err());
    }

    // SRS's documented payloads (its HTTP callback page, v4–v6), as it sends them.
    #[test]
    fn srs_on_publish_and_on_unpublish() {
        let publish = br#"{"server_id": "vid-0xk989d", "service_id": "z1l4ylgs", "action": "on_publish",
            "client_id": "341w361a", "ip": "127.0.0.1", "vhost": "__defaultVhost__", "app": "live",
            "tcUrl": "rtmp://127.0.0.1:1935/live", "stream": "livestream", "param": "?token=xxx&salt=yyy",
            "stream_url": "/live/livestream", "stream_id": "vid-124q9y3"}"#;
        let c = srs(publish).unwrap();
        assert_eq!(c.event, Event::Publish);
        assert_eq!((c.app.as_str(), c.name.as_str()), ("live", "livestream"));
        let old = br#"{"action": "on_unpublish", "client_id": 1985, "ip": "192.168.1.10",
            "vhost": "video.test.com", "app": "live", "stream": "livestream", "param": "?token=xxx&salt=yyy"}"#;
        assert_eq!(srs(old).unwrap().event, Event::Unpublish);
        let connect = br#"{"action": "on_connect", "client_id": 1985, "ip": "192.168.1.10", "vhost": "video.test.com", "app": "live"}"#;
        assert_eq!(
            srs(connect).unwrap().event,
            Event::Other("on_connect".into())
        );
        assert_eq!(
            srs(br#"{"action": "on_publish", "app": "live"}"#),
            Err(CallError::Missing("stream"))
        );
        assert_eq!(srs(b"call=publish"), Err(CallError::Body("a JSON object")));
    }
}
