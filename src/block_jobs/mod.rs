//! Block jobs built on the engine: mirror (stream, commit and backup come
//! later).

pub mod commit;
pub mod mirror;
pub mod stream;
