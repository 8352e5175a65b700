//! Where desired state comes from: a directory on disk, or a revision of a git repository.
//! Reads only; never writes to a working tree.

pub mod git;
