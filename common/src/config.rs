//! Reading a JSON config file into a typed struct.
//!
//! In Kubernetes the file comes from a ConfigMap mounted at `/etc/config`.
//! A typo there should stop the pod at once with a message that says what to
//! fix, not start it with a silently ignored field. So the structs that use
//! this loader deny unknown fields, and every error names the file, the field
//! (as a path such as `backends[1]`) and, where serde knows it, the line and
//! column.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Why a config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("reading config {path}: {source} (pass --config PATH to use another file)", path = path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid JSON, or does not fit the struct.
    #[error("reading config {path}: {location}{reason}", path = path.display())]
    Parse {
        path: PathBuf,
        location: Location,
        reason: String,
    },
    /// A command-line flag's value is not acceptable.
    #[error("{flag}: {reason}")]
    Flag { flag: String, reason: String },
    /// The file parsed, but a value is not acceptable.
    #[error("config {path}: field `{field}`: {reason}", path = path.display())]
    Invalid {
        path: PathBuf,
        field: String,
        reason: String,
    },
}

/// Where in the file a parse error is: the field path and line/column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The field path, such as `port` or `backends[1]`; empty at the top level.
    pub field: String,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.field.is_empty() {
            write!(f, "field `{}`: ", self.field)?;
        }
        write!(f, "line {}, column {}: ", self.line, self.column)
    }
}

/// Reads and parses the config file at `path`.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Parses config `text`; `path` is only used in error messages.
pub fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    let mut json = serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(&mut json).map_err(|error| {
        let field = error.path().to_string();
        parse_error(path, field, error.into_inner())
    })?;
    // Trailing garbage after the object is an error too.
    json.end()
        .map_err(|error| parse_error(path, String::new(), error))?;
    Ok(value)
}

fn parse_error(path: &Path, field: String, error: serde_json::Error) -> ConfigError {
    ConfigError::Parse {
        path: path.to_owned(),
        location: Location {
            // serde_path_to_error writes "." for the top level and "?" when it does not know.
            field: if field == "." || field == "?" {
                String::new()
            } else {
                field
            },
            line: error.line(),
            column: error.column(),
        },
        reason: strip_position(&error.to_string()),
    }
}

/// Builds an [`ConfigError::Invalid`] for a value that parsed but is not usable.
pub fn invalid(path: &Path, field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_owned(),
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// serde_json appends " at line L column C"; we print the position first.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        port: u16,
        #[serde(default)]
        names: Vec<String>,
    }

    fn error(text: &str) -> String {
        parse::<Sample>(Path::new("sample.json"), text)
            .expect_err("should not parse")
            .to_string()
    }

    #[test]
    fn unknown_field_is_named_with_its_position() {
        assert_eq!(
            error("{\n  \"prot\": 80\n}"),
            "reading config sample.json: field `prot`: line 2, column 8: unknown field `prot`, expected `port` or `names`"
        );
    }

    #[test]
    fn wrong_type_names_the_field_path() {
        assert_eq!(
            error(r#"{"port": 80, "names": ["a", 7]}"#),
            "reading config sample.json: field `names[1]`: line 1, column 29: invalid type: integer `7`, expected a string"
        );
    }

    #[test]
    fn out_of_range_number_names_the_field() {
        let message = error(r#"{"port": 70000}"#);
        assert!(message.contains("field `port`"), "{message}");
        assert!(message.contains("70000"), "{message}");
    }

    #[test]
    fn invalid_json_and_trailing_garbage_are_errors() {
        assert!(error(r#"{"port": 80"#).contains("EOF while parsing"));
        assert!(error(r#"{"port": 80} x"#).contains("trailing characters"));
    }

    #[test]
    fn missing_file_says_which_file_and_what_to_do() {
        let message = load::<Sample>(Path::new("/nonexistent/config.json"))
            .expect_err("no such file")
            .to_string();
        assert!(
            message.starts_with("reading config /nonexistent/config.json: "),
            "{message}"
        );
        assert!(message.contains("--config"), "{message}");
    }
}
