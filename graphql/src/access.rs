//! Who asks, and what they may do: the access rules every path (GraphQL,
//! and the REST routes through the same [`Caller`]) applies.
//!
//! A customer sees and changes only their own orders; another customer's
//! order answers exactly as an unknown one (NOT_FOUND), so its existence
//! does not leak. An operator may do everything. Without authentication
//! (`--auth none`) every caller is trusted as an operator.

use crate::{BackendError, ErrorCode};

/// The authenticated caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// `--auth none`: nobody is authenticated and everybody is trusted.
    Anonymous,
    /// A token with the operator role; `subject` is its `sub`.
    Operator { subject: String },
    /// Any other valid token; `user_id` is its `sub`.
    Customer { user_id: String },
}

impl Caller {
    /// Whether the caller may see and change an order placed by `user_id`.
    pub fn owns(&self, user_id: &str) -> bool {
        match self {
            Caller::Customer { user_id: me } => me == user_id,
            Caller::Anonymous | Caller::Operator { .. } => true,
        }
    }

    /// The customer's user id; `None` for operators and anonymous callers.
    pub fn customer(&self) -> Option<&str> {
        match self {
            Caller::Customer { user_id } => Some(user_id),
            Caller::Anonymous | Caller::Operator { .. } => None,
        }
    }

    /// Refuses (FORBIDDEN) a customer asking for an operator's `operation`.
    pub fn require_operator(&self, operation: &str) -> Result<(), BackendError> {
        match self {
            Caller::Customer { .. } => Err(BackendError::new(
                ErrorCode::Forbidden,
                format!("{operation}: needs the operator role"),
            )),
            Caller::Anonymous | Caller::Operator { .. } => Ok(()),
        }
    }

    /// The `userId` a new order is placed for: a customer's own (a
    /// different one asked for is FORBIDDEN; an empty one means theirs),
    /// anyone's for an operator.
    pub fn order_user(&self, requested: String) -> Result<String, BackendError> {
        match self {
            Caller::Customer { user_id } if requested.is_empty() || requested == *user_id => {
                Ok(user_id.clone())
            }
            Caller::Customer { .. } => Err(BackendError {
                code: ErrorCode::Forbidden,
                message: "userId: a customer orders only for themselves (the token's sub)".into(),
                field: Some("userId".into()),
            }),
            Caller::Anonymous | Caller::Operator { .. } => Ok(requested),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn customer(id: &str) -> Caller {
        Caller::Customer { user_id: id.into() }
    }

    #[test]
    fn a_customer_owns_only_their_orders() {
        assert!(customer("u-1").owns("u-1"));
        assert!(!customer("u-1").owns("u-2"));
        assert!(Caller::Anonymous.owns("u-2"));
        assert!(Caller::Operator {
            subject: "o".into()
        }
        .owns("u-2"));
    }

    #[test]
    fn a_customer_orders_for_themselves_only() {
        assert_eq!(customer("u-1").order_user(String::new()), Ok("u-1".into()));
        assert_eq!(customer("u-1").order_user("u-1".into()), Ok("u-1".into()));
        let refused = customer("u-1").order_user("u-2".into()).unwrap_err();
        assert_eq!(refused.code, ErrorCode::Forbidden);
        assert_eq!(refused.field.as_deref(), Some("userId"));
        assert_eq!(Caller::Anonymous.order_user("u-2".into()), Ok("u-2".into()));
    }

    #[test]
    fn operations_queries_need_the_operator_role() {
        assert!(customer("u-1").require_operator("setProduct").is_err());
        assert!(Caller::Anonymous.require_operator("setProduct").is_ok());
    }
}
