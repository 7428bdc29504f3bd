//! The simulator CLI.

fn main() {}
