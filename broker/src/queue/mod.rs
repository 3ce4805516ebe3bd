pub mod chunked;
pub mod consumers;
pub mod core;
pub mod handle;
