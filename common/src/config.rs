//! Reading a JSON config file into a typed struct.
//!
//! In Kubernetes the file comes from a ConfigMap mounted at `/etc/config`.
//! A typo there should stop the pod at once with a message that says what to
//! fix, not start it with a silently ignored field. So the structs that use
//! this loader deny unknown fields, and every error names the file, the field
//! (as a path such as `backends[1]`) and, where serde knows it, the line and
//! column.
//!
//! The file is not trusted either: only a regular file of at most
//! [`MAX_BYTES`] is read (a FIFO would block the start for ever, `/dev/zero`
//! would fill the memory), and [`in_range`] puts an upper bound on every
//! duration and count, so that no value can make the process hang or sleep
//! for ever.

use std::fmt;
use std::io::Read;
use std::ops::RangeInclusive;
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

/// The largest config file read. Real ones are a few hundred bytes; a
/// ConfigMap may hold at most 1 MiB in all.
pub const MAX_BYTES: u64 = 1024 * 1024;

/// Reads and parses the config file at `path`.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    parse(path, &read(path)?)
}

/// The text of the config file at `path`, if it is a regular file of at
/// most [`MAX_BYTES`].
pub fn read(path: &Path) -> Result<String, ConfigError> {
    let read_error = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let refuse = |reason: String| read_error(std::io::Error::other(reason));
    // Checked before opening: opening a FIFO for reading blocks until
    // something writes to it. (Symbolic links are followed, as in a
    // ConfigMap volume.)
    let metadata = std::fs::metadata(path).map_err(read_error)?;
    if !metadata.is_file() {
        return Err(refuse(format!(
            "not a regular file (it is {}); a config must be a JSON file",
            file_kind(&metadata.file_type())
        )));
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_BYTES + 1).read_to_string(&mut text))
        .map_err(read_error)?;
    if text.len() as u64 > MAX_BYTES {
        return Err(refuse(format!(
            "larger than {} KiB; a config is a small JSON object",
            MAX_BYTES / 1024
        )));
    }
    Ok(text)
}

fn file_kind(file_type: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a named pipe"
    } else if file_type.is_char_device() || file_type.is_block_device() {
        "a device"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
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

/// Checks that `value` of `field` lies in `range`, with an error that names
/// the field and the range. `unit` follows the numbers (such as `" ms"`).
pub fn in_range(
    path: &Path,
    field: &str,
    value: u64,
    range: RangeInclusive<u64>,
    unit: &str,
) -> Result<u64, ConfigError> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(invalid(
            path,
            field,
            format!(
                "{value}{unit} is out of range: use {}{unit} to {}{unit}",
                range.start(),
                range.end()
            ),
        ))
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
    #[expect(dead_code, reason = "only parsed, to check the errors")]
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
    fn only_a_small_regular_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let message = |path: &Path| load::<Sample>(path).unwrap_err().to_string();

        let fifo = dir.path().join("fifo.json");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        assert_eq!(
            message(&fifo),
            format!(
                "reading config {}: not a regular file (it is a named pipe); a config must be a JSON file \
                 (pass --config PATH to use another file)",
                fifo.display()
            )
        );
        assert!(message(Path::new("/dev/zero")).contains("not a regular file (it is a device)"));
        assert!(message(dir.path()).contains("not a regular file (it is a directory)"));

        let big = dir.path().join("big.json");
        let mut padded = String::from("{\"port\": 80}");
        padded.push_str(&" ".repeat(MAX_BYTES as usize));
        std::fs::write(&big, padded).unwrap();
        assert!(
            message(&big).ends_with(
                "larger than 1024 KiB; a config is a small JSON object (pass --config PATH to use another file)"
            ),
            "{}",
            message(&big)
        );
    }

    #[test]
    fn a_value_out_of_range_names_the_field_and_the_range() {
        let path = Path::new("lb.json");
        assert_eq!(in_range(path, "retries", 3, 0..=10, "").unwrap(), 3);
        assert_eq!(
            in_range(path, "drainDelayMs", u64::MAX, 0..=600_000, " ms")
                .unwrap_err()
                .to_string(),
            "config lb.json: field `drainDelayMs`: 18446744073709551615 ms is out of range: use 0 ms to 600000 ms"
        );
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
