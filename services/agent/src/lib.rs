//! agent: placeholder crate so the workspace has its final shape; its issue fills it in.
