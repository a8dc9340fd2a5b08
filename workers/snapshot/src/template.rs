//! Storage key templates: `{stream_id}`, `{seq}` and `{time}` (UTC, `20261125T040000Z`) filled
//! in; any other `{name}` is refused before the job reads its source.

use mediafarm::TaskError;

/// Fills `template` with `vars`; the result is then checked as a storage key.
pub fn expand(template: &str, vars: &[(&str, &str)]) -> Result<String, TaskError> {
    let bad = |why: String| {
        TaskError::invalid(
            "InvalidKeyTemplate",
            format!("key template {template:?}: {why}"),
        )
    };
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| bad("a `{` has no closing `}`".into()))?;
        let name = &after[..close];
        let value = vars
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                let known: Vec<String> = vars.iter().map(|(k, _)| format!("{{{k}}}")).collect();
                bad(format!(
                    "unknown placeholder {{{name}}}; use {}",
                    known.join(", ")
                ))
            })?;
        out.push_str(value);
        rest = &after[close + 1..];
    }
    if rest.contains('}') {
        return Err(bad("a `}` has no opening `{`".into()));
    }
    out.push_str(rest);
    mediafarm::storage::check_key(&out)?;
    Ok(out)
}

/// `{time}` for a moment: compact UTC, sortable, safe in keys.
pub fn time_value(at: chrono::DateTime<chrono::Utc>) -> String {
    at.format("%Y%m%dT%H%M%S%.3fZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled_and_unknown_ones_refused() {
        let vars = [("stream_id", "room-1"), ("seq", "000007"), ("time", "t")];
        assert_eq!(
            expand("snaps/{stream_id}/{seq}.jpg", &vars).unwrap(),
            "snaps/room-1/000007.jpg"
        );
        let err = expand("a/{nope}.jpg", &vars).unwrap_err();
        assert!(err.message.contains("{nope}"), "{}", err.message);
        assert!(expand("a/{seq.jpg", &vars).is_err());
        assert!(expand("a/seq}.jpg", &vars).is_err());
        assert!(expand("../{seq}.jpg", &vars).is_err());
    }
}
