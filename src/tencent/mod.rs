//! Tencent Cloud Chat REST client (stub while being written).
pub mod error;
pub mod types;
pub mod usersig;
