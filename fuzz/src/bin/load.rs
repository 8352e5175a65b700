//! Fuzz target: bytes as one desired-state file in a tree, loaded and validated.
fn main() {
    vessel_fuzz::abort_on_panic();
    afl::fuzz!(|data: &[u8]| vessel_fuzz::load(data));
}
