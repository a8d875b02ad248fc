//! NBD, the wire half: the protocol's messages
//! ([`proto`](crate::nbd::proto)) and the byte streams it runs over
//! ([`transport`](crate::nbd::transport)). The client is a block driver
//! (`block::nbd`); the server is an export (`export`). Both use this
//! module and nothing here knows about nodes.

pub mod objects;
pub mod proto;
pub mod tls;
pub mod tls_creds;
pub mod transport;
