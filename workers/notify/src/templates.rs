//! Message templates in Jinja2 syntax (minijinja) from `notify_template_dir`: an email template
//! `welcome` is `welcome.subject.txt`, `welcome.txt` and/or `welcome.html` (HTML output is
//! auto-escaped); an SMS template `code` is `code.sms.txt`. A missing variable is an error,
//! not an empty string, so a half-filled message is never sent.

use std::path::{Path, PathBuf};

use mediafarm::TaskError;
use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use serde_json::{Map, Value};

pub struct Templates {
    env: Environment<'static>,
    dir: PathBuf,
}

/// One template's rendering, or that the file does not exist.
pub enum Rendered {
    Text(String),
    Missing,
}

impl Templates {
    pub fn new(dir: &str) -> Templates {
        let dir = PathBuf::from(dir);
        let mut env = Environment::new();
        env.set_loader(minijinja::path_loader(&dir));
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        Templates { env, dir }
    }

    /// Templates given as (file name, source) pairs instead of read from a directory; a name
    /// not among them is `Missing`. For tests and the fuzz targets.
    pub fn from_sources(files: &[(&str, &str)]) -> Result<Templates, minijinja::Error> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        for (name, source) in files {
            env.add_template_owned(name.to_string(), source.to_string())?;
        }
        Ok(Templates {
            env,
            dir: PathBuf::from("(in memory)"),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Checks a template name given in a job: letters, digits, `_`, `-`, `.` and `/` between
    /// path segments, nothing that climbs out of the directory.
    pub fn check_name(name: &str) -> Result<(), TaskError> {
        let ok = !name.is_empty()
            && name.len() <= 200
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-./".contains(&b))
            && name
                .split('/')
                .all(|seg| !seg.is_empty() && !seg.starts_with('.'));
        if !ok {
            return Err(TaskError::invalid(
                "UnknownTemplate",
                format!(
                    "template name {name:?} is not valid: use letters, digits, _ - . and / \
                     between names, e.g. \"welcome\" or \"billing/receipt\""
                ),
            ));
        }
        Ok(())
    }

    /// Renders file `file` with `context`; `Missing` when there is no such file.
    pub fn render(&self, file: &str, context: &Map<String, Value>) -> Result<Rendered, TaskError> {
        let template = match self.env.get_template(file) {
            Ok(t) => t,
            Err(e) if e.kind() == ErrorKind::TemplateNotFound => return Ok(Rendered::Missing),
            Err(e) => return Err(template_error(file, &e)),
        };
        template
            .render(context)
            .map(Rendered::Text)
            .map_err(|e| template_error(file, &e))
    }

    /// The error for a template `name` none of whose files exist.
    pub fn unknown(&self, name: &str, files: &[String]) -> TaskError {
        TaskError::invalid(
            "UnknownTemplate",
            format!(
                "no template {name:?}: none of {} exists in {} (notify_template_dir)",
                files.join(", "),
                self.dir.display()
            ),
        )
    }
}

fn template_error(file: &str, e: &minijinja::Error) -> TaskError {
    let mut message = format!("template {file} cannot be rendered: {}", e.kind());
    if let Some(detail) = e.detail() {
        message.push_str(&format!(" ({detail})"));
    }
    if let Some(line) = e.line() {
        message.push_str(&format!(" at line {line}"));
    }
    TaskError::invalid("TemplateError", message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mf-tpl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        dir
    }

    #[test]
    fn renders_escapes_and_refuses_missing_variables() {
        let dir = dir_with(&[
            ("hi.txt", "Hello {{ name }}!"),
            ("hi.html", "<p>{{ name }}</p>"),
            ("broken.txt", "{% if %}"),
        ]);
        let t = Templates::new(dir.to_str().unwrap());
        let ctx: Map<String, Value> = serde_json::from_str(r#"{"name": "<张三>"}"#).unwrap();
        let Rendered::Text(text) = t.render("hi.txt", &ctx).unwrap() else {
            panic!("hi.txt exists")
        };
        assert_eq!(text, "Hello <张三>!");
        let Rendered::Text(html) = t.render("hi.html", &ctx).unwrap() else {
            panic!("hi.html exists")
        };
        assert_eq!(html, "<p>&lt;张三&gt;</p>");
        assert!(matches!(t.render("nope.txt", &ctx), Ok(Rendered::Missing)));
        let e = t.render("hi.txt", &Map::new()).err().unwrap();
        assert_eq!(e.exc_type, "TemplateError");
        assert!(e.message.contains("undefined"), "{}", e.message);
        let e = t.render("broken.txt", &ctx).err().unwrap();
        assert_eq!(e.exc_type, "TemplateError");
        assert!(e.message.contains("line 1"), "{}", e.message);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn names_cannot_climb_out() {
        assert!(Templates::check_name("billing/receipt").is_ok());
        for bad in ["../etc/passwd", "/abs", "a//b", ".hidden", "", "a b"] {
            assert!(Templates::check_name(bad).is_err(), "{bad}");
        }
    }
}
