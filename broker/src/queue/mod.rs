pub mod chunked;
pub mod consumers;
pub mod core;
pub mod dead_letter;
pub mod handle;
