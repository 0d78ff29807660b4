//! Errors for configuration values that are out of range.

/// A configuration value outside its valid range.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("invalid configuration: {field} is {value}, but it must be {expected}")]
pub struct ConfigError {
    /// Name of the field, for example `refresh.short_token_fraction`.
    pub field: &'static str,
    /// The rejected value, formatted.
    pub value: String,
    /// The valid range, in words.
    pub expected: &'static str,
}
