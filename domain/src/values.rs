//! Validated identifiers and the field-level error every refusal of bad input
//! carries, so a client learns *which* field was wrong.

use serde::{Deserialize, Serialize};

/// Longest id accepted for users, stores, products and orders (SPEC §2).
pub const MAX_ID_LEN: usize = 64;

/// Bad input, naming the offending field in the client's own spelling
/// (`items[2].quantity`, `userId`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Checks an id: non-empty, at most 64 characters, none of them a control
/// character. Returns it unchanged, so callers can store what the client sent.
pub fn validate_id(field: &str, value: &str) -> Result<String, FieldError> {
    if value.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.chars().count() > MAX_ID_LEN {
        return Err(FieldError::new(
            field,
            format!("must be at most {MAX_ID_LEN} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must contain only printable characters",
        ));
    }
    Ok(value.to_string())
}

/// A product and a quantity: what an order asks for, and what a stock
/// reservation holds or releases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StockItem {
    pub product_id: String,
    pub quantity: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_non_empty_short_and_printable() {
        assert!(validate_id("userId", "u-1").is_ok());
        assert_eq!(validate_id("userId", "").unwrap_err().field, "userId");
        assert!(validate_id("storeId", &"x".repeat(64)).is_ok());
        assert!(validate_id("storeId", &"x".repeat(65)).is_err());
        assert!(validate_id("items[0].productId", "p\n1").is_err());
    }
}
