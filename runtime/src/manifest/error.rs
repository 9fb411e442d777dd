use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A manifest file and its text.
#[derive(Debug)]
pub struct SourceText {
    /// The manifest file.
    pub path: PathBuf,
    /// Its text.
    pub text: String,
}

/// A manifest that cannot be used, and where: `file:line:column: message`, followed by the
/// offending line with a caret under the value, rustc-style.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    /// The manifest file.
    pub path: PathBuf,
    /// Where in it, when the error has a place.
    pub location: Option<Location>,
    /// What is wrong.
    pub message: String,
}

/// A 1-based line and column, with the text of that line and the width to underline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
    pub line_text: String,
    pub width: usize,
}

impl ManifestError {
    /// An error about the value at byte range `span` of `source`.
    pub fn at(source: &SourceText, span: Range<usize>, message: impl Into<String>) -> Self {
        ManifestError { path: source.path.clone(), location: Some(locate(&source.text, span)), message: message.into() }
    }

    /// An error about the file as a whole (unreadable, missing).
    pub fn without_location(path: &Path, message: impl Into<String>) -> Self {
        ManifestError { path: path.to_owned(), location: None, message: message.into() }
    }
}

fn locate(text: &str, span: Range<usize>) -> Location {
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let line_text = text[line_start..line_end].trim_end_matches('\r').to_owned();
    let column = text[line_start..start].chars().count() + 1;
    let end = span.end.clamp(start, line_end);
    Location {
        line: text[..start].matches('\n').count() + 1,
        column,
        width: text[start..end].chars().count().max(1),
        line_text,
    }
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        let Some(loc) = &self.location else {
            return write!(f, "{path}: {}", self.message);
        };
        writeln!(f, "{path}:{}:{}: {}", loc.line, loc.column, self.message)?;
        let gutter = loc.line.to_string().len();
        writeln!(f, "{:gutter$} |", "")?;
        writeln!(f, "{} | {}", loc.line, loc.line_text)?;
        write!(f, "{:gutter$} | {}{}", "", " ".repeat(loc.column - 1), "^".repeat(loc.width))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_line_and_column() {
        let source = SourceText { path: "m.toml".into(), text: "[a]\nkey = \"value\"\n".into() };
        let err = ManifestError::at(&source, 10..17, "bad value");
        assert_eq!(err.to_string(), "m.toml:2:7: bad value\n  |\n2 | key = \"value\"\n  |       ^^^^^^^");
    }
}
