//! Block jobs built on the engine: mirror (stream, commit and backup come
//! later).

pub mod mirror;
pub mod stream;
